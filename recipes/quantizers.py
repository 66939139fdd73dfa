"""Role quantizers: one small callable per GEMM operand, ``q(x32, axis=...) -> x32``.

Numerics
--------
Each quantizer takes a float32 tensor and the axis its blocks run along (the
GEMM's reduction dim for that operand) and returns ``dequantize(quantize(x))``
in float32, by calling the pure functions of ``recipes.mx`` / ``recipes.fp8``:

=================  ==========================================================  ===========
class              scale granularity and rule                                   axis-free
=================  ==========================================================  ===========
``MXRole``         ``block_size`` elements along ``axis``, E8M0 scale by         no
                   ``scale_rule``; ``rounding``; saturating; NaN/Inf block ->
                   NaN block (``recipes.mx.quantize``)
``NVFP4Role``      16 along ``axis`` (or 16x16 weight tiles), E4M3 block scale    2-D only
                   + FP32 tensor scale, TE's or torchao's order (``recipes.mx.nvfp4``)
``FP8CurrentRole`` one FP32 scale per tensor from its own amax (TE                yes
                   ``Float8CurrentScaling``)
``FP8DelayedRole`` one FP32 scale per tensor from the amax history of earlier    yes
                   optimizer steps (TE ``DelayedScaling``; shared
                   ``DelayedScalingState``, tensor names ``"<layer>/<role>"``)
``FP8RowwiseRole`` one scale per slice along ``axis`` (torchao ``rowwise``)      no
``FP8BlockRole``   1 x ``block_size`` along ``axis``, or ``block_size`` squared    2-D only
                   weight tiles (TE ``Float8BlockScaling``)
=================  ==========================================================  ===========

Per-tensor and rowwise FP8 roles also ``cast(x32, axis=...) -> Operand``: the float8 codes and
FP32 ``1/scale`` a scaled matmul takes (``recipes.scaled_linear``), from the same scale functions.
Per-tensor FP8 and NVFP4 roles also ``gemm_codes(x32, axis=...) -> Codes``: values exact in BF16
(the FP8 codes; NVFP4 elements times their E4M3 block scales) and the 0-d FP32 scale the GEMM
applies to its output (``1/scale``; NVFP4's ``s_t``), for the emulated backend's code GEMMs
(``recipes.qlinear``). Same elements, same scales and the same amax recording as ``__call__``.

"axis-free" quantizers give the same result whatever ``axis`` is, so a caller may quantize once
and use the result in two GEMMs. Stochastic rounding draws from an :class:`SRGenerator` owned by
the recipe (seeded, per device), so runs are reproducible. The pure parts run under
``torch.compile`` with ``compile=True`` (``recipes.compiling``; same bits).

``recipes.kinds.QUANTIZER_KINDS`` maps each ``recipe.quantizer`` kind of the quantized recipe to
the factory of its role class here and the facts its checks need. A new quantizer kind is a role
class here plus one entry in that table: the recipe registers every kind of the table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from recipes.compiling import call as call_quantizer
from recipes.fp8 import (
    DelayedScalingState,
    FP8Format,
    cast_to_fp8,
    cast_to_fp8_rowwise,
    current_scale,
    quantize_fp8,
    quantize_fp8_block_1d,
    quantize_fp8_block_2d,
    quantize_fp8_current,
    quantize_fp8_rowwise,
)
from recipes.fp8 import amax as fp8_amax
from recipes.fp8.gemm import Operand
from recipes.mx import quantize_mx, quantize_nvfp4
from recipes.mx.nvfp4 import nvfp4_codes, nvfp4_codes_2d, quantize_nvfp4_2d
from recipes.srgen import SR_SEED, SRGenerator

__all__ = ["Codes", "FP8BlockRole", "FP8CurrentRole", "FP8DelayedRole", "FP8RowwiseRole", "MXRole", "NVFP4Role",
           "RoleQuantizer", "SR_SEED", "SRGenerator"]  # fmt: skip


@dataclass(frozen=True)
class Codes:
    """A GEMM operand as ``values`` exact in BF16 (stored BF16) times ``scale`` (FP32, 0-d): the
    GEMM runs on ``values`` and multiplies its FP32 accumulator by the product of the scales."""

    values: torch.Tensor
    scale: torch.Tensor

    def t(self) -> Codes:
        return Codes(self.values.t(), self.scale)


def _codes(values: torch.Tensor, scale: torch.Tensor) -> Codes:
    return Codes(values.to(torch.bfloat16), scale.float())


class RoleQuantizer:
    """Base: ``__call__(x32, axis=, training=)`` -> float32 of x32's shape."""

    #: same result for every ``axis`` (per-tensor scale or 2-D tiles)
    axis_free: bool = False
    #: a pure function of its input (no state, no random numbers): may be traced into a
    #: larger compiled graph (``LinearQuantizers.compile``)
    pure: bool = True

    def __call__(self, x: torch.Tensor, *, axis: int, training: bool = True) -> torch.Tensor:
        raise NotImplementedError

    def for_gemm(self, x: torch.Tensor, *, axis: int, training: bool = True) -> torch.Tensor:
        """``self(x)``, in BF16 where its values are exact there (a role that can prove it
        overrides this), else float32: what ``recipes.qlinear``'s BF16 GEMMs take."""
        return self(x, axis=axis, training=training)

    def gemm_codes(self, x: torch.Tensor, *, axis: int, training: bool = True) -> Codes | None:
        """The operand as :class:`Codes` (values exact in BF16, a per-tensor FP32 scale for the
        GEMM output), or None: this role's values are not a per-tensor scaling of such codes.
        Per-tensor FP8 (castable and axis-free): its float8 codes and ``1/scale``."""
        if not (self.castable and self.axis_free):
            return None
        op = self.cast(x, axis=axis, training=training)
        return _codes(op.q, op.scale_inv)

    #: has :meth:`cast` (real float8 codes for a scaled matmul)
    castable: bool = False

    def cast(self, x: torch.Tensor, *, axis: int, training: bool = True) -> Operand:
        """Float8 codes and the FP32 dequantization scale (0-d, or size 1 along ``axis``)."""
        raise NotImplementedError(f"{type(self).__name__} has no real-FP8 cast")

    def describe(self) -> str:
        raise NotImplementedError


