"""Training, decoding and evaluating the tiny captioning VLM (issue 16; model in :mod:`jattn.nn.vlm`).

Data (nothing downloaded):

- **shapes**: :func:`train.images.shapes` images (32x32x3, 1..3 objects) with their captions in a
  *canonical* group order (:func:`canonical_caption`: groups sorted by shape kind, then colour, in the
  orders of ``SHAPE_NAMES``/``COLOUR_NAMES``). The stock caption lists groups in the order the generator
  placed them, which the image does not show, so no model could match it exactly; the canonical order
  is a function of the image. Training images are stream indices ``[0, HELDOUT_START)`` of
  ``task.data_seed`` (batch ``step`` uses ``step * n .. step * n + n - 1``), held-out images start at
  ``HELDOUT_START`` — disjoint ranges of the same stream.
- **digits**: sklearn's real digits, :func:`train.images.digits` at 16x16, grey in three channels and
  centred in the 32x32 frame (:func:`digit_frame`), captioned "the digit seven"; training samples come
  from its fixed train split, held-out ones from its test split.

A :class:`Vocab` holds ``<pad> <bos> <eos>`` and every caption word (``,`` is a word). Training is
teacher-forced cross-entropy on the caption tokens after ``<bos>`` (``<eos>`` included) through
:func:`train.loop.train` (:class:`CaptionTask` follows its task protocol, orbax checkpoints and resume
included). Decoding is greedy (:meth:`jattn.nn.vlm.TinyVLM.generate`). Metrics
(:func:`caption_metrics`, pure functions of caption strings):

- ``exact_match``: predicted caption == canonical reference;
- ``group_match``: the same set of ``(count, colour, kind)`` groups, in any order;
- ``object_accuracy``: the fraction of reference groups ``(count, colour, kind)`` present in the prediction;
- ``hallucination_rate`` (CHAIR-i style): the fraction of predicted groups naming a ``(colour, kind)`` that is
  not in the image (an unparseable group counts as hallucinated); ``captions_hallucinating`` (CHAIR-s):
  the fraction of captions with at least one such group.

``python -m train.captioning [--config configs/vlm_shapes.py] [--out DIR] [--steps N] [--seed S]`` trains,
evaluates on held-out images, writes ``DIR/eval.json``, ``DIR/vlm_config.json`` and ``DIR/params`` (an
orbax checkpoint of the parameters alone), and draws ``docs/img/vlm_shapes.png``. ``load_vlm(DIR)`` rebuilds
the trained model in one line.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from train.checkpoint import Checkpointer
from train.config import CONFIG_DIR, DEFAULTS, merge
from train.data import batch_rng
from train.images import COLOUR_NAMES, DIGIT_WORDS, NUMBER_WORDS, SHAPE_NAMES, caption, digits, shapes

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
HELDOUT_START = 10_000_000
DEFAULT_DIR = "runs/vlm_shapes"
DEFAULT_CONFIG = os.path.join(CONFIG_DIR, "vlm_shapes.py")


# --- vocabulary -----------------------------------------------------------------------------------

def caption_words() -> list[str]:
    """Every word a shapes or digits caption can use (sorted, no duplicates)."""
    words = {"a", "and", ",", "the", "digit", *NUMBER_WORDS, *DIGIT_WORDS, *COLOUR_NAMES}
    words |= set(SHAPE_NAMES) | {name + "s" for name in SHAPE_NAMES}
    return sorted(words)


def split_words(text: str) -> list[str]:
    """``"a red circle, two blue squares"`` -> ``["a", "red", "circle", ",", "two", "blue", "squares"]``."""
    if not isinstance(text, str):
        raise TypeError(f"caption must be a str, got {type(text).__name__}")
    return text.replace(",", " , ").split()


def join_words(words) -> str:
    """The inverse of :func:`split_words` on well-formed captions (no space before a comma)."""
    return " ".join(words).replace(" ,", ",")


@dataclasses.dataclass(frozen=True)
class Vocab:
    """Word vocabulary: ids 0, 1, 2 are ``<pad>``, ``<bos>``, ``<eos>``; then :func:`caption_words`."""
    words: tuple

    @classmethod
    def default(cls) -> "Vocab":
        return cls((PAD, BOS, EOS, *caption_words()))

    @property
    def pad(self) -> int:
        return 0

    @property
    def bos(self) -> int:
        return 1

    @property
    def eos(self) -> int:
        return 2

    def __len__(self) -> int:
        return len(self.words)

    @property
    def index(self) -> dict:
        return {w: i for i, w in enumerate(self.words)}

    def encode(self, text: str, max_len: int) -> np.ndarray:
        """``[bos, words..., eos, pad...]`` of length ``max_len`` (int32). Unknown words or a caption longer
        than ``max_len - 2`` words raise ``ValueError``."""
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 3:
            raise ValueError(f"max_len must be an int >= 3, got {max_len!r}")
        words, index = split_words(text), self.index
        unknown = [w for w in words if w not in index]
        if unknown:
            raise ValueError(f"caption {text!r} has words {unknown} outside the vocabulary")
        if len(words) > max_len - 2:
            raise ValueError(f"caption {text!r} has {len(words)} words; max_len={max_len} fits {max_len - 2}")
        ids = [self.bos] + [index[w] for w in words] + [self.eos]
        return np.asarray(ids + [self.pad] * (max_len - len(ids)), np.int32)

    def encode_batch(self, texts, max_len: int) -> np.ndarray:
        return np.stack([self.encode(t, max_len) for t in texts])

    def decode(self, ids) -> str:
        """Token ids -> caption: skips a leading ``<bos>``, stops at ``<eos>`` or ``<pad>``; ids outside the
        vocabulary raise ``ValueError``."""
        out = []
        for i in np.asarray(ids).reshape(-1).tolist():
            if not 0 <= i < len(self.words):
                raise ValueError(f"ids holds token id {i}, outside [0, {len(self.words)})")
            if i == self.bos and not out:
                continue
            if i in (self.eos, self.pad):
                break
            out.append(self.words[i])
        return join_words(out)


# --- captions and data ----------------------------------------------------------------------------

def canonical_caption(kinds, colours) -> str:
    """The shapes caption with groups sorted by ``(kind, colour)`` (e.g. "a red circle and two blue squares");
    same words as :func:`train.images.caption`, an order the image determines."""
    kinds, colours = np.asarray(kinds), np.asarray(colours)
    keep = kinds >= 0
    kinds, colours = kinds[keep], colours[keep]
    order = np.lexsort((colours, kinds))
    return caption(kinds[order], colours[order])


def digit_caption(label: int) -> str:
    return f"the digit {DIGIT_WORDS[int(label)]}"


def digit_frame(images: np.ndarray, size: int = 32) -> np.ndarray:
    """``[N, s, s, 1]`` grey digits -> ``[N, size, size, 3]``, centred on a black frame."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != 1 or images.shape[1] > size or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must be [N, s, s, 1] with s <= size={size}, got shape {images.shape}")
    s = images.shape[1]
    lo = (size - s) // 2
    out = np.zeros((images.shape[0], size, size, 3), np.float32)
    out[:, lo:lo + s, lo:lo + s] = images
    return out


