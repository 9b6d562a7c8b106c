"""Training-free score / probability modifiers on the dense and flash paths.

* ``entropy_scaling`` (P28): logits times ``sqrt(ln N / ln T)`` so attention entropy stays at its training
  value when a query sees ``N`` keys instead of ``T``; a scale or a ``score_mod``.
* ``act`` (P27): ACT, the attention calibration technique: a ``prob_mod`` that moves ``(1 - beta)`` of the
  mass of non-initial attention sinks to the other keys on chosen heads, and the per-head search.

* ``attention_influence`` (P16): uniform ablation of chosen heads, retrieval-head scores, the influence ratio.
* ``rcmha`` (P31): relative convolutional MHA, a trained layer: depthwise causal convolution of Q, K, V and
  Transformer-XL relative scores (``RCMHA``, ``rcmha_lm``).

The first two also run inside ``jattn.nn`` models as ``Attention(method="entropy_scaled" | "act")`` (registered
from the catalogue like every paper method).
"""
from jattn.methods.modifiers import act, attention_influence, entropy_scaling, rcmha
from jattn.methods.modifiers.act import (act_attention, act_calibrate, act_method, act_prob_mod, register_act_method,
                                         search_act_heads, set_layer_methods, sink_scores, sink_set)
from jattn.methods.modifiers.entropy_scaling import (attention_entropy, entropy_factor, entropy_invariant_scale,
                                                     entropy_method, entropy_scale_factors, entropy_score_mod,
                                                     entropy_scaled_attention, register_entropy_method,
                                                     visible_key_counts)
from jattn.methods.modifiers.attention_influence import (attention_influence as influence, causal_mean,
                                                         head_ablation_prob_mod, retrieval_head_scores, top_heads,
                                                         uniform_head_ablation)
from jattn.methods.modifiers.rcmha import RCMHA, rcmha_lm
