"""P45 DuoAttention (jattn.methods.kv.duo_attention, train/duo_gates.py): the Λ mask against a literal transcription
of the official ``generate_streaming_mask``; the mixed, streaming and deployed attention against the dense fp32
reference (forward and gradients); the ring-buffer cache against dense masked attention token by token; the
byte formula against the stored buffers; head selection and the loss against NumPy transcriptions of the
official code; and a few gate-training steps on a model with one local head.

Mutations each test catches (each was applied to duo_attention.py and seen to fail):
* test_streaming_mask_and_block_mask: the recent window one key shorter (``sink_local_mask(sink, recent - 1)``).
* test_mixed_on_the_kernels_alpha_one_zero_and_between: the gate expanded with ``jnp.tile`` instead of
  ``jnp.repeat`` (query heads paired with the wrong kv head's gate).
* test_duo_attention_equals_dense_with_per_head_mask: the merge of the two head sets without the inverse
  permutation (``order`` instead of ``argsort(order)``).
* test_ring_decode_equals_masked_dense_token_by_token: the ring slot without the sink offset
  (``(position - sink) % recent``); the ring lengths not capped (``position + 1``) or one too long
  (``position + 2``).
* test_kv_bytes_formula_equals_the_stored_buffers: the ring allocated ``sink + recent + 1`` slots.
* test_sparsify_heads_follows_the_official_rule: ``floor`` instead of ``ceil`` for the number of streaming heads.
* test_distillation_loss_follows_the_official_code: the squared error summed over ``d`` instead of averaged.
* test_gate_training_moves_the_local_head_below_the_others: the mix ignoring the streaming branch
  (``gate * full + (1 - gate) * full``).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.core.reference import reference_attention
from jattn.methods.kv.duo_attention import (DuoKVCache, duo_attention, duo_distillation_loss, duo_kv_bytes,
                                            mixed_duo_attention, sparsify_heads, streaming_block_mask,
                                            streaming_mask)
from jattn.ops.attention import attention
from tests.conftest import assert_close, build_module, numpy_qkv

BLOCK = dict(block_q=16, block_k=16)
# "xla" is the CPU path of impl="auto" (the block-sparse and flash kernels' pure-JAX form); "reference" runs the
# same ops densely (the BlockMask expanded to its element mask), a fraction of the compile time. Each public
# function is checked at least once on "xla".
CHEAP = dict(BLOCK, impl="reference")


def official_streaming_mask(L, sink, recent):
    """Literal transcription of duo_attn/patch/streaming_attn.py generate_streaming_mask (before padding)."""
    ones = np.ones((L, L), bool)
    causal = ~np.triu(ones, 1)
    recent_mask = np.triu(ones, -recent + 1)
    sink_mask = ones.copy()
    sink_mask[:, sink:] = False
    return (recent_mask | sink_mask) & causal


def per_head_mask(L, H, Hkv, flags, sink, recent):
    causal = np.tril(np.ones((L, L), bool))
    stream = official_streaming_mask(L, sink, recent)
    return jnp.asarray(np.stack([causal if flags[h // (H // Hkv)] else stream for h in range(H)])[None])


@pytest.mark.parametrize("L,sink,recent", [(37, 3, 5), (37, 4, 32), (37, 4, 33)])
def test_streaming_mask_and_block_mask(L, sink, recent):
    """The Λ mask and its BlockMask's element mask equal the official mask; with L <= sink + recent both are the
    causal mask (so streaming attention is full attention: it is dense attention under this mask, the alpha = 0
    tests)."""
    want = official_streaming_mask(L, sink, recent)
    np.testing.assert_array_equal(streaming_mask(L, sink, recent), want)
    block_mask = streaming_block_mask(L, sink, recent, **BLOCK)
    np.testing.assert_array_equal(block_mask.to_dense_mask()[0, 0], want)
    causal = np.tril(np.ones((L, L), bool))
    assert np.array_equal(want, causal) == (L <= sink + recent)


@jax.jit
def dense(q, k, v, mask):
    """The fp32 oracle with a bool mask (compiled once per shape)."""
    return reference_attention(q, k, v, mask=mask)


def test_mixed_on_the_kernels_alpha_one_zero_and_between():
    """The xla (CPU) path compiled once, called with three gate vectors; then the gradients of the mix (alpha and
    q, k, v) on the reference impl against the oracle's (the kernels' own backward passes are the block-sparse
    and flash family tests')."""
    L, H, Hkv, sink, recent = 29, 6, 3, 2, 4
    q, k, v = numpy_qkv(3, 2, L, L, H, Hkv, 16)
    weights = jnp.asarray(np.random.default_rng(4).standard_normal((2, L, H, 16)), jnp.float32)
    mix = jax.jit(lambda alpha, q, k, v: mixed_duo_attention(q, k, v, alpha, sink=sink, recent=recent, impl="xla",
                                                             **BLOCK))
    causal = jnp.tril(jnp.ones((L, L), bool))
    stream_mask = jnp.asarray(official_streaming_mask(L, sink, recent))
    full, stream = dense(q, k, v, causal), dense(q, k, v, stream_mask)

    out = mix(jnp.ones((Hkv,)), q, k, v)                                # alpha = 1: full attention, exactly
    np.testing.assert_array_equal(out, jax.jit(lambda q, k, v: attention(q, k, v, causal=True, impl="xla"))(q, k, v))
    assert_close(out, full)
    assert_close(mix(jnp.zeros((Hkv,)), q, k, v), stream)               # alpha = 0: StreamingLLM
    alpha = jnp.asarray([0.2, 0.9, 0.5])                                # in between: per kv head interpolation
    gate = jnp.repeat(alpha, H // Hkv)[None, None, :, None]
    assert_close(mix(alpha, q, k, v), gate * full + (1 - gate) * stream)

    @jax.jit
    def gradients(alpha, q, k, v):
        def loss(alpha, q, k, v):
            return jnp.sum(mixed_duo_attention(q, k, v, alpha, sink=sink, recent=recent, **CHEAP) * weights)

        def oracle(alpha, q, k, v):
            gate = jnp.repeat(alpha, H // Hkv)[None, None, :, None]
            mixed = gate * reference_attention(q, k, v, mask=causal) + (1 - gate) * reference_attention(
                q, k, v, mask=stream_mask)
            return jnp.sum(mixed * weights)
        return [jax.grad(f, argnums=(0, 1, 2, 3))(alpha, q, k, v) for f in (loss, oracle)]
    got, want = gradients(alpha, q, k, v)
    per_head = np.sum(np.asarray(weights * (full - stream)), axis=(0, 1, 3))       # d loss / d gate, per q head
    assert_close(want[0], per_head.reshape(Hkv, H // Hkv).sum(1), what="oracle d alpha")
    for name, g, w in zip(("alpha", "q", "k", "v"), got, want):
        assert_close(g, w, factor=2, what=f"d {name}")


@pytest.mark.parametrize("H,Hkv,flags", [(8, 4, (True, False, False, True))])
def test_duo_attention_equals_dense_with_per_head_mask(H, Hkv, flags):
    L, sink, recent = 35, 2, 6
    q, k, v = numpy_qkv(6, 2, L, L, H, Hkv, 16)
    want = dense(q, k, v, per_head_mask(L, H, Hkv, flags, sink, recent))
    window = dict(sink=sink, recent=recent, **CHEAP)       # the xla path of the split: the ring-decode test
    static = jax.jit(lambda q, k, v: duo_attention(q, k, v, flags, **window))(q, k, v)
    traced = jax.jit(lambda q, k, v, f: duo_attention(q, k, v, f, **window))(q, k, v, jnp.asarray(flags))
    assert_close(static, want, what="static split")
    assert_close(traced, want, what="traced flags")


@pytest.mark.parametrize("H,Hkv,flags,sink,recent,prompt,impl", [
    (6, 3, (True, False, True), 3, 5, 5, "xla"),         # prompt shorter than the ring: decode fills it first
    (4, 1, (False,), 0, 4, 7, "reference")])             # prompt longer: prefill already wraps
def test_ring_decode_equals_masked_dense_token_by_token(H, Hkv, flags, sink, recent, prompt, impl):
    B, T, D = 2, 30, 16
    q, k, v = numpy_qkv(7, B, T, T, H, Hkv, D)
    want = dense(q, k, v, per_head_mask(T, H, Hkv, flags, sink, recent))

    @jax.jit
    def run(q, k, v):
        cache = DuoKVCache.create(B, flags, T, D, sink=sink, recent=recent)
        # prefill on the oracle impl (its xla path: the kernel test's branches, split as in the duo_attention test)
        out, cache = cache.prefill(q[:, :prompt], k[:, :prompt], v[:, :prompt], **CHEAP)

        def one(cache, token):
            step_out, cache = cache.step(*token, impl=impl)
            return cache, step_out
        cache, outs = jax.lax.scan(one, cache, tuple(jnp.moveaxis(x[:, prompt:], 1, 0) for x in (q, k, v)))
        return out, jnp.moveaxis(outs, 0, 1), cache
    prefill_out, step_outs, cache = run(q, k, v)
    assert_close(prefill_out, want[:, :prompt], what="prefill")
    assert_close(step_outs, want[:, prompt:], what="decode steps")
    streaming = [g for g in range(Hkv) if not flags[g]]
    if streaming:            # the ring holds exactly the sinks and the last `recent` keys
        held = sorted(set(range(sink)) | set(range(T - recent, T)))
        ring = np.sort(np.asarray(cache.ring_k)[..., 0], axis=-1)
        np.testing.assert_array_equal(ring, np.sort(np.asarray(jnp.swapaxes(k, 1, 2))[:, streaming][:, :, held, 0],
                                                    axis=-1))
    np.testing.assert_array_equal(cache.lengths, [T] * B)


@pytest.mark.parametrize("flags,dtype", [((True, False, False, True), jnp.float32), ((False, True), jnp.bfloat16)])
def test_kv_bytes_formula_equals_the_stored_buffers(flags, dtype):
    L, sink, recent, D, B = 50, 4, 12, 16, 3
    cache = DuoKVCache.create(B, flags, L, D, sink=sink, recent=recent, dtype=dtype)
    want = duo_kv_bytes(L, num_retrieval=sum(flags), num_streaming=len(flags) - sum(flags), sink=sink, recent=recent,
                        head_dim=D, itemsize=jnp.dtype(dtype).itemsize, batch=B)
    assert cache.nbytes == want
    full = duo_kv_bytes(L, num_retrieval=len(flags), num_streaming=0, sink=sink, recent=recent, head_dim=D,
                        itemsize=jnp.dtype(dtype).itemsize, batch=B)
    assert want < full


def official_sparsify(alpha, sparsity):
    """duo_attn/utils.py sparsify_attention_heads with sparsity given, without its tie-breaking noise."""
    threshold = np.quantile(alpha, sparsity)
    if sparsity >= 1:
        threshold = 2
    if sparsity <= 0:
        threshold = -1
    return alpha >= threshold


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.6, 0.9, 1.0])
def test_sparsify_heads_follows_the_official_rule(sparsity):
    alpha = np.random.default_rng(8).uniform(0, 1, (3, 5)).astype(np.float32)     # distinct values
    np.testing.assert_array_equal(sparsify_heads(jnp.asarray(alpha), sparsity=sparsity),
                                  official_sparsify(alpha, sparsity))
    np.testing.assert_array_equal(sparsify_heads(jnp.asarray(alpha)), alpha >= 0.5)
    ties = jnp.asarray([0.3, 0.3, 0.3, 0.3])                   # ties: lower flat index becomes streaming first
    np.testing.assert_array_equal(sparsify_heads(ties, sparsity=0.5), [False, False, True, True])


def test_distillation_loss_follows_the_official_code():
    rng = np.random.default_rng(9)
    full, mixed = rng.standard_normal((2, 2, 7, 12)).astype(np.float32)
    labels = rng.uniform(size=(2, 7)) < 0.4
    alphas = [rng.uniform(size=4).astype(np.float32), rng.uniform(size=4).astype(np.float32)]
    distill = ((full[labels] - mixed[labels]) ** 2).mean(-1).sum() / labels.sum()
    l1 = np.abs(np.concatenate(alphas)).sum() / 8
    got = duo_distillation_loss(jnp.asarray(full), jnp.asarray(mixed), jnp.asarray(labels),
                                [jnp.asarray(a) for a in alphas], 0.05)
    np.testing.assert_allclose(float(got), distill + 0.05 * l1, rtol=1e-5)


def test_gate_training_moves_the_local_head_below_the_others():
    from jattn.nn.models import DecoderLM
    from train.duo_gates import Passkey, local_gates, train_gates
    # random weights without compiling the initialisers (unit scale: attention outputs the loss can see)
    model = build_module(lambda: DecoderLM(16, 16, 1, 4, num_kv_heads=4, rngs=nnx.Rngs(0)), scale=1.0)
    base = local_gates(1, 4, {0: (2,)})
    alpha, history = train_gates(model, Passkey(16, 16, 4), base, steps=10, batch=4, seed=0, sink=1, recent=3,
                                 impl="reference", labels="all")
    assert alpha[0, 2] < alpha[0, [0, 1, 3]].min() - 0.05, alpha
    assert np.all((alpha >= 0) & (alpha <= 1))


def test_overflow_and_bad_arguments_are_named():
    q, k, v = numpy_qkv(10, 1, 4, 4, 2, 2, 16)
    full = dataclasses.replace(DuoKVCache.create(1, (True, False), 4, 16, sink=1, recent=2),
                               lengths=jnp.asarray([4], jnp.int32))                 # 4 tokens: at capacity
    with pytest.raises(ValueError, match="capacity"):
        jax.eval_shape(lambda q, k, v: full.step(q, k, v), q[:, 0], k[:, 0], v[:, 0])
    out, overflowed = jax.jit(lambda c, q, k, v: c.step(q, k, v, impl="reference"))(full, q[:, 0], k[:, 0], v[:, 0])
    assert np.isnan(np.asarray(out)).all() and int(overflowed.lengths[0]) == 5
    with pytest.raises(ValueError, match="recent"):
        streaming_mask(8, 1, 0)
    with pytest.raises(ValueError, match="is_retrieval"):
        jax.eval_shape(lambda q, k, v: duo_attention(q, k, v, (True,), sink=1, recent=2), q, k, v)
    with pytest.raises(ValueError, match="alpha"):
        jax.eval_shape(lambda q, k, v: mixed_duo_attention(q, k, v, jnp.ones(3), sink=1, recent=2), q, k, v)
    with pytest.raises(ValueError, match="sparsity"):
        sparsify_heads(jnp.ones(4), sparsity=1.5)
    with pytest.raises(ValueError, match="label_mask"):
        duo_distillation_loss(q[..., 0], q[..., 0], jnp.ones((1, 3), bool), jnp.ones(2), 0.05)