@dataclasses.dataclass
class Examples:
    """Images ``[N, 32, 32, 3]``, their captions and which are digits."""
    images: np.ndarray
    captions: list
    is_digit: np.ndarray


def shapes_examples(num: int, start: int, seed: int = 0, max_objects: int = 3) -> Examples:
    data = shapes(num, seed, size=32, max_objects=max_objects, start=start)
    caps = [canonical_caption(k, c) for k, c in zip(data.kinds, data.colours)]
    return Examples(data.images, caps, np.zeros(num, bool))


def digit_examples(indices, split: str = "train") -> Examples:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    d = digits(16)
    images, labels = (d.train_images, d.train_labels) if split == "train" else (d.test_images, d.test_labels)
    indices = np.asarray(indices)
    return Examples(digit_frame(images[indices]), [digit_caption(l) for l in labels[indices]],
                    np.ones(len(indices), bool))


def heldout_shapes(num: int, seed: int = 0, max_objects: int = 3) -> Examples:
    """The held-out shapes images: stream indices ``HELDOUT_START ..`` (never used for training)."""
    return shapes_examples(num, HELDOUT_START, seed, max_objects)


def concat(parts: list[Examples]) -> Examples:
    return Examples(np.concatenate([p.images for p in parts]), sum((list(p.captions) for p in parts), []),
                    np.concatenate([p.is_digit for p in parts]))


