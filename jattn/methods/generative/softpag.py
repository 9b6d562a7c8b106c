"""P07 HeadHunter + SoftPAG ("Fine-Grained Perturbation Guidance via Attention Head Selection"; no official
code found, the computation below follows the paper as summarised in ``papers/P00-P24.md``).

SoftPAG, the perturbed branch. On a selected set of heads ``S = {(l, h)}`` the attention map ``A`` (rows sum
to 1) is replaced by::

    A~ = (1 - u) A + u I            (u in [0, 1]; I the identity over the N tokens; other heads untouched)

so ``u = 1`` makes the head output exactly ``V`` (PAG, Ahn et al. 2024) and ``u = 0`` leaves it unchanged.
Because ``A~ V = (1 - u) A V + u V``, the perturbed head never needs ``A``: :func:`perturbed_attention`
computes ``(1 - u) softmax(q k^T * scale) v + u v`` per selected head with :func:`jattn.attention` (so it
runs on the flash / Pallas path); :func:`soft_pag` is the explicit-matrix form (a ``prob_mod``), and the
tests check the two agree.

Guidance. :func:`perturbation_guidance` is the paper's ``eps^ = eps(x) + w (eps(x) - eps_pert(x))``.
With a class-conditional model the project combines it with classifier-free guidance in the additive form
(:func:`cfg_pag_guidance`)::

    eps^ = eps_uncond + w_cfg (eps_cond - eps_uncond) + w_pag (eps_cond - eps_cond_pert)

(the perturbed branch is the *conditional* prediction with the selected heads softened; the PAG paper's
CFG + PAG form). A guided step costs three network evaluations instead of CFG's two.

HeadHunter. :func:`headhunter_greedy` is the greedy iterative selection: starting from ``S = {}``, each round
scores every remaining head by ``eval_fn(S + [head])`` (the mean objective over a fixed prompt/seed set,
higher is better) and adds the ``k`` best to ``S``; ``rounds`` rounds. It returns the selected heads in
order with the per-round scores.

Defaults: ``u = 1`` (PAG), ``k = 1`` head per round. Deliberate choices: the identity covers the whole
token sequence (a DiT over image tokens only; the MM-DiT text-row question of the spec does not arise);
``head_mask`` is a per-head weight in ``[0, 1]`` (``u * head_mask`` is the effective per-head ``u``), so a
0/1 mask selects heads and fractional values give per-head strengths; GQA key/value heads are repeated to
the query heads for the ``+ u v`` term.
"""
from __future__ import annotations

from typing import Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["soft_pag", "perturbed_attention", "perturbation_guidance", "cfg_pag_guidance", "headhunter_greedy",
           "head_mask_from_heads"]


def _describe(x) -> str:
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    return f"shape {tuple(shape)} dtype {dtype}" if shape is not None else type(x).__name__


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_u(u, num_heads: int):
    """``u``: a float or a float array of shape ``[]`` or ``[H]``, in [0, 1] when concrete."""
    if isinstance(u, bool) or not (isinstance(u, (int, float, np.integer, np.floating)) or hasattr(u, "shape")):
        raise TypeError(f"u must be a float or a float array [] / [H] in [0, 1], got {type(u).__name__}")
    arr = u if hasattr(u, "shape") else np.asarray(u, np.float32)
    if tuple(arr.shape) not in ((), (num_heads,)):
        raise ValueError(f"u must be a scalar or [H={num_heads}], got {_describe(arr)}")
    if hasattr(arr, "dtype") and not jnp.issubdtype(arr.dtype, jnp.floating) and not jnp.issubdtype(arr.dtype, jnp.integer):
        raise TypeError(f"u must be a float (array), got {_describe(arr)}")
    if _is_concrete(arr):
        values = np.asarray(arr, np.float64)
        if not np.all(np.isfinite(values)) or values.min() < 0 or values.max() > 1:
            raise ValueError(f"u must lie in [0, 1], got values in [{values.min()}, {values.max()}]")
    return jnp.asarray(arr, jnp.float32)


