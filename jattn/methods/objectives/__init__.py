"""Attention training objectives: losses, regularisers and masking or matching rules that change what attention is
trained toward (issue 17). Each module is one paper; import from the module itself.

* ``abmil``: gated-attention MIL pooling (Ilse et al.), the baseline of P59 and P40.
* ``aem`` (P59): attention entropy maximisation for MIL.
* ``acmil`` (P40): multi-branch attention + stochastic top-k instance masking for MIL.
* ``deft`` (P25): the activation-density loss with LoRA finetuning.
* ``fod`` (P54): I2Correlation attention and its minimax losses for anomaly detection.
* ``adainf`` (P46): data inflation with weaker augmentation for contrastive learning.
* ``hungarian``: DETR's matching cost, Hungarian assignment and set loss (the baseline of P35).
* ``deim`` (P35): the matchability-aware loss and dense one-to-one matching (mosaics).
* ``acam_kd`` (P17): student-teacher cross-attention fusion, adaptive spatial and channel masks and the masked
  feature-distillation loss (and plain feature KD, its baseline).
* ``entropy_guided`` (P21): learnable softmax temperature + the thresholded entropy regulariser.
"""