class CaptionTask:
    """:func:`train.loop.train`'s task: batches ``{"images", "inputs", "targets", "loss_mask"}`` and the loss.

    Batch ``(seed, step)`` of the train split holds ``round(digit_fraction * n)`` digits (train split,
    drawn by ``batch_rng(seed, step)``) and shapes images ``step * n ..`` of the training stream; the eval
    split the same from held-out shapes (``HELDOUT_START + step * n ..``) and the digits' test split.
    """

    def __init__(self, vocab: Vocab | None = None, *, max_len: int = 16, max_objects: int = 3,
                 digit_fraction: float = 0.2, data_seed: int = 0):
        self.vocab = Vocab.default() if vocab is None else vocab
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 3:
            raise ValueError(f"max_len must be an int >= 3, got {max_len!r}")
        if not isinstance(digit_fraction, (int, float)) or not 0.0 <= digit_fraction <= 1.0:
            raise ValueError(f"digit_fraction must be a float in [0, 1], got {digit_fraction!r}")
        self.max_len, self.max_objects = max_len, max_objects
        self.digit_fraction, self.data_seed = float(digit_fraction), int(data_seed)
        self.seq_len = max_len - 1

    def examples(self, seed: int, step: int, batch_size: int, split: str = "train") -> Examples:
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        n_digits = int(round(self.digit_fraction * batch_size))
        n_shapes = batch_size - n_digits
        start = step * n_shapes + (0 if split == "train" else HELDOUT_START)
        if split == "train" and start + n_shapes > HELDOUT_START:
            raise ValueError(f"step {step} would read shapes past the held-out start {HELDOUT_START}")
        parts = [shapes_examples(n_shapes, start, self.data_seed, self.max_objects)] if n_shapes else []
        if n_digits:
            pool = len(digits(16).train_labels if split == "train" else digits(16).test_labels)
            rng = batch_rng(seed, step, stream=20 if split == "train" else 21)
            parts.append(digit_examples(rng.integers(0, pool, n_digits), "train" if split == "train" else "test"))
        return concat(parts)

    def batch(self, seed: int, step: int, batch_size: int, split: str = "train") -> dict:
        ex = self.examples(seed, step, batch_size, split)
        return make_batch(ex.images, ex.captions, self.vocab, self.max_len)

    @staticmethod
    def loss(model, batch):
        logits = model(batch["images"], batch["inputs"])
        return caption_loss(logits, batch["targets"], batch["loss_mask"])


def make_batch(images, captions, vocab: Vocab, max_len: int) -> dict:
    """Teacher-forcing arrays: ``inputs = ids[:, :-1]``, ``targets = ids[:, 1:]``, ``loss_mask = targets != pad``."""
    ids = vocab.encode_batch(captions, max_len)
    return {"images": np.asarray(images, np.float32), "inputs": ids[:, :-1], "targets": ids[:, 1:],
            "loss_mask": (ids[:, 1:] != vocab.pad).astype(np.float32)}


