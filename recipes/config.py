"""The one recipe schema.

A ``conf/recipe/*.yaml`` preset sets values of this dataclass; fields a recipe
does not use keep their neutral defaults.

Field groups: the engine (``name``, ``backend``, ``precision``, fp16 loss
scaling); the recipe kind (``quantizer``, the registry key, and ``module`` for
kinds defined outside lowbit); which GEMM operand goes to which format (the
``*_format`` roles); how blocks and scales are formed (``block_size``,
``rounding``, ``scale_rule``, the FP8 scaling fields); which layers convert
(``skip_modules``, ``keep_*_blocks``, ``quantize_attention``) and the per-layer role formats
(``layer_formats``); and ``compile``.
The numerics of each quantizer are stated in ``recipes.quantized``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

PRECISIONS = ("fp32", "bf16", "fp16")
BACKENDS = ("auto", "native", "emulated", "te", "torch")
#: tensor-core rate classes a recipe's GEMMs run at (``Recipe.gemm_family``); the device peak
#: tables of ``train.telemetry.perf`` are keyed by these (fp32: no tensor-core peak)
GEMM_FAMILIES = ("fp32", "bf16", "fp16", "fp8", "fp6", "fp4", "int8")
#: element format (``recipe.*_format``) -> the tensor-core rate class it runs at
ELEMENT_GEMM_FAMILY = {"fp8_e4m3": "fp8", "fp8_e5m2": "fp8", "fp6_e3m2": "fp6", "fp6_e2m3": "fp6",
                       "fp4_e2m1": "fp4", "int8": "int8"}  # fmt: skip
#: value of ``weight_dgrad_format`` / ``input_wgrad_format`` / ``grad_output_{dgrad,wgrad}_format``
#: / ``grad_rounding`` meaning "as the forward role" (``weight_format`` / ``input_format`` /
#: ``grad_output_format`` / ``rounding``)
SAME = "same"
#: the fields naming a GEMM operand's format (``null``: that operand stays in high precision);
#: ``grad_output_format`` is the default of dY's two copies, the last two fields
ROLE_FORMAT_FIELDS = ("input_format", "weight_format", "grad_output_format", "weight_dgrad_format",
                      "input_wgrad_format", "grad_output_dgrad_format", "grad_output_wgrad_format")  # fmt: skip
#: the six operands of a converted Linear's three GEMMs (forward, dgrad, wgrad), as role fields
OPERAND_FIELDS = {"fwd": ("input_format", "weight_format"),
                  "dgrad": ("grad_output_dgrad_format", "weight_dgrad_format"),
                  "wgrad": ("grad_output_wgrad_format", "input_wgrad_format")}  # fmt: skip


@dataclass
class RecipeConfig:
    name: str = "bf16"
    """A label: the preset's name, printed and recorded with the run. No code looks it up or
    branches on it; the recipe class is chosen by ``quantizer``."""
    backend: str = "auto"
    """auto | native | emulated | te | torch. ``auto`` resolves to the fastest
    backend the hardware has; the resolved value is printed and recorded."""
    precision: str = "bf16"
    """DeepSpeed engine precision: parameters, activations and gradients.
    Master weights and optimizer state are FP32 for bf16/fp16."""
    # fp16 dynamic loss scaling (DeepSpeed's ``fp16`` section); ignored otherwise.
    loss_scale: float = 0.0
    """0 selects dynamic loss scaling; a positive value is a static scale."""
    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    min_loss_scale: float = 1.0

    # ---- the recipe kind, and the quantized GEMM operands ("none" = nothing quantized)
    quantizer: str = "none"
    """The recipe kind, the registry key (``recipes.base.get_recipe``): how a quantized operand
    gets its scales. Built in: none (plain precision, ``recipes.plain``) | mx | nvfp4 |
    fp8_delayed | fp8_current | fp8_rowwise | fp8_block (``recipes.quantized``). The registry
    is the authority (``recipes.base.known_kinds()``): a plug-in may add kinds."""
    module: Optional[str] = None
    """A module to import before the kind is looked up; it calls ``register_recipe`` (a recipe
    kind defined outside lowbit). Kinds can also come from the ``lowbit.recipes`` entry points."""
    input_format: Optional[str] = None
    """Forward activation x (blocks along K). Element format name (fp8_e4m3,
    fp8_e5m2, fp6_e3m2, fp6_e2m3, fp4_e2m1, int8); null = high precision."""
    weight_format: Optional[str] = None
    """Forward weight W (blocks along K); null = high precision."""
    grad_output_format: Optional[str] = None
    """Output gradient dY in both backward GEMMs (dgrad: along N, wgrad: along tokens), unless
    one of its two copies below says otherwise."""
    grad_output_dgrad_format: Optional[str] = SAME
    """dY's copy in the input-gradient GEMM ``dY W``; ``same`` = grad_output_format."""
    grad_output_wgrad_format: Optional[str] = SAME
    """dY's copy in the weight-gradient GEMM ``dY^T x``; ``same`` = grad_output_format. With
    the dgrad copy it lets one backward GEMM be quantized without the other (``train.attribute``)."""
    weight_dgrad_format: Optional[str] = SAME
    """W's copy in the input-gradient GEMM (blocks along N); ``same`` = weight_format."""
    input_wgrad_format: Optional[str] = SAME
    """x's copy in the weight-gradient GEMM (blocks along tokens); ``same`` = input_format."""
    block_size: int = 0
    """Elements per scale block (MX 32, NVFP4 16, FP8 block 128); 0 = no blocks."""
    rounding: str = "nearest_even"
    """Element rounding of x and W: nearest_even | nearest_away | toward_zero | stochastic."""
    grad_rounding: str = SAME
    """Element rounding of dY; ``same`` = rounding (NVFP4 uses stochastic)."""
    scale_rule: str = "floor"
    """MX E8M0 scale rule: floor (OCP) | ceil | rceil (NVIDIA round-up) | even."""
    weight_2d_blocks: bool = False
    """Square weight tiles (block_size x block_size) shared by the forward and
    dgrad copies: NVFP4 16x16, FP8 block 128x128. Not for MX."""
    wgrad_hadamard: bool = False
    """NVFP4: random 16x16 Hadamard transform of both wgrad operands along tokens."""
    nvfp4_scale_order: str = "te"
    """NVFP4's FP32 scale arithmetic: te (Transformer Engine's order) | torchao (torchao's
    ``nvfp4_quantize``); they differ by an ulp in the element factor (``recipes.mx.nvfp4``)."""
    # ---- FP8 scaling (quantizer fp8_*), TE's names
    fp8_format: str = "HYBRID"
    """E4M3 for all roles, or HYBRID (E4M3 forward, E5M2 for dY)."""
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"
    """max over the history window | most_recent."""
    margin: int = 0
    """Delayed scaling: scale = (fp8_max / amax) / 2^margin."""
    power_2_scales: bool = False
    """Round FP8 scales down to powers of two (TE block scaling default)."""
    amax_epsilon: float = 0.0
    """Floor applied to amax before the scale division."""
    # ---- which layers convert
    skip_modules: list[str] = field(default_factory=lambda: ["lm_head"])
    """Regexes of Linear layers kept in high precision, matched on whole dotted name components
    (``blocks.1`` keeps ``blocks.1.mlp.fc``, not ``blocks.11.mlp.fc``; ``recipes.filter``)."""
    keep_first_blocks: int = 0
    """Keep the Linear layers of the first N transformer blocks in high precision."""
    keep_last_blocks: int = 0
    """Keep the Linear layers of the last N transformer blocks in high precision."""
    quantize_attention: bool = False
    """Also quantize the attention matmuls QK^T and PV (input/grad formats)."""
    layer_formats: dict[str, dict[str, Optional[str]]] = field(default_factory=dict)
    """Per-layer role formats: module-name regex -> {role field: format} overrides for the converted
    Linear layers it matches, e.g. ``{'^blocks\\.1\\.mlp\\.fc$': {input_wgrad_format: fp4_e2m1}}``.
    Keys match as ``skip_modules`` does (``recipes.filter.compile_patterns``); the first key (in
    order) that matches a layer applies, a layer no key matches takes the fields above. Values:
    role fields of ``ROLE_FORMAT_FIELDS`` only, each a format of this quantizer kind, null (high
    precision) or ``same``; they replace those fields for that layer before ``same`` resolves.
    Block size, rounding, scales and the kind stay the recipe's. It converts no layer the filter
    keeps and leaves the attention cores alone; a key applying to no converted layer is an error.
    Emulated backend only."""
    compile: str = "auto"
    """torch.compile the quantizers: auto (on for CUDA only) | true | false. Same bits."""
    emulated_gemm: str = "auto"
    """Emulated backend's GEMMs under a BF16 engine (``recipes.qlinear``): bf16 (a GEMM whose
    operands are exact in BF16, MX or FP8 with power-of-two scales, runs in BF16 with FP32
    accumulation: same values, another accumulation order) | codes (bf16, and per-tensor FP8 and
    NVFP4 GEMMs on their codes in BF16, the FP32 scales applied to the output: on a device without
    an FP32-output BF16 GEMM, such as the CPU, one more output rounding, <= 1 BF16 ulp) | fp32
    (every GEMM on FP32 values) | auto (codes unless the quantizers are compiled, then fp32)."""
    # ---- hardware backends (recipe.backend=torch | te)
    amax_update: str = "step"
    """Delayed scaling: when the amax histories roll and the scales update. ``step``: once per
    optimizer step, micro-batches max-combine into one slot (lowbit's default); ``microbatch``:
    after every micro-batch's backward, as TE does at each autocast exit."""
    fast_accum_forward: bool = True
    """backend=torch: ``use_fast_accum`` of the forward GEMM's scaled matmul (Hopper's reduced-
    precision FP8 accumulation; torchao's default: on for the output GEMM)."""
    fast_accum_dgrad: bool = False
    """backend=torch: ``use_fast_accum`` of the dgrad GEMM (torchao: off)."""
    fast_accum_wgrad: bool = False
    """backend=torch: ``use_fast_accum`` of the wgrad GEMM (torchao: off)."""
    te_fuse_layernorm: bool = False
    """backend=te: fuse each block's pre-norm into the Linear it feeds (TE ``LayerNormLinear`` for
    norm1 -> attn.qkv, ``LayerNormMLP`` for norm2 -> mlp) where both layers convert."""
    te_allow_offload: bool = False
    """backend=te: allow ZeRO CPU offload with TE modules (unverified upstream; refused unless set)."""


def resolve_same(cfg: RecipeConfig) -> RecipeConfig:
    """``cfg`` with every ``same`` resolved: the dgrad / wgrad copies' formats to the forward
    role's (dY's two copies to ``grad_output_format``), ``grad_rounding`` to ``rounding``. The one place the sentinel is read."""
    g = cfg.grad_output_format
    return dataclasses.replace(
        cfg,
        weight_dgrad_format=cfg.weight_format if cfg.weight_dgrad_format == SAME else cfg.weight_dgrad_format,
        input_wgrad_format=cfg.input_format if cfg.input_wgrad_format == SAME else cfg.input_wgrad_format,
        grad_output_dgrad_format=g if cfg.grad_output_dgrad_format == SAME else cfg.grad_output_dgrad_format,
        grad_output_wgrad_format=g if cfg.grad_output_wgrad_format == SAME else cfg.grad_output_wgrad_format,
        grad_rounding=cfg.rounding if cfg.grad_rounding == SAME else cfg.grad_rounding,
    )
