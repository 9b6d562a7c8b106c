"""P20 — LinFusion: 1 GPU, 1 Minute, 16K Image (generalized linear attention for diffusion UNets).

Non-causal, normalised linear attention over N tokens, with sums taken as means so the normalisation
does not depend on resolution:

    out_i = [phi(q_i) . (sum_j phi(k_j) v_j^T / N)] / [phi(q_i) . (sum_j phi(k_j) / N) + eps]

``phi = elu + 1`` by default. Numerator and denominator come from one non-causal ``linear_attention``
pass over ``[v, 1]``. The module follows ``GeneralizedLinearAttention``: ``q = W_q(x + f_q(x))``,
``k = W_k(x + f_k(x))``, ``v = W_v x`` with ``f = Linear -> LayerNorm -> LeakyReLU -> Linear``, then W_out.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.core import checks
from jattn.ops.linear import linear_attention

# The feature maps phi of the linear family, by name (one table: LinFusion and Attention(method="lightning")).
FEATURE_MAPS = {
    "silu": jax.nn.silu,                                  # TransNormerLLM's phi
    "elu1": lambda x: jax.nn.elu(x) + 1.0,
    "relu": jax.nn.relu,
    "identity": lambda x: x,
}


def get_feature_map(name: str):
    """The registered feature map ``name`` (``FEATURE_MAPS``)."""
    checks.check_choice("feature_map", name, tuple(FEATURE_MAPS))
    return FEATURE_MAPS[name]


def generalized_linear_attention(q, k, v, *, eps: float = 1e-4, feature_map: str = "elu1"):
    """LinFusion's normalised non-causal linear attention; ``q, k [B, N, H, d]``, ``v [B, N, H, e]``."""
    checks.check_float_array("q", q, 4)
    checks.check_float_array("k", k, 4)
    checks.check_float_array("v", v, 4)
    if q.shape != k.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"expected q, k [B, N, H, d] and v [B, N, H, e]; got q {checks.describe(q)}, "
                         f"k {checks.describe(k)}, v {checks.describe(v)}")
    checks.check_positive_float("eps", eps, allow_none=False)
    phi = get_feature_map(feature_map)
    phi_q, phi_k = phi(q.astype(jnp.float32)), phi(k.astype(jnp.float32))
    v_and_one = jnp.concatenate([v.astype(jnp.float32), jnp.ones(v.shape[:3] + (1,), jnp.float32)], axis=-1)
    both = linear_attention(phi_q, phi_k, v_and_one, causal=False, scale=1.0 / q.shape[1], impl="xla")
    return (both[..., :-1] / (both[..., -1:] + eps)).astype(q.dtype)


class FeatureMLP(nnx.Module):
    """``Linear(D -> m) -> LayerNorm -> LeakyReLU -> Linear(m -> D)``, added to x before W_q / W_k."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(dim, hidden, rngs=rngs)
        self.norm = nnx.LayerNorm(hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, dim, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.leaky_relu(self.norm(self.fc1(x))))


class LinFusionAttention(nnx.Module):
    """Replaces a softmax self-attention ``x [B, N, dim]``; ``load_softmax_weights`` copies W_q, W_k,
    W_v, W_out from the attention it replaces (the f_q, f_k branches are what distillation trains)."""

    def __init__(self, dim: int, num_heads: int, *, hidden: int | None = None, eps: float = 1e-4,
                 feature_map: str = "elu1", rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be a multiple of num_heads={num_heads}")
        self.num_heads, self.eps, self.feature_map = num_heads, eps, feature_map
        self.wq = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
        self.wk = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
        self.wv = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
        self.out = nnx.Linear(dim, dim, rngs=rngs)
        self.phi_q = FeatureMLP(dim, hidden or dim, rngs=rngs)
        self.phi_k = FeatureMLP(dim, hidden or dim, rngs=rngs)

    def load_softmax_weights(self, wq, wk, wv, wo, bo=None):
        """Copies ``[dim, dim]`` (in, out) projection matrices from a softmax attention layer."""
        for layer, weight in ((self.wq, wq), (self.wk, wk), (self.wv, wv), (self.out, wo)):
            if tuple(weight.shape) != tuple(layer.kernel.shape):
                raise ValueError(f"weight must have shape {tuple(layer.kernel.shape)}, got {checks.describe(weight)}")
            layer.kernel[...] = jnp.asarray(weight, layer.kernel.dtype)
        if bo is not None:
            self.out.bias[...] = jnp.asarray(bo, self.out.bias.dtype)

    def __call__(self, x):
        B, N, dim = x.shape
        heads = (B, N, self.num_heads, dim // self.num_heads)
        q = self.wq(x + self.phi_q(x)).reshape(heads)
        k = self.wk(x + self.phi_k(x)).reshape(heads)
        v = self.wv(x).reshape(heads)
        out = generalized_linear_attention(q, k, v, eps=self.eps, feature_map=self.feature_map)
        return self.out(out.reshape(B, N, dim))
