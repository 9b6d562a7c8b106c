"""jattn.nn.capture.attention_inputs: one record per Attention call, what the core received, nothing outside."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jattn
from jattn.nn import Attention, BertEncoder, DecoderLM
from jattn.nn.capture import attention_inputs

# Eager calls of the flash-xla path re-trace its scan every call (seconds each); the reference core is the
# same attention and keeps these eager tests fast. The capture does not depend on the impl.
FAST = {"impl": "reference"}


def _replay(record):
    """The layer output rebuilt from the recorded q, k, v through jattn.attention and the layer's finish."""
    out = jattn.attention(record.q, record.k, record.v, causal=record.causal, mask=record.mask,
                          scale=record.scale, impl="reference")
    return record.layer.finish(record.x, out)


def _numpy_probs(record):
    """softmax(q k^T / sqrt(D)) per head in numpy (GQA: query head h reads kv head h // (H // Hkv))."""
    q, k = np.asarray(record.q, np.float64), np.asarray(record.k, np.float64)
    H, Hkv, D = q.shape[2], k.shape[2], q.shape[3]
    k = np.repeat(k, H // Hkv, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(D)
    T, S = s.shape[-2:]
    keep = np.ones((1, 1, T, S), bool)
    if record.causal:
        keep = keep & np.tril(np.ones((T, S), bool))
    if record.mask is not None:
        keep = keep & np.asarray(record.mask)
    s = np.where(keep, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def decoder_run():
    # GQA (4 query heads on 2 kv heads) and RoPE, so "before RoPE" or "k repeated to H heads" would show
    model = DecoderLM(97, 32, 2, 4, num_kv_heads=2, rngs=nnx.Rngs(0), method_config=FAST)
    tokens = jax.random.randint(jax.random.key(1), (2, 11), 0, 97)
    with attention_inputs(probs=True) as records:
        with attention_inputs() as inner:
            model(tokens)
    return model, records, inner


@pytest.fixture(scope="module")
def bert_run():
    model = BertEncoder(89, 24, 2, 3, mlp_dim=48, max_position=16, rngs=nnx.Rngs(2), method_config=FAST)
    ids = jax.random.randint(jax.random.key(3), (2, 9), 1, 89)
    attention_mask = np.ones((2, 9), np.int32)
    attention_mask[1, 6:] = 0
    want = model(ids, attention_mask)
    with attention_inputs(probs=True) as records:
        got = model(ids, attention_mask)
    return model, want, got, records


def test_decoder_lm_one_record_per_layer_with_projected_rotated_qkv(decoder_run):
    """Catches: recording q/k before RoPE, k/v repeated to H heads, one record per model call instead of per
    layer, or records out of layer order."""
    model, records, _ = decoder_run
    assert [r.index for r in records] == [0, 1]
    assert [r.layer for r in records] == [b.attention for b in model.blocks]
    for record in records:
        assert record.q.shape == (2, 11, 4, 8) and record.k.shape == record.v.shape == (2, 11, 2, 8)
        assert record.causal is True and record.decode is False and record.method == "softmax"
        np.testing.assert_allclose(np.asarray(_replay(record)), np.asarray(record.output), atol=2e-5, rtol=2e-5)
    # the recorded k is the rotated one
    layer, record = model.blocks[0].attention, records[0]
    raw_k = layer.key(record.x).reshape(2, 11, 2, 8)
    assert not np.allclose(np.asarray(record.k), np.asarray(raw_k), atol=1e-3)
    np.testing.assert_allclose(np.asarray(record.k),
                               np.asarray(jattn.nn.apply_rope(raw_k, jnp.arange(11)[None])), atol=1e-5)


def test_bert_encoder_records_mask_and_bidirectional_core(bert_run):
    """Catches: dropping the padding mask from the record, recording causal=True for an encoder, or a replay
    that does not reproduce the layer output (wrong scale, q/k/v of another layer)."""
    model, want, got, records = bert_run
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert len(records) == 2 and [r.layer for r in records] == [b.attention for b in model.blocks]
    for record in records:
        assert record.q.shape == record.k.shape == record.v.shape == (2, 9, 3, 8)
        assert record.causal is False and record.mask is not None
        np.testing.assert_allclose(np.asarray(_replay(record)), np.asarray(record.output), atol=2e-5, rtol=2e-5)
    # a replay without the recorded mask differs for the padded sequence: the mask matters and was recorded
    record = records[0]
    unmasked = record.layer.finish(record.x, jattn.attention(record.q, record.k, record.v, causal=False,
                                                             impl="reference"))
    assert not np.allclose(np.asarray(unmasked[1]), np.asarray(record.output[1]), atol=1e-3)


def test_probs_are_the_cores_maps_and_only_when_asked(decoder_run, bert_run):
    """Catches: probs computed without the padding mask or the causal mask, maps of another layer, or maps
    stored for a context that did not ask for them (the inner one)."""
    _, records, inner = decoder_run
    _, _, _, bert_records = bert_run
    for record in records + bert_records:
        B, T, H, _ = record.q.shape
        assert record.probs.shape == (B, H, T, record.k.shape[1])
        np.testing.assert_allclose(np.asarray(record.probs), _numpy_probs(record), atol=1e-5)
    assert float(np.max(np.triu(np.asarray(records[0].probs)[0, 0], 1))) == 0.0
    assert float(np.max(np.asarray(bert_records[0].probs)[1, :, :, 6:])) == 0.0
    assert len(inner) == 2 and all(r.probs is None for r in inner)
    assert all(a.q is b.q for a, b in zip(inner, records))


@pytest.fixture(scope="module")
def layer():
    return Attention(24, 3, rngs=nnx.Rngs(4), num_kv_heads=1, rope=True, **FAST)


def test_nothing_recorded_outside_the_context_and_class_restored(layer):
    """Catches: leaving the wrappers installed after exit, or a list that keeps growing after the block."""
    original_call, original_project = Attention.__dict__["__call__"], Attention.__dict__["project"]
    x = jax.random.normal(jax.random.key(5), (1, 5, 24))
    with attention_inputs() as records:
        assert Attention.__dict__["__call__"] is not original_call
        want = layer(x)
    assert len(records) == 1 and records[0].k.shape == (1, 5, 1, 8)
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(want))
    assert len(records) == 1
    assert Attention.__dict__["__call__"] is original_call and Attention.__dict__["project"] is original_project


def test_state_restored_when_the_body_or_a_layer_raises(layer):
    """Catches: restoring the class only on a clean exit (no try/finally), or a failed layer call leaving a
    stale pending record that a later call would fill."""
    original_call = Attention.__dict__["__call__"]
    x = jax.random.normal(jax.random.key(6), (1, 4, 24))
    with pytest.raises(KeyError):
        with attention_inputs():
            raise KeyError("boom")
    assert Attention.__dict__["__call__"] is original_call
    with pytest.raises(ValueError, match="x must be"):
        with attention_inputs() as records:
            layer(jax.random.normal(jax.random.key(7), (1, 4, 31)))   # wrong width: the layer raises
    assert records == [] and Attention.__dict__["__call__"] is original_call
    with attention_inputs() as records:
        layer(x)
    assert len(records) == 1 and records[0].q.shape == (1, 4, 3, 8)


def test_jit_refused_inside_and_bad_argument(layer):
    """Catches: tracers leaking out of a jitted call into the records, or a non-bool probs accepted."""
    x = jax.random.normal(jax.random.key(8), (1, 4, 24))
    with attention_inputs() as records:
        with pytest.raises(RuntimeError, match="eagerly"):
            nnx.jit(lambda m, x: m(x))(layer, x)
    assert records == [] and Attention.__dict__["__call__"].__name__ == "__call__"
    with pytest.raises(TypeError, match="probs"):
        with attention_inputs(probs=1):
            pass


def test_dynamic_quality_benchmark_machinery():
    """benchmarks/dynamic_quality.py on tiny inputs. Catches: VMoBA's own `select` keyword colliding with
    sparse_quality's `select` again (TypeError), or the benchmark's density (used to pick the equal-density
    budget) counting tiles differently from sparse_quality, or counting all tiles for a causal selector."""
    from benchmarks import dynamic_quality as dq
    q, k, v = (jax.random.normal(key, (1, 64, 2, 16)) for key in jax.random.split(jax.random.key(9), 3))
    r = dq.sparse_quality(dq.SELECT["vmoba"], q, k, v, causal=False, impl="reference", repeats=1,
                          chunk_size=16, tau=0.25, block_q=16)
    assert dq.density_of(dq.SELECT["vmoba"](q, k, chunk_size=16, tau=0.25, block_q=16), False) == r["density"]
    assert 0.25 <= r["density"] <= 1.0 and 0.0 < r["recall"] <= 1.0
    # a causal selector at topk=0 keeps the sink column and the diagonal: 7 of the 10 causal tiles (of 16)
    mask = dq.SELECT["kinetics"](q, k, topk=0, block_q=16, block_size=16, sink=4, local=0)
    assert dq.density_of(mask, True) == pytest.approx(7 / 10) and dq.density_of(mask, False) == pytest.approx(7 / 16)
    assert len(dq.stdlib_text()) > 5000 and set(dq.SELECT) == set(dq.MINILM) == set(dq.EQUAL)


def test_records_sink_metric_runs_each_layers_own_hooked_core():
    """P50 on the hooks: per layer, the sink metric through the layer's core (ACT's prob_mod on layer 0, entropy
    scaling's score_mod on layer 1) equals the metric of the recorded maps. Catches measuring plain softmax instead
    of the layer's method (the ACT layer's map differs), and a wrong layer order."""
    from jattn.nn.attention_maps import sink_metric
    from jattn.nn.capture import records_sink_metric
    methods = [("act", {"head_mask": (True, False), "alpha": 0.05, "beta": 0.4}),
               ("entropy_scaled", {"train_keys": 4})]
    model = DecoderLM(50, 16, 2, 2, rngs=nnx.Rngs(0), layer_methods=methods)
    tokens = jax.random.randint(jax.random.key(1), (3, 13), 0, 50)
    with attention_inputs(probs=True) as records:
        model(tokens)
    alpha, pct = records_sink_metric(records, eps=0.3)
    want = jnp.stack([sink_metric(r.probs)[0][..., 0] for r in records])
    np.testing.assert_allclose(np.asarray(alpha), np.asarray(want), atol=2e-6)
    assert float(pct) == float(sink_metric(jnp.stack([r.probs for r in records]))[1])
    plain = jnp.stack([sink_metric(_numpy_probs(r).astype(np.float32))[0][..., 0] for r in records])
    assert float(jnp.abs(alpha - plain).max()) > 1e-3       # the hooks change what is measured


def test_records_sink_metric_refuses_what_has_no_causal_map(bert_run):
    from jattn.nn.capture import records_sink_metric
    with pytest.raises(ValueError, match="empty"):
        records_sink_metric([])
    with pytest.raises(ValueError, match="causal"):
        records_sink_metric(bert_run[3])
    model = DecoderLM(50, 16, 1, 2, rngs=nnx.Rngs(0), method="lightning")
    with attention_inputs() as records:
        model(jax.random.randint(jax.random.key(1), (1, 8), 0, 50))
    with pytest.raises(ValueError, match="no probability map"):
        records_sink_metric(records)
