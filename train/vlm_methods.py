"""Experiments of the training-free VLM attention methods on the trained tiny captioning VLM (issue 16):
P66 VL-SAM (:mod:`jattn.methods.generative.vl_sam`) and P14 VAR (:mod:`jattn.methods.generative.var`).

The subject is :class:`jattn.nn.vlm.TinyVLM` loaded with :func:`train.captioning.load_vlm` (default
``runs/vlm_shapes``, what ``make vlm`` trains: 96% caption exact match). Its ``decode`` has no per-layer
hooks, so :func:`hooked_decode` re-runs the decoder from the model's public pieces (each block's norms,
``Attention.project`` / ``finish``, MLP; the prefix-LM mask of :func:`jattn.nn.vlm.prefix_lm_mask`) with the
dense reference attention, so that a layer's normalised probabilities can be rewritten by a ``prob_mod``
built from that layer's *input hidden state* (VAR's sink detection needs it). Without hooks it equals
``model.decode`` (tested). It also takes per-layer ``score_mods`` and a per-image-key ``log(size)`` bias, and
runs the blockwise :func:`jattn.attention` path when no maps are needed: :mod:`train.vlm_paint_dymu` (PAINT,
DyMU) decodes through it too, with its captioner (:func:`make_captioner`), held-out caption sets
(:func:`caption_sets`) and reporting helpers.

**VL-SAM (P66)**: held-out shapes images, teacher-forced on their reference caption; for every group
(``count colour kind``) the query rows are the text positions that *predict* the group's colour and kind
words (where the model reads the image to produce them). Maps over the 8x8 patch grid, compared against the
union of the masks of that group's objects (pixels, the map upsampled by the patch size):

- ``vl_sam``: mean-max head weights (per layer, per group) + regularised attention flow over the decoder
  layers (the paper's recipe; ``residual = 0``);
- ``vl_sam_residual``: the same with the rollout's residual term ``0.5 A + 0.5 I``;
- ``flow_mean_noreg``: head mean, unregularised rollout (the ablation);
- ``vl_sam_residual_noreg``: the residual flow without the regulariser (its ablation);
- ``last_layer_mean``: the last decoder layer's head-mean attention of the same rows (the baseline), and
  ``first_layer_mean``, ``*_meanmax`` (single layers with the mean-max head weights);
- ``centre_prior``: a centred Gaussian (content-free baseline).

Metrics: IoU of ``map >= 0.5 * max`` with the mask, and pointing accuracy (the argmax patch overlaps the
mask: the spec's "works" measure). Three disjoint held-out image sets; mean +- std over them.

**VAR (P14)**: greedy captions of held-out shapes with and without VAR (same images, same decoder), with
``caption_metrics`` (exact match, object accuracy, hallucination rate). ``D_sink`` is calibrated on
*training-stream* images (:func:`jattn.methods.generative.var.massive_dims` at the hooked layer's input),
``tau`` by :func:`~jattn.methods.generative.var.scaled_tau`. The model has 2 decoder layers, so the spec's
"layers 2..L-1, skip the last" leaves no layer; the runs apply VAR to ``layers=(0,)`` (all but the last)
and ``(0, 1)`` (all), both reported.

``python -m train.vlm_methods [--run DIR] [--num 256] [--sets 3] [--only vl_sam|var|both] [--out FILE.json]
[--figure docs/img/vlm_methods_vl_sam.png]``
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jattn.core.reference import reference_attention
from jattn.methods.generative import var as var_lib
from jattn.methods.generative import vl_sam
from jattn.nn.vlm import greedy_decode, prefix_lm_mask, token_layout
from jattn.ops.attention import attention

DEFAULT_RUN = "runs/vlm_shapes"
METRIC_KEYS = ("exact_match", "object_accuracy", "hallucination_rate", "captions_hallucinating")


# --- the hooked decoder --------------------------------------------------------------------------------

def hooked_decode(model, image_tokens, tokens, *, hooks: Mapping[int, Callable] | None = None,
                  score_mods: Mapping[int, Callable] | None = None, image_sizes=None, image_mask=None,
                  impl: str = "reference"):
    """``model.decode`` with per-layer probability hooks: ``hooks={i: fn}`` where ``fn(x [B, L, dim]) ->
    prob_mod`` (or None) gets layer ``i``'s *input* hidden state (image then text tokens) and returns the
    ``prob_mod(probs [B, H, L, L]) -> probs`` for that layer; ``score_mods={i: score_mod}`` (or None) rewrites
    layer ``i``'s logits; ``image_sizes [B, N]`` adds a ``log(size)`` bias on each image key (size 0 = the key
    removed, as ``image_mask``). ``impl="reference"`` (the dense fp32 reference, with maps) or ``"xla"`` (the
    blockwise :func:`jattn.attention` path: no maps, no ``hooks``). Returns ``(logits [B, T, V], maps,
    hiddens)``: the per-layer (modified) maps (empty with ``"xla"``) and the per-layer input hidden states."""
    hooks, score_mods = dict(hooks or {}), dict(score_mods or {})
    for name, table in (("hooks", hooks), ("score_mods", score_mods)):
        for key, fn in table.items():
            if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < model.decoder_layers:
                raise ValueError(f"{name} keys must be decoder layer indices in [0, {model.decoder_layers}), "
                                 f"got {key!r}")
            if not callable(fn) and not (name == "score_mods" and fn is None):
                raise TypeError(f"{name}[{key}] must be a function "
                                f"{'x -> prob_mod' if name == 'hooks' else 'score_mod'}, got {type(fn).__name__}")
    if impl not in ("reference", "xla"):
        raise ValueError(f"impl must be 'reference' or 'xla', got {impl!r}")
    if hooks and impl != "reference":
        raise ValueError(f"hooks (prob_mod) need impl='reference', got impl={impl!r}")
    if not hasattr(image_tokens, "ndim") or image_tokens.ndim != 3 or image_tokens.shape[-1] != model.dim:
        raise ValueError(f"image_tokens must be [B, N, dim={model.dim}], got shape {getattr(image_tokens, 'shape', None)}")
    B, N = image_tokens.shape[:2]
    tokens = model.check_tokens(tokens, B)
    T = tokens.shape[1]
    bias = None
    if image_sizes is not None:
        image_sizes = jnp.asarray(image_sizes, jnp.float32)
        if image_sizes.shape != (B, N):
            raise ValueError(f"image_sizes must be [B={B}, N={N}], got shape {image_sizes.shape}")
        keep = image_sizes > 0
        image_mask = keep if image_mask is None else (jnp.asarray(image_mask) & keep)
        logs = jnp.where(keep, jnp.log(jnp.where(keep, image_sizes, 1.0)), 0.0)
        bias = jnp.concatenate([logs, jnp.zeros((B, T), jnp.float32)], axis=1)[:, None, None, :]
    mask = prefix_lm_mask(N, T, image_mask)
    text = model.embed(tokens) + model.text_pos[:, :T]
    x = jnp.concatenate([image_tokens.astype(jnp.float32) + model.image_type[...], text], axis=1)
    positions = jnp.arange(N + T)[None]
    maps, hiddens = [], []
    for i, block in enumerate(model.decoder):
        if block.norm_position != "pre" or block.attention.method != "softmax":
            raise ValueError("hooked_decode needs pre-norm softmax decoder blocks")
        hiddens.append(x)
        prob_mod = hooks[i](x) if i in hooks else None
        attn = block.attention
        h = block.attn_norm(x)
        q, k, v = attn.project(h, positions)
        if impl == "reference":
            out, probs = reference_attention(q, k, v, causal=attn.causal, mask=mask, bias=bias, scale=attn.scale,
                                             score_mod=score_mods.get(i), prob_mod=prob_mod, return_probs=True)
            maps.append(probs)
        else:
            out = attention(q, k, v, causal=attn.causal, mask=mask, bias=bias, scale=attn.scale,
                            score_mod=score_mods.get(i), impl="xla")
        x = x + attn.finish(h, out)
        x = x + block.mlp(block.mlp_norm(x))
    logits = model.head(model.final_norm(x[:, N:])).astype(jnp.float32)
    return logits, maps, hiddens


# --- VAR -------------------------------------------------------------------------------------------

def var_hooks(num_image: int, num_text: int, layers, sink_dims, tau: float, *, rho=0.5, alpha=0.2, p=0.6):
    """``hooks`` for :func:`hooked_decode` that run VAR in ``layers``: sinks from the layer's input, query rows =
    the text tokens."""
    layout = token_layout(num_image, num_text)
    is_image = layout["is_image"]

    def make(x):
        sink = var_lib.detect_sink_tokens(x, sink_dims, tau)
        return var_lib.var_prob_mod(is_image, sink, rho=rho, alpha=alpha, p=p, query_mask=~is_image)

    return {int(i): make for i in layers}


def make_captioner(model, vocab, *, hooks_fn=None, max_len=None, prepare=None):
    """A jitted ``fn(images [B, S, S, 3], *extra) -> token ids [B, max_len]`` greedy captioner through
    :func:`hooked_decode`; ``hooks_fn(num_image, num_text) -> hooks`` (None: no hooks). Or ``prepare(model,
    images, *extra) -> (image_tokens, keywords)`` in place of the plain encoder and ``hooks_fn``: the image tokens
    and :func:`hooked_decode`'s keywords (``score_mods``, ``impl``, ...), traced with the per-call ``extra``
    arguments (arrays or None)."""
    if hooks_fn is not None and prepare is not None:
        raise ValueError("give hooks_fn or prepare, not both")
    graphdef, state = nnx.split(model)
    max_len = model.max_text_len if max_len is None else max_len

    @jax.jit
    def run(state, images, *extra):
        m = nnx.merge(graphdef, state)
        if prepare is not None:
            image_tokens, keywords = prepare(m, images, *extra)
        else:
            image_tokens = m.encode_image(images)
            keywords = {"hooks": hooks_fn(image_tokens.shape[1], max_len) if hooks_fn is not None else None}

        def logits_fn(buffer):
            return hooked_decode(m, image_tokens, buffer, **keywords)[0]

        return greedy_decode(logits_fn, images.shape[0], max_len, bos=vocab.bos, eos=vocab.eos, pad=vocab.pad)

    return lambda images, *extra: np.asarray(run(state, jnp.asarray(images, jnp.float32), *extra))


def calibrate_sinks(model, vocab, layer: int, *, num: int = 128, top_k: int = 2, seed: int = 0):
    """``(D_sink, values)`` for ``layer``: :func:`~jattn.methods.generative.var.massive_dims` of the layer's
    input hidden states on training-stream shapes images (teacher-forced on their captions; never held-out
    images), and every token's ``max_{d in D_sink} |h_hat_d|`` there (for quantile thresholds)."""
    from train.captioning import make_batch, shapes_examples
    ex = shapes_examples(num, 0, seed)
    batch = make_batch(ex.images, ex.captions, vocab, model.max_text_len)
    _, _, hiddens = hooked_decode(model, model.encode_image(jnp.asarray(batch["images"])), jnp.asarray(batch["inputs"]))
    dims = var_lib.massive_dims(hiddens[layer], top_k=top_k)
    values = np.abs(np.asarray(var_lib.rms_normalize(hiddens[layer]))[..., dims]).max(-1)
    return dims, values


