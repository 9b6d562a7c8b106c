"""Every public Pallas op lowers for GPU (Triton) and TPU (Mosaic) from one trace on this CPU host.

``jax.export(..., platforms=[...])`` lowers the program as the target would: the export must hold the real
kernel's custom call (``__gpu$xla.gpu.triton`` / ``tpu_custom_call``), forward and backward, for
``impl="pallas"`` and for ``impl="auto"`` (which runs the xla path on CPU but the kernels elsewhere).
Interpret mode proves nothing about hardware; this proves the kernels pass Pallas' Triton and Mosaic
lowering (block-shape rules, supported primitives). It cannot prove that the device compilers accept them.
Current JAX lowers Triton only for a known GPU, hence the abstract H200 mesh.
"""
from __future__ import annotations

import contextlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jattn
from jattn import score_mods
from jattn.core import masks
from jattn.core.block_mask import BlockMask
from pallas_kernels.attention import BlockSizes, flash_attention

TRITON = "__gpu$xla.gpu.triton"
MOSAIC = "tpu_custom_call"
CALL = {"cuda": TRITON, "tpu": MOSAIC}


def abstract_gpu():
    """An abstract H200, so Triton lowering knows its compute capability without a GPU."""
    sharding = jax.sharding
    device = sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu")
    return sharding.use_abstract_mesh(sharding.AbstractMesh((1,), ("x",), abstract_device=device))


def exported_text(fn, *args, platform: str) -> str:
    ctx = abstract_gpu() if platform == "cuda" else contextlib.nullcontext()
    with ctx:
        exp = export.export(jax.jit(fn), platforms=[platform],
                            disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)])(*args)
    return exp.mlir_module()


def kernel_calls(fn, *args, platform: str) -> int:
    return exported_text(fn, *args, platform=platform).count(CALL[platform])


def grad_of(fn, argnums):
    return jax.grad(lambda *a: sum(jnp.sum(jnp.sin(x.astype(jnp.float32))) for x in
                                   jax.tree_util.tree_leaves(fn(*a))), argnums=argnums)


def qkv(B, T, S, H, Hkv, D, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(ks[0], (B, T, H, D), dtype), jax.random.normal(ks[1], (B, S, Hkv, D), dtype),
            jax.random.normal(ks[2], (B, S, Hkv, D), dtype))


PLATFORMS = ["cuda", "tpu"]
IMPLS = ["pallas", "auto"]

B, T, S = 1, 200, 176  # T, S not multiples of any tile
SHAPES = {"gqa_d64_f32": (4, 2, 64, jnp.float32), "mqa_d128_bf16": (8, 1, 128, jnp.bfloat16)}
FEATURES = {
    "causal": lambda H: dict(causal=True),
    "window_sinks_softcap": lambda H: dict(window=(48, 8), sinks=jnp.linspace(-1.0, 1.0, H), softcap=5.0),
    "bias_mask": lambda H: dict(bias=jax.random.normal(jax.random.PRNGKey(1), (B, H, T, S)),
                                mask=jax.random.bernoulli(jax.random.PRNGKey(2), 0.7, (B, 1, T, S))),
    "segments": lambda H: dict(segment_ids=(jnp.repeat(jnp.arange(4), 50)[None], jnp.repeat(jnp.arange(4), 44)[None])),
}


ATTENTION_CASES = [("auto", shape, feature) for shape in sorted(SHAPES) for feature in sorted(FEATURES)] + [
    ("pallas", "gqa_d64_f32", "bias_mask")]


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("impl, shape, feature", ATTENTION_CASES)
def test_attention_lowers_forward_and_backward(platform, impl, shape, feature):
    H, Hkv, D, dtype = SHAPES[shape]
    q, k, v = qkv(B, T, S, H, Hkv, D, dtype)
    kw = FEATURES[feature](H)
    bias = kw.pop("bias", None)

    def fn(q, k, v, bias):
        return jattn.attention(q, k, v, bias=bias, impl=impl, **kw)

    assert kernel_calls(fn, q, k, v, bias, platform=platform) == 1
    argnums = (0, 1, 2, 3) if bias is not None else (0, 1, 2)
    # forward (recomputed for the residuals) + dq (with the dS tiles when the bias is differentiated) + dk/dv
    assert kernel_calls(grad_of(fn, argnums), q, k, v, bias, platform=platform) == 3


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", [False, True])
def test_block_sparse_lowers_forward_and_backward(platform, impl, causal):
    q, k, v = qkv(2, T, S, 4, 2, 64)
    mask_fn = masks.sliding_window_mask(40, 24)
    block_mask = BlockMask.from_mask_fn(mask_fn, 1, 1, T, S, 64, 32)  # partial tiles and a ragged tail

    def fn(q, k, v):
        return jattn.block_sparse_attention(q, k, v, block_mask, mask_fn=mask_fn, causal=causal, impl=impl,
                                            sinks=jnp.zeros(4))

    assert kernel_calls(fn, q, k, v, platform=platform) == 1
    assert kernel_calls(grad_of(fn, (0, 1, 2)), q, k, v, platform=platform) == 3


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("impl", IMPLS)
def test_lightning_lowers_forward_and_backward(platform, impl):
    q, k, v = qkv(1, 100, 100, 4, 4, 32)
    log_decay = jattn.alibi_log_decay(4)

    def fn(q, k, v):
        return jattn.linear_attention(q, k, v, log_decay=log_decay, impl=impl, return_final_state=True)

    assert kernel_calls(fn, q, k, v, platform=platform) == 1
    assert kernel_calls(grad_of(fn, (0, 1, 2)), q, k, v, platform=platform) == 3


