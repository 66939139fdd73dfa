"""The one recipe schema.

Every ``conf/recipe/*.yaml`` fills this dataclass completely, so a
``+recipe=NAME`` merge over the inline BF16 default never inherits a stray
BF16 value. Fields a recipe does not use keep their neutral defaults.

Field groups: the engine (``name``, ``backend``, ``precision``, fp16 loss
scaling); which GEMM operand goes to which format (``quantizer`` and the
``*_format`` roles); how blocks and scales are formed (``block_size``,
``rounding``, ``scale_rule``, the FP8 scaling fields); which layers convert
(``skip_modules``, ``keep_*_blocks``, ``quantize_attention``); and ``compile``.
The numerics of each quantizer are stated in ``recipes.emulated``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

PRECISIONS = ("fp32", "bf16", "fp16")
BACKENDS = ("auto", "native", "emulated", "te", "torch")
#: ``recipe.quantizer`` values: how a quantized operand gets its scales
QUANTIZERS = ("none", "mx", "nvfp4", "fp8_delayed", "fp8_current", "fp8_rowwise", "fp8_block")
#: tensor-core rate classes a recipe's GEMMs run at (``Recipe.gemm_family``); the device peak
#: tables of ``train.telemetry.perf`` are keyed by these (fp32: no tensor-core peak)
GEMM_FAMILIES = ("fp32", "bf16", "fp16", "fp8", "fp6", "fp4", "int8")
#: value of ``weight_dgrad_format`` / ``input_wgrad_format`` / ``grad_rounding``
#: meaning "as the forward role" (``weight_format`` / ``input_format`` / ``rounding``)
SAME = "same"


@dataclass
class RecipeConfig:
    name: str = "bf16"
    """Registry key of the recipe (``recipes.base.RECIPES``)."""
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

    # ---- quantized GEMM operands (emulated recipes; "none" = nothing quantized)
    quantizer: str = "none"
    """none | mx | nvfp4 | fp8_delayed | fp8_current | fp8_rowwise | fp8_block."""
    input_format: Optional[str] = None
    """Forward activation x (blocks along K). Element format name (fp8_e4m3,
    fp8_e5m2, fp6_e3m2, fp6_e2m3, fp4_e2m1, int8); null = high precision."""
    weight_format: Optional[str] = None
    """Forward weight W (blocks along K); null = high precision."""
    grad_output_format: Optional[str] = None
    """Output gradient dY in both backward GEMMs (dgrad: along N, wgrad: along tokens)."""
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
    """Regexes (re.search on the module name) of Linear layers kept in high precision."""
    keep_first_blocks: int = 0
    """Keep the Linear layers of the first N transformer blocks in high precision."""
    keep_last_blocks: int = 0
    """Keep the Linear layers of the last N transformer blocks in high precision."""
    quantize_attention: bool = False
    """Also quantize the attention matmuls QK^T and PV (input/grad formats)."""
    compile: str = "auto"
    """torch.compile the quantizers: auto (on for CUDA only) | true | false. Same bits."""