def caption_loss(logits, targets, loss_mask):
    """Mean cross-entropy over the unmasked target tokens; ``(loss, {"token_accuracy"})``."""
    if logits.shape[:2] != targets.shape or targets.shape != loss_mask.shape:
        raise ValueError(f"logits [B, T, V], targets and loss_mask [B, T] must agree, got {logits.shape}, "
                         f"{targets.shape} and {loss_mask.shape}")
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    total = jnp.maximum(jnp.sum(loss_mask), 1.0)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return jnp.sum(ce * loss_mask) / total, {"token_accuracy": jnp.sum(correct * loss_mask) / total}


# --- metrics --------------------------------------------------------------------------------------

def parse_groups(text: str) -> list[tuple]:
    """Caption -> its groups: ``(count, colour, kind)`` for shapes (kind singular), ``("digit", word)`` for
    "the digit <word>", and ``("?", words)`` for a group that does not parse."""
    words = split_words(text)
    groups, current = [], []
    for w in words + [","]:
        if w in (",", "and"):
            if current:
                groups.append(_parse_group(current))
            current = []
        else:
            current.append(w)
    return groups


def _parse_group(words: list[str]) -> tuple:
    if len(words) == 3 and words[:2] == ["the", "digit"] and words[2] in DIGIT_WORDS:
        return ("digit", words[2])
    if len(words) == 3 and words[1] in COLOUR_NAMES:
        count = 1 if words[0] == "a" else (NUMBER_WORDS.index(words[0]) if words[0] in NUMBER_WORDS else None)
        noun = words[2]
        kind = noun if count == 1 else (noun[:-1] if noun.endswith("s") else None)
        if count and kind in SHAPE_NAMES and (count == 1) == (noun == kind):
            return (count, words[1], kind)
    return ("?", tuple(words))


def _objects(group: tuple):
    """What a group names: ``(colour, kind)``, ``("digit", word)`` or None when it does not parse."""
    if group[0] == "?":
        return None
    return tuple(group[1:]) if group[0] != "digit" else group


def caption_metrics(predictions, references) -> dict:
    """Exact match, group match, per-object accuracy and hallucination rates of caption strings (see the
    module docstring). ``references`` describe the images completely, so the objects in an image are
    the ``(colour, kind)`` pairs of its reference."""
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references) or not references:
        raise ValueError(f"predictions and references must be non-empty lists of equal length, got "
                         f"{len(predictions)} and {len(references)}")
    exact = groups_equal = ref_total = ref_found = pred_total = pred_bad = captions_bad = 0
    for pred, ref in zip(predictions, references):
        p, r = parse_groups(pred), parse_groups(ref)
        exact += pred == ref
        groups_equal += sorted(map(repr, p)) == sorted(map(repr, r))
        ref_total += len(r)
        ref_found += sum(g in p for g in r)
        present = {_objects(g) for g in r}
        bad = sum(_objects(g) is None or _objects(g) not in present for g in p)
        pred_total += len(p)
        pred_bad += bad
        captions_bad += bad > 0
    n = len(references)
    return {"exact_match": exact / n, "group_match": groups_equal / n,
            "object_accuracy": ref_found / max(ref_total, 1),
            "hallucination_rate": pred_bad / max(pred_total, 1), "captions_hallucinating": captions_bad / n,
            "num_captions": n}


# --- model, decoding, evaluation ------------------------------------------------------------------

def build_vlm(model_config: dict, vocab: Vocab, *, seed: int = 0, max_len: int = 16):
    from jattn.nn.vlm import TinyVLM
    return TinyVLM(len(vocab), rngs=nnx.Rngs(seed), max_text_len=max_len, **model_config)


