"""Block-scale, GEMM-error and optimizer-state statistics: pure functions, no host sync.

Numerics
--------
Every function reuses the project's quantizers (``recipes.mx.quantize_mx``,
``recipes.mx.quantize_nvfp4``, ``recipes.fp8.quantize_fp8_block_1d``,
``recipes.numerics``) and works on ``fp32(x)`` (detached; a 0-dim ``x`` is one
element). Results are 0-dim float32 tensors on ``x``'s device (per-block scale
tensors excepted); nothing calls ``.item()`` or indexes with a data-dependent
mask. Sums of squares and fourth powers accumulate in float64.

GEMM error (:func:`gemm_output_error`, :func:`gemm_errors`)
    ``sqnr_db = 10 log10(sum y_ref^2 / sum (y_q - y_ref)^2)`` and
    ``rel_error = ||y_q - y_ref|| / ||y_ref||``: ``recipes.numerics.sqnr_db`` /
    ``relative_error`` with ``x = y_ref``, so their conventions hold (float64
    sums; ``+inf`` dB and 0 when equal; non-finite ``y_ref`` elements left out; a
    non-finite ``y_q`` where ``y_ref`` is finite gives ``-inf`` dB).
    :func:`gemm_errors` forms ``y_ref = fp32(a) @ fp32(b)`` and, with ``qa =
    fp32(quantize_a(a))``, ``qb = fp32(quantize_b(b))``: ``qa @ qb`` (keys
    ``sqnr_db``, ``rel_error``), ``qa @ fp32(b)`` (``a_sqnr_db``) and ``fp32(a) @
    qb`` (``b_sqnr_db``). All four GEMMs are ``torch.matmul`` in float32 under
    the caller's matmul precision (with TF32 enabled on CUDA the reference
    carries TF32 rounding too).

Block statistics (:func:`mx_block_stats`, :func:`nvfp4_block_stats`, :func:`fp8_block_stats`)
    Blocks are ``block_size`` consecutive elements along ``axis``
    (``recipes.mx.core.block_layout``: the last block of an axis zero-padded; the
    padding is never a non-zero element). A block is *non-finite* when it holds
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
      product the quantizer forms: ``amax * ((1/s_t)/s_b)`` resp. ``amax *
      scale``) would round past ``max`` were it not clamped: ``v > max + u/2``,
      ``u`` the spacing below max, ``>=`` when max's grid index is odd (RNE goes
      up): E2M1 ``v >= 7``, E4M3 ``v > 464``, E5M2 ``v >= 61440``. That is 0 by
      construction for NVFP4's computed tensor scale (``v <= 6.4``) and FP8's
      per-block scales; a fixed ``per_tensor_scale`` too small for the data
      raises NVFP4 block scales into the 448 clamp and saturates.
    * ``zero_block_frac``: live blocks whose quantized values (of ``scale_rule``
      / the quantizer's default) are all zero (+0 or -0).
    * ``rule_sensitive_frac``: live blocks where at least one dequantized value
      differs between two scale rules (values compared exactly, -0 == +0; a
      different scale with the same values does not count):
      MX ``floor`` vs ``rceil`` (whatever ``scale_rule`` is), both through
      ``quantize_mx``. NVFP4: the quantizer's E4M3 block scale
      ``s_b = e4m3_rne(s)``, ``s = clamp((amax/6)/s_t, 2^-6, 448)`` (float32),
      vs ``s_up`` = the smallest E4M3 value ``>= s`` (``s_b``, or the next E4M3
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

Distribution and optimizer state
    * :func:`kurtosis`: ``E[(x-mu)^4] / E[(x-mu)^2]^2`` (non-excess: a Gaussian
      gives 3, two values +-1 give 1, the minimum) over the finite elements, two
      passes in float64; 0 (below any real kurtosis) when there is no finite
      element or the variance is 0.
    * :func:`update_ratio`: ``||update|| / ||weight||`` (L2 over all elements,
      float64 sums). 0/0 gives 0, u/0 gives inf; NaN or Inf anywhere propagates
      (a non-finite update must show, there is no companion key).
    * :func:`underflow_frac_bf16` / :func:`underflow_frac_e4m3_scaled`: finite
      non-zero elements whose quantized value is 0, over the finite non-zero
      elements: ``recipes.numerics.underflow_fraction`` with ``bf16`` (a cast:
      BF16 keeps FP32's exponent range; values at or below 2^-134, half of its
      smallest subnormal 2^-133, round to 0) resp. ``fp8_e4m3``
      (``quantize_fp8`` with the per-tensor current scale ``448/amax``, TE's
      edge cases: amax 0 or Inf gives scale 1; scaled values at or below 2^-10
      round to 0), as FP8-LM / MS-AMP scale stored optimizer moments.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from recipes.fp8 import amax as fp8_amax
from recipes.fp8 import get_format as get_fp8_format
from recipes.fp8 import quantize_fp8_block_1d, scale_from_amax
from recipes.fp8.formats import FLT_MAX, FP8Format
from recipes.mx import FORMATS as MX_FORMATS
from recipes.mx import ElemFormat, quantize_mx, quantize_nvfp4
from recipes.mx import get_format as get_mx_format
from recipes.mx.core import block_amax, block_layout, block_scales, shared_exponent, to_blocks
from recipes.mx.formats import E8M0_BIAS, E8M0_NAN, check_scale_rule
from recipes.mx.nvfp4 import NVFP4_BLOCK_SIZE, nvfp4_block_scales, nvfp4_blocks, nvfp4_tensor_scale
from recipes.numerics import (
    as_fp32,
    fraction,
    overflow_bound,
    overflows,
    relative_error,
    sqnr_db,
    underflow_fraction,
)

__all__ = [
    "fp8_block_stats",
    "gemm_errors",
    "gemm_output_error",
    "kurtosis",
    "mx_block_stats",
    "nvfp4_block_stats",
    "underflow_frac_bf16",
    "underflow_frac_e4m3_scaled",
    "update_ratio",
]

Quantizer = Callable[[torch.Tensor], torch.Tensor]

_FP4 = MX_FORMATS["fp4_e2m1"]
_E4M3_DTYPE = torch.float8_e4m3fn
_E4M3_MAX = 448.0
_E4M3_MIN_NORMAL = 2.0**-6
_E4M3_NAN_CODE = 0x7F
#: E8M0's NaN byte as an unbiased exponent (0xFF - 127)
_SE_NAN = E8M0_NAN - E8M0_BIAS


# ---------------------------------------------------------------- GEMM error


def gemm_output_error(y_q: torch.Tensor, y_ref: torch.Tensor) -> dict[str, torch.Tensor]:
    """``sqnr_db`` and ``rel_error`` of a GEMM output ``y_q`` against ``y_ref`` (module docstring)."""
    return {"sqnr_db": sqnr_db(y_ref, y_q), "rel_error": relative_error(y_ref, y_q)}


def gemm_errors(
    a: torch.Tensor, b: torch.Tensor, quantize_a: Quantizer, quantize_b: Quantizer
) -> dict[str, torch.Tensor]:
    """Output error of the FP32 GEMM ``a @ b`` with both, only ``a``, only ``b`` fake-quantized.

    Keys ``sqnr_db``, ``rel_error`` (both quantized), ``a_sqnr_db``, ``b_sqnr_db``.
    ``quantize_a`` / ``quantize_b`` get the detached operand and return its
    dequantized value (any float dtype; upcast to float32).
    """
    a, b = a.detach(), b.detach()
    a32, b32 = a.float(), b.float()
    qa, qb = quantize_a(a).detach().float(), quantize_b(b).detach().float()
    y_ref = a32 @ b32
    out = gemm_output_error(qa @ qb, y_ref)
    out["a_sqnr_db"] = sqnr_db(y_ref, qa @ b32)
    out["b_sqnr_db"] = sqnr_db(y_ref, a32 @ qb)
    return out


# ---------------------------------------------------------------- block statistics


def _block_summary(
    xb: torch.Tensor,
    q: torch.Tensor,
    q_rule1: torch.Tensor,
    q_rule2: torch.Tensor,
    bad: torch.Tensor,
    saturated: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The shared keys from blocks ``(pre, num_blocks, block_size, post)`` of ``fp32(x)`` and of
    its quantizations (``q`` the reported one, ``q_rule1`` / ``q_rule2`` the two compared
    rules); ``bad`` (non-finite) and ``saturated`` are ``(pre, num_blocks, post)`` masks."""
    nnz = (xb != 0).sum(dim=2)
    live = ~bad & (nnz > 0)
    den = live.sum()
    a = xb.abs().double()
    hi = a.amax(dim=2)
    lo = torch.where(a > 0, a, math.inf).amin(dim=2)
    multi = live & (nnz >= 2)
    dyn = torch.where(multi, torch.log2(hi) - torch.log2(lo), 0.0).sum()
    return {
        "saturated_frac": fraction((live & saturated).sum(), den),
        "zero_block_frac": fraction((live & (q == 0).all(dim=2)).sum(), den),
        "rule_sensitive_frac": fraction((live & (q_rule1 != q_rule2).any(dim=2)).sum(), den),
        "dyn_range_log2": (dyn / multi.sum().clamp(min=1)).float(),  # 0 / 1 when there is no block
        "nonfinite_block_frac": fraction(bad.sum(), torch.full_like(den, bad.numel())),
    }


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
    out = _block_summary(xb, q[scale_rule], q["floor"], q["rceil"], nan.squeeze(2), saturated)
    out["scale_exponents"] = se.masked_fill(nan, _SE_NAN).reshape(layout.scale_shape)
    return out


