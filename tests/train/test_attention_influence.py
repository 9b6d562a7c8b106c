"""train.attention_influence: the ablation path is the model's own forward when nothing is ablated (catches a
dropped residual or MLP in the re-implemented layer loop), an ablated head changes the output, and the whole
run produces its tables on an untrained tiny model."""
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jattn.nn.models import DecoderLM
from train import attention_influence as ai


def test_no_ablation_is_the_models_forward_and_ablation_changes_it():
    model = DecoderLM(32, 32, 2, 4, num_kv_heads=2, rngs=nnx.Rngs(0))
    tokens, _ = ai.needle_batch(0, 3, 40, 32)
    none = jnp.zeros((2, 4), bool)
    np.testing.assert_allclose(np.asarray(ai.logits_with_ablation(model, tokens, none)),
                               np.asarray(model(tokens)[:, -1]), atol=1e-5)
    ablated = ai.logits_with_ablation(model, tokens, none.at[1, 2].set(True))
    assert float(jnp.max(jnp.abs(ablated - model(tokens)[:, -1]))) > 1e-4


def test_run_produces_its_tables():
    model = DecoderLM(32, 32, 2, 4, num_kv_heads=2, rngs=nnx.Rngs(1))
    out = ai.run(model, seq_len=24, vocab=32, probe=8, samples=8, draws=2)
    assert out["scores"].shape == (2, 4) and ((0 <= out["scores"]) & (out["scores"] <= 1)).all()
    assert set(out["accuracy"]) == {"none", "top-1 retrieval", "random 1", "top-2 retrieval", "random 2"}
    assert out["influence"]["needle"].shape == (8,) and 0 <= out["needle_share_of_top"] <= 1