class Captioner:
    """Greedy captions of image batches with one compiled decoder per batch shape."""

    def __init__(self, model, vocab: Vocab, max_len: int | None = None):
        from jattn.nn.vlm import make_generate_fn
        self.vocab, self.max_len = vocab, model.max_text_len if max_len is None else max_len
        self.graphdef, self.state = nnx.split(model)
        generate = make_generate_fn(self.graphdef, bos=vocab.bos, eos=vocab.eos, pad=vocab.pad, max_len=self.max_len)

        def run(state, images):
            return generate(state, nnx.merge(self.graphdef, state).encode_image(images), None)

        self._run = jax.jit(run)

    def tokens(self, images) -> np.ndarray:
        return np.asarray(self._run(self.state, jnp.asarray(images, jnp.float32)))

    def __call__(self, images, batch_size: int = 128) -> list[str]:
        images = np.asarray(images, np.float32)
        out = []
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            pad = batch_size - len(chunk) if len(images) > batch_size else 0   # one shape: one compile
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            ids = self.tokens(chunk)[:len(chunk) - pad]
            out += [self.vocab.decode(row) for row in ids]
        return out


def evaluate_vlm(model, vocab: Vocab, *, num_shapes: int = 512, num_digits: int | None = None, seed: int = 0,
                 max_objects: int = 3, batch_size: int = 128) -> dict:
    """Held-out metrics: shapes images ``HELDOUT_START ..`` and the digits' test split (all of it by default)."""
    captioner = Captioner(model, vocab)
    held = heldout_shapes(num_shapes, seed, max_objects)
    preds = captioner(held.images, batch_size)
    result = {"shapes": caption_metrics(preds, held.captions), "shapes_examples": list(zip(preds[:8], held.captions[:8]))}
    test_count = len(digits(16).test_labels)
    num_digits = test_count if num_digits is None else min(num_digits, test_count)
    if num_digits:
        dig = digit_examples(np.arange(num_digits), "test")
        result["digits"] = caption_metrics(captioner(dig.images, batch_size), dig.captions)
    return result


# --- train, save, load ----------------------------------------------------------------------------

