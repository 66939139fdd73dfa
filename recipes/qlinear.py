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
* BF16 GEMMs (``LinearQuantizers.bf16_gemm``, ``recipe.emulated_gemm``): where the engine
  dtype is BF16 and both operands of a GEMM are *exactly* representable in BF16, the GEMM
  runs on BF16 tensors instead (FP32 accumulation, one rounding to BF16: the same values in,
  the same rounding out, only the accumulation order differs; about 5x faster on CPU).
  Exact: MX values (element times a power of two; ``quantize_mx(for_gemm=True)`` checks the
  block exponents for values below BF16's subnormal range and falls back to FP32 there), FP8
  block / rowwise values with power-of-two scales (``recipes.fp8.blockwise.exact_in_bf16``,
  the same check on the scales) and operands left in high precision (BF16 engine values). Not
  exact, so FP32 as before: FP8 with FP32 scales (``fp8_current``, ``fp8_delayed``), NVFP4
  (E4M3 times FP32 scales), the Hadamard-transformed wgrad operands.
* The bias is added in FP32 before that rounding; ``db = sum(dY)`` in FP32.
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

``quant_matmul(a, b)`` is the same scheme for the attention matmuls
``a:[..., M, R] @ b:[..., R, N]``: forward blocks along R (``a`` axis -1,
``b`` axis -2); ``da = Q(g, -1) @ Q(b, -1)^T``; ``db = Q(a, -2)^T @ Q(g, -2)``
(microxcaling's ``matmul.py``). It returns FP32 (softmax runs in FP32).

Master weights, optimizer state and gradient reductions are DeepSpeed's and
untouched: this module only changes the values entering each GEMM.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from recipes import compiling
from recipes.config import SAME
from recipes.quantizers import RoleQuantizer

__all__ = [
    "LinearQuantizers",
    "MatmulQuantizers",
    "QuantLinear",
    "quant_linear",
    "quant_matmul",
    "set_submodule",
]

Transform = Callable[[torch.Tensor], torch.Tensor]


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
    bf16_gemm: bool = False
    """Run a GEMM in BF16 when both its operands are exact in BF16 and the engine dtype is BF16
    (``recipe.emulated_gemm``); else FP32, as always without it."""

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
        for role in ("input", "weight", "grad_output", "weight_dgrad", "input_wgrad"):
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


def _q(q: RoleQuantizer | None, x32: torch.Tensor, axis: int, training: bool) -> torch.Tensor:
    return x32 if q is None else q(x32, axis=axis, training=training)


def _operand(
    q: RoleQuantizer | None,
    hp: torch.Tensor,
    hp32: torch.Tensor | None,
    axis: int,
    training: bool,
    bf16: bool,
) -> torch.Tensor:
    """A GEMM operand from its high-precision tensor ``hp`` (engine dtype) and its float32 copy
    (``None``: made here): quantized in float32, or with ``bf16`` as BF16 where exact
    (``RoleQuantizer.for_gemm``); a role left ``None`` is ``hp`` itself under ``bf16``."""
    if q is None and bf16:
        return hp
    x32 = hp.float() if hp32 is None else hp32
    if q is None:
        return x32
    return q.for_gemm(x32, axis=axis, training=training) if bf16 else q(x32, axis=axis, training=training)


def _mm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b (+ bias)``: a BF16 GEMM (FP32 accumulation, one rounding) when both operands are
    BF16, else FP32 on the float32 values. Same values in; only accumulation order differs."""
    if a.dtype == b.dtype == torch.bfloat16:
        return torch.mm(a, b) if bias is None else torch.addmm(bias.to(torch.bfloat16), a, b)
    a, b = a.float(), b.float()
    return torch.mm(a, b) if bias is None else torch.addmm(bias.float(), a, b)


def _forward_body(x, weight, bias, qs: LinearQuantizers, training: bool) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    bf16 = qs.bf16_gemm and x.dtype == weight.dtype == torch.bfloat16
    qx = _operand(qs.input, x2, None, -1, training, bf16)
    qw = _operand(qs.weight, weight, None, -1, training, bf16)
    return _mm(qx, qw.t(), bias).to(x.dtype).view(*x.shape[:-1], weight.shape[0])


def _backward_body(x, weight, grad_y, qs: LinearQuantizers, training: bool, need_dx: bool, need_dw: bool):
    g2 = grad_y.reshape(-1, grad_y.shape[-1])
    g32 = g2.float()
    bf16 = qs.bf16_gemm and x.dtype == weight.dtype == grad_y.dtype == torch.bfloat16
    dx = dw = qg = None
    if need_dx:
        qg = _operand(qs.grad_output, g2, g32, -1, training, bf16)
        qwd = _operand(qs.weight_dgrad, weight, None, 0, training, bf16)
        dx = _mm(qg, qwd).to(x.dtype).view(x.shape)
    if need_dw:
        x2, x32, gw = x.reshape(-1, x.shape[-1]), None, g32
        if qs.wgrad_transform is not None:  # float32 from here on
            gw, x32 = qs.wgrad_transform(gw), qs.wgrad_transform(x2.float())
            g2, x2 = gw, x32
            qgw = _operand(qs.wgrad_dy, g2, gw, 0, training, bf16)
        elif qg is not None and not qs.split_dy and qs.grad_output is not None and qs.grad_output.axis_free:
            qgw = qg  # per-tensor / 2-D scale: the dgrad copy is the wgrad copy
        else:
            qgw = _operand(qs.wgrad_dy, g2, gw, 0, training, bf16)
        qxw = _operand(qs.input_wgrad, x2, x32, 0, training, bf16)
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


# ---------------------------------------------------------------------- attention matmuls


@dataclass(frozen=True, eq=False)
class MatmulQuantizers:
    """Quantizers of ``a @ b``: forward operands, the output gradient, and the backward copies."""

    a: RoleQuantizer | None = None
    b: RoleQuantizer | None = None
    grad_output: RoleQuantizer | None = None
    a_bwd: RoleQuantizer | None = None
    b_bwd: RoleQuantizer | None = None


class _QuantMatmulFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, qs: MatmulQuantizers, training: bool):  # noqa: D102
        ctx.save_for_backward(a, b)
        ctx.qs, ctx.training = qs, training
        return torch.matmul(_q(qs.a, a.float(), -1, training), _q(qs.b, b.float(), -2, training))

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        a, b = ctx.saved_tensors
        qs, training = ctx.qs, ctx.training
        g32 = g.float()
        da = db = qg = None
        if ctx.needs_input_grad[0]:
            qg = _q(qs.grad_output, g32, -1, training)
            da = torch.matmul(qg, _q(qs.b_bwd, b.float(), -1, training).transpose(-2, -1)).to(a.dtype)
        if ctx.needs_input_grad[1]:
            if qg is None or (qs.grad_output is not None and not qs.grad_output.axis_free):
                qg = _q(qs.grad_output, g32, -2, training)
            db = torch.matmul(_q(qs.a_bwd, a.float(), -2, training).transpose(-2, -1), qg).to(b.dtype)
        return da, db, None, None


def quant_matmul(
    a: torch.Tensor, b: torch.Tensor, qs: MatmulQuantizers, *, training: bool = True
) -> torch.Tensor:
    """FP32 ``a @ b`` on quantized operands, blocks along the reduction dim (module docstring)."""
    return _QuantMatmulFn.apply(a, b, qs, training)


class QuantAttentionCore(nn.Module):
    """Causal ``softmax(Q K^T / sqrt(d)) V`` with QK^T and PV on quantized operands.

    ``S = quant_matmul(Q, K^T)`` (blocks along the head dim), then in FP32:
    scale by ``1/sqrt(d)``, causal mask, softmax; ``O = quant_matmul(P, V)``
    (blocks along keys), cast to Q's dtype. Softmax, masking and scaling stay
    FP32 and differentiate through autograd; the two matmuls use
    ``_QuantMatmulFn``'s quantized backward. Replaces ``Attention.core``.
    """

    def __init__(self, qk: MatmulQuantizers, pv: MatmulQuantizers, *, name: str = ""):
        super().__init__()
        self.qk, self.pv, self.layer_name = qk, pv, name

    def forward(self, q_BHTK: torch.Tensor, k_BHTK: torch.Tensor, v_BHTK: torch.Tensor) -> torch.Tensor:
        T, K = q_BHTK.shape[-2], q_BHTK.shape[-1]
        s_BHTT = quant_matmul(q_BHTK, k_BHTK.transpose(-2, -1), self.qk, training=self.training)
        s_BHTT = s_BHTT * (1.0 / K**0.5)
        causal = torch.ones(T, T, dtype=torch.bool, device=s_BHTT.device).triu_(1)
        p_BHTT = torch.softmax(s_BHTT.masked_fill(causal, float("-inf")), dim=-1)
        return quant_matmul(p_BHTT, v_BHTK, self.pv, training=self.training).to(q_BHTK.dtype)