def sink_statistics(model, images, tokens, layer: int, sink_dims, tau: float) -> dict:
    """How many tokens :func:`detect_sink_tokens` flags at ``layer`` (image / text, per image) and the
    image-attention share those visual sinks receive from the text rows (head mean)."""
    image_tokens = model.encode_image(jnp.asarray(images))
    _, maps, hiddens = hooked_decode(model, image_tokens, jnp.asarray(tokens))
    N = image_tokens.shape[1]
    sink = np.asarray(var_lib.detect_sink_tokens(hiddens[layer], sink_dims, tau))
    probs = np.asarray(maps[layer])[:, :, N:, :N].mean(axis=(1, 2))             # [B, N] text -> image
    share = (probs * sink[:, :N]).sum(-1) / np.maximum(probs.sum(-1), 1e-9)
    hat = np.abs(np.asarray(var_lib.rms_normalize(hiddens[layer]))[..., np.asarray(sink_dims)]).max(-1)
    return {"image_sinks_per_image": float(sink[:, :N].sum(-1).mean()),
            "text_sinks_per_caption": float(sink[:, N:].sum(-1).mean()),
            "visual_sink_attention_share": float(share.mean()),
            "max_rms_value_image": float(hat[:, :N].max()), "max_rms_value_text": float(hat[:, N:].max()),
            "median_rms_value_image": float(np.median(hat[:, :N]))}


