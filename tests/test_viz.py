"""plot_mask draws exactly the mask it is given; the pattern registry and ``jattn show-mask`` work."""
import numpy as np
import pytest
from matplotlib.figure import Figure

from jattn.cli import main
from jattn.core import masks
from jattn.core.block_mask import BlockMask
from jattn.patterns import PATTERNS, register_pattern
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
