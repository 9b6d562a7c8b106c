"""train/vlm_methods.py machinery on a tiny untrained TinyVLM built here (never the trained checkpoint):
the hooked decoder equals ``model.decode``, hooks reach the right layer, the VAR captioner with p = 1 equals
the plain one, the caption -> query-row bookkeeping, the map scoring, and a tiny VL-SAM run."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from train.captioning import Vocab, heldout_shapes, make_batch
from train.images import COLOUR_NAMES, SHAPE_NAMES, shapes
from train.vlm_methods import (group_examples, group_rows, hooked_decode, make_captioner, score_maps, var_hooks,
                               vl_sam_maps)


@pytest.fixture(scope="module")
def tiny():
    from jattn.nn.vlm import TinyVLM
    vocab = Vocab.default()
    model = TinyVLM(len(vocab), rngs=nnx.Rngs(3), image_size=32, patch_size=8, dim=16, encoder_layers=1,
                    decoder_layers=2, num_heads=2, mlp_dim=32, max_text_len=16)
    ex = heldout_shapes(3, seed=1)
    batch = make_batch(ex.images, ex.captions, vocab, 16)
    return model, vocab, ex, batch


def test_hooked_decode_without_hooks_equals_decode(tiny):
    """No hooks: the same logits and maps as ``model.decode`` (catches a wrong mask, norm or residual in the
    re-implemented forward)."""
    model, _, _, batch = tiny
    it = model.encode_image(jnp.asarray(batch["images"]))
    logits, maps = model.decode(it, jnp.asarray(batch["inputs"]), return_probs=True)
    logits2, maps2, hiddens = hooked_decode(model, it, jnp.asarray(batch["inputs"]))
    np.testing.assert_allclose(np.asarray(logits2), np.asarray(logits), rtol=1e-5, atol=1e-5)
    for a, b in zip(maps, maps2):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    assert len(hiddens) == 2 and hiddens[0].shape == (3, 16 + 15, 16)


def test_hooks_reach_their_layer_and_var_p1_is_the_baseline(tiny):
    """A hook on layer 1 sees layer 1's input (the layer-0 output, not the embedding) and its prob_mod changes
    layer 1's map only; VAR hooks with p = 1 leave the logits unchanged (catches hooks applied to every
    layer, or the wrong hidden state passed)."""
    model, _, _, batch = tiny
    it = model.encode_image(jnp.asarray(batch["images"]))
    inputs = jnp.asarray(batch["inputs"])
    seen = {}

    def hook(x):
        seen["x"] = x
        return lambda p: jnp.full_like(p, 1.0 / p.shape[-1])

    _, maps, hiddens = hooked_decode(model, it, inputs, hooks={1: hook})
    np.testing.assert_array_equal(np.asarray(seen["x"]), np.asarray(hiddens[1]))
    _, base_maps, _ = hooked_decode(model, it, inputs)
    np.testing.assert_array_equal(np.asarray(maps[0]), np.asarray(base_maps[0]))
    np.testing.assert_allclose(np.asarray(maps[1]), 1.0 / maps[1].shape[-1], rtol=1e-6)
    hooks = var_hooks(16, 15, (0, 1), [0, 1], 0.5, rho=1.0, alpha=0.0, p=1.0)
    base = hooked_decode(model, it, inputs)[0]
    np.testing.assert_allclose(np.asarray(hooked_decode(model, it, inputs, hooks=hooks)[0]), np.asarray(base),
                               rtol=1e-5, atol=1e-6)
    strong = var_hooks(16, 15, (0,), [0, 1], 0.5, rho=1.0, alpha=0.0, p=0.0)
    assert not np.allclose(np.asarray(hooked_decode(model, it, inputs, hooks=strong)[0]), np.asarray(base), atol=1e-4)
    with pytest.raises(ValueError, match="hooks"):
        hooked_decode(model, it, inputs, hooks={2: hook})


def test_captioner_without_hooks_matches_generate(tiny):
    """The hooked greedy captioner equals ``model.generate`` (catches an off-by-one in the decode loop)."""
    model, vocab, ex, _ = tiny
    cap = make_captioner(model, vocab, max_len=5)
    want = np.asarray(model.generate(jnp.asarray(ex.images), bos=vocab.bos, eos=vocab.eos, pad=vocab.pad, max_len=5))
    np.testing.assert_array_equal(cap(ex.images), want)


def test_group_rows_pick_the_rows_predicting_colour_and_kind():
    """"a red circle and two blue squares": rows 1, 2 predict "red circle", rows 5, 6 "blue squares" (kind
    singularised) (catches rows of the words themselves instead of the rows predicting them)."""
    groups = group_rows("a red circle and two blue squares", Vocab.default(), 15)
    assert [g for g, _ in groups] == [("red", "circle"), ("blue", "square")]
    assert np.nonzero(groups[0][1])[0].tolist() == [1, 2]
    assert np.nonzero(groups[1][1])[0].tolist() == [5, 6]


def test_score_maps_hand_built():
    """A map peaked on the object scores IoU 1 and pointing 1, one peaked elsewhere 0 and 0 (catches the map
    upsampled with the wrong patch size or rows/cols swapped)."""
    target = np.zeros((1, 8, 8), bool)
    target[0, :4, 4:] = True                                   # patch (0, 1) of a 2x2 grid, patch size 4
    good = np.array([[[0.0, 1.0], [0.1, 0.1]]])
    bad = np.array([[[0.0, 0.1], [1.0, 0.1]]])
    s = score_maps({"good": good, "bad": bad}, target, patch=4)
    assert s["good"] == {"iou": 1.0, "pointing": 1.0}
    assert s["bad"] == {"iou": 0.0, "pointing": 0.0}


def test_group_examples_target_the_named_objects():
    """Each example's target mask is the union of the masks of exactly the objects its group names (catches
    a mask of the whole image's objects, or of the wrong colour/kind)."""
    data = shapes(4, 2, size=32, max_objects=3, start=10_000_000)
    imgs, inputs, rows, targets = group_examples(data, Vocab.default(), 16)
    k = 0
    for i in range(4):
        groups = {(COLOUR_NAMES[c], SHAPE_NAMES[s]) for s, c in zip(data.kinds[i], data.colours[i]) if s >= 0}
        for colour, kind in sorted(groups, key=lambda g: (SHAPE_NAMES.index(g[1]), COLOUR_NAMES.index(g[0]))):
            sel = (data.kinds[i] == SHAPE_NAMES.index(kind)) & (data.colours[i] == COLOUR_NAMES.index(colour))
            np.testing.assert_array_equal(targets[k], data.masks[i][sel].any(0))
            np.testing.assert_array_equal(imgs[k], data.images[i])
            assert rows[k].sum() == 2 and len(inputs[k]) == 15
            k += 1
    assert k == len(targets) >= 4


def test_vl_sam_maps(tiny):
    """Every method's map is [G, h, w] and sums to 1 (catches a map over the text columns or unnormalised)."""
    model, vocab, ex, batch = tiny
    rows = np.stack([group_rows(c, vocab, 15)[0][1] for c in ex.captions])
    maps = vl_sam_maps(model, batch["images"], batch["inputs"], rows)
    for name in ("vl_sam", "vl_sam_residual", "flow_mean_noreg", "last_layer_mean", "centre_prior"):
        assert maps[name].shape == (3, 4, 4)
        np.testing.assert_allclose(maps[name].sum((1, 2)), 1.0, rtol=1e-4)