def run_var(model, vocab, *, num: int = 256, sets: int = 3, p: float = 0.6, rho: float = 0.5, alpha: float = 0.2,
            variants=(((0,), "scaled"), ((0, 1), "scaled"), ((0, 1), 0.95)), top_k: int = 2,
            batch_size: int = 128) -> dict:
    """Captions of ``sets`` disjoint held-out shapes sets (``num`` each) without and with VAR. ``variants``:
    ``(layers, tau)`` pairs, ``tau`` a float threshold, ``"scaled"`` (:func:`scaled_tau` of the width: the
    spec's 20 rescaled) or a quantile in (0, 1) written as a float < 1 (that quantile of the calibration
    tokens' ``max_D |h_hat|`` at each layer: flags about ``1 - q`` of the tokens)."""
    from train.captioning import heldout_shapes, make_batch
    T = model.max_text_len
    calib = {layer: calibrate_sinks(model, vocab, layer, top_k=top_k) for layer in range(model.decoder_layers)}
    dims = {layer: c[0] for layer, c in calib.items()}

    def tau_of(layer, spec):
        if spec == "scaled":
            return var_lib.scaled_tau(model.dim)
        if float(spec) < 1.0:
            return float(np.quantile(calib[layer][1], float(spec)))
        return float(spec)

    hooks_fns, taus = {"baseline": None}, {}
    for layers, spec in variants:
        name = f"var_layers{''.join(map(str, layers))}_tau_{spec}"
        taus[name] = {layer: tau_of(layer, spec) for layer in layers}

        def hooks_fn(n, t, layers=layers, name=name):
            hooks = {}
            for layer in layers:
                hooks.update(var_hooks(n, t, (layer,), dims[layer], taus[name][layer], rho=rho, alpha=alpha, p=p))
            return hooks
        hooks_fns[name] = hooks_fn
    captioners = {name: make_captioner(model, vocab, hooks_fn=fn) for name, fn in hooks_fns.items()}
    summary, results, changed = caption_sets(captioners, vocab, num=num, sets=sets, batch_size=batch_size)
    stats = []
    everything = heldout_shapes(num * sets, 0)
    for s in range(sets):
        images = everything.images[s * num:(s + 1) * num]
        refs = everything.captions[s * num:(s + 1) * num]
        batch = make_batch(images[:64], refs[:64], vocab, T)
        stats.append({name: {layer: sink_statistics(model, batch["images"], batch["inputs"], layer, dims[layer], tau)
                             for layer, tau in layer_taus.items()} for name, layer_taus in taus.items()})
    return {"summary": summary, "per_set": results, "captions_changed": changed,
            "sink_dims": {k: v.tolist() for k, v in dims.items()},
            "taus": taus, "p": p, "rho": rho, "alpha": alpha, "sink_stats": stats, "num": num, "sets": sets}


