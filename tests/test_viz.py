"""plot_mask draws exactly the mask it is given; the pattern registry and ``jattn show-mask`` work."""
import time

import numpy as np
import pytest
from matplotlib.figure import Figure

from jattn.cli import main
from jattn.core import masks
from jattn.core.block_mask import BlockMask
from jattn.patterns import DENSE_LIMIT, PATTERNS, register_pattern
from jattn.viz import TILE_FULL, TILE_PARTIAL, TILE_SKIPPED, plot_mask


def image(fig: Figure, label: str) -> np.ndarray:
    """The data of the one image labelled ``label`` on the figure's only Axes."""
    (ax,) = fig.axes
    found = [im for im in ax.get_images() if im.get_label() == label]
    assert len(found) == 1, [im.get_label() for im in ax.get_images()]
    return np.ma.getdata(found[0].get_array())


def test_dense_mask_is_drawn_as_is():
    mask = np.random.default_rng(0).random((2, 3, 10, 7)) < 0.4
    fig = plot_mask(mask, batch=1, head=2, title="random")
    assert isinstance(fig, Figure)
    assert np.array_equal(image(fig, "mask"), mask[1, 2])
    assert "random" in fig.axes[0].get_title()
    assert np.array_equal(image(plot_mask(mask[0, 0]), "mask"), mask[0, 0])


def test_size_one_dims_are_shared_and_bad_indices_are_named():
    mask = np.tri(6, dtype=bool)[None]                         # [1, T, S]: shared by every head
    assert np.array_equal(image(plot_mask(mask, head=5), "mask"), mask[0])
    with pytest.raises(ValueError, match="head=3 is out of range"):
        plot_mask(np.ones((2, 4, 4), bool), head=3)
    with pytest.raises(TypeError, match="dtype bool"):
        plot_mask(np.ones((4, 4), np.int32))
    with pytest.raises(ValueError, match="seq_q"):
        plot_mask(mask_fn=masks.causal_mask())


