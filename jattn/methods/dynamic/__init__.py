"""The dynamic-sparse family: selectors that read q and k and hand the block-sparse kernel a ``BlockMask``.

Each method is a pure, jit-able selector ``<name>_block_mask(q, k, *, <block sizes>, <paper params>) ->
BlockMask`` (all sizes and budgets static, so every shape is static) and ``<name>_attention(q, k, v, ...)``
= the selector plus ``jattn.block_sparse_attention``: causal for the LLM-prefill selectors (FlexPrefill,
HiP, SALE, AnchorAttention, Kinetics, ZipVL), non-causal for the video-diffusion ones (VMoBA, AdaSpa).
P41 Focus-DETR selects tokens, not tiles: top-k foreground tokens of a DETR encoder (``focus_detr``, with the
multi-scale deformable attention op in ``deformable``).
``jattn.eval.sparse_quality`` measures any of them (density, recall of the dense attention mass, error,
times); ``synthetic`` builds long inputs with sinks, stripes, a local band and slashes to measure them on
(``benchmarks/cpu_dynamic.py``). The causal selectors also run as ``jattn.nn.Attention(method=...)``.
One file per paper; the entry points are re-exported here.
"""
from jattn.methods.dynamic import (adaspa, anchor, deformable, flexprefill, focus_detr, hip, kinetics, sale, synthetic,
                                  vmoba, zipvl)
from jattn.methods.dynamic.adaspa import (AdaSpaSchedule, AdaSpaState, adaspa_attention, adaspa_block_mask,
                                          adaspa_init_state, adaspa_select, block_attention_mass,
                                          head_adaptive_sparsity, rowwise_topk_block_mask)
from jattn.methods.dynamic.deformable import MSDeformAttn, ms_deform_attn
from jattn.methods.dynamic.focus_detr import (FocusEncoderLayer, FocusScorer, MaskPredictor, OESMAttention,
                                              oesm_self_attention, scatter_back, topk_gather)
from jattn.methods.dynamic.flexprefill import (flexprefill_attention, flexprefill_block_mask, flexprefill_select,
                                               jsd)
from jattn.methods.dynamic.hip import hip_attention, hip_block_mask, hip_select
from jattn.methods.dynamic.kinetics import (QWEN3, block_topk_decode, kinetics_attention, kinetics_block_mask,
                                            kinetics_block_summary, kinetics_cost, kinetics_select)
from jattn.methods.dynamic.anchor import (anchor_attention, anchor_block_mask, anchor_select, anchor_stats,
                                          anchor_stripe_mask_fn, anchor_tile_map)
from jattn.methods.dynamic.sale import (quantize_int4_per_token, quantize_symmetric, sale_attention, sale_block_mask,
                                        sale_estimate_logits, sale_select)
from jattn.methods.dynamic.synthetic import SyntheticLayout, synthetic_long_qkv
from jattn.methods.dynamic.vmoba import (layer_chunk, video_block_partition, video_block_unpartition,
                                         video_chunk_size, vmoba_attention, vmoba_block_mask, vmoba_select)
from jattn.methods.dynamic.zipvl import (adaptive_keep_count, token_sparse_attention, zipvl_attention,
                                         zipvl_block_mask, zipvl_token_mask)
