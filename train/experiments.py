"""Post-training analyses that configs name with ``analysis = {...}`` (P50 sink metric, P62 ICL patterns)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jattn.nn.attention_maps import attention_entropy, sink_metric
from jattn.nn.icl import (best_scale, debiased_gd_predictor, kq_diagonality, kq_homogeneity,
                          ov_last_entry_ratio, ov_zero_sum_residual)


def sink_analysis(model, task, config, *, probe_tokens: int = 64, samples: int = 16, eps: float = 0.3) -> dict:
    """P50: ``Sink_eps`` over (samples, layers, heads) on ``probe_tokens``-long held-out sequences."""
    batch = task.data.batch(int(config["seed"]), 10_000, samples, split="eval")
    tokens = jnp.asarray(batch["inputs"][:, :probe_tokens])
    _, maps = nnx.jit(lambda m, t: m(t, return_probs=True))(model, tokens)
    stacked = jnp.stack(maps, axis=1)                       # [samples, layers, heads, T, T]
    alpha, pct = sink_metric(stacked, eps=eps)
    per_layer = [float(sink_metric(stacked[:, l], eps=eps)[1]) for l in range(stacked.shape[1])]
    return {"sink_pct": float(pct), "sink_pct_per_layer": per_layer, "eps": eps,
            "mean_alpha_0": float(jnp.mean(alpha[..., 0])), "mean_alpha_1_to_7": float(jnp.mean(alpha[..., 1:8])),
            "mean_row_entropy": float(jnp.mean(attention_entropy(stacked[..., 1:, :])))}


def icl_analysis(model, task, config, *, samples: int = 2048) -> dict:
    """P62: KQ/OV structure, test MSE vs the best debiased-GD predictor, length generalisation (2n)."""
    seed, n = int(config["seed"]), task.data.num_context
    out = {}
    for name, length in (("n", n), ("2n", 2 * n)):
        batch = task.data.batch(seed, 20_000, samples, split="eval", num_context=length)
        tokens, target = jnp.asarray(batch["tokens"]), jnp.asarray(batch["target"])
        prediction = nnx.jit(lambda m, t: m(t))(model, tokens)
        unit = debiased_gd_predictor(tokens, 1.0)
        gd = best_scale(unit, target) * unit
        out[f"mse_model_{name}"] = float(jnp.mean((prediction - target) ** 2))
        out[f"mse_best_debiased_gd_{name}"] = float(jnp.mean((gd - target) ** 2))
        out[f"mse_zero_{name}"] = float(jnp.mean(target ** 2))
    kq, ov = model.kq(), model.ov()
    d = task.data.dim
    out.update({
        "kq_diagonality": np.asarray(kq_diagonality(kq, d)).round(3).tolist(),
        "kq_diag_mean": np.asarray(jnp.mean(jnp.diagonal(kq, axis1=-2, axis2=-1)[:, :d], -1)).round(3).tolist(),
        "kq_homogeneity": np.asarray(kq_homogeneity(kq, d)).round(3).tolist(),
        "ov_last_entry_ratio": np.asarray(ov_last_entry_ratio(ov)).round(3).tolist(),
        "ov_y_entry": np.asarray(ov[:, -1, -1]).round(3).tolist(),
        "ov_zero_sum_residual": float(ov_zero_sum_residual(ov)),
    })
    return out


ANALYSES = {"sink": sink_analysis, "icl": icl_analysis}


def run_analysis(spec: dict, model, task, config) -> dict:
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind not in ANALYSES:
        raise ValueError(f"analysis.kind must be one of {tuple(ANALYSES)}, got {kind!r}")
    return ANALYSES[kind](model, task, config, **spec)


def save_icl_pattern_plot(model, path: str) -> None:
    """Heatmaps of each head's KQ and OV (the P62 figure)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    kq, ov = np.asarray(model.kq()), np.asarray(model.ov())
    H = kq.shape[0]
    fig, axes = plt.subplots(2, H, figsize=(2.4 * H, 4.8), squeeze=False)
    for h in range(H):
        for row, (name, mat) in enumerate((("KQ", kq[h]), ("OV", ov[h]))):
            limit = np.abs(mat).max() or 1.0
            axes[row, h].imshow(mat, cmap="RdBu_r", vmin=-limit, vmax=limit)
            axes[row, h].set_title(f"{name} head {h}", fontsize=9)
            axes[row, h].set_xticks([]), axes[row, h].set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