def _rounds_past_max(v: torch.Tensor, max_value: float, mbits: int) -> torch.Tensor:
    """``v > max + u/2`` (``>=`` when max's grid index is odd): unclamped, ``v`` would round past max
    (``recipes.numerics``' IEEE overflow test, ``u`` the top binade's spacing)."""
    return overflows(v, overflow_bound(max_value, 2.0 ** (math.floor(math.log2(max_value)) - mbits)))


def _e4m3_round_up(s: torch.Tensor) -> torch.Tensor:
    """Smallest E4M3 value ``>= s`` for float32 ``s`` in [2^-6, 448] (NaN stays NaN)."""
    near = s.to(_E4M3_DTYPE)
    code = near.view(torch.uint8) + (near.float() < s).to(torch.uint8)  # next positive code up
    return code.view(_E4M3_DTYPE).float()


def nvfp4_block_stats(
    x: torch.Tensor, *, axis: int = -1, per_tensor_scale: float | torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Block-scale statistics of ``x`` as NVFP4 (16-element blocks, E4M3 block + FP32 tensor scale).

    Keys as :func:`mx_block_stats` (``rule_sensitive_frac``: E4M3 block scale
    rounded to nearest vs up), with ``scale_codes`` (uint8 E4M3 codes) and
    ``tensor_scale`` instead of ``scale_exponents``. ``per_tensor_scale`` is
    passed to ``quantize_nvfp4``.
    """
    x32 = as_fp32(x)
    layout = block_layout(x32.shape, block_size=NVFP4_BLOCK_SIZE, axis=axis)
    xb = to_blocks(x32, layout)
    amax_b = block_amax(xb)
    finite = torch.isfinite(amax_b)
    if per_tensor_scale is not None:
        s_t = torch.as_tensor(per_tensor_scale, dtype=torch.float32, device=x32.device)
    elif amax_b.numel():
        s_t = nvfp4_tensor_scale(torch.where(finite, amax_b, 0.0).amax())
    else:
        s_t = nvfp4_tensor_scale(torch.zeros((), device=x32.device))
    s = ((amax_b / _FP4.max_norm) / s_t).clamp_(_E4M3_MIN_NORMAL, _E4M3_MAX)  # before E4M3 rounding
    s_b = nvfp4_block_scales(amax_b, s_t)
    q_near = to_blocks(quantize_nvfp4(x32, axis=axis, per_tensor_scale=per_tensor_scale), layout)
    q_up = nvfp4_blocks(xb, s_t, _e4m3_round_up(s), finite)
    saturated = _rounds_past_max(amax_b * ((1.0 / s_t) / s_b), _FP4.max_norm, _FP4.mbits).squeeze(2)
    out = _block_summary(xb, q_near, q_near, q_up, ~finite.squeeze(2), saturated)
    codes = s_b.to(_E4M3_DTYPE).view(torch.uint8).masked_fill(~finite, _E4M3_NAN_CODE)
    out["scale_codes"] = codes.reshape(layout.scale_shape)
    out["tensor_scale"] = s_t.reshape(()).float()
    return out


def fp8_block_stats(
    x: torch.Tensor,
    *,
    fmt: str | FP8Format = "e4m3",
    block_size: int = 128,
    axis: int = -1,
    power_2_scales: bool = True,
    amax_epsilon: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Block-scale statistics of ``x`` under FP8 1 x ``block_size`` scaling (``quantize_fp8_block_1d``).

    Keys as :func:`mx_block_stats` (``rule_sensitive_frac``: power-of-two vs exact
    FP32 scales), with ``scales`` (float32 per block, of ``power_2_scales``).
    """
    f = get_fp8_format(fmt)
    x32 = as_fp32(x)
    layout = block_layout(x32.shape, block_size=block_size, axis=axis)
    xb = to_blocks(x32, layout)
    q = {
        p2: to_blocks(
            quantize_fp8_block_1d(
                x32, f, axis=axis, block_size=block_size, power_2_scales=p2, amax_epsilon=amax_epsilon
            ),
            layout,
        )
        for p2 in (True, False)
    }
    amax = fp8_amax(xb, dim=2, keepdim=True)  # NaN-ignoring, as the quantizer's
    scale = scale_from_amax(
        amax, f.max, power_2_scale=power_2_scales, amax_epsilon=amax_epsilon, value_for_inf=FLT_MAX
    )
    bad = ~torch.isfinite(xb).all(dim=2)
    saturated = _rounds_past_max(amax * scale, f.max, f.mantissa_bits).squeeze(2)
    out = _block_summary(xb, q[power_2_scales], q[True], q[False], bad, saturated)
    out["scales"] = scale.reshape(layout.scale_shape)
    return out


# ---------------------------------------------------------------- distribution, optimizer state


def kurtosis(x: torch.Tensor) -> torch.Tensor:
    """Non-excess kurtosis ``E[(x-mu)^4] / E[(x-mu)^2]^2`` of the finite elements, in float64.

    A Gaussian gives ~3; 0 when undefined (no finite element, or zero variance).
    """
    xd = as_fp32(x).double()
    finite = torch.isfinite(xd)
    n = finite.sum().clamp(min=1)
    mu = torch.where(finite, xd, 0.0).sum() / n
    d2 = torch.where(finite, xd - mu, 0.0).square_()
    m2 = d2.sum() / n
    m4 = d2.square_().sum() / n
    return torch.where(m2 > 0, m4 / (m2 * m2), 0.0).float()


def update_ratio(update: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``||update|| / ||weight||`` (float64 sums): 0 for 0/0, inf for u/0; NaN/Inf propagate."""
    u, w = update.detach().double(), weight.detach().double()
    nu, nw = (u * u).sum().sqrt(), (w * w).sum().sqrt()
    return torch.where((nu == 0) & (nw == 0), 0.0, nu / nw).float()


def underflow_frac_bf16(x: torch.Tensor) -> torch.Tensor:
    """Finite non-zero elements of ``x`` that become 0 in BF16, over the finite non-zero elements."""
    return underflow_fraction(x, "bf16")


def underflow_frac_e4m3_scaled(x: torch.Tensor) -> torch.Tensor:
    """Finite non-zero elements of ``x`` that become 0 in FP8 E4M3 after per-tensor scaling by
    ``448 / amax`` (``recipes.fp8`` current scaling), over the finite non-zero elements."""
    return underflow_fraction(x, "fp8_e4m3")
