"""train.needle_kv: the evaluation's full-cache path is the model's own forward, and each method keeps the
keys its rule names. Mutations caught: the decode tokens not seeing each other (causal tail dropped); the
streaming window one key short; H2O's recent half left out; top-k over the prompt's own rows instead of
the decode query's; H2O's mass counting the padded query rows; TokenSelect's vote from the last decode
query instead of the chunk's mean, its local window left out; TidalDecode's later layer choosing afresh
instead of inheriting layer 0's positions, the second decode token given the first one's selection;
ZipCache's compression skipped."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.nn.models import DecoderLM
from train import needle_kv


@pytest.fixture(scope="module")
def model():
    return DecoderLM(64, 32, 2, 4, num_kv_heads=2, rngs=nnx.Rngs(0))


def test_full_cache_prediction_is_the_models_forward(model):
    tokens, _ = needle_kv.haystack(np.random.default_rng(0), 300, 0.5, 64)
    tokens = jnp.asarray(np.stack([tokens, np.roll(tokens, 7)]), jnp.int32)
    got = jax.jit(lambda t: needle_kv.predict(model, t, "full", 64))(tokens)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.argmax(model(tokens)[:, -1], -1)))


def test_haystack_draws_ids_as_the_training_task():
    tokens, value = needle_kv.haystack(np.random.default_rng(2), 500, 0.3, 64, needle_vocab=16)
    assert value >= 48 and tokens[-1] >= 48 and tokens[-2] == needle_kv.MARKER
    assert np.count_nonzero(tokens >= 48) == 3                  # the needle's key and value, the final key
    at = int(0.3 * (500 - 6))
    assert tokens[at] == needle_kv.MARKER and tokens[at + 1] == tokens[-1] and tokens[at + 2] == value


def test_keep_masks_follow_their_rules():
    rng = np.random.default_rng(1)
    B, T, H, Hkv, D, budget = 1, 202, 4, 2, 8, 32
    prompt = T - 2
    q = jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, T, Hkv, D)), jnp.float32)
    streaming = np.asarray(needle_kv.keep_mask("streaming", q, k, prompt, budget))
    assert streaming.sum(-1).tolist() == [[budget] * H]
    assert streaming[0, 0, :4].all() and streaming[0, 0, -(budget - 4):].all()
    h2o = np.asarray(needle_kv.keep_mask("h2o", q, k, prompt, budget))
    assert (h2o.sum(-1) == budget).all() and h2o[0, :, -budget // 2:].all()
    # H2O's heavy hitters: the largest prompt mass among the older keys, numpy transcription
    s = np.einsum("bqhd,bshd->bhqs", np.asarray(q[:, :prompt]), np.repeat(np.asarray(k[:, :prompt]), 2, 2)) / np.sqrt(D)
    s = np.where(np.tril(np.ones((prompt, prompt), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    mass = p.sum(2).reshape(B, Hkv, 2, prompt).sum(2)
    np.testing.assert_allclose(np.asarray(needle_kv.prompt_mass(q, k, prompt, block=64)), mass, rtol=1e-4)
    older = mass[0, 0, :prompt - budget // 2]
    assert set(np.nonzero(h2o[0, 0, :prompt - budget // 2])[0]) == set(np.argsort(-older)[:budget // 2])
    topk = np.asarray(needle_kv.keep_mask("topk", q, k, prompt, budget))
    logits = np.einsum("thd,shd->hts", np.asarray(q[0, prompt:]), np.repeat(np.asarray(k[0, :prompt]), 2, 1))
    best = logits.max(1).reshape(Hkv, 2, prompt).max(1)
    assert set(np.nonzero(topk[0, 0])[0]) == set(np.argsort(-best[0])[:budget])


def test_main_trains_then_finetunes_longer_and_evaluates_every_method(tmp_path, capsys):
    """The command's wiring: the second stage trains at ``--finetune-len`` (its own checkpoints), and the table
    has every method. Catches the fine-tune stage skipped and a method dropped."""
    import json
    train_dir = str(tmp_path / "needle")
    results = needle_kv.main(["--train-dir", train_dir, "--steps", "21", "--seq-len", "16", "--vocab", "24",
                              "--needle-vocab", "4", "--finetune-len", "40", "--finetune-steps", "21",
                              "--finetune-batch", "2", "--contexts", "64", "--depths", "0.5", "--samples", "2",
                              "--budget", "16", "--png", str(tmp_path / "grid.png")])
    assert set(results) == set(needle_kv.METHODS)
    assert all(0 <= float(grid.mean()) <= 1 for grid in results.values())
    records = [json.loads(line) for line in open(f"{train_dir}_len40/metrics.jsonl")]
    assert records and records[-1]["step"] == 21
    assert "then 21 at 40" in capsys.readouterr().out and (tmp_path / "grid.png").exists()


def _inputs(seed=1, B=1, T=202, H=4, Hkv=2, D=8):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32),
            jnp.asarray(rng.standard_normal((B, T, Hkv, D)), jnp.float32),
            jnp.asarray(rng.standard_normal((B, T, Hkv, D)), jnp.float32))


def test_tokenselect_keeps_sinks_locals_and_the_soft_vote():
    q, k, _ = _inputs()
    T, prompt, budget, sink = 202, 200, 32, 4
    local = budget // 4
    kept = np.asarray(needle_kv.keep_mask("tokenselect", q, k, prompt, budget))
    assert (kept == kept[:, :1]).all() and kept[0, 0].sum() == budget          # one set for every head
    assert kept[0, 0, :sink].all() and kept[0, 0, T - local:prompt].all()
    # numpy transcription of the vote: softmax over the candidates [sink, T - local) of the mean query
    fingerprint = np.asarray(q[0, prompt:]).mean(0)                              # [H, D]
    logits = np.einsum("hd,shd->hs", fingerprint, np.repeat(np.asarray(k[0]), 2, 1))[:, sink:T - local]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    votes = (p / p.sum(-1, keepdims=True)).sum(0)
    chosen = set(sink + np.argsort(-votes)[:budget + 2 - sink - local])
    assert set(np.nonzero(kept[0, 0, sink:T - local])[0] + sink) == chosen


def test_tidaldecode_persists_layer_zeros_positions():
    q, k, v = _inputs()
    prompt, budget = 200, 32
    kept = np.asarray(needle_kv.keep_mask("tidaldecode", q, k, prompt, budget))   # [B, H, 2, prompt]
    assert kept.shape == (1, 4, 2, prompt) and (kept.sum(-1) == budget).all()
    logits = np.einsum("thd,shd->hts", np.asarray(q[0, prompt:]), np.repeat(np.asarray(k[0, :prompt]), 2, 1))
    for h in range(4):
        for t in range(2):                                                       # per query head and token
            assert set(np.nonzero(kept[0, h, t])[0]) == set(np.argsort(-logits[h, t])[:budget])
    core = needle_kv.layer_core("tidaldecode", budget)
    full, _ = needle_kv.layer_core("full", budget)(q, k, v, 0, None)
    out0, passed = core(q, k, v, 0, None)                                        # the selection layer: full
    np.testing.assert_allclose(np.asarray(out0), np.asarray(full), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(passed), kept)
    other = jnp.asarray(np.random.default_rng(5).random(kept.shape) < 0.2)
    out1, still = core(q, k, v, 1, other)                                        # a later layer: inherited
    tail = jnp.tril(jnp.ones((2, 2), bool))
    mask = jnp.concatenate([other, jnp.broadcast_to(tail, (1, 4, 2, 2))], -1)
    expected = needle_kv.reference_attention(q[:, prompt:], k, v, mask=mask)
    np.testing.assert_allclose(np.asarray(out1[:, prompt:]), np.asarray(expected), atol=1e-6)
    assert still is other


def test_zipcache_attends_over_the_compressed_prompt():
    q, k, v = _inputs(T=130)
    prompt = 128
    out, _ = needle_kv.layer_core("zipcache", 16)(q, k, v, 3, None)
    k_z, v_z = needle_kv.zipcache_prompt(q, k, v, prompt, 3)
    assert not np.allclose(np.asarray(k_z), np.asarray(k[:, :prompt]), atol=1e-2)    # 2/4-bit: not the keys
    k_all, v_all = jnp.concatenate([k_z, k[:, prompt:]], 1), jnp.concatenate([v_z, v[:, prompt:]], 1)
    expected = needle_kv.reference_attention(q[:, prompt:], k_all, v_all, mask=jnp.tril(jnp.ones((2, 130), bool), 128))
    np.testing.assert_allclose(np.asarray(out[:, prompt:]), np.asarray(expected), atol=1e-5)
