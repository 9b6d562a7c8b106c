"""Experiments of P39 PAINT (:mod:`jattn.methods.generative.paint`) and P67 DyMU
(:mod:`jattn.methods.generative.dymu`) on the trained tiny captioning VLM (issue 16).

The subject is :class:`jattn.nn.vlm.TinyVLM` loaded with :func:`train.captioning.load_vlm` (default
``runs/vlm_shapes``, what ``make vlm`` trains). Its ``decode`` takes no score hooks or key bias, so
:func:`custom_decode` re-runs the decoder from the model's public pieces (:func:`train.vlm_methods.hooked_decode`,
whose captioner, held-out caption sets and reporting helpers this module shares) through :func:`jattn.attention` with a
per-layer ``score_mod`` and an optional per-image-key ``log(size)`` bias; without them it equals
``model.decode`` (tested). :func:`merged_encode` re-runs the ViT encoder with
DToMe merging after each layer's attention and proportional attention in the layers after it; with
``tau = +inf`` it equals ``model.encode_image`` (tested).

**PAINT (P39)**: informed visual tokens from the encoder's maps — local = top 25% of the patches by the
attention they receive in the first encoder layer (the model has no CLS token: the column mean replaces
CLS -> patch attention), summary = IQR outliers of that score in the **last** encoder layer (LLaVA reads
CLIP's penultimate layer, i.e. the last layer that feeds its projector; here that is the last one) — then the
text rows' logits on them are boosted (``alpha = 0.7, beta = 0.3``). The greedy decoder re-runs the whole
buffer each step (no KV cache), so every text row is boosted: each was the generated ("last") row when its
token was produced. The spec's layers ``[2, 32)`` of 32 skip the first layers; with 2 decoder layers the runs
use ``layers=(1,)`` and ``(0, 1)``. Metrics: ``caption_metrics`` (exact match, object accuracy, hallucination
rate) on 3 disjoint held-out sets, paired against the baseline on the same images, plus the text rows'
attention mass on the image tokens (head mean, teacher-forced on the reference captions).

**DyMU (P67)**: thresholds calibrated by the batch-level rule on *training-stream* images for a fixed ``r``
per encoder layer; at inference each held-out image keeps as many tokens as its similarities allow. The
decoder sees the merged tokens through VTU: this decoder has no positions on image tokens, so VTU is
exactly "expand the merged tokens to the 64 positions" (equivalently: the merged tokens with a ``log size``
key bias, tested equal); the ``no_vtu`` rows give the merged tokens once each (masked slots) instead. Rows:
``tau = +inf`` (the baseline, 64 tokens), calibrated ``tau`` for several ``r``, and ToMe with the same fixed
``r`` at inference (the non-adaptive budget). Tokens kept are counted after the encoder (what the decoder
would hold with the compact form), per image, and split by the number of objects (adaptivity).

``python -m train.vlm_paint_dymu [--run DIR] [--num 256] [--sets 3] [--only paint|dymu|both] [--rs 4,8,12,16]
[--skip-no-vtu] [--out FILE.json]``
"""
from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jattn.methods.generative import dymu, paint
from jattn.nn.vlm import greedy_decode, make_generate_fn, token_layout
from train.vlm_methods import (DEFAULT_RUN, METRIC_KEYS, caption_sets, experiment_parser, hooked_decode,  # noqa: F401
                               make_captioner, paired_deltas, save_result, summarise)


# --- the decoder with score mods and image-key sizes ------------------------------------------------

def custom_decode(model, image_tokens, tokens, *, score_mods=None, image_sizes=None, image_mask=None,
                  return_probs: bool = False):
    """``model.decode`` through :func:`jattn.attention` with ``score_mods={layer: score_mod}`` and
    ``image_sizes [B, N]`` (a ``log(size)`` bias on each image key; size 0 = the key removed, as
    ``image_mask``): :func:`train.vlm_methods.hooked_decode` without hooks. Returns logits ``[B, T, V]`` (and the
    per-layer maps with ``return_probs``, which runs the dense reference)."""
    logits, maps, _ = hooked_decode(model, image_tokens, tokens, score_mods=score_mods, image_sizes=image_sizes,
                                    image_mask=image_mask, impl="reference" if return_probs else "xla")
    return (logits, maps) if return_probs else logits