@dataclass(eq=False)
class MXRole(RoleQuantizer):
    fmt: str
    block_size: int = 32
    rounding: str = "nearest_even"
    scale_rule: str = "floor"
    compile: bool = False
    sr: SRGenerator | None = None

    def __post_init__(self) -> None:
        self.pure = self.rounding != "stochastic"

    def _kw(self, x: torch.Tensor) -> dict:
        gen = self.sr.get(x.device) if self.rounding == "stochastic" and self.sr is not None else None
        return dict(block_size=self.block_size, rounding=self.rounding, scale_rule=self.scale_rule,
                    generator=gen, compile=self.compile)  # fmt: skip

    def __call__(self, x: torch.Tensor, *, axis: int, training: bool = True) -> torch.Tensor:
        return quantize_mx(x, self.fmt, axis=axis, **self._kw(x))

    def for_gemm(self, x: torch.Tensor, *, axis: int, training: bool = True) -> torch.Tensor:
        return quantize_mx(x, self.fmt, axis=axis, for_gemm=True, **self._kw(x))  # BF16 when exact

    def describe(self) -> str:
        return f"mx {self.fmt} 1x{self.block_size} scale={self.scale_rule} {self.rounding}"


@dataclass(eq=False)
class NVFP4Role(RoleQuantizer):
    rounding: str = "nearest_even"
    two_d: bool = False
    sr: SRGenerator | None = None
    compile: bool = False
    order: str = "te"

    def __post_init__(self) -> None:
        self.axis_free = self.two_d
        self.pure = self.rounding != "stochastic"

    def __call__(self, x: torch.Tensor, *, axis: int, training: bool = True) -> torch.Tensor:
        return self._apply(quantize_nvfp4, quantize_nvfp4_2d, x, axis)

    def gemm_codes(self, x: torch.Tensor, *, axis: int, training: bool = True) -> Codes:
        return _codes(*self._apply(nvfp4_codes, nvfp4_codes_2d, x, axis))

    def _apply(self, one_d: Callable[..., Any], two_d: Callable[..., Any], x: torch.Tensor, axis: int) -> Any:
        """``one_d`` (1x16 blocks along ``axis``) or ``two_d`` (16x16 tiles) with this role's
        rounding and order; compiled where pure, the stochastic-rounding generator eager."""
        kw = dict(rounding=self.rounding, order=self.order)
        if self.two_d:
            return call_quantizer(two_d, self.compile, x, **kw)
        if self.rounding == "stochastic":  # the noise generator stays eager
            gen = self.sr.get(x.device) if self.sr is not None else None
            return one_d(x, axis=axis, generator=gen, **kw)
        return call_quantizer(one_d, self.compile, x, axis=axis, **kw)

    def describe(self) -> str:
        tiles = "16x16" if self.two_d else "1x16"
        return f"nvfp4 fp4_e2m1 {tiles} e4m3 scales + fp32 tensor scale ({self.order} order), {self.rounding}"


@dataclass(eq=False)
class FP8CurrentRole(RoleQuantizer):
    fmt: FP8Format
    power_2_scales: bool = False
    amax_epsilon: float = 0.0
    compile: bool = False
    axis_free: bool = True

    def __call__(self, x: torch.Tensor, *, axis: int, training: bool = True) -> torch.Tensor:
        return call_quantizer(
            quantize_fp8_current, self.compile, x, self.fmt,
            power_2_scale=self.power_2_scales, amax_epsilon=self.amax_epsilon,
        )  # fmt: skip

    castable = True

    def cast(self, x: torch.Tensor, *, axis: int, training: bool = True) -> Operand:
        return Operand(*call_quantizer(_cast_current, self.compile, x, self.fmt, self.power_2_scales,
                                       self.amax_epsilon))  # fmt: skip

    def describe(self) -> str:
        return f"fp8 {self.fmt.name} per-tensor current scale" + (" pow2" if self.power_2_scales else "")


