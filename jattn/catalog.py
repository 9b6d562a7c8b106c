"""The 75 papers jattn implements: one honest row each (``jattn papers`` prints them).

``status``: ``planned`` (nothing yet), ``partial`` (the core computation exists and is tested; parts of
the paper's deliverable are missing, see ``note``), ``works`` (the spec's deliverable, tested). A test
(tests/test_catalog.py) checks that every non-planned row's entry points import and its tests exist.
"""
from __future__ import annotations

import dataclasses
import importlib


@dataclasses.dataclass(frozen=True)
class Paper:
    id: str
    name: str
    title: str
    family: str
    entry_points: tuple[str, ...] = ()
    tests: tuple[str, ...] = ()
    status: str = "planned"
    note: str = ""
    # The names this paper runs under in jattn.nn.Attention(method=...) (config keys:
    # jattn.nn.describe_method(name)); for a built paper that is not an attention layer, why not.
    layer_methods: tuple[str, ...] = ()
    not_a_layer: str = ""


_BASE = [
    ("P00", 'DAAM-Speech', 'Density Adaptive Attention-based Speech Network (depression detection)', "vision-module"),
    ("P01", 'GAAM', 'Gaussian Adaptive Attention is All You Need', "vision-module"),
    ("P02", 'MoH', 'Multi-Head Attention as Mixture-of-Head Attention', "head-routing"),
    ("P03", 'Infinite-LLM', 'DistAttention and Distributed KVCache', "dense"),
    ("P04", 'Radial Attention', 'O(n log n) sparse attention with energy decay', "static-sparse"),
    ("P05", 'VMoBA', 'Mixture-of-Block Attention for Video Diffusion Models', "dynamic-sparse"),
    ("P06", 'ULSAM', 'Ultra-Lightweight Subspace Attention Module', "vision-module"),
    ("P07", 'HeadHunter + SoftPAG', 'Fine-Grained Perturbation Guidance via Attention Head Selection', "score-modifier"),
    ("P08", 'Kinetics', 'Rethinking Test-Time Scaling Laws', "dynamic-sparse"),
    ("P09", 'HiP', 'Hierarchically Pruned Attention', "dynamic-sparse"),
    ("P10", 'PIDray / SDANet', 'Towards Real-World Prohibited Item Detection', "vision-module"),
    ("P11", 'MoA', 'Mixture of Sparse Attention', "static-sparse"),
    ("P12", 'ELA', 'Efficient Local Attention', "vision-module"),
    ("P13", 'ZipVL', 'Dynamic Token Sparsification (and KV cache compression) for LVLMs', "dynamic-sparse"),
    ("P14", 'VAR', 'Visual Attention Sink / Visual Attention Redistribution', "score-modifier"),
    ("P15", 'S2-Attention', 'Heterogeneous Context Sharding among Attention Heads (DKernel)', "static-sparse"),
    ("P16", 'AttentionInfluence', 'Head Influence for Weak-to-Strong Data Selection', "score-modifier"),
    ("P17", 'ACAM-KD', 'Adaptive and Cooperative Attention Masking for KD', "training-objective"),
    ("P18", 'VAN', 'Visual Attention Network (Large Kernel Attention)', "linear"),
    ("P19", 'X-EcoMLA', 'Upcycling Pre-trained Attention into MLA', "kv-decode"),
    ("P20", 'LinFusion', 'Generalized Linear Attention for Diffusion UNets', "linear"),
    ("P21", 'EntropyGuided', 'Entropy-Guided Attention for Private LLMs', "training-objective"),
    ("P22", 'Duplex', 'Device for LLMs with MoE, GQA and Continuous Batching', "kv-decode"),
    ("P23", 'DCAL', 'Dual Cross-Attention Learning (GLCA + PWCA)', "vision-module"),
    ("P24", 'ZipCache', 'KV Cache Quantization with Salient Token Identification', "kv-decode"),
    ("P25", 'DEFT', 'From PEFT to DEFT: Parameter Efficient Finetuning for Reducing Activation Density in Transformers', "training-objective"),
    ("P26", 'vAttention', 'Dynamic Memory Management for Serving LLMs without PagedAttention', "kv-decode"),
    ("P27", 'ACT', 'Unveiling and Harnessing Hidden Attention Sinks (Attention Calibration Technique)', "score-modifier"),
    ("P28", 'Entropy-scaled attention', 'Training-free Diffusion Model Adaptation for Variable-Sized Text-to-Image Synthesis', "score-modifier"),
    ("P29", 'Agent Attention', 'On the Integration of Softmax and Linear Attention', "linear"),
    ("P30", 'AFA', 'Ensembling Diffusion Models via Adaptive Feature Aggregation', "vision-module"),
    ("P31", 'RCMHA', 'Relative Convolutional Multi-Head Attention for Natural Language Modelling', "vision-module"),
    ("P32", 'SALE', 'Low-bit Estimation for Efficient Sparse Attention in Long-context LLM Prefilling', "dynamic-sparse"),
    ("P33", 'AnchorAttention', 'Difference-Aware Sparse Attention with Stripe Granularity', "dynamic-sparse"),
    ("P34", 'Attentive Eraser', 'Self-Attention Redirection Guidance for object removal', "score-modifier"),
    ("P35", 'DEIM', 'DETR with Improved Matching for Fast Convergence', "training-objective"),
    ("P36", 'BAM', 'Simple and Efficient Parameter Upcycling for Mixture of Experts', "head-routing"),
    ("P37", 'AdaSpa', 'Training-free and Adaptive Sparse Attention for Efficient Long Video Generation', "dynamic-sparse"),
    ("P38", 'FlexPrefill', 'A Context-Aware Sparse Attention Mechanism for Efficient Long-Sequence Inference', "dynamic-sparse"),
    ("P39", 'PAINT', 'Fixing Imbalanced Attention to Mitigate In-Context Hallucination of LVLMs', "score-modifier"),
    ("P40", 'ACMIL', 'Attention-Challenging Multiple Instance Learning for WSI Classification', "training-objective"),
    ("P41", 'Focus-DETR', 'Less is More: Focus Attention for Efficient DETR', "dynamic-sparse"),
    ("P42", 'PSA', 'Polarized Self-Attention: Towards High-quality Pixel-wise Regression', "vision-module"),
    ("P43", 'SAISA', 'Towards MLLMs with Both Training and Inference Efficiency (NAAViT)', "static-sparse"),
    ("P44", 'TokenSelect', 'Dynamic Token-Level KV Cache Selection', "kv-decode"),
    ("P45", 'DuoAttention', 'Efficient Long-Context LLM Inference with Retrieval and Streaming Heads', "kv-decode"),
    ("P46", 'AdaInf', 'Do Generated Data Always Help Contrastive Learning?', "training-objective"),
    ("P47", 'FDConv', 'Frequency Dynamic Convolution for Dense Image Prediction', "vision-module"),
    ("P48", 'GNA', 'Generalized Neighborhood Attention: Multi-dimensional Sparse Attention at the Speed of Light', "static-sparse"),
    ("P49", 'Task-KV', 'Task-aware KV Cache Optimization via Semantic Differentiation of Attention Heads', "kv-decode"),
    ("P50", 'AttnSink', 'When Attention Sink Emerges in Language Models: An Empirical View', "linear"),
    ("P51", 'MeningiomaAttnUNet', 'Meningioma segmentation in T1-weighted MRI leveraging global context and attention mechanisms', "vision-module"),
    ("P52", 'DaViT', 'DaViT: Dual Attention Vision Transformers', "static-sparse"),
    ("P53", 'GraphOfTokensMoE', 'Improving Routing in Sparse Mixture of Experts with Graph of Tokens', "head-routing"),
    ("P54", 'FOD', 'Focus the Discrepancy: Intra- and Inter-Correlation Learning for Image Anomaly Detection', "training-objective"),
    ("P55", 'FuseMax', 'FuseMax: Leveraging Extended Einsums to Optimize Attention Accelerator Design', "dense"),
    ("P56", 'HMoDE', 'Redesigning Multi-Scale Neural Network for Crowd Counting', "vision-module"),
    ("P57", 'DSF', 'Understanding the differences in Foundation Models: Attention, State Space Models, and Recurrent Neural Networks', "linear"),
    ("P58", 'Lightning-1/TNL', 'Various Lengths, Constant Speed: Efficient Language Modeling with Lightning Attention', "linear"),
    ("P59", 'AEM', 'AEM: Attention Entropy Maximization for Multiple Instance Learning based Whole Slide Image Classification', "training-objective"),
    ("P60", 'FasterNA', 'Faster Neighborhood Attention: Reducing the O(n^2) Cost of Self Attention at the Threadblock Level', "static-sparse"),
    ("P61", 'BiFormer', 'BiFormer: Vision Transformer with Bi-Level Routing Attention', "static-sparse"),
    ("P62", 'ICL-MHA', 'In-Context Linear Regression Demystified: Training Dynamics and Mechanistic Interpretability of Multi-Head Softmax Attention', "training-objective"),
    ("P63", 'CLEAR', 'CLEAR: Conv-Like Linearization Revs Pre-Trained Diffusion Transformers Up', "static-sparse"),
    ("P64", 'PARO', 'PAROAttention: Pattern-Aware ReOrdering for Efficient Sparse and Quantized Attention in Visual Generation Models', "static-sparse"),
    ("P65", 'LeanAttention', 'Lean Attention: Hardware-Aware Scalable Attention Mechanism for the Decode-Phase of Transformers', "dense"),
    ("P66", 'VL-SAM', 'Training-Free Open-Ended Object Detection and Segmentation via Attention as Prompts', "score-modifier"),
    ("P67", 'DyMU', 'DyMU: Dynamic Merging and Virtual Unmerging for Efficient VLMs', "score-modifier"),
    ("P68", 'A-SDM', 'A-SDM: Accelerating Stable Diffusion through Redundancy Removal and Performance Optimization', "vision-module"),
    ("P69", 'DDRNet', 'Deep Dual-resolution Networks for Real-time and Accurate Semantic Segmentation of Road Scenes', "vision-module"),
    ("P70", 'SinkLoRA', 'SinkLoRA: Enhanced Efficiency and Chat Capabilities for Long-Context Large Language Models', "static-sparse"),
    ("P71", 'TidalDecode', 'TidalDecode: Fast and Accurate LLM Decoding with Position Persistent Sparse Attention', "kv-decode"),
    ("P72", 'DiffUHaul', 'DiffUHaul: A Training-Free Method for Object Dragging in Images', "score-modifier"),
    ("P73", 'NiNformer', 'NiNformer: A Network in Network Transformer with Token Mixing Generated Gating Function', "linear"),
    ("P74", 'Lightning-2', 'Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large Language Models', "linear"),
]

