"""Per-layer numerics statistics on stat steps (``stats.every``): the thin collector.

What it measures, per stat layer (the recipe's converted Linear layers, or every
Linear when it converts none), with the pure functions of ``recipes/numerics.py``:

* ``grad/<layer>/...`` the layer's *output gradient* dY, the operand the recipe
  quantizes in both backward GEMMs: ``norm``, ``absmax``, ``zero_frac``,
  ``nonfinite_frac`` and, against the recipe's gradient format (blocks along the
  output features, as in the dgrad GEMM), ``underflow_frac``, ``overflow_frac``,
  ``sqnr_db``, ``rel_error``. Summed over the step's micro-batches and over
  ranks (sufficient statistics, one all-reduce), so the values describe the
  whole global batch. The quantization statistics use dY exactly as the
  recipe sees it; ``norm`` and ``absmax`` are divided by the world size W,
  because each rank differentiates the mean loss of its own 1/W of the batch,
  so they equal the gradient of the global mean loss whatever W is.
* ``grad/<layer>/weight_norm`` the norm of the reduced weight gradient.
* ``act/<layer>/absmax`` the layer input's absmax; ``weight/<layer>/absmax`` the
  FP32 master weight's absmax.
* ``shadow/<format>/<layer>/{underflow_frac,overflow_frac,sqnr_db}`` the same dY
  quantized to each ``stats.shadow_formats`` entry, without touching training, and
  ``shadow/<format>/<layer>/act_{underflow_frac,overflow_frac,sqnr_db}`` for the
  layer's input activation (blocks along the reduction dim, as in the forward GEMM).
* ``grad/underflow_frac_hist`` the per-layer underflow fractions (a W&B histogram).

Cost: hooks exist only during stat steps; everything stays on the device until
one host sync when the step's values are logged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from recipes.numerics import REDUCE_OPS, FormatSpec, stats_from_sums, tensor_sums


def _merge(acc: dict[str, torch.Tensor] | None, new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if acc is None:
        return new
    return {k: torch.maximum(acc[k], new[k]) if REDUCE_OPS.get(k) == "max" else acc[k] + new[k] for k in new}


class GradStatsCollector:
    def __init__(
        self,
        model: nn.Module,
        layers: list[str],
        *,
        spec: FormatSpec | None,
        shadow: dict[str, FormatSpec] | None = None,
        world_size: int = 1,
    ):
        self.model = model
        self.world_size = world_size
        self.layers = layers
        self.spec = spec
        self.shadow = shadow or {}
        self._handles: list[Any] = []
        self._grad: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        self._act: dict[str, torch.Tensor] = {}

    # hooks -------------------------------------------------------------
    def arm(self) -> None:
        self._grad, self._act = {}, {}
        for name in self.layers:
            self._handles.append(
                self.model.get_submodule(name).register_forward_hook(self._forward_hook(name))
            )

    def disarm(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _forward_hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0].detach()
            amax = x.abs().amax().float()
            self._act[name] = amax if name not in self._act else torch.maximum(self._act[name], amax)
            if torch.is_grad_enabled():  # not the no-grad first pass of activation checkpointing
                for fmt, spec in self.shadow.items():
                    key = (name, f"act:{fmt}")
                    self._grad[key] = _merge(self._grad.get(key), tensor_sums(x, spec, axis=-1))
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(self._grad_hook(name))

        return hook

    def _grad_hook(self, name: str):
        def hook(grad: torch.Tensor) -> None:
            g = grad.detach()
            self._grad[(name, "")] = _merge(self._grad.get((name, "")), tensor_sums(g, self.spec, axis=-1))
            for fmt, spec in self.shadow.items():
                self._grad[(name, fmt)] = _merge(self._grad.get((name, fmt)), tensor_sums(g, spec, axis=-1))

        return hook

    # results -----------------------------------------------------------
    def reduce(self, *, distributed: bool) -> dict[str, Any]:
        """All-reduce the step's sums across ranks and turn them into logged values (one host sync)."""
        keys = sorted(self._grad)
        if not keys:
            return {}
        sum_names = sorted({k for sums in self._grad.values() for k in sums if REDUCE_OPS[k] == "sum"})
        dev = next(iter(self._grad.values()))["num_elements"].device
        sums = torch.stack(
            [
                torch.stack([self._grad[k].get(n, torch.zeros((), device=dev)).double() for n in sum_names])
                for k in keys
            ]
        )
        maxes = torch.stack(
            [self._grad[k]["absmax"].float() for k in keys]
            + [self._act[n] for n in self.layers if n in self._act]
        )
        if distributed:
            dist.all_reduce(sums)
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX)
        out: dict[str, torch.Tensor] = {}
        for i, (layer, fmt) in enumerate(keys):
            reduced = {n: sums[i, j] for j, n in enumerate(sum_names) if n in self._grad[(layer, fmt)]}
            reduced["absmax"] = maxes[i]
            if not fmt.startswith("act:"):  # dY: undo the per-rank 1/W share of the batch (docstring)
                reduced["sum_sq"] = reduced["sum_sq"] / self.world_size**2
                if "err_sq" in reduced:
                    reduced["err_sq"] = reduced["err_sq"] / self.world_size**2
                reduced["absmax"] = maxes[i] / self.world_size
            stats = stats_from_sums(reduced)
            if fmt.startswith("act:"):
                for k in ("underflow_frac", "overflow_frac", "sqnr_db"):
                    out[f"shadow/{fmt[4:]}/{layer}/act_{k}"] = stats[k]
            elif fmt:
                for k in ("underflow_frac", "overflow_frac", "sqnr_db"):
                    out[f"shadow/{fmt}/{layer}/{k}"] = stats[k]
            else:
                for k, v in stats.items():
                    out[f"grad/{layer}/{k}"] = v
        for j, n in enumerate(n for n in self.layers if n in self._act):
            out[f"act/{n}/absmax"] = maxes[len(keys) + j]
        names = list(out)
        values = torch.stack([v.float() for v in out.values()]).tolist()  # the one host sync
        result: dict[str, Any] = dict(zip(names, values))
        if self.spec is not None:
            result["grad/underflow_frac_hist"] = [
                result[f"grad/{n}/underflow_frac"]
                for n in self.layers
                if f"grad/{n}/underflow_frac" in result
            ]
        self._grad, self._act = {}, {}
        return result


def weight_metrics(
    engine: Any, layers: list[str], *, grads: dict[str, torch.Tensor] | None = None
) -> dict[str, float]:
    """``grad/<layer>/weight_norm`` (reduced gradient, before the step) and ``weight/<layer>/absmax``
    (FP32 master). Works under every ZeRO stage; call on all ranks at the accumulation boundary.
    ``grads``: full gradients by parameter name already gathered this step (not fetched again)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    params = dict(engine.module.named_parameters())
    vals: dict[str, torch.Tensor] = {}
    for layer in layers:
        p = params.get(f"{layer}.weight")
        if p is None:
            continue
        g = grads[f"{layer}.weight"] if grads and f"{layer}.weight" in grads else safe_get_full_grad(p)
        if g is not None:
            vals[f"grad/{layer}/weight_norm"] = torch.linalg.vector_norm(g.float())
        w = safe_get_full_fp32_param(p)
        vals[f"weight/{layer}/absmax"] = (w if w is not None else p).detach().float().abs().amax()
    if not vals:
        return {}
    return dict(zip(vals, torch.stack(list(vals.values())).tolist()))


def grad_global_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm over all gradients, in FP32, without a host sync."""
    grads = [p.grad.float() for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
