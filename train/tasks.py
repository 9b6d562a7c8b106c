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

    Keys come from ``[2, 2 + key_vocab)`` and values from the rest of the vocabulary; only the value
    after each query key is scored, so chance accuracy is ``1 / value_vocab``."""

    def __init__(self, num_pairs: int = 8, num_queries: int | None = None, vocab_size: int = 64):
        self.num_pairs = _positive("num_pairs", num_pairs)
        self.num_queries = _positive("num_queries", num_pairs if num_queries is None else num_queries)
        self.vocab_size = _positive("vocab_size", vocab_size, 8)
        self.key_vocab = (vocab_size - 2) // 2
        if self.num_pairs > self.key_vocab:
            raise ValueError(f"num_pairs={num_pairs} needs vocab_size >= {2 * num_pairs + 2}, got {vocab_size}")
        self.seq_len = 2 * (self.num_pairs + self.num_queries) - 1

    def batch(self, seed: int, step: int, batch_size: int, split: str = "train"):
        rng = batch_rng(seed, step, stream=10 if split == "train" else 11)
        value_vocab = self.vocab_size - 2 - self.key_vocab
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


class NeedleInHaystack:
    """A ``marker key value`` needle at a random depth in random filler; the sequence ends with
    ``marker key`` and the model must produce ``value`` (the last target is the only one scored)."""

    MARKER = 1

    def __init__(self, seq_len: int = 64, vocab_size: int = 64):
        self.seq_len = _positive("seq_len", seq_len, 8)
        self.vocab_size = _positive("vocab_size", vocab_size, 8)

    def batch(self, seed: int, step: int, batch_size: int, split: str = "train"):
        rng = batch_rng(seed, step, stream=20 if split == "train" else 21)
        L = self.seq_len + 1
        sequences = rng.integers(2, self.vocab_size, size=(batch_size, L))
        depth = rng.integers(0, L - 6, size=batch_size)
        key_value = rng.integers(2, self.vocab_size, size=(batch_size, 2))
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
