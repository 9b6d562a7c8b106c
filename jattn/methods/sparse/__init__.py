"""The static sparse-pattern family: each method is a mask function plus a ``BlockMask`` builder on the
one block-sparse kernel (``jattn.block_sparse_attention``), or, for neighborhood attention, the tiled
``jattn.neighborhood_attention``. One file per paper (its module is importable as
``jattn.methods.sparse.<file>``); the entry points the catalogue lists are re-exported here.

As layers: ``jattn.nn.Attention(method=NAME)`` with NAME one of radial, s2, moa, naavit, sinklora_s2,
sinklora_sf, davit_window, clear, biformer, neighborhood (``jattn.nn.describe_method(NAME)``).
"""
from jattn.methods.sparse import biformer, clear, davit, fna, gna, gri, moa, paro, radial, s2, saisa, sinklora
from jattn.methods.sparse.biformer import (BiFormerBlock, BiLevelRoutingAttention, bi_level_routing_attention,
                                           bra_attention, bra_attention_block_sparse, bra_block_mask, bra_route,
                                           local_context_enhancement)
from jattn.methods.sparse.clear import (CLEARAttention, clear_attention, clear_block_mask, clear_distillation_loss,
                                        clear_mask, downsample_kv, proportional_scale)
from jattn.methods.sparse.davit import (ChannelGroupAttention, DaViT, DualAttentionBlock, SpatialWindowAttention,
                                        channel_group_attention, window_attention_2d, window_attention_2d_direct,
                                        window_block_mask)
from jattn.methods.sparse.fna import na_attention
from jattn.methods.sparse.gri import avg_pool_tokens, global_regional_attention, gri_attention_flops, gri_mask
from jattn.methods.sparse.gna import gna_attention, gna_cost_model, gna_mask, gna_tile_map, token_permute
from jattn.methods.sparse.moa import (attention_influence, moa_attention, moa_block_mask, moa_candidates,
                                      moa_density, moa_mask_fn, moa_plan, moa_profile)
from jattn.methods.sparse.paro import (calibrate_block_mask, paro_attention, paro_mask_to_original, paro_permute,
                                       paro_unpermute, quantize_int8_per_block, select_paro_order)
from jattn.methods.sparse.radial import radial_attention, radial_attention_mask, radial_block_mask, radial_mask_fn
from jattn.methods.sparse.s2 import s2_attention, s2_attention_mask, s2_block_mask, s2_coverage, s2_mask_fn
from jattn.methods.sparse.saisa import (SAISADecoderBlock, VisualProjector, naavit_attention, naavit_block_mask,
                                        naavit_layer_flops, naavit_mask, saisa_attention)
from jattn.methods.sparse.sinklora import (group_causal_block_mask, sf_attention, sf_block_mask,
                                           shifted_group_size, shifted_sparse_attention, shifted_sparse_block_mask)
