"""train.captioning: vocabulary, canonical captions, data, metrics, loss, a few training steps, save/load."""
import numpy as np
import pytest

from train.captioning import (HELDOUT_START, CaptionTask, Vocab, build_vlm, canonical_caption, caption_loss,
                              caption_metrics, digit_frame, evaluate_vlm, load_vlm, parse_groups, save_vlm)
from train.images import caption

TINY = {"dim": 16, "mlp_dim": 32, "encoder_layers": 1, "decoder_layers": 1, "num_heads": 2, "patch_size": 8,
        "stem_channels": 4, "stem_layers": 1}      # the stem's weights go through save/load too


def test_vocab_round_trip():
    """encode then decode gives the caption back (commas included); catches a dropped comma word, a lost
    last word before eos, or decoding past eos."""
    vocab = Vocab.default()
    assert vocab.words[:3] == ("<pad>", "<bos>", "<eos>") and len(set(vocab.words)) == len(vocab)
    for text in ["a red circle, two blue squares and a yellow triangle", "three green triangles",
                 "the digit seven", "a yellow square and a red circle"]:
        ids = vocab.encode(text, 16)
        assert ids.shape == (16,) and ids[0] == vocab.bos
        assert ids[len(text.replace(",", " ,").split()) + 1] == vocab.eos
        assert vocab.decode(ids) == text
    assert vocab.decode([vocab.bos, vocab.index["two"], vocab.eos, vocab.index["red"]]) == "two"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        vocab.encode("a purple circle", 16)
    with pytest.raises(ValueError, match="max_len"):
        vocab.encode("a red circle", 4)
    with pytest.raises(ValueError, match="ids"):
        vocab.decode([len(vocab)])


def test_canonical_caption_sorts_groups_by_kind_then_colour():
    """Groups come out sorted by (kind, colour) whatever the placement order, with the stock words:
    catches sorting by placement order (the stock caption) or a changed count."""
    kinds, colours = np.array([2, 0, 2, -1]), np.array([1, 3, 1, -1])        # triangle green x2, circle yellow
    assert caption(kinds, colours) == "two green triangles and a yellow circle"
    assert canonical_caption(kinds, colours) == "a yellow circle and two green triangles"
    assert canonical_caption(kinds[[1, 0, 2, 3]], colours[[1, 0, 2, 3]]) == canonical_caption(kinds, colours)


def test_metrics_on_hand_built_predictions():
    """Exact match, order-free group match, per-object accuracy and hallucination on known answers:
    catches counting a group with the wrong count as found, or a correct object as hallucinated."""
    refs = ["a red circle and two blue squares", "a green triangle", "the digit seven", "a yellow square"]
    preds = ["a red circle and two blue squares",          # exact
             "a green triangle and a red circle",          # extra red circle: hallucinated
             "the digit one",                              # wrong digit: hallucinated, object missed
             "two yellow squares"]                          # right object, wrong count
    m = caption_metrics(preds, refs)
    assert m["exact_match"] == 0.25 and m["group_match"] == 0.25
    assert m["object_accuracy"] == pytest.approx(3 / 5)     # found: red circle, blue squares, green triangle
    assert m["hallucination_rate"] == pytest.approx(2 / 6)  # predicted groups 2+2+1+1, bad: red circle, digit one
    assert m["captions_hallucinating"] == 0.5
    swapped = caption_metrics(["two blue squares and a red circle"], [refs[0]])
    assert swapped["exact_match"] == 0.0 and swapped["group_match"] == 1.0 and swapped["object_accuracy"] == 1.0
    assert parse_groups("a red") == [("?", ("a", "red"))]
    assert caption_metrics(["a red"], ["a red circle"])["hallucination_rate"] == 1.0
    with pytest.raises(ValueError, match="predictions and references"):
        caption_metrics(["a"], [])