def _cast_current(x: torch.Tensor, fmt: FP8Format, power_2: bool, eps: float) -> tuple[torch.Tensor, ...]:
    """``cast_to_fp8`` with the scale ``quantize_fp8_current`` uses."""
    return cast_to_fp8(x, fmt, current_scale(x, fmt, power_2_scale=power_2, amax_epsilon=eps))


@dataclass(eq=False)
class FP8DelayedRole(RoleQuantizer):
    """Delayed scaling of tensor ``name`` (``"<layer>/<role>"``); only training calls record amaxes."""

    state: DelayedScalingState
    name: str
    compile: bool = False
    axis_free: bool = True
    pure = False  # records amaxes into the shared state

    def __call__(self, x: torch.Tensor, *, axis: int, training: bool = True) -> torch.Tensor:
        """``DelayedScalingState.quantize`` (record amax, quantize with this step's scale), split so
        the two pure parts can be compiled; evaluation (``training=False``) records nothing."""
        st = self.state
        if st.device != x.device:
            st.to(x.device)
        if training:
            st.record_amax(self.name, call_quantizer(fp8_amax, self.compile, x))
        return call_quantizer(quantize_fp8, self.compile, x, st.format(self.name), st.scale(self.name))

    castable = True

    def cast(self, x: torch.Tensor, *, axis: int, training: bool = True) -> Operand:
        """As :meth:`__call__`, returning the codes and ``1/scale``."""
        st = self.state
        if st.device != x.device:
            st.to(x.device)
        if training:
            st.record_amax(self.name, call_quantizer(fp8_amax, self.compile, x))
        return Operand(
            *call_quantizer(cast_to_fp8, self.compile, x, st.format(self.name), st.scale(self.name))
        )

    def describe(self) -> str:
        r = self.state.recipe
        return (
            f"fp8 {self.state.format(self.name).name} per-tensor delayed scale "
            f"(history {r.amax_history_len}, {r.amax_compute_algo}, margin {r.margin})"
        )


@dataclass(eq=False)
class FP8RowwiseRole(RoleQuantizer):
    fmt: FP8Format
    power_2_scales: bool = True
    amax_epsilon: float = 1e-12
    compile: bool = False

    def __call__(
        self, x: torch.Tensor, *, axis: int, training: bool = True, for_gemm: bool = False
    ) -> torch.Tensor:
        return call_quantizer(
            quantize_fp8_rowwise, self.compile, x, self.fmt, axis=axis, power_2_scales=self.power_2_scales,
            amax_epsilon=self.amax_epsilon, for_gemm=for_gemm,
        )  # fmt: skip

    def for_gemm(self, x: torch.Tensor, *, axis: int, training: bool = True) -> torch.Tensor:
        return self(x, axis=axis, for_gemm=True)  # BF16 when exact (power-of-two scales)

    castable = True

    def cast(self, x: torch.Tensor, *, axis: int, training: bool = True) -> Operand:
        return Operand(*call_quantizer(
            cast_to_fp8_rowwise, self.compile, x, self.fmt,
            axis=axis, power_2_scales=self.power_2_scales, amax_epsilon=self.amax_epsilon,
        ))  # fmt: skip

    def describe(self) -> str:
        return f"fp8 {self.fmt.name} one scale per row along the reduction dim" + (
            " pow2" if self.power_2_scales else ""
        )


@dataclass(eq=False)
class FP8BlockRole(RoleQuantizer):
    fmt: FP8Format
    block_size: int = 128
    two_d: bool = False
    power_2_scales: bool = True
    amax_epsilon: float = 0.0
    compile: bool = False
    axis_free: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.axis_free = self.two_d

    def __call__(
        self, x: torch.Tensor, *, axis: int, training: bool = True, for_gemm: bool = False
    ) -> torch.Tensor:
        kw = dict(block_size=self.block_size, power_2_scales=self.power_2_scales, amax_epsilon=self.amax_epsilon,
                  for_gemm=for_gemm)  # fmt: skip
        if self.two_d:
            return call_quantizer(quantize_fp8_block_2d, self.compile, x, self.fmt, **kw)
        return call_quantizer(quantize_fp8_block_1d, self.compile, x, self.fmt, axis=axis, **kw)

    def for_gemm(self, x: torch.Tensor, *, axis: int, training: bool = True) -> torch.Tensor:
        return self(x, axis=axis, for_gemm=True)  # BF16 when exact (power-of-two scales)

    def describe(self) -> str:
        b = self.block_size
        tiles = f"{b}x{b}" if self.two_d else f"1x{b}"
        return (
            f"fp8 {self.fmt.name} {tiles} blocks" + (" pow2" if self.power_2_scales else " fp32") + " scales"
        )
