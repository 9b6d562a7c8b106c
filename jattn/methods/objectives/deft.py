"""P25 DEFT: "From PEFT to DEFT: Parameter Efficient Finetuning for Reducing Activation Density in
Transformers" (Farina et al., AAAI 2025; official code IBM/DEFT ``GLUE/lora.py``, ``GLUE/adapter.py``:
``OutputHook``, ``compute_l0_penalty``, ``compute_eval_sparsity``).

A regulariser on the MLP's intermediate activation ``a_l = f(x W_1)`` (``intermediate_act_fn``), shape
``[B, T, F]`` per layer ``l``, trained through parameter-efficient weights only (the backbone is frozen):

* smooth density per sample and layer: ``d_l(b) = mean_{t,f} a^2 / (a^2 + eps)`` (a smooth ``1[a != 0]``);
* density loss ``L_d = mean_{b,l} d_l(b)``; training minimises ``L = L_task + lambda * L_d``;
* the reported density is exact: ``count_nonzero(a) / (T F)`` per sample and layer, averaged.

Defaults from the official code: ``eps = 1e-7``, ``lambda (weight_l) = 1.0``; LoRA ``r = 8``, ``alpha = 16``
(scale ``alpha / r``) on the self-attention query and value matrices (``adapters.LoRAConfig``: ``selfattn_lora``,
``attn_matrices=["q", "v"]``), ``A`` kaiming-uniform (bound ``1/sqrt(fan_in)``), ``B = 0``.

What is here:

* pure losses/measures: :func:`density_surrogate`, :func:`density_loss`, :func:`activation_density`,
  :func:`positive_fraction`, :func:`deft_loss`;
* NNX pieces: :class:`LoRALinear` (wraps an ``nnx.Linear``; its ``A, B`` are ``nnx.LoRAParam``), :class:`DeftMLP`
  (the model's MLP that ``sow``s its activation), :func:`apply_deft` (turns a jattn.nn model with ``.blocks`` of
  ``TransformerBlock`` into its DEFT form, in place), :func:`pop_activations`, and ``TRAINABLE = nnx.LoRAParam``,
  the filter that selects the only trained parameters (``train/deft.py`` trains them with optax).

Deliberate choices beyond the spec:

* ``mask [B, T]`` (1 = real token), optional everywhere: with it, means over ``t`` run over real tokens only
  (padding is not a token); ``mask=None`` is the official mean over all ``T`` positions.
* GELU models rarely give exact zeros (float32 ``gelu(x)`` underflows to 0 only near ``x < -14``), so
  :func:`activation_density` also takes ``tol`` (``|a| > tol`` counts as active) and :func:`positive_fraction`
  gives the fraction ``a > 0``; ``tol=0`` is the official ``count_nonzero``.
* LoRA dropout (official 0.1) is not implemented (the forward stays deterministic); Pfeiffer adapters,
  prefix and prompt tuning are not implemented (LoRA only). ADA-DEFT is not implemented.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.core import checks

__all__ = ["density_surrogate", "density_loss", "activation_density", "positive_fraction", "deft_loss",
           "LoRALinear", "DeftMLP", "apply_deft", "pop_activations", "lora_params", "TRAINABLE",
           "ATTENTION_TARGETS", "MLP_TARGETS", "DEFAULT_EPS"]

DEFAULT_EPS = 1e-7
ATTENTION_TARGETS = ("query", "key", "value", "out")
MLP_TARGETS = ("up", "down", "gate")
TRAINABLE = nnx.LoRAParam


def _check_acts(name, acts):
    checks.check_float_array(name, acts, 3)
    if acts.shape[1] == 0 or acts.shape[2] == 0:
        raise ValueError(f"{name} must be [B, T, F] with T, F > 0, got {checks.describe(acts)}")


def _weights(mask, acts, name="mask"):
    """``[B, T, 1]`` float32 token weights (1 = real token), or None."""
    if mask is None:
        return None
    if not hasattr(mask, "shape") or tuple(mask.shape) != tuple(acts.shape[:2]):
        raise ValueError(f"{name} must have shape [B, T] = {tuple(acts.shape[:2])} like the activations, "
                         f"got {checks.describe(mask)}")
    return jnp.asarray(mask).astype(jnp.float32)[..., None]


def _mean_tf(values, weights):
    """Per-sample mean over ``t`` (real tokens only with ``weights``) and ``f`` of ``values [B, T, F]``."""
    if weights is None:
        return jnp.mean(values, axis=(1, 2))
    F = values.shape[-1]
    return jnp.sum(values * weights, axis=(1, 2)) / jnp.maximum(jnp.sum(weights, axis=(1, 2)) * F, 1.0)


def density_surrogate(acts, eps: float = DEFAULT_EPS, mask=None):
    """Smooth density per sample ``[B]``: ``mean_{t,f} a^2 / (a^2 + eps)`` of one layer's ``acts [B, T, F]``.

    In ``[0, 1)``; tends to the exact fraction of non-zero entries as ``eps -> 0``. Computed in float32."""
    _check_acts("acts", acts)
    eps = checks.check_positive_float("eps", eps, allow_none=False)
    a2 = jnp.square(acts.astype(jnp.float32))
    return _mean_tf(a2 / (a2 + eps), _weights(mask, acts))


def density_loss(acts_list: Sequence, eps: float = DEFAULT_EPS, mask=None):
    """``L_d = mean_{b, l} d_l(b)`` over a non-empty list of per-layer activations ``[B, T, F_l]`` (scalar)."""
    if isinstance(acts_list, (str, bytes)) or not isinstance(acts_list, (list, tuple)) or not acts_list:
        raise TypeError(f"acts_list must be a non-empty list of [B, T, F] arrays (one per layer), got "
                        f"{checks.describe(acts_list) if hasattr(acts_list, 'shape') else repr(acts_list)[:80]}")
    per_layer = []
    for index, acts in enumerate(acts_list):
        _check_acts(f"acts_list[{index}]", acts)
        if tuple(acts.shape[:2]) != tuple(acts_list[0].shape[:2]):
            raise ValueError(f"acts_list[{index}] must share [B, T] = {tuple(acts_list[0].shape[:2])} with "
                             f"acts_list[0], got {checks.describe(acts)}")
        per_layer.append(density_surrogate(acts, eps, mask))
    return jnp.mean(jnp.stack(per_layer, axis=1))


def activation_density(acts, tol: float = 0.0, mask=None):
    """Measured density per sample ``[B]``: the fraction of entries with ``|a| > tol`` (``tol=0``:
    ``count_nonzero(a) / (T F)``, the paper's metric)."""
    _check_acts("acts", acts)
    tol = checks.check_finite_float("tol", tol)
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    active = (jnp.abs(acts.astype(jnp.float32)) > tol).astype(jnp.float32)
    return _mean_tf(active, _weights(mask, acts))


def positive_fraction(acts, mask=None):
    """Fraction per sample ``[B]`` of entries ``a > 0`` (for GELU: of pre-activations above 0)."""
    _check_acts("acts", acts)
    return _mean_tf((acts > 0).astype(jnp.float32), _weights(mask, acts))


def deft_loss(task_loss, acts_list: Sequence, *, weight: float = 1.0, eps: float = DEFAULT_EPS, mask=None):
    """``(task_loss + weight * L_d, L_d)``. With ``weight=0`` the total is ``task_loss`` exactly (plain PEFT).

    ``weight`` is a Python number (checked) or a scalar array (e.g. traced, so one compiled step serves every
    weight; ``task + 0 * L_d`` is ``task`` exactly since ``L_d`` is finite)."""
    if hasattr(weight, "shape"):
        if tuple(weight.shape) != () or not jnp.issubdtype(weight.dtype, jnp.floating):
            raise ValueError(f"weight must be a float or a float scalar array, got {checks.describe(weight)}")
    else:
        weight = checks.check_finite_float("weight", weight)
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight!r}")
    density = density_loss(acts_list, eps, mask)
    if not hasattr(weight, "shape") and weight == 0.0:
        return task_loss, density
    return task_loss + weight * density, density


