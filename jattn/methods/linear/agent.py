"""P29 — Agent Attention: On the Integration of Softmax and Linear Attention.

``n`` agent tokens ``A`` (pooled queries) mediate between N queries and N keys:

    V_A = softmax(s A K^T + B1) V          (agent aggregation, [n, d])
    O   = softmax(s Q A^T + B2) V_A        (agent broadcast,   [N, d])

which is generalized linear attention with ``phi_q(Q) = softmax(s Q A^T + B2)`` and
``phi_k(K) = softmax(s A K^T + B1)^T`` at cost O(N n d) (``agent_attention_as_linear``). The module adds
the official code's agent biases (a 7x7 table resized bilinearly without antialiasing, as PyTorch's
``F.interpolate(mode="bilinear")`` does, plus row and column terms, per head and
agent) and a depthwise 3x3 convolution of V over the image grid. Layout ``[B, N, H, d]`` with the N
tokens in row-major ``h x w`` order; the class token of the official DeiT variant is not supported.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jattn.core import checks
from jattn.core.reference import reference_attention
from jattn.ops.linear import linear_attention


def _pool_matrix(size: int, out: int) -> np.ndarray:
    """Adaptive average pooling along one axis (PyTorch's bins: floor(i L / n) .. ceil((i+1) L / n))."""
    matrix = np.zeros((out, size), np.float32)
    for i in range(out):
        start, end = (i * size) // out, -((-(i + 1) * size) // out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def _check_agents_hw(x, hw, num_agents):
    checks.check_float_array("x", x, 4)
    if not (isinstance(hw, (tuple, list)) and len(hw) == 2 and all(isinstance(s, int) and s > 0 for s in hw)):
        raise TypeError(f"hw must be a pair of positive ints (h, w), got {hw!r}")
    if hw[0] * hw[1] != x.shape[1]:
        raise ValueError(f"hw={tuple(hw)} must multiply to the token count N={x.shape[1]} of x {checks.describe(x)}")
    side = math.isqrt(num_agents) if isinstance(num_agents, int) and num_agents > 0 else 0
    if side * side != num_agents:
        raise ValueError(f"num_agents must be a positive perfect square (a sqrt(n) x sqrt(n) pool), got {num_agents!r}")
    return side


def pool_agents(x, hw, num_agents: int):
    """Agent tokens: adaptive average pooling of ``x [B, N, H, d]`` (an ``h x w`` grid) to
    ``sqrt(n) x sqrt(n)``; returns ``[B, n, H, d]``."""
    side = _check_agents_hw(x, hw, num_agents)
    rows, cols = _pool_matrix(hw[0], side), _pool_matrix(hw[1], side)
    grid = x.astype(jnp.float32).reshape(x.shape[0], hw[0], hw[1], *x.shape[2:])
    pooled = jnp.einsum("ih,jw,bhwkd->bijkd", rows, cols, grid)
    return pooled.reshape(x.shape[0], num_agents, *x.shape[2:]).astype(x.dtype)


def _check_agent_args(q, k, v, agents, bias_ak, bias_qa):
    checks.check_qkv(q, k, v)
    checks.check_float_array("agents", agents, 4)
    B, N, H, D = q.shape
    if k.shape[2] != H:
        raise ValueError(f"agent attention needs as many k/v heads as q heads H={H}, got k {checks.describe(k)}")
    if agents.shape[0] != B or agents.shape[2:] != (H, D):
        raise ValueError(f"agents must have shape [B, n, H, D] = {(B, 'n', H, D)}, got {checks.describe(agents)}")
    n, S = agents.shape[1], k.shape[1]
    if bias_ak is not None:
        checks.check_broadcastable("bias_ak", bias_ak, (B, H, n, S), dtype_kind="float")
    if bias_qa is not None:
        checks.check_broadcastable("bias_qa", bias_qa, (B, H, N, n), dtype_kind="float")


def agent_attention(q, k, v, agents, *, bias_ak=None, bias_qa=None, scale=None, return_probs: bool = False):
    """Agent attention; ``q [B, N, H, d]``, ``k, v [B, S, H, d]``, ``agents [B, n, H, d]``; biases
    broadcastable to ``[B, H, n, S]`` (aggregation) and ``[B, H, N, n]`` (broadcast). Returns ``out``
    (q's dtype) and, when asked, the two probability maps ``(P2 [B, H, N, n], P1 [B, H, n, S])``."""
    _check_agent_args(q, k, v, agents, bias_ak, bias_qa)
    scale = q.shape[-1] ** -0.5 if scale is None else checks.check_positive_float("scale", scale)
    agent_values, p1 = reference_attention(agents, k, v, bias=bias_ak, scale=scale, return_probs=True)
    out, p2 = reference_attention(q, agents, agent_values.astype(jnp.float32), bias=bias_qa, scale=scale,
                                  return_probs=True)
    out = out.astype(q.dtype)
    return (out, (p2, p1)) if return_probs else out


def agent_attention_as_linear(q, k, v, agents, *, bias_ak=None, bias_qa=None, scale=None):
    """The same output through ``linear_attention(phi_q(Q), phi_k(K), V, causal=False)``."""
    _, (p2, p1) = agent_attention(q, k, v, agents, bias_ak=bias_ak, bias_qa=bias_qa, scale=scale,
                                  return_probs=True)
    phi_q = jnp.transpose(p2, (0, 2, 1, 3))  # [B, N, H, n]
    phi_k = jnp.transpose(p1, (0, 3, 1, 2))  # [B, S, H, n]
    return linear_attention(phi_q, phi_k, v.astype(jnp.float32), causal=False, impl="xla").astype(q.dtype)


def depthwise_conv2d(x, kernel, bias, hw):
    """Depthwise 'same' convolution of tokens ``x [B, N, C]`` laid out on ``hw``; kernel ``[kh, kw, C]``."""
    B, N, C = x.shape
    grid = x.reshape(B, hw[0], hw[1], C)
    out = jax.lax.conv_general_dilated(grid, kernel[:, :, None, :], (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=C)
    return (out + bias).reshape(B, N, C)


class AgentAttention(nnx.Module):
    """Agent attention over an ``h x w`` token grid ``x [B, h*w, dim]`` (the official DeiT/PVT block)."""

    def __init__(self, dim: int, num_heads: int, agent_num: int, window: int | tuple[int, int], *,
                 bias_table: int = 7, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be a multiple of num_heads={num_heads}")
        self.hw = tuple(window) if isinstance(window, (tuple, list)) else (window, window)
        self.num_heads, self.agent_num, self.bias_table = num_heads, agent_num, bias_table
        self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
        self.proj = nnx.Linear(dim, dim, rngs=rngs)
        init = nnx.initializers.truncated_normal(0.02)
        H, n, (h, w) = num_heads, agent_num, self.hw
        key = rngs.params

        def param(*shape):
            return nnx.Param(init(key(), shape, jnp.float32))

        self.an_bias, self.na_bias = param(H, n, bias_table, bias_table), param(H, n, bias_table, bias_table)
        self.ah_bias, self.aw_bias = param(H, n, h, 1), param(H, n, 1, w)
        self.ha_bias, self.wa_bias = param(H, h, 1, n), param(H, 1, w, n)
        self.dwc_kernel = nnx.Param(nnx.initializers.lecun_normal()(key(), (3, 3, dim), jnp.float32))
        self.dwc_bias = nnx.Param(jnp.zeros((dim,), jnp.float32))

    def biases(self):
        """``(B1 [1, H, n, N], B2 [1, H, N, n])``: resized tables plus row/column terms."""
        (h, w), H, n = self.hw, self.num_heads, self.agent_num
        # antialias=False: PyTorch's F.interpolate(mode="bilinear") (the official resize) never low-pass
        # filters, so shrinking the 7x7 table (e.g. to a 6x6 window) must sample it, not blur it.
        table = jax.image.resize(self.an_bias[...], (H, n, h, w), "bilinear", antialias=False)
        b1 = (table + self.ah_bias[...] + self.aw_bias[...]).reshape(1, H, n, h * w)
        table = jax.image.resize(self.na_bias[...], (H, n, h, w), "bilinear", antialias=False)
        b2 = (jnp.transpose(table, (0, 2, 3, 1)) + self.ha_bias[...] + self.wa_bias[...])
        return b1, b2.reshape(H, h * w, n)[None]

    def __call__(self, x):
        B, N, dim = x.shape
        if N != self.hw[0] * self.hw[1]:
            raise ValueError(f"x must have N = h*w = {self.hw[0] * self.hw[1]} tokens, got {checks.describe(x)}")
        heads = (B, N, self.num_heads, dim // self.num_heads)
        q, k, v = (t.reshape(heads) for t in jnp.split(self.qkv(x), 3, axis=-1))
        agents = pool_agents(q, self.hw, self.agent_num)
        b1, b2 = self.biases()
        out = agent_attention(q, k, v, agents, bias_ak=b1, bias_qa=b2).reshape(B, N, dim)
        out = out + depthwise_conv2d(v.reshape(B, N, dim), self.dwc_kernel[...], self.dwc_bias[...], self.hw)
        return self.proj(out)
