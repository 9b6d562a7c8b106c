"""The KV-cache and decode family: methods that change what is cached or how a few new tokens attend to it,
on the one decode kernel (``jattn.decode_attention``). One file per paper; the entry points the catalogue
lists are re-exported here.
"""
from jattn.methods.kv import duplex
from jattn.methods.kv.duplex import DecodeCost, decode_cost
from jattn.methods.kv import gather, quantized, tidaldecode, tokenselect, x_ecomla, zipcache
from jattn.methods.kv.gather import gathered_decode_attention
from jattn.methods.kv.tidaldecode import (TidalState, select_topk_tokens, selection_recall, sparse_decode_attention,
                                          tidal_decode_step, tidal_lm_decode_step)
from jattn.methods.kv.tokenselect import SelectionCache, tokenselect_decode, tokenselect_indices, tokenselect_select
from jattn.methods.kv.x_ecomla import MLAAttention, kd_kl_loss, mla_attention, upcycle_gqa_to_mla
from jattn.methods.kv.quantized import QuantizedKVCache
from jattn.methods.kv.zipcache import (ZipCache, ZipCompressedKV, compress_kv, normalized_attention_score,
                                       zipcache_decode, zipcache_prefill)
