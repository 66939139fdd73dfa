"""Block-scale statistics of MX, NVFP4 and FP8 block formats: pure functions, no host sync.

Numerics
--------
Every function reuses the project's quantizers (``recipes.mx.quantize_mx``,
``recipes.mx.quantize_nvfp4`` / ``quantize_nvfp4_2d``,
``recipes.fp8.quantize_fp8_block_1d`` / ``quantize_fp8_block_2d``, ``recipes.numerics``) and works on ``fp32(x)`` (detached; a 0-dim ``x`` is one
element). Results are 0-dim float32 tensors on ``x``'s device (per-block scale
tensors excepted); nothing calls ``.item()`` or indexes with a data-dependent
mask. Each ``*_block_sums`` returns additive counts (int64; the dynamic-range sum
float64; the scale histogram an int64 vector on a fixed grid), so micro-batches
and ranks combine by addition in one all-reduce; :func:`block_stats_from_sums`
turns (reduced) counts into the fractions, and ``*_block_stats`` is the
composition plus the per-block scales. GEMM-output error, kurtosis and
optimizer-state statistics are ``recipes.gemmstats``.

Block statistics (:func:`mx_block_stats`, :func:`nvfp4_block_stats`, :func:`fp8_block_stats`)
    Blocks are ``block_size`` consecutive elements along ``axis``
    (``recipes.mx.core.block_layout``: the last block of an axis zero-padded; the
    padding is never a non-zero element). With ``two_d=True`` (NVFP4 16 x 16, FP8
    ``block_size`` x ``block_size`` weight tiles) a block is a square tile of a 2-D
    tensor, edge tiles zero-padded as the 2-D quantizers pad; everything below holds
    per tile. A block is *non-finite* when it holds
    a NaN or +-Inf (MX: or gets the E8M0 NaN scale, ``se > 127``); it is
    reported by ``nonfinite_block_frac`` (over all blocks) and **left out of
    every other key**. The three fractions below share one denominator, the
    *live* blocks: finite blocks with at least one non-zero element (an all-zero
    block cannot saturate, vanish or change). Every fraction is 0 when its
    denominator is.

    * ``saturated_frac``: live blocks whose amax, scaled as the quantizer scales
      it, is clamped. MX (the literal clamp): ``amax / X > max_norm``, ``X =
      2^se`` of ``scale_rule`` (exact: X is a power of two); fp4_e2m1 with
      ``floor`` saturates for a scaled amax in (6, 8), ``rceil`` never. This
      counts ``6.5 -> 6`` although rounding gives 6 too (per element,
      ``recipes.numerics.overflow_fraction`` counts IEEE-sense overflow only).
      NVFP4 and FP8 map amax onto ``max`` through an FP32 scale that is not a
      power of two, so the literal test fires on FP32 ulps (``amax *
      fp32(448/amax)`` lands one ulp above 448 for ~10% of random amaxes) that change
      no value; there a block counts when its scaled amax ``v`` (the FP32
      product the quantizer forms: ``amax * factor(s_b)`` resp. ``amax *
      scale``) would round past ``max`` were it not clamped: ``v > max + u/2``,
      ``u`` the spacing below max, ``>=`` when max's grid index is odd (RNE goes
      up): E2M1 ``v >= 7``, E4M3 ``v > 464``, E5M2 ``v >= 61440``. That is 0 by
      construction for NVFP4's computed tensor scale (``v <= 6.4``) and FP8's
      per-block scales; a fixed ``per_tensor_scale`` too small for the data
      raises NVFP4 block scales into the 448 clamp and saturates. An NVFP4 block whose
      E4M3 scale rounds to zero (TE's order has no lower clamp) is flushed, not saturated.
    * ``zero_block_frac``: live blocks whose quantized values (of ``scale_rule``
      / the quantizer's default) are all zero (+0 or -0).
    * ``rule_sensitive_frac``: live blocks where at least one dequantized value
      differs between two scale rules (values compared exactly, -0 == +0; a
      different scale with the same values does not count):
      MX ``floor`` vs ``rceil`` (whatever ``scale_rule`` is), both through
      ``quantize_mx``. NVFP4: the quantizer's E4M3 block scale
      ``s_b = e4m3_rne(s)``, ``s`` the unrounded float32 block scale of the quantizer's
      order (``recipes.mx.nvfp4``: TE's ``amax * (S_enc * fp32(1/6))`` capped at 448, or
      torchao's clamped ``(amax/6)/s_t``), vs ``s_up`` = the smallest E4M3 value ``>= s`` (``s_b``, or the next E4M3
      code when ``s_b < s``), both through ``quantize_nvfp4``'s own scale and
      element steps (``recipes.mx.nvfp4.nvfp4_block_scales``, ``nvfp4_blocks``). FP8: power-of-two
      (rounded down, TE's default) vs exact FP32 scales, both through
      ``quantize_fp8_block_1d``; a value one rule reproduces exactly and the
      other only to an FP32 ulp (``q / fp32(448/amax)``) counts as a change.
    * ``dyn_range_log2``: mean over live blocks with >= 2 non-zero elements of
      ``log2(max|x|) - log2(min |x| over x != 0)``, in float64, on the inputs;
      0 when there is no such block.
    * per-block scales, shaped like ``x`` with ``axis`` replaced by the number of
      blocks: MX ``scale_exponents`` (int32 ``se``, ``X = 2^se``; -127 for
      all-zero blocks, 128 = E8M0's NaN byte 0xFF - 127 in NaN blocks); NVFP4
      ``scale_codes`` (uint8 E4M3 bit codes of ``s_b``, 0x08 = 2^-6 for zero
      blocks, 0x7F in non-finite blocks) plus the 0-dim float32
      ``tensor_scale`` ``s_t``; FP8 ``scales`` (float32, ``recipes.fp8.
      scale_from_amax`` on the NaN-ignoring block amax with the quantizer's
      arguments, ``value_for_inf`` = FLT_MAX since the input is ``fp32(x)``).
    * ``scale_hist`` (in the sums): live blocks counted by ``log2`` of their
      dequantization scale on a fixed :class:`ScaleGrid`: MX ``se`` (width 1,
      one bin per E8M0 code); NVFP4 ``log2(s_b)``, the E4M3 block scale relative
      to the tensor scale (width 1/8: each E4M3 code of a binade gets its own
      bin); FP8 ``floor(log2(1/scale))`` (width 1: exact for power-of-two
      scales, the exponent otherwise). :func:`scale_histogram` trims it to the
      occupied bins as ``{"_type": "histogram", "bins": edges, "values": counts}``
      (W&B's histogram layout); ``shift`` moves the edges (e.g. by ``-log2(W)``
      to normalise an output gradient's scales to the global mean loss).

"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from recipes.fp8 import amax as fp8_amax
from recipes.fp8 import get_format as get_fp8_format
from recipes.fp8 import quantize_fp8_block_1d, quantize_fp8_block_2d, scale_from_amax
from recipes.fp8.formats import FLT_MAX, FP8Format
from recipes.mx import FORMATS as MX_FORMATS
from recipes.mx import ElemFormat, quantize_mx, quantize_nvfp4
from recipes.mx import get_format as get_mx_format
from recipes.mx import nvfp4 as nv
from recipes.mx.core import block_amax, block_layout, block_scales, shared_exponent, to_blocks
from recipes.mx.formats import E8M0_BIAS, E8M0_NAN, check_scale_rule
from recipes.mx.nvfp4 import NVFP4_BLOCK_SIZE, quantize_nvfp4_2d
from recipes.numerics import as_fp32, fraction, overflow_bound, overflows

__all__ = [
    "FP8_GRID",
    "MX_GRID",
    "NVFP4_GRID",
    "ScaleGrid",
    "block_stats_from_sums",
    "fp8_block_stats",
    "fp8_block_sums",
    "mx_block_stats",
    "mx_block_sums",
    "nvfp4_block_stats",
    "nvfp4_block_sums",
    "scale_histogram",
]

_FP4 = MX_FORMATS["fp4_e2m1"]
_E4M3_DTYPE = torch.float8_e4m3fn
_E4M3_MAX = 448.0
_E4M3_NAN_CODE = 0x7F
#: E8M0's NaN byte as an unbiased exponent (0xFF - 127)
_SE_NAN = E8M0_NAN - E8M0_BIAS


# ---------------------------------------------------------------- block statistics


@dataclass(frozen=True)
class ScaleGrid:
    """Bins ``[lo + i step, lo + (i+1) step)``, ``i < bins``, of ``log2`` block scales (clamped)."""

    lo: float
    step: float
    bins: int

    def index(self, log2_scale: torch.Tensor) -> torch.Tensor:
        i = torch.floor((log2_scale.double() - self.lo) / self.step)
        return torch.nan_to_num(i, nan=0.0).clamp(0, self.bins - 1).long()

    def edges(self, shift: float = 0.0) -> list[float]:
        return [self.lo + i * self.step + shift for i in range(self.bins + 1)]


MX_GRID = ScaleGrid(-127.0, 1.0, 256)
NVFP4_GRID = ScaleGrid(-10.0, 0.125, 152)
FP8_GRID = ScaleGrid(-160.0, 1.0, 320)


def _tiles(x32: torch.Tensor, tile: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Square ``tile`` x ``tile`` blocks of a 2-D ``x32`` as ``(1, tiles, tile * tile, 1)`` (row-major
    over the tile grid; edge tiles zero-padded, as the 2-D quantizers pad) and the grid's shape."""
    if x32.dim() != 2:
        raise ValueError(f"2-D tiles need a 2-D tensor, got shape {tuple(x32.shape)}")
    n, k = x32.shape
    pn, pk = (-n) % tile, (-k) % tile
    t = F.pad(x32, (0, pk, 0, pn)).view((n + pn) // tile, tile, (k + pk) // tile, tile).permute(0, 2, 1, 3)
    return t.reshape(1, -1, tile * tile, 1), (t.shape[0], t.shape[1])


def _block_counts(
    xb: torch.Tensor,
    q: torch.Tensor,
    q_rule1: torch.Tensor,
    q_rule2: torch.Tensor,
    bad: torch.Tensor,
    saturated: torch.Tensor,
    log2_scale: torch.Tensor,
    grid: ScaleGrid,
) -> dict[str, torch.Tensor]:
    """Additive counts from blocks ``(pre, num_blocks, block_size, post)`` of ``fp32(x)`` and of
    its quantizations (``q`` the reported one, ``q_rule1`` / ``q_rule2`` the two compared
    rules); ``bad`` (non-finite), ``saturated`` and ``log2_scale`` are ``(pre, num_blocks, post)``."""
    nnz = (xb != 0).sum(dim=2)
    live = ~bad & (nnz > 0)
    a = xb.abs().double()
    hi = a.amax(dim=2)
    lo = torch.where(a > 0, a, math.inf).amin(dim=2)
    multi = live & (nnz >= 2)
    hist = torch.zeros(grid.bins, dtype=torch.int64, device=xb.device)
    hist.index_add_(0, grid.index(log2_scale).flatten(), live.flatten().long())
    return {
        "blocks": torch.full((), bad.numel(), dtype=torch.int64, device=xb.device),
        "nonfinite_blocks": bad.sum(),
        "live_blocks": live.sum(),
        "saturated_blocks": (live & saturated).sum(),
        "zero_blocks": (live & (q == 0).all(dim=2)).sum(),
        "rule_sensitive_blocks": (live & (q_rule1 != q_rule2).any(dim=2)).sum(),
        "multi_blocks": multi.sum(),
        "dyn_range_sum": torch.where(multi, torch.log2(hi) - torch.log2(lo), 0.0).sum(),
        "scale_hist": hist,
    }


def block_stats_from_sums(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``saturated_frac``, ``zero_block_frac``, ``rule_sensitive_frac``, ``dyn_range_log2``,
    ``nonfinite_block_frac`` (float32 0-dim) from (reduced) ``*_block_sums`` counts."""
    den = sums["live_blocks"]
    return {
        "saturated_frac": fraction(sums["saturated_blocks"], den),
        "zero_block_frac": fraction(sums["zero_blocks"], den),
        "rule_sensitive_frac": fraction(sums["rule_sensitive_blocks"], den),
        "dyn_range_log2": (sums["dyn_range_sum"] / sums["multi_blocks"].clamp(min=1)).float(),
        "nonfinite_block_frac": fraction(sums["nonfinite_blocks"], sums["blocks"]),
    }


def scale_histogram(counts: Any, grid: ScaleGrid, *, shift: float = 0.0) -> dict[str, Any]:
    """The occupied bins of a (reduced) ``scale_hist`` as W&B's histogram layout (host values)."""
    values = [int(c) for c in counts]
    used = [i for i, c in enumerate(values) if c]
    lo, hi = (used[0], used[-1] + 1) if used else (0, 1)
    return {"_type": "histogram", "bins": grid.edges(shift)[lo : hi + 1], "values": values[lo:hi]}


def mx_block_stats(
    x: torch.Tensor,
    *,
    fmt: str | ElemFormat,
    block_size: int = 32,
    axis: int = -1,
    scale_rule: str = "floor",
) -> dict[str, torch.Tensor]:
    """Block-scale statistics of ``x`` as MX ``fmt`` (an element format: ``fp4_e2m1``, ...).

    Keys ``saturated_frac``, ``zero_block_frac``, ``rule_sensitive_frac`` (floor vs
    rceil), ``dyn_range_log2``, ``nonfinite_block_frac`` and ``scale_exponents``
    (int32 per block); definitions in the module docstring.
    """
    counts, extra = _mx(x, fmt=fmt, block_size=block_size, axis=axis, scale_rule=scale_rule)
    return {**block_stats_from_sums(counts), **extra}


def mx_block_sums(
    x: torch.Tensor, *, fmt: str | ElemFormat, block_size: int = 32, axis: int = -1, scale_rule: str = "floor"
) -> dict[str, torch.Tensor]:
    """The additive counts behind :func:`mx_block_stats`, with ``scale_hist`` on :data:`MX_GRID`."""
    return _mx(x, fmt=fmt, block_size=block_size, axis=axis, scale_rule=scale_rule)[0]


def _mx(
    x: torch.Tensor, *, fmt: str | ElemFormat, block_size: int, axis: int, scale_rule: str
) -> tuple[dict, dict]:
    f = get_mx_format(fmt)
    check_scale_rule(scale_rule)
    x32 = as_fp32(x)
    layout = block_layout(x32.shape, block_size=block_size, axis=axis)
    xb = to_blocks(x32, layout)
    q = {
        rule: to_blocks(quantize_mx(x32, f, block_size=block_size, axis=axis, scale_rule=rule), layout)
        for rule in dict.fromkeys((scale_rule, "floor", "rceil"))
    }
    amax = block_amax(xb)
    se, nan = shared_exponent(amax, fmt=f, scale_rule=scale_rule)
    _, inv = block_scales(se, nan)  # exact powers of two; NaN in NaN blocks (compares False)
    saturated = (amax * inv > f.max_norm).squeeze(2)
    counts = _block_counts(xb, q[scale_rule], q["floor"], q["rceil"], nan.squeeze(2), saturated,
                           se.squeeze(2).float(), MX_GRID)  # fmt: skip
    return counts, {"scale_exponents": se.masked_fill(nan, _SE_NAN).reshape(layout.scale_shape)}


def _rounds_past_max(v: torch.Tensor, max_value: float, mbits: int) -> torch.Tensor:
    """``v > max + u/2`` (``>=`` when max's grid index is odd): unclamped, ``v`` would round past max
    (``recipes.numerics``' IEEE overflow test, ``u`` the top binade's spacing)."""
    return overflows(v, overflow_bound(max_value, 2.0 ** (math.floor(math.log2(max_value)) - mbits)))


def _e4m3_round_up(s: torch.Tensor) -> torch.Tensor:
    """Smallest E4M3 value ``>= s`` for float32 ``s`` in [0, 448], subnormals included (NaN stays NaN)."""
    near = s.to(_E4M3_DTYPE)
    code = near.view(torch.uint8) + (near.float() < s).to(torch.uint8)  # next positive code up
    return code.view(_E4M3_DTYPE).float()


def nvfp4_block_stats(
    x: torch.Tensor,
    *,
    axis: int = -1,
    per_tensor_scale: float | torch.Tensor | None = None,
    two_d: bool = False,
    order: str = "te",
) -> dict[str, torch.Tensor]:
    """Block-scale statistics of ``x`` as NVFP4 (16-element blocks, E4M3 block + FP32 tensor scale).

    Keys as :func:`mx_block_stats` (``rule_sensitive_frac``: E4M3 block scale
    rounded to nearest vs up), with ``scale_codes`` (uint8 E4M3 codes) and
    ``tensor_scale`` instead of ``scale_exponents``. ``per_tensor_scale`` is
    passed to ``quantize_nvfp4``. ``two_d``: 16 x 16 tiles of a 2-D ``x``
    (``quantize_nvfp4_2d``, TE's NVFP4 weights; ``axis`` is ignored, ``scale_codes``
    is the tile grid). ``order``: the scale arithmetic (``recipes.mx.nvfp4``).
    """
    counts, extra = _nvfp4(x, axis=axis, per_tensor_scale=per_tensor_scale, two_d=two_d, order=order)
    return {**block_stats_from_sums(counts), **extra}


def nvfp4_block_sums(
    x: torch.Tensor,
    *,
    axis: int = -1,
    per_tensor_scale: float | torch.Tensor | None = None,
    two_d: bool = False,
    order: str = "te",
) -> dict[str, torch.Tensor]:
    """The additive counts behind :func:`nvfp4_block_stats`, ``scale_hist`` on :data:`NVFP4_GRID`."""
    return _nvfp4(x, axis=axis, per_tensor_scale=per_tensor_scale, two_d=two_d, order=order)[0]


def _nvfp4(
    x: torch.Tensor, *, axis: int, per_tensor_scale: float | torch.Tensor | None, two_d: bool, order: str
) -> tuple[dict, dict]:
    x32 = as_fp32(x)
    if two_d:
        if per_tensor_scale is not None:
            raise ValueError("2-D NVFP4 tiles take their tensor scale from the tensor (quantize_nvfp4_2d)")
        xb, scale_shape = _tiles(x32, NVFP4_BLOCK_SIZE)
        q_reported = _tiles(quantize_nvfp4_2d(x32, order=order), NVFP4_BLOCK_SIZE)[0]
    else:
        layout = block_layout(x32.shape, block_size=NVFP4_BLOCK_SIZE, axis=axis)
        xb, scale_shape = to_blocks(x32, layout), layout.scale_shape
        q_reported = to_blocks(
            quantize_nvfp4(x32, axis=axis, per_tensor_scale=per_tensor_scale, order=order), layout
        )
    amax_b = block_amax(xb)
    finite = torch.isfinite(amax_b)
    if per_tensor_scale is not None:
        ts = nv.fixed_tensor_scale(per_tensor_scale, order=order, device=x32.device)
    elif amax_b.numel():
        ts = nv.nvfp4_tensor_scale(torch.where(finite, amax_b, 0.0).amax(), order=order)
    else:
        ts = nv.nvfp4_tensor_scale(torch.zeros((), device=x32.device), order=order)
    s_b = nv.nvfp4_block_scales(amax_b, ts)
    q_near = q_reported
    q_up = nv.nvfp4_blocks(xb, ts, _e4m3_round_up(nv.nvfp4_unrounded_block_scales(amax_b, ts)), finite)
    # a zero block scale (TE's order) makes the factor FLT_MAX: that block is flushed, not saturated
    v_max = amax_b * nv.nvfp4_element_factor(s_b, ts)
    saturated = (_rounds_past_max(v_max, _FP4.max_norm, _FP4.mbits) & (s_b > 0)).squeeze(2)
    counts = _block_counts(xb, q_near, q_near, q_up, ~finite.squeeze(2), saturated,
                           torch.log2(s_b).squeeze(2), NVFP4_GRID)  # fmt: skip
    codes = s_b.to(_E4M3_DTYPE).view(torch.uint8).masked_fill(~finite, _E4M3_NAN_CODE)
    return counts, {"scale_codes": codes.reshape(scale_shape), "tensor_scale": ts.dec.reshape(()).float()}


def fp8_block_stats(
    x: torch.Tensor,
    *,
    fmt: str | FP8Format = "e4m3",
    block_size: int = 128,
    axis: int = -1,
    power_2_scales: bool = True,
    amax_epsilon: float = 0.0,
    two_d: bool = False,
) -> dict[str, torch.Tensor]:
    """Block-scale statistics of ``x`` under FP8 1 x ``block_size`` scaling (``quantize_fp8_block_1d``).

    Keys as :func:`mx_block_stats` (``rule_sensitive_frac``: power-of-two vs exact
    FP32 scales), with ``scales`` (float32 per block, of ``power_2_scales``). ``two_d``:
    ``block_size`` x ``block_size`` tiles of a 2-D ``x`` (``quantize_fp8_block_2d``, TE's
    128 x 128 weights; ``axis`` is ignored, ``scales`` is the tile grid).
    """
    counts, extra = _fp8(x, fmt=fmt, block_size=block_size, axis=axis, power_2_scales=power_2_scales,
                         amax_epsilon=amax_epsilon, two_d=two_d)  # fmt: skip
    return {**block_stats_from_sums(counts), **extra}


def fp8_block_sums(x: torch.Tensor, **kw: Any) -> dict[str, torch.Tensor]:
    """The additive counts behind :func:`fp8_block_stats` (same keywords), ``scale_hist`` on :data:`FP8_GRID`."""
    return _fp8(x, **kw)[0]


def _fp8(x: torch.Tensor, *, fmt: str | FP8Format = "e4m3", block_size: int = 128, axis: int = -1,
         power_2_scales: bool = True, amax_epsilon: float = 0.0, two_d: bool = False) -> tuple[dict, dict]:  # fmt: skip
    f = get_fp8_format(fmt)
    x32 = as_fp32(x)
    q: dict[bool, torch.Tensor] = {}
    kw = dict(block_size=block_size, amax_epsilon=amax_epsilon)
    if two_d:
        xb, scale_shape = _tiles(x32, block_size)
        for p2 in (True, False):
            q[p2] = _tiles(quantize_fp8_block_2d(x32, f, power_2_scales=p2, **kw), block_size)[0]  # type: ignore[arg-type]
    else:
        layout = block_layout(x32.shape, block_size=block_size, axis=axis)
        xb, scale_shape = to_blocks(x32, layout), layout.scale_shape
        for p2 in (True, False):
            q[p2] = to_blocks(quantize_fp8_block_1d(x32, f, axis=axis, power_2_scales=p2, **kw), layout)  # type: ignore[arg-type]
    amax = fp8_amax(xb, dim=2, keepdim=True)  # NaN-ignoring, as the quantizer's
    scale = scale_from_amax(
        amax, f.max, power_2_scale=power_2_scales, amax_epsilon=amax_epsilon, value_for_inf=FLT_MAX
    )
    bad = ~torch.isfinite(xb).all(dim=2)
    saturated = _rounds_past_max(amax * scale, f.max, f.mantissa_bits).squeeze(2)
    counts = _block_counts(xb, q[power_2_scales], q[True], q[False], bad, saturated,
                           -torch.log2(scale).squeeze(2), FP8_GRID)  # fmt: skip
    return counts, {"scales": scale.reshape(scale_shape)}
