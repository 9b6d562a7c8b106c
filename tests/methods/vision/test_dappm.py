"""P69 DDRNet's DAPPM: pooling pyramid with hierarchical fusion (a no-attention context baseline)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.methods.vision.dappm import DAPPM, POOLS, avg_pool_count_pad


def _normal(key, shape):
    return jax.random.normal(jax.random.key(key), shape, jnp.float32)


def test_avg_pool_counts_zero_padding_like_pytorch():
    """A numpy transcription of AvgPool2d(k, s, p, count_include_pad=True). Catches: dividing by the number of
    valid pixels only, a wrong output size."""
    x = _normal(0, (1, 9, 7, 2))
    for kernel, stride, pad in POOLS:
        got = np.asarray(avg_pool_count_pad(x, kernel, stride, pad))
        padded = np.pad(np.asarray(x), [(0, 0), (pad, pad), (pad, pad), (0, 0)])
        oh, ow = (9 + 2 * pad - kernel) // stride + 1, (7 + 2 * pad - kernel) // stride + 1
        want = np.array([[padded[0, i * stride:i * stride + kernel, j * stride:j * stride + kernel].sum((0, 1))
                          / kernel ** 2 for j in range(ow)] for i in range(oh)])[None]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_output_keeps_the_grid_and_the_global_branch_is_constant_over_space():
    """Output [B, H, W, out]; the global branch's context is one vector per image before upsampling, so the
    upsampled map is constant over space. Catches: a global branch that pools over the wrong axes."""
    module = DAPPM(8, 4, 6, rngs=nnx.Rngs(0))
    module.eval()
    x = _normal(1, (2, 8, 8, 8))
    assert module(x).shape == (2, 8, 8, 6)
    pooled = module.pooled(x)
    assert pooled[-1].shape == (2, 1, 1, 8)
    context = module.scales[3](pooled[-1])
    up = jax.image.resize(context, (2, 8, 8, context.shape[-1]), "bilinear")
    np.testing.assert_allclose(up, jnp.broadcast_to(up[:, :1, :1], up.shape), rtol=1e-6)


def test_forward_is_the_papers_hierarchical_fusion():
    """A transcription of y0 = conv1(x), y_i = conv3(up(conv1(pool_i(x))) + y_{i-1}), out = conv1(concat) +
    conv1(x) through the module's own units, with numpy pooling. Catches: a dropped ``+ y_{i-1}`` (parallel
    branches, as in PPM), a dropped shortcut, pools in the wrong order, nearest instead of bilinear upsampling."""
    module = DAPPM(4, 3, 5, rngs=nnx.Rngs(2))
    module.eval()
    x = _normal(3, (1, 16, 16, 4))
    pooled = []
    for kernel, stride, pad in POOLS:
        padded = np.pad(np.asarray(x), [(0, 0), (pad, pad), (pad, pad), (0, 0)])
        n = (16 + 2 * pad - kernel) // stride + 1
        pooled.append(jnp.asarray(np.array([[padded[0, i * stride:i * stride + kernel,
                                                    j * stride:j * stride + kernel].mean((0, 1))
                                             for j in range(n)] for i in range(n)])[None]))
    pooled.append(jnp.mean(x, axis=(1, 2), keepdims=True))
    branches = [module.scale0(x)]
    for i in range(4):
        context = module.scales[i](pooled[i])
        up = jax.image.resize(context, (1, 16, 16, 3), "bilinear")
        branches.append(module.process[i](up + branches[-1]))
    want = module.compression(jnp.concatenate(branches, -1)) + module.shortcut(x)
    np.testing.assert_allclose(module(x), want, rtol=1e-5, atol=1e-5)


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="branch_channels"):
        DAPPM(4, 0, 4, rngs=nnx.Rngs(0))
    module = DAPPM(4, 2, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"x must be \[B, H, W, 4\]"):
        module(jnp.ones((1, 8, 8, 3)))