_LINEAR = "jattn.methods.linear."
_SPARSE = "jattn.methods.sparse."
_KV = "jattn.methods.kv."
_DYNAMIC = "jattn.methods.dynamic."
_ANALYSIS = "jattn.methods.analysis."
_VISION = "jattn.methods.vision."
_MODIFIERS = "jattn.methods.modifiers."
_OBJECTIVES = "jattn.methods.objectives."
_GENERATIVE = "jattn.methods.generative."
# id -> (entry points, tests, status, note) for every paper with code in the tree.
_PROGRESS = {
    "P03": (("jattn.distributed.ring_attention", "jattn.distributed.kv_partitioned_attention",
             "jattn.distributed.sharded_decode_attention", "jattn.distributed.merge_across", "jattn.merge_partials",
             "jattn.decode_attention", "jattn.distributed.kv_memory_per_device"),
            ("tests/test_distributed.py", "tests/core/test_softmax.py", "tests/ops/test_decode.py"), "works",
            "exact partitioned softmax across devices (KV-partitioned, zigzag ring prefill fwd+bwd with a ring "
            "backward, 0.22 of single-device flash's temp at T=32K, sharded decode; 8 forced host devices), a paged decode kernel returning lse, and the per-device KV memory model "
            "checked against compiled memory; the rManager/gManager scheduling is out of scope"),
    "P22": (("jattn.methods.kv.duplex.decode_cost", "jattn.decode_attention"),
            ("tests/methods/kv/test_duplex.py", "tests/ops/test_decode.py"), "partial",
            "Op/B model, checked against XLA's FLOP count and against the K/V pages the decode kernel's TPU "
            "pipeline fetches (its index map replayed over its grid: each kv head's pages once for the whole "
            "GQA group); no hardware byte counter or H200 roofline measurement (no device lent)"),
    "P65": (("jattn.decode_attention", "pallas_kernels.decode.decode_partials",
             "pallas_kernels.decode.decode_partials_grad", "jattn.merge_partials",
             _KV + "lean.lean_decode_attention", _KV + "lean.lean_schedule", _KV + "lean.ragged_schedule",
             _KV + "lean.merge_segments", "pallas_kernels.lean_decode.lean_decode_partials"),
            ("tests/ops/test_decode.py", "tests/kernels/test_lowering.py", "tests/methods/kv/test_lean.py"), "partial",
            "split-K decode kernel with a Pallas backward, and Lean Attention's stream-K schedule (ORT's grid "
            "formulas; worker ranges over the flattened needed tiles cross head/batch boundaries, loads differ by "
            "<= 1 tile; per-segment partials merged exactly by segment id) as a second kernel on both structures, "
            "equal to the reference for any worker count; forward only, no hardware run: the spec's measured "
            "speed-up over the per-head split needs a device"),
    "P09": (tuple(_DYNAMIC + n for n in ("hip.hip_attention", "hip.hip_block_mask", "hip.hip_select",
                                         "hip.hip_iterations")),
            ("tests/methods/dynamic/test_hip.py",), "partial",
            "block-level hierarchical top-k + window, exact vs a transcription of the search and vs dense with its "
            "mask; no key-group min/max pooling, no joint head search, no decode reuse; the search dominates CPU time; real-input and equal-density tables: docs/dynamic_sparse.md"),
    "P08": (tuple(_DYNAMIC + n for n in ("kinetics.kinetics_cost", "kinetics.dense_cost", "kinetics.block_sparse_cost",
                                         "kinetics.zero_overhead_sparse_cost", "kinetics.expected_cost",
                                         "kinetics.kinetics_block_mask", "kinetics.kinetics_attention",
                                         "kinetics.kinetics_select", "kinetics.block_topk_decode",
                                         "kinetics.block_topk_decode_indices", "kinetics.kinetics_block_summary")),
            ("tests/methods/dynamic/test_kinetics.py",), "partial",
            "eFLOPs cost model reproduces the official CSVs exactly (Qwen3-4B AIME24, dense and block top-k); block "
            "top-k prefill selector and decode (LiteSys rule) exact vs transcriptions and dense; decode 4.8x dense "
            "at S=32K on CPU with a precomputed block summary (slower without); the summary is not kept up to date "
            "as blocks fill, no Pallas page-gather kernel, no GPU measurement; real-input and equal-density tables: docs/dynamic_sparse.md"),
    "P13": (tuple(_DYNAMIC + n for n in ("zipvl.zipvl_attention", "zipvl.zipvl_block_mask", "zipvl.zipvl_token_mask",
                                         "zipvl.normalized_attention_score", "zipvl.adaptive_keep_count",
                                         "zipvl.important_tokens", "zipvl.token_sparse_attention")),
            ("tests/methods/dynamic/test_zipvl.py",), "partial",
            "probe-normalised token scores (ZipCache's), adaptive keep count, attention among the important tokens "
            "gathered to the front (exact vs dense with the token mask; 23x dense at 10% kept, T=8K CPU); the "
            "unimportant tokens' outputs are 0 (jattn's reading: no official code read); high error on the synthetic "
            "inputs; decode half lives in P24; real-input and equal-density tables: docs/dynamic_sparse.md"),
    "P37": (tuple(_DYNAMIC + n for n in ("adaspa.adaspa_attention", "adaspa.adaspa_block_mask", "adaspa.adaspa_select",
                                         "adaspa.block_attention_mass", "adaspa.rowwise_topk_block_mask",
                                         "adaspa.head_adaptive_sparsity", "adaspa.AdaSpaState",
                                         "adaspa.AdaSpaSchedule", "adaspa.adaspa_init_state")),
            ("tests/methods/dynamic/test_adaspa.py",), "partial",
            "block mass from the LSE, row-wise top-k with text sinks, head-adaptive sparsity, the warm-up / fused "
            "search / reuse / LSE-cached search schedule as explicit state (a test runs a denoising loop); no "
            "official code (paper reading), no Pallas mass kernel, Fig. 5 comparison not reproduced; real-input and equal-density tables: docs/dynamic_sparse.md"),
    "P05": (tuple(_DYNAMIC + n for n in ("vmoba.vmoba_attention", "vmoba.vmoba_block_mask", "vmoba.vmoba_select",
                                         "vmoba.vmoba_gates", "vmoba.video_block_partition",
                                         "vmoba.video_block_unpartition", "vmoba.video_chunk_size",
                                         "vmoba.layer_chunk")),
            ("tests/methods/dynamic/test_vmoba.py",), "partial",
            "1-D/2-D/3-D layer-cycled partitions (official axis order), mean-key gates, threshold and top-k "
            "selection (query_head, head_global), exact vs dense and vs the official two-branch LSE merge; no "
            "trained toy video denoiser (the spec's 'works'), no 'block'/'overall' modes, no Pallas gather kernel; real-input and equal-density tables: docs/dynamic_sparse.md"),
    "P32": (tuple(_DYNAMIC + n for n in ("sale.sale_attention", "sale.sale_block_mask", "sale.sale_select",
                                         "sale.quantize_int4_per_token", "sale.quantize_symmetric",
                                         "sale.sale_estimate_logits")),
            ("tests/methods/dynamic/test_sale.py",), "partial",
            "mean-smoothed INT4 (per-token or per-block) q . k estimate plus the q_bar . k' term, exact sink/local "
            "statistics, relative-score tile choice with per-head tau; exact vs a transcription and vs dense; "
            "synthetic T=4K CPU: density 0.39 at recall 0.996; selection is plain jnp (slower than the sparse "
            "attention on CPU), no Pallas selection kernel, no tau calibration, no GPU measurement; real-input and equal-density tables: docs/dynamic_sparse.md"),
    "P33": (tuple(_DYNAMIC + n for n in ("anchor.anchor_attention", "anchor.anchor_block_mask", "anchor.anchor_select",
                                         "anchor.anchor_stats", "anchor.anchor_tile_map",
                                         "anchor.anchor_stripe_mask_fn")),
            ("tests/methods/dynamic/test_anchor.py",), "partial",
            "exact anchor (m, l) over the initial and local blocks, difference-aware stripes over pooled keys, a "
            "minimal tile cover (jit-able) or the token-exact stripe mask (eager only); exact vs transcriptions "
            "and dense; recall 0.95 vs 0.82 for block top-k at equal tiles on striped synthetic data; the paper's "
            "2048-key blocks make it dense below ~8K tokens; no Pallas kernels, official code not read; real-input and equal-density tables: docs/dynamic_sparse.md"),
    "P00": (tuple(_VISION + n for n in ("gaussian_adaptive.daam", "gaussian_adaptive.MultiHeadDensityGate",
                                        "gaussian_adaptive.DensityBlock", "gaussian_adaptive.density_gate",
                                        "gaussian_adaptive.multi_head_density_gate")),
            ("tests/methods/vision/test_gaussian_adaptive.py",), "partial",
            "the released density gate (per-head mean / unbiased variance, product of normalised Gaussians with "
            "learnable offsets and scales, w / max(sum w, eps)) on images or 1-D feature sequences, exact vs a "
            "numpy transcription; no CNN-LSTM / Transformer heads, no padding mask; in a digits CNN at equal "
            "parameters (BatchNorm CNN, docs/vision.md, 150 steps, 3 seeds) 88.7 +- 2.1 % vs plain 93.3 +- 1.5: below "
            "plain on 3 of 3 seeds (-4.6 +- 2.6 paired)"),
    "P01": (tuple(_VISION + n for n in ("gaussian_adaptive.gaam", "gaussian_adaptive.MultiHeadDensityGate",
                                        "gaussian_adaptive.importance_factor")),
            ("tests/methods/vision/test_gaussian_adaptive.py",), "partial",
            "both variants (MHGAAM's softmax-weighted mixture, GaussianBlock's product), exact vs transcriptions; "
            "the Importance Factor has no published formula (a labelled stand-in); in a digits CNN at equal parameters "
            "(BatchNorm CNN, docs/vision.md, 150 steps, 3 seeds) 95.6 +- 0.4 % vs plain 93.3 +- 1.5, +2.3 +- 1.5 "
            "paired, above plain on 3 of 3 seeds (suggestive at 3 seeds); not inserted into a transformer"),
    "P06": (tuple(_VISION + n for n in ("ulsam.ULSAM", "ulsam.ulsam_apply", "ulsam.subspace_softmax",
                                        "ulsam.ulsam_combine")),
            ("tests/methods/vision/test_ulsam.py",), "partial",
            "the official layer order (depthwise 1x1, BN, ReLU, 3x3 max pool, grouped 1x1 to g maps, BN, ReLU, "
            "spatial softmax, x (1 + A)), exact vs numpy in train and eval mode, parameter counts; a digits "
            "CNN at equal parameters 93.3 +- 1.0 % vs plain 93.3 +- 1.5 (BatchNorm CNN, docs/vision.md): null; no "
            "MobileNet run"),
    "P12": (tuple(_VISION + n for n in ("ela.ELA", "ela.ela_apply", "ela.ela_variant", "ela.strip_pool",
                                        "ela.group_norm_1d")),
            ("tests/methods/vision/test_ela.py",), "partial",
            "strip means, one shared 1-D conv, GroupNorm, sigmoid gates x y_h y_w, the T/B/S/L variants; exact vs "
            "numpy, transpose equivariance, parameter counts; GroupNorm group count unverified; a "
            "digits CNN at equal parameters 93.3 +- 1.7 % vs plain 93.3 +- 1.5 and SE 89.6 +- 2.1 (BatchNorm CNN, "
            "docs/vision.md): null vs plain"),
    "P42": (tuple(_VISION + n for n in ("psa.PolarizedSelfAttention", "psa.psa_channel", "psa.psa_channel_bottleneck",
                                        "psa.psa_spatial")),
            ("tests/methods/vision/test_psa.py", "tests/train/test_segmentation.py"), "partial",
            "channel-only and spatial-only branches, parallel and sequential layouts, the paper's form and both "
            "official modules (PSA_p, PSA_s); exact vs numpy for all six; no heatmap-regression toy; shapes "
            "segmentation U-Net, 3 seeds (docs/segmentation.md): parallel 0.702 +- 0.183, sequential 0.560 +- "
            "0.159 mIoU vs a parameter-matched 1x1 conv stack 0.401 +- 0.109 (3 of 3 seeds) but within the plain "
            "U-Net's spread (0.557 +- 0.177); a "
            "digits CNN at equal parameters (BatchNorm CNN, docs/vision.md): parallel 93.6 +- 2.2 % (null), "
            "sequential 87.7 +- 6.0 vs plain 93.3 +- 1.5 (worse on average, wide spread)"),
    "P28": (tuple(_MODIFIERS + n for n in ("entropy_scaling.entropy_invariant_scale", "entropy_scaling.entropy_factor",
                                           "entropy_scaling.entropy_scaled_attention", "entropy_scaling.entropy_score_mod",
                                           "entropy_scaling.visible_key_counts", "entropy_scaling.attention_entropy",
                                           "entropy_scaling.entropy_method")),
            ("tests/methods/modifiers/test_entropy_scaling.py",), "works",
            "logits x sqrt(ln N / ln T) with N counted per query from the mask and causal flag (a scale or a fused "
            "score_mod), decoding equal to prefill; measured (docs/modifiers.md): MiniLM's entropy spread from 32 "
            "to 512 tokens shrinks 26% but embeddings move < 1.1%; the small LM's loss past its training length "
            "is unchanged (null)"),
    "P27": (tuple(_MODIFIERS + n for n in ("act.act_calibrate", "act.sink_scores", "act.sink_set", "act.act_prob_mod",
                                           "act.act_attention", "act.search_act_heads", "act.act_method",
                                           "act.set_layer_methods")),
            ("tests/methods/modifiers/test_act.py",), "works",
            "exact ACT transform (a prob_mod on the dense path) and the per-head search, run on a small byte LM and "
            "MiniLM (docs/modifiers.md): the search keeps 0-1 of 8 heads, held-out loss unchanged (null); ACT on "
            "all heads +0.036 nats/byte; no GPT-2 check (no weights here), no decoding"),
    "P31": (tuple(_MODIFIERS + n for n in ("rcmha.RCMHA", "rcmha.rcmha_lm", "rcmha.dconv_qkv",
                                           "rcmha.relative_attention_xl", "rcmha.rel_shift", "rcmha.relative_gather",
                                           "rcmha.sinusoid_encoding")),
            ("tests/methods/modifiers/test_rcmha.py",), "works",
            "depthwise causal conv on Q/K/V + Transformer-XL relative scores (rel_shift = the explicit gather; delta "
            "kernels with W_R = u = v = 0 give causal MHA); byte LM, 300 steps, 3 seeds (docs/modifiers.md): RCMHA "
            "1.616 +- 0.029 vs MHA+RoPE 1.727 +- 0.023 nats/byte (paired gap -0.112 +- 0.016), relative attention "
            "without the conv -0.096; 6.5% more parameters; dense only, no decoding cache"),
    "P21": (tuple(_OBJECTIVES + "entropy_guided." + n for n in (
                "entropy_reg_loss", "entropy_reg_penalty", "head_entropy", "entropy_from_logits",
                "temperature_softmax_attention", "temperature_score_mod", "EntropyGuidedAttention",
                "use_entropy_guided")) + ("train.entropy_guided.main",),
            ("tests/methods/objectives/test_entropy_guided.py", "tests/train/test_entropy_guided.py"), "partial",
            "learnable per-(head, query) temperature + the thresholded entropy regulariser in the spec's and the "
            "official code's reductions; byte LM, 200 steps, 3 seeds (docs/entropy_guided.md): the code form "
            "lowers eval loss by 0.0062 +- 0.0018 nats/byte (3 of 3 seeds), the paper form is inert at lam = 1e-5; "
            "the softmax-only model where entropic overload appears is not built, so the headline claim is "
            "untested"),
    "P25": (tuple(_OBJECTIVES + "deft." + n for n in (
                "density_surrogate", "density_loss", "activation_density", "positive_fraction", "deft_loss",
                "LoRALinear", "DeftMLP", "apply_deft", "lora_params")) + ("train.deft.finetune",),
            ("tests/methods/objectives/test_deft.py", "tests/train/test_deft.py"), "partial",
            "the official density surrogate a^2/(a^2+eps) on the FFN activations + LoRA (r 8, alpha 16, query and "
            "value; bit-identical at init, only A/B train) on real MiniLM, keeping its embeddings (docs/deft.md, 3 "
            "seeds, 100 steps): fraction a > 0 0.2276 -> 0.2198 +- 0.0008 (lambda 0: 0.2276), cosine drift 0.002; "
            "small, and the paper's exact non-zero count does not move (GELU gives no exact zeros); adapters, "
            "prefix tuning and the toy classifier check not built"),
    "P54": (tuple(_OBJECTIVES + "fod." + n for n in (
                "gaussian_prior_attention_target", "sigma_from_logits", "sym_kl", "row_entropy", "rec_loss",
                "attention2d", "i2correlation_layer", "init_fod", "fod_forward", "fod_losses", "fod_anomaly_score"))
            + ("train.anomaly.main",),
            ("tests/methods/objectives/test_fod.py", "tests/train/test_anomaly.py"), "partial",
            "Attention2D with learned widths + the row-normalised Gaussian prior, I2Correlation (intra - inter), the "
            "two-phase minimax losses (weights 0 = rec exactly) and the rec x inter score; one-class digits, 3 seeds "
            "x 10 classes (docs/fod.md): FOD 0.624 +- 0.060 AUROC vs the official rec-only model 0.955 +- 0.002 "
            "(null: FOD loses); the spec's pasted-texture check also fails (0.740 vs rec-only 0.757); raw-pixel "
            "patches, not frozen CNN features"),
    "P46": (tuple(_OBJECTIVES + "adainf." + n for n in (
                "InflatedSampler", "weighted_real_generated_sampler", "real_fraction", "augment", "augment_batch",
                "nt_xent_loss")) + ("train.contrastive.main",),
            ("tests/methods/objectives/test_adainf.py", "tests/train/test_contrastive.py"), "partial",
            "real data replicated (dup 10, exact per-epoch proportions) + the weaker augmentation + SimCLR NT-Xent; "
            "digits, 500 steps, 3 seeds, ridge probe (docs/adainf.md): AdaInf 0.933 +- 0.000 vs real-only 0.922 +- "
            "0.006, but real-only with the weak augmentation also 0.933: the gain is the augmentation, the "
            "inflation half is a null; 'generated' data are deformed copies, not generative samples"),
    "P51": (tuple(_VISION + n for n in ("dual_attention.position_attention", "dual_attention.channel_attention",
                                        "dual_attention.channel_attention_weights",
                                        "dual_attention.additive_attention_gate", "dual_attention.PositionAttention",
                                        "dual_attention.ChannelAttention", "dual_attention.DualAttentionBottleneck",
                                        "dual_attention.AttentionGate")) + ("train.segmentation.SegUNet",),
            ("tests/methods/vision/test_dual_attention.py", "tests/train/test_segmentation.py"), "partial",
            "DAUNet's PAM and CAM (official order A softmax(A^T A), gamma 0 = identity) and AGUNet's additive gate on "
            "any number of spatial axes; shapes segmentation, 3 seeds, 300 steps (docs/segmentation.md): the dual "
            "bottleneck 0.482 +- 0.136 mIoU loses to a parameter-matched conv stack (0.722, 3 of 3 seeds), the gates "
            "are within the plain U-Net's spread; no 3-D run"),
    "P69": ((_VISION + "dappm.DAPPM", _VISION + "dappm.avg_pool_count_pad", "train.segmentation.SegUNet"),
            ("tests/methods/vision/test_dappm.py", "tests/train/test_segmentation.py"), "works",
            "DAPPM (pre-activated branches, count-pad average pools, hierarchical fusion + shortcut; a transcription "
            "test) as a no-attention context baseline; shapes segmentation, 3 seeds (docs/segmentation.md): 0.782 "
            "+- 0.045 mIoU vs 0.526 for a parameter-matched conv stack (3 of 3 seeds)"),
    "P35": (tuple(_OBJECTIVES + n for n in ("deim.matchability_aware_loss", "deim.varifocal_loss", "deim.mosaic",
                                            "deim.mixup", "deim.dense_o2o", "hungarian.matching_cost",
                                            "hungarian.hungarian_match", "hungarian.detr_set_loss",
                                            "hungarian.generalized_box_iou"))
            + ("jattn.nn.detr.TinyDETR", "train.detection.main", "train.detection.mean_average_precision"),
            ("tests/methods/objectives/test_deim.py", "tests/methods/objectives/test_hungarian.py",
             "tests/nn/test_detr.py", "tests/train/test_detection.py"), "works",
            "MAL (IoU^gamma targets, p^gamma negative weights, gamma 1.5, the code's reduction) and Dense O2O (2x2 "
            "mosaics) on a tiny DETR over the shapes set with a Hungarian baseline and an mAP@0.5 evaluator "
            "(docs/detection.md, 3 seeds): no faster convergence (mAP 0.001 vs 0.021 at 100 steps, 0.190 vs 0.177 "
            "at 300, within spread); 20 learned queries never learned in this budget (token queries used); MAL and "
            "O2O alone not run"),
    "P07": (tuple(_GENERATIVE + "softpag." + n for n in (
                "soft_pag", "perturbed_attention", "perturbation_guidance", "cfg_pag_guidance", "headhunter_greedy",
                "head_mask_from_heads")) + ("train.softpag.run_experiment",),
            ("tests/methods/generative/test_softpag.py", "tests/train/test_softpag.py"), "partial",
            "SoftPAG (1-u) A + u I as a prob_mod and as (1-u) softmax(qk^T) v + u v without A (equal, GQA too), "
            "CFG + PAG guidance and the greedy head search, on the trained tiny DiT (docs/softpag.md, DDIM-50, 3 "
            "seeds): HeadHunter raises its own objective on the search set, but held-out accuracy does not improve "
            "(46.3 +- 4.9 % vs CFG 46.8 +- 3.7), PAG on all heads hurts (43.2), and CFG w 3 at fewer evaluations "
            "gives 58.3"),
    "P59": (tuple(_OBJECTIVES + n for n in ("aem.attention_entropy", "aem.aem_loss", "aem.aem_total_loss",
                                            "abmil.GatedAttentionMILPool", "abmil.masked_softmax")) + ("train.mil.run",),
            ("tests/methods/objectives/test_aem.py", "tests/methods/objectives/test_abmil.py",
             "tests/train/test_mil.py"), "works",
            "CE + lam * sum p log p on ABMIL's gated attention (lam = 0 is ABMIL bit for bit); digit bags, 5 seeds, "
            "600 steps (docs/mil.md): entropy 0.56 -> 2.17 nats, bag AUC 0.909 +- 0.018 vs ABMIL 0.884 +- 0.008 "
            "(paired +0.026, 4 of 5 seeds), localisation AUC +0.068 (5 of 5); digit bags, not the spec's Gaussian "
            "bags; top_k variant and 80% subsampling not built"),
    "P40": (tuple(_OBJECTIVES + n for n in ("acmil.ACMIL", "acmil.stochastic_topk_mask", "acmil.apply_instance_mask",
                                            "acmil.branch_diversity", "acmil.acmil_loss", "acmil.num_masked"))
            + ("train.mil.run",),
            ("tests/methods/objectives/test_acmil.py", "tests/methods/objectives/test_abmil.py",
             "tests/train/test_mil.py"), "partial",
            "MBA (5 branches) + STKIM (training only, exact count) + branch diversity; digit bags, 5 seeds "
            "(docs/mil.md): bag AUC 0.927 +- 0.016 vs ABMIL 0.884 +- 0.008 (paired +0.044, 5 of 5), and the gain "
            "is STKIM's (without it 0.884); but the claimed de-concentration does not reproduce (top-1 mass 0.347 "
            "with STKIM vs 0.282 without), and the spec's k = 10 does worse (0.904 +- 0.043) than k = 3"),
    "P16": (tuple(_MODIFIERS + n for n in ("attention_influence.uniform_head_ablation",
                                           "attention_influence.head_ablation_prob_mod",
                                           "attention_influence.retrieval_head_scores", "attention_influence.top_heads",
                                           "attention_influence.attention_influence")),
            ("tests/methods/modifiers/test_attention_influence.py", "tests/train/test_attention_influence.py"),
            "partial",
            "uniform head ablation (running mean of v, or a prob_mod), retrieval-head scores, the influence ratio; "
            "train/attention_influence.py detects the needle LM's retrieval heads and compares ablating them with "
            "random heads (docs/modifiers.md); no real pretraining corpus or data-selection run"),
    "P02": (tuple("jattn.methods.routing.moh." + n for n in (
                "moh_gates", "moh_route", "load_balance_loss", "moh_llama_router", "moh_attention",
                "moh_capacity_attention", "moh_capacity", "capacity_flop_fraction", "MoHAttention", "use_moh",
                "moh_aux_loss")),
            ("tests/methods/routing/test_moh.py", "tests/train/test_moh_train.py"), "partial",
            "shared + top-k routed heads with the official gating (x k, the 2 softmax mix), load-balance loss, the "
            "parameter-free MoH-LLaMA3 router; a reference core and a static-capacity gathered core (FLOPs scale with "
            "the active fraction); equals MHA with all heads and gates 1. Small byte LM, 3 seeds (docs/moh.md): "
            "75% and 50% active within noise of MHA (null, resolves ~0.1 nats/byte); no Pallas varlen kernel, no "
            "decoding, no GPU timing"),
    "P55": (tuple(_ANALYSIS + n for n in ("fusemax.cascade_attention", "fusemax.cascade_cost_model")),
            ("tests/methods/analysis/test_fusemax.py",), "works",
            "the 3-, 2- and 1-pass Einsum cascades, each one scan over the key chunks per pass (counted in the "
            "jaxpr), all equal softmax attention; the cost model's 1-pass buffer is independent of M while the "
            "unfused 3-pass needs M P; jattn's flash forward is one kernel with one loop over the kv tiles; op counts "
            "follow the cascade definitions (the artifact's table was not read); no accelerator model"),
    "P41": (tuple(_DYNAMIC + n for n in ("focus_detr.topk_gather", "focus_detr.scatter_back",
                                         "focus_detr.oesm_self_attention", "focus_detr.OESMAttention",
                                         "focus_detr.FocusEncoderLayer", "focus_detr.MaskPredictor",
                                         "focus_detr.FocusScorer", "focus_detr.top_down_scores", "focus_detr.mc_scores",
                                         "focus_detr.cascade_topk", "focus_detr.focus_token_count",
                                         "focus_detr.focus_layer_flops", "deformable.ms_deform_attn",
                                         "deformable.MSDeformAttn")),
            ("tests/methods/dynamic/test_focus_detr.py", "tests/methods/dynamic/test_deformable.py"), "partial",
            "foreground scoring (MaskPredictor, top-down fusion), static top-k gather / scatter-back, OESM "
            "self-attention among the top tokens, multi-scale deformable attention (exact vs a numpy bilinear "
            "transcription and torch's grid_sample) and the FocusEncoderLayer; dense limit equals the dense layer; "
            "no 6-layer encoder loop, no focal-loss supervision, no DINO decoder or COCO run"),
    "P38": (tuple(_DYNAMIC + n for n in ("flexprefill.flexprefill_attention", "flexprefill.flexprefill_block_mask",
                                         "flexprefill.flexprefill_select", "flexprefill.jsd")),
            ("tests/methods/dynamic/test_flexprefill.py",), "partial",
            "selector = transcription of the official rule (both head patterns, GQA), exact vs dense with its mask; "
            "synthetic 32K on CPU: 3.1x dense at recall 0.53, selection 45% of the time (targets: recall >= 0.9, "
            "<= 20%); no GPU measurement; real-input and equal-density tables: docs/dynamic_sparse.md"),
    "P19": (tuple(_KV + n for n in ("x_ecomla.mla_attention", "x_ecomla.mla_decode_absorbed",
                                    "x_ecomla.upcycle_gqa_to_mla", "x_ecomla.energy_rank", "x_ecomla.kd_kl_loss",
                                    "x_ecomla.kv_compression", "x_ecomla.MLAAttention")),
            ("tests/methods/kv/test_x_ecomla.py",), "works",
            "MLA with absorbed decode on jattn.decode_attention (MQA over the latent), SVD upcycling exact at full "
            "rank, KD from a trained GQA LM (train/x_ecomla.py: KD 1.92 vs teacher 1.77 nats/byte from 3.35 at "
            "init, 3 seeds); no DPO stage, no Pallas latent kernel of its own"),
    "P24": (tuple(_KV + "zipcache." + n for n in (
                "probe_positions", "normalized_attention_score", "select_salient", "quantize_channelwise",
                "quantize_tokenwise", "quantize_channel_separable_tokenwise", "compress_kv", "compress_with_scores",
                "zipcache_bytes_per_token", "ZipCompressedKV", "ZipCache", "zipcache_prefill", "zipcache_decode"))
            + tuple(_KV + "quantized." + n for n in ("quantize", "dequantize", "pack", "unpack", "QuantizedKVCache",
                                                     "bytes_per_token", "quantized_decode_attention"))
            + ("pallas_kernels.decode_quantized.quantized_decode_partials",),
            ("tests/methods/kv/test_zipcache.py", "tests/methods/kv/test_quantized.py",
             "tests/methods/kv/test_quantized_decode.py"), "partial",
            "probe-normalised saliency, 4/2-bit channel-wise keys and channel-separable token-wise values (packed), "
            "streaming recompression every gap, KV bytes = formula; beats random selection in every seed and "
            "accumulated-score selection on mean (3-5 of 5 seeds) at equal bytes (benchmarks/kv_quantization.py); "
            "the KIVI-style QuantizedKVCache has a split-K Pallas kernel that dequantises packed 8/4/2-bit key "
            "groups in place (GPU/TPU; exact vs the reference over the dequantised view), and reads ZipCache's "
            "mixed 4/2-bit classes in place too (one kernel sequence per class, s_c on the class's output; one "
            "decode token, no window; else the view); equal to the full cache in the needle test (1K-16K, "
            "within one haystack per cell); no LLM evaluation"),
    "P44": (tuple(_KV + n for n in ("tokenselect.tokenselect_indices", "tokenselect.tokenselect_select",
                                    "tokenselect.tokenselect_decode", "tokenselect.SelectionCache",
                                    "tokenselect.token_votes", "tokenselect.query_fingerprint",
                                    "gather.gathered_decode_attention")),
            ("tests/methods/kv/test_tokenselect.py", "tests/methods/kv/test_tidaldecode.py"), "partial",
            "fingerprint, soft vote, sinks + top-k + locals, Selection Cache and gathered attention with contiguous "
            "RoPE, exact vs transcriptions of the official code; in the needle test (train/needle_kv.py, the vote "
            "in every layer at 256 keys) 1.00/0.97/0.72/0.45/0.12 at 1K-16K vs the full cache's "
            "1.00/1.00/0.57/0.42/0.10 (one seed); no DecoderLM driver (it caches rotated keys), no Pallas "
            "scoring/gather kernels"),
    "P71": (tuple(_KV + n for n in ("tidaldecode.tidal_decode_step", "tidaldecode.select_topk_tokens",
                                    "tidaldecode.sparse_decode_attention", "tidaldecode.selection_recall",
                                    "tidaldecode.TidalState", "tidaldecode.layer_kind",
                                    "tidaldecode.tidal_lm_decode_step", "gather.gathered_decode_attention")),
            ("tests/methods/kv/test_tidaldecode.py",), "partial",
            "full / select / persisted-sparse schedule exact vs dense one-hot masks; a DecoderLM decode driver equal "
            "to full decoding at full budget; recall on a small MQAR model at the copy plateau; in the needle test "
            "(2 layers: layer 0 selects, layer 1 reuses) it falls behind the full cache from 4K (0.35 vs 0.57); no "
            "LM perplexity vs random-k, no Pallas gather/top-k kernels"),
    "P18": (tuple(_LINEAR + n for n in ("lka.lka", "lka.lka_gate", "lka.LKA", "lka.VANAttention")),
            ("tests/methods/linear/test_lka.py",), "partial", "LKA and VAN attention; VAN blocks in a "
            "28k-parameter patch net on digits 91.4 +- 1.4 % vs a matched ViT 85.1 +- 4.0 (3 seeds, docs/vision.md); no "
            "VAN-B0..B2 models"),
    "P20": (tuple(_LINEAR + n for n in ("linfusion.generalized_linear_attention", "linfusion.LinFusionAttention"))
            + ("train.dit_distill.LinFusionDiTAttention", "train.dit_distill.build_student", "train.dit_distill.distill"),
            ("tests/methods/linear/test_linfusion.py", "tests/train/test_dit_distill.py"), "partial",
            "distilled into the trained tiny DiT (docs/dit_distill.md, 300 steps, 3 sample seeds): samples "
            "classified correctly 61.7 % untrained -> 70.3 +- 4.5 % distilled vs the teacher's 73.7 +- 2.9; at 16 "
            "tokens it saves nothing (its feature MLPs double the sublayer); no 4x-resolution check, no Pallas "
            "two-pass kernel"),
    "P29": (tuple(_LINEAR + n for n in ("agent.agent_attention", "agent.agent_attention_as_linear",
                                        "agent.pool_agents", "agent.AgentAttention")),
            ("tests/methods/linear/test_agent.py",), "partial", "no class token, no AgentSD; an "
            "Agent-Attention ViT at 28k parameters on digits 87.8 +- 0.6 % vs a matched ViT 85.1 +- 4.0 (docs/vision.md): "
            "within the spread"),
    "P50": ((_LINEAR + "sigmoid.sigmoid_attention", _LINEAR + "sigmoid.kernel_attention",
             _LINEAR + "sigmoid.kv_bias_attention", "jattn.nn.sink_metric", "jattn.nn.streamed_sink_metric",
             "jattn.nn.capture.records_sink_metric"),
            ("tests/methods/linear/test_sigmoid.py", "tests/nn/test_attention_maps.py", "tests/nn/test_capture.py"),
            "partial", "sink metric (also through each layer's own hooked core, docs/modifiers.md), sigmoid/kernel "
            "variants and KV-bias slot; sink emergence is a null result at CPU scale"),
    "P57": (tuple(_LINEAR + n for n in ("dsf.DSF", "dsf.dsf_recurrent", "dsf.dsf_attention_matrix",
                                        "dsf.linear_attention_dsf", "dsf.s6_dsf", "dsf.dsf_to_linear_attention")),
            ("tests/methods/linear/test_dsf.py",), "partial", "no MQAR comparison run"),
    "P58": (("jattn.linear_attention", "jattn.alibi_log_decay", _LINEAR + "transnormer.TNLBlock",
             _LINEAR + "transnormer.TNLGatedLinearAttention", _LINEAR + "transnormer.srms_norm"),
            ("tests/methods/linear/test_transnormer.py", "tests/ops/test_linear.py"), "partial",
            "TNL block and decays; small LM run in docs/experiments.md; no GPU constant-speed measurement"),
    "P62": (("jattn.nn.icl.OneLayerMHSoftmax", "jattn.nn.icl.debiased_gd_predictor", "jattn.nn.icl.kq_diagonality",
             "train.tasks.ICLRegression", "train.p62_control.OneLayerMHLinear"),
            ("tests/nn/test_icl.py", "tests/train/test_p62_control.py"), "works",
            "trained model reproduces the KQ/OV patterns (docs/experiments.md); the spec's length control "
            "(train.p62_control, trained at n = 40, 3 seeds, docs/p62_control.md): at n = 80 softmax 0.075 vs "
            "identity-kernel linear 0.786 test MSE (reproduces), but the 1/n-normalised linear control "
            "generalises as well (0.074): softmax's edge is its normalisation"),
    "P73": (tuple(_LINEAR + n for n in ("ninformer.MixerGatingUnit", "ninformer.NiNBlock", "ninformer.NiNformer")),
            ("tests/methods/linear/test_ninformer.py",), "partial", "NiN blocks at 28k "
            "parameters on digits 95.2 +- 1.5 % vs a matched ViT 85.1 +- 4.0 (docs/vision.md, best token row); no CIFAR run"),
    "P74": (("jattn.linear_attention", "jattn.linear_attention_step", "pallas_kernels.linear.lightning_attention",
             _LINEAR + "lightning2.lightning_attention"),
            ("tests/ops/test_linear.py", "tests/kernels/test_linear.py"), "partial",
            "exact and tested on CPU (interpret mode); GPU speed not measured"),
    "P48": (("jattn.neighborhood_attention", _SPARSE + "gna.gna_attention", _SPARSE + "gna.gna_mask",
             _SPARSE + "gna.gna_tile_map", _SPARSE + "gna.gna_cost_model", _SPARSE + "gna.token_permute"),
            ("tests/methods/sparse/test_gna.py", "tests/ops/test_neighborhood.py",
             "tests/ops/test_neighborhood_natten.py"), "partial",
            "same neighborhood_attention code as P60, plus stride, gna_tile_map and the cost model; exact vs "
            "a transcription of NATTEN's mask rule (the NATTEN equality test is skipped unless natten is "
            "installed); GPU speed not measured"),
    "P60": (("jattn.neighborhood_attention", _SPARSE + "fna.na_attention", _SPARSE + "fna.neighborhood_mask",
             "jattn.nn.NeighborhoodAttention"),
            ("tests/methods/sparse/test_fna.py", "tests/ops/test_neighborhood.py", "tests/nn/test_neighborhood.py",
             "tests/ops/test_neighborhood_natten.py"),
            "partial",
            "same neighborhood_attention code as P48: tiled NA (xla), token-permuted block-sparse (pallas), "
            "fwd+bwd, exact vs a transcription of NATTEN's mask rule (the NATTEN equality test is skipped "
            "unless natten is installed); no RPB; GPU scaling not measured"),
    "P04": (tuple(_SPARSE + n for n in ("radial.radial_attention", "radial.radial_block_mask", "radial.radial_mask_fn", "radial.radial_attention_mask",)),
            ("tests/methods/sparse/test_radial.py",), "partial",
            "exact vs the dense reference at tile and token level; kept tiles grow ~F log F; H200 speedup not measured"),
    "P11": (tuple(_SPARSE + n for n in ("moa.moa_attention", "moa.moa_block_mask", "moa.moa_mask_fn", "moa.moa_density", "moa.moa_candidates", "moa.attention_influence", "moa.moa_profile", "moa.moa_plan",)),
            ("tests/methods/sparse/test_moa.py",), "partial",
            "per-head elastic windows, influence profile and MILP plan run end to end; no decode kernel, no perplexity-based choice"),
    "P15": (tuple(_SPARSE + n for n in ("s2.s2_attention", "s2.s2_block_mask", "s2.s2_mask_fn", "s2.s2_attention_mask", "s2.s2_coverage",)),
            ("tests/methods/sparse/test_s2.py",), "partial",
            "per-head shards + local blocks, union coverage tested; no paged decode kernel, no speed measurement or LM"),
    "P43": (tuple(_SPARSE + n for n in ("saisa.naavit_attention", "saisa.saisa_attention", "saisa.naavit_mask", "saisa.naavit_block_mask", "saisa.naavit_layer_flops", "saisa.SAISADecoderBlock", "saisa.VisualProjector",)),
            ("tests/methods/sparse/test_saisa.py",), "works",
            "exact NAAViT mask (visual rows are never queries), decoder block with per-layer visual inputs, FLOP counter"),
    "P52": (tuple(_SPARSE + n for n in ("davit.window_attention_2d", "davit.window_attention_2d_direct", "davit.window_block_mask", "davit.channel_group_attention", "davit.SpatialWindowAttention", "davit.ChannelGroupAttention", "davit.DualAttentionBlock", "davit.DaViT",)),
            ("tests/methods/sparse/test_davit.py",), "partial",
            "window attention on the block-sparse kernel and channel-group attention, exact; one dual "
            "block in a 28k-parameter net on digits 91.0 +- 0.9 % vs a matched ViT 85.1 +- 4.0 (docs/vision.md); no CIFAR-10 run"),
    "P61": (tuple(_SPARSE + n for n in ("biformer.bra_route", "biformer.bra_attention", "biformer.bra_attention_block_sparse", "biformer.bi_level_routing_attention", "biformer.bra_block_mask", "biformer.local_context_enhancement", "biformer.BiLevelRoutingAttention", "biformer.BiFormerBlock",)),
            ("tests/methods/sparse/test_biformer.py",), "partial",
            "gather form == block-sparse form == dense reference; a parameter-matched digits "
            "config ships (configs/vision_biformer.py) but was not run"),
    "P63": (tuple(_SPARSE + n for n in ("clear.clear_attention", "clear.clear_mask", "clear.clear_block_mask", "clear.downsample_kv", "clear.proportional_scale", "clear.clear_distillation_loss", "clear.CLEARAttention",)) + ("train.dit_distill.build_student",),
            ("tests/methods/sparse/test_clear.py", "tests/train/test_dit_distill.py"), "partial",
            "circular 2-D window + pooled branch, exact; distilled into the tiny DiT (docs/dit_distill.md): the "
            "r = 1.5 window already covers 39 % of its 4x4 token grid and matches the teacher untrained (74.0 vs "
            "73.7 %), distillation changes nothing (73.3): a null at this size"),
    "P64": (tuple(_SPARSE + n for n in ("paro.paro_attention", "paro.paro_permute", "paro.paro_unpermute", "paro.paro_mask_to_original", "paro.select_paro_order", "paro.calibrate_block_mask", "paro.quantize_int8_per_block",)),
            ("tests/methods/sparse/test_paro.py",), "partial",
            "permute + block-sparse == dense with the mask mapped back; order selection; INT8 simulated only"),
    "P70": (tuple(_SPARSE + n for n in ("sinklora.shifted_sparse_attention", "sinklora.sf_attention", "sinklora.shifted_sparse_block_mask", "sinklora.sf_block_mask", "sinklora.group_causal_block_mask", "sinklora.shifted_group_size",))
            + tuple(_KV + n for n in ("h2o.H2OCache", "h2o.h2o_keep_mask")),
            ("tests/methods/sparse/test_sinklora.py", "tests/methods/kv/test_h2o.py"), "partial",
            "S2-Attn (LongLoRA roll) and SF-Attn with sinks, exact; H2O fixed-budget eviction (prefill + decode "
            "steps) exact against a transcription of the rule; H2O is a decoding cache kind (Attention.init_cache("
            "kind='h2o'), DecoderLM.generate(cache='h2o')); no fine-tuning run"),
    "P45": (tuple(_KV + "duo_attention." + n for n in (
                "streaming_mask", "streaming_mask_fn", "streaming_block_mask", "streaming_attention",
                "mixed_duo_attention", "duo_attention", "sparsify_heads", "duo_distillation_loss", "duo_kv_bytes",
                "DuoKVCache")) + ("train.duo_gates.train_gates",),
            ("tests/methods/kv/test_duo_attention.py",), "partial",
            "Lambda mask on the block-sparse kernel, exact mixed/deployed attention, ring DuoKVCache (bytes = "
            "formula), gate training (toy: local heads' alpha -> 0, the retriever kept, 3 seeds), a decoding "
            "cache kind (Attention.init_cache(kind='duo', is_retrieval=...), generate(cache='duo')); no "
            "LLM/BookSum run"),
    "P49": (tuple(_KV + "task_kv." + n for n in (
                "head_semantic_vectors", "semantic_distances", "semantic_separator", "kv_head_flags",
                "middle_activation_indices", "per_head_kv_compress", "TaskKVCache")),
            ("tests/methods/kv/test_task_kv.py",), "partial",
            "hypothesis-level (only the abstract was readable): separator, middle activations and decode policy "
            "are the spec's reading, exact against transcriptions; the buffer does not free memory; no benchmark"),
    "P56": (tuple(_VISION + "hmode." + n for n in (
                "pixelwise_expert_gate", "hierarchical_mixture", "HMoDEHead", "DensityHead",
                "relative_local_count_loss", "relative_order_loss", "cv_squared", "expert_importance_loss",
                "local_counts")) + ("train.counting.main",),
            ("tests/methods/vision/test_hmode.py", "tests/train/test_counting.py"), "partial",
            "three density experts, the two-level pixel-wise gate (pair softmaxes, then a 3-way gate under a spatial "
            "attention), cv^2 importance loss and the relative local count loss, against numpy transcriptions; "
            "shapes counting (1-6 objects), 3 seeds, equal parameters (docs/counting.md): MAE 0.331 +- 0.035 vs "
            "plain mean-of-heads 0.319 +- 0.026 and SE 0.359 +- 0.026 (null: the gates collapse onto one expert)"),
    "P23": (tuple(_VISION + "dcal." + n for n in (
                "attention_rollout", "glca_select", "glca", "pwca", "uncertainty_weighted_loss", "DCAL", "DCALBlock",
                "dcal_loss")) + ("train.dcal.run",),
            ("tests/methods/vision/test_dcal.py", "tests/train/test_dcal.py"), "partial",
            "attention rollout, top-R GLCA (its own block beside the last SA block), PWCA over the concatenated "
            "keys of an image pair with shared weights, training only, uncertainty-weighted losses; digits ViT, 3 "
            "seeds (docs/dcal.md): +GLCA +1.0 +- 1.4 points, PWCA -3.1 +- 1.6 at 300 steps and -0.2 +- 1.5 at 600 "
            "(its train-test gap 2.6 vs 3.7, spreads overlap): null on digits, no fine-grained data"),
    "P36": (tuple("jattn.methods.routing.bam." + n for n in (
                "soft_mixture_of_attention", "upcycle", "SoftMoA", "ParallelMoEBlock", "MoEFFN", "moe_ffn",
                "ParallelMoELM")) + ("train.bam.main",),
            ("tests/methods/routing/test_bam.py", "tests/train/test_bam.py"), "partial",
            "soft mixture of attention experts as one jattn.attention call (N*H heads; KV-shared as the GQA form), "
            "top-2 FFN experts, the parallel block and upcycle (averaged non-expert weights); byte LM branched into "
            "code / comment experts, 3 seeds (docs/routing.md): vs the parameter-averaged dense model +0.002 at "
            "step 0, tied at 15, -0.022 +- 0.007 nats/byte at 60 (at 1.8x the parameters)"),
    "P53": (tuple("jattn.methods.routing.graph_moe." + n for n in (
                "attention_aware_gate", "attention_aware_gate_flash", "similarity_aware_gate", "similarity_matrix",
                "gate_entropy", "route_top_k", "expert_ffn", "AttentionAwareMoE")) + ("train.graph_moe.main",),
            ("tests/methods/routing/test_graph_moe.py", "tests/train/test_graph_moe.py"), "partial",
            "attention-aware and similarity-aware gates p = A softmax(r), computed as attention with v = P (no dense "
            "A), causal; top-1 4-expert byte LM, 3 seeds (docs/routing.md): routing fluctuation -0.012 +- 0.041 "
            "(attention-aware, noise) and +0.096 +- 0.047 (similarity-aware, worse), loss not better: null. The "
            "spec's entropy claim is false (entropy is concave: mixing raises it; tested)"),
    "P66": (tuple(_GENERATIVE + "vl_sam." + n for n in (
                "head_importance_meanmax", "aggregate_heads", "attention_rollout", "null_flow", "localization_map",
                "threshold_map", "attention_to_points", "mask_iou", "centre_prior")) + ("train.vlm_methods.run_vl_sam",),
            ("tests/methods/generative/test_vl_sam.py", "tests/train/test_vlm_methods.py"), "partial",
            "mean-max head weighting, regularised attention flow (divided by the mask-only flow), maps to points "
            "and masks; trained tiny VLM (96% exact match), 3 x 256 held-out shapes (docs/vlm_methods.md): flow "
            "with a 0.5 residual points at the named object 0.877 +- 0.001 (IoU 0.350) vs last layer 0.843 (0.299), "
            "a tie with the first layer alone 0.872 (0.355); as specified (no residual) 0.764; on a 51% "
            "checkpoint the first layer won (0.825 vs 0.705); no SAM stage"),
    "P14": (tuple(_GENERATIVE + "var." + n for n in (
                "detect_sink_tokens", "massive_dims", "scaled_tau", "rms_normalize", "image_centric_rows",
                "var_redistribute", "var_prob_mod")) + ("train.vlm_methods.run_var",),
            ("tests/methods/generative/test_var.py", "tests/train/test_vlm_methods.py"), "partial",
            "sink detection on massive dimensions, image-centric rows, redistribution of the sinks' mass to visual "
            "non-sink tokens as a prob_mod (row sums kept); trained tiny VLM, 3 x 256 held-out shapes: null on "
            "the 51% and the 96% checkpoints (hallucination -0.002 +- 0.006, +0.0007 +- 0.0010; this width-64 "
            "model has no massive activations to find)"),
    "P30": (tuple(_GENERATIVE + "afa." + n for n in (
                "spatial_softmax_aggregate", "SABWAggregator", "AFAEnsemble", "make_afa_train_step", "afa_loss"))
            + ("train.afa.main",),
            ("tests/methods/generative/test_afa.py", "tests/train/test_afa.py"), "partial",
            "per-token softmax over M frozen experts' features after every DiT block, zero-initialised (exactly the "
            "experts' mean), trained on the eps-MSE; half-size DiTs on digit classes 0-4 / 5-9, 3 seeds "
            "(docs/afa.md): experts fine-tuned from a shared base: AFA below both experts and their output average "
            "(-0.0008 +- 0.0001 eps-MSE, 1.1%), a union model at equal steps as good; experts from scratch: "
            "feature averaging breaks (0.64) and AFA is worse than the output average (null); no sample quality"),
    "P68": (tuple(_SPARSE + "gri." + n for n in ("global_regional_attention", "gri_mask", "avg_pool_tokens",
                                                  "gri_attention_flops")),
            ("tests/methods/sparse/test_gri.py",), "works",
            "a labelled reconstruction (the paper is withdrawn, no code): window attention whose keys add "
            "average-pooled global tokens in one softmax, region by region or as one masked call, equal to a "
            "float64 loop over [K; pooled K] (GQA, gradients); full window and no pool = dense; attention FLOPs "
            "2x below dense at 16 tokens, 32x at 4096; nothing else of the paper (pruning, CondConv) is built"),
    "P10": (tuple(_VISION + "sdanet." + n for n in (
                "SelectiveDenseAttentionNeck", "DenseAttentionModule", "channel_select_attention",
                "spatial_attention", "nonlocal_block", "sda_refine", "sda_neck", "gather_levels", "resize_to"))
            + ("train.segmentation.LevelFusion", "train.segmentation.SegUNet"),
            ("tests/methods/vision/test_sdanet.py", "tests/train/test_segmentation.py"), "works",
            "a reconstruction (the official neck ships only as .pyc): gather levels to one size, SK-style channel "
            "selection across levels, a 7x7 spatial gate, a zero-initialised non-local block through "
            "jattn.attention, the refined map added back to every level. Works by its spec (a toy multi-scale "
            "segmentation where the neck trains stably): as a neck over a U-Net's skips and bottleneck on shapes, "
            "3 seeds (docs/segmentation.md), 0.606 +- 0.165 mIoU vs a parameter-matched balanced pyramid 0.600 +- "
            "0.250 (null gain); digits BatchNorm CNN row 92.8 +- 2.5 vs plain 93.7 +- 0.9 (null); no detector, no "
            "PIDray data"),
    "P47": (tuple(_VISION + "fdconv." + n for n in (
                "FDConv", "frequency_groups", "weight_to_dft", "dft_to_weight", "group_weights", "assemble_kernel",
                "fbm_masks", "frequency_bands", "band_modulation", "per_sample_conv", "fdconv_apply",
                "dft_parameter_scale")) + ("train.fdconv_ablation.run_variant",),
            ("tests/methods/vision/test_fdconv.py", "tests/train/test_vision_modules.py"), "works",
            "weights stored as FFT coefficients split by radius into disjoint groups, kernel spatial modulation "
            "(channel / filter / spatial / kernel gates) and frequency band modulation; uniform gates = the static "
            "conv, bands sum to the input; digits sanity row (BatchNorm CNN, 3 seeds, docs/vision.md): as the code "
            "builds it 75.5 +- 3.9 vs plain 93.6 +- 1.3 at 13.5k parameters, because its spectrum's stored scale "
            "makes Adam's weight steps 4-6x small and its filter head starts its gates spread over (0, 2) "
            "(ablation: train.fdconv_ablation); with dft_scale='unit' and filter_gate_init='one' (same function, "
            "off by default) 94.5 +- 0.9, +0.9 +- 2.1 paired: on par"),
    "P17": (tuple(_OBJECTIVES + "acam_kd." + n for n in (
                "init_params", "align", "stca_fusion", "ascm_masks", "masked_distill_loss", "mask_diversity_loss",
                "acam_kd_loss", "feature_kd_loss")) + ("train.acam_kd.main", "train.acam_kd.run_student"),
            ("tests/methods/objectives/test_acam_kd.py", "tests/train/test_acam_kd.py"), "partial",
            "student-teacher cross-attention fusion through jattn.attention (teacher queries, student keys and "
            "values), 4 spatial + 4 channel sigmoid masks from the fused feature, mask-weighted distillation and a "
            "Dice diversity term; tiny DETR on shapes, 3 seeds (docs/acam_kd.md): mAP@0.5 at 300 steps 0.224 +- "
            "0.008 vs no KD 0.178 +- 0.071 and feature KD 0.184 +- 0.081, inside the spread (null); the teacher "
            "(0.110) is weaker than its students"),
    "P26": (tuple(_KV + "vattention." + n for n in (
                "VirtualKVAllocator", "PagedBlockAllocator", "contiguous_decode_attention",
                "contiguous_prefill_attention", "paged_decode_attention"))
            + ("jattn.cache.ContiguousKVCache", "jattn.cache.PagedKVCache"),
            ("tests/methods/kv/test_vattention.py",), "works",
            "no new attention math: contiguous and paged (shuffled pool) decode/prefill entry points over the one "
            "length-aware split-K decode kernel, equal to a dense oracle (GQA, odd lengths, xla and interpreted "
            "Pallas); VirtualKVAllocator, an accounting simulator of vAttention's demand-mapped pages (deferred "
            "reclamation, eager mapping); on a seeded serving trace (docs/vattention.md) 64 KB pages map as tightly "
            "as 16-token paging, 14x less than a static reservation, 2 MB pages 1.30x the bytes in use, deferral "
            "4-5x fewer map calls; CPU decode contiguous 3x faster than paged; no GPU timing"),
    "P39": (tuple(_GENERATIVE + "paint." + n for n in (
                "select_informed_visual_tokens", "boost_logits", "paint_score_mod", "iqr_outliers", "patch_scores"))
            + ("train.vlm_paint_dymu.run_paint",),
            ("tests/methods/generative/test_paint.py", "tests/train/test_vlm_paint_dymu.py"), "partial",
            "local / summary visual tokens (attention received in the first / last encoder layer: the tiny ViT has "
            "no CLS; IQR outliers), logit += alpha|logit| as a fused score_mod on the text rows; trained tiny VLM, "
            "3 x 256 held-out shapes (docs/vlm_paint_dymu.md): the selection finds objects (90% vs 18% base rate) "
            "and raises their attention, but on the 96% captioner hallucination rises 0.007 -> 0.019 and exact "
            "match falls -0.023 (on a 50% one +0.023 and -0.034): negative; an oracle object boost hurts more"),
    "P67": (tuple(_GENERATIVE + "dymu." + n for n in (
                "bipartite_merge", "bipartite_similarity", "batch_level_threshold", "proportional_attention",
                "vtu_expand", "vtu_merge", "vtu_attention", "compact", "tokens_kept"))
            + ("train.vlm_paint_dymu.run_dymu", "train.vlm_paint_dymu.merged_encode"),
            ("tests/methods/generative/test_dymu.py", "tests/train/test_vlm_paint_dymu.py"), "works",
            "DToMe in the ViT at inference (threshold merging, size-weighted, proportional attention as a log-size "
            "key bias), batch-level thresholds, VTU (expand = compact + log-size bias here: no positions on image "
            "tokens; tested); trained tiny VLM (96% exact match), 3 x 256 held-out shapes: 31.6 of 64 tokens kept "
            "(26.0 for one object, 36.9 for three) at exact match 0.957 vs 0.964, 39.4 kept at 0.964; fixed-r ToMe "
            "as good at r <= 12; without VTU -4 to -66 points; no RoPE-decomposed exact-VTU kernel"),
    "P34": (tuple(_GENERATIVE + "attentive_eraser." + n for n in (
                "masked_key_attention", "sarg_guidance", "aas_hook", "AASSchedule", "token_mask"))
            + ("train.dit_editing.run_removal",),
            ("tests/methods/generative/test_attentive_eraser.py", "tests/train/test_dit_editing.py"), "works",
            "AAS (foreground keys masked for every query, similarity suppression lambda on foreground queries) on "
            "jattn.attention as DiT attn_fns with a layer/step schedule, and SARG guidance; a tiny shapes DiT "
            "(docs/dit_editing.md; under-trained: samples from noise are blobs, so images are noised to t=300 and "
            "denoised), 3 x 16 held-out images: distance to the true background inside the removed object 0.193 +- "
            "0.021 (mask-only blend) -> 0.157 (AAS) -> 0.108 +- 0.009 (AAS + SARG), outside unchanged 0.017"),
    "P72": (tuple(_GENERATIVE + "diffuhaul." + n for n in (
                "masked_attention", "shared_kv_attention", "interpolate_kv", "nn_copy_features", "blob_mask",
                "blob_leakage")) + ("train.dit_editing.run_drag",),
            ("tests/methods/generative/test_diffuhaul.py", "tests/train/test_dit_editing.py"), "partial",
            "blob-restricted attention, shared source K/V, K/V interpolation and nearest-neighbour feature copy "
            "(schedules are the project's: no official code); on the tiny shapes DiT blob masking takes attention "
            "leakage from 0.81-0.90 to 0 without hurting the denoiser, but dragging an object 8 px is null (IoU "
            "0.282 +- 0.016 vs blended denoising 0.288 +- 0.010; the old copy stays); no BlobGEN layout tokens"),
}