def test_task_batches_teacher_forcing_and_disjoint_splits():
    """inputs/targets are the caption shifted by one with eos scored and pads not; train and eval batches
    come from different images; the digit share is as asked: catches an unshifted target or scoring pads."""
    task = CaptionTask(max_len=16, digit_fraction=0.25)
    train, held = task.batch(0, 0, 8), task.batch(0, 0, 8, split="eval")
    assert train["images"].shape == (8, 32, 32, 3) and train["inputs"].shape == (8, 15)
    np.testing.assert_array_equal(train["inputs"][:, 1:], train["targets"][:, :-1])
    assert np.all(train["inputs"][:, 0] == task.vocab.bos)
    eos_rows, eos_cols = np.nonzero(train["targets"] == task.vocab.eos)
    assert len(eos_rows) == 8 and np.all(train["loss_mask"][eos_rows, eos_cols] == 1)
    np.testing.assert_array_equal(train["loss_mask"], train["targets"] != task.vocab.pad)
    assert not np.allclose(train["images"][:6], held["images"][:6])
    ex = task.examples(0, 0, 8)
    assert ex.is_digit.sum() == 2 and all(c.startswith("the digit") for c in np.array(ex.captions)[ex.is_digit])
    with pytest.raises(ValueError, match="digit_fraction"):
        CaptionTask(digit_fraction=1.5)
    with pytest.raises(ValueError, match="split"):
        task.batch(0, 0, 8, split="test")
    with pytest.raises(ValueError, match="held-out"):
        task.batch(0, HELDOUT_START, 8)
    frame = digit_frame(np.random.default_rng(0).uniform(0.1, 1, (2, 16, 16, 1)))
    assert frame.shape == (2, 32, 32, 3) and frame[:, :8].max() == 0 and frame[:, 8:24, 8:24].min() > 0
    with pytest.raises(ValueError, match="images"):
        digit_frame(np.zeros((2, 16, 16, 3)))


def test_caption_loss_hand_built():
    """Perfect logits give loss ~0 and accuracy 1; masked positions do not count: catches averaging over
    pads (sum/mean over the wrong set)."""
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 5, (2, 4))
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 0]], np.float32)
    logits = np.eye(5)[targets] * 50.0
    logits[0, 3] = np.eye(5)[(targets[0, 3] + 1) % 5] * 50.0      # wrong, but masked out
    loss, metrics = caption_loss(logits, targets, mask)
    assert float(loss) < 1e-6 and float(metrics["token_accuracy"]) == 1.0
    loss, metrics = caption_loss(logits, targets, np.ones_like(mask))
    assert float(loss) == pytest.approx(50.0 / 8, rel=1e-4) and float(metrics["token_accuracy"]) == 7 / 8
    with pytest.raises(ValueError, match="targets"):
        caption_loss(logits, targets[:, :3], mask)


def test_loss_decreases_and_checkpoint_round_trip(tmp_path):
    """A few AdamW steps on one batch through train.loop.train lower its loss, and save_vlm/load_vlm give
    back the same logits: catches a loss with no gradient path to the model, or a load that keeps random
    weights."""
    import jax.numpy as jnp
    from flax import nnx

    from train.captioning import train_vlm
    config = {"seed": 0, "task": {"max_len": 16, "digit_fraction": 0.25}, "model": TINY,
              "optim": {"lr": 1e-2, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0},
              "train": {"steps": 8, "batch_size": 8, "grad_accum": 1, "log_every": 1, "eval_every": 0,
                        "eval_batches": 0, "checkpoint_every": 0, "out_dir": None, "progress": False}}
    model, vocab, result = train_vlm(config, quiet=True)
    losses = [h["loss"] for h in result.history if h["split"] == "train"]
    assert len(losses) == 8 and np.mean(losses[-2:]) < losses[0] - 0.3
    save_vlm(str(tmp_path / "vlm"), model, vocab, config, step=8)
    loaded, loaded_vocab = load_vlm(str(tmp_path / "vlm"))
    assert loaded_vocab == vocab
    batch = CaptionTask().batch(1, 3, 2)
    forward = nnx.jit(lambda m, images, tokens: m(images, tokens))      # one compile for all three models
    images = jnp.asarray(batch["images"])
    np.testing.assert_allclose(forward(loaded, images, batch["inputs"]), forward(model, images, batch["inputs"]),
                               atol=1e-6)
    fresh = build_vlm(TINY, vocab, seed=0)
    assert np.abs(np.asarray(forward(fresh, images, batch["inputs"]) - forward(loaded, images, batch["inputs"]))).max() > 1e-3
    metrics = evaluate_vlm(loaded, loaded_vocab, num_shapes=3, num_digits=2, batch_size=4)
    for split, n in (("shapes", 3), ("digits", 2)):
        assert metrics[split]["num_captions"] == n and 0.0 <= metrics[split]["object_accuracy"] <= 1.0
    with pytest.raises(FileNotFoundError, match="path"):
        load_vlm(str(tmp_path / "missing"))
    with pytest.raises(TypeError, match="path"):
        load_vlm(3)
