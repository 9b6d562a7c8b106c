"""Flax NNX modules: ``Attention(method=...)`` over the method registry, blocks, LM, ViT, BERT encoder,
``NeighborhoodAttention`` (NATTEN-style, 1-3-D grids), attention-map statistics, a context manager that records every layer's q/k/v (``capture``), the P62 in-context-regression model and the all-MiniLM-L6-v2 loader."""
from jattn.nn.methods import (AttentionMethod, Option, available_methods, describe_method, get_method,
                              register_method, sigmoid_attention, unregister_method)
from jattn.nn.attention import Attention, apply_rope
from jattn.nn.neighborhood import NeighborhoodAttention
from jattn.nn.models import (MLP, BertEncoder, DecoderLM, SRMSNorm, TransformerBlock, ViT, l2_normalize,
                             mean_pool, srms_norm)
from jattn.nn.attention_maps import (attention_entropy, key_columns, key_importance, sink_metric, streamed_sink_metric,
                                     topk_recall)
from jattn.nn.icl import (OneLayerMHSoftmax, debiased_gd_predictor, kq_diagonality, ov_last_entry_ratio,
                          ov_zero_sum_residual)
from jattn.nn.pretrained import MiniLM, bert_from_safetensors
from jattn.nn import capture
