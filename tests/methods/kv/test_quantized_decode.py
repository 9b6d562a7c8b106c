"""The Pallas decode kernel that dequantises a ``QuantizedKVCache`` in place (pallas_kernels/decode_quantized.py,
``jattn.methods.kv.quantized.quantized_decode_attention``), against ``jattn.decode_attention``'s dense fp32
reference over the cache's dequantised view.

Both Pallas structures run in the interpreter (``"triton"``: the GPU loop; ``"mosaic"``: TPU's grid of
tiles with scalar prefetch), with NaN-poisoned outputs, on ragged sequences: empty, shorter than one key
group (only the residual), whole groups (no residual), a partial last group, and a full cache.

What each test catches (each mutation was applied as one line and the named test failed):

* ``test_kernel_equals_the_reference_over_the_dequantised_cache``: the unpack shift off by one bit
  (``i * bits + 1``); the selection matrix placing field ``i`` at ``m + i`` instead of ``m * (8 / bits) + i``;
  the key minimum dropped; a tile reading the next group's key scale (``ks_ref[t + 1]``); the split's end at
  ``length`` instead of the quantised length (the partial group read from codes); the residual left out of
  the merge; the residual's key offset at 0 instead of the group start; the value minimum dropped.
  (Not caught, and equivalent in results: the mosaic index map without its clamp to the needed range only
  changes which tile a skipped step would DMA.)
* ``test_unpack_tile_puts_every_code_in_its_channel``: the mask one bit too wide, the field order reversed.
* ``test_query_gradient_equals_the_reference``: the backward's window dropped.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.methods.kv.quantized import QuantizedKVCache, pack, quantized_decode_attention, unpack
from pallas_kernels.decode_quantized import unpack_tile
from tests.conftest import assert_close

H, HKV, D, G = 4, 2, 64, 16
LENGTHS = (0, 5, 32, 77, 256)   # empty, residual only, whole groups, partial last group, full
CAPACITY = 256


def ragged_cache(bits: int, lengths=LENGTHS, seed: int = 0) -> QuantizedKVCache:
    """One sequence per length (each appended in two chunks), stacked along the batch."""
    rng = np.random.default_rng(seed)
    caches = []
    for length in lengths:
        cache = QuantizedKVCache.create(1, HKV, CAPACITY, D, bits=bits, group_size=G)
        first = length // 3
        for n in (first, length - first):
            if n:
                k = rng.standard_normal((1, n, HKV, D)).astype(np.float32)
                k[..., 3] = 6.0 * k[..., 3] + 4.0                     # an outlier key channel
                v = rng.standard_normal((1, n, HKV, D)).astype(np.float32)
                cache = cache.append(jnp.asarray(k), jnp.asarray(v))
        caches.append(cache)
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *caches)


def queries(Tq: int, seed: int = 1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((len(LENGTHS), Tq, H, D)), jnp.float32)


OPTIONS = {
    "plain": {},
    "window_softcap_sinks": dict(window=20, softcap=4.0, sinks=jnp.linspace(-1.0, 1.0, H)),
}


@pytest.mark.parametrize("structure", ["triton", "mosaic"])
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("Tq", [1, 3])
@pytest.mark.parametrize("options", sorted(OPTIONS))
def test_kernel_equals_the_reference_over_the_dequantised_cache(structure, bits, Tq, options):
    cache, q, kw = ragged_cache(bits), queries(Tq), OPTIONS[options]
    out, lse = quantized_decode_attention(q, cache, impl="pallas", interpret=structure, num_splits=3,
                                          poison_outputs=True, return_lse=True, **kw)
    ref_out, ref_lse = quantized_decode_attention(q, cache, impl="reference", return_lse=True, **kw)
    assert_close(out, ref_out, what=f"out, bits={bits}")
    assert_close(lse, ref_lse, what=f"lse, bits={bits}")
    assert np.all(np.asarray(out)[0] == 0) if "sinks" not in kw else True   # the empty sequence sees nothing
    # the quantisation itself is visible: the reference over the float keys differs
    assert not np.allclose(np.asarray(ref_out)[1:], 0.0)


def test_kernel_equals_the_xla_path_under_jit():
    cache, q = ragged_cache(4), queries(1)
    run = jax.jit(lambda q, cache: (quantized_decode_attention(q, cache, impl="pallas", interpret=True),
                                    quantized_decode_attention(q, cache, impl="xla")))
    kernel, xla = run(q, cache)
    assert_close(kernel, xla, what="kernel vs xla")


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_unpack_tile_puts_every_code_in_its_channel(bits):
    codes = np.random.default_rng(bits).integers(0, 2 ** bits, (G, D)).astype(np.uint8)
    packed = pack(jnp.asarray(codes), bits=bits)
    np.testing.assert_array_equal(np.asarray(unpack_tile(packed, bits=bits, head_dim=D)), codes.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(unpack(packed, bits=bits, n=D)), codes)


def test_query_gradient_equals_the_reference():
    cache, q = ragged_cache(4), queries(2)
    weights = jnp.asarray(np.random.default_rng(3).standard_normal((len(LENGTHS), 2, H, D)), jnp.float32)

    def loss(q, impl):
        return jnp.sum(quantized_decode_attention(q, cache, impl=impl, interpret=True, window=30) * weights)
    assert_close(jax.grad(loss)(q, "pallas"), jax.grad(loss)(q, "reference"), what="dq")


def test_nan_query_gives_nan_in_its_sequence_only():
    cache, q = ragged_cache(8), queries(1)
    q = q.at[3, 0, 1, 5].set(jnp.nan)
    out = np.asarray(quantized_decode_attention(q, cache, impl="pallas", interpret=True))
    assert np.isnan(out[3, 0, 1]).all()
    assert np.isfinite(np.delete(out, 3, axis=0)).all()


def test_an_overflowed_sequence_gives_nan_rows():
    cache = ragged_cache(8, lengths=(40, 40))
    full = jax.jit(lambda c, k: c.append(k, k))(cache, jnp.ones((2, 240, HKV, D)))   # 280 > 256: marked
    assert np.asarray(full.lengths).tolist() == [CAPACITY + 1] * 2
    q = jnp.ones((2, H, D))
    assert np.isnan(np.asarray(quantized_decode_attention(q, full, impl="pallas", interpret=True))).all()


@pytest.mark.parametrize("bad, match", [
    (lambda c, q: quantized_decode_attention(q.astype(jnp.bfloat16), c), "cache's dtype"),
    (lambda c, q: quantized_decode_attention(q[..., :32], c), "D=64"),
    (lambda c, q: quantized_decode_attention(q, (c.k_codes, c.v_codes)), "QuantizedKVCache"),
    (lambda c, q: quantized_decode_attention(q, c, impl="fast"), "impl"),
    (lambda c, q: quantized_decode_attention(q, c, window=-1), "window"),
])
def test_bad_input_names_the_argument(bad, match):
    with pytest.raises((TypeError, ValueError), match=match):
        bad(ragged_cache(8, lengths=(40,) * len(LENGTHS)), queries(1))


def test_kernel_refuses_a_group_smaller_than_a_dot():
    cache = QuantizedKVCache.create(1, HKV, 128, D, bits=8, group_size=8)
    cache = cache.append(jnp.ones((1, 20, HKV, D)), jnp.ones((1, 20, HKV, D)))
    with pytest.raises(ValueError, match="group_size must be a power of two >= 16"):
        quantized_decode_attention(jnp.ones((1, H, D)), cache, impl="pallas", interpret=True)
    assert np.isfinite(np.asarray(quantized_decode_attention(jnp.ones((1, H, D)), cache, impl="xla"))).all()
