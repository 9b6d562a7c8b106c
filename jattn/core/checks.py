"""Argument validation shared by every public entry point.

Every check runs on static shapes and dtypes at trace time, before any kernel is built, and raises a
``ValueError`` or ``TypeError`` that names the argument, what arrived and what was expected.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

IMPLS = ("auto", "pallas", "xla", "reference")


def describe(x: Any) -> str:
    """A short description of an argument for error messages: shape and dtype for arrays."""
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"array of shape {tuple(x.shape)} and dtype {jnp.dtype(x.dtype).name}"
    return repr(x)


def check_float_array(name: str, x: Any, ndim: int | None = None) -> None:
    """`x` must be a floating-point array (of rank `ndim` when given)."""
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise TypeError(f"{name} must be a JAX or NumPy array, got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype (float32, bfloat16, float16), got {describe(x)}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have rank {ndim}, got {describe(x)}")


def check_qkv(q, k, v, *, same_value_dim: bool = True) -> tuple[int, int, int, int, int, int]:
    """Validates `q [B, T, H, D]`, `k, v [B, S, Hkv, D]`; returns (B, T, S, H, Hkv, D)."""
    check_float_array("q", q, 4)
    check_float_array("k", k, 4)
    check_float_array("v", v, 4)
    B, T, H, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q has B={B}, k has {k.shape[0]}, v has {v.shape[0]}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must share [B, S, Hkv], got k {describe(k)} and v {describe(v)}")
    if k.shape[3] != D:
        raise ValueError(f"k must have head dim D={D} like q, got {describe(k)}")
    if same_value_dim and v.shape[3] != D:
        raise ValueError(f"v must have head dim D={D} like q, got {describe(v)}")
    if T == 0 or k.shape[1] == 0:
        raise ValueError(f"sequence lengths must be positive, got q {describe(q)} and k {describe(k)}")
    Hkv = k.shape[2]
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"q heads H={H} must be a multiple of k/v heads Hkv={Hkv} (GQA/MQA)")
    return B, T, k.shape[1], H, Hkv, D


def check_broadcastable(name: str, x, target: Sequence[int], *, dtype_kind: str) -> None:
    """`x` must be rank <= len(target) with each (right-aligned) dim equal to 1 or to the target's."""
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if dtype_kind == "bool" and x.dtype != jnp.bool_:
        raise TypeError(f"{name} must be a bool array (True = attend), got {describe(x)}")
    if dtype_kind == "float" and not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating array, got {describe(x)}")
    names = "BHTS"[-len(target):] if len(target) == 4 else None
    ok = x.ndim <= len(target) and all(
        d == 1 or d == t for d, t in zip(x.shape[::-1], tuple(target)[::-1]))
    if not ok:
        want = f"[{', '.join(names)}] = {tuple(target)}" if names else str(tuple(target))
        raise ValueError(f"{name} must be broadcastable to {want} (each dim 1 or equal), got {describe(x)}")


def check_window(window) -> tuple[int, int] | None:
    """`window` is None, a pair of non-negative ints ``(left, right)`` or one int ``n`` meaning ``(n, n)``.

    The one window convention of jattn: query ``i`` sees keys ``i - left <= j <= i + right``, so ``left``
    and ``right`` count the keys on each side of the query, the query's own key not included (it is always
    in the window). An int is symmetric, as ``jax.nn.dot_product_attention(local_window_size=n)``; with
    ``causal=True`` it is the same as ``(n, 0)``: the query and the ``n`` keys before it.
    """
    if window is None:
        return None
    if isinstance(window, (int, np.integer)) and not isinstance(window, bool):
        window = (int(window), int(window))
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(isinstance(w, (int, np.integer)) and not isinstance(w, bool) for w in window)):
        raise TypeError(f"window must be an int n (meaning (n, n)) or a pair of ints (left, right), got {window!r}")
    left, right = int(window[0]), int(window[1])
    if left < 0 or right < 0:
        raise ValueError(f"window sizes must be >= 0, got window={window!r}")
    return left, right


