"""Token ids outside the vocabulary are an error outside jit (issue 12 §5); under jit they are documented NaN."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.nn.models import BertEncoder, DecoderLM


def test_decoder_lm_rejects_concrete_ids_outside_the_vocabulary():
    model = DecoderLM(10, 16, 1, 2, rngs=nnx.Rngs(0))
    assert model(np.array([[0, 5, 9]])).shape == (1, 3, 10)
    with pytest.raises(ValueError, match=r"tokens holds token id 10 .*outside \[0, vocab_size=10\)"):
        model(np.array([[1, 2, 10]]))
    with pytest.raises(ValueError, match="tokens holds token id -1"):
        model(jnp.array([[-1, 2, 3]]))
    # under jit the ids are tracers: unchecked, and (as documented) an id >= vocab gives NaN logits
    logits = nnx.jit(lambda m, t: m(t))(model, jnp.array([[1, 2, 10]]))
    assert np.isnan(np.asarray(logits[0, 2])).all()


def test_bert_encoder_checks_input_and_token_type_ids():
    model = BertEncoder(12, 16, 1, 2, rngs=nnx.Rngs(0), max_position=8)
    with pytest.raises(ValueError, match=r"input_ids holds token id 12 .*vocab_size=12"):
        model(np.array([[1, 12]]))
    with pytest.raises(ValueError, match=r"token_type_ids holds token id 2 .*type_vocab_size=2"):
        model(np.array([[1, 2]]), token_type_ids=np.array([[0, 2]]))