# --- PAINT ---------------------------------------------------------------------------------------

def paint_tokens(model, images, *, local_ratio: float = paint.DEFAULT_LOCAL_RATIO, summary_layer: int = -1):
    """``(image_tokens [B, N, dim], local, summary [B, N])``: the encoder's tokens and PAINT's informed sets from
    its maps (first layer -> local, ``summary_layer`` (default the last) -> summary)."""
    image_tokens, enc_maps = model.encode_image(images, return_probs=True)
    local, summary = paint.select_informed_visual_tokens(enc_maps[0], enc_maps[summary_layer], local_ratio)
    return image_tokens, local, summary


def paint_score_mods(local, summary, num_text: int, layers, *, alpha=paint.DEFAULT_ALPHA, beta=paint.DEFAULT_BETA):
    """``{layer: score_mod}`` boosting the text rows' logits on the local / summary image keys."""
    N = local.shape[1]
    rows = jnp.asarray(~token_layout(N, num_text)["is_image"])
    mod = paint.paint_score_mod(local, summary, alpha, beta, rows=rows, num_keys=N + num_text)
    return {int(layer): mod for layer in layers}


def make_paint_captioner(model, vocab, *, layers=(), alpha=paint.DEFAULT_ALPHA, beta=paint.DEFAULT_BETA,
                         local_ratio=paint.DEFAULT_LOCAL_RATIO, max_len=None):
    """A jitted ``fn(images, oracle=None) -> token ids [B, max_len]`` greedy captioner with PAINT in ``layers``
    (``()``: the baseline, through the same :func:`custom_decode`). ``oracle [B, N]`` bool (an ablation, not
    PAINT): boost these tokens as local ones (alpha) instead of PAINT's selection, no summary tokens."""
    max_len = model.max_text_len if max_len is None else max_len
    layers = tuple(int(layer) for layer in layers)

    def prepare(m, images, oracle):
        image_tokens, local, summary = paint_tokens(m, images, local_ratio=local_ratio)
        if oracle is not None:
            local, summary = oracle, jnp.zeros_like(oracle)
        mods = paint_score_mods(local, summary, max_len, layers, alpha=alpha, beta=beta) if layers else None
        return image_tokens, {"score_mods": mods, "impl": "xla"}

    caption = make_captioner(model, vocab, max_len=max_len, prepare=prepare)
    return lambda images, oracle=None: caption(images, None if oracle is None else jnp.asarray(oracle, bool))


