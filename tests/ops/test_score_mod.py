"""``score_mod`` on every path: each ready-made mod equals the reference *without* a mod, given the
equivalent dense bias / mask / scaled q (an oracle that shares no score-mod code), forward and gradients,
including the gradients of the arrays a mod closes over.

Mutations each test catches (checked by hand on this file's first version):
* the mod applied before the bias, or before the softcap (``test_mod_runs_after_softcap_and_bias``);
* ``h`` passed as the kv head instead of the query head (GQA groupings in every equivalence test);
* ``q_idx`` and ``kv_idx`` swapped (ALiBi's asymmetric bias in ``test_mod_equals_dense_equivalent``);
* the mod's derivative dropped in a backward (the q/k gradients under ``head_temperature``);
* a mod array's gradient kept from one tile only, not summed over tiles (``test_gradient_reaches_closed_over_arrays``:
  several q and kv tiles);
* ``-inf`` from a mod turning a row NaN, or counted in the denominator (``test_minus_inf_masks_like_a_mask``).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn import score_mods
from jattn.core.block_mask import BlockMask
from tests.conftest import assert_close, random_qkv

B, T, S, D = 2, 37, 45, 16
PATHS = ["xla", "pallas"]


def _grad_all(fn, *args):
    """Output and the gradients of a fixed nonlinear loss w.r.t. every argument."""
    loss = lambda *a: jnp.sum(jnp.sin(fn(*a).astype(jnp.float32)))  # noqa: E731
    return fn(*args), jax.grad(loss, argnums=tuple(range(len(args))))(*args)


def _assert_same(got, want, what):
    out, grads = got
    want_out, want_grads = want
    assert_close(out, want_out, what=f"{what} out")
    for i, (g, w) in enumerate(zip(grads, want_grads)):
        assert_close(g, w, factor=2.0, what=f"{what} grad {i}")


def _positions(T, S):
    return jnp.arange(T)[:, None], jnp.arange(S)[None, :]


def _alibi_case(H):
    slopes = jattn.core.decay.alibi_slopes(H)
    qi, kv = _positions(T, S)
    return (lambda: score_mods.alibi(H)), (lambda: (slopes[:, None, None] * (kv - qi))[None])


def _relative_case(H, seed=7):
    table = jax.random.normal(jax.random.PRNGKey(seed), (H, 9))
    qi, kv = _positions(T, S)
    rel = jnp.clip(kv - qi, -4, 4) + 4
    return table, (lambda t: score_mods.relative_position_bias(t)), (lambda t: t[:, rel][None])


@pytest.mark.parametrize("impl", PATHS)
def test_mod_equals_dense_equivalent(impl):
    """ALiBi (asymmetric: catches swapped indices; per-head slopes under GQA 2:1: catches the kv head passed
    as ``h``) and a relative-position table (gradient to the table) equal the reference with the same terms
    as a dense bias."""
    H, Hkv = 4, 2
    q, k, v = random_qkv(0, B, T, S, H, Hkv, D)
    table, rel_mod, rel_bias = _relative_case(H)
    alibi_mod, alibi_bias = _alibi_case(H)

    def with_mod(table, q, k, v):
        mod = score_mods.compose(alibi_mod(), rel_mod(table))
        return jattn.attention(q, k, v, causal=True, score_mod=mod, impl=impl, block_q=16, block_k=16)

    def with_bias(table, q, k, v):
        return jattn.attention(q, k, v, causal=True, bias=alibi_bias() + rel_bias(table), impl="reference")
    _assert_same(_grad_all(with_mod, table, q, k, v), _grad_all(with_bias, table, q, k, v), impl)


@pytest.mark.parametrize("impl", PATHS)
def test_head_temperature_equals_scaled_queries(impl):
    """``score / t[h]`` is attention with q[..., h, :] / t[h]: q/k gradients need the mod's derivative."""
    H, Hkv = 4, 2
    q, k, v = random_qkv(1, B, T, S, H, Hkv, D)
    temperature = jnp.asarray([0.5, 1.0, 2.0, 1.5])

    def with_mod(t, q, k, v):
        return jattn.attention(q, k, v, causal=True, score_mod=score_mods.head_temperature(t), impl=impl,
                               block_q=16, block_k=16)

    def scaled(t, q, k, v):
        return jattn.attention(q / t[None, None, :, None], k, v, causal=True, impl="reference")
    _assert_same(_grad_all(with_mod, temperature, q, k, v), _grad_all(scaled, temperature, q, k, v), impl)


