"""train.tnl: the P58 TransNormerLLM LM built from TNLBlock, LRPE in the first layer only."""
import jax.numpy as jnp
import numpy as np
import pytest

from train.build import Task
from train.tnl import TNLLM, build_tnl_lm


def _task(vocab=17):
    return Task(data=None, loss=None, vocab_size=vocab, seq_len=12)


def test_lrpe_only_in_the_listed_layers_and_logits_are_causal():
    model = build_tnl_lm({"kind": "tnl_lm", "dim": 16, "num_layers": 3, "num_heads": 2, "mlp_dim": 24,
                          "chunk_size": 16}, _task(), seed=0)
    assert model.blocks[0].attention.theta is not None
    assert all(block.attention.theta is None for block in model.blocks[1:])
    tokens = np.random.default_rng(0).integers(0, 17, size=(2, 12))
    logits = model(jnp.asarray(tokens))
    assert logits.shape == (2, 12, 17) and logits.dtype == jnp.float32
    changed = tokens.copy()
    changed[:, 7:] = (changed[:, 7:] + 1) % 17
    later = model(jnp.asarray(changed))
    np.testing.assert_allclose(later[:, :7], logits[:, :7], rtol=1e-5, atol=1e-5)
    assert not np.allclose(later[:, 7:], logits[:, 7:])


def test_lrpe_is_the_only_difference_and_vanishes_at_zero_angles():
    # theta is not drawn from the rngs, so both models get the same weights; LRPE with theta = 0 maps
    # q, k to [q, 0], [k, 0], which leaves every score unchanged.
    kwargs = dict(dim=16, num_layers=2, num_heads=2, mlp_dim=24, chunk_size=16)
    with_lrpe = build_tnl_lm({"kind": "tnl_lm", **kwargs, "lrpe_layers": (0,)}, _task(), seed=0)
    without = build_tnl_lm({"kind": "tnl_lm", **kwargs, "lrpe_layers": ()}, _task(), seed=0)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 17, size=(2, 12)))
    assert not np.allclose(with_lrpe(tokens), without(tokens), atol=1e-4)
    theta = with_lrpe.blocks[0].attention.theta
    theta[...] = jnp.zeros_like(theta[...])
    np.testing.assert_allclose(with_lrpe(tokens), without(tokens), rtol=1e-5, atol=1e-5)


def test_bad_settings_name_themselves():
    with pytest.raises(ValueError, match="lrpe_layers"):
        build_tnl_lm({"kind": "tnl_lm", "dim": 16, "num_layers": 2, "num_heads": 2, "lrpe_layers": (2,)},
                     _task(), seed=0)
    with pytest.raises(ValueError, match="num_heads"):
        build_tnl_lm({"kind": "tnl_lm", "dim": 16, "num_layers": 2}, _task(), seed=0)
    with pytest.raises(ValueError, match="unknown settings"):
        build_tnl_lm({"kind": "tnl_lm", "dim": 16, "num_layers": 2, "num_heads": 2, "rope": True}, _task(), 0)
    with pytest.raises(ValueError, match="token task"):
        build_tnl_lm({"kind": "tnl_lm", "dim": 16, "num_layers": 2, "num_heads": 2}, _task(None), 0)
    with pytest.raises(ValueError, match="tokens"):
        TNLLM(17, 16, 1, 2, rngs=__import__("flax").nnx.Rngs(0))(jnp.zeros((2, 3)))
