"""The head-routing family: methods that choose, per token, which attention heads run and how they are weighted.
One file per paper; the entry points the catalogue lists are re-exported here.

* P02 MoH (``moh``): shared + top-k routed heads with per-token gates, the load-balance loss, the
  parameter-free router, and a capacity (gathered-rows) core.
* P36 BAM (``bam``): a soft mixture of attention experts (separate or shared K/V) upcycled from dense
  models, top-k FFN experts and the parallel attention + MoE block.
* P53 (``graph_moe``): attention-aware and similarity-aware MoE gating, the router probabilities mixed along
  an attention map (computed as attention with ``v = P``).
"""
from jattn.methods.routing import bam, graph_moe, moh
from jattn.methods.routing.bam import (MoEFFN, ParallelMoEBlock, ParallelMoELM, SoftMoA, moe_ffn,
                                      soft_mixture_of_attention, upcycle)
from jattn.methods.routing.graph_moe import (AttentionAwareMoE, attention_aware_gate, attention_aware_gate_flash,
                                            gate_entropy, route_top_k, similarity_aware_gate, similarity_matrix)
from jattn.methods.routing.moh import (MoHAttention, MoHAuxLoss, capacity_flop_fraction, load_balance_loss,
                                       moh_attention, moh_aux_loss, moh_capacity, moh_capacity_attention, moh_gates,
                                       moh_llama_router, moh_route, use_moh)
