"""P47 FDConv: Frequency Dynamic Convolution, as pure functions and an NNX conv layer on ``[B, H, W, C]``.

Read from the official code ``Linwei-Chen/FDConv`` (``FDConv_detection/mmdet_custom/FDConv.py``: ``FDConv``,
``KernelSpatialModulation_Global/Local``, ``FrequencyBandModulation``, ``get_fft2freq``, ``convert2dftweight``).

**Fourier-disjoint weight groups.** The static weight ``W`` ``[Cout, Cin, k, k]`` is laid out as the matrix
``M[(o, ki), (i, kj)]`` ``[Cout k, Cin k]`` and stored as its ``rfft2`` coefficients ``D`` ``[Cout k, Cin k // 2 + 1]``
(parameter ``dft`` = ``D / s`` as real/imag pairs, ``s = max(min(Cin, Cout) // 2, 1)`` as the code, or
``sqrt(Cout k * Cin k / 2)`` with ``dft_scale="unit"``: :func:`dft_parameter_scale`). The coefficients are sorted
by frequency radius ``|(f_row, f_col)|`` (``fftfreq`` rows, ``rfftfreq`` columns; stable sort) and cut into
``kernel_num`` contiguous, disjoint groups (``frequency_groups``). Group ``n``'s weight ``W_n`` is the ``irfft2`` of
``D`` restricted to group ``n``; by linearity ``sum_n W_n = W``.

**Kernel spatial modulation, global (KSM-G)** from ``p = GAP(x)`` ``[B, Cin]``:
``z = StarReLU(BN(p W_fc))`` (``W_fc [Cin, A]`` no bias, ``A = max(int(Cin * reduction), 16)``, ``StarReLU(u) =
s relu(u)^2 + b`` with learnable scalars ``s = 1, b = 0``), then heads (with bias) ``channel = 2 sigmoid(z W_c / T)``
``[B, Cin]``, ``filter = 2 sigmoid(z W_f / T)`` ``[B, Cout]``, ``spatial = 2 sigmoid(z W_sp / T)`` ``[B, k, k]`` and
kernel weights ``beta = 2 sigmoid(z W_k / T_k) / kernel_num`` ``[B, kernel_num]`` (``att_multi = 2``, ``T = T_k = 1``).
Init as the code: head weights ``N(0, 1e-6)`` and zero biases (gates start at 1, ``beta`` at ``1/kernel_num``) --
except the filter head, which keeps He (fan-out) init because the code's init loop tests ``func_filter`` (a
method) instead of ``filter_fc``; ``W_fc`` He (fan-out).

**KSM, local (KSM-L):** ECA-style: ``u = LN(p)`` ``[B, Cin]`` (affine LayerNorm over channels), a 1-D conv over the
channel axis with ``1 -> Cout k k`` output channels (kernel ``round(log2(Cin) / 2 + 0.5) // 2 * 2 + 1``, zero
padding, no bias, init ``1e-6``), ``hr = 2 sigmoid(.)`` ``[B, Cout, Cin, k, k]``.

**Per-sample kernel:** ``W_b = irfft2(sum_n beta_bn * (s * kernel_num) * dft_n)`` (the code's ``alpha = s *
kernel_num``; uniform ``beta = 1/kernel_num`` returns ``D`` exactly), and the conv kernel is
``spatial * channel * filter * W_b * hr`` (broadcast over ``[Cout, Cin, k, k]``).

**Frequency band modulation (FBM, ``k = 3`` layers only, before the conv):** with ``X = rfft2(x)`` (ortho) and
nested low-pass masks ``m_r = max(|f_row|, |f_col|) < 0.5 / r + 1e-8`` for ``r`` in ``k_list = (2, 4, 8)``:
``low_0 = x``, ``low_j = irfft2(X m_rj)``, ``high_j = low_{j-1} - low_j``; ``x' = sum_j 2 sigmoid(conv3x3_j(x)) *
high_j + low_last`` (one ``Cin -> 1`` conv with bias per band, init ``N(0, 1e-6)`` / zero: the gates start at 1).
The bands telescope: ``sum_j high_j + low_last = x``.

Output: per-sample conv (stride 1, "same" padding) of ``x'`` with the per-sample kernel, plus the static bias.

Deliberate deviations: masks are computed at the feature map's own size (the code precomputes them at 64x64 and
nearest-resizes); groups need not be of equal size (``array_split``; the code requires divisibility); ``irfft2`` is
given the output size, so odd ``Cin k`` works; the code's switch-off rules (plain conv when ``min(Cin, Cout) <=
16``, ``k`` not in ``{1, 3}`` or stride > 1) are the argument ``min_channels`` (default 16 as the code; the vision
table passes 0 because its channels are 16 and 32) and stride 1 / odd ``k`` only. ``modulation=False`` is the static
conv with ``W = irfft2(D)`` (the "uniform gates" case, computed directly). Param ratio 1, no param reduction.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["frequency_groups", "weight_to_matrix", "matrix_to_weight", "weight_to_dft", "dft_to_weight",
           "group_weights", "assemble_kernel", "fbm_masks", "frequency_bands", "band_modulation", "star_relu",
           "per_sample_conv", "eca_kernel_size", "fdconv_apply", "dft_parameter_scale", "FDConv"]


def _check_pos_int(name, val):
    if not isinstance(val, (int, np.integer)) or isinstance(val, bool) or val <= 0:
        raise ValueError(f"{name} must be a positive int, got {val!r}")
    return int(val)


# ------------------------------------------------------------------------------------------ Fourier groups
def frequency_groups(rows: int, cols: int, kernel_num: int) -> np.ndarray:
    """Group id ``[rows, cols // 2 + 1]`` (int) of each rfft2 coefficient: coefficients sorted by radius
    ``|(fftfreq(rows), rfftfreq(cols))|`` (stable), cut into ``kernel_num`` contiguous disjoint groups."""
    rows, cols, kernel_num = (_check_pos_int(n, v) for n, v in (("rows", rows), ("cols", cols),
                                                                 ("kernel_num", kernel_num)))
    fr, fc = np.fft.fftfreq(rows), np.fft.rfftfreq(cols)
    dist = np.sqrt(fr[:, None] ** 2 + fc[None, :] ** 2)
    if kernel_num > dist.size:
        raise ValueError(f"kernel_num={kernel_num} must be at most the number of coefficients {dist.size}")
    order = np.argsort(dist.reshape(-1), kind="stable")
    gid = np.empty(dist.size, np.int32)
    for n, chunk in enumerate(np.array_split(order, kernel_num)):
        gid[chunk] = n
    return gid.reshape(dist.shape)


def weight_to_matrix(w):
    """Flax conv kernel ``[k, k, Cin, Cout]`` -> the code's matrix ``M[(o, ki), (i, kj)]`` ``[Cout k, Cin k]``."""
    if w.ndim != 4 or w.shape[0] != w.shape[1]:
        raise ValueError(f"w must be a square conv kernel [k, k, Cin, Cout], got shape {w.shape}")
    k, _, cin, cout = w.shape
    return jnp.transpose(w, (3, 0, 2, 1)).reshape(cout * k, cin * k)


def matrix_to_weight(m, k: int, cin: int, cout: int):
    """Inverse of ``weight_to_matrix``: ``[..., Cout k, Cin k]`` -> ``[..., k, k, Cin, Cout]``."""
    if m.shape[-2:] != (cout * k, cin * k):
        raise ValueError(f"m must end in [Cout*k, Cin*k] = [{cout * k}, {cin * k}], got shape {m.shape}")
    lead = m.shape[:-2]
    w = m.reshape(*lead, cout, k, cin, k)
    n = len(lead)
    return jnp.transpose(w, (*range(n), n + 1, n + 3, n + 2, n))


def weight_to_dft(w):
    """``rfft2`` of ``weight_to_matrix(w)``: complex ``[Cout k, Cin k // 2 + 1]`` (the code's convert2dftweight,
    before its ``1/s`` parameter scaling)."""
    return jnp.fft.rfft2(weight_to_matrix(w.astype(jnp.float32)))


def dft_to_weight(d, k: int, cin: int, cout: int):
    """``irfft2`` (output size given) of complex ``[..., Cout k, Cin k // 2 + 1]`` -> ``[..., k, k, Cin, Cout]``."""
    if d.shape[-2:] != (cout * k, cin * k // 2 + 1):
        raise ValueError(f"d must end in [Cout*k, Cin*k//2+1] = [{cout * k}, {cin * k // 2 + 1}], got {d.shape}")
    return matrix_to_weight(jnp.fft.irfft2(d, s=(cout * k, cin * k)), k, cin, cout)


def group_weights(d, groups, k: int, cin: int, cout: int):
    """Spatial weights of the disjoint groups: ``[kernel_num, k, k, Cin, Cout]``, ``W_n = irfft2(D * [group == n])``.
    ``sum_n W_n`` equals ``dft_to_weight(D)`` (linearity)."""
    groups = np.asarray(groups)
    if groups.shape != d.shape[-2:]:
        raise ValueError(f"groups must have the coefficient shape {d.shape[-2:]}, got {groups.shape}")
    masks = jnp.asarray(groups[None] == np.arange(groups.max() + 1)[:, None, None])
    return dft_to_weight(d[None] * masks, k, cin, cout)


def assemble_kernel(d, groups, beta, k: int, cin: int, cout: int):
    """Per-sample kernel ``irfft2(sum_n beta[b, n] * D * [group == n])``: ``beta [B, kernel_num]`` ->
    ``[B, k, k, Cin, Cout]``. ``beta = 1`` gives the static weight."""
    groups = np.asarray(groups)
    kn = int(groups.max()) + 1
    if beta.ndim != 2 or beta.shape[1] != kn:
        raise ValueError(f"beta must be [B, kernel_num={kn}], got shape {beta.shape}")
    scale = beta[:, jnp.asarray(groups)]                                 # [B, rows, cols] gather of group weights
    return dft_to_weight(d[None] * scale, k, cin, cout)


# ---------------------------------------------------------------------------------------- band modulation
def fbm_masks(h: int, w: int, k_list=(2, 4, 8)) -> np.ndarray:
    """Nested low-pass masks ``[len(k_list), h, w // 2 + 1]``: ``max(|fftfreq(h)|, |rfftfreq(w)|) < 0.5 / r``."""
    h, w = _check_pos_int("h", h), _check_pos_int("w", w)
    if not k_list or any(not isinstance(r, (int, float)) or r <= 0 for r in k_list):
        raise ValueError(f"k_list must be a non-empty sequence of positive numbers, got {k_list!r}")
    f = np.maximum(np.abs(np.fft.fftfreq(h))[:, None], np.abs(np.fft.rfftfreq(w))[None, :])
    return np.stack([f < 0.5 / r + 1e-8 for r in k_list])


def frequency_bands(x, k_list=(2, 4, 8)):
    """``[high_1, ..., high_n, low_n]`` of ``x`` ``[B, H, W, C]`` (ortho rfft2 over H, W); they sum to ``x``."""
    if x.ndim != 4:
        raise ValueError(f"x must be [B, H, W, C] (channels-last), got shape {x.shape}")
    _, h, w, _ = x.shape
    masks = jnp.asarray(fbm_masks(h, w, k_list))
    xf = x.astype(jnp.float32)
    spec = jnp.fft.rfft2(xf, axes=(1, 2), norm="ortho")
    bands, prev = [], xf
    for m in masks:
        low = jnp.fft.irfft2(spec * m[None, :, :, None], s=(h, w), axes=(1, 2), norm="ortho")
        bands.append(prev - low)
        prev = low
    return bands + [prev]


def band_modulation(bands, gates):
    """``sum_j gates[j] * bands[j] + bands[-1]``: ``gates`` ``[n, B, H, W, 1]`` for the ``n`` high bands."""
    if len(bands) != gates.shape[0] + 1:
        raise ValueError(f"gates must be [n_high={len(bands) - 1}, B, H, W, 1], got shape {gates.shape}")
    out = bands[-1]
    for j in range(len(bands) - 1):
        out = out + gates[j] * bands[j]
    return out


def star_relu(x, scale, bias):
    """``scale * relu(x) ** 2 + bias`` (MetaFormer's StarReLU)."""
    return scale * jax.nn.relu(x) ** 2 + bias


def eca_kernel_size(channels: int) -> int:
    """KSM-local kernel: ``round(log2(C) / 2 + 0.5) // 2 * 2 + 1`` (Python's round, as the code)."""
    return round(math.log2(_check_pos_int("channels", channels)) / 2 + 0.5) // 2 * 2 + 1


def _conv(x, w, padding):
    return jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=jax.lax.Precision.HIGHEST)


def per_sample_conv(x, kernels, padding="SAME"):
    """Conv of each ``x[b]`` ``[H, W, Cin]`` with its own ``kernels[b]`` ``[k, k, Cin, Cout]``, stride 1, "same"
    zero padding. Computed as shifted copies (im2col) and one batched contraction -- on CPU far faster than the
    batch-grouped conv a ``vmap`` of ``conv_general_dilated`` lowers to."""
    if x.ndim != 4 or kernels.ndim != 5 or kernels.shape[0] != x.shape[0] or kernels.shape[3] != x.shape[-1]:
        raise ValueError(f"kernels must be [B={x.shape[0]}, k, k, Cin={x.shape[-1]}, Cout] for x {x.shape}, got "
                         f"{kernels.shape}")
    if padding != "SAME":
        raise ValueError(f"padding must be 'SAME', got {padding!r}")
    _, H, W, _ = x.shape
    k = kernels.shape[1]
    xp = jnp.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
    patches = jnp.stack([jnp.stack([xp[:, i:i + H, j:j + W] for j in range(k)], axis=3) for i in range(k)], axis=3)
    return jnp.einsum("bhwijc,bijco->bhwo", patches, kernels, precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnames=("k", "cin", "cout", "kernel_num", "k_list"))
def fdconv_apply(x, d, att, fbm_gates, *, k, cin, cout, kernel_num, k_list):
    """The layer after its gates, jitted once: per-sample kernel ``irfft2(sum_n kernel_num beta_n D_n)`` times the
    KSM gates (``att`` as ``FDConv.attentions``), FBM on ``x`` when ``fbm_gates`` ``[n, B, H, W, 1]`` is given
    (``None``: no FBM), then the per-sample "same" conv. No bias."""
    groups = _cached_groups(cout * k, cin * k, kernel_num)
    w = assemble_kernel(d, groups, att["beta"] * kernel_num, k, cin, cout)              # alpha = s * kernel_num
    gate = (att["spatial"][:, :, :, None, None] * att["channel"][:, None, None, :, None]
            * att["filter"][:, None, None, None, :] * jnp.transpose(att["local"], (0, 3, 4, 2, 1)))
    xm = x.astype(jnp.float32)
    if fbm_gates is not None:
        xm = band_modulation(frequency_bands(xm, k_list), fbm_gates)
    return per_sample_conv(xm, w * gate)


@functools.lru_cache(maxsize=64)
def _cached_groups(rows, cols, kernel_num):
    g = frequency_groups(rows, cols, kernel_num)
    g.setflags(write=False)
    return g


# ------------------------------------------------------------------------------------------------ module
DFT_SCALES = ("code", "unit")
FILTER_GATE_INITS = ("code", "one")


def dft_parameter_scale(cin: int, cout: int, k: int, dft_scale: str = "code") -> float:
    """``s`` in ``parameter = D / s``: ``"code"`` is the official ``max(min(Cin, Cout) // 2, 1)``; ``"unit"`` is
    ``sqrt(N / 2)`` with ``N = Cout k * Cin k`` the ``irfft2``'s size, for which a step of the same size on every
    stored number (what Adam takes) moves each spatial weight by about that size too.

    Why: ``W = irfft2(s * parameter)`` divides by ``N``, and each of the ``~N / 2`` stored complex coefficients
    (real and imaginary parts) enters ``W`` twice through the Hermitian mirror, so independent steps of size
    ``lr`` move a spatial weight by about ``s * lr * sqrt(2 / N)``. With the code's ``s`` that is 4x (16 -> 16
    channels) to 6x (16 -> 32) smaller than a plain conv's step under Adam, which is what made FDConv train
    slowly in docs/vision.md's table.
    """
    if dft_scale == "code":
        return float(max(min(cin, cout) // 2, 1))
    if dft_scale == "unit":
        return math.sqrt(cout * k * cin * k / 2)
    raise ValueError(f"dft_scale must be one of {DFT_SCALES}, got {dft_scale!r}")


class FDConv(nnx.Module):
    """``FDConv(in_features, out_features, kernel_size=3)``: drop-in for ``nnx.Conv`` (stride 1, "same").

    ``__call__(x)``; ``static_weight()`` the weight ``irfft2(D)``; ``attentions(x)`` the per-sample gates (dict);
    ``group_weights()`` the ``kernel_num`` disjoint-frequency weights. ``modulation=False`` makes it the static conv.

    Two departures from the code, off by default, that make it train at a plain conv's pace under Adam
    (docs/vision.md): ``dft_scale="unit"`` stores the coefficients at the scale of :func:`dft_parameter_scale`, and
    ``filter_gate_init="one"`` initialises the filter head like the other heads (``N(0, 1e-6)``: every gate starts
    at 1) instead of the code's He init, which its init loop keeps by testing the wrong attribute.
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: int = 3, *, kernel_num: int = 4,
                 reduction: float = 0.0625, min_attention: int = 16, att_multi: float = 2.0,
                 temperature: float = 1.0, kernel_temperature: float = 1.0, use_ksm_local: bool = True,
                 use_fbm: bool | None = None, fbm_k_list=(2, 4, 8), use_bias: bool = True, min_channels: int = 16,
                 modulation: bool = True, dft_scale: str = "code", filter_gate_init: str = "code", rngs: nnx.Rngs):
        cin, cout = _check_pos_int("in_features", in_features), _check_pos_int("out_features", out_features)
        k = _check_pos_int("kernel_size", kernel_size)
        if k % 2 == 0:
            raise ValueError(f"kernel_size must be odd (stride 1, 'same' padding), got {kernel_size}")
        kernel_num = _check_pos_int("kernel_num", kernel_num)
        for name, val in (("reduction", reduction), ("att_multi", att_multi), ("temperature", temperature),
                          ("kernel_temperature", kernel_temperature)):
            if not isinstance(val, (int, float)) or isinstance(val, bool) or val <= 0:
                raise ValueError(f"{name} must be a positive number, got {val!r}")
        if not isinstance(min_channels, int) or min_channels < 0:
            raise ValueError(f"min_channels must be an int >= 0, got {min_channels!r}")
        if dft_scale not in DFT_SCALES:
            raise ValueError(f"dft_scale must be one of {DFT_SCALES}, got {dft_scale!r}")
        if filter_gate_init not in FILTER_GATE_INITS:
            raise ValueError(f"filter_gate_init must be one of {FILTER_GATE_INITS}, got {filter_gate_init!r}")
        self.cin, self.cout, self.k, self.kernel_num = cin, cout, k, kernel_num
        self.att_multi, self.temperature, self.kernel_temperature = float(att_multi), float(temperature), float(
            kernel_temperature)
        # The code's switch-off rule: plain conv for small channel counts (k in {1, 3}, stride 1 are ours to keep).
        self.modulation = bool(modulation) and min(cin, cout) > min_channels
        self.use_ksm_local = bool(use_ksm_local)
        self.use_fbm = (k == 3) if use_fbm is None else bool(use_fbm)
        self.fbm_k_list = tuple(fbm_k_list)
        self.dft_scale, self.filter_gate_init = dft_scale, filter_gate_init
        self.s = dft_parameter_scale(cin, cout, k, dft_scale)

        w = nnx.initializers.lecun_normal()(rngs.params(), (k, k, cin, cout), jnp.float32)
        d = weight_to_dft(w) / self.s
        self.dft = nnx.Param(jnp.stack([d.real, d.imag], axis=-1))                # [Cout k, Cin k // 2 + 1, 2]
        self.bias = nnx.Param(jnp.zeros((cout,), jnp.float32)) if use_bias else None
        if not self.modulation:
            return
        he_out = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
        tiny = nnx.initializers.normal(1e-6)
        a = max(int(cin * reduction), _check_pos_int("min_attention", min_attention))
        self.fc = nnx.Param(he_out(rngs.params(), (cin, a), jnp.float32))
        self.bn = nnx.BatchNorm(a, momentum=0.9, epsilon=1e-5, rngs=rngs)       # PyTorch momentum 0.1
        self.star_scale = nnx.Param(jnp.ones((1,), jnp.float32))
        self.star_bias = nnx.Param(jnp.zeros((1,), jnp.float32))
        self.channel_fc = nnx.Param(tiny(rngs.params(), (a, cin), jnp.float32))
        self.channel_b = nnx.Param(jnp.zeros((cin,), jnp.float32))
        self.filter_fc = nnx.Param((he_out if filter_gate_init == "code" else tiny)(rngs.params(), (a, cout),
                                                                                     jnp.float32))
        self.filter_b = nnx.Param(jnp.zeros((cout,), jnp.float32))
        if k > 1:
            self.spatial_fc = nnx.Param(tiny(rngs.params(), (a, k * k), jnp.float32))
            self.spatial_b = nnx.Param(jnp.zeros((k * k,), jnp.float32))
        if kernel_num > 1:
            self.kernel_fc = nnx.Param(tiny(rngs.params(), (a, kernel_num), jnp.float32))
            self.kernel_b = nnx.Param(jnp.zeros((kernel_num,), jnp.float32))
        if self.use_ksm_local:
            self.ln = nnx.LayerNorm(cin, epsilon=1e-5, rngs=rngs)
            ek = eca_kernel_size(cin)
            self.local_kernel = nnx.Param(jnp.full((ek, 1, cout * k * k), 1e-6, jnp.float32))
        if self.use_fbm:
            n = len(self.fbm_k_list)
            self.fbm_kernel = nnx.Param(tiny(rngs.params(), (n, 3, 3, cin, 1), jnp.float32))
            self.fbm_bias = nnx.Param(jnp.zeros((n, 1), jnp.float32))

    # -------------------------------------------------------------------------------------------- pieces
    @property
    def groups(self) -> np.ndarray:
        """Group id of every stored coefficient ``[Cout k, Cin k // 2 + 1]`` (a constant, not module state)."""
        return _cached_groups(self.cout * self.k, self.cin * self.k, self.kernel_num)

    def _dft_complex(self):
        d = self.dft[...]
        return (d[..., 0] + 1j * d[..., 1]) * self.s

    def static_weight(self):
        """``irfft2(D)`` ``[k, k, Cin, Cout]``: the plain conv weight the layer holds."""
        return dft_to_weight(self._dft_complex(), self.k, self.cin, self.cout)

    def group_weights(self):
        """``[kernel_num, k, k, Cin, Cout]``; they sum to ``static_weight()``."""
        return group_weights(self._dft_complex(), self.groups, self.k, self.cin, self.cout)

    def _check(self, x):
        if not hasattr(x, "ndim") or x.ndim != 4 or x.shape[-1] != self.cin:
            raise ValueError(f"x must be [B, H, W, {self.cin}] (channels-last), got "
                             f"{getattr(x, 'shape', type(x).__name__)}")

    def fbm_gates(self, x):
        """``[n, B, H, W, 1]``: ``2 sigmoid(conv3x3_j(x))`` per high band."""
        self._check(x)
        xf = x.astype(jnp.float32)
        return jnp.stack([self.att_multi * jax.nn.sigmoid(_conv(xf, self.fbm_kernel[j], "SAME") + self.fbm_bias[j])
                          for j in range(len(self.fbm_k_list))])

    def attentions(self, x):
        """Per-sample gates: ``channel [B, Cin]``, ``filter [B, Cout]``, ``spatial [B, k, k]``, ``beta [B, kn]``,
        ``local [B, Cout, Cin, k, k]`` (1 where a head is absent)."""
        self._check(x)
        B, k, m = x.shape[0], self.k, self.att_multi
        p = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        z = star_relu(self.bn(p @ self.fc[...]), self.star_scale[...], self.star_bias[...])
        out = {"channel": m * jax.nn.sigmoid((z @ self.channel_fc[...] + self.channel_b[...]) / self.temperature),
               "filter": m * jax.nn.sigmoid((z @ self.filter_fc[...] + self.filter_b[...]) / self.temperature)}
        out["spatial"] = (m * jax.nn.sigmoid((z @ self.spatial_fc[...] + self.spatial_b[...]) / self.temperature)
                          ).reshape(B, k, k) if k > 1 else jnp.ones((B, 1, 1), jnp.float32)
        out["beta"] = (2.0 * jax.nn.sigmoid((z @ self.kernel_fc[...] + self.kernel_b[...]) / self.kernel_temperature)
                       / self.kernel_num) if self.kernel_num > 1 else jnp.ones((B, 1), jnp.float32)
        if self.use_ksm_local:
            u = self.ln(p)[:, :, None]                                            # [B, Cin, 1]: length Cin
            ek = self.local_kernel.shape[0]
            logit = jax.lax.conv_general_dilated(u, self.local_kernel[...], (1,), [(ek // 2, ek // 2)],
                                                 dimension_numbers=("NWC", "WIO", "NWC"),
                                                 precision=jax.lax.Precision.HIGHEST)  # [B, Cin, Cout k k]
            out["local"] = jnp.transpose((m * jax.nn.sigmoid(logit)).reshape(B, self.cin, self.cout, k, k),
                                         (0, 2, 1, 3, 4))
        else:
            out["local"] = jnp.ones((B, self.cout, self.cin, k, k), jnp.float32)
        return out

    def kernels(self, x):
        """Per-sample conv kernels ``[B, k, k, Cin, Cout]`` (module docstring)."""
        a = self.attentions(x)
        w = assemble_kernel(self._dft_complex(), self.groups, a["beta"] * self.kernel_num, self.k, self.cin,
                            self.cout)                                          # alpha = s * kernel_num
        gate = (a["spatial"][:, :, :, None, None] * a["channel"][:, None, None, :, None]
                * a["filter"][:, None, None, None, :] * jnp.transpose(a["local"], (0, 3, 4, 2, 1)))
        return w * gate

    def __call__(self, x):
        self._check(x)
        pad = [(self.k // 2, self.k // 2)] * 2
        if not self.modulation:
            y = _conv(x.astype(jnp.float32), self.static_weight(), pad)
        else:
            y = fdconv_apply(x, self._dft_complex(), self.attentions(x), self.fbm_gates(x) if self.use_fbm else None,
                             k=self.k, cin=self.cin, cout=self.cout, kernel_num=self.kernel_num,
                             k_list=self.fbm_k_list)
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(x.dtype)