def load_config(path: str = DEFAULT_CONFIG) -> dict:
    if not isinstance(path, str) or not path.endswith(".py") or not os.path.isfile(path):
        raise ValueError(f"config must be the path of an existing .py file, got {path!r}")
    spec = importlib.util.spec_from_file_location("vlm_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    base = {k: copy.deepcopy(v) for k, v in DEFAULTS.items() if k in ("optim", "train")}
    return merge(base, config)


def train_vlm(config: dict, *, quiet: bool = False):
    """Trains per ``config`` (see ``configs/vlm_shapes.py``); saves ``vlm_config.json`` and ``params`` in
    ``train.out_dir`` when set. Returns ``(model, vocab, TrainResult)``."""
    from train.loop import train
    tcfg = config["task"]
    vocab = Vocab.default()
    task = CaptionTask(vocab, max_len=tcfg.get("max_len", 16), max_objects=tcfg.get("max_objects", 3),
                       digit_fraction=tcfg.get("digit_fraction", 0.2), data_seed=tcfg.get("data_seed", 0))
    model = build_vlm(config["model"], vocab, seed=int(config.get("seed", 0)), max_len=task.max_len)
    result = train(config, model, task, quiet=quiet)
    model = result.model()
    out_dir = config["train"].get("out_dir")
    if out_dir:
        save_vlm(out_dir, model, vocab, config, step=result.step)
    return model, vocab, result


def save_vlm(out_dir: str, model, vocab: Vocab, config: dict, step: int = 0) -> None:
    """``out_dir/vlm_config.json`` (model kwargs, vocabulary, seed) and ``out_dir/params`` (orbax)."""
    os.makedirs(out_dir, exist_ok=True)
    meta = {"model": config["model"], "vocab": list(vocab.words), "seed": int(config.get("seed", 0)),
            "max_len": model.max_text_len, "step": int(step)}
    with open(os.path.join(out_dir, "vlm_config.json"), "w") as f:
        json.dump(meta, f, indent=1)
    with Checkpointer(os.path.join(out_dir, "params"), max_to_keep=1) as ckpt:
        ckpt.save(int(step), nnx.state(model, nnx.Param))


def load_vlm(path: str = DEFAULT_DIR):
    """``model, vocab = load_vlm()``: the trained TinyVLM saved by :func:`train_vlm` in ``path`` (default
    ``runs/vlm_shapes``, made by ``python -m train.captioning``)."""
    if not isinstance(path, str):
        raise TypeError(f"path must be a str, got {type(path).__name__}")
    meta_path = os.path.join(path, "vlm_config.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"path={path!r} holds no trained VLM ({meta_path} is missing): train one with "
                                f"`python -m train.captioning --out {path}`")
    with open(meta_path) as f:
        meta = json.load(f)
    vocab = Vocab(tuple(meta["vocab"]))
    model = build_vlm(meta["model"], vocab, seed=meta["seed"], max_len=meta["max_len"])
    with Checkpointer(os.path.join(path, "params"), max_to_keep=1) as ckpt:
        params, _ = ckpt.restore(nnx.state(model, nnx.Param))
    nnx.update(model, params)
    return model, vocab


# --- figure ---------------------------------------------------------------------------------------

def draw_examples(model, vocab: Vocab, path: str, *, num: int = 6, layer: int = -1, seed: int = 0) -> None:
    """A PNG: held-out images (shapes and one digit) with predicted captions, and one decoder layer's
    text-to-image attention (mean over heads and over the query positions bos .. last word, each row's
    weights on the image tokens) as a map over the image patches."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ex = concat([heldout_shapes(num - 1, seed), digit_examples([0], "test")])
    captioner = Captioner(model, vocab)
    ids = captioner.tokens(ex.images)
    preds = [vocab.decode(row) for row in ids]
    _, maps = model(jnp.asarray(ex.images), jnp.asarray(ids[:, :-1]), return_probs=True)
    N = model.num_image_tokens
    side = model.image_size // model.patch_size
    probs = np.asarray(maps[layer])                                    # [B, H, N+T, N+T]
    fig, axes = plt.subplots(2, num, figsize=(2.3 * num, 5.2))
    for j in range(num):
        n_text = len(split_words(preds[j])) + 1                        # bos and the caption's words
        text_to_image = probs[j, :, N:N + n_text, :N].mean(axis=(0, 1)).reshape(side, side)
        axes[0, j].imshow(ex.images[j])
        axes[0, j].set_title(("" if preds[j] == ex.captions[j] else "x ") + preds[j].replace(", ", ",\n").replace(" and ", "\nand "),
                             fontsize=7)
        axes[1, j].imshow(text_to_image, cmap="magma")
        axes[1, j].set_title(f"layer {layer % model.decoder_layers}: text->image", fontsize=7)
        for ax in axes[:, j]:
            ax.axis("off")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--out", default=None, help="train.out_dir (default: the config's)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--figure", default="docs/img/vlm_shapes.png", help="'' for none")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    if args.out is not None:
        config["train"]["out_dir"] = args.out
    if args.steps is not None:
        config["train"]["steps"] = args.steps
    if args.seed is not None:
        config["seed"] = args.seed
    began = time.time()
    model, vocab, result = train_vlm(config)
    train_seconds = time.time() - began
    ecfg = config.get("eval", {})
    metrics = evaluate_vlm(model, vocab, num_shapes=ecfg.get("num_shapes", 512), num_digits=ecfg.get("num_digits"),
                           seed=config["task"].get("data_seed", 0), batch_size=ecfg.get("batch_size", 128))
    metrics.update(train_seconds=train_seconds, steps=result.step, seed=config["seed"],
                   load_average=os.getloadavg(), final_train=[h for h in result.history if h["split"] == "train"][-1:])
    print(json.dumps(metrics, indent=1))
    out_dir = config["train"].get("out_dir")
    if out_dir:
        with open(os.path.join(out_dir, "eval.json"), "w") as f:
            json.dump(metrics, f, indent=1)
    if args.figure:
        draw_examples(model, vocab, args.figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