# --- VL-SAM ----------------------------------------------------------------------------------------

def group_rows(caption: str, vocab, length: int):
    """The caption's groups with the text positions predicting their colour and kind words:
    ``[((colour, kind), rows bool [length])]`` (inputs ``[bos, w1, ...]``: row ``t`` predicts word ``t + 1``)."""
    from train.captioning import split_words
    words = split_words(caption)
    out, start = [], 0
    for i, w in enumerate(words + [","]):
        if w in (",", "and"):
            group = words[start:i]
            start = i + 1
            if len(group) == 3:                        # count colour kind: words i-3, i-2, i-1
                kind = group[2][:-1] if group[0] != "a" and group[2].endswith("s") else group[2]
                rows = np.zeros(length, bool)
                rows[[i - 2, i - 1]] = True            # word j is ids[j + 1], predicted by row j
                out.append(((group[1], kind), rows))
    return out


def vl_sam_maps(model, images, inputs, rows, *, thresh: float = 0.5):
    """The maps ``[G, h, w]`` of every method for ``G`` (image, group) pairs: ``images [G, S, S, 3]``, teacher
    inputs ``[G, T]``, query ``rows [G, T]`` (bool, text positions)."""
    image_tokens = model.encode_image(jnp.asarray(images))
    _, maps, _ = hooked_decode(model, image_tokens, jnp.asarray(inputs))
    G, N = image_tokens.shape[:2]
    T = inputs.shape[1]
    side = model.image_size // model.patch_size
    layout = token_layout(N, T)
    is_image = layout["is_image"]
    query = np.concatenate([np.zeros((G, N), bool), rows], axis=1)              # [G, L]
    mask = np.asarray(prefix_lm_mask(N, T))[0, 0]
    weights = [vl_sam.head_importance_meanmax(a, key_mask=is_image, query_mask=query) for a in maps]  # [G, H] each
    grid = (side, side)
    out = {}
    for name, kw in (("vl_sam", dict(head_weights=weights, regularize=True, residual=0.0)),
                     ("vl_sam_residual", dict(head_weights=weights, regularize=True, residual=0.5)),
                     ("flow_mean_noreg", dict(has_heads=True, regularize=False, residual=0.0)),
                     ("vl_sam_residual_noreg", dict(head_weights=weights, regularize=False, residual=0.5))):
        flow = vl_sam.attention_rollout(list(maps), masks=jnp.asarray(mask), **kw)
        out[name] = np.asarray(vl_sam.localization_map(flow, jnp.asarray(query), is_image, grid))
    for name, layer in (("last_layer", -1), ("first_layer", 0)):
        for suffix, w in (("_mean", None), ("_meanmax", weights[layer])):
            agg = vl_sam.aggregate_heads(maps[layer], w)
            out[name + suffix] = np.asarray(vl_sam.localization_map(agg, jnp.asarray(query), is_image, grid))
    out["centre_prior"] = np.broadcast_to(vl_sam.centre_prior(grid), (G,) + grid)
    return out