@pytest.mark.parametrize("impl", PATHS)
def test_mod_runs_after_softcap_and_bias(impl):
    """A nonlinear mod (a second softcap) over a biased, softcapped score: the order is softcap, bias, mod."""
    H, Hkv = 4, 2
    q, k, v = random_qkv(2, B, T, S, H, Hkv, D)
    q = q * 3.0
    bias = jax.random.normal(jax.random.PRNGKey(3), (1, H, T, S)) * 2.0

    got = jattn.attention(q, k, v, bias=bias, softcap=4.0, score_mod=score_mods.softcap(1.5), impl=impl,
                          block_q=16, block_k=16)
    s = jnp.einsum("bthd,bshd->bhts", q, jnp.repeat(k, H // Hkv, axis=2)) * D ** -0.5
    s = 1.5 * jnp.tanh((4.0 * jnp.tanh(s / 4.0) + bias) / 1.5)
    want = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, axis=-1), jnp.repeat(v, H // Hkv, axis=2))
    assert_close(got, want)


@pytest.mark.parametrize("impl", PATHS + ["reference"])
def test_minus_inf_masks_like_a_mask(impl):
    """``from_mask`` gives -inf where the mask is False: equal to ``mask=``, including rows the mod masks
    entirely (output 0, finite gradients)."""
    H, Hkv = 4, 2
    q, k, v = random_qkv(4, B, T, S, H, Hkv, D)
    prefix = jattn.masks.prefix_lm_mask(5)
    empty_rows = lambda b, h, qi, kv: prefix(b, h, qi, kv) & ((qi % 7 != 3) | (h == 0))  # noqa: E731
    dense = jattn.materialize(empty_rows, B, H, T, S)

    def with_mod(q, k, v):
        return jattn.attention(q, k, v, score_mod=score_mods.from_mask(empty_rows), impl=impl, block_q=16, block_k=16)

    def with_mask(q, k, v):
        return jattn.attention(q, k, v, mask=dense, impl="reference")
    got = _grad_all(with_mod, q, k, v)
    _assert_same(got, _grad_all(with_mask, q, k, v), impl)
    assert not np.any(np.asarray(got[0])[:, 3, 1:])                      # rows with nothing visible are 0
    assert all(np.isfinite(np.asarray(g)).all() for g in got[1])


def test_gradient_reaches_closed_over_arrays_under_jit():
    """A mod closing over traced arrays inside ``jax.jit``: the gradient w.r.t. them, summed over 3x3 tiles
    of the xla path, equals the dense-bias oracle's."""
    H, Hkv = 4, 4
    q, k, v = random_qkv(5, B, T, S, H, Hkv, D)
    table, rel_mod, rel_bias = _relative_case(H, seed=8)

    @jax.jit
    def grads(table):
        return jax.grad(lambda t: jnp.sum(jnp.sin(jattn.attention(q, k, v, score_mod=rel_mod(t), impl="xla",
                                                                    block_q=16, block_k=16))))(table)
    want = jax.grad(lambda t: jnp.sum(jnp.sin(jattn.attention(q, k, v, bias=rel_bias(t), impl="reference"))))(table)
    assert_close(grads(table), want, factor=2.0)


def test_block_sparse_mod_equals_dense_equivalent():
    """On the listed tiles only: block-sparse attention with ALiBi + a relative table equals the reference
    with the BlockMask's dense mask and the dense bias (forward and gradients, the table's included)."""
    H, Hkv = 4, 2
    Ts = 43
    q, k, v = random_qkv(6, 1, Ts, Ts, H, Hkv, D)
    tiles = jax.random.bernoulli(jax.random.PRNGKey(9), 0.6, (1, H, 3, 3))
    bm = BlockMask.from_dense_block_map(tiles, block_q=16, block_k=16, seq_q=Ts, seq_k=Ts)
    table = jax.random.normal(jax.random.PRNGKey(10), (H, 9))
    qi, kv = jnp.arange(Ts)[:, None], jnp.arange(Ts)[None, :]
    slopes = jattn.core.decay.alibi_slopes(H)

    def with_mod(table, q, k, v):
        mod = score_mods.compose(score_mods.alibi(H), score_mods.relative_position_bias(table))
        return jattn.block_sparse_attention(q, k, v, bm, causal=True, score_mod=mod, impl="xla")

    def with_bias(table, q, k, v):
        bias = slopes[:, None, None] * (kv - qi) + table[:, jnp.clip(kv - qi, -4, 4) + 4]
        return jattn.attention(q, k, v, causal=True, mask=bm.to_dense_mask(heads=H), bias=bias[None],
                               impl="reference")
    _assert_same(_grad_all(with_mod, table, q, k, v), _grad_all(with_bias, table, q, k, v), "block-sparse")


def test_block_sparse_pallas_kernel_fuses_a_mod():
    """The block-sparse Pallas kernel (interpreted) with ALiBi and a mod that masks one diagonal with -inf
    equals the reference, forward and q/k/v gradients (catches the mod's derivative dropped in dq or dk/dv)."""
    H, Hkv, Ts = 4, 2, 43
    q, k, v = random_qkv(12, 1, Ts, Ts, H, Hkv, D)
    tiles = jax.random.bernoulli(jax.random.PRNGKey(13), 0.6, (1, H, 3, 3))
    bm = BlockMask.from_dense_block_map(tiles, block_q=16, block_k=16, seq_q=Ts, seq_k=Ts)
    mod = score_mods.compose(score_mods.alibi(H), lambda s, b, h, qi, kv: jnp.where(kv == qi - 2, -jnp.inf, s))
    run = lambda impl: (lambda q, k, v: jattn.block_sparse_attention(q, k, v, bm, causal=True, score_mod=mod,  # noqa: E731
                                                                     impl=impl))
    _assert_same(_grad_all(run("pallas"), q, k, v), _grad_all(run("reference"), q, k, v), "block-sparse pallas")


def test_block_sparse_pallas_refuses_the_gradient_of_mod_arrays():
    """The kernel does not compute the gradient of a mod's float arrays: taking it raises (never a silent zero);
    ``auto`` runs the xla path for such a mod, which gives it."""
    H = 2
    q, k, v = random_qkv(7, 1, 32, 32, H, H, D)
    bm = BlockMask.from_mask_fn(jattn.masks.causal_mask(), 1, 1, 32, 32, 16, 16)
    temperature = jnp.asarray([0.7, 1.3])
    loss = lambda t, impl: jnp.sum(jattn.block_sparse_attention(  # noqa: E731
        q, k, v, bm, score_mod=score_mods.head_temperature(t), impl=impl))
    with pytest.raises(ValueError, match="not available from the block-sparse Pallas kernel"):
        jax.grad(loss)(temperature, "pallas")
    assert_close(jax.grad(loss)(temperature, "auto"), jax.grad(loss)(temperature, "reference"), factor=2.0)


@pytest.mark.parametrize("impl", PATHS)
def test_nan_in_gives_nan_out(impl):
    H = 2
    q, k, v = random_qkv(8, 1, 32, 32, H, H, D)
    q = q.at[0, 5, 1, 0].set(jnp.nan)
    out = np.asarray(jattn.attention(q, k, v, causal=True, score_mod=score_mods.alibi(H), impl=impl,
                                     block_q=16, block_k=16))
    assert np.isnan(out[0, 5, 1]).all()
    assert np.isfinite(np.delete(out.reshape(32, H, D), 5, axis=0)).all()


BAD_MODS = [
    ("not a function", 3.0, "must be a function"),
    ("four arguments", lambda s, b, h, q: s, "five positional arguments"),
    ("returns a vector", lambda s, b, h, q, kv: jnp.stack([s, s]), "one float score"),
    ("returns an int", lambda s, b, h, q, kv: q - kv, "one float score"),
    ("branches in Python", lambda s, b, h, q, kv: s if q > kv else -s, "elementwise"),
]


@pytest.mark.parametrize("name,mod,words", BAD_MODS, ids=[m[0] for m in BAD_MODS])
@pytest.mark.parametrize("op", ["attention", "block_sparse"])
def test_bad_score_mod_is_rejected_at_trace_time(name, mod, words, op):
    q, k, v = random_qkv(9, 1, 32, 32, 2, 2, D)
    with pytest.raises(TypeError, match="score_mod") as info:
        if op == "attention":
            jattn.attention(q, k, v, score_mod=mod, impl="xla")
        else:
            bm = BlockMask.from_mask_fn(jattn.masks.causal_mask(), 1, 1, 32, 32, 16, 16)
            jattn.block_sparse_attention(q, k, v, bm, score_mod=mod, impl="xla")
    assert words in str(info.value)


def test_constructors_validate():
    with pytest.raises(ValueError, match="table"):
        score_mods.relative_position_bias(jnp.zeros((2, 8)))
    with pytest.raises((TypeError, ValueError), match="cap"):
        score_mods.softcap(-1.0)
    with pytest.raises(TypeError, match="score_mods\\[1\\]"):
        score_mods.compose(score_mods.alibi(2), "alibi")


@pytest.mark.optimized
def test_xla_mod_adds_no_quadratic_temporary():
    """Compiled temp memory of the xla path at T=S=2048: ALiBi via score_mod stays within a few tiles of
    plain causal attention, far below one [H, T, S] float32 array (what a dense bias would cost)."""
    H, T_ = 4, 2048
    q = k = v = jax.ShapeDtypeStruct((1, T_, H, 32), jnp.float32)

    def temp_bytes(mod):
        fn = jax.jit(lambda q, k, v: jattn.attention(q, k, v, causal=True, score_mod=mod, impl="xla"))
        return fn.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
    plain, alibi = temp_bytes(None), temp_bytes(score_mods.alibi(H))
    assert alibi - plain < H * T_ * T_ * 4 / 16, (plain, alibi)


# ---------------------------------------------------------------------------------------- prob_mod


def _soft_pag(u, heads):
    """P07's SoftPAG on a set of heads: ``(1 - u) P + u I`` (identity over the square map)."""
    def prob_mod(p):
        eye = jnp.eye(p.shape[-2], p.shape[-1], dtype=p.dtype)
        chosen = jnp.isin(jnp.arange(p.shape[1]), jnp.asarray(heads))[None, :, None, None]
        return jnp.where(chosen, (1 - u) * p + u * eye, p)
    return prob_mod


def test_prob_mod_rewrites_the_normalised_rows():
    """Interpolating selected heads toward the identity: u = 1 makes those heads output v itself (P07's
    PAG limit), other heads are untouched, and the gradient through the mod matches the by-hand form
    (catches a mod applied to logits instead of probabilities, or to every head)."""
    H = 4
    q, k, v = random_qkv(10, B, T, T, H, H, D)
    full = jattn.attention(q, k, v, causal=True, prob_mod=_soft_pag(1.0, [1, 3]))
    plain = jattn.attention(q, k, v, causal=True, impl="reference")
    assert_close(full[:, :, [1, 3]], v[:, :, [1, 3]])
    assert_close(full[:, :, [0, 2]], plain[:, :, [0, 2]])

    def by_hand(q, k, v):
        s = jnp.einsum("bthd,bshd->bhts", q, k) * D ** -0.5
        p = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -jnp.inf), axis=-1)
        p = _soft_pag(0.3, [2])(p)
        return jnp.einsum("bhts,bshd->bthd", p, v)
    got = _grad_all(lambda q, k, v: jattn.attention(q, k, v, causal=True, prob_mod=_soft_pag(0.3, [2])), q, k, v)
    _assert_same(got, _grad_all(by_hand, q, k, v), "prob_mod")


def test_prob_mod_is_never_silently_ignored():
    q, k, v = random_qkv(11, 1, 16, 16, 2, 2, D)
    for impl in ("xla", "pallas"):
        with pytest.raises(ValueError, match="prob_mod needs the dense path"):
            jattn.attention(q, k, v, prob_mod=lambda p: p, impl=impl)
    with pytest.raises(TypeError, match="prob_mod must return float probabilities"):
        jattn.attention(q, k, v, prob_mod=lambda p: p[..., :3])
    with pytest.raises(TypeError, match="prob_mod must be a function"):
        jattn.attention(q, k, v, prob_mod="identity")
