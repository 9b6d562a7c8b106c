"""P47 FDConv: Fourier-disjoint weight groups, band modulation and kernel modulation -- defining properties."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.methods.vision.fdconv import (FDConv, assemble_kernel, band_modulation, dft_parameter_scale,
                                         dft_to_weight, eca_kernel_size, fbm_masks, frequency_bands,
                                         frequency_groups, group_weights, per_sample_conv, weight_to_dft,
                                         weight_to_matrix)


def _randn(seed, shape, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=jax.lax.Precision.HIGHEST)


def _neutral(m):
    """Zero every modulation head: all gates 2 sigmoid(0) = 1, beta = 1 / kernel_num."""
    for name in ("channel_fc", "filter_fc", "spatial_fc", "kernel_fc", "local_kernel", "fbm_kernel"):
        if not hasattr(m, name):
            continue
        p = getattr(m, name)
        p[...] = jnp.zeros_like(p[...])
    return m


def test_frequency_groups_partition_the_spectrum_by_radius():
    """Every rfft2 coefficient is in exactly one of kernel_num groups, the groups are contiguous in radius
    (max radius of group n <= min radius of group n + 1) and of near-equal size. Catches overlapping groups,
    unsorted (index-order) groups, rows/cols using the wrong fftfreq."""
    rows, cols, kn = 12, 10, 4
    g = frequency_groups(rows, cols, kn)
    assert g.shape == (rows, cols // 2 + 1)
    assert set(np.unique(g)) == set(range(kn))
    sizes = np.bincount(g.ravel())
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == g.size
    r = np.sqrt(np.fft.fftfreq(rows)[:, None] ** 2 + np.fft.rfftfreq(cols)[None, :] ** 2)
    for n in range(kn - 1):
        assert r[g == n].max() <= r[g == n + 1].min() + 1e-12
    assert g[0, 0] == 0 and g[rows // 2, -1] == kn - 1                     # DC first, the corner (Nyquist) last


def test_weight_matrix_layout_and_dft_round_trip():
    """M[(o, ki), (i, kj)] = W[ki, kj, i, o] (the code's permute(0, 2, 1, 3)), and irfft2(rfft2(M)) = W, also for
    odd Cin k (the output size is passed). Catches a transposed layout and an irfft2 without its size."""
    for cin, cout in ((4, 6), (3, 5)):
        w = _randn(cin, (3, 3, cin, cout))
        m = np.asarray(weight_to_matrix(w))
        o, ki, i, kj = 2, 1, cin - 1, 2
        assert m[o * 3 + ki, i * 3 + kj] == np.asarray(w)[ki, kj, i, o]
        np.testing.assert_allclose(np.asarray(dft_to_weight(weight_to_dft(w), 3, cin, cout)), np.asarray(w),
                                   atol=1e-5)


def test_group_weights_sum_to_the_full_weight_and_have_disjoint_spectra():
    """sum_n irfft2(D restricted to group n) = W; each W_n's spectrum lives on its group, except where a group
    boundary splits a radius tie: irfft2 keeps only the Hermitian part of the zero / Nyquist columns, so a
    coefficient whose conjugate partner (same radius) sits in the next group leaks half onto it -- as in the
    official code. Catches groups that drop or double-count coefficients or that are not radius bands."""
    cin, cout, k, kn = 4, 6, 3, 4
    w = _randn(1, (k, k, cin, cout))
    d = weight_to_dft(w)
    groups = frequency_groups(cout * k, cin * k, kn)
    gw = group_weights(d, groups, k, cin, cout)
    assert gw.shape == (kn, k, k, cin, cout)
    np.testing.assert_allclose(np.asarray(gw.sum(0)), np.asarray(w), atol=1e-5)
    r = np.sqrt(np.fft.fftfreq(cout * k)[:, None] ** 2 + np.fft.rfftfreq(cin * k)[None, :] ** 2)
    for n in range(kn):
        spec = np.abs(np.asarray(weight_to_dft(gw[n])))
        assert spec[groups == n].max() > 1e-2
        leak = (groups != n) & (spec > 1e-4)
        lo, hi = r[groups == n].min(), r[groups == n].max()
        assert ((r[leak] >= lo - 1e-12) & (r[leak] <= hi + 1e-12)).all()       # only boundary radius ties
        assert leak.sum() <= 0.1 * groups.size


def test_assemble_kernel_is_the_beta_weighted_sum_of_group_weights():
    """irfft2(sum_n beta_n D_n) = sum_n beta_n W_n (per sample); beta = 1 gives W. Catches beta applied to the
    wrong group or broadcast over the wrong axis."""
    cin, cout, k, kn = 3, 4, 3, 4
    w = _randn(2, (k, k, cin, cout))
    d = weight_to_dft(w)
    groups = frequency_groups(cout * k, cin * k, kn)
    beta = _randn(3, (2, kn))
    ker = assemble_kernel(d, groups, beta, k, cin, cout)
    ref = jnp.einsum("bn,nijco->bijco", beta, group_weights(d, groups, k, cin, cout))
    np.testing.assert_allclose(np.asarray(ker), np.asarray(ref), atol=1e-5)
    np.testing.assert_allclose(np.asarray(assemble_kernel(d, groups, jnp.ones((1, kn)), k, cin, cout))[0],
                               np.asarray(w), atol=1e-5)


def test_fbm_bands_sum_to_input_and_split_frequencies():
    """The bands telescope back to x; masks are nested; a constant map lies wholly in the lowest band and the
    Nyquist checkerboard wholly in the first high band. Catches a wrong cutoff (0.5 / r), non-nested bands,
    high = x - low computed from the original x each time (bands would not sum to x)."""
    x = _randn(4, (2, 16, 12, 3))
    bands = frequency_bands(x, (2, 4, 8))
    assert len(bands) == 4
    np.testing.assert_allclose(np.asarray(sum(bands)), np.asarray(x), atol=1e-5)
    m = fbm_masks(16, 12, (2, 4, 8))
    assert (m[1] <= m[0]).all() and (m[2] <= m[1]).all() and m[2].sum() > 0 and (~m[0]).sum() > 0
    const = jnp.full((1, 8, 8, 1), 0.7)
    b = frequency_bands(const)
    np.testing.assert_allclose(np.asarray(b[-1]), 0.7, atol=1e-6)
    checker = jnp.asarray((-1.0) ** np.add.outer(np.arange(8), np.arange(8)), jnp.float32)[None, :, :, None]
    b = frequency_bands(checker)
    np.testing.assert_allclose(np.asarray(b[0]), np.asarray(checker), atol=1e-5)
    for j in (1, 2, 3):
        assert np.abs(np.asarray(b[j])).max() < 1e-5


def test_band_modulation_gates():
    """Gates 1 give x back; gates 0 leave only the lowest band. Catches gating the low band too."""
    x = _randn(5, (1, 8, 8, 2))
    bands = frequency_bands(x)
    np.testing.assert_allclose(np.asarray(band_modulation(bands, jnp.ones((3, 1, 8, 8, 1)))), np.asarray(x),
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(band_modulation(bands, jnp.zeros((3, 1, 8, 8, 1)))),
                               np.asarray(bands[-1]), atol=1e-6)


def test_uniform_gates_equal_static_conv_with_the_stored_weight():
    """All heads zero: gates 2 sigmoid(0) = 1, beta = 1/kernel_num, FBM gates 1 -> exactly the static conv with
    W = irfft2(D) (plus bias). Catches a missing alpha = s * kernel_num, a missing att_multi = 2, an FBM that
    drops a band."""
    m = _neutral(FDConv(6, 8, 3, min_channels=0, rngs=nnx.Rngs(0)))
    m.bias[...] = _randn(6, (8,))
    x = _randn(7, (2, 8, 8, 6))
    np.testing.assert_allclose(np.asarray(m(x)), np.asarray(_conv(x, m.static_weight()) + m.bias[...]),
                               rtol=1e-4, atol=1e-4)
    plain = FDConv(6, 8, 3, min_channels=0, modulation=False, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(np.asarray(plain(x)), np.asarray(_conv(x, plain.static_weight())), atol=1e-5)
    small = FDConv(6, 8, 3, rngs=nnx.Rngs(0))                 # the code's rule: min(Cin, Cout) <= 16 -> plain conv
    assert not small.modulation and not hasattr(small, "fc")


def test_channel_filter_spatial_gates_act_on_their_axes():
    """Filter gate scales output channel o; channel gate scales input channel i; spatial gate scales tap (ki, kj).
    Each is checked alone against the static conv. Catches gates broadcast over the wrong kernel axis."""
    x = _randn(8, (2, 6, 6, 5))
    m = _neutral(FDConv(5, 7, 3, min_channels=0, use_fbm=False, rngs=nnx.Rngs(1)))
    m.eval()
    w = m.static_weight()
    m.filter_fc[...] = _randn(9, m.filter_fc.shape)
    f = m.attentions(x)["filter"]
    np.testing.assert_allclose(np.asarray(m(x)), np.asarray(_conv(x, w) * f[:, None, None, :] + m.bias[...]),
                               rtol=1e-4, atol=1e-4)
    m.filter_fc[...] = jnp.zeros_like(m.filter_fc[...])
    m.channel_fc[...] = _randn(10, m.channel_fc.shape)
    c = m.attentions(x)["channel"]
    np.testing.assert_allclose(np.asarray(m(x)), np.asarray(_conv(x * c[:, None, None, :], w)), rtol=1e-4, atol=1e-4)
    m.channel_fc[...] = jnp.zeros_like(m.channel_fc[...])
    m.spatial_fc[...] = _randn(11, m.spatial_fc.shape)
    sp = m.attentions(x)["spatial"]
    ref = jnp.stack([_conv(x[b:b + 1], w * sp[b][:, :, None, None])[0] for b in range(2)])
    np.testing.assert_allclose(np.asarray(m(x)), np.asarray(ref), rtol=1e-4, atol=1e-4)
    assert float(jnp.abs(sp - 1).max()) > 1e-2


def test_gate_ranges_and_kernel_weights():
    """Gates 2 sigmoid in (0, 2); beta = 2 sigmoid / kernel_num in (0, 2 / kernel_num), 1 / kernel_num at
    init; the local gate has the kernel's [Cout, Cin, k, k] shape. Catches softmax kernel weights or a missing
    1 / kernel_num."""
    m = FDConv(20, 24, 3, rngs=nnx.Rngs(2))
    x = _randn(12, (3, 6, 6, 20))
    a = m.attentions(x)
    np.testing.assert_allclose(np.asarray(a["beta"]), 0.25, atol=1e-4)
    m.kernel_fc[...] = _randn(13, m.kernel_fc.shape, 0.3)
    a = m.attentions(x)
    assert float(a["beta"].min()) >= 0 and float(a["beta"].max()) <= 0.5 and float(a["beta"].std()) > 1e-3
    for key in ("channel", "filter", "spatial", "local"):
        assert float(a[key].min()) > 0 and float(a[key].max()) < 2
    assert a["local"].shape == (3, 24, 20, 3, 3)
    assert eca_kernel_size(16) == 3 and eca_kernel_size(64) == 5


def test_per_sample_conv_matches_lax_conv():
    """Each sample convolved with its own kernel. Catches kernels mixed across the batch or a flipped tap order."""
    x, w = _randn(14, (3, 5, 6, 4)), _randn(15, (3, 3, 3, 4, 2))
    ref = jnp.stack([_conv(x[b:b + 1], w[b])[0] for b in range(3)])
    np.testing.assert_allclose(np.asarray(per_sample_conv(x, w)), np.asarray(ref), atol=1e-5)


def test_gradients_reach_the_dft_weight_and_every_head():
    """Training updates the stored spectrum and all heads. Catches a constant (non-parameter) DFT weight."""
    m = FDConv(6, 8, 3, min_channels=0, rngs=nnx.Rngs(3))
    m.eval()                                                    # BN running statistics: no state update in grad
    x = _randn(16, (2, 8, 8, 6))
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(x) ** 2)))(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert float(jnp.abs(g).max()) > 0, path


@pytest.mark.parametrize("cin,cout", [(16, 16), (16, 32), (5, 7)])
def test_unit_dft_scale_gives_adam_sized_steps_in_weight_space(cin, cout):
    """Adam moves every stored coefficient by about lr. With ``dft_scale="unit"`` that moves each spatial weight by
    about lr too (sd within 10 %); with the code's scale by s sqrt(2 / N) of it (4x smaller at 16 -> 16). Catches
    the unit scale left at the code's value, a missing square root, or the scale not used by the weight."""
    k, step = 3, 1e-3
    signs = np.sign(np.random.default_rng(cin + cout).standard_normal((cout * k, cin * k // 2 + 1, 2)))
    for scale in ("unit", "code"):
        m = FDConv(cin, cout, k, min_channels=0, dft_scale=scale, rngs=nnx.Rngs(0))
        before = m.static_weight()
        m.dft[...] = m.dft[...] + step * jnp.asarray(signs, jnp.float32)
        moved = float(jnp.std(m.static_weight() - before)) / step
        expected = 1.0 if scale == "unit" else max(min(cin, cout) // 2, 1) * np.sqrt(2 / (cout * k * cin * k))
        assert abs(moved / expected - 1) < 0.1, (scale, moved, expected)
    assert dft_parameter_scale(16, 16, 3, "code") == 8
    assert abs(dft_parameter_scale(16, 16, 3, "unit") - 48 / np.sqrt(2)) < 1e-9


def test_dft_scale_and_filter_init_keep_the_layer_and_start_gates_at_one():
    """The stored scale changes the parametrisation, not the layer: the same draw gives the same weight and
    output on both scales. ``filter_gate_init="one"`` starts every gate at 1 (beta at 1 / kernel_num), the code's
    init leaves the filter gates spread. Catches the scale leaking into the output (alpha = s * kernel_num off)
    or the option not reaching the filter head."""
    x = _randn(20, (2, 8, 8, 16))
    code = FDConv(16, 16, 3, min_channels=0, rngs=nnx.Rngs(4))
    unit = FDConv(16, 16, 3, min_channels=0, dft_scale="unit", rngs=nnx.Rngs(4))
    np.testing.assert_allclose(np.asarray(unit.static_weight()), np.asarray(code.static_weight()), atol=1e-6)
    np.testing.assert_allclose(np.asarray(unit(x)), np.asarray(code(x)), rtol=1e-4, atol=1e-5)
    spread = code.attentions(x)["filter"]
    assert float(jnp.abs(spread - 1).max()) > 0.1
    ones = FDConv(16, 16, 3, min_channels=0, filter_gate_init="one", rngs=nnx.Rngs(4)).attentions(x)
    for key in ("channel", "filter", "spatial", "local"):
        np.testing.assert_allclose(np.asarray(ones[key]), 1.0, atol=1e-4, err_msg=key)
    np.testing.assert_allclose(np.asarray(ones["beta"]), 0.25, atol=1e-4)


def test_bad_arguments_raise_naming_them():
    with pytest.raises(ValueError, match="dft_scale"):
        FDConv(4, 4, 3, dft_scale="adam", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="filter_gate_init"):
        FDConv(4, 4, 3, filter_gate_init="he", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="kernel_size"):
        FDConv(4, 4, 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="kernel_num"):
        FDConv(4, 4, 3, kernel_num=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="x must be"):
        FDConv(4, 4, 3, rngs=nnx.Rngs(0))(jnp.ones((1, 4, 4, 3)))
    with pytest.raises(ValueError, match="kernel_num"):
        frequency_groups(2, 2, 10)
    with pytest.raises(ValueError, match="beta"):
        assemble_kernel(jnp.ones((3, 2), jnp.complex64), np.zeros((3, 2), int), jnp.ones((1, 2)), 1, 3, 3)
