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
                   + FP32 tensor scale (``recipes.mx.nvfp4``)
``FP8CurrentRole`` one FP32 scale per tensor from its own amax (TE                yes
                   ``Float8CurrentScaling``)
``FP8DelayedRole`` one FP32 scale per tensor from the amax history of earlier    yes
                   optimizer steps (TE ``DelayedScaling``; shared
                   ``DelayedScalingState``, tensor names ``"<layer>/<role>"``)
``FP8RowwiseRole`` one scale per slice along ``axis`` (torchao ``rowwise``)      no
``FP8BlockRole``   1 x ``block_size`` along ``axis``, or ``block_size`` squared    2-D only
                   weight tiles (TE ``Float8BlockScaling``)
=================  ==========================================================  ===========

"axis-free" quantizers give the same result whatever ``axis`` is, so a caller
may quantize once and use the result in two GEMMs.

Also here: :func:`quantize_nvfp4_2d` (TE's 16x16 NVFP4 weight tiles, not in
``recipes.mx``) and :func:`hadamard_tokens` (TE's random Hadamard transform of
the wgrad operands). Stochastic rounding draws from an :class:`SRGenerator`
owned by the recipe (seeded, per device), so runs are reproducible.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from recipes.fp8 import (
    DelayedScalingState,
    FP8Format,
    quantize_fp8,
    quantize_fp8_block_1d,
    quantize_fp8_block_2d,
    quantize_fp8_current,
    quantize_fp8_rowwise,
)
from recipes.fp8 import amax as fp8_amax
from recipes.mx import FORMATS, quantize_mx, quantize_nvfp4
from recipes.mx.core import round_elements
from recipes.mx.nvfp4 import nvfp4_tensor_scale

__all__ = [
    "FP8BlockRole",
    "FP8CurrentRole",
    "FP8DelayedRole",
    "FP8RowwiseRole",
    "MXRole",
    "NVFP4Role",
    "RoleQuantizer",
    "SRGenerator",
    "call_quantizer",
    "recompile_headroom",
    "hadamard_tokens",
    "quantize_nvfp4_2d",
]

_FP4 = FORMATS["fp4_e2m1"]
_E4M3_MAX = 448.0
_E4M3_MIN_NORMAL = 2.0**-6
#: seed of the stochastic-rounding generator (the DP rank is added)
SR_SEED = 0x10B17
#: seed of TE-style random Hadamard sign vectors (fixed, as TE's)
RHT_SEED = 0x5EED
HADAMARD_SIZE = 16


#: graphs kept per compiled quantizer (one per format/role/shape)
_RECOMPILE_LIMIT = 256