def score_maps(maps: dict, targets, patch: int, thresh: float = 0.5) -> dict:
    """Per method: mean IoU (``map >= thresh * max`` upsampled by ``patch`` vs ``targets [G, S, S]``) and
    pointing accuracy (the argmax patch holds a target pixel)."""
    targets = np.asarray(targets, bool)
    result = {}
    for name, m in maps.items():
        m = np.asarray(m)
        pred = np.asarray(vl_sam.threshold_map(jnp.asarray(m), thresh))
        up = np.kron(pred, np.ones((patch, patch), bool)) if pred.ndim == 2 else \
            pred.repeat(patch, axis=-2).repeat(patch, axis=-1)
        iou = vl_sam.mask_iou(up, targets)
        G, h, w = m.shape
        flat = np.argmax(m.reshape(G, -1), -1)
        r, c = flat // w, flat % w
        hit = np.array([targets[g, r[g] * patch:(r[g] + 1) * patch, c[g] * patch:(c[g] + 1) * patch].any()
                        for g in range(G)])
        result[name] = {"iou": float(iou.mean()), "pointing": float(hit.mean())}
    return result


def group_examples(data, vocab, max_len: int):
    """One example per (image, caption group) of a :class:`train.images.Shapes` batch: lists of images, teacher
    inputs ``[max_len - 1]`` (the canonical caption), query rows and the target mask (the union of the masks
    of the group's objects)."""
    from train.captioning import canonical_caption
    from train.images import COLOUR_NAMES, SHAPE_NAMES
    imgs, inputs, rows, targets = [], [], [], []
    for i in range(len(data.images)):
        cap = canonical_caption(data.kinds[i], data.colours[i])
        ids = vocab.encode(cap, max_len)[:-1]
        for (colour, kind), r in group_rows(cap, vocab, max_len - 1):
            sel = (data.kinds[i] == SHAPE_NAMES.index(kind)) & (data.colours[i] == COLOUR_NAMES.index(colour))
            if not sel.any():
                raise ValueError(f"caption group {colour} {kind} names no object of image {i}")
            imgs.append(data.images[i])
            inputs.append(ids)
            rows.append(r)
            targets.append(data.masks[i][sel].any(0))
    return imgs, inputs, rows, targets


