"""The ``recipe.quantizer`` kinds of the quantized recipe: each kind's role factory and its rules.

:data:`QUANTIZER_KINDS` maps each kind to the factory of its role class (``recipes.quantizers``)
and the facts its checks need (``recipes.quantized_checks``). A new quantizer kind is a role
class there plus one entry here: the recipe (``recipes.quantized``) registers every kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from recipes.config import RecipeConfig
from recipes.fp8 import DelayedScalingState, FP8Format, format_for_role
from recipes.quantizers import (
    FP8BlockRole,
    FP8CurrentRole,
    FP8DelayedRole,
    FP8RowwiseRole,
    MXRole,
    NVFP4Role,
    RoleQuantizer,
    SRGenerator,
)

__all__ = ["QUANTIZER_KINDS", "QuantizerKind", "RoleRequest"]


@dataclass(frozen=True)
class RoleRequest:
    """What the recipe asks of one operand's quantizer (the input of a kind's factory)."""

    cfg: RecipeConfig
    """The recipe settings with every ``same`` resolved (``recipes.config.resolve_same``)."""
    fmt: str
    """The operand's element format (its ``recipe.*_format``; never null here)."""
    tensor: str
    """``"<layer>/<role>"``, role ``input`` | ``weight`` | ``grad_output``: the delayed-scaling
    key, and the TE tensor role that picks the FP8 element under ``fp8_format``."""
    grad: bool = False
    """dY: rounds by ``grad_rounding`` instead of ``rounding``."""
    two_d: bool = False
    """A weight operand under ``weight_2d_blocks`` (square tiles)."""
    compile: bool = False
    sr: SRGenerator | None = None
    delayed: DelayedScalingState | None = None

    @property
    def rounding(self) -> str:
        return self.cfg.grad_rounding if self.grad else self.cfg.rounding

    @property
    def fp8(self) -> FP8Format:
        return format_for_role(self.cfg.fp8_format, self.tensor.rsplit("/", 1)[1])


@dataclass(frozen=True)
class QuantizerKind:
    """One ``recipe.quantizer`` kind of the quantized recipe: its role factory and its rules."""

    make: Callable[[RoleRequest], RoleQuantizer]
    family: str
    """Element vocabulary and statistics family (``recipes.numerics.FAMILIES``): mx | nvfp4 | fp8."""
    blocked: bool = False
    """Uses ``recipe.block_size`` blocks (which must divide the converted reduction dims)."""
    block_size: int = 0
    """The one block size the kind allows (nvfp4: 16); 0 = any power of two from 2 to 256."""
    tiles: bool = False
    """``recipe.weight_2d_blocks`` (square weight tiles) exists for it."""
    hadamard: bool = False
    """``recipe.wgrad_hadamard`` exists for it."""
    delayed: bool = False
    """Keeps a ``DelayedScalingState`` (amax histories, updated per optimizer step)."""


def _delayed_role(r: RoleRequest) -> FP8DelayedRole:
    assert r.delayed is not None, "a delayed-scaling kind's recipe owns a DelayedScalingState"
    r.delayed.register(r.tensor)
    return FP8DelayedRole(r.delayed, r.tensor, compile=r.compile)


#: ``recipe.quantizer`` -> kind (order: the order error messages list them in)
QUANTIZER_KINDS: dict[str, QuantizerKind] = {
    "mx": QuantizerKind(
        lambda r: MXRole(r.fmt, r.cfg.block_size, r.rounding, r.cfg.scale_rule, compile=r.compile, sr=r.sr),
        family="mx",
        blocked=True,
    ),
    "nvfp4": QuantizerKind(
        lambda r: NVFP4Role(
            r.rounding, two_d=r.two_d, sr=r.sr, compile=r.compile, order=r.cfg.nvfp4_scale_order
        ),
        family="nvfp4",
        blocked=True,
        block_size=16,
        tiles=True,
        hadamard=True,
    ),
    "fp8_delayed": QuantizerKind(_delayed_role, family="fp8", delayed=True),
    "fp8_current": QuantizerKind(
        lambda r: FP8CurrentRole(r.fp8, r.cfg.power_2_scales, r.cfg.amax_epsilon, compile=r.compile),
        family="fp8",
    ),
    "fp8_rowwise": QuantizerKind(
        lambda r: FP8RowwiseRole(r.fp8, r.cfg.power_2_scales, r.cfg.amax_epsilon, compile=r.compile),
        family="fp8",
    ),
    "fp8_block": QuantizerKind(
        lambda r: FP8BlockRole(
            r.fp8, r.cfg.block_size, r.two_d, r.cfg.power_2_scales, r.cfg.amax_epsilon, compile=r.compile
        ),
        family="fp8",
        blocked=True,
        tiles=True,
    ),
}
