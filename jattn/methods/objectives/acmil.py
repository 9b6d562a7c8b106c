"""P40 ACMIL: Attention-Challenging Multiple Instance Learning (Zhang et al.; dazhangyu123/ACMIL).

ABMIL (:mod:`jattn.methods.objectives.abmil`) with two changes that spread attention over more instances
(official ``architecture/transformer.py`` ``ACMIL_GA``, losses in ``Step3_WSI_classification_ACMIL.py``):

1. ``h = ReLU(x W_r)`` (no bias); gated attention with ``K`` branches (MBA): logits ``A [B, K, N]``.
2. STKIM, training only (:func:`stochastic_topk_mask`): per branch, of the top ``min(k, n)`` instances by logit
   (``n`` = the bag's valid instances) ``int(min(k, n) * mask_drop)`` chosen uniformly at random get logit
   ``-1e9`` (:data:`STKIM_VALUE`, as the official code).
3. Branch ``j``: ``z_j = softmax(A_j) h`` classified by its own linear head; slide attention
   ``a = mean_j softmax(A_j)``, ``z = a h``, slide head. Inference: slide head, no masking.
4. Loss (:func:`acmil_loss`): ``CE(slide) + mean_j CE(branch_j)`` (the branch term only when ``K > 1``, as the
   official code) ``+`` :func:`branch_diversity` = the mean over branch pairs ``i < j`` of the cosine similarity
   of ``softmax(A_i)`` and ``softmax(A_j)``, computed on the STKIM-masked logits. The spec describes the cosine
   "between branch logit vectors"; the official training loop applies ``torch.softmax`` to the logits first,
   which is what is implemented (so the diversity term lies in ``[0, 1]``: 1 for identical branches, 0 for
   branches attending to disjoint instances).

Defaults (spec): ``K = 5`` branches, ``n_masked = 10`` (``k``), ``mask_drop = 0.6``, gated hidden 128, inner
dim 128. (The official Step3 script passes ``n_masked_patch=conf.n_token``, i.e. ``k = K`` in practice; the
spec's 10 is the argument's documented default.)

Deliberate deviations: a batch of padded bags (``mask [B, N]``) instead of one bag per step, each bag's terms
averaged; padded instances never enter the top-k and get exactly zero attention; classifier dropout (0 in the
defaults) omitted.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.methods.objectives.abmil import (GatedAttention, _check_int, attention_pool, bag_cross_entropy,
                                            check_mask, masked_softmax)

STKIM_VALUE = -1e9  # the official code's masked_fill value


def _check_drop(mask_drop):
    if isinstance(mask_drop, bool) or not isinstance(mask_drop, (int, float)) or not 0.0 <= mask_drop <= 1.0:
        raise ValueError(f"mask_drop must be a float in [0, 1], got {mask_drop!r}")
    return float(mask_drop)


def num_masked(n: int, k: int, mask_drop: float) -> int:
    """How many instances STKIM masks in a branch of a bag with ``n`` valid instances: ``int(min(k, n) * drop)``
    (Python truncation of the float product, exactly as the official ``int(n_masked_patch * self.mask_drop)``)."""
    return int(min(k, n) * mask_drop)


def stochastic_topk_mask(logits, k: int, mask_drop: float, rng, mask=None):
    """STKIM's choice: a bool array of ``logits.shape`` (``[..., N]``), True where an instance is masked.

    Per row, among the ``min(k, n)`` valid instances with the largest logits (``n`` = valid instances of the
    row), exactly :func:`num_masked` ``(n, k, mask_drop)`` chosen uniformly at random (independently per row)
    are masked. Ties among logits go to the lower index (``lax.top_k``). ``mask`` as :func:`check_mask`."""
    logits = jnp.asarray(logits)
    if not jnp.issubdtype(logits.dtype, jnp.floating) or logits.ndim < 1:
        raise TypeError(f"logits must be a float array [..., N], got {logits.dtype} {logits.shape}")
    k = _check_int("k", k, 0)
    mask_drop = _check_drop(mask_drop)
    valid = check_mask(mask, logits)
    N = logits.shape[-1]
    kk = min(k, N)
    if kk == 0:
        return jnp.zeros(logits.shape, bool)
    _, idx = jax.lax.top_k(jnp.where(valid, logits.astype(jnp.float32), -jnp.inf), kk)  # [..., kk]
    n_valid = jnp.sum(valid, axis=-1)
    table = jnp.asarray([num_masked(n, k, mask_drop) for n in range(N + 1)], jnp.int32)
    n_drop = table[n_valid]
    slots = jnp.arange(kk)
    keys = jax.random.uniform(rng, idx.shape)
    keys = jnp.where(slots < jnp.minimum(n_valid, k)[..., None], keys, 2.0)  # padded slots sort last
    rank = jnp.argsort(jnp.argsort(keys, axis=-1), axis=-1)
    chosen = rank < n_drop[..., None]  # [..., kk]
    hit = (idx[..., None] == jnp.arange(N)) & chosen[..., None]  # [..., kk, N]
    return jnp.any(hit, axis=-2)


def apply_instance_mask(logits, dropped):
    """``logits`` with the ``dropped`` entries set to :data:`STKIM_VALUE` (-1e9)."""
    if dropped.shape != logits.shape or dropped.dtype != jnp.bool_:
        raise ValueError(f"dropped must be bool of shape {logits.shape}, got {dropped.dtype} {dropped.shape}")
    return jnp.where(dropped, jnp.asarray(STKIM_VALUE, logits.dtype), logits)


def branch_diversity(attn_logits, mask=None, eps: float = 1e-8):
    """Mean over branch pairs ``i < j`` (and over bags) of ``cos(softmax(A_i), softmax(A_j))``; softmax over the
    valid instances. ``attn_logits [B, K, N]``; 0 when ``K = 1`` (no pairs). Cosine as ``torch.cosine_similarity``:
    ``x.y / (max(|x|, eps) max(|y|, eps))``."""
    if attn_logits.ndim != 3:
        raise ValueError(f"attn_logits must be [B, K, N], got shape {attn_logits.shape}")
    K = attn_logits.shape[1]
    if K == 1:
        return jnp.zeros((), jnp.float32)
    p = masked_softmax(attn_logits, mask)
    unit = p / jnp.maximum(jnp.linalg.norm(p, axis=-1, keepdims=True), eps)
    cos = jnp.einsum("bin,bjn->bij", unit, unit)
    upper = jnp.triu(jnp.ones((K, K), bool), k=1)
    return jnp.sum(jnp.where(upper, cos, 0.0), axis=(1, 2)).mean() / (K * (K - 1) / 2)


def acmil_loss(branch_logits, slide_logits, labels, attn_logits, mask=None):
    """``CE(slide) + [K > 1] mean_j CE(branch_j) + branch_diversity``. ``branch_logits [B, K, C]``,
    ``slide_logits [B, C]``, ``labels [B]`` int, ``attn_logits [B, K, N]`` (as used, i.e. after STKIM)."""
    if branch_logits.ndim != 3 or branch_logits.shape[0] != slide_logits.shape[0]:
        raise ValueError(f"branch_logits must be [B={slide_logits.shape[0]}, K, C], got {branch_logits.shape}")
    B, K, C = branch_logits.shape
    loss = bag_cross_entropy(slide_logits, labels)
    if K > 1:
        loss = loss + bag_cross_entropy(branch_logits.reshape(B * K, C), jnp.repeat(jnp.asarray(labels), K))
    return loss + branch_diversity(attn_logits, mask)


class ACMIL(nnx.Module):
    """ACMIL_GA. ``__call__(x [B, N, F], mask [B, N] bool, *, rng=None, train=False)`` returns
    ``(branch_logits [B, K, C], slide_logits [B, C], attn_logits [B, K, N])``; ``attn_logits`` are the
    (STKIM-masked when training) raw logits, padding not yet masked. STKIM runs only when ``train`` is true,
    ``n_masked > 0`` and ``mask_drop > 0``; it then needs ``rng``. :meth:`slide_attention` gives the
    inference-time instance weights ``mean_j softmax(A_j)``."""

    def __init__(self, in_dim: int, inner_dim: int = 128, hidden: int = 128, branches: int = 5,
                 num_classes: int = 2, n_masked: int = 10, mask_drop: float = 0.6, *, rngs: nnx.Rngs):
        _check_int("in_dim", in_dim), _check_int("inner_dim", inner_dim), _check_int("branches", branches)
        _check_int("num_classes", num_classes, 2)
        self.n_masked = _check_int("n_masked", n_masked, 0)
        self.mask_drop = _check_drop(mask_drop)
        self.reduce = nnx.Linear(in_dim, inner_dim, use_bias=False, rngs=rngs)
        self.attention = GatedAttention(inner_dim, hidden, branches, rngs=rngs)
        init = nnx.initializers.lecun_normal()
        self.branch_w = nnx.Param(jax.vmap(lambda key: init(key, (inner_dim, num_classes)))(
            jax.random.split(rngs.params(), branches)))
        self.branch_b = nnx.Param(jnp.zeros((branches, num_classes)))
        self.slide_classifier = nnx.Linear(inner_dim, num_classes, rngs=rngs)

    def logits(self, x, mask=None, *, rng=None, train: bool = False):
        """``(h [B, N, L], attn_logits [B, K, N])`` with STKIM applied when training."""
        if x.ndim != 3:
            raise ValueError(f"x must be [B, N, F] instance features, got shape {x.shape}")
        h = jax.nn.relu(self.reduce(x))
        A = self.attention(h)
        if train and self.n_masked > 0 and self.mask_drop > 0:
            if rng is None:
                raise ValueError("rng must be a PRNG key when train=True and STKIM is on (n_masked > 0, "
                                 "mask_drop > 0), got None")
            A = apply_instance_mask(A, stochastic_topk_mask(A, self.n_masked, self.mask_drop, rng, mask))
        return h, A

    def __call__(self, x, mask=None, *, rng=None, train: bool = False):
        h, A = self.logits(x, mask, rng=rng, train=train)
        probs = masked_softmax(A, mask)  # [B, K, N]
        z = attention_pool(probs, h)  # [B, K, L]
        branch_logits = jnp.einsum("bkl,klc->bkc", z, self.branch_w[...]) + self.branch_b[...]
        slide = attention_pool(jnp.mean(probs, axis=1, keepdims=True), h)[:, 0]
        return branch_logits, self.slide_classifier(slide), A

    def slide_attention(self, x, mask=None):
        """Inference-time instance weights ``mean_j softmax(A_j)`` ``[B, N]`` (no STKIM)."""
        _, A = self.logits(x, mask)
        return jnp.mean(masked_softmax(A, mask), axis=1)