def run_vl_sam(model, vocab, *, num: int = 256, sets: int = 3, thresh: float = 0.5) -> dict:
    """VL-SAM and baselines on ``sets`` disjoint held-out shapes sets of ``num`` images (every group)."""
    from train.captioning import HELDOUT_START
    from train.images import shapes
    per_set = []
    for s in range(sets):
        data = shapes(num, 0, size=model.image_size, max_objects=3, start=HELDOUT_START + s * num)
        imgs, inputs, rows, targets = group_examples(data, vocab, model.max_text_len)
        maps = {}
        for j in range(0, len(imgs), 256):
            part = vl_sam_maps(model, np.stack(imgs[j:j + 256]), np.stack(inputs[j:j + 256]),
                               np.stack(rows[j:j + 256]))
            for k, v in part.items():
                maps.setdefault(k, []).append(np.asarray(v))
        maps = {k: np.concatenate(v) for k, v in maps.items()}
        scores = score_maps(maps, np.stack(targets), model.patch_size, thresh)
        scores["num_groups"] = len(imgs)
        scores["mask_fraction"] = float(np.mean(np.stack(targets)))
        per_set.append(scores)
    names = [k for k in per_set[0] if isinstance(per_set[0][k], dict)]
    summary = {n: summarise([ps[n] for ps in per_set], ("iou", "pointing")) for n in names}
    return {"summary": summary, "per_set": per_set, "num": num, "sets": sets, "thresh": thresh}


