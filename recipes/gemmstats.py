"""GEMM-output error, activation distribution and optimizer-state statistics: pure functions.

Numerics
--------
Every function works on ``fp32(x)`` (detached; a 0-dim ``x`` is one element).
Results are 0-dim tensors on the input's device; nothing calls ``.item()``.
Sums of squares and higher powers accumulate in float64. Each statistic has an
*additive* form (``*_sums``: plain sums over elements, so micro-batches and
ranks combine by addition, one all-reduce) and the value computed from those
sums (``*_from_sums``); the one-shot function is the composition of the two.

GEMM error (:func:`gemm_output_error`, :func:`gemm_errors`, :func:`gemm_error_sums`)
    ``sqnr_db = 10 log10(sum y_ref^2 / sum (y_q - y_ref)^2)`` and
    ``rel_error = ||y_q - y_ref|| / ||y_ref||``: ``recipes.numerics.sqnr_db`` /
    ``relative_error`` with ``x = y_ref``, so their conventions hold (float64
    sums; ``+inf`` dB and 0 when equal; non-finite ``y_ref`` elements left out; a
    non-finite ``y_q`` where ``y_ref`` is finite gives ``-inf`` dB).
    :func:`gemm_error_sums` takes the FP32 operands ``a``, ``b`` and their
    dequantized copies ``qa``, ``qb``, forms ``y_ref = a @ b`` and sums
    ``ref_sq = sum y_ref^2``, ``err_sq`` of ``qa @ qb``, ``a_err_sq`` of ``qa @ b``
    (only ``a`` quantized) and ``b_err_sq`` of ``a @ qb``. Over several GEMMs
    (micro-batches, ranks) the sums add, so the result is the error energy of
    all of them against their total reference energy. A factor ``c`` on an
    operand of every GEMM (e.g. the 1/W share of the loss each of W ranks
    differentiates) cancels in every key when the quantizer is scale-equivariant
    (MX and power-of-two scales: exactly, unless a value crosses the format's
    range). All four GEMMs are ``torch.matmul`` in float32 under the caller's
    matmul precision (with TF32 enabled on CUDA the reference carries TF32
    rounding too).

Distribution and optimizer state
    * :func:`kurtosis`: ``E[(x-mu)^4] / E[(x-mu)^2]^2`` (non-excess: a Gaussian
      gives 3, two values +-1 give 1, the minimum) over the finite elements, two
      passes in float64; 0 (below any real kurtosis) when there is no finite
      element or the variance is 0. :func:`kurtosis_sums` is the additive form:
      ``n, s1..s4`` (float64 power sums), turned into central moments by the
      binomial expansion; it agrees with the two-pass value to float64 rounding
      when ``|mu|`` is not many standard deviations (the case of normalised
      activations; tested).
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
      :func:`moment_underflow_sums` gives the counts; the E4M3 scale is the amax of the
      tensor passed in (the caller passes a whole, gathered moment tensor, so the value does
      not depend on how ZeRO partitions it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from recipes.numerics import (
    as_fp32,
    db_from_sums,
    fraction,
    get_spec,
    quantize_like,
    rel_from_sums,
    signal_noise_sums,
    underflow_fraction,
)

__all__ = [
    "gemm_error_sums",
    "gemm_errors",
    "gemm_errors_from_sums",
    "gemm_output_error",
    "kurtosis",
    "kurtosis_from_sums",
    "kurtosis_sums",
    "moment_underflow_sums",
    "underflow_frac_bf16",
    "underflow_frac_e4m3_scaled",
    "update_ratio",
]

Quantizer = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------- GEMM error


def gemm_output_error(y_q: torch.Tensor, y_ref: torch.Tensor) -> dict[str, torch.Tensor]:
    """``sqnr_db`` and ``rel_error`` of a GEMM output ``y_q`` against ``y_ref`` (module docstring)."""
    ref, err = signal_noise_sums(as_fp32(y_ref), y_q.detach())
    return {"sqnr_db": db_from_sums(ref, err), "rel_error": rel_from_sums(ref, err)}


def gemm_error_sums(
    a: torch.Tensor, b: torch.Tensor, qa: torch.Tensor, qb: torch.Tensor
) -> dict[str, torch.Tensor]:
    """float64 ``ref_sq``, ``err_sq`` (both quantized), ``a_err_sq``, ``b_err_sq`` (one operand
    quantized) of ``a @ b`` against the FP32 reference (module docstring)."""
    a32, b32, qa32, qb32 = (t.detach().float() for t in (a, b, qa, qb))
    y_ref = a32 @ b32
    ref, err = signal_noise_sums(y_ref, qa32 @ qb32)
    return {
        "ref_sq": ref,
        "err_sq": err,
        "a_err_sq": signal_noise_sums(y_ref, qa32 @ b32)[1],
        "b_err_sq": signal_noise_sums(y_ref, a32 @ qb32)[1],
    }


def gemm_errors_from_sums(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sqnr_db``, ``rel_error``, ``a_sqnr_db``, ``b_sqnr_db`` from (reduced) :func:`gemm_error_sums`."""
    ref = sums["ref_sq"]
    return {
        "sqnr_db": db_from_sums(ref, sums["err_sq"]),
        "rel_error": rel_from_sums(ref, sums["err_sq"]),
        "a_sqnr_db": db_from_sums(ref, sums["a_err_sq"]),
        "b_sqnr_db": db_from_sums(ref, sums["b_err_sq"]),
    }