def object_patches(masks, patch: int):
    """``masks [B, K, S, S]`` object masks -> ``[B, N]`` bool: the patch (row-major) holds an object pixel."""
    m = np.asarray(masks).any(1)
    B, S, _ = m.shape
    return m.reshape(B, S // patch, patch, S // patch, patch).any((2, 4)).reshape(B, -1)


def image_attention_share(model, images, inputs, layers, *, alpha, beta, local_ratio=paint.DEFAULT_LOCAL_RATIO,
                          on_object=None):
    """Per decoder layer: the text rows' attention mass on the image tokens, on the local / summary ones and (with
    ``on_object [B, N]`` bool) on the patches holding an object (head and row mean; teacher-forced ``inputs``),
    with PAINT in ``layers`` (``()``: none). Also the selection's statistics: tokens per image and the fraction of
    local / summary / all patches that hold an object."""
    graphdef, state = nnx.split(model)
    layers = tuple(int(layer) for layer in layers)

    @jax.jit
    def run(state, images, inputs):
        m = nnx.merge(graphdef, state)
        image_tokens, local, summary = paint_tokens(m, images, local_ratio=local_ratio)
        mods = paint_score_mods(local, summary, inputs.shape[1], layers, alpha=alpha, beta=beta) if layers else None
        return custom_decode(m, image_tokens, inputs, score_mods=mods, return_probs=True)[1], local, summary

    maps, local, summary = run(state, jnp.asarray(images, jnp.float32), jnp.asarray(inputs))
    N = local.shape[1]
    out = {}
    for i, m in enumerate(maps):
        rows = np.asarray(m)[:, :, N:, :N].mean(1)                                   # [B, T, N]
        out[i] = {"image": float(rows.sum(-1).mean()),
                  "local": float((rows * np.asarray(local)[:, None]).sum(-1).mean()),
                  "summary": float((rows * np.asarray(summary)[:, None]).sum(-1).mean())}
        if on_object is not None:
            out[i]["objects"] = float((rows * np.asarray(on_object)[:, None]).sum(-1).mean())
    local, summary = np.asarray(local), np.asarray(summary)
    stats = {"local_per_image": float(local.sum(-1).mean()), "summary_per_image": float(summary.sum(-1).mean())}
    if on_object is not None:
        obj = np.asarray(on_object)
        stats.update(local_on_object=float(obj[local].mean()), summary_on_object=float(obj[summary].mean()),
                     all_on_object=float(obj.mean()))
    return out, stats


def run_paint(model, vocab, *, num=256, sets=3,
              variants=(((1,), 0.7, 0.3), ((0, 1), 0.7, 0.3), ((0, 1), 1.5, 0.6)), oracle_layers=(1,)) -> dict:
    """Baseline vs PAINT variants ``(layers, alpha, beta)`` on held-out shapes, and the oracle ablation (the object
    patches boosted by alpha = 0.7 in ``oracle_layers``; ``()``: none); attention shares on 64 images."""
    from train.captioning import HELDOUT_START, canonical_caption, make_batch
    from train.images import shapes
    captioners = {"baseline": make_paint_captioner(model, vocab)}
    for layers, alpha, beta in variants:
        name = f"paint_layers{''.join(map(str, layers))}_a{alpha}_b{beta}"
        captioners[name] = make_paint_captioner(model, vocab, layers=layers, alpha=alpha, beta=beta)
    oracle = ()
    if oracle_layers:
        oracle = (f"oracle_objects_layers{''.join(map(str, oracle_layers))}_a0.7",)
        captioners[oracle[0]] = make_paint_captioner(model, vocab, layers=oracle_layers, alpha=0.7, beta=0.0)
    extras = {}
    if oracle:
        extras[oracle[0]] = object_patches(shapes(num * sets, 0, size=32, max_objects=3, start=HELDOUT_START).masks,
                                           model.patch_size)
    summary, per_set, _ = caption_sets(captioners, vocab, num=num, sets=sets, extras=extras)
    data = shapes(64, 0, size=model.image_size, max_objects=3, start=HELDOUT_START)
    caps = [canonical_caption(k, c) for k, c in zip(data.kinds, data.colours)]
    batch = make_batch(data.images, caps, vocab, model.max_text_len)
    on_object = object_patches(data.masks, model.patch_size)
    shares, counts = {}, None
    for layers, alpha, beta in (((), 0.0, 0.0),) + tuple(variants):
        name = f"paint_layers{''.join(map(str, layers))}_a{alpha}_b{beta}" if layers else "baseline"
        shares[name], counts = image_attention_share(model, batch["images"], batch["inputs"], layers, alpha=alpha,
                                                     beta=beta, on_object=on_object)
    return {"summary": summary, "per_set": per_set, "attention_share": shares, "token_counts": counts,
            "num": num, "sets": sets}


# --- DyMU ----------------------------------------------------------------------------------------

def merged_encode(model, images, *, taus=None, r=None):
    """The ViT encoder with DToMe after every layer's attention and proportional attention: ``taus`` one
    threshold per encoder layer (``+inf``: no merge), or ``r`` (int, per layer) for the batch-level calibration
    merge (each layer's threshold is :func:`~jattn.methods.generative.dymu.batch_level_threshold` of the batch).
    Returns ``(tokens [B, N, dim] (empty slots 0), sizes [B, N], mapping [B, N], taus_used [L])``."""
    if (taus is None) == (r is None):
        raise ValueError(f"give exactly one of taus and r, got taus={taus!r} and r={r!r}")
    L = model.encoder_layers
    if taus is not None:
        taus = jnp.asarray(taus, jnp.float32)
        if taus.shape != (L,):
            raise ValueError(f"taus must hold one threshold per encoder layer ({L}), got shape {taus.shape}")
    x = model.embed_patches(images)
    B, N, _ = x.shape
    sizes, mapping = dymu.initial_state(B, N)
    positions = jnp.arange(N)[None]
    used = []
    for i, block in enumerate(model.encoder):
        attn = block.attention
        h = block.attn_norm(x)
        q, k, v = attn.project(h, positions)
        out = dymu.proportional_attention(q, k, v, sizes, scale=attn.scale, impl="xla")
        x = x + attn.finish(h, out)
        metric = k.mean(axis=2)                                                       # keys averaged over heads
        if r is not None:
            s, _, _ = dymu.bipartite_similarity(metric, sizes)
            tau = dymu.batch_level_threshold(s, r)
        else:
            tau = taus[i]
        used.append(tau)
        x, sizes, mapping = dymu.bipartite_merge(x, metric, sizes, mapping, tau=tau)
        x = x + block.mlp(block.mlp_norm(x))
    x = model.project_out(jax.nn.gelu(model.project_in(model.encoder_norm(x))))
    x = jnp.where((sizes > 0)[..., None], x, 0.0)
    return x, sizes, mapping, jnp.stack(used)


def calibrate_taus(model, r: int, *, num: int = 512, batch_size: int = 64, seed: int = 0) -> np.ndarray:
    """DyMU's batch-level thresholds for a fixed ``r`` per layer: the mean over batches of training-stream shapes
    images (never held-out ones) of each layer's batch threshold."""
    from train.captioning import shapes_examples
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, images):
        return merged_encode(nnx.merge(graphdef, state), images, r=r)[3]

    batch_size = min(int(batch_size), int(num))
    ex = shapes_examples(num, 0, seed)
    taus = [np.asarray(run(state, jnp.asarray(ex.images[i:i + batch_size])))
            for i in range(0, num - batch_size + 1, batch_size)]
    return np.mean(taus, axis=0)