def draw_vl_sam(model, vocab, path: str, *, num: int = 6, methods=("vl_sam_residual", "vl_sam", "last_layer_mean")):
    """A PNG: held-out images with one named group each (the first of the caption), its mask, and the maps of
    ``methods`` (the argmax patch marked)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from train.captioning import HELDOUT_START, canonical_caption
    from train.images import COLOUR_NAMES, SHAPE_NAMES, shapes
    data = shapes(num, 0, size=model.image_size, max_objects=3, start=HELDOUT_START + 5000)
    T = model.max_text_len - 1
    inputs, rows, targets, titles = [], [], [], []
    for i in range(num):
        cap = canonical_caption(data.kinds[i], data.colours[i])
        (colour, kind), r = group_rows(cap, vocab, T)[0]
        sel = (data.kinds[i] == SHAPE_NAMES.index(kind)) & (data.colours[i] == COLOUR_NAMES.index(colour))
        inputs.append(vocab.encode(cap, model.max_text_len)[:-1])
        rows.append(r)
        targets.append(data.masks[i][sel].any(0))
        titles.append(f"{colour} {kind}")
    maps = vl_sam_maps(model, data.images, np.stack(inputs), np.stack(rows))
    fig, axes = plt.subplots(2 + len(methods), num, figsize=(1.9 * num, 2.0 * (2 + len(methods))))
    for j in range(num):
        axes[0, j].imshow(data.images[j])
        axes[0, j].set_title(titles[j], fontsize=8)
        axes[1, j].imshow(targets[j], cmap="gray")
        axes[1, j].set_title("mask", fontsize=7)
        for k, name in enumerate(methods):
            m = maps[name][j]
            axes[2 + k, j].imshow(m, cmap="magma")
            r, c = np.unravel_index(np.argmax(m), m.shape)
            axes[2 + k, j].plot([c], [r], "c+", markersize=9)
            axes[2 + k, j].set_title(name, fontsize=7)
        for ax in axes[:, j]:
            ax.axis("off")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- reporting -------------------------------------------------------------------------------------

def summarise(rows, keys) -> dict:
    """``{key: [mean, std]}`` over the rows (std with ddof=0)."""
    return {k: [float(np.mean([r[k] for r in rows])), float(np.std([r[k] for r in rows]))] for k in keys}


def paired_deltas(rows, base_rows, keys) -> dict:
    """``{"delta_" + key: [mean, std]}`` of ``row[key] - base_row[key]`` over paired rows (the same image sets)."""
    out = {}
    for k in keys:
        d = [r[k] - b[k] for r, b in zip(rows, base_rows)]
        out["delta_" + k] = [float(np.mean(d)), float(np.std(d))]
    return out


def caption_sets(captioners: dict, vocab, *, num: int, sets: int, batch_size: int = 128, extras=None):
    """Captions of ``sets`` disjoint held-out shapes sets of ``num`` images by every captioner (``fn(images,
    *extra) -> ids``; ``"baseline"``, when there, first): ``caption_metrics`` per set, and per captioner the mean,
    std over the sets of each metric, of the fraction of captions that differ from the baseline's and of the
    paired deltas to the baseline. ``extras``: ``{name: array [num * sets, ...]}``, a per-image argument that
    captioner also gets (sliced with its images). Returns ``(summary, per_set, captions_changed)``."""
    from train.captioning import caption_metrics, heldout_shapes
    extras = dict(extras or {})
    everything = heldout_shapes(num * sets, 0)
    results = {name: [] for name in captioners}
    changed = {name: [] for name in captioners}
    for s in range(sets):
        images = everything.images[s * num:(s + 1) * num]
        refs = everything.captions[s * num:(s + 1) * num]
        base = None
        for name, cap in captioners.items():
            preds = []
            for i in range(0, num, batch_size):
                extra = (extras[name][s * num + i:s * num + min(i + batch_size, num)],) if name in extras else ()
                preds += [vocab.decode(r) for r in cap(images[i:i + batch_size], *extra)]
            base = preds if name == "baseline" else base
            results[name].append(caption_metrics(preds, refs))
            changed[name].append(float(np.mean([a != b for a, b in zip(preds, base)])) if base else 0.0)
    summary = {}
    for name, rows in results.items():
        summary[name] = summarise(rows, METRIC_KEYS)
        summary[name]["captions_changed"] = [float(np.mean(changed[name])), float(np.std(changed[name]))]
        if "baseline" in results:
            summary[name].update(paired_deltas(rows, results["baseline"], METRIC_KEYS))
    return summary, results, changed


def experiment_parser(doc: str, parts) -> argparse.ArgumentParser:
    """The flags of the VLM experiment scripts: ``--run DIR``, ``--num``, ``--sets``, ``--only PART|both`` (``parts``
    the experiment names) and ``--out FILE.json``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--run", default=DEFAULT_RUN)
    parser.add_argument("--num", type=int, default=256)
    parser.add_argument("--sets", type=int, default=3)
    parser.add_argument("--only", choices=(*parts, "both"), default="both")
    parser.add_argument("--out", default="")
    return parser


def save_result(path: str, result: dict) -> None:
    """``result`` as indented JSON at ``path`` (its folder made); nothing when ``path`` is empty."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=1, default=str)


def main(argv=None) -> int:
    parser = experiment_parser(__doc__, ("vl_sam", "var"))
    parser.add_argument("--figure", default="", help="a VL-SAM map PNG (e.g. docs/img/vlm_methods_vl_sam.png)")
    args = parser.parse_args(argv)
    from train.captioning import load_vlm
    model, vocab = load_vlm(args.run)
    result = {"run": args.run}
    began = time.time()
    if args.only in ("vl_sam", "both"):
        result["vl_sam"] = run_vl_sam(model, vocab, num=args.num, sets=args.sets)
        print(json.dumps(result["vl_sam"]["summary"], indent=1), flush=True)
    if args.only in ("var", "both"):
        result["var"] = run_var(model, vocab, num=args.num, sets=args.sets)
        print(json.dumps({k: result["var"][k] for k in ("summary", "sink_dims", "taus", "sink_stats")}, indent=1,
                         default=str), flush=True)
    if args.figure:
        draw_vl_sam(model, vocab, args.figure)
    result["seconds"] = time.time() - began
    save_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