class LoRALinear(nnx.Module):
    """``y = base(x) + (x A) B * (alpha / rank)``; ``A [in, r]``, ``B [r, out]`` are ``nnx.LoRAParam``.

    ``A`` is uniform in ``+-1/sqrt(in)`` (torch's ``kaiming_uniform_(a=sqrt(5))``, the ``lora`` init) and
    ``B`` is zero, so at init the output equals ``base(x)`` bit for bit. ``base`` is used as is (its
    ``nnx.Param`` weights are frozen by training only ``nnx.LoRAParam``)."""

    def __init__(self, base: nnx.Linear, rank: int = 8, alpha: float = 16.0, *, rngs: nnx.Rngs):
        if not isinstance(base, nnx.Linear):
            raise TypeError(f"base must be an nnx.Linear, got {type(base).__name__}")
        self.rank = checks.check_int("rank", rank)
        self.scale = checks.check_positive_float("alpha", alpha, allow_none=False) / self.rank
        self.base = base
        fan_in, fan_out = base.in_features, base.out_features
        bound = 1.0 / math.sqrt(fan_in)
        self.lora_a = nnx.LoRAParam(jax.random.uniform(rngs.params(), (fan_in, self.rank), base.param_dtype,
                                                       -bound, bound))
        self.lora_b = nnx.LoRAParam(jnp.zeros((self.rank, fan_out), base.param_dtype))

    @property
    def in_features(self):
        return self.base.in_features

    @property
    def out_features(self):
        return self.base.out_features

    def __call__(self, x):
        y = self.base(x)
        delta = (x.astype(jnp.float32) @ self.lora_a[...].astype(jnp.float32)) @ self.lora_b[...].astype(jnp.float32)
        return y + (delta * self.scale).astype(y.dtype)