def _check_head_mask(head_mask, num_heads: int):
    """``head_mask [H]``: bool or float weights in [0, 1] (True / 1 = perturb that head)."""
    if not hasattr(head_mask, "shape"):
        if isinstance(head_mask, (list, tuple)):
            head_mask = np.asarray(head_mask)
        else:
            raise TypeError(f"head_mask must be a bool or float array [H={num_heads}], got {type(head_mask).__name__}")
    if tuple(head_mask.shape) != (num_heads,):
        raise ValueError(f"head_mask must be [H={num_heads}] (one entry per query head), got {_describe(head_mask)}")
    dtype = head_mask.dtype
    if not (jnp.issubdtype(dtype, jnp.bool_) or jnp.issubdtype(dtype, jnp.floating)
            or jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(f"head_mask must be bool or float, got {_describe(head_mask)}")
    if _is_concrete(head_mask) and not jnp.issubdtype(dtype, jnp.bool_):
        values = np.asarray(head_mask, np.float64)
        if values.size and (not np.all(np.isfinite(values)) or values.min() < 0 or values.max() > 1):
            raise ValueError(f"head_mask weights must lie in [0, 1], got values in [{values.min()}, {values.max()}]")
    return jnp.asarray(head_mask, jnp.float32)


def soft_pag(probs, u, head_mask):
    """``(1 - u m_h) A + u m_h I`` on ``probs [B, H, N, N]`` (normalised rows), ``m = head_mask [H]``.

    The explicit-matrix form (usable as a ``prob_mod``); rows stay normalised. ``u = 0`` or ``m_h = 0``
    returns the head's map unchanged, ``u m_h = 1`` the identity (the head then outputs ``V``)."""
    if not hasattr(probs, "shape") or probs.ndim != 4:
        raise ValueError(f"probs must be [B, H, N, N] attention probabilities, got {_describe(probs)}")
    if not jnp.issubdtype(probs.dtype, jnp.floating):
        raise TypeError(f"probs must be a float array, got {_describe(probs)}")
    B, H, N, S = probs.shape
    if N != S:
        raise ValueError(f"probs must be square self-attention maps [B, H, N, N] (the identity needs N == S), "
                         f"got {_describe(probs)}")
    weight = (_check_u(u, H) * _check_head_mask(head_mask, H))[None, :, None, None]
    eye = jnp.eye(N, dtype=jnp.float32)[None, None]
    out = (1.0 - weight) * probs.astype(jnp.float32) + weight * eye
    return out.astype(probs.dtype)


def perturbed_attention(q, k, v, head_mask, u=1.0, *, scale: float | None = None, **attention_kwargs):
    """``(1 - u m_h) softmax(q k^T * scale) v + u m_h v`` per query head ``h`` (``m = head_mask [H]``),
    with ``q [B, N, H, D]``, ``k, v [B, N, Hkv, D]`` (self-attention: the identity needs the same N).

    Never forms ``A``: the softmax term is :func:`jattn.attention` (flash / Pallas path; extra keyword
    arguments such as ``impl`` go to it), the identity term is ``v`` itself (repeated to the query heads
    under GQA). Equals :func:`soft_pag` applied to the map, then times ``v``."""
    from jattn.ops.attention import attention

    for name, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "shape") or x.ndim != 4:
            raise ValueError(f"{name} must be [B, N, H, D], got {_describe(x)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be a float array, got {_describe(x)}")
    B, N, H, D = q.shape
    if k.shape[:2] != (B, N) or v.shape[:2] != (B, N):
        raise ValueError(f"k and v must be [B={B}, N={N}, Hkv, D] (self-attention: the identity needs the query "
                         f"and key lengths equal), got k {_describe(k)}, v {_describe(v)}")
    if k.shape[2] != v.shape[2] or H % v.shape[2]:
        raise ValueError(f"k and v must share Hkv dividing H={H}, got k {_describe(k)}, v {_describe(v)}")
    if v.shape[3] != D:
        raise ValueError(f"v must have head dim D={D} (the identity term adds v to the output), got {_describe(v)}")
    weight = (_check_u(u, H) * _check_head_mask(head_mask, H))[None, None, :, None]
    out = attention(q, k, v, scale=scale, **attention_kwargs)
    v_q = jnp.repeat(v, H // v.shape[2], axis=2) if v.shape[2] != H else v
    mixed = (1.0 - weight) * out.astype(jnp.float32) + weight * v_q.astype(jnp.float32)
    return mixed.astype(out.dtype)


def _check_same(names, arrays):
    shapes = [getattr(a, "shape", None) for a in arrays]
    for name, a, shape in zip(names, arrays, shapes):
        if shape is None:
            raise TypeError(f"{name} must be an array, got {type(a).__name__}")
    if len(set(tuple(s) for s in shapes)) != 1:
        raise ValueError(f"{', '.join(names)} must have the same shape, got "
                         + ", ".join(f"{n} {tuple(s)}" for n, s in zip(names, shapes)))


def _check_scale(name, w):
    if isinstance(w, bool) or not (isinstance(w, (int, float, np.integer, np.floating)) or hasattr(w, "shape")):
        raise TypeError(f"{name} must be a float guidance scale, got {type(w).__name__}")
    if hasattr(w, "shape") and w.shape != ():
        raise ValueError(f"{name} must be a scalar guidance scale, got {_describe(w)}")
    if _is_concrete(w) and not np.isfinite(float(w)):
        raise ValueError(f"{name} must be finite, got {float(w)}")
    return w


def perturbation_guidance(eps, eps_perturbed, w):
    """``eps + w (eps - eps_perturbed)`` (PAG / SoftPAG guidance; ``w = 0`` returns ``eps``)."""
    _check_same(("eps", "eps_perturbed"), (eps, eps_perturbed))
    w = _check_scale("w", w)
    return eps + w * (eps - eps_perturbed)


def cfg_pag_guidance(eps_cond, eps_uncond, eps_cond_perturbed, w_cfg, w_pag):
    """``eps_uncond + w_cfg (eps_cond - eps_uncond) + w_pag (eps_cond - eps_cond_perturbed)``: classifier-free
    guidance plus perturbation guidance on the conditional branch (``w_pag = 0`` is plain CFG)."""
    _check_same(("eps_cond", "eps_uncond", "eps_cond_perturbed"), (eps_cond, eps_uncond, eps_cond_perturbed))
    w_cfg, w_pag = _check_scale("w_cfg", w_cfg), _check_scale("w_pag", w_pag)
    return eps_uncond + w_cfg * (eps_cond - eps_uncond) + w_pag * (eps_cond - eps_cond_perturbed)


def head_mask_from_heads(heads: Sequence[tuple[int, int]], num_layers: int, num_heads: int) -> np.ndarray:
    """A float ``[num_layers, num_heads]`` 0/1 mask with ones at the ``(layer, head)`` pairs in ``heads``."""
    for name, n in (("num_layers", num_layers), ("num_heads", num_heads)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"{name} must be an int >= 1, got {n!r}")
    mask = np.zeros((num_layers, num_heads), np.float32)
    for pair in heads:
        if (not isinstance(pair, (tuple, list)) or len(pair) != 2
                or not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in pair)):
            raise TypeError(f"heads must hold (layer, head) int pairs, got {pair!r}")
        layer, head = int(pair[0]), int(pair[1])
        if not (0 <= layer < num_layers and 0 <= head < num_heads):
            raise ValueError(f"heads entry {pair!r} out of range: layer in [0, {num_layers}), head in [0, {num_heads})")
        mask[layer, head] = 1.0
    return mask


