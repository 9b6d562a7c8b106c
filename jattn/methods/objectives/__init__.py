"""Attention training objectives: losses, regularisers and masking or matching rules that change what attention is
trained toward (issue 17). Each module is one paper; import from the module itself.

* ``abmil``: gated-attention MIL pooling (Ilse et al.), the baseline of P59 and P40.
* ``aem`` (P59): attention entropy maximisation for MIL.
* ``acmil`` (P40): multi-branch attention + stochastic top-k instance masking for MIL.
* ``deft`` (P25): the activation-density loss with LoRA finetuning.
* ``entropy_guided`` (P21): learnable softmax temperature + the thresholded entropy regulariser.
"""