def gemm_errors(
    a: torch.Tensor, b: torch.Tensor, quantize_a: Quantizer, quantize_b: Quantizer
) -> dict[str, torch.Tensor]:
    """Output error of the FP32 GEMM ``a @ b`` with both, only ``a``, only ``b`` fake-quantized.

    Keys ``sqnr_db``, ``rel_error`` (both quantized), ``a_sqnr_db``, ``b_sqnr_db``.
    ``quantize_a`` / ``quantize_b`` get the detached operand and return its
    dequantized value (any float dtype; upcast to float32).
    """
    a, b = a.detach(), b.detach()
    return gemm_errors_from_sums(gemm_error_sums(a, b, quantize_a(a), quantize_b(b)))


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


def kurtosis_sums(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """float64 ``n`` (finite elements) and power sums ``s1..s4`` of the finite elements."""
    xd = as_fp32(x).double()
    finite = torch.isfinite(xd)
    xd = torch.where(finite, xd, 0.0)
    x2 = xd * xd
    return {
        "n": finite.sum().double(),
        "s1": xd.sum(),
        "s2": x2.sum(),
        "s3": (x2 * xd).sum(),
        "s4": (x2 * x2).sum(),
    }


def kurtosis_from_sums(sums: dict[str, torch.Tensor]) -> torch.Tensor:
    """:func:`kurtosis` from (reduced) :func:`kurtosis_sums` (central moments by binomial expansion)."""
    n = sums["n"].clamp(min=1)
    mu, e2, e3, e4 = sums["s1"] / n, sums["s2"] / n, sums["s3"] / n, sums["s4"] / n
    m2 = e2 - mu * mu
    m4 = e4 - 4 * mu * e3 + 6 * mu * mu * e2 - 3 * mu**4
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


def moment_underflow_sums(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """int64 ``nonzero`` (finite non-zero elements), ``bf16`` and ``e4m3`` (those that become 0
    under :func:`underflow_frac_bf16` / :func:`underflow_frac_e4m3_scaled`), with the E4M3
    scale from this tensor's own amax."""
    x32 = as_fp32(x)
    nonzero = torch.isfinite(x32) & (x32 != 0)
    return {
        "nonzero": nonzero.sum(),
        "bf16": (nonzero & (quantize_like(x32, get_spec("bf16")) == 0)).sum(),
        "e4m3": (nonzero & (quantize_like(x32, get_spec("fp8_e4m3")) == 0)).sum(),
    }


def moment_underflow_from_sums(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``underflow_bf16`` and ``underflow_e4m3`` fractions from (reduced) :func:`moment_underflow_sums`."""
    return {
        "underflow_bf16": fraction(sums["bf16"], sums["nonzero"]),
        "underflow_e4m3": fraction(sums["e4m3"], sums["nonzero"]),
    }
