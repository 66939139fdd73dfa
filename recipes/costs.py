"""What a recipe's GEMM operands cost in bytes: the casts it adds and the scales it keeps.

``Recipe.operand_casts()`` lists one :class:`OperandCast` per quantized copy of a converted
Linear's operands (``x:[M,K]``, ``W:[N,K]``, ``dY:[M,N]``; fwd ``x W^T``, dgrad ``dY W``, wgrad
``dY^T x``); ``python -m train.perfmodel`` turns them into memory-bound passes and bytes, and
``Recipe.gemm_families()`` says which tensor-core rate each GEMM runs at. Nothing here is
numerics: the quantizers themselves are ``recipes.quantizers``.

Cost model of one copy (the same assumption as torchao's ``roofline_utils`` MX entries, "we
can't profitably fuse kernel 1 and kernel 2"): a pass reads the BF16 source and writes the
quantized elements plus their scales; a recipe whose scale needs the whole tensor's amax first
(per-tensor current scaling, NVFP4's FP32 tensor scale) reads the source once more before it.
Delayed scaling takes its scale from the amax history, so its cast records the amax on the way
(TE) and the amax is all-reduced (MAX) across data-parallel ranks once per step.

Scale layouts, per ``recipe.quantizer`` (``recipes.quantized``'s numerics table):

=============  ======================================  ===========  =========================
kind           layout                                  scale bytes  extra
=============  ======================================  ===========  =========================
mx             1 x ``block_size`` along the reduction   1 (E8M0)
nvfp4          1 x 16 (W: 16 x 16 tiles if 2-D)          1 (E4M3)     FP32 per tensor, amax pass
fp8_delayed    one per tensor                           4 (FP32)     amax all-reduced per step
fp8_current    one per tensor                           4 (FP32)     amax pass
fp8_rowwise    one per row of the reduction dim         4 (FP32)
fp8_block      1 x ``block_size`` (W: square tiles)     4 (FP32)
=============  ======================================  ===========  =========================
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from recipes.config import ELEMENT_GEMM_FAMILY, OPERAND_FIELDS, RecipeConfig, resolve_same

#: bits of one element of each element format (``recipe.*_format``)
ELEMENT_BITS = {"fp8_e4m3": 8, "fp8_e5m2": 8, "fp6_e3m2": 6, "fp6_e2m3": 6, "fp4_e2m1": 4, "int8": 8}
#: the tensor each role field quantizes
ROLE_TENSOR = {"input_format": "x", "weight_format": "W", "grad_output_dgrad_format": "dY",
               "weight_dgrad_format": "W", "grad_output_wgrad_format": "dY", "input_wgrad_format": "x"}  # fmt: skip
#: scale layouts (``OperandCast.layout``)
BLOCK, TILE, ROW, TENSOR = "block", "tile", "row", "tensor"


@dataclass(frozen=True)
class OperandCast:
    """One quantized copy of one GEMM operand of a converted Linear, made by one pass."""

    gemm: str
    """fwd | dgrad | wgrad (``recipes.config.OPERAND_FIELDS``)."""
    role: str
    """The role field, e.g. ``input_format``."""
    tensor: str
    """x | W | dY."""
    family: str
    """The element format's GEMM rate class (``recipes.config.GEMM_FAMILIES``)."""
    element_bits: int
    layout: str
    """block (along the GEMM's reduction dim) | tile (block x block) | row | tensor."""
    block: int = 0
    scale_bytes: int = 4
    tensor_scale: bool = False
    """An extra FP32 scale per tensor (NVFP4's second level)."""
    amax_pass: bool = False
    """The scale needs the tensor's amax before the cast: one more read of the BF16 source."""
    amax_allreduce: bool = False
    """Delayed scaling: the amax is all-reduced (MAX) across data-parallel ranks once per step."""

    def num_scales(self, numel: int, reduce_len: int) -> int:
        """Scales of this copy of a tensor of ``numel`` elements reduced along ``reduce_len``."""
        if self.layout == BLOCK:
            n = (numel // reduce_len) * math.ceil(reduce_len / self.block)
        elif self.layout == TILE:
            n = math.ceil(numel / (self.block * self.block))
        elif self.layout == ROW:
            n = numel // reduce_len
        else:
            n = 1
        return n + (1 if self.tensor_scale and self.layout != TENSOR else 0)

    def stored_bytes(self, numel: int, reduce_len: int) -> float:
        """Bytes of the quantized copy: elements plus scales."""
        return numel * self.element_bits / 8 + self.num_scales(numel, reduce_len) * self.scale_bytes

    def pass_bytes(self, numel: int, reduce_len: int, *, source_bytes: int = 2) -> tuple[float, float]:
        """(read, written) bytes of making this copy from a ``source_bytes``-per-element tensor."""
        reads = numel * source_bytes * (2 if self.amax_pass else 1)
        return float(reads), self.stored_bytes(numel, reduce_len)


def _layout(cfg: RecipeConfig, tensor: str) -> dict[str, object] | None:
    """The scale layout of ``tensor`` under ``cfg.quantizer`` (the module docstring's table);
    None for a kind this table does not know (a plug-in: no cast costs)."""
    tile = cfg.weight_2d_blocks and tensor == "W"
    kind = cfg.quantizer
    if kind == "mx":
        return {"layout": BLOCK, "block": cfg.block_size, "scale_bytes": 1}
    if kind == "nvfp4":
        return {"layout": TILE if tile else BLOCK, "block": 16, "scale_bytes": 1, "tensor_scale": True,
                "amax_pass": True}  # fmt: skip
    if kind == "fp8_delayed":
        return {"layout": TENSOR, "amax_allreduce": True}
    if kind == "fp8_current":
        return {"layout": TENSOR, "amax_pass": True}
    if kind == "fp8_rowwise":
        return {"layout": ROW}
    if kind == "fp8_block":
        return {"layout": TILE if tile or tensor == "W" else BLOCK, "block": cfg.block_size}
    return None


def operand_casts(cfg: RecipeConfig) -> list[OperandCast]:
    """Every quantized operand copy of a converted Linear under ``cfg`` (fwd, dgrad, wgrad order)."""
    r = resolve_same(cfg)
    out = []
    for gemm, roles in OPERAND_FIELDS.items():
        for role in roles:
            fmt = getattr(r, role)
            tensor = ROLE_TENSOR[role]
            layout = None if fmt is None else _layout(r, tensor)
            if fmt is None or layout is None:
                continue
            out.append(OperandCast(gemm=gemm, role=role, tensor=tensor, family=ELEMENT_GEMM_FAMILY[fmt],
                                   element_bits=ELEMENT_BITS[fmt], **layout))  # type: ignore[arg-type]  # fmt: skip
    return out


def gemm_families(cfg: RecipeConfig) -> dict[str, str]:
    """The rate class of each GEMM: the wider of its two operands' element formats (a mixed
    FP6 x FP4 MMA runs at the FP6 rate); the engine precision when either operand stays in high
    precision (the GEMM then runs on upcast operands)."""
    r = resolve_same(cfg)
    out = {}
    for gemm, (a, b) in OPERAND_FIELDS.items():
        fa, fb = getattr(r, a), getattr(r, b)
        if fa is None or fb is None:
            out[gemm] = cfg.precision
        else:
            out[gemm] = ELEMENT_GEMM_FAMILY[max((fa, fb), key=lambda f: ELEMENT_BITS[f])]
    return out
