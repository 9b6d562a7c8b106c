"""P59 AEM: Attention Entropy Maximization for multiple-instance learning (Zhang et al.; dazhangyu123/AEM).

The model is ABMIL (:mod:`jattn.methods.objectives.abmil`: gated attention logits ``a [B, N]`` over a bag's
instances, ``p = softmax(a)`` over the valid ones). AEM adds one term to the bag cross-entropy (official
``main.py``, ``arch == 'abmil'``, ``top_k = -1``)::

    loss = CE(bag_logits, y) + lam * sum_i p_i log p_i        (= CE - lam * H(p))

i.e. ``lam`` times the NEGATIVE entropy of the attention distribution, so minimising the loss maximises the
entropy and discourages attention that collapses onto a few instances. ``lam = 0`` is ABMIL exactly. Default
``lam = 0.1`` (the README's example; the paper tunes it per dataset).

- :func:`attention_entropy` ``H(p) = -sum_i p_i log p_i`` in nats, over the valid instances (``log N`` at most,
  reached by uniform attention; invariant to adding a constant to every logit).
- :func:`aem_loss` the regulariser ``lam * sum_i p_i log p_i``, averaged over the bags of a batch.
- :func:`aem_total_loss` ABMIL's cross-entropy plus :func:`aem_loss`.

Deliberate deviations: the official code trains with one bag per step (the term is a plain sum over that bag's
instances); a batch of padded bags here averages the per-bag term, which is the same objective per bag. The
optional ``top_k`` variant (entropy of the renormalised top-k weights) and the 80% instance-subsampling
augmentation are not implemented.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jattn.methods.objectives.abmil import MASK_VALUE, abmil_loss, check_mask


def attention_entropy(logits, mask=None, axis: int = -1):
    """Entropy (nats) of ``softmax(logits)`` along ``axis`` over the entries ``mask`` keeps (padding contributes
    nothing). ``logits [..., N]``; ``mask`` bool of ``logits.shape`` or without the branch axis. Returns
    ``logits.shape`` without ``axis`` (float32); a row with no valid entry has entropy 0."""
    logits = jnp.asarray(logits)
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(f"logits must be a float array, got dtype {logits.dtype}")
    if not isinstance(axis, int) or not -logits.ndim <= axis < logits.ndim:
        raise ValueError(f"axis must be an int in [-{logits.ndim}, {logits.ndim}), got {axis!r}")
    logits = jnp.moveaxis(logits.astype(jnp.float32), axis, -1)
    if mask is not None:
        mask = jnp.moveaxis(jnp.asarray(mask), axis, -1) if jnp.ndim(mask) == logits.ndim else mask
    mask = check_mask(mask, logits)
    logp = jax.nn.log_softmax(jnp.where(mask, logits, MASK_VALUE), axis=-1)
    return -jnp.sum(jnp.where(mask, jnp.exp(logp) * logp, 0.0), axis=-1)


def aem_loss(logits, lam: float = 0.1, mask=None):
    """The AEM regulariser ``lam * sum_i p_i log p_i`` (``-lam`` times :func:`attention_entropy`), averaged over
    every leading axis (bags, and branches if any). ``logits [..., N]`` are the raw attention logits."""
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or lam < 0:
        raise ValueError(f"lam must be a float >= 0, got {lam!r}")
    return -lam * jnp.mean(attention_entropy(logits, mask))


def aem_total_loss(bag_logits, labels, attn_logits, lam: float = 0.1, mask=None):
    """ABMIL's bag cross-entropy plus :func:`aem_loss`: ``CE(bag_logits, labels) + lam * sum_i p_i log p_i``.
    ``bag_logits [B, C]``, ``labels [B]`` int, ``attn_logits [B, N]``, ``mask [B, N]`` bool."""
    if attn_logits.ndim < 2 or attn_logits.shape[0] != bag_logits.shape[0]:
        raise ValueError(f"attn_logits must be [B={bag_logits.shape[0]}, N], got shape {attn_logits.shape}")
    return abmil_loss(bag_logits, labels) + aem_loss(attn_logits, lam, mask)