def make_dymu_captioner(model, vocab, *, taus=None, r=None, vtu: str = "expand", max_len=None):
    """A jitted ``fn(images, taus=None) -> (token ids [B, max_len], tokens kept [B])``: the merged encoder (``taus``,
    a traced argument: one compile serves every threshold, given here or per call; or a fixed ``r`` per image,
    ToMe) then the unmodified greedy decoder on ``vtu="expand"`` (the merged tokens
    expanded to the original positions: VTU), ``"bias"`` (the compact tokens with a log-size key bias, equal)
    or ``"none"`` (each merged token once, no size weighting)."""
    if vtu not in ("expand", "bias", "none"):
        raise ValueError(f"vtu must be 'expand', 'bias' or 'none', got {vtu!r}")
    graphdef, state = nnx.split(model)
    max_len = model.max_text_len if max_len is None else max_len
    generate = make_generate_fn(graphdef, bos=vocab.bos, eos=vocab.eos, pad=vocab.pad, max_len=max_len)
    default_taus = None if taus is None else np.asarray(taus, np.float32)

    def encode(m, images, taus):
        if r is not None:                                  # ToMe: fixed r per image and layer
            x = m.embed_patches(images)
            B, N, _ = x.shape
            sizes, mapping = dymu.initial_state(B, N)
            for block in m.encoder:
                attn = block.attention
                h = block.attn_norm(x)
                q, k, v = attn.project(h, jnp.arange(N)[None])
                x = x + attn.finish(h, dymu.proportional_attention(q, k, v, sizes, scale=attn.scale, impl="xla"))
                x, sizes, mapping = dymu.bipartite_merge(x, k.mean(axis=2), sizes, mapping, r=r)
                x = x + block.mlp(block.mlp_norm(x))
            x = m.project_out(jax.nn.gelu(m.project_in(m.encoder_norm(x))))
            return jnp.where((sizes > 0)[..., None], x, 0.0), sizes, mapping
        tokens, sizes, mapping, _ = merged_encode(m, images, taus=taus)
        return tokens, sizes, mapping

    @jax.jit
    def run(state, images, taus):
        m = nnx.merge(graphdef, state)
        tokens, sizes, mapping = encode(m, images, taus)
        kept = dymu.tokens_kept(sizes)
        if vtu == "expand":
            return generate(state, dymu.vtu_expand(tokens, mapping), None), kept
        if vtu == "none":
            return generate(state, tokens, sizes > 0), kept

        def logits_fn(buffer):
            return custom_decode(m, tokens, buffer, image_sizes=sizes)

        return greedy_decode(logits_fn, images.shape[0], max_len, bos=vocab.bos, eos=vocab.eos, pad=vocab.pad), kept

    def call(images, taus=None):
        taus = default_taus if taus is None else np.asarray(taus, np.float32)
        if taus is None and r is None:
            raise ValueError("make_dymu_captioner needs taus (here or per call) or r")
        return tuple(np.asarray(a) for a in run(state, jnp.asarray(images, jnp.float32),
                                                 None if r is not None else jnp.asarray(taus)))

    return call


