"""Vision / feature-gating modules as Flax NNX layers on channels-last ``[B, H, W, C]`` inputs.

* ``gaussian_adaptive`` (P00 DAAM, P01 GAAM): the Gaussian adaptive gate along one axis (product mode = DAAM and
  GAAM's ``GaussianBlock``; mixture mode = GAAM's ``MHGAAM``); works on images and on 1-D feature sequences.
* ``ulsam`` (P06): subspace attention, one spatial softmax map per channel group, ``x * (1 + A)``.
* ``ela`` (P12): efficient local attention, strip pooling + shared 1-D conv + GroupNorm + sigmoid gates.
* ``psa`` (P42): polarized self-attention, channel-only and spatial-only branches, parallel or sequential.
* ``dual_attention`` (P51): DAUNet's position / channel attention bottleneck and AGUNet's additive attention gates,
  on any number of spatial axes.
* ``dappm`` (P69): DDRNet's pooling pyramid (no attention), a context baseline.
"""
from jattn.methods.vision import dappm, dual_attention, ela, gaussian_adaptive, psa, ulsam
from jattn.methods.vision.dappm import DAPPM
from jattn.methods.vision.dual_attention import (AttentionGate, ChannelAttention, DualAttentionBottleneck,
                                                 PositionAttention, additive_attention_gate, channel_attention,
                                                 position_attention)
from jattn.methods.vision.ela import ELA, ela_variant
from jattn.methods.vision.gaussian_adaptive import (DensityBlock, MultiHeadDensityGate, daam, density_gate, gaam,
                                                    importance_factor, multi_head_density_gate)
from jattn.methods.vision.psa import PolarizedSelfAttention, psa_channel, psa_channel_bottleneck, psa_spatial
from jattn.methods.vision.ulsam import ULSAM, subspace_softmax, ulsam_combine