@pytest.mark.parametrize("platform", PLATFORMS)
def test_non_causal_linear_attention_is_two_gemms_on_every_impl(platform):
    """As documented in ``linear_attention_pallas``: non-causal has no kernel (two XLA GEMMs)."""
    q, k, v = qkv(1, 64, 64, 2, 2, 16)
    fn = lambda q, k, v: jattn.linear_attention(q, k, v, causal=False, impl="pallas")  # noqa: E731
    assert kernel_calls(fn, q, k, v, platform=platform) == 0


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("grid, kernel_size", [((40,), 7), ((12, 10), (5, 3)), ((6, 5, 8), 3)])
def test_neighborhood_attention_lowers_forward_and_backward(platform, impl, grid, kernel_size):
    shape = (1, *grid, 2, 32)
    q = jax.random.normal(jax.random.PRNGKey(0), shape)

    def fn(q, k, v):
        return jattn.neighborhood_attention(q, k, v, kernel_size=kernel_size, impl=impl)

    assert kernel_calls(fn, q, q, q, platform=platform) >= 1
    assert kernel_calls(grad_of(fn, (0, 1, 2)), q, q, q, platform=platform) >= 3


def test_auto_holds_no_kernel_when_lowered_for_cpu():
    q, k, v = qkv(1, 64, 64, 2, 2, 16)
    text = exported_text(lambda q, k, v: jattn.attention(q, k, v, causal=True), q, k, v, platform="cpu")
    assert TRITON not in text and MOSAIC not in text and "jattn_flash" not in text