def check_segment_ids(segment_ids, B: int, T: int, S: int):
    """Returns (q_segment_ids [B, T], kv_segment_ids [B, S]) or None."""
    if segment_ids is None:
        return None
    if isinstance(segment_ids, (tuple, list)):
        if len(segment_ids) != 2:
            raise ValueError(f"segment_ids must be one array [B, T] or a pair (q ids, kv ids), got {len(segment_ids)} items")
        q_ids, kv_ids = segment_ids
    else:
        if T != S:
            raise ValueError(f"a single segment_ids array needs T == S, got T={T}, S={S}; pass a pair (q ids, kv ids)")
        q_ids = kv_ids = segment_ids
    for name, ids, length in (("segment_ids (q)", q_ids, T), ("segment_ids (kv)", kv_ids, S)):
        if not hasattr(ids, "dtype") or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise TypeError(f"{name} must be an integer array, got {describe(ids)}")
        if tuple(ids.shape) != (B, length):
            raise ValueError(f"{name} must have shape {(B, length)}, got {describe(ids)}")
    return q_ids, kv_ids


def check_positive_float(name: str, value, *, allow_none: bool = True) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a Python float, got {value!r}")
    if not math.isfinite(float(value)) or float(value) <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_sinks(sinks, H: int):
    if sinks is None:
        return None
    check_float_array("sinks", sinks, 1)
    if sinks.shape[0] != H:
        raise ValueError(f"sinks must have shape [H] = ({H},), got {describe(sinks)}")
    return sinks


def check_choice(name: str, value, allowed: Sequence) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def check_block_size(name: str, value, *, minimum: int = 8) -> int | None:
    """Block sizes are None (pick a default) or powers of two >= `minimum`, as real hardware requires."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    value = int(value)
    if value < minimum or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= {minimum}, got {value}")
    return value


def check_attention_args(q, k, v, *, bias=None, mask=None, window=None, segment_ids=None, scale=None,
                         softcap=None, sinks=None):
    """Validates every argument of the reference; returns the normalised (dims, window, segment ids, scale)."""
    B, T, S, H, Hkv, D = check_qkv(q, k, v)
    if mask is not None:
        check_broadcastable("mask", mask, (B, H, T, S), dtype_kind="bool")
    if bias is not None:
        check_broadcastable("bias", bias, (B, H, T, S), dtype_kind="float")
    window = check_window(window)
    segments = check_segment_ids(segment_ids, B, T, S)
    scale = check_positive_float("scale", scale)
    check_positive_float("softcap", softcap)
    check_sinks(sinks, H)
    return (B, T, S, H, Hkv, D), window, segments, (D ** -0.5 if scale is None else scale)


def check_int(name: str, value, minimum: int = 1) -> int:
    """A Python or NumPy int (not a bool) that is at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_grid_qkv(q, k, v, *, spatial_dims: int | None = None) -> tuple[int, ...]:
    """``q [B, *spatial, H, D]``, ``k, v [B, *spatial, Hkv, D]`` with 1 to 3 spatial axes (exactly
    ``spatial_dims`` when given); returns the spatial shape. Heads, GQA and dtypes as ``check_qkv``."""
    ranks = (4, 5, 6) if spatial_dims is None else (spatial_dims + 3,)
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_float_array(name, x)
        if x.ndim not in ranks:
            expected = "1 to 3 spatial axes (rank 4 to 6)" if spatial_dims is None else \
                f"{spatial_dims} spatial axes (rank {ranks[0]})"
            raise ValueError(f"{name} must have rank {ranks[0] if len(ranks) == 1 else '4 to 6'}: layout "
                             f"[B, *spatial, H, D] with {expected}, got {describe(x)}")
    if not (q.ndim == k.ndim == v.ndim):
        raise ValueError(f"q, k and v must have the same rank, got {describe(q)}, {describe(k)}, {describe(v)}")
    spatial = tuple(q.shape[1:-2])
    for name, x in (("k", k), ("v", v)):
        if tuple(x.shape[1:-2]) != spatial:
            raise ValueError(f"{name} must have q's spatial shape {spatial}, got {describe(x)}")
    check_qkv(*(x.reshape(x.shape[0], -1, *x.shape[-2:]) for x in (q, k, v)))
    return spatial


def check_self_attention_qkv(q, k, v, who: str) -> tuple[int, int, int, int, int]:
    """``check_qkv`` plus ``T == S`` (one sequence attends to itself); returns ``(B, T, H, Hkv, D)``."""
    B, T, S, H, Hkv, D = check_qkv(q, k, v)
    if T != S:
        raise ValueError(f"{who} is self-attention and needs T == S (q and k over the same sequence), got q "
                         f"{describe(q)} and k {describe(k)}")
    return B, T, H, Hkv, D