def run_dymu(model, vocab, *, num=256, sets=3, rs=(4, 8, 12, 16), calib_num=512, batch_size=128,
             no_vtu: bool = True) -> dict:
    """Tokens kept vs caption metrics: ``tau = +inf`` (baseline), calibrated ``tau`` per ``r`` (VTU, and without
    VTU when ``no_vtu``), ToMe fixed ``r``."""
    from train.captioning import caption_metrics, heldout_shapes
    taus = {r: calibrate_taus(model, r, num=calib_num) for r in rs}
    inf = np.full((model.encoder_layers,), np.inf, np.float32)
    expand = make_dymu_captioner(model, vocab)                       # one compile for every threshold
    none = make_dymu_captioner(model, vocab, vtu="none") if no_vtu else None
    captioners = {"baseline_tau_inf": lambda images: expand(images, inf)}
    for r in rs:
        captioners[f"dymu_r{r}"] = lambda images, t=taus[r]: expand(images, t)
        if no_vtu:
            captioners[f"dymu_r{r}_no_vtu"] = lambda images, t=taus[r]: none(images, t)
        captioners[f"tome_fixed_r{r}"] = make_dymu_captioner(model, vocab, r=r)
    everything = heldout_shapes(num * sets, 0)
    from train.images import shapes
    from train.captioning import HELDOUT_START
    objects = (shapes(num * sets, 0, size=32, max_objects=3, start=HELDOUT_START).kinds >= 0).sum(-1)
    results = {name: [] for name in captioners}
    kept_all = {name: [] for name in captioners}
    for s in range(sets):
        images = everything.images[s * num:(s + 1) * num]
        refs = everything.captions[s * num:(s + 1) * num]
        for name, cap in captioners.items():
            preds, kept = [], []
            for i in range(0, num, batch_size):
                ids, k = cap(images[i:i + batch_size])
                preds += [vocab.decode(row) for row in ids]
                kept.append(k)
            kept = np.concatenate(kept)
            kept_all[name].append(kept)
            m = caption_metrics(preds, refs)
            m["tokens_kept"] = float(kept.mean())
            results[name].append(m)
    summary = {}
    for name, rows in results.items():
        summary[name] = summarise(rows, METRIC_KEYS + ("tokens_kept",))
        summary[name].update(paired_deltas(rows, results["baseline_tau_inf"], METRIC_KEYS))
        kept = np.concatenate(kept_all[name])
        summary[name]["tokens_kept_image_std"] = float(kept.std())
        summary[name]["tokens_kept_by_objects"] = {int(c): float(kept[objects == c].mean())
                                                   for c in np.unique(objects)}
    return {"summary": summary, "per_set": results, "taus": {r: t.tolist() for r, t in taus.items()},
            "num": num, "sets": sets, "calib_num": calib_num}


def main(argv=None) -> int:
    parser = experiment_parser(__doc__, ("paint", "dymu"))
    parser.add_argument("--rs", default="4,8,12,16", help="DyMU: the calibration r per encoder layer, comma-separated")
    parser.add_argument("--skip-no-vtu", action="store_true", help="DyMU: leave out the no-VTU ablation rows")
    args = parser.parse_args(argv)
    from train.captioning import load_vlm
    model, vocab = load_vlm(args.run)
    result = {"run": args.run}
    began = time.time()
    if args.only in ("paint", "both"):
        result["paint"] = run_paint(model, vocab, num=args.num, sets=args.sets)
        print(json.dumps({k: result["paint"][k] for k in ("summary", "attention_share", "token_counts")}, indent=1),
              flush=True)
    if args.only in ("dymu", "both"):
        rs = tuple(int(r) for r in args.rs.split(","))
        result["dymu"] = run_dymu(model, vocab, num=args.num, sets=args.sets, rs=rs, no_vtu=not args.skip_no_vtu)
        print(json.dumps({k: result["dymu"][k] for k in ("summary", "taus")}, indent=1), flush=True)
    result["seconds"] = time.time() - began
    save_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
