"""Quantized attention matmuls with autograd: ``quant_matmul`` and ``QuantAttentionCore``.

Numerics
--------
``quant_matmul(a, b)`` is ``recipes.qlinear``'s scheme for the attention matmuls
``a:[..., M, R] @ b:[..., R, N]``: forward blocks along R (``a`` axis -1,
``b`` axis -2); ``da = Q(g, -1) @ Q(b, -1)^T``; ``db = Q(a, -2)^T @ Q(g, -2)``
(microxcaling's ``matmul.py``). Operands are quantize-dequantized in FP32 and the
matmuls run in FP32 (no BF16 or code GEMMs here); it returns FP32 (softmax runs
in FP32). The backward re-quantizes from the high-precision saved ``a`` and ``b``;
an axis-free ``grad_output`` quantizer's copy serves both backward matmuls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from recipes.quantizers import RoleQuantizer

__all__ = ["MatmulQuantizers", "QuantAttentionCore", "quant_matmul"]


def _q(q: RoleQuantizer | None, x32: torch.Tensor, axis: int, training: bool) -> torch.Tensor:
    return x32 if q is None else q(x32, axis=axis, training=training)


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
