"""Quantized GEMMs with autograd: ``QuantLinear`` (drop-in for ``nn.Linear``) and ``quant_matmul``.

Numerics
--------
For ``y = x W^T + b`` with ``x:[..., K]`` flattened to ``[M, K]`` (M = batch x
sequence tokens) and ``W:[N, K]``, each GEMM operand is quantized by its own
role quantizer (``recipes.quantizers``), blocks running along that GEMM's
reduction dim:

===========  ==========================================  =======================
GEMM         operands                                    blocks along
===========  ==========================================  =======================
forward      ``y  = Q_in(x) @ Q_w(W)^T``                   K (axis -1 of both)
dgrad        ``dx = Q_g(dY) @ Q_wd(W)``                    N (dY axis -1, W axis 0)
wgrad        ``dW = Q_gw(dY)^T @ Q_xw(x)``                 tokens M (axis 0 of both)
===========  ==========================================  =======================

* Inputs arrive in the engine dtype (BF16 under DeepSpeed's bf16 mode). Each
  operand is upcast to FP32, quantize-dequantized in FP32, and the GEMM runs
  on the dequantized FP32 values (FP32 accumulation, as MX and block-scaled FP8 tensor-core
  GEMMs and TE's dgrad / wgrad accumulate; TE's per-tensor FP8 forward on Hopper accumulates in
  reduced precision, not emulated); the result is rounded once to the input dtype.
* BF16 GEMMs (``LinearQuantizers.gemm``, ``recipe.emulated_gemm=bf16``): where the engine
  dtype is BF16 and both operands of a GEMM are *exactly* representable in BF16, the GEMM
  runs on BF16 tensors instead (FP32 accumulation, one rounding to BF16: the same values in,
  the same rounding out, only the accumulation order differs; about 5x faster on CPU).
  Exact: MX values (element times a power of two; ``quantize_mx(for_gemm=True)`` checks the
  block exponents for values below BF16's subnormal range and falls back to FP32 there), FP8
  block / rowwise values with power-of-two scales (``recipes.fp8.blockwise.exact_in_bf16``,
  the same check on the scales) and operands left in high precision (BF16 engine values).
* Code GEMMs (``LinearQuantizers.gemm``, ``recipe.emulated_gemm=codes``, the default):
  per-tensor FP8 (``fp8_current``, ``fp8_delayed``: FP32 scales) and NVFP4 (E4M3 block scales
  times an FP32 tensor scale) are not exact in BF16, but their *codes* are
  (``RoleQuantizer.gemm_codes``): the FP8 codes, and NVFP4's E2M1 elements times their E4M3
  block scales. The GEMM runs on the codes in BF16 with FP32 accumulation and multiplies the
  FP32 accumulator by the product of the two per-tensor scales (``1/scale``; NVFP4's ``s_t``),
  as torch's scaled matmul, cuBLASLt and TE's NVFP4 GEMM (``alpha``) do, then rounds once to
  BF16. Where the device has no BF16 GEMM with an FP32 output (torch's CPU ``mm`` has none;
  :func:`fp32_output_mm` probes it) the BF16 GEMM rounds its output to BF16 before the scale:
  one more rounding, at most 1 BF16 ulp (on 27 % of the outputs of a random 512x1024x512
  E4M3 GEMM; tested); with a bias (lowbit's models have none) such a device runs the GEMM on
  the same codes in FP32 instead. Against the FP32 path (an FP32 GEMM on ``code * (1/scale)``
  values, each rounded to FP32) only that output rounding and accumulation order differ; with
  power-of-two scales the extra rounding is exact. NVFP4's Hadamard-transformed wgrad operands
  are code GEMMs too (the transform precedes quantization). With ``emulated_gemm=bf16`` these
  kinds keep FP32 GEMMs, bit for bit as with ``fp32``.
* The bias is added in FP32 before the final rounding; ``db = sum(dY)`` in FP32.
* The backward pass re-quantizes from the *high-precision* saved ``x`` and
  ``W`` (as microxcaling and TE do), never from the forward's quantized copies.
  A role left ``None`` keeps that operand in FP32 (upcast from the engine dtype).
* ``Q_g`` and ``Q_gw`` are one quantizer unless ``grad_output_wgrad`` gives dY's wgrad copy
  its own (``recipe.grad_output_{dgrad,wgrad}_format``: one backward GEMM quantized, the
  other not). Axis-free quantizers (per-tensor FP8, 2-D tiles) shared by both quantize dY
  once for both backward GEMMs.
* With every role ``None`` the module calls ``F.linear`` in the engine dtype:
  bitwise identical to ``nn.Linear``.
* Optional ``wgrad_transform`` (NVFP4's random Hadamard transform) is applied to
  both wgrad operands along tokens before quantization.
* Speed: with ``LinearQuantizers.compile`` and pure roles, the forward body and
  the backward body (upcasts, quantizers, GEMMs, downcasts) each run as one
  ``torch.compile`` graph per layer shape; they are the same Python functions
  as the eager path, so the bits are the same (tested).

The attention matmuls QK^T and PV use the same scheme (``recipes.qattention``).

Master weights, optimizer state and gradient reductions are DeepSpeed's and
untouched: this module only changes the values entering each GEMM.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from recipes import compiling
from recipes.config import SAME
from recipes.quantizers import Codes, RoleQuantizer

__all__ = [
    "LinearQuantizers",
    "QuantLinear",
    "ROLE_FIELDS",
    "fp32_output_mm",
    "quant_linear",
    "set_submodule",
]

Transform = Callable[[torch.Tensor], torch.Tensor]
#: the role fields of a converted Linear's quantizers (``LinearQuantizers``, ``ScaledGemms``), in
#: GEMM order; dY's separate wgrad copy (``grad_output_wgrad``) is not one of them
ROLE_FIELDS = ("input", "weight", "grad_output", "weight_dgrad", "input_wgrad")


@dataclass(frozen=True, eq=False)
class LinearQuantizers:
    """Per-role quantizers of one Linear; ``None`` keeps that operand in high precision.

    ``compile``: run the whole forward and backward bodies (upcasts, quantizers,
    GEMMs, downcasts) under ``torch.compile`` as two graphs. Only for *pure*
    roles (no state, no random numbers: see ``RoleQuantizer.pure``) and no
    ``wgrad_transform``; the bodies are the same Python functions, so the
    bits are the same as eager.
    """

    input: RoleQuantizer | None = None
    weight: RoleQuantizer | None = None
    grad_output: RoleQuantizer | None = None
    weight_dgrad: RoleQuantizer | None = None
    input_wgrad: RoleQuantizer | None = None
    wgrad_transform: Transform | None = None
    compile: bool = False
    grad_output_wgrad: RoleQuantizer | None | str = SAME
    """dY's quantizer in the wgrad GEMM; ``"same"`` (default): ``grad_output``, which then
    quantizes dY for both backward GEMMs (``grad_output`` is the dgrad copy either way)."""
    gemm: str = "fp32"
    """The GEMMs under a BF16 engine (``recipe.emulated_gemm``, resolved; module docstring):
    ``fp32`` (every GEMM on FP32 values), ``bf16`` (in BF16 where both operands are exact there)
    or ``codes`` (``bf16``, and per-tensor scaled roles as BF16 codes, the scales on the output)."""

    @property
    def split_dy(self) -> bool:
        """dY has its own wgrad quantizer (``recipe.grad_output_{dgrad,wgrad}_format`` differ)."""
        return not isinstance(self.grad_output_wgrad, str)

    @property
    def wgrad_dy(self) -> RoleQuantizer | None:
        """The quantizer of dY in the wgrad GEMM."""
        g = self.grad_output_wgrad
        return self.grad_output if isinstance(g, str) else g

    @property
    def roles(self) -> tuple[RoleQuantizer | None, ...]:
        extra = (self.wgrad_dy,) if self.split_dy else ()
        return (self.input, self.weight, self.grad_output, self.weight_dgrad, self.input_wgrad, *extra)

    @property
    def active(self) -> bool:
        return any(q is not None for q in self.roles)

    @property
    def pure(self) -> bool:
        """Every role is a pure function of its input (can be traced into one compiled graph)."""
        return self.wgrad_transform is None and all(q is None or q.pure for q in self.roles)

    def describe(self) -> dict[str, str]:
        out = {}
        for role in ROLE_FIELDS:
            q = getattr(self, role)
            out[role] = "high precision" if q is None else q.describe()
        if self.split_dy:
            out["grad_output"] += " (dgrad)"
            out["grad_output_wgrad"] = "high precision" if self.wgrad_dy is None else self.wgrad_dy.describe()
        if self.wgrad_transform is not None:
            out["wgrad_transform"] = "random 16x16 Hadamard along tokens"
        return out

    def compiled_bodies(self) -> LinearQuantizers:
        """These pure roles for ``compile``: the bodies are compiled whole, so the roles inside
        run uncompiled (a compiled body traces them)."""
        eager = [None if q is None else dataclasses.replace(q, compile=False) for q in self.roles]  # type: ignore[type-var]
        return dataclasses.replace(self, input=eager[0], weight=eager[1], grad_output=eager[2], weight_dgrad=eager[3],
                                   input_wgrad=eager[4], grad_output_wgrad=eager[5] if self.split_dy else SAME,
                                   compile=True)  # fmt: skip


def _operand(
    q: RoleQuantizer | None,
    hp: torch.Tensor,
    hp32: torch.Tensor | None,
    axis: int,
    training: bool,
    gemm: str,
) -> torch.Tensor | Codes:
    """A GEMM operand from its high-precision tensor ``hp`` (engine dtype) and its float32 copy
    (``None``: made here), for ``gemm`` (:func:`_gemm_mode`): ``fp32``: quantized in float32;
    ``bf16``: as BF16 where exact (``RoleQuantizer.for_gemm``); ``codes``: also per-tensor
    scaled codes (``RoleQuantizer.gemm_codes``). A role left ``None`` is ``hp`` itself unless fp32."""
    if q is None and gemm != "fp32":
        return hp
    x32 = hp.float() if hp32 is None else hp32
    if q is None:
        return x32
    if gemm == "codes" and (codes := q.gemm_codes(x32, axis=axis, training=training)) is not None:
        return codes
    return (
        q.for_gemm(x32, axis=axis, training=training)
        if gemm != "fp32"
        else q(x32, axis=axis, training=training)
    )


def _gemm_mode(qs: LinearQuantizers, *tensors: torch.Tensor) -> str:
    """``qs.gemm`` under a BF16 engine (every tensor BF16), else ``fp32``."""
    return qs.gemm if all(t.dtype == torch.bfloat16 for t in tensors) else "fp32"


@functools.cache
def fp32_output_mm(device_type: str) -> bool:
    """Whether ``torch.mm(bf16, bf16, out_dtype=torch.float32)`` runs on this device type (CUDA in
    recent torch; not torch 2.13's CPU), probed once on a 1x1 problem, outside any dispatch mode
    (op counters, tracers) the first GEMM may run under."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        one = torch.ones(1, 1, dtype=torch.bfloat16, device=device_type)
        try:
            return torch.mm(one, one, out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, TypeError, NotImplementedError):
            return False


def _mm(a: torch.Tensor | Codes, b: torch.Tensor | Codes, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b (+ bias)``: a BF16 GEMM (FP32 accumulation, one rounding) when both operands are
    BF16, else FP32 on the float32 values. Same values in; only accumulation order differs.
    A :class:`Codes` operand: :func:`_codes_mm`."""
    if isinstance(a, Codes) or isinstance(b, Codes):
        return _codes_mm(a, b, bias)
    if a.dtype == b.dtype == torch.bfloat16:
        return torch.mm(a, b) if bias is None else torch.addmm(bias.to(torch.bfloat16), a, b)
    a, b = a.float(), b.float()
    return torch.mm(a, b) if bias is None else torch.addmm(bias.float(), a, b)


def _codes_mm(a: torch.Tensor | Codes, b: torch.Tensor | Codes, bias: torch.Tensor | None) -> torch.Tensor:
    """The GEMM on the operands' values (a :class:`Codes` operand's BF16 codes), its FP32 output
    times the product of the scales, then the bias (module docstring)."""
    scales = [op.scale for op in (a, b) if isinstance(op, Codes)]
    a, b = (op.values if isinstance(op, Codes) else op for op in (a, b))
    fp32_out = fp32_output_mm(a.device.type)
    if a.dtype == b.dtype == torch.bfloat16 and (fp32_out or bias is None):
        y = torch.mm(a, b, out_dtype=torch.float32) if fp32_out else torch.mm(a, b).float()
    else:  # a bias added to a BF16-rounded product would round twice: FP32 on the same values
        y = torch.mm(a.float(), b.float())
    y = y.mul_(scales[0] if len(scales) == 1 else scales[0] * scales[1])
    return y if bias is None else y.add_(bias.float())


def _forward_body(x, weight, bias, qs: LinearQuantizers, training: bool) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    gemm = _gemm_mode(qs, x, weight)
    qx = _operand(qs.input, x2, None, -1, training, gemm)
    qw = _operand(qs.weight, weight, None, -1, training, gemm)
    return _mm(qx, qw.t(), bias).to(x.dtype).view(*x.shape[:-1], weight.shape[0])


def _backward_body(x, weight, grad_y, qs: LinearQuantizers, training: bool, need_dx: bool, need_dw: bool):
    g2 = grad_y.reshape(-1, grad_y.shape[-1])
    g32 = g2.float()
    gemm = _gemm_mode(qs, x, weight, grad_y)
    dx = dw = qg = None
    if need_dx:
        qg = _operand(qs.grad_output, g2, g32, -1, training, gemm)
        qwd = _operand(qs.weight_dgrad, weight, None, 0, training, gemm)
        dx = _mm(qg, qwd).to(x.dtype).view(x.shape)
    if need_dw:
        x2, x32, gw = x.reshape(-1, x.shape[-1]), None, g32
        if qs.wgrad_transform is not None:  # float32 from here on
            gw, x32 = qs.wgrad_transform(gw), qs.wgrad_transform(x2.float())
            g2, x2 = gw, x32
            qgw = _operand(qs.wgrad_dy, g2, gw, 0, training, gemm)
        elif qg is not None and not qs.split_dy and qs.grad_output is not None and qs.grad_output.axis_free:
            qgw = qg  # per-tensor / 2-D scale: the dgrad copy is the wgrad copy
        else:
            qgw = _operand(qs.wgrad_dy, g2, gw, 0, training, gemm)
        qxw = _operand(qs.input_wgrad, x2, x32, 0, training, gemm)
        dw = _mm(qgw.t(), qxw).to(weight.dtype)
    return dx, dw, g32


def _run(body: Callable[..., Any], qs: LinearQuantizers, *args: Any) -> Any:
    """Call the forward or backward body, compiled when ``qs.compile`` and ``qs.pure``."""
    return compiling.call(body, qs.compile and qs.pure, *args)


class _QuantLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, qs: LinearQuantizers, training: bool):  # noqa: D102
        ctx.save_for_backward(x, weight)
        ctx.qs, ctx.training, ctx.bias_dtype = qs, training, None if bias is None else bias.dtype
        return _run(_forward_body, qs, x, weight, bias, qs, training)

    @staticmethod
    def backward(ctx, grad_y):  # noqa: D102
        x, weight = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx, dw, g32 = _run(_backward_body, ctx.qs, x, weight, grad_y, ctx.qs, ctx.training, need_dx, need_dw)
        db = None
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            db = g32.sum(0).to(ctx.bias_dtype)
        return dx, dw, db, None, None


def quant_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    qs: LinearQuantizers,
    *,
    training: bool = True,
) -> torch.Tensor:
    """``F.linear`` with per-role quantized operands (module docstring)."""
    if not qs.active:
        return F.linear(x, weight, bias)
    return _QuantLinearFn.apply(x, weight, bias, qs, training)


L = TypeVar("L", bound=nn.Linear)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace ``model``'s submodule ``name`` (dotted) by ``module``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def adopt_linear(cls: type[L], linear: nn.Linear, *, name: str) -> L:
    """A ``cls`` (an ``nn.Linear`` subclass) holding ``linear``'s own Parameter objects (no
    re-initialisation, no copy) and ``layer_name = name``; the caller sets the rest."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.in_features, new.out_features = linear.in_features, linear.out_features
    new.weight = linear.weight
    new.bias = linear.bias
    new.layer_name = name  # type: ignore[assignment]
    return new


class QuantLinear(nn.Linear):
    """``nn.Linear`` whose GEMMs quantize their operands by role; same ``weight``/``bias`` parameters.

    Build it with :meth:`from_linear`, which re-uses the existing Parameter
    objects (no re-initialisation, no copy), so state-dict keys, initial
    weights, optimizer parameter groups and ZeRO partitioning are unchanged.
    """

    quantizers: LinearQuantizers
    layer_name: str

    @classmethod
    def from_linear(cls, linear: nn.Linear, quantizers: LinearQuantizers, *, name: str = "") -> QuantLinear:
        new = adopt_linear(cls, linear, name=name)
        new.quantizers = quantizers
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_linear(x, self.weight, self.bias, self.quantizers, training=self.training)

    def extra_repr(self) -> str:
        roles = ", ".join(f"{k}={v}" for k, v in self.quantizers.describe().items())
        return f"{super().extra_repr()}, {roles}"