# id -> the Attention(method=...) names of every built paper whose method is an attention layer over
# q, k, v (jattn/nn/paper_methods.py registers them from this table), or a str: why it is not one.
_LAYER = {
    "P03": "exact split-KV softmax (merge_partials): the layer it gives is method='softmax'",
    "P65": "a decode-time split-K merge of exact softmax: the layer it gives is method='softmax'",
    "P22": "an Op/B cost model and the GQA-packed decode kernel under exact softmax: the layer is method='softmax'",
    "P09": ("hip",),
    "P38": ("flexprefill",),
    "P08": ("kinetics",),
    "P32": ("sale",),
    "P00": "a feature-gating module (Gaussian density gate along an axis of feature maps or sequences), not "
           "attention over q, k, v: jattn.methods.vision.MultiHeadDensityGate",
    "P01": "a feature-gating module (Gaussian mixture gate), not attention over q, k, v: "
           "jattn.methods.vision.MultiHeadDensityGate(mode='mixture')",
    "P06": "a CNN feature-map module ([B, H, W, C]), not attention over q, k, v: jattn.methods.vision.ULSAM",
    "P12": "a CNN feature-map module ([B, H, W, C]), not attention over q, k, v: jattn.methods.vision.ELA",
    "P42": "a CNN feature-map module ([B, H, W, C]), not attention over q, k, v: "
           "jattn.methods.vision.PolarizedSelfAttention",
    "P41": "a DETR encoder layer over multi-scale feature tokens (foreground top-k + deformable attention), not "
           "attention over one sequence's q, k, v: jattn.methods.dynamic.FocusEncoderLayer",
    "P28": ("entropy_scaled",),
    "P27": ("act",),
    "P31": "replaces the layer (its own conv and relative-position parameters): jattn.methods.modifiers.rcmha.RCMHA "
           "drops into a TransformerBlock (rcmha_lm builds a DecoderLM of them)",
    "P21": "a learnable temperature layer (jattn.methods.objectives.entropy_guided.EntropyGuidedAttention, "
           "use_entropy_guided swaps it into a DecoderLM) trained with a regulariser on the maps",
    "P25": "a finetuning objective (activation-density loss) with LoRA on a model's MLPs "
           "(jattn.methods.objectives.deft.apply_deft), not attention over q, k, v",
    "P54": "an anomaly-detection objective on a patch transformer (I2Correlation layers, "
           "jattn.methods.objectives.fod), not a drop-in attention over q, k, v",
    "P46": "a data-inflation rule for contrastive learning, no attention",
    "P51": "CNN feature-map modules ([B, *spatial, C]), not attention over one sequence's q, k, v: "
           "jattn.methods.vision.DualAttentionBottleneck, AttentionGate",
    "P69": "a pooling-pyramid context module with no attention: jattn.methods.vision.DAPPM",
    "P35": "a detection loss and matching rule (jattn.methods.objectives.deim) on a DETR, not attention over "
           "q, k, v",
    "P07": "a guidance rule over a diffusion model's attention maps (soft_pag as a prob_mod, perturbed_attention "
           "over q, k, v), applied per call, not a layer to train",
    "P59": "a training objective on MIL attention pooling over a bag of instance features (ABMIL's gated "
           "attention, jattn.methods.objectives.abmil), not attention over q, k, v",
    "P40": "a MIL pooling model (multi-branch gated attention + instance masking, "
           "jattn.methods.objectives.acmil.ACMIL), not attention over q, k, v",
    "P16": "a head ablation for scoring data (uniform_head_ablation over q, k, v), not a layer to train with",
    "P02": "replaces the attention layer (routers and head gates): jattn.methods.routing.MoHAttention, or "
           "use_moh(model) to swap it into DecoderLM / ViT / BertEncoder blocks keeping their projections",
    "P55": "reference cascades and a cost model of exact softmax attention: the layer it describes is "
           "method='softmax' (the flash kernels are the 1-pass cascade)",
    "P33": ("anchor",),
    "P13": "a layer-level important-token set for LVLM prefill whose other tokens' outputs are dropped: call "
           "jattn.methods.dynamic.zipvl_attention where that reading fits",
    "P37": "stateful across denoising steps (AdaSpaState: LSE cache, mask, step): call "
           "jattn.methods.dynamic.adaspa_attention in the sampling loop",
    "P05": "video DiT attention over a (t, h, w) token grid whose partition cycles with the layer index: call "
           "jattn.methods.dynamic.vmoba_attention per layer (the layer adapter needs the layer index, not wired)",
    "P19": "MLA replaces the layer's projections and cache (jattn.methods.kv.x_ecomla.MLAAttention drops into a "
           "TransformerBlock), not a method over q, k, v",
    "P24": "a KV-cache compression (what is cached, not how attention is computed): decode attention over its "
           "dequantised view is exact softmax (jattn.methods.kv.zipcache.ZipCache, quantized.QuantizedKVCache)",
    "P45": "a per-kv-head choice of full or streaming attention with its own cache (duo_attention, DuoKVCache): "
           "in a model it is the decoding cache kind 'duo' (Attention.init_cache(kind='duo', is_retrieval=...))",
    "P49": "a per-head KV-cache compression for decoding (TaskKVCache); the prompt runs exact causal attention "
           "(method='softmax')",
    "P44": "a decode-time token selection over a cache of un-rotated keys with RoPE inside attention, not a "
           "per-layer q, k, v method (jattn.methods.kv.tokenselect.tokenselect_decode)",
    "P71": "a cross-layer decode schedule (one layer's top-k reused by later layers), not a per-layer q, k, v "
           "method (jattn.methods.kv.tidaldecode.tidal_lm_decode_step drives a DecoderLM)",
    "P18": "LKA is a convolutional gate on images, not attention over q, k, v (jattn.methods.linear.LKA)",
    "P20": ("linfusion",),
    "P29": ("agent",),
    "P50": ("sigmoid",),
    "P57": "a framework (DSF) that writes attention and SSMs as one matrix, not a layer of its own",
    "P58": ("lightning",),
    "P62": "a training study of one-layer softmax attention (jattn.nn.icl.OneLayerMHSoftmax; method='softmax')",
    "P73": "NiNformer mixes tokens with an MLP gating unit, not q, k, v attention (jattn.methods.linear.ninformer)",
    "P74": ("lightning",),
    "P48": ("neighborhood",),
    "P60": ("neighborhood",),
    "P04": ("radial",),
    "P11": ("moa",),
    "P15": ("s2",),
    "P43": ("naavit",),
    "P52": ("davit_window",),
    "P61": ("biformer",),
    "P63": ("clear",),
    "P64": "needs a BlockMask calibrated on attention maps and per-head orders (paro.calibrate_block_mask, "
           "paro.paro_attention), which a literal config cannot give",
    "P70": ("sinklora_s2", "sinklora_sf"),
    "P10": "a multi-level CNN feature neck ([B, H, W, C] per level), not attention over one sequence's q, k, v: "
           "jattn.methods.vision.SelectiveDenseAttentionNeck",
    "P47": "a convolution layer (jattn.methods.vision.FDConv), not attention",
    "P17": "a distillation objective on a detector's encoder features (jattn.methods.objectives.acam_kd), not "
           "attention over q, k, v",
    "P26": "a KV-cache memory manager under exact softmax decode: the layer it gives is method='softmax'",
    "P56": "a density-map counting head (jattn.methods.vision.hmode.HMoDEHead), not attention over q, k, v",
    "P23": "a training scheme around a ViT's self-attention (GLCA and PWCA share its weights; "
           "jattn.methods.vision.dcal.DCAL), not a new attention over q, k, v",
    "P36": "replaces the attention layer by a soft mixture of attention experts "
           "(jattn.methods.routing.bam.SoftMoA, ParallelMoEBlock)",
    "P53": "an MoE router that mixes gate probabilities along an attention map "
           "(jattn.methods.routing.graph_moe.AttentionAwareMoE), not attention over q, k, v",
    "P66": "reads a VLM's stored attention maps into a localisation map, applied per call",
    "P30": "an ensemble of frozen diffusion models mixed per token between blocks "
           "(jattn.methods.generative.afa.AFAEnsemble), not attention over q, k, v",
    "P68": "window attention with pooled global keys over a 2-D token grid: call "
           "jattn.methods.sparse.global_regional_attention (needs the grid shape, not a literal config)",
    "P39": "a score_mod applied at inference to a VLM decoder's text rows (paint_score_mod), not a layer to train",
    "P67": "token merging in a vision encoder and unmerging in the decoder (dymu), applied at inference",
    "P34": "an attention hook for a diffusion model's denoising steps (AASSchedule.attn_fns) plus a guidance "
           "rule, applied per call",
    "P72": "attention and feature modifiers for image editing with a diffusion model, applied per call",
    "P14": "a prob_mod applied at inference to a VLM's decoder layers (var_prob_mod), not a layer to train",
}


