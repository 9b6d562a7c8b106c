"""Data that needs no download: a byte-level corpus of the Python standard library's own source files.

Every batch is a pure function of ``(seed, step)``, so a resumed run sees exactly the batches the
uninterrupted run would have seen.
"""
from __future__ import annotations

import functools
import glob
import os
import sysconfig

import numpy as np


def batch_rng(seed: int, step: int, stream: int = 0) -> np.random.Generator:
    """The generator for one batch: independent of every other (seed, step, stream)."""
    return np.random.default_rng([int(seed), int(step), int(stream)])


@functools.lru_cache(maxsize=4)
def stdlib_corpus(max_bytes: int = 2_000_000) -> np.ndarray:
    """The first ``max_bytes`` bytes of the stdlib's top-level ``*.py`` files (sorted by name) as uint8."""
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1024:
        raise ValueError(f"max_bytes must be an int >= 1024, got {max_bytes!r}")
    root = sysconfig.get_paths()["stdlib"]
    chunks, total = [], 0
    for path in sorted(glob.glob(os.path.join(root, "*.py"))):
        with open(path, "rb") as f:
            data = f.read()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    corpus = np.frombuffer(b"".join(chunks)[:max_bytes], dtype=np.uint8)
    if corpus.size < 1024:
        raise RuntimeError(f"found only {corpus.size} bytes of Python source under {root}")
    return corpus


class ByteCorpus:
    """Next-byte prediction on a uint8 corpus: the last ``eval_fraction`` is held out for eval."""

    vocab_size = 256

    def __init__(self, seq_len: int, *, max_bytes: int = 2_000_000, eval_fraction: float = 0.1,
                 corpus: np.ndarray | None = None):
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}")
        data = stdlib_corpus(max_bytes) if corpus is None else np.asarray(corpus, np.uint8)
        split = int(len(data) * (1 - eval_fraction))
        self.splits = {"train": data[:split], "eval": data[split:]}
        for name, part in self.splits.items():
            if len(part) <= seq_len + 1:
                raise ValueError(f"the {name} split has {len(part)} bytes, too few for seq_len={seq_len}")
        self.seq_len = seq_len

    def batch(self, seed: int, step: int, batch_size: int, split: str = "train") -> dict[str, np.ndarray]:
        """``inputs``/``targets`` int32 ``[batch, seq_len]`` (targets = inputs shifted by one), ``loss_mask``."""
        if split not in self.splits:
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        data = self.splits[split]
        rng = batch_rng(seed, step, stream=0 if split == "train" else 1)
        starts = rng.integers(0, len(data) - self.seq_len - 1, size=batch_size)
        windows = np.stack([data[s:s + self.seq_len + 1] for s in starts]).astype(np.int32)
        return {"inputs": windows[:, :-1], "targets": windows[:, 1:],
                "loss_mask": np.ones((batch_size, self.seq_len), np.float32)}