def test_mask_fn_is_evaluated_at_the_chosen_batch_and_head():
    def head_dependent(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & ((q_idx + kv_idx + b + h) % 3 == 0)

    fig = plot_mask(mask_fn=head_dependent, seq_q=9, seq_k=12, batch=1, head=2)
    expected = np.asarray(masks.materialize(head_dependent, 2, 3, 9, 12))[1, 2]
    assert np.array_equal(image(fig, "mask"), expected)


def test_block_mask_elements_match_to_dense_mask_and_tiles_are_shaded_by_kind():
    mask_fn = masks.sliding_window_mask(16, 0)
    bm = BlockMask.from_mask_fn(mask_fn, 1, 1, 40, 40, 8, 8)
    fig = plot_mask(bm, mask_fn=mask_fn)
    assert np.array_equal(image(fig, "mask"), np.asarray(bm.to_dense_mask(mask_fn))[0, 0])
    kinds = np.asarray(bm.to_dense_block_map()[0, 0]).astype(int) + np.asarray(bm.to_dense_full_map()[0, 0])
    tiles = image(fig, "tiles")
    assert tiles.shape == (40, 40) and np.array_equal(tiles[::8, ::8], kinds)
    assert {TILE_SKIPPED, TILE_PARTIAL, TILE_FULL} <= set(np.unique(tiles).tolist())


def test_large_block_mask_draws_one_cell_per_tile():
    block_map = np.zeros((1, 2, 40, 40), bool)
    block_map[0, 1] = np.tri(40, dtype=bool)
    bm = BlockMask.from_dense_block_map(block_map, block_q=64, block_k=64, seq_q=2560, seq_k=2560,
                                        full_map=np.tri(40, k=-1, dtype=bool)[None, None].repeat(2, 1))
    fig = plot_mask(bm, head=1)
    assert np.array_equal(image(fig, "tiles"), np.tri(40, dtype=int) + np.tri(40, k=-1, dtype=int))
    assert not [im for im in fig.axes[0].get_images() if im.get_label() == "mask"]


def test_draws_into_a_given_axes():
    fig = Figure()
    ax = fig.add_subplot(1, 2, 2)
    assert plot_mask(np.eye(4, dtype=bool), ax=ax) is fig
    assert ax.get_images()


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_every_registered_pattern_builds_and_draws(name):
    mask, mask_fn = PATTERNS[name].build()
    fig = plot_mask(mask, mask_fn=mask_fn, title=name)
    assert image(fig, "mask").any()


def test_block_option_gives_a_block_mask_with_its_mask_fn():
    mask, mask_fn = PATTERNS["causal"].build(seq=32, block=8)
    assert isinstance(mask, BlockMask) and (mask.block_q, mask.seq_q) == (8, 32)
    dense, _ = PATTERNS["causal"].build(seq=32)
    assert np.array_equal(np.asarray(mask.to_dense_mask(mask_fn))[0, 0], np.asarray(dense))


def test_registry_rejects_duplicates_and_options_the_cli_cannot_set():
    with pytest.raises(ValueError, match="already registered"):
        register_pattern("causal", lambda seq=8: None, "again")
    with pytest.raises(TypeError, match="'seq' must be a keyword option with a default"):
        register_pattern("needs_seq", lambda seq: None, "no default")
    with pytest.raises(TypeError, match="option 'mode'"):
        register_pattern("string_option", lambda mode="a": None, "str default")
    assert {"needs_seq", "string_option"}.isdisjoint(PATTERNS)


def test_cli_writes_a_png(tmp_path, capsys):
    out = tmp_path / "window.png"
    assert main(["show-mask", "sliding_window", "--set", "seq=48", "--set", "block=16", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1000
    assert str(out) in capsys.readouterr().out


def test_cli_lists_the_patterns(capsys):
    assert main(["show-mask", "--list"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in PATTERNS) and "seq=64 (int)" in listing


@pytest.mark.parametrize("argv, message", [
    (["show-mask", "no_such_pattern"], "unknown pattern 'no_such_pattern'; expected one of: causal"),
    (["show-mask", "causal", "--set", "width=3"], "pattern 'causal' has no option 'width'; expected one of: seq=64"),
    (["show-mask", "causal", "--set", "seq=long"], "option 'seq' expects an int, got 'long'"),
    (["show-mask", "causal", "--set", "seq"], "--set expects KEY=VALUE, got 'seq'"),
    (["show-mask", "causal", "--set", "seq=0"], "seq must be an int >= 1, got 0"),
])
def test_cli_usage_errors_exit_2_with_a_message(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--out", str(tmp_path / "x.png")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_papers_command_still_works(capsys):
    assert main(["papers", "--status", "works"]) == 0
    assert capsys.readouterr().out.startswith("id")


# ------------------------------------------------------------------ issue 12 §6: show-mask at any size, --head

def _no_dense_masks(monkeypatch):
    """Makes every way to materialise a [T, S] mask fail the test."""
    import jattn.core.masks as masks_module

    def refuse(*args, **kwargs):
        raise AssertionError("a dense [T, S] mask was materialised")

    monkeypatch.setattr(masks_module, "materialize", refuse)
    monkeypatch.setattr(BlockMask, "to_dense_mask", refuse)


def _captured_figures(monkeypatch):
    """The figures ``jattn show-mask`` draws, in order."""
    import jattn.viz

    figures, original = [], jattn.viz.plot_mask

    def capture(*args, **kwargs):
        figures.append(original(*args, **kwargs))
        return figures[-1]

    monkeypatch.setattr(jattn.viz, "plot_mask", capture)
    return figures


def test_show_mask_refuses_a_huge_mask_at_once_with_the_option_to_lower(tmp_path, capsys, monkeypatch):
    _no_dense_masks(monkeypatch)
    monkeypatch.setattr(BlockMask, "from_mask_fn", lambda *a, **k: pytest.fail("tiles were evaluated"))
    started = time.perf_counter()
    with pytest.raises(SystemExit) as info:
        main(["show-mask", "causal", "--set", "seq=100000", "--out", str(tmp_path / "x.png")])
    assert info.value.code == 2 and time.perf_counter() - started < 5
    err = capsys.readouterr().err
    assert "seq=100000 gives a 100000 x 100000 mask" in err and "too large to draw" in err and "lower seq" in err
    assert not (tmp_path / "x.png").exists()


def test_a_large_pattern_is_drawn_tile_by_tile_without_a_dense_mask(monkeypatch):
    _no_dense_masks(monkeypatch)
    seq = 4200                                  # 4200**2 > DENSE_LIMIT: block=0 switches to tiles
    assert seq * seq > DENSE_LIMIT
    mask, mask_fn = PATTERNS["sliding_window"].build(seq=seq)
    assert isinstance(mask, BlockMask) and mask.block_q == 16 and mask.num_q_blocks <= 512
    fig = plot_mask(mask, mask_fn=mask_fn)
    tiles = image(fig, "tiles")
    assert tiles.shape == (mask.num_q_blocks, mask.num_kv_blocks)
    assert np.array_equal(np.flatnonzero(tiles[100]), [99, 100])   # the diagonal band, tile level
    assert not [im for im in fig.axes[0].get_images() if im.get_label() == "mask"]


def test_show_mask_draws_a_100000_long_per_head_pattern_quickly(tmp_path, monkeypatch, capsys):
    _no_dense_masks(monkeypatch)
    figures = _captured_figures(monkeypatch)
    out = tmp_path / "s2.png"
    started = time.perf_counter()
    assert main(["show-mask", "s2", "--set", "seq=100000", "--set", "block=512", "--head", "1",
                 "--out", str(out)]) == 0
    assert time.perf_counter() - started < 60 and out.stat().st_size > 1000
    tiles = image(figures[0], "tiles")
    assert tiles.shape == (196, 196) and "head 1 of 4" in figures[0].axes[0].get_title()


def test_plot_mask_never_materialises_a_huge_mask():
    with pytest.raises(ValueError, match="DENSE_DRAW_LIMIT"):
        plot_mask(mask_fn=masks.causal_mask(), seq_q=5000)
    bm = BlockMask.from_dense_block_map(np.ones((1, 1, 40, 40), bool), block_q=128, block_k=128, seq_q=5120,
                                        seq_k=5120)
    with pytest.raises(ValueError, match="use view='blocks'"):
        plot_mask(bm, view="elements")


@pytest.mark.parametrize("name, options", [("s2", []), ("moa", []), ("sinklora_sf", ["--set", "block=8"])])
def test_head_option_draws_that_head_of_a_per_head_pattern(name, options, tmp_path, monkeypatch, capsys):
    figures = _captured_figures(monkeypatch)
    for head in ("0", "2" if name in ("s2", "moa") else "1"):
        assert main(["show-mask", name, *options, "--head", head, "--out", str(tmp_path / f"{head}.png")]) == 0
    head0, other = (image(fig, "mask") for fig in figures)
    assert not np.array_equal(head0, other)
    mask, mask_fn = PATTERNS[name].build(**({"block": 8} if options else {}))
    heads = mask.shape[1] if isinstance(mask, BlockMask) else mask.shape[0]
    head = 2 if name in ("s2", "moa") else 1
    expected = (np.asarray(mask.to_dense_mask(mask_fn))[0, head] if isinstance(mask, BlockMask)
                else np.asarray(mask)[head])
    assert np.array_equal(other, expected)
    assert f"head {head} of {heads}" in figures[1].axes[0].get_title()
    assert "no effect" not in capsys.readouterr().err


def test_head_option_on_a_head_independent_pattern_says_it_has_no_effect(tmp_path, capsys):
    assert main(["show-mask", "causal", "--head", "2", "--out", str(tmp_path / "c.png")]) == 0
    err = capsys.readouterr().err
    assert "pattern 'causal' is the same for every head: --head 2 has no effect" in err
    assert main(["show-mask", "causal", "--out", str(tmp_path / "d.png")]) == 0
    assert "no effect" not in capsys.readouterr().err


def test_head_out_of_range_for_a_per_head_pattern_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["show-mask", "s2", "--head", "4", "--out", str(tmp_path / "x.png")])
    assert info.value.code == 2
    assert "--head must be in [0, 4): this pattern has 4 heads, got 4" in capsys.readouterr().err
