"""Layer probes: the numerics statistics of one converted Linear, computed the way its recipe
quantizes it, without touching training.

``probe_for(module)`` gives the probe of a converted layer (``QuantLinear`` of the emulated
backend, ``ScaledLinear`` of the torch backend; ``None`` for anything else: a BF16 layer, a
Transformer Engine module). ``train.telemetry`` calls it on stat steps with the operands of each
micro-batch's GEMMs and only adds up, all-reduces and logs what it returns; every number here is
an additive sum, so micro-batches and ranks combine by addition (one all-reduce) and ``finish``
turns the reduced sums into the logged values.

Numerics
--------
Operands: exactly those the layer's GEMMs see (``recipes.qlinear``): ``x`` flattened to
``[M, K]`` and ``W`` ``[N, K]`` upcast to FP32 from the engine dtype, the output gradient
``dY`` ``[M, N]`` upcast. Quantized copies come from the layer's own role quantizers with
the GEMM's block axes (forward along K; dgrad ``dY`` along N and ``W`` along axis 0; wgrad
both along tokens, after NVFP4's Hadamard transform when the recipe applies it), called with
``training=False``: delayed scaling quantizes with this step's scale and records nothing;
stochastic rounding draws from a probe-private generator (seed :data:`PROBE_SR_SEED`), so the
training generator never advances and a run's losses do not depend on ``stats.every``. An
axis-free dY quantizer (per-tensor, 2-D) quantizes dY once for both backward GEMMs, as training does.

* ``gemm/<fwd|dgrad|wgrad>/...`` (``recipes.gemmstats.gemm_error_sums``): the FP32 GEMM of the
  quantized operands against the FP32 GEMM of the high-precision ones (with the Hadamard
  transform, of the transformed ones: equal to the untransformed product up to FP32 rounding),
  as ``sqnr_db`` and ``rel_error``, and ``<role>_sqnr_db`` with only that operand quantized
  (roles named as in ``RecipeConfig``: forward ``input``, ``weight``; dgrad ``grad_output``,
  ``weight_dgrad``; wgrad ``grad_output``, ``input_wgrad``, and ``grad_output_wgrad`` for dY
  where the recipe gives its wgrad copy its own format; a role kept in high precision has
  no key). It measures the operands' quantization, not the output's rounding to the engine
  dtype, nor a real FP8 kernel's accumulation (``train.parity`` compares backends).
* ``scales/<role>/...`` (``recipes.blockstats``): block-scale statistics of every block-scaled
  role (MX, NVFP4 1x16, FP8 1x``block_size``) on its GEMM's layout (``grad_output`` on dgrad's,
  along N), and ``log2_scale_hist``. 2-D weight tiles (NVFP4 16x16, FP8 ``block_size`` squared,
  ``recipe.weight_2d_blocks``) are the same tiles for ``weight`` and ``weight_dgrad``, so the two
  roles log equal values. Per-tensor and rowwise FP8 have no blocks.
* ``grad`` sums (``recipes.numerics.tensor_sums`` keys) of dY *as the recipe quantizes it*
  where a ``FormatSpec`` cannot say it: delayed scaling (the scale of this step, overflow
  counted against it), rowwise and block FP8 (their own scales; overflow 0 by construction, the
  scales come from each slice's amax). Other kinds return ``None`` and the collector keeps the
  ``FormatSpec`` path (exact for MX, NVFP4 with nearest rounding and current FP8).

Rank normalisation: each of W ranks differentiates its own mean loss, so its dY is W times
the gradient of the global mean loss. SQNR, relative errors and block fractions are unchanged
by that factor for scale-equivariant quantizers (MX, power-of-two scales: exactly, unless a
value crosses the format's range; NVFP4 and current FP8 scale with amax). The dY scale
histogram is shifted by ``-log2(W)`` for MX and FP8 blocks (their scales follow dY's amax);
NVFP4 block scales are relative to the tensor scale and are not shifted.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from recipes.blockstats import (
    FP8_GRID,
    MX_GRID,
    NVFP4_GRID,
    ScaleGrid,
    block_stats_from_sums,
    fp8_block_sums,
    mx_block_sums,
    nvfp4_block_sums,
    scale_histogram,
)
from recipes.gemmstats import gemm_error_sums, gemm_errors_from_sums
from recipes.numerics import overflow_bound, overflows, signal_noise_sums, tensor_sums
from recipes.qlinear import ROLE_FIELDS, QuantLinear
from recipes.quantizers import (
    FP8BlockRole,
    FP8DelayedRole,
    FP8RowwiseRole,
    MXRole,
    NVFP4Role,
    RoleQuantizer,
    SRGenerator,
)
from recipes.scaled_linear import ScaledLinear

__all__ = ["GEMM_ROLES", "PROBE_SR_SEED", "LayerProbe", "probe_for"]

#: seed of the probes' own stochastic-rounding generator (never the training one)
PROBE_SR_SEED = 0x5EED5
#: each GEMM's two operand roles (``a @ b``)
GEMM_ROLES = {"fwd": ("input", "weight"), "dgrad": ("grad_output", "weight_dgrad"),
              "wgrad": ("grad_output", "input_wgrad")}  # fmt: skip
_GEMM_SUMS = ("ref_sq", "err_sq", "a_err_sq", "b_err_sq")


def _private(role: RoleQuantizer | None, sr: SRGenerator) -> RoleQuantizer | None:
    """``role`` with stochastic rounding from ``sr`` (a copy), or ``role`` itself."""
    if role is not None and getattr(role, "sr", None) is not None:
        return dataclasses.replace(role, sr=sr)  # type: ignore[type-var]
    return role


def _block_sums(
    role: RoleQuantizer | None, x32: torch.Tensor, axis: int
) -> tuple[dict, ScaleGrid, bool] | None:
    """(counts, grid, dY histogram shifts with log2 W) of a block-scaled role, else None."""
    if isinstance(role, MXRole):
        kw = dict(fmt=role.fmt, block_size=role.block_size, scale_rule=role.scale_rule)
        return mx_block_sums(x32, axis=axis, **kw), MX_GRID, True  # type: ignore[arg-type]
    if isinstance(role, NVFP4Role):
        return nvfp4_block_sums(x32, axis=axis, two_d=role.two_d, order=role.order), NVFP4_GRID, False
    if isinstance(role, FP8BlockRole):
        kw = dict(fmt=role.fmt, block_size=role.block_size, power_2_scales=role.power_2_scales,
                  amax_epsilon=role.amax_epsilon, two_d=role.two_d)  # fmt: skip
        return fp8_block_sums(x32, axis=axis, **kw), FP8_GRID, True
    return None


@dataclass(eq=False)
class LayerProbe:
    """The probe of one layer: its role quantizers (private stochastic rounding) and transform."""

    input: RoleQuantizer | None = None
    weight: RoleQuantizer | None = None
    grad_output: RoleQuantizer | None = None
    weight_dgrad: RoleQuantizer | None = None
    input_wgrad: RoleQuantizer | None = None
    wgrad_transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    grad_output_wgrad: RoleQuantizer | None = None
    """dY's own wgrad quantizer where the recipe splits dY (``split_dy``), else unused."""
    split_dy: bool = False
    _grids: dict[str, tuple[ScaleGrid, bool]] = dataclasses.field(default_factory=dict)

    def _q(self, role: str, x32: torch.Tensor, axis: int) -> torch.Tensor:
        q = getattr(self, role)
        return x32 if q is None else q(x32, axis=axis, training=False)

    def roles_of(self, gemm: str) -> tuple[str, str]:
        """``gemm``'s two operand roles: :data:`GEMM_ROLES`, with wgrad's dY named
        ``grad_output_wgrad`` where the recipe quantizes it on its own."""
        if gemm == "wgrad" and self.split_dy:
            return ("grad_output_wgrad", "input_wgrad")
        return GEMM_ROLES[gemm]

    def _gemm(self, out: dict, gemm: str, a, b, qa, qb) -> None:
        ra, rb = self.roles_of(gemm)
        if getattr(self, ra) is None and getattr(self, rb) is None:
            return
        for k, v in gemm_error_sums(a, b, qa, qb).items():
            out[f"gemm/{gemm}/{k}"] = v

    def _scales(self, out: dict, role: str, x32: torch.Tensor, axis: int) -> None:
        found = _block_sums(getattr(self, role), x32, axis)
        if found is None:
            return
        counts, grid, shifts = found
        self._grids[role] = (grid, shifts and role.startswith("grad_output"))
        for k, v in counts.items():
            out[f"scales/{role}/{k}"] = v

    def forward_sums(self, x32: torch.Tensor, w32: torch.Tensor, *, gemm: bool, scales: bool) -> dict:
        """Sums of the forward GEMM ``x [M,K] @ W^T``."""
        out: dict[str, torch.Tensor] = {}
        if gemm:
            self._gemm(out, "fwd", x32, w32.t(), self._q("input", x32, -1), self._q("weight", w32, -1).t())
        if scales:
            self._scales(out, "input", x32, -1)
            self._scales(out, "weight", w32, -1)
        return out

    def backward_sums(
        self, g32: torch.Tensor, x32: torch.Tensor, w32: torch.Tensor, *, gemm: bool, scales: bool
    ) -> dict:
        """Sums of dgrad ``dY [M,N] @ W`` and wgrad ``dY^T @ x``."""
        out: dict[str, torch.Tensor] = {}
        if gemm:
            qg = self._q("grad_output", g32, -1)
            self._gemm(out, "dgrad", g32, w32, qg, self._q("weight_dgrad", w32, 0))
            gw, xw = g32, x32
            if self.wgrad_transform is not None:
                gw, xw = self.wgrad_transform(g32), self.wgrad_transform(x32)
            dy_w = self.roles_of("wgrad")[0]
            reuse = (
                dy_w == "grad_output"
                and self.grad_output is not None
                and self.grad_output.axis_free
                and self.wgrad_transform is None
            )
            qgw = qg if reuse else self._q(dy_w, gw, 0)
            self._gemm(out, "wgrad", gw.t(), xw, qgw.t(), self._q("input_wgrad", xw, 0))
        if scales:
            self._scales(out, "grad_output", g32, -1)
            self._scales(out, "weight_dgrad", w32, 0)
            t = self.wgrad_transform or (lambda v: v)
            if self.split_dy:
                self._scales(out, "grad_output_wgrad", t(g32), 0)
            self._scales(out, "input_wgrad", t(x32), 0)
        return out

    def grad_sums(self, g32: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """``tensor_sums`` keys of dY as the recipe quantizes it (dgrad layout), where a
        ``FormatSpec`` cannot say it (module docstring); ``None`` otherwise."""
        role = self.grad_output
        if not isinstance(role, (FP8DelayedRole, FP8RowwiseRole, FP8BlockRole)):
            return None
        sums = tensor_sums(g32)
        q = role(g32, axis=-1, training=False)
        finite = torch.isfinite(g32)
        nonzero = finite & (g32 != 0)
        sums["sum_sq"], sums["err_sq"] = signal_noise_sums(g32, q)
        sums["num_nonzero"], sums["num_underflow"] = nonzero.sum(), (nonzero & (q == 0)).sum()
        sums["num_overflow"] = torch.zeros((), dtype=torch.int64, device=g32.device)
        if isinstance(role, FP8DelayedRole):  # against this step's delayed scale
            f = role.state.format(role.name)
            ulp = 2.0 ** (math.floor(math.log2(f.max)) - f.mantissa_bits)
            v = g32.abs() * role.state.scale(role.name)
            sums["num_overflow"] = (overflows(v, overflow_bound(f.max, ulp)) & finite).sum()
        return sums

    def finish(self, sums: dict[str, Any], *, world_size: int) -> dict[str, Any]:
        """Logged values (0-dim tensors; histograms as ``scale_histogram`` dicts) from reduced sums."""
        out: dict[str, Any] = {}
        for gemm in GEMM_ROLES:
            ra, rb = self.roles_of(gemm)
            if f"gemm/{gemm}/ref_sq" not in sums:
                continue
            e = gemm_errors_from_sums({k: sums[f"gemm/{gemm}/{k}"] for k in _GEMM_SUMS})
            out[f"gemm/{gemm}/sqnr_db"], out[f"gemm/{gemm}/rel_error"] = e["sqnr_db"], e["rel_error"]
            for role, key in ((ra, "a_sqnr_db"), (rb, "b_sqnr_db")):
                if getattr(self, role) is not None:
                    out[f"gemm/{gemm}/{role}_sqnr_db"] = e[key]
        for role, (grid, shifts) in self._grids.items():
            p = f"scales/{role}/"
            counts = {k[len(p) :]: v for k, v in sums.items() if k.startswith(p)}
            if not counts:
                continue
            for k, v in block_stats_from_sums(counts).items():
                out[p + k] = v
            shift = -math.log2(world_size) if shifts else 0.0
            out[p + "log2_scale_hist"] = scale_histogram(counts["scale_hist"].tolist(), grid, shift=shift)
        return out


def probe_for(module: nn.Module) -> LayerProbe | None:
    """The probe of a converted Linear (module docstring); ``None`` when it quantizes nothing."""
    qs: Any
    if isinstance(module, QuantLinear):
        qs, transform = module.quantizers, module.quantizers.wgrad_transform
    elif isinstance(module, ScaledLinear):
        qs, transform = module.gemms, None
    else:
        return None
    sr = SRGenerator(seed=PROBE_SR_SEED)
    roles = {r: _private(getattr(qs, r), sr) for r in ROLE_FIELDS}
    split = bool(getattr(qs, "split_dy", False))
    if split:
        roles["grad_output_wgrad"] = _private(qs.wgrad_dy, sr)
    if all(v is None for v in roles.values()):
        return None
    return LayerProbe(
        grad_output_wgrad=roles.get("grad_output_wgrad"),
        split_dy=split,
        input=roles["input"],
        weight=roles["weight"],
        grad_output=roles["grad_output"],
        weight_dgrad=roles["weight_dgrad"],
        input_wgrad=roles["input_wgrad"],
        wgrad_transform=transform,
    )