class DeftMLP(nnx.Module):
    """The model's :class:`jattn.nn.models.MLP` (same ``up``/``gate``/``down`` submodules, same output) that
    ``sow``s its intermediate activation ``[B, T, F]`` as ``nnx.Intermediate`` under ``activation``:
    ``gelu(x W_up)`` (``gelu``) or ``silu(x W_gate)`` (``swiglu``, the act_fn output as in HF Llama)."""

    def __init__(self, mlp):
        kind = getattr(mlp, "kind", None)
        if kind not in ("gelu", "swiglu"):
            raise ValueError(f"mlp must be a jattn.nn.models.MLP of kind 'gelu' or 'swiglu' (an activation to "
                             f"regularise), got {type(mlp).__name__} with kind={kind!r}")
        self.kind = kind
        self.up, self.gate, self.down = mlp.up, mlp.gate, mlp.down

    def __call__(self, x):
        if self.kind == "gelu":
            acts = jax.nn.gelu(self.up(x), approximate=False)
            hidden = acts
        else:
            acts = jax.nn.silu(self.gate(x))
            hidden = acts * self.up(x)
        self.sow(nnx.Intermediate, "activation", acts)
        return self.down(hidden)


def apply_deft(model, *, rank: int = 8, alpha: float = 16.0, targets: Sequence[str] = ("query", "value"),
               seed: int = 0):
    """Makes ``model`` (anything with ``.blocks`` of :class:`jattn.nn.models.TransformerBlock`: BertEncoder,
    DecoderLM, ViT) its DEFT form in place and returns it: every ``block.mlp`` becomes a :class:`DeftMLP` and
    every target linear (``query``/``key``/``value``/``out`` of the attention, ``up``/``down``/``gate`` of the
    MLP) becomes a :class:`LoRALinear`. Outputs are unchanged until the ``B`` matrices move."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) == 0:
        raise TypeError(f"model must have a non-empty .blocks of TransformerBlock, got {type(model).__name__}")
    if isinstance(targets, str) or not isinstance(targets, (tuple, list)):
        raise TypeError(f"targets must be a tuple of names from {ATTENTION_TARGETS + MLP_TARGETS}, got {targets!r}")
    for name in targets:
        checks.check_choice("targets", name, ATTENTION_TARGETS + MLP_TARGETS)
    if len(set(targets)) != len(targets):
        raise ValueError(f"targets has a repeated name: {targets!r}")
    rngs = nnx.Rngs(checks.check_int("seed", seed, 0))
    for block in blocks:
        if isinstance(block.mlp, DeftMLP) or any(isinstance(m, LoRALinear) for _, m in nnx.iter_graph(block)):
            raise ValueError("model already has DEFT/LoRA modules: apply_deft once, on a fresh model")
        mlp = DeftMLP(block.mlp)
        for name in targets:
            owner = block.attention if name in ATTENTION_TARGETS else mlp
            linear = getattr(owner, name)
            if linear is None:
                raise ValueError(f"targets names {name!r}, which this model's MLP (kind={mlp.kind!r}) does not have")
            setattr(owner, name, LoRALinear(linear, rank, alpha, rngs=rngs))
        block.mlp = mlp
    return model


def pop_activations(model) -> list:
    """Removes and returns the sown activations, one ``[B, T, F]`` per block in order (the last call's)."""
    acts = []
    for index, block in enumerate(model.blocks):
        mlp = block.mlp
        if not isinstance(mlp, DeftMLP):
            raise TypeError(f"model.blocks[{index}].mlp is {type(mlp).__name__}, not a DeftMLP: call apply_deft first")
        sown = getattr(mlp, "activation", None)
        if sown is None:
            raise ValueError(f"model.blocks[{index}] has no sown activation: run the model before pop_activations")
        acts.append(sown.get_value()[-1])
        del mlp.activation
    return acts


def lora_params(model):
    """The trainable state: every ``nnx.LoRAParam`` of ``model``."""
    return nnx.state(model, TRAINABLE)
