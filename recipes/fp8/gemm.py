"""Real FP8 GEMMs through torch's scaled matmul: the one place that knows its layout and scale rules.

Numerics
--------
``scaled_gemm(a, b)`` computes ``(a.q * a.scale_inv) @ (b.q * b.scale_inv)`` with ``a.q:[M,K]`` and
``b.q:[K,N]`` float8 codes (E4M3 or E5M2, any pairing the device takes) and FP32 *dequantization*
scales (``scale_inv = 1/scale``, TE's name) that are either 0-d (per tensor) or per row of ``a``
(``[M,1]``) / per column of ``b`` (``[1,N]``): the scaled matmul multiplies the FP32 accumulator by
them, it never materialises dequantized operands on the GPU. Accumulation is FP32; with
``fast_accum`` (Hopper) cuBLAS may accumulate in reduced precision for speed (torchao's choice: on
for the forward GEMM only). The result is FP32 where the device returns FP32, else BF16.

Layout rules, handled here and nowhere else:

* the first operand is row-major and the second column-major (cuBLASLt's "TN" FP8 GEMM): a
  transposed view that is already in that layout is used as is, anything else is copied once
  (an FP8 transpose is a byte copy, exact);
* scales are contiguous FP32; a per-tensor scale beside a per-row scale is expanded to a row
  (the two scalings cannot be mixed in one call), which does not change the product;
* on the CPU a per-tensor pair is also passed expanded to rows: torch 2.13's CPU kernel for
  tensorwise scales is a reference loop, two orders of magnitude slower than its rowwise path (measured:
  3.9 s against 17 ms for 2048x128x384; ``python -m bench.scaled_mm``); the rowwise path's result
  equals the FP32 GEMM of the dequantized operands ``q * scale_inv`` bit for bit (tested);
* CUDA needs ``K`` and ``N`` divisible by 16 (cuBLASLt); ``check_dims`` says so before start-up.

Feature detection, not version checks: :func:`features` runs each scaled matmul variant once on a
tiny problem on the device (cached per device) and records which scale layouts and output dtypes
it accepts; block (1x128, 128x128) and MX (E8M0) scales are probed the same way.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

__all__ = ["Operand", "ScaledMMFeatures", "check_dims", "features", "scaled_gemm", "unsupported_reason"]

#: cuBLASLt's FP8 GEMM needs these dims divisible by 16 (torch checks it and raises)
CUDA_DIM_MULTIPLE = 16


@dataclass(frozen=True)
class Operand:
    """A float8 matrix and its FP32 dequantization scale (0-d, or 1 along the reduction dim)."""

    q: torch.Tensor
    scale_inv: torch.Tensor

    def t(self) -> Operand:
        """The transposed operand (a view; the scale's layout follows)."""
        s = self.scale_inv
        return Operand(self.q.t(), s.t() if s.dim() == 2 else s)

    def dequantize(self) -> torch.Tensor:
        """``fp32(q) * scale_inv``: the values the scaled matmul multiplies (for tests and references)."""
        return self.q.float() * self.scale_inv


@dataclass(frozen=True)
class ScaledMMFeatures:
    """What the installed torch's scaled matmul accepts on one device (probed, not assumed)."""

    device: str
    available: bool
    """``torch._scaled_mm`` exists and ran a tensorwise E4M3 GEMM here."""
    why_not: str = ""
    rowwise: bool = False
    """Per-row / per-column FP32 scales."""
    fp32_out_tensorwise: bool = False
    """``out_dtype=float32`` with per-tensor scales."""
    fp32_out_rowwise: bool = False
    """``out_dtype=float32`` with rowwise scales (some CUDA builds want BF16 there)."""
    e5m2_first: bool = False
    """E5M2 as the first operand (dY in dgrad and wgrad under HYBRID)."""
    block_1x128: bool = False
    """1x128 / 128x128 block scales (``torch.nn.functional.scaled_mm`` ``BlockWise*``)."""
    mx: bool = False
    """E8M0 block scales (MXFP8)."""
    functional: bool = False
    """``torch.nn.functional.scaled_mm`` exists (torch >= 2.10)."""

    def describe(self) -> str:
        if not self.available:
            return f"torch._scaled_mm unavailable on {self.device}: {self.why_not}"
        names = [n for n in ("rowwise", "fp32_out_tensorwise", "fp32_out_rowwise", "e5m2_first", "block_1x128", "mx")
                 if getattr(self, n)]  # fmt: skip
        return f"torch._scaled_mm on {self.device} ({', '.join(names) or 'tensorwise only'})"


def _try(fn) -> bool:
    try:
        fn()
        return True
    except (RuntimeError, TypeError, ValueError, NotImplementedError):
        return False


@functools.cache
def features(device: str) -> ScaledMMFeatures:
    """Probe the scaled matmul on ``device`` ("cpu", "cuda", "cuda:1") with 16x256x16 problems."""
    dev = torch.device(device)
    if not hasattr(torch, "_scaled_mm"):
        return ScaledMMFeatures(device, False, "this torch has no torch._scaled_mm")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return ScaledMMFeatures(device, False, "no CUDA device is visible")
        cc = torch.cuda.get_device_capability(dev)
        if cc < (8, 9):
            return ScaledMMFeatures(
                device, False, f"compute capability {cc[0]}.{cc[1]} < 8.9 (no FP8 tensor cores)"
            )
    M, K, N = 16, 256, 16
    e4, e5 = torch.float8_e4m3fn, torch.float8_e5m2
    a = torch.ones(M, K, device=dev).to(e4)
    b = torch.ones(N, K, device=dev).to(e4).t()
    one = torch.ones((), device=dev)
    mm = torch._scaled_mm
    if not _try(lambda: mm(a, b, one, one, out_dtype=torch.bfloat16)):
        return ScaledMMFeatures(device, False, "a tensorwise E4M3 scaled matmul failed on this device")
    ra, rb = torch.ones(M, 1, device=dev), torch.ones(1, N, device=dev)
    rowwise = _try(lambda: mm(a, b, ra, rb, out_dtype=torch.bfloat16))
    fp32_rows = rowwise and _try(lambda: mm(a, b, ra, rb, out_dtype=torch.float32))
    fp32_tensor = _try(lambda: mm(a, b, one, one, out_dtype=torch.float32))
    e5m2_first = _try(lambda: mm(a.to(torch.float32).to(e5), b, one, one, out_dtype=torch.bfloat16))
    block = _try(lambda: mm(a, b, torch.ones(M, K // 128, device=dev), torch.ones(K // 128, N, device=dev),
                            out_dtype=torch.bfloat16))  # fmt: skip
    e8m0 = getattr(torch, "float8_e8m0fnu", None)
    mx = e8m0 is not None and _try(
        lambda: mm(
            a,
            b,
            torch.ones(M, K // 32, device=dev).to(e8m0),
            torch.ones(N, K // 32, device=dev).to(e8m0),
            out_dtype=torch.bfloat16,
        )  # fmt: skip
    )
    return ScaledMMFeatures(
        device, True, rowwise=rowwise, fp32_out_tensorwise=fp32_tensor, fp32_out_rowwise=fp32_rows, e5m2_first=e5m2_first, block_1x128=block, mx=mx,
        functional=hasattr(torch.nn.functional, "scaled_mm"),
    )  # fmt: skip


def unsupported_reason(device: str, *, rowwise: bool = False, e5m2_first: bool = False,
                       block: bool = False, mx: bool = False) -> str | None:  # fmt: skip
    """Why the scaled matmul cannot run a recipe needing these layouts on ``device`` (None: it can)."""
    f = features(device)
    if not f.available:
        return f.why_not
    for need, have, what in (
        (rowwise, f.rowwise, "per-row FP32 scales"),
        (e5m2_first, f.e5m2_first, "E5M2 x E4M3 operands (HYBRID gradients)"),
        (block, f.block_1x128, "1x128 / 128x128 block scales"),
        (mx, f.mx, "E8M0 (MX) block scales"),
    ):
        if need and not have:
            return f"torch {torch.__version__}'s scaled matmul on {device} refuses {what} (probed)"
        if need and (block or mx):  # the device takes them; lowbit does not call that variant yet
            return f"lowbit's torch backend does not run {what} yet (the device's scaled matmul accepts them)"
    return None


def check_dims(device: str, dims: dict[str, int]) -> str | None:
    """On CUDA every GEMM dim must be a multiple of 16; the first offending ``name=value``, or None."""
    if torch.device(device).type != "cuda":
        return None
    for name, n in dims.items():
        if n % CUDA_DIM_MULTIPLE:
            return f"{name}={n} is not a multiple of {CUDA_DIM_MULTIPLE} (cuBLASLt FP8 GEMM)"
    return None


def _row_major(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(1) == 1 and x.stride(0) >= x.shape[1] else x.contiguous()


def _col_major(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(0) == 1 and x.stride(1) >= x.shape[0] else x.t().contiguous().t()


def _scales(a: Operand, b: Operand, M: int, N: int, rows: bool) -> tuple[torch.Tensor, torch.Tensor]:
    sa, sb = a.scale_inv.float(), b.scale_inv.float()
    if not (rows or sa.dim() or sb.dim()):
        return sa, sb
    # rowwise call: both scales as vectors with unit stride (a transposed [1,N] scale is an [N,1]
    # view with stride 1 in dim 0, which the kernel refuses)
    sa = sa.reshape(-1).expand(M) if sa.numel() == 1 else sa.reshape(-1)
    sb = sb.reshape(-1).expand(N) if sb.numel() == 1 else sb.reshape(-1)
    return sa.contiguous().unsqueeze(1), sb.contiguous().unsqueeze(0)


def scaled_gemm(a: Operand, b: Operand, *, fast_accum: bool = False) -> torch.Tensor:
    """``(a.q * a.scale_inv) @ (b.q * b.scale_inv)`` as one ``torch._scaled_mm`` call (module docstring).

    ``a.q:[M,K]``, ``b.q:[K,N]`` in any memory layout; returns ``[M,N]`` in FP32 where the device
    gives FP32 output for that scaling, else BF16.
    """
    M, N = a.q.shape[0], b.q.shape[1]
    dev = a.q.device
    f = features(str(dev) if dev.type == "cpu" else f"cuda:{dev.index or 0}")
    rows = dev.type == "cpu" and f.rowwise  # the CPU's tensorwise kernel is a slow reference loop
    sa, sb = _scales(a, b, M, N, rows)
    fp32 = f.fp32_out_tensorwise if sa.dim() == 0 else f.fp32_out_rowwise
    out_dtype = torch.float32 if fp32 else torch.bfloat16
    return torch._scaled_mm(
        _row_major(a.q), _col_major(b.q), sa, sb, out_dtype=out_dtype, use_fast_accum=fast_accum
    )
