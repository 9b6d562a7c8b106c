"""The head-routing family: methods that choose, per token, which attention heads run and how they are weighted.
One file per paper; the entry points the catalogue lists are re-exported here.

* P02 MoH (``moh``): shared + top-k routed heads with per-token gates, the load-balance loss, the
  parameter-free router, and a capacity (gathered-rows) core.
"""
from jattn.methods.routing import moh
from jattn.methods.routing.moh import (MoHAttention, MoHAuxLoss, capacity_flop_fraction, load_balance_loss,
                                       moh_attention, moh_aux_loss, moh_capacity, moh_capacity_attention, moh_gates,
                                       moh_llama_router, moh_route, use_moh)
