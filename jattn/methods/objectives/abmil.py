"""Gated-attention MIL pooling (ABMIL; Ilse, Tomczak & Welling 2018), the baseline of P40 ACMIL and P59 AEM.

A bag is ``N`` instance features ``x [B, N, F]`` with a validity mask ``mask [B, N]`` (``True`` = a real
instance, ``False`` = padding). As in the official ACMIL/AEM code (``architecture/network.py`` DimReduction,
``architecture/transformer.py`` ``Attention_Gated`` / ``ABMIL``, ``Classifier_1fc``):

1. DimReduction ``h = ReLU(x W_r)`` (no bias), ``[B, N, L]``.
2. Gated attention logits ``a = W_a (tanh(h V + b_V) * sigmoid(h U + b_U)) + b_a``, hidden ``D`` (128),
   ``K`` branches: ``[B, K, N]`` (ABMIL: ``K = 1``).
3. ``p = softmax(a)`` over the bag's valid instances only: padded instances get exactly 0
   (:func:`masked_softmax`); a bag with no valid instance gets all-zero weights, never NaN.
4. Bag feature ``z = p h`` (:func:`attention_pool`), bag logits ``z W_c + b_c`` over ``num_classes`` (2 for a
   binary bag label, trained with softmax cross-entropy as the official ``nn.CrossEntropyLoss``).

Loss (:func:`abmil_loss`): mean over bags of the softmax cross-entropy of the bag logits. The official code
trains one bag per step (batch 1); here a batch of padded bags is averaged, which is the same loss per bag.

Deliberate deviations: the classifier's dropout (rate 0 in both papers' defaults) is omitted.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # padding logit: exp underflows to exactly 0


def _check_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_mask(mask, logits, name="mask"):
    """``mask`` must be a bool array of ``logits.shape`` without its branch axis (``[B, N]`` for ``[B, K, N]``)
    or of ``logits.shape`` itself. Returns it broadcast to ``logits.shape``; ``None`` means every instance is real."""
    if mask is None:
        return jnp.ones(logits.shape, bool)
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"{name} must be a bool array (True = a real instance), got dtype {mask.dtype}")
    if mask.shape == logits.shape:
        return mask
    if logits.ndim >= 2 and mask.shape == logits.shape[:-2] + logits.shape[-1:]:
        return jnp.broadcast_to(jnp.expand_dims(mask, -2), logits.shape)
    raise ValueError(f"{name} must have shape {logits.shape} or {logits.shape[:-2] + logits.shape[-1:]} "
                     f"(logits without the branch axis), got {mask.shape}")


def masked_softmax(logits, mask=None):
    """Softmax over the last axis (the instances) restricted to ``mask``: padded entries are exactly 0, a row with
    no valid entry is all 0. ``logits [..., N]`` any float; ``mask`` as :func:`check_mask`. Returns float32."""
    logits = jnp.asarray(logits)
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(f"logits must be a float array, got dtype {logits.dtype}")
    mask = check_mask(mask, logits)
    probs = jax.nn.softmax(jnp.where(mask, logits.astype(jnp.float32), MASK_VALUE), axis=-1)
    return jnp.where(mask, probs, 0.0)


def attention_pool(probs, h):
    """``z[b, k] = sum_n probs[b, k, n] h[b, n]``: ``probs [B, K, N]``, ``h [B, N, L]`` -> ``[B, K, L]``."""
    if probs.ndim != 3 or h.ndim != 3 or probs.shape[0] != h.shape[0] or probs.shape[2] != h.shape[1]:
        raise ValueError(f"probs must be [B, K, N] and h [B, N, L] with matching B and N, got probs {probs.shape} "
                         f"and h {h.shape}")
    return jnp.einsum("bkn,bnl->bkl", probs, h.astype(jnp.float32))


def bag_cross_entropy(bag_logits, labels):
    """Mean softmax cross-entropy of ``bag_logits [B, C]`` against integer ``labels [B]``."""
    if bag_logits.ndim != 2:
        raise ValueError(f"bag_logits must be [B, C], got shape {bag_logits.shape}")
    labels = jnp.asarray(labels)
    if labels.shape != bag_logits.shape[:1] or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integer [B={bag_logits.shape[0]}], got {labels.shape} {labels.dtype}")
    logp = jax.nn.log_softmax(bag_logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1))


def abmil_loss(bag_logits, labels):
    """The ABMIL objective: :func:`bag_cross_entropy` (kept as its own name so AEM/ACMIL can say 'ABMIL + ...')."""
    return bag_cross_entropy(bag_logits, labels)


def gated_attention_logits(h, v_w, v_b, u_w, u_b, a_w, a_b):
    """``A = (tanh(h v_w + v_b) * sigmoid(h u_w + u_b)) a_w + a_b`` as ``[..., K, N]``: ``h [..., N, L]``,
    ``v_w, u_w [L, D]``, ``v_b, u_b [D]``, ``a_w [D, K]``, ``a_b [K]``."""
    if h.shape[-1] != v_w.shape[0] or v_w.shape != u_w.shape or a_w.shape[0] != v_w.shape[1]:
        raise ValueError(f"need h [..., N, L], v_w and u_w [L, D], a_w [D, K]; got h {h.shape}, v_w {v_w.shape}, "
                         f"u_w {u_w.shape}, a_w {a_w.shape}")
    gated = jnp.tanh(h @ v_w + v_b) * jax.nn.sigmoid(h @ u_w + u_b)
    return jnp.swapaxes(gated @ a_w + a_b, -1, -2)


class GatedAttention(nnx.Module):
    """``a = W_a (tanh(h V) * sigmoid(h U))`` (all with biases): ``h [B, N, L]`` -> logits ``[B, K, N]``."""

    def __init__(self, dim: int, hidden: int = 128, branches: int = 1, *, rngs: nnx.Rngs):
        _check_int("dim", dim), _check_int("hidden", hidden), _check_int("branches", branches)
        self.V = nnx.Linear(dim, hidden, rngs=rngs)
        self.U = nnx.Linear(dim, hidden, rngs=rngs)
        self.W = nnx.Linear(hidden, branches, rngs=rngs)

    def __call__(self, h):
        return gated_attention_logits(h, self.V.kernel[...], self.V.bias[...], self.U.kernel[...],
                                      self.U.bias[...], self.W.kernel[...], self.W.bias[...])


class GatedAttentionMILPool(nnx.Module):
    """ABMIL: DimReduction (``ReLU(x W_r)``, no bias) -> gated attention (K=1) -> masked softmax -> pooled
    feature -> linear bag classifier. ``__call__(x [B, N, F], mask [B, N] bool)`` returns
    ``(bag_logits [B, C], attn_logits [B, N])``; the logits are raw (padding not yet masked): use
    :func:`masked_softmax` with the same mask for the attention weights."""

    def __init__(self, in_dim: int, inner_dim: int = 128, hidden: int = 128, num_classes: int = 2, *,
                 rngs: nnx.Rngs):
        _check_int("in_dim", in_dim), _check_int("inner_dim", inner_dim)
        _check_int("num_classes", num_classes, 2)
        self.reduce = nnx.Linear(in_dim, inner_dim, use_bias=False, rngs=rngs)
        self.attention = GatedAttention(inner_dim, hidden, 1, rngs=rngs)
        self.classifier = nnx.Linear(inner_dim, num_classes, rngs=rngs)

    def __call__(self, x, mask=None):
        if x.ndim != 3:
            raise ValueError(f"x must be [B, N, F] instance features, got shape {x.shape}")
        h = jax.nn.relu(self.reduce(x))
        logits = self.attention(h)  # [B, 1, N]
        probs = masked_softmax(logits, mask)
        bag = attention_pool(probs, h)[:, 0]
        return self.classifier(bag), logits[:, 0]