def _build():
    papers = []
    for pid, name, title, family in _BASE:
        entry_points, tests, status, note = _PROGRESS.get(pid, ((), (), "planned", ""))
        layer = _LAYER.get(pid, ())
        layer_methods, not_a_layer = (tuple(layer), "") if isinstance(layer, tuple) else ((), layer)
        papers.append(Paper(pid, name, title, family, tuple(entry_points), tuple(tests), status, note,
                            layer_methods, not_a_layer))
    return tuple(papers)


PAPERS: tuple[Paper, ...] = _build()
STATUSES = ("planned", "partial", "works")


def resolve(dotted: str):
    """Imports a dotted name such as ``jattn.methods.linear.lka.lka``."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for attr in parts[split:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def format_table(papers=PAPERS) -> str:
    """One row per paper; ``Attention(method=)`` is the name(s) ``jattn.nn.Attention`` runs it under
    (``-`` for a built paper that is not an attention layer)."""
    header = f"{'id':4}  {'name':18}  {'family':18}  {'status':8}  {'Attention(method=)':26}  note"
    lines = [header, "-" * len(header)]
    for p in papers:
        method = ", ".join(p.layer_methods) or ("-" if p.status != "planned" else "")
        lines.append(f"{p.id:4}  {p.name[:18]:18}  {p.family:18}  {p.status:8}  {method:26}  {p.note}")
    counts = {s: sum(p.status == s for p in papers) for s in STATUSES}
    lines.append(f"{len(papers)} papers: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)
