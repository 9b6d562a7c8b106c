"""Synthetic tasks of attention research: MQAR, needle-in-a-haystack, copying, in-context regression (P62).

Token tasks return next-token batches ``inputs, targets [B, L]`` (int32, ``targets[t]`` is the token
after ``inputs[t]``) and ``loss_mask [B, L]`` marking the positions that are scored. Each batch is a pure
function of ``(seed, step)``.
"""
from __future__ import annotations

import numpy as np

from train.data import batch_rng


def _positive(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _next_token(sequences: np.ndarray, scored: np.ndarray) -> dict[str, np.ndarray]:
    """Shifts full sequences into (inputs, targets); ``scored[b, t]`` marks target tokens ``sequences[b, t]``."""
    return {"inputs": sequences[:, :-1].astype(np.int32), "targets": sequences[:, 1:].astype(np.int32),
            "loss_mask": scored[:, 1:].astype(np.float32)}


class MQAR:
    """Multi-query associative recall (Zoology): ``k1 v1 ... kN vN`` then queries ``q v(q)``.

    Keys come from ``[2, 2 + key_vocab)`` (distinct within a sequence) and values, drawn independently
    with replacement, from the ``value_vocab`` tokens after them; each query asks for a uniformly random
    one of the ``N`` pairs. Only the value after each query key is scored.

    Floors and ceilings of the scored accuracy (all exact; see the functions below):

    * ``1 / value_vocab``: guessing a value token blindly. No trained model sits here.
    * the **copy plateau**, :func:`mqar_copy_plateau`: a model that has learned to copy *some* value
      from the context but not which one (it ignores the query key) and picks one of the ``N`` context
      values at random scores ``1/N + (1 - 1/N) / value_vocab`` (0.30 for 4 pairs and 15 values).
      Training typically stalls here first; accuracy near it means the key-value binding was not learned.
    * the **one-hop ceiling** of an attention pattern, :func:`mqar_one_hop_ceiling`: what a model that
      retrieves perfectly whatever its mask lets a query read directly can reach (1.0 for full causal
      attention, less for a sliding window). Models that relay pairs across layers can beat it.
    """

    def __init__(self, num_pairs: int = 8, num_queries: int | None = None, vocab_size: int = 64):
        self.num_pairs = _positive("num_pairs", num_pairs)
        self.num_queries = _positive("num_queries", num_pairs if num_queries is None else num_queries)
        self.vocab_size = _positive("vocab_size", vocab_size, 8)
        self.key_vocab = (vocab_size - 2) // 2
        if self.num_pairs > self.key_vocab:
            raise ValueError(f"num_pairs={num_pairs} needs vocab_size >= {2 * num_pairs + 2}, got {vocab_size}")
        self.seq_len = 2 * (self.num_pairs + self.num_queries) - 1

    @property
    def value_vocab(self) -> int:
        """How many distinct value tokens there are (``vocab_size - 2 - key_vocab``)."""
        return self.vocab_size - 2 - self.key_vocab

    def layout(self) -> dict[str, np.ndarray]:
        """Where things sit in the model's input (positions ``0 .. seq_len - 1``).

        ``context_values[i]``: the value of pair ``i`` (its key is one position earlier);
        ``queries[j]``: the query key ``j``, the position whose prediction is scored;
        ``answers[j]``: the value that answers query ``j`` (teacher forcing puts every answer but the last
        in the input too; the last, at ``seq_len``, is only a target)."""
        N, Q = self.num_pairs, self.num_queries
        return {"context_values": 2 * np.arange(N) + 1, "queries": 2 * N + 2 * np.arange(Q),
                "answers": 2 * N + 2 * np.arange(Q) + 1}

    def batch(self, seed: int, step: int, batch_size: int, split: str = "train"):
        rng = batch_rng(seed, step, stream=10 if split == "train" else 11)
        value_vocab = self.value_vocab
        keys = np.stack([rng.permutation(self.key_vocab)[:self.num_pairs] for _ in range(batch_size)]) + 2
        values = rng.integers(0, value_vocab, size=(batch_size, self.num_pairs)) + 2 + self.key_vocab
        which = rng.integers(0, self.num_pairs, size=(batch_size, self.num_queries))
        rows = np.arange(batch_size)[:, None]
        context = np.stack([keys, values], axis=-1).reshape(batch_size, -1)
        queries = np.stack([keys[rows, which], values[rows, which]], axis=-1).reshape(batch_size, -1)
        sequences = np.concatenate([context, queries], axis=1)
        scored = np.zeros_like(sequences, bool)
        scored[:, 2 * self.num_pairs + 1::2] = True
        return _next_token(sequences, scored)


def mqar_copy_plateau(num_pairs: int, value_vocab: int) -> float:
    """Accuracy of the key-blind copier: it answers every query with a uniformly random one of the
    ``num_pairs`` context values. It is right when it picks the queried pair (``1/N``) or another pair
    that happens to hold the same value (``(1 - 1/N) / value_vocab``, values being drawn independently)."""
    N, V = _positive("num_pairs", num_pairs), _positive("value_vocab", value_vocab)
    return 1.0 / N + (1.0 - 1.0 / N) / V


def _visible(mask_fn, q_idx: int, kv_idx: int) -> bool:
    """Causal and allowed by ``mask_fn(b, h, q_idx, kv_idx)`` (batch and head 0)."""
    return kv_idx <= q_idx and bool(np.asarray(mask_fn(0, 0, q_idx, kv_idx)))


def mqar_one_hop_reach(task: MQAR, mask_fn) -> float:
    """Expected fraction of scored queries whose key-value pair one attention hop can read.

    A causal model retrieves the answer to the query at position ``t`` in one hop when ``t`` attends
    directly to a position ``p`` holding the queried pair's value, and ``p`` attends to the key just
    before it (``p - 1``, the binding an earlier layer writes into ``p``). ``p`` is the pair's place in
    the context or, because answers are in the input under teacher forcing, the answer to an earlier
    query for the same pair. ``mask_fn(b, h, q_idx, kv_idx) -> bool`` is the attention pattern (a
    ``jattn.core.masks`` function), intersected with causality. The expectation is exact: query ``j``
    asks for pair ``i`` with probability ``1/N`` independently of the others, so with ``m_j`` earlier
    answers readable from it, ``P(j reachable) = mean_i [1 - (1 - seen_i) (1 - 1/N)^m_j]`` where
    ``seen_i`` says whether pair ``i``'s context value is readable.

    Relaying through intermediate positions (two hops or more across layers) is not counted: this is
    the ceiling of direct retrieval, not a bound for a deep model. 2-layer sliding-window models trained
    long enough do exceed it on MQAR (docs/experiments.md)."""
    if not isinstance(task, MQAR):
        raise TypeError(f"task must be an MQAR, got {type(task).__name__}")
    if not callable(mask_fn):
        raise TypeError(f"mask_fn must be a mask function (b, h, q_idx, kv_idx) -> bool, got {mask_fn!r}")
    where = task.layout()
    N = task.num_pairs

    def readable(t, p):
        return _visible(mask_fn, t, p) and _visible(mask_fn, p, p - 1)

    reach = []
    for j, t in enumerate(where["queries"]):
        seen = np.array([readable(t, p) for p in where["context_values"]], dtype=np.float64)
        m = sum(readable(t, p) for p in where["answers"][:j])
        reach.append(np.mean(1.0 - (1.0 - seen) * (1.0 - 1.0 / N) ** m))
    return float(np.mean(reach))


def mqar_one_hop_ceiling(task: MQAR, mask_fn) -> float:
    """The MQAR accuracy ceiling of one-hop retrieval under ``mask_fn``: ``r + (1 - r) / value_vocab``
    with ``r`` = :func:`mqar_one_hop_reach`. A reachable query can be answered exactly; for an
    unreachable one every value is equally likely (values are independent of everything the model can
    read), so the best a model can do is a ``1 / value_vocab`` guess."""
    reach = mqar_one_hop_reach(task, mask_fn)
    return reach + (1.0 - reach) / task.value_vocab


class NeedleInHaystack:
    """A ``marker key value`` needle at a random depth in random filler; the sequence ends with
    ``marker key`` and the model must produce ``value`` (the last target is the only one scored).

    ``needle_vocab = 0``: key, value and filler all come from ``[2, vocab_size)``, so the key also occurs in
    the filler and only the marker before it marks the needle. ``needle_vocab = n > 0``: key and value come
    from the last ``n`` ids, the filler from the others, as in passkey retrieval (a distinct needle in
    repeated filler text); the key then occurs only in the needle and the query."""

    MARKER = 1

    def __init__(self, seq_len: int = 64, vocab_size: int = 64, needle_vocab: int = 0):
        self.seq_len = _positive("seq_len", seq_len, 8)
        self.vocab_size = _positive("vocab_size", vocab_size, 8)
        self.needle_vocab = _positive("needle_vocab", needle_vocab, 0)
        if self.needle_vocab and not 2 <= self.needle_vocab <= self.vocab_size - 4:
            raise ValueError(f"needle_vocab must be 0 or in [2, vocab_size - 4 = {self.vocab_size - 4}] (filler "
                             f"needs ids of its own), got {needle_vocab}")

    def ranges(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """``(filler, needle)`` id ranges ``[low, high)``."""
        if not self.needle_vocab:
            return (2, self.vocab_size), (2, self.vocab_size)
        split = self.vocab_size - self.needle_vocab
        return (2, split), (split, self.vocab_size)

    def batch(self, seed: int, step: int, batch_size: int, split: str = "train"):
        rng = batch_rng(seed, step, stream=20 if split == "train" else 21)
        L = self.seq_len + 1
        filler, needle = self.ranges()
        sequences = rng.integers(*filler, size=(batch_size, L))
        depth = rng.integers(0, L - 6, size=batch_size)
        key_value = rng.integers(*needle, size=(batch_size, 2))
        rows = np.arange(batch_size)
        for offset, column in ((0, None), (1, 0), (2, 1)):
            sequences[rows, depth + offset] = self.MARKER if column is None else key_value[:, column]
        sequences[:, -3], sequences[:, -2], sequences[:, -1] = self.MARKER, key_value[:, 0], key_value[:, 1]
        scored = np.zeros_like(sequences, bool)
        scored[:, -1] = True
        return _next_token(sequences, scored)


class Copying:
    """``x_1 .. x_n SEP x_1 .. x_n``: the copy after the separator (token 1) is scored."""

    SEP = 1

    def __init__(self, length: int = 16, vocab_size: int = 32):
        self.length = _positive("length", length)
        self.vocab_size = _positive("vocab_size", vocab_size, 4)
        self.seq_len = 2 * self.length

    def batch(self, seed: int, step: int, batch_size: int, split: str = "train"):
        rng = batch_rng(seed, step, stream=30 if split == "train" else 31)
        content = rng.integers(2, self.vocab_size, size=(batch_size, self.length))
        sequences = np.concatenate([content, np.full((batch_size, 1), self.SEP), content], axis=1)
        scored = np.zeros_like(sequences, bool)
        scored[:, self.length + 1:] = True
        return _next_token(sequences, scored)


class ICLRegression:
    """In-context linear regression (P62): ``x ~ N(0, I_d)``, ``beta ~ N(0, I_d / d)``,
    ``y = beta . x + noise * eps``. ``tokens [B, n + 1, d + 1]`` are ``[x_l; y_l]`` for the ``n`` context
    pairs and ``[x_q; 0]`` last; ``target [B]`` is ``y_q`` (noise-free)."""

    def __init__(self, dim: int = 5, num_context: int = 20, noise: float = 0.0):
        self.dim = _positive("dim", dim)
        self.num_context = _positive("num_context", num_context)
        if not (isinstance(noise, (int, float)) and noise >= 0):
            raise ValueError(f"noise must be a float >= 0, got {noise!r}")
        self.noise = float(noise)

    def batch(self, seed: int, step: int, batch_size: int, split: str = "train", num_context: int | None = None):
        n = self.num_context if num_context is None else _positive("num_context", num_context)
        rng = batch_rng(seed, step, stream=40 if split == "train" else 41)
        d = self.dim
        x = rng.standard_normal((batch_size, n + 1, d))
        beta = rng.standard_normal((batch_size, d)) / np.sqrt(d)
        y = np.einsum("bld,bd->bl", x, beta)
        y_context = y[:, :n] + self.noise * rng.standard_normal((batch_size, n))
        tokens = np.concatenate([x, np.concatenate([y_context, np.zeros((batch_size, 1))], 1)[..., None]], -1)
        return {"tokens": tokens.astype(np.float32), "target": y[:, n].astype(np.float32),
                "beta": beta.astype(np.float32)}