@functools.cache
def _compiled(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    return torch.compile(fn, dynamic=False)


def recompile_headroom() -> Any:
    """Scoped dynamo config: one graph per (format, role, shape) exceeds the default limit of 8."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    return cfg.patch(**{name: max(getattr(cfg, name), _RECOMPILE_LIMIT)})


def call_quantizer(fn: Callable[..., torch.Tensor], compile: bool, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``fn(*args, **kwargs)``, or the same pure function under ``torch.compile`` (same bits)."""
    if not compile:
        return fn(*args, **kwargs)
    with recompile_headroom():
        return _compiled(fn)(*args, **kwargs)


class SRGenerator:
    """One ``torch.Generator`` per device for stochastic rounding, seeded ``SR_SEED + rank``."""

    def __init__(self, seed: int = SR_SEED):
        self.seed = seed
        self._gens: dict[torch.device, torch.Generator] = {}

    def get(self, device: torch.device) -> torch.Generator:
        if device not in self._gens:
            import torch.distributed as dist

            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            self._gens[device] = torch.Generator(device=device).manual_seed(self.seed + rank)
        return self._gens[device]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {str(dev): g.get_state() for dev, g in self._gens.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for dev, gen_state in state.items():
            self.get(torch.device(dev)).set_state(gen_state)


class RoleQuantizer:
    """Base: ``__call__(x32, axis=, training=)`` -> float32 of x32's shape."""

    #: same result for every ``axis`` (per-tensor scale or 2-D tiles)
    axis_free: bool = False
    #: a pure function of its input (no state, no random numbers): may be traced into a
    #: larger compiled graph (``LinearQuantizers.compile``)
    pure: bool = True

    def __call__(self, x: torch.Tensor, *, axis: int, training: bool = True) -> torch.Tensor:
        raise NotImplementedError

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

    def __call__(self, x: torch.Tensor, *, axis: int, training: bool = True) -> torch.Tensor:
        gen = self.sr.get(x.device) if self.rounding == "stochastic" and self.sr is not None else None
        return quantize_mx(
            x,
            self.fmt,
            block_size=self.block_size,
            axis=axis,
            rounding=self.rounding,
            scale_rule=self.scale_rule,
            generator=gen,
            compile=self.compile,
        )

    def describe(self) -> str:
        return f"mx {self.fmt} 1x{self.block_size} scale={self.scale_rule} {self.rounding}"


@dataclass(eq=False)
class NVFP4Role(RoleQuantizer):
    rounding: str = "nearest_even"
    two_d: bool = False
    sr: SRGenerator | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        self.axis_free = self.two_d
        self.pure = self.rounding != "stochastic"

    def __call__(self, x: torch.Tensor, *, axis: int, training: bool = True) -> torch.Tensor:
        if self.two_d:
            return call_quantizer(quantize_nvfp4_2d, self.compile, x, rounding=self.rounding)
        if self.rounding == "stochastic":  # the noise generator stays eager
            gen = self.sr.get(x.device) if self.sr is not None else None
            return quantize_nvfp4(x, axis=axis, rounding=self.rounding, generator=gen)
        return call_quantizer(quantize_nvfp4, self.compile, x, axis=axis, rounding=self.rounding)

    def describe(self) -> str:
        tiles = "16x16" if self.two_d else "1x16"
        return f"nvfp4 fp4_e2m1 {tiles} e4m3 scales + fp32 tensor scale, {self.rounding}"


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

    def describe(self) -> str:
        return f"fp8 {self.fmt.name} per-tensor current scale" + (" pow2" if self.power_2_scales else "")


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

    def __call__(self, x: torch.Tensor, *, axis: int, training: bool = True) -> torch.Tensor:
        return call_quantizer(
            quantize_fp8_rowwise, self.compile, x, self.fmt,
            axis=axis, power_2_scales=self.power_2_scales, amax_epsilon=self.amax_epsilon,
        )  # fmt: skip

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

    def __call__(self, x: torch.Tensor, *, axis: int, training: bool = True) -> torch.Tensor:
        kw = dict(
            block_size=self.block_size, power_2_scales=self.power_2_scales, amax_epsilon=self.amax_epsilon
        )
        if self.two_d:
            return call_quantizer(quantize_fp8_block_2d, self.compile, x, self.fmt, **kw)
        return call_quantizer(quantize_fp8_block_1d, self.compile, x, self.fmt, axis=axis, **kw)

    def describe(self) -> str:
        b = self.block_size
        tiles = f"{b}x{b}" if self.two_d else f"1x{b}"
        return (
            f"fp8 {self.fmt.name} {tiles} blocks" + (" pow2" if self.power_2_scales else " fp32") + " scales"
        )


# ---------------------------------------------------------------------- NVFP4 2-D weight tiles


def quantize_nvfp4_2d(
    w: torch.Tensor, *, tile: int = HADAMARD_SIZE, rounding: str = "nearest_even"
) -> torch.Tensor:
    """NVFP4 with ``tile`` x ``tile`` blocks over a 2-D tensor (TE's weight quantization).

    The arithmetic of ``recipes.mx.nvfp4.quantize_nvfp4`` with the block amax
    taken over a square tile: ``s_t = amax_tensor / (6*448)``,
    ``s_b = e4m3(clamp((amax_tile / 6) / s_t, 2^-6, 448))``, elements
    ``round(x * ((1/s_t)/s_b))`` on the E2M1 grid (saturating at 6), output
    ``w * (s_t * s_b)``. The same values serve the forward (K-blocked) and the
    dgrad (N-blocked) GEMM, which is why TE uses it. Padded tiles are zero-filled.
    """
    if w.dim() != 2:
        raise ValueError(f"2-D NVFP4 tiles need a 2-D tensor, got shape {tuple(w.shape)}")
    n, k = w.shape
    pn, pk = (-n) % tile, (-k) % tile
    w32 = F.pad(w.float(), (0, pk, 0, pn))
    t = w32.view((n + pn) // tile, tile, (k + pk) // tile, tile)
    amax_b = torch.maximum(t.amax(dim=(1, 3), keepdim=True), t.amin(dim=(1, 3), keepdim=True).neg())
    finite = torch.isfinite(amax_b)
    s_t = nvfp4_tensor_scale(torch.where(finite, amax_b, 0.0).amax())
    s_b = ((amax_b / _FP4.max_norm) / s_t).clamp_(_E4M3_MIN_NORMAL, _E4M3_MAX)
    s_b = s_b.to(torch.float8_e4m3fn).to(torch.float32)
    v = t * ((1.0 / s_t) / s_b).masked_fill_(~finite, math.nan)
    r, q = round_elements(v, fmt=_FP4, rounding=rounding, sign_of=t, noise=None)
    y = r.mul_(q).mul_((s_t * s_b).masked_fill_(~finite, math.nan))
    return y.view(n + pn, k + pk)[:n, :k].to(w.dtype)


# ---------------------------------------------------------------------- random Hadamard transform


def sylvester_hadamard(n: int) -> torch.Tensor:
    """The n x n Sylvester Hadamard matrix (entries +-1), n a power of two."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


_RHT_CACHE: dict[tuple[torch.device, int], torch.Tensor] = {}


def random_hadamard(device: torch.device, n: int = HADAMARD_SIZE) -> torch.Tensor:
    """Orthonormal ``H diag(s) / sqrt(n)`` with a fixed random sign vector ``s`` (seed ``RHT_SEED``)."""
    key = (device, n)
    if key not in _RHT_CACHE:
        gen = torch.Generator().manual_seed(RHT_SEED)
        signs = torch.randint(0, 2, (n,), generator=gen).float().mul_(2).sub_(1)
        _RHT_CACHE[key] = (sylvester_hadamard(n) * signs / math.sqrt(n)).to(device)
    return _RHT_CACHE[key]


def hadamard_tokens(x: torch.Tensor, n: int = HADAMARD_SIZE) -> torch.Tensor:
    """Apply the random Hadamard matrix to each group of ``n`` consecutive rows of ``x [M, C]``.

    Rows are zero-padded to a multiple of ``n`` and the padding is *kept*: both
    wgrad operands are transformed alike and ``H`` is orthogonal, so
    ``(H g)^T (H x) = g^T x`` exactly in real arithmetic; only quantization
    (and float32 rounding) sees the rotated values.
    """
    m, c = x.shape
    pad = (-m) % n
    xp = F.pad(x, (0, 0, 0, pad)) if pad else x
    h = random_hadamard(x.device, n)
    return torch.matmul(h, xp.view(-1, n, c)).view(m + pad, c)
