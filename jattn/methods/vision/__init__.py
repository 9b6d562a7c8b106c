"""Vision / feature-gating modules as Flax NNX layers on channels-last ``[B, H, W, C]`` inputs.

* ``gaussian_adaptive`` (P00 DAAM, P01 GAAM): the Gaussian adaptive gate along one axis (product mode = DAAM and
  GAAM's ``GaussianBlock``; mixture mode = GAAM's ``MHGAAM``); works on images and on 1-D feature sequences.
* ``ulsam`` (P06): subspace attention, one spatial softmax map per channel group, ``x * (1 + A)``.
* ``ela`` (P12): efficient local attention, strip pooling + shared 1-D conv + GroupNorm + sigmoid gates.
* ``psa`` (P42): polarized self-attention, channel-only and spatial-only branches, parallel or sequential.
* ``dual_attention`` (P51): DAUNet's position / channel attention bottleneck and AGUNet's additive attention gates,
  on any number of spatial axes.
* ``dappm`` (P69): DDRNet's pooling pyramid (no attention), a context baseline.
* ``sdanet`` (P10): SDANet's selective dense attention neck (cross-level channel selection, spatial gate,
  non-local refinement added back to every level), a reconstruction.
* ``fdconv`` (P47): frequency dynamic convolution (Fourier-disjoint weight groups, kernel spatial modulation,
  frequency band modulation).
* ``hmode`` (P56): pixel-wise softmax mixture of density experts, two-level gating, relative local count loss.
* ``dcal`` (P23): attention rollout, global-local cross-attention (GLCA) and pair-wise cross-attention (PWCA,
  training only) around a ViT's self-attention.
"""
from jattn.methods.vision import dappm, dcal, dual_attention, ela, fdconv, gaussian_adaptive, hmode, psa, sdanet, ulsam
from jattn.methods.vision.dappm import DAPPM
from jattn.methods.vision.dual_attention import (AttentionGate, ChannelAttention, DualAttentionBottleneck,
                                                 PositionAttention, additive_attention_gate, channel_attention,
                                                 position_attention)
from jattn.methods.vision.ela import ELA, ela_variant
from jattn.methods.vision.gaussian_adaptive import (DensityBlock, MultiHeadDensityGate, daam, density_gate, gaam,
                                                    importance_factor, multi_head_density_gate)
from jattn.methods.vision.psa import PolarizedSelfAttention, psa_channel, psa_channel_bottleneck, psa_spatial
from jattn.methods.vision.ulsam import ULSAM, subspace_softmax, ulsam_combine
from jattn.methods.vision.dcal import (DCAL, DCALBlock, attention_rollout, dcal_loss, glca, glca_select, pwca,
                                      uncertainty_weighted_loss)
from jattn.methods.vision.hmode import (DensityHead, HMoDEHead, cv_squared, expert_importance_loss,
                                       hierarchical_mixture, pixelwise_expert_gate, relative_local_count_loss)
from jattn.methods.vision.fdconv import FDConv, frequency_bands, frequency_groups
from jattn.methods.vision.sdanet import (DenseAttentionModule, SelectiveDenseAttentionNeck, channel_select_attention,
                                        nonlocal_block, spatial_attention)
