"""The KV-cache and decode family: methods that change what is cached or how a few new tokens attend to it,
on the one decode kernel (``jattn.decode_attention``). One file per paper; the entry points the catalogue
lists are re-exported here.
"""
from jattn.methods.kv import duplex
from jattn.methods.kv.duplex import DecodeCost, decode_cost
from jattn.methods.kv import (duo_attention, gather, h2o, quantized, task_kv, tidaldecode, tokenselect, x_ecomla,
                              zipcache)
from jattn.methods.kv.gather import gathered_decode_attention
from jattn.methods.kv.tidaldecode import (TidalState, select_topk_tokens, selection_recall, sparse_decode_attention,
                                          tidal_decode_step, tidal_lm_decode_step)
from jattn.methods.kv.tokenselect import SelectionCache, tokenselect_decode, tokenselect_indices, tokenselect_select
from jattn.methods.kv.x_ecomla import MLAAttention, kd_kl_loss, mla_attention, upcycle_gqa_to_mla
from jattn.methods.kv.quantized import QuantizedKVCache
from jattn.methods.kv.zipcache import (ZipCache, ZipCompressedKV, compress_kv, normalized_attention_score,
                                       zipcache_decode, zipcache_prefill)
# (the function duo_attention stays in its module: re-exporting it would shadow the module's name)
from jattn.methods.kv.duo_attention import (DuoKVCache, duo_distillation_loss, duo_kv_bytes, mixed_duo_attention,
                                            sparsify_heads, streaming_mask)
from jattn.methods.kv.h2o import H2OCache, h2o_keep_mask
from jattn.methods.kv.task_kv import (TaskKVCache, head_semantic_vectors, kv_head_flags, middle_activation_indices,
                                      per_head_kv_compress, semantic_separator)
from jattn.methods.kv import vattention
from jattn.methods.kv.vattention import (PagedBlockAllocator, VirtualKVAllocator, contiguous_decode_attention,
                                        contiguous_prefill_attention, paged_decode_attention)
from jattn.methods.kv import lean
from jattn.methods.kv.lean import lean_decode_attention, lean_merge, lean_schedule, merge_segments, ragged_schedule