def test_tpu_illegal_tile_fails_only_when_lowered_for_tpu():
    """block_k=64 is not a lane multiple: TPU lowering names it; CPU runs and GPU lowering still work."""
    q, k, v = qkv(1, T, S, 2, 2, 64)
    bias = jax.random.normal(jax.random.PRNGKey(3), (1, 2, T, S))
    sizes = BlockSizes(block_k=64)

    def fn(q, k, v, bias):
        return flash_attention(q, k, v, bias=bias, scale=0.125, block_sizes=sizes)[0]

    assert kernel_calls(fn, q, k, v, bias, platform="cuda") == 1
    with pytest.raises(ValueError, match="block_k=64 cannot run on TPU"):
        exported_text(fn, q, k, v, bias, platform="tpu")
    out = jax.jit(fn)(q, k, v, bias)
    want = jattn.attention(q, k, v, bias=bias, scale=0.125, impl="reference")
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=2e-5)


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("paged", [False, True])
def test_decode_lowers_forward_and_its_gradient(platform, impl, paged):
    """One split-K kernel call forward; the gradient holds exactly the forward and the Pallas backward kernel
    (by their names: Triton's ``name``, Mosaic's ``kernel_name``) and no XLA dot outside them: the xla path's
    VJP (the old backward, 9 ``stablehlo.dot_general`` here) is gone. (Source file names in the locations are
    no evidence: a jaxpr cached from an earlier xla-path trace keeps its ``decode_xla.py`` locations.)"""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, 2, 8, 64)), jnp.bfloat16)  # D=64: head-major blocks are lane-legal
    cache = jnp.asarray(rng.standard_normal((2, 10, 64, 64) if paged else (2, 2, 256, 64)), jnp.bfloat16)
    lengths = jnp.array([100, 256], jnp.int32)
    table = jnp.array([[3, 1, 0, 2], [5, 6, 7, 9]], jnp.int32) if paged else None

    def fn(q, k, v):
        return jattn.decode_attention(q, k, v, lengths, page_table=table, window=100, softcap=30.0, impl=impl)

    assert kernel_calls(fn, q, cache, cache, platform=platform) == 1
    text = exported_text(grad_of(fn, (0, 1, 2)), q, cache, cache, platform=platform)
    assert text.count(CALL[platform]) == 2
    assert sorted(re.findall(r'\b(?:kernel_)?name = "(jattn_\w+)"', text)) == ["jattn_decode", "jattn_decode_bwd"]
    assert "stablehlo.dot_general" not in text


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bits, dtype", [(8, jnp.bfloat16), (4, jnp.float32), (2, jnp.float32)])
def test_quantized_decode_lowers_forward_and_its_query_gradient(platform, impl, bits, dtype):
    """The kernel that dequantises a QuantizedKVCache's packed codes in place: one call forward, by its name.
    The query gradient is the xla path's over the dequantised view (the codes have no gradient): under
    ``jax.grad`` alone the forward's value is unused, so that program holds no kernel call at all."""
    from jattn.methods.kv.quantized import QuantizedKVCache, quantized_decode_attention
    rng = np.random.default_rng(0)
    cache = QuantizedKVCache.create(2, 2, 256, 128, bits=bits, group_size=32, dtype=dtype)
    kv = jnp.asarray(rng.standard_normal((2, 100, 2, 128)), dtype)
    cache = cache.append(kv, kv)
    q = jnp.asarray(rng.standard_normal((2, 8, 128)), dtype)

    def fn(q, cache):
        return quantized_decode_attention(q, cache, impl=impl, window=50, softcap=20.0)

    text = exported_text(fn, q, cache, platform=platform)
    assert text.count(CALL[platform]) == 1
    assert re.findall(r'\b(?:kernel_)?name = "(jattn_\w+)"', text) == ["jattn_decode_quantized"]
    assert kernel_calls(jax.grad(lambda q, c: jnp.sum(fn(q, c).astype(jnp.float32))), q, cache, platform=platform) == 0


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("impl", IMPLS)
def test_attention_with_score_mod_lowers_forward_and_backward(platform, impl):
    """ALiBi (its slopes read at the program's head: a ref load, SMEM on TPU) times a per-head temperature:
    the forward, the q/k/v backward (forward + dq + dk/dv) and the temperature's gradient (which adds the dq
    kernel's dS tiles and one dense XLA step) all hold the real kernels."""
    H = 4
    q, k, v = qkv(B, T, S, H, 2, 64)
    temperature = jnp.linspace(0.5, 1.5, H)

    def fn(q, k, v, temperature):
        mod = score_mods.compose(score_mods.alibi(H), score_mods.head_temperature(temperature))
        return jattn.attention(q, k, v, causal=True, score_mod=mod, impl=impl)

    assert kernel_calls(fn, q, k, v, temperature, platform=platform) == 1
    assert kernel_calls(grad_of(fn, (0, 1, 2)), q, k, v, temperature, platform=platform) == 3
    assert kernel_calls(grad_of(fn, (0, 1, 2, 3)), q, k, v, temperature, platform=platform) == 3


def test_score_mod_gather_lowers_for_gpu_and_names_itself_on_tpu():
    """A relative-position table read at ``q_idx - kv_idx`` is a gather across the tile: Triton lowers it;
    Mosaic cannot, and the TPU lowering says why instead of failing inside the compiler."""
    q, k, v = qkv(B, T, S, 2, 2, 64)
    table = jax.random.normal(jax.random.PRNGKey(4), (2, 33))

    def fn(q, k, v, table):
        return jattn.attention(q, k, v, score_mod=score_mods.relative_position_bias(table), impl="pallas")

    assert kernel_calls(fn, q, k, v, table, platform="cuda") == 1
    with pytest.raises(ValueError, match="score_mod reads an array it closes over at an index that varies"):
        exported_text(fn, q, k, v, table, platform="tpu")


@pytest.mark.parametrize("platform", PLATFORMS)
def test_block_sparse_with_score_mod_lowers_forward_and_backward(platform):
    """ALiBi on the block-sparse kernel: forward and the q/k/v backward (dq + dk/dv) hold the real kernels."""
    q, k, v = qkv(2, T, S, 4, 2, 64)
    bm = jattn.BlockMask.from_mask_fn(masks.sliding_window_mask(40, 24), 1, 1, T, S, 32, 32)

    def fn(q, k, v):
        return jattn.block_sparse_attention(q, k, v, bm, score_mod=score_mods.alibi(4), impl="pallas")

    assert kernel_calls(fn, q, k, v, platform=platform) == 1
    assert kernel_calls(grad_of(fn, (0, 1, 2)), q, k, v, platform=platform) == 3