def headhunter_greedy(eval_fn: Callable[[tuple], float], heads: Sequence[Hashable], k: int = 1,
                      rounds: int = 1) -> dict:
    """Greedy HeadHunter selection (higher ``eval_fn`` is better).

    ``eval_fn(selected: tuple of heads) -> float`` is the mean objective over the search set with exactly
    those heads perturbed. Each round scores every head not yet selected by ``eval_fn(S + (head,))`` and
    appends the ``k`` best (ties: the earlier head in ``heads``); ``rounds`` rounds, stopping early when no
    head is left. Returns ``{"selected": tuple, "rounds": [{"added": tuple, "scores": {head: score},
    "best": float}], "evaluations": int}``."""
    if not callable(eval_fn):
        raise TypeError(f"eval_fn must be a function (selected heads) -> float, got {type(eval_fn).__name__}")
    heads = list(heads)
    if not heads:
        raise ValueError("heads must be a non-empty sequence of head ids, got an empty one")
    if len(set(heads)) != len(heads):
        raise ValueError(f"heads must be distinct, got {heads!r}")
    for name, n in (("k", k), ("rounds", rounds)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"{name} must be an int >= 1, got {n!r}")
    selected: list = []
    history, evaluations = [], 0
    for _ in range(int(rounds)):
        remaining = [h for h in heads if h not in selected]
        if not remaining:
            break
        scores = {}
        for head in remaining:
            value = eval_fn(tuple(selected) + (head,))
            evaluations += 1
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise TypeError(f"eval_fn must return a float, got {type(value).__name__} for head {head!r}") from None
            if not np.isfinite(value):
                raise ValueError(f"eval_fn returned a non-finite score {value} for head {head!r}")
            scores[head] = value
        order = sorted(range(len(remaining)), key=lambda i: (-scores[remaining[i]], i))
        added = tuple(remaining[i] for i in order[:int(k)])
        selected.extend(added)
        history.append({"added": added, "scores": scores, "best": scores[added[0]]})
    return {"selected": tuple(selected), "rounds": history, "evaluations": evaluations}
