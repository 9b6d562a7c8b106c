"""Draws the BlockMask pictures of the docs into docs/img/ with ``jattn.plot_mask``.

Run from the repository root after changing a builder or the plotting code, and commit the PNGs:

    .venv/bin/python docs/make_figures.py

The pictures are small (64 x 64 positions, low dpi) so the committed files stay a few tens of KB.
Nothing here is needed to build the site: ``make docs`` only embeds the committed files.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import jattn  # noqa: E402
from jattn import BlockMask, masks  # noqa: E402
from jattn.patterns import PATTERNS  # noqa: E402

OUT = ROOT / "docs" / "img"
DPI = 56
T = 64        # positions a side
BLOCK = 16    # tile edge


def figures():
    """``(file stem, title, plot_mask keyword arguments)`` for every picture."""
    nq = T // BLOCK
    window = masks.sliding_window_mask(20)
    yield "from_mask_fn_sliding_window", "from_mask_fn(sliding_window_mask(20))", dict(
        mask=BlockMask.from_mask_fn(window, 1, 1, T, T, BLOCK, BLOCK))
    yield "from_mask_fn_causal", "from_mask_fn(causal_mask())", dict(
        mask=BlockMask.from_mask_fn(masks.causal_mask(), 1, 1, T, T, BLOCK, BLOCK))
    docs = masks.document_mask(np.repeat(np.arange(3), [24, 16, 24])[None])
    yield "from_mask_fn_documents", "from_mask_fn(document_mask(ids)), 3 documents", dict(
        mask=BlockMask.from_mask_fn(docs, 1, 1, T, T, BLOCK, BLOCK))
    yield "from_mask_fn_tail", "from_mask_fn(causal_mask()), T=56 (tail tiles are partial)", dict(
        mask=BlockMask.from_mask_fn(masks.causal_mask(), 1, 1, 56, 56, BLOCK, BLOCK))
    block_map = np.eye(nq, dtype=bool) | (np.arange(nq)[None, :] == 0)
    full_map = np.eye(nq, dtype=bool)
    yield "from_dense_block_map", "from_dense_block_map(diagonal + first column, full_map=diagonal)", dict(
        mask=BlockMask.from_dense_block_map(block_map[None, None], full_map=full_map[None, None],
                                            partial_tiles="visible", block_q=BLOCK, block_k=BLOCK,
                                            seq_q=T, seq_k=T))
    topk = np.array([[0, -1], [0, 1], [2, 0], [3, 1]], np.int32)[None, None]
    yield "from_topk_indices", "from_topk_indices(2 kv blocks per q block)", dict(
        mask=BlockMask.from_topk_indices(topk, block_q=BLOCK, block_k=BLOCK, seq_q=T, seq_k=T))
    vertical = np.array([[[0, 37]]], np.int32)
    slash = np.array([[[0, 24]]], np.int32)
    vs = BlockMask.from_vertical_slash(vertical, slash, block_q=BLOCK, block_k=BLOCK, seq_q=T, seq_k=T,
                                       causal=True)

    def lines(b, h, q_idx, kv_idx):  # the exact columns and diagonals, applied inside the tiles
        on_line = (kv_idx == 0) | (kv_idx == 37) | (q_idx - kv_idx == 0) | (q_idx - kv_idx == 24)
        return on_line & (kv_idx <= q_idx)
    yield "from_vertical_slash", "from_vertical_slash(columns 0, 37; diagonals 0, 24) + mask_fn", dict(
        mask=vs, mask_fn=lines)
    for name, head in (("radial", 0), ("s2", 1), ("moa", 3)):
        mask, mask_fn = PATTERNS[name].build()
        yield f"pattern_{name}", f"jattn show-mask {name}" + (f" --head {head}" if head else ""), dict(
            mask=mask, mask_fn=mask_fn, head=head)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for stem, title, kwargs in figures():
        fig = jattn.plot_mask(title=title, **kwargs)
        path = OUT / f"{stem}.png"
        fig.savefig(path, dpi=DPI)
        print(f"{path.relative_to(ROOT)}  {path.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
