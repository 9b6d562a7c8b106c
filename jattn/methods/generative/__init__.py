"""Training-free guidance methods for diffusion transformers.

* ``softpag`` (P07): HeadHunter + SoftPAG: perturbation guidance whose perturbed branch replaces the attention
  map of selected heads by ``(1 - u) A + u I`` (``u = 1`` is PAG: the head outputs ``V``), computed without
  forming ``A`` as ``(1 - u) softmax(q k^T) v + u v``; the guidance rule (alone or added to classifier-free
  guidance); and the greedy HeadHunter search over ``(layer, head)`` pairs.
"""
from jattn.methods.generative import softpag
from jattn.methods.generative.softpag import (cfg_pag_guidance, head_mask_from_heads, headhunter_greedy,
                                              perturbation_guidance, perturbed_attention, soft_pag)
