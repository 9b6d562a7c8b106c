"""Training-free methods on a diffusion transformer's or a vision-language model's attention.

* ``softpag`` (P07): HeadHunter + SoftPAG: perturbation guidance whose perturbed branch replaces the attention
  map of selected heads by ``(1 - u) A + u I`` (``u = 1`` is PAG: the head outputs ``V``), computed without
  forming ``A`` as ``(1 - u) softmax(q k^T) v + u v``; the guidance rule (alone or added to classifier-free
  guidance); and the greedy HeadHunter search over ``(layer, head)`` pairs.
* ``afa`` (P30): adaptive feature aggregation, a per-token softmax over frozen DiT experts' features after every
  block, learned by zero-initialised aggregators.
* ``attentive_eraser`` (P34): attention redirection (foreground keys masked, similarity suppression) and SARG
  guidance for object removal.
* ``diffuhaul`` (P72): blob-masked attention, shared and interpolated source K/V, nearest-neighbour feature copy.
* ``vl_sam`` (P66): VL-SAM's head aggregation and regularised attention flow, turning a VLM's attention into
  a localisation map and point prompts.
* ``paint`` (P39): informed visual token selection and the logit boost on the generated rows.
* ``dymu`` (P67): dynamic token merging in the vision encoder (DToMe, batch-level thresholds), proportional
  attention and virtual token unmerging in the decoder.
* ``var`` (P14): visual attention sink detection and redistribution of the sinks' attention to the other
  visual tokens, as a prob_mod.
"""
from jattn.methods.generative import afa, attentive_eraser, diffuhaul, dymu, paint, softpag, var, vl_sam
from jattn.methods.generative.afa import AFAEnsemble, SABWAggregator, afa_loss, make_afa_train_step, spatial_softmax_aggregate
from jattn.methods.generative.softpag import (cfg_pag_guidance, head_mask_from_heads, headhunter_greedy,
                                              perturbation_guidance, perturbed_attention, soft_pag)
