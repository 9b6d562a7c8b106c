"""One convention for windows and causality across jattn, and public ops that say which arguments must be
static under jit (issue 12 §3)."""
import functools

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import jattn
from jattn.nn import Attention
from tests.conftest import assert_close

B, T, H, HKV, D = 2, 24, 4, 2, 16


def _qkv(seed=0, hkv=HKV):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kq, (B, T, H, D)), jax.random.normal(kk, (B, T, hkv, D)),
            jax.random.normal(kv, (B, T, hkv, D)))


# ---------------------------------------------------------------------------------- windows

@pytest.mark.parametrize("causal", [False, True])
def test_int_window_is_jax_nn_local_window_size(causal):
    q, k, v = _qkv(hkv=H)   # jax.nn's xla path, one kv head per q head
    want = jax.nn.dot_product_attention(q, k, v, is_causal=causal, local_window_size=3, implementation="xla")
    assert_close(jattn.attention(q, k, v, causal=causal, window=3, impl="xla"), want)
    assert_close(jattn.reference_attention(q, k, v, causal=causal, window=3), want)
    assert_close(jattn.attention(q, k, v, causal=causal, window=(3, 3), impl="xla"), want)
    # and the window is really applied
    assert float(jnp.max(jnp.abs(jattn.attention(q, k, v, causal=causal) - want))) > 1e-3


def test_window_counts_keys_left_of_the_query_and_matches_the_mask_function():
    q, k, v = _qkv(1)
    mask = jattn.materialize(jattn.masks.sliding_window_mask(4), 1, 1, T, T)
    assert int(mask[0, 0, 10].sum()) == 5          # keys 6..10: the query and the 4 before it
    want = jattn.reference_attention(q, k, v, mask=mask)
    assert_close(jattn.attention(q, k, v, causal=True, window=(4, 0), impl="xla"), want)
    assert_close(jattn.attention(q, k, v, causal=True, window=4, impl="xla"), want)


@pytest.mark.parametrize("window", [4, (4, 0), 0])
def test_sliding_window_layer_equals_jattn_attention_with_the_same_window(window):
    x = jax.random.normal(jax.random.key(2), (B, T, 32))
    layer = Attention(32, H, num_kv_heads=HKV, rngs=nnx.Rngs(0), method="sliding_window", window=window)
    q, k, v = layer.project(x, jnp.arange(T)[None])
    n = window if isinstance(window, int) else window[0]
    want = layer.finish(x, jattn.attention(q, k, v, causal=True, window=(n, 0)))
    assert_close(layer(x), want)
    _, probs = layer(x, return_probs=True)
    assert int(jnp.max(jnp.sum(probs > 0, -1))) == n + 1     # the query and the n keys before it


def test_bidirectional_sliding_window_layer_is_symmetric():
    x = jax.random.normal(jax.random.key(3), (B, T, 32))
    layer = Attention(32, H, rngs=nnx.Rngs(0), method="sliding_window", window=2, causal=False)
    q, k, v = layer.project(x, jnp.arange(T)[None])
    assert_close(layer(x), layer.finish(x, jattn.attention(q, k, v, window=(2, 2))))
    pair = Attention(32, H, rngs=nnx.Rngs(0), method="sliding_window", window=(2, 1), causal=False)
    assert_close(pair(x), pair.finish(x, jattn.attention(q, k, v, window=(2, 1))))


def test_bad_windows_name_the_argument():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="window"):
        jattn.attention(q, k, v, window=-1)
    with pytest.raises(TypeError, match="window must be an int n"):
        jattn.attention(q, k, v, window=(1, 2, 3))
    with pytest.raises(TypeError, match="window"):
        jattn.attention(q, k, v, window=True)


# ---------------------------------------------------------------------------------- causal flag name

def test_neighborhood_attention_takes_causal_and_warns_on_is_causal():
    q, k, v = _qkv(4)
    want = jattn.neighborhood_attention(q, k, v, 5, causal=True, impl="xla")
    assert_close(want, jattn.reference_attention(q, k, v, mask=jnp.asarray(
        jattn.neighborhood_mask((T,), 5, causal=True))))
    with pytest.warns(DeprecationWarning, match="is_causal is deprecated, use causal="):
        old = jattn.neighborhood_attention(q, k, v, 5, is_causal=True, impl="xla")
    assert_close(old, want)
    with pytest.raises(TypeError, match="pass only causal"):
        jattn.neighborhood_attention(q, k, v, 5, causal=True, is_causal=False)


def test_fna_and_gna_take_causal():
    from jattn.methods.sparse.fna import na_attention
    from jattn.methods.sparse.gna import gna_attention_reference
    q, k, v = _qkv(5)
    want = jattn.neighborhood_attention(q, k, v, 5, causal=True, impl="reference")
    assert_close(na_attention(q, k, v, 5, causal=True, impl="xla"), want)
    assert_close(gna_attention_reference(q, k, v, 5, causal=True), want)
    with pytest.warns(DeprecationWarning, match="is_causal"):
        assert_close(na_attention(q, k, v, 5, is_causal=True, impl="xla"), want)


# ---------------------------------------------------------------------------------- jit and static arguments

def _bm():
    return jattn.BlockMask.from_mask_fn(jattn.masks.sliding_window_mask(8), 1, 1, T, T, 16, 16)


STATIC_CASES = {
    "attention": (lambda q, k, v, **kw: jattn.attention(q, k, v, **kw), "causal"),
    "block_sparse_attention": (lambda q, k, v, **kw: jattn.block_sparse_attention(q, k, v, _bm(), **kw), "causal"),
    "linear_attention": (lambda q, k, v, **kw: jattn.linear_attention(q, k, v, **kw), "causal"),
    "neighborhood_attention": (lambda q, k, v, **kw: jattn.neighborhood_attention(q, k, v, 5, **kw), "causal"),
}


@pytest.mark.parametrize("name", sorted(STATIC_CASES))
def test_jit_of_a_public_op_says_which_arguments_must_be_static(name):
    call, flag = STATIC_CASES[name]
    q, k, v = _qkv(6)
    with pytest.raises(TypeError, match=rf"jattn\.{name}: causal must be static.*functools\.partial\(jattn\.{name}, "
                                        rf"causal=\.\.\.\).*static_argnames=\('causal',\)"):
        jax.jit(call)(q, k, v, causal=True)
    # both suggested forms work and agree with the eager call
    eager = call(q, k, v, causal=True)
    assert_close(jax.jit(functools.partial(call, causal=True))(q, k, v), eager)
    assert_close(jax.jit(call, static_argnames=("causal",))(q, k, v, causal=True), eager)


def test_jit_of_jattn_attention_itself_names_every_traced_static_argument():
    q, k, v = _qkv(7)
    with pytest.raises(TypeError, match=r"causal, window must be static.*The arguments causal, window, scale"):
        jax.jit(jattn.attention)(q, k, v, causal=True, window=(3, 0))
    out = jax.jit(jattn.attention, static_argnames=("causal", "window"))(q, k, v, causal=True, window=(3, 0))
    assert_close(out, jattn.attention(q, k, v, causal=True, window=(3, 0)))
