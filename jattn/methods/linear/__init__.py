"""The linear and attention-free family: P58 TransNormerLLM (Lightning-1), P74 Lightning-2, P29 Agent
Attention, P20 LinFusion, P50 sigmoid / kernel attention and the KV-bias sink slot, P57 DSF, P18 VAN's
LKA, P73 NiNformer. The shared op is ``jattn.linear_attention`` (``jattn.ops.linear``).

As layers: ``jattn.nn.Attention(method=NAME)`` with NAME one of lightning (P58/P74), sigmoid (P50),
linfusion (P20), agent (P29) (``jattn.nn.describe_method(NAME)``)."""
from jattn.methods.linear.agent import AgentAttention, agent_attention, agent_attention_as_linear, pool_agents
from jattn.methods.linear.dsf import (DSF, dsf_attention_matrix, dsf_recurrent, dsf_to_linear_attention,
                                      linear_attention_dsf, normalized_linear_attention_dsf,
                                      normalized_linear_attention_quadratic, normalized_linear_attention_recurrent,
                                      s6_dsf, ssd_dsf)
from jattn.methods.linear.lightning2 import (alibi_slopes, decayed_linear_attention_quadratic, lightning_attention,
                                             lightning_decode_step, lightning_prefill_with_state)
from jattn.methods.linear.linfusion import FEATURE_MAPS, LinFusionAttention, generalized_linear_attention
from jattn.methods.linear.lka import LKA, VANAttention, lka, lka_gate
from jattn.methods.linear.ninformer import MixerGatingUnit, NiNBlock, NiNformer, mixer_gating
from jattn.methods.linear.sigmoid import kernel_attention, kv_bias_attention, sigmoid_attention
from jattn.methods.linear.transnormer import (SGLU, TNLBlock, TNLGatedLinearAttention, lrpe, norm_linear_attention,
                                              srms_norm, tnl_decay, tnl_log_decay)