def check_self_attention_qk(q, k, who: str) -> tuple[int, int, int, int, int]:
    """q ``[B, T, H, D]`` and k ``[B, T, Hkv, D]`` of one sequence attending to itself, as a selector that reads
    only q and k needs them (``check_self_attention_qkv`` when v is there too); returns ``(B, T, H, Hkv, D)``."""
    check_float_array("q", q, 4)
    check_float_array("k", k, 4)
    B, T, H, D = q.shape
    if k.shape[0] != B:
        raise ValueError(f"k must have q's batch size B={B}, got {describe(k)}")
    if k.shape[3] != D:
        raise ValueError(f"k must have head dim D={D} like q, got {describe(k)}")
    if k.shape[1] != T:
        raise ValueError(f"{who} is self-attention: k must have q's length T={T}, got {describe(k)}")
    Hkv = k.shape[2]
    if T == 0 or Hkv == 0 or H % Hkv:
        raise ValueError(f"q heads H={H} must be a positive multiple of k heads Hkv={Hkv} and T={T} positive")
    return B, T, H, Hkv, D


def is_traced(value) -> bool:
    """Whether ``value`` (or any item of a tuple/list) is a JAX tracer: its values are unknown until run,
    so value checks (lengths, page tables, token ids) can only be done when this is False."""
    if isinstance(value, jax.core.Tracer):
        return True
    if isinstance(value, (tuple, list)):
        return any(is_traced(x) for x in value)
    return False


def check_static(function: str, **static) -> None:
    """Raises a ``TypeError`` when any of ``static`` (the arguments of ``jattn.<function>`` that choose the
    computation: flags, sizes, window, impl) arrived as a JAX tracer.

    That happens when the public function itself is wrapped in ``jax.jit`` and called with these as keyword
    arguments (``jax.jit(jattn.attention)(q, k, v, causal=True)``): jit traces every argument. The message
    names the traced arguments and every static one, and shows the two ways out.
    """
    traced = [name for name, value in static.items() if is_traced(value)]
    if not traced:
        return
    first = traced[0]
    raise TypeError(
        f"jattn.{function}: {', '.join(traced)} must be static (plain Python bool/int/float/str/tuple), "
        f"got a traced JAX value for {first} (the call is probably jax.jit(jattn.{function}) with {first} "
        f"passed as an argument, so jit traced it). The arguments {', '.join(static)} choose the computation "
        f"and must be static: bind them before jit, e.g. jax.jit(functools.partial(jattn.{function}, "
        f"{first}=...)), or mark them with jax.jit(jattn.{function}, static_argnames=({', '.join(repr(t) for t in traced)},)); "
        f"only arrays (q, k, v, ...) are traced.")


def causal_alias(causal, is_causal, where: str):
    """``causal``, or the deprecated ``is_causal`` spelling of it (with a ``DeprecationWarning``).

    jattn calls the flag ``causal`` in every op and layer; ``jax.nn.dot_product_attention`` and NATTEN
    say ``is_causal``, so the neighborhood ops and layers still accept that name for a while.
    """
    if is_causal is None:
        return causal
    if causal is not False and causal != is_causal:
        raise TypeError(f"{where}: got causal={causal!r} and its deprecated alias is_causal={is_causal!r}; "
                        f"pass only causal")
    import warnings
    warnings.warn(f"{where}: is_causal is deprecated, use causal= (the name of this flag in every jattn op)",
                  DeprecationWarning, stacklevel=3)
    return is_causal


def check_bool(name: str, value) -> bool:
    """A Python or NumPy bool (an int such as 1 is not one)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def check_finite_float(name: str, value) -> float:
    """A finite Python or NumPy real number (not a bool), returned as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a Python float, got {value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def check_int_tuple(name: str, value, length: int, *, minimum: int = 1, what: str = "") -> tuple[int, ...]:
    """A tuple or list of exactly ``length`` ints (not bools), each at least ``minimum``, as a tuple.

    ``what`` names the entries in the error message, e.g. ``"(h, w)"``.
    """
    if not isinstance(value, (tuple, list)) or len(value) != length:
        words = {2: "a pair", 3: "a triple"}.get(length, f"a tuple of {length}")
        raise TypeError(f"{name} must be {words} of ints >= {minimum}{' ' + what if what else ''}, got {value!r}")
    return tuple(check_int(f"{name}[{i}]", x, minimum) for i, x in enumerate(value))


def check_float_in(name: str, value, low: float, high: float, *, low_open: bool = False) -> float:
    """A real number (not a bool) in ``[low, high]`` (``(low, high]`` with ``low_open``), as a float."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be in {interval} (a real number), got {value!r}")
    x = float(value)
    if not ((low < x) if low_open else (low <= x)) or not x <= high:  # NaN fails both
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return x
