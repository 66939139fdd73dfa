"""Real FP8 Linear layers (``recipe.backend=torch``): three scaled-matmul GEMMs per micro-batch.

Numerics
--------
For ``y = x W^T + b`` with ``x:[M,K]`` (tokens flattened) and ``W:[N,K]`` each GEMM runs as one
``torch._scaled_mm`` on float8 operands (``recipes.fp8.gemm.scaled_gemm``, which owns the layout
rules), the scales applied to the FP32 accumulator:

===========  ==============================  =====================  ========================
GEMM         operands (float8 codes)         scale of each          fast accumulation
===========  ==============================  =====================  ========================
forward      ``x_q  @ W_q^T``                  per tensor, or per    ``recipe.fast_accum_forward``
                                              row along K           (default on)
dgrad        ``dY_q @ Wd_q``                   along N               ``recipe.fast_accum_dgrad`` (off)
wgrad        ``dY_q^T @ x_q``                  along tokens M        ``recipe.fast_accum_wgrad`` (off)
===========  ==============================  =====================  ========================

* The codes and scales come from the *same* role quantizers as the emulated backend
  (``RoleQuantizer.cast``: ``recipes.fp8.scaling.current_scale``, ``DelayedScalingState`` with
  its amax histories and all-reduce, ``recipes.fp8.blockwise.cast_to_fp8_rowwise``), so the
  quantized operands are identical bit for bit: E4M3 for x and W, E5M2 for dY under ``HYBRID``,
  round-to-nearest-even, saturating, FP32 scales.
* Emulation computes ``(q / s) @ (q' / s')`` in FP32; the scaled matmul computes
  ``(q @ q') * (1/s) * (1/s')`` on the GPU, and on the CPU (torch 2.13) the FP32 GEMM of
  ``q * (1/s)`` and ``q' * (1/s')``. With power-of-two scales all of these are the same numbers;
  otherwise the operands differ by at most 1 ulp of FP32 per element (``q / s`` against
  ``q * (1/s)``) and the GPU result by the FP32 accumulation order. The output is rounded once to
  the input dtype (BF16 under DeepSpeed's bf16 mode); where the device's scaled matmul returns
  only BF16 (some CUDA builds with rowwise scales) the bias is added after that rounding.
* The bias is added in FP32 before the rounding; ``db = sum(dY)`` in FP32.
* Backward: per-tensor (axis-free) casts of x and dY are made once and reused by both GEMMs
  that read them: the forward's ``x_q`` is saved for wgrad (FP8, half of BF16's memory, as TE
  saves it); rowwise casts re-quantize ``x`` along tokens and ``dY`` along N and along tokens
  from the saved high-precision tensors.
* The weight cast is cached across the micro-batches of one optimizer step (TE's
  ``is_first_microbatch``): the weight and its scale do not change between optimizer steps, so
  the cached codes are the ones a fresh cast would give (delayed scaling: the amax recorded again
  would be the same value). The cache is keyed by :class:`CastEpoch`, which the recipe advances
  whenever a weight or a scale may change; evaluation forwards never use or fill it.

Master weights, optimizer state and gradient reductions are DeepSpeed's, as in emulation. FP8
weight all-gather under ZeRO-3 is out of scope: ZeRO-3 gathers the BF16 weight, then it is cast.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from recipes.fp8.gemm import Operand, scaled_gemm
from recipes.qlinear import ROLE_FIELDS, adopt_linear
from recipes.quantizers import RoleQuantizer

__all__ = ["CastEpoch", "ScaledGemms", "ScaledLinear", "scaled_linear"]


@dataclass
class CastEpoch:
    """A counter the recipe advances after every optimizer step and every scale update."""

    value: int = 0

    def advance(self) -> None:
        self.value += 1


@dataclass(eq=False)
class _WeightCache:
    epoch: int = -1
    forward: Operand | None = None
    dgrad: Operand | None = None
    hits: int = 0


@dataclass(frozen=True, eq=False)
class ScaledGemms:
    """The role quantizers (each with ``cast``) and the per-GEMM fast-accumulation choice of one layer."""

    input: RoleQuantizer
    weight: RoleQuantizer
    grad_output: RoleQuantizer
    weight_dgrad: RoleQuantizer
    input_wgrad: RoleQuantizer
    fast_accum: tuple[bool, bool, bool] = (True, False, False)
    """forward, dgrad, wgrad."""
    epoch: CastEpoch | None = None
    """Weight-cast cache key; None disables the cache."""

    def describe(self) -> dict[str, str]:
        out = {r: getattr(self, r).describe() for r in ROLE_FIELDS}
        out["gemm"] = "torch._scaled_mm, fast_accum forward/dgrad/wgrad = " + "/".join(
            "on" if f else "off" for f in self.fast_accum
        )
        return out


@dataclass(eq=False)
class _Layer:
    gemms: ScaledGemms
    cache: _WeightCache = field(default_factory=_WeightCache)

    def weight_casts(self, weight: torch.Tensor, training: bool) -> tuple[Operand, Operand | None]:
        """(forward copy, dgrad copy or None when it is the forward copy), cached within an epoch."""
        g, c = self.gemms, self.cache
        if training and g.epoch is not None and c.epoch == g.epoch.value and c.forward is not None:
            c.hits += 1
            return c.forward, c.dgrad
        fwd = g.weight.cast(weight, axis=-1, training=training)
        dgrad = None
        if not (g.weight_dgrad is g.weight and g.weight.axis_free):
            dgrad = g.weight_dgrad.cast(weight, axis=0, training=training)
        if training and g.epoch is not None:
            c.epoch, c.forward, c.dgrad = g.epoch.value, fwd, dgrad
        return fwd, dgrad


class _ScaledLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer: _Layer, training: bool):  # noqa: D102
        g = layer.gemms
        x2 = x.reshape(-1, x.shape[-1])
        xq = g.input.cast(x2, axis=-1, training=training)
        wq, wdq = layer.weight_casts(weight, training)
        y = scaled_gemm(xq, wq.t(), fast_accum=g.fast_accum[0])
        if bias is not None:
            y = y.float() + bias.float()
        reuse_x = g.input_wgrad is g.input and g.input.axis_free
        ctx.save_for_backward(weight, *((xq.q, xq.scale_inv) if reuse_x else (x,)))
        ctx.layer, ctx.training, ctx.reuse_x, ctx.wdq = layer, training, reuse_x, (wq if wdq is None else wdq)
        ctx.x_shape, ctx.x_dtype, ctx.bias_dtype = x.shape, x.dtype, None if bias is None else bias.dtype
        return y.to(x.dtype).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):  # noqa: D102
        weight, *saved = ctx.saved_tensors
        g, training = ctx.layer.gemms, ctx.training
        g2 = grad_y.reshape(-1, grad_y.shape[-1])
        dx = dw = db = gq = None
        if ctx.needs_input_grad[0]:
            gq = g.grad_output.cast(g2, axis=-1, training=training)
            dx = scaled_gemm(gq, ctx.wdq, fast_accum=g.fast_accum[1]).to(ctx.x_dtype).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            if gq is None or not g.grad_output.axis_free:
                gq = g.grad_output.cast(g2, axis=0, training=training)
            if ctx.reuse_x:
                xq = Operand(saved[0], saved[1])
            else:
                xq = g.input_wgrad.cast(saved[0].reshape(-1, saved[0].shape[-1]), axis=0, training=training)
            dw = scaled_gemm(gq.t(), xq, fast_accum=g.fast_accum[2]).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            db = g2.float().sum(0).to(ctx.bias_dtype)
        ctx.wdq = None
        return dx, dw, db, None, None


def scaled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layer: _Layer,
                  *, training: bool = True) -> torch.Tensor:  # fmt: skip
    """``F.linear`` with its three GEMMs as real FP8 scaled matmuls (module docstring)."""
    return _ScaledLinearFn.apply(x, weight, bias, layer, training)


class ScaledLinear(nn.Linear):
    """``nn.Linear`` running real FP8 GEMMs; re-uses the Linear's Parameters (see ``QuantLinear``)."""

    layer: _Layer
    layer_name: str

    @classmethod
    def from_linear(cls, linear: nn.Linear, gemms: ScaledGemms, *, name: str = "") -> ScaledLinear:
        new = adopt_linear(cls, linear, name=name)
        new.layer = _Layer(gemms)
        return new

    @property
    def gemms(self) -> ScaledGemms:
        return self.layer.gemms

    @property
    def weight_cache_hits(self) -> int:
        """Forwards that re-used the weight cast of an earlier micro-batch of the same step."""
        return self.layer.cache.hits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return scaled_linear(x, self.weight, self.bias, self.layer, training=self.training)

    def extra_repr(self) -> str:
        roles = ", ".join(f"{k}={v}" for k, v in self.gemms.describe().items())
        return f"{super().extra_repr()}, {roles}"
