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
* ``act/<layer>/kurtosis`` the layer input's kurtosis (``recipes.gemmstats``; power sums
  added over micro-batches and ranks), family ``act``.
* ``gemm/<layer>/<fwd|dgrad|wgrad>/...`` and ``scales/<layer>/<role>/...``: what the layer's
  probe (``recipes.probes``, from ``Recipe.layer_probe``) measures on each micro-batch's
  operands, families ``gemm`` and ``scales``. For delayed, rowwise and block FP8 the ``grad/``
  quantization statistics also come from the probe: dY as the recipe quantizes it.

* After the optimizer step (``optimizer_metrics``, called by ``collect``): ``update/<layer>/ratio``
  and ``opt/<layer>/exp_avg_sq_underflow_{bf16,e4m3}``, families ``update`` and ``opt``, on the
  FP32 masters and optimizer state of every ZeRO stage (``full_master``: under ZeRO-0 BF16 the
  unfused wrapper's FP32 copy, not the BF16 parameter).

Which of these run is ``families`` (``stats.families``). Cost: hooks exist only during stat
steps; everything stays on the device until the step's values are logged (one all-reduce of
the sums, one of the maxima, one host sync, and one per scale histogram).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from recipes.gemmstats import (
    kurtosis_from_sums,
    kurtosis_sums,
    moment_underflow_from_sums,
    moment_underflow_sums,
    update_ratio,
)
from recipes.numerics import REDUCE_OPS, FormatSpec, stats_from_sums, tensor_sums
from recipes.probes import LayerProbe

#: the statistic families a collector can take (``stats.families``)
COLLECTOR_FAMILIES = ("grad", "act", "shadow", "gemm", "scales")


def _merge(acc: dict[str, torch.Tensor] | None, new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``acc`` and ``new`` combined key by key (max for ``REDUCE_OPS`` max keys, else sum); a key in
    only one of them is taken as it is (a probe's backward sums join its forward sums)."""
    if acc is None:
        return new
    both = {
        k: torch.maximum(acc[k], v) if REDUCE_OPS.get(k) == "max" else acc[k] + v
        for k, v in new.items()
        if k in acc
    }
    return {**acc, **new, **both}


class GradStatsCollector:
    def __init__(
        self,
        model: nn.Module,
        layers: list[str],
        *,
        spec: FormatSpec | None,
        shadow: dict[str, FormatSpec] | None = None,
        world_size: int = 1,
        probes: dict[str, LayerProbe] | None = None,
        families: tuple[str, ...] = COLLECTOR_FAMILIES,
    ):
        self.model = model
        self.world_size = world_size
        self.layers = layers
        self.spec = spec
        self.families = set(families)
        self.shadow = (shadow or {}) if "shadow" in self.families else {}
        self.probes = probes or {}
        self._gemm, self._scales = "gemm" in self.families, "scales" in self.families
        self._handles: list[Any] = []
        self._grad: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        self._act: dict[str, torch.Tensor] = {}
        self._sums: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        """(layer, "act" | "probe") -> additive sums (kurtosis power sums, probe sums)."""
        self._saved: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        """layer -> this micro-batch's FP32 (x, W) for the probe's backward GEMMs."""

    # hooks -------------------------------------------------------------
    def arm(self) -> None:
        self._grad, self._act, self._sums, self._saved = {}, {}, {}, {}
        for name in self.layers:
            self._handles.append(
                self.model.get_submodule(name).register_forward_hook(self._forward_hook(name))
            )

    def disarm(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._saved = {}

    def _forward_hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0].detach()
            amax = x.abs().amax().float()
            self._act[name] = amax if name not in self._act else torch.maximum(self._act[name], amax)
            if not torch.is_grad_enabled():  # the no-grad first pass of activation checkpointing
                return
            for fmt, spec in self.shadow.items():
                key = (name, f"act:{fmt}")
                self._grad[key] = _merge(self._grad.get(key), tensor_sums(x, spec, axis=-1))
            if "act" in self.families:
                self._sums[(name, "act")] = _merge(self._sums.get((name, "act")), kurtosis_sums(x))
            probe = self.probes.get(name)
            if probe is not None and (self._gemm or self._scales):
                x32 = x.reshape(-1, x.shape[-1]).float()
                weight = module.weight
                assert isinstance(weight, torch.Tensor)
                w32 = weight.detach().to(torch.float32, copy=True)  # ZeRO-3 frees the gathered W
                sums = probe.forward_sums(x32, w32, gemm=self._gemm, scales=self._scales)
                self._sums[(name, "probe")] = _merge(self._sums.get((name, "probe")), sums)
                self._saved[name] = (x32, w32)
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(self._grad_hook(name))

        return hook

    def _grad_hook(self, name: str):
        def hook(grad: torch.Tensor) -> None:
            g = grad.detach()
            probe = self.probes.get(name)
            g32 = g.reshape(-1, g.shape[-1]).float() if probe is not None else g
            if "grad" in self.families:
                own = probe.grad_sums(g32) if probe is not None else None
                sums = own if own is not None else tensor_sums(g, self.spec, axis=-1)
                self._grad[(name, "")] = _merge(self._grad.get((name, "")), sums)
            for fmt, spec in self.shadow.items():
                self._grad[(name, fmt)] = _merge(self._grad.get((name, fmt)), tensor_sums(g, spec, axis=-1))
            saved = self._saved.pop(name, None)
            if probe is not None and saved is not None:
                sums = probe.backward_sums(g32, *saved, gemm=self._gemm, scales=self._scales)
                self._sums[(name, "probe")] = _merge(self._sums.get((name, "probe")), sums)

        return hook

    # results -----------------------------------------------------------
    def reduce(self, *, distributed: bool) -> dict[str, Any]:
        """All-reduce the step's sums across ranks and turn them into logged values (one host sync)."""
        keys = sorted(self._grad)
        if not keys and not self._act:
            return {}
        sum_names = sorted({k for sums in self._grad.values() for k in sums if REDUCE_OPS[k] == "sum"})
        dev = next(iter(self._act.values())).device
        sums = torch.stack(
            [
                torch.stack([self._grad[k].get(n, torch.zeros((), device=dev)).double() for n in sum_names])
                for k in keys
            ]
        ) if keys else torch.zeros((0, 0), dtype=torch.float64, device=dev)  # fmt: skip
        maxes = torch.stack(
            [self._grad[k]["absmax"].float() for k in keys]
            + [self._act[n] for n in self.layers if n in self._act]
        )
        flat_keys = [(key, name) for key in sorted(self._sums) for name in sorted(self._sums[key])]
        parts = [self._sums[key][name].double().reshape(-1) for key, name in flat_keys]
        flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=dev)
        if distributed:
            dist.all_reduce(sums)
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX)
            dist.all_reduce(flat)
        summed: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        for (key, name), chunk in zip(flat_keys, flat.split([p.numel() for p in parts])):
            summed.setdefault(key, {})[name] = chunk.reshape(self._sums[key][name].shape)
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
        hists: dict[str, Any] = {}
        for (layer, kind), red in sorted(summed.items()):
            if kind == "act":
                out[f"act/{layer}/kurtosis"] = kurtosis_from_sums(red)
                continue
            for k, v in self.probes[layer].finish(red, world_size=self.world_size).items():
                family, rest = k.split("/", 1)
                if isinstance(v, dict):
                    hists[f"{family}/{layer}/{rest}"] = v
                else:
                    out[f"{family}/{layer}/{rest}"] = v
        names = list(out)
        values = torch.stack([v.float() for v in out.values()]).tolist()  # the one host sync
        result: dict[str, Any] = dict(zip(names, values))
        result.update(hists)
        if self.spec is not None:
            result["grad/underflow_frac_hist"] = [
                result[f"grad/{n}/underflow_frac"]
                for n in self.layers
                if f"grad/{n}/underflow_frac" in result
            ]
        self._grad, self._act, self._sums = {}, {}, {}
        return result


def weight_metrics(
    engine: Any,
    layers: list[str],
    *,
    grads: dict[str, torch.Tensor] | None = None,
    masters: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """``grad/<layer>/weight_norm`` (reduced gradient, before the step) and ``weight/<layer>/absmax``
    (FP32 master). Works under every ZeRO stage; call on all ranks at the accumulation boundary.
    ``grads``: full gradients by parameter name, ``masters``: full FP32 masters by layer
    (:func:`master_weights`), already gathered this step (not fetched again)."""
    from deepspeed.utils import safe_get_full_grad

    params = dict(engine.module.named_parameters())
    vals: dict[str, torch.Tensor] = {}
    for layer in layers:
        p = params.get(f"{layer}.weight")
        if p is None:
            continue
        g = grads[f"{layer}.weight"] if grads and f"{layer}.weight" in grads else safe_get_full_grad(p)
        if g is not None:
            vals[f"grad/{layer}/weight_norm"] = torch.linalg.vector_norm(g.float())
        w = masters[layer] if masters and layer in masters else full_master(engine, p)
        vals[f"weight/{layer}/absmax"] = w.float().abs().amax()
    if not vals:
        return {}
    return dict(zip(vals, torch.stack(list(vals.values())).tolist()))


def _unfused_master(engine: Any, p: torch.Tensor) -> torch.Tensor | None:
    """The FP32 master of ``p`` under ZeRO-0 BF16/FP16 (DeepSpeed's unfused wrapper keeps it in
    ``fp32_groups``, paired element by element with ``fp16_groups``); None elsewhere."""
    opt = engine.optimizer
    if opt is engine.basic_optimizer:
        return None
    pairs = zip(getattr(opt, "fp16_groups", []), getattr(opt, "fp32_groups", []))
    return next((m for lows, highs in pairs for lo, m in zip(lows, highs) if lo is p), None)


def full_master(engine: Any, p: torch.Tensor) -> torch.Tensor:
    """The full FP32 master weight of ``p`` under every ZeRO stage and precision (``p`` itself under
    ZeRO-0 FP32); a collective under ZeRO-3: every rank calls."""
    from deepspeed.utils import safe_get_full_fp32_param

    w = safe_get_full_fp32_param(p)
    if w is None:
        w = _unfused_master(engine, p)
    return (w if w is not None else p).detach()


def master_weights(engine: Any, layers: list[str]) -> dict[str, torch.Tensor]:
    """A copy of each layer's full FP32 master weight (:func:`full_master`; every rank calls)."""
    params = dict(engine.module.named_parameters())
    return {
        layer: full_master(engine, params[f"{layer}.weight"]).float().clone()
        for layer in layers
        if f"{layer}.weight" in params
    }


def _second_moment(engine: Any, p: torch.Tensor) -> torch.Tensor | None:
    """Adam's full ``exp_avg_sq`` of ``p``: DeepSpeed's FP32 optimizer state (ZeRO 1-3 and the
    BF16 optimizer), the torch optimizer's own under ZeRO-0 FP32, or that of the FP32 master of
    ``p`` under ZeRO-0 BF16/FP16 (DeepSpeed's unfused wrapper: ``fp16_groups`` pair with
    ``fp32_groups``); None where none holds it."""
    from deepspeed.utils import safe_get_full_optimizer_state

    v = safe_get_full_optimizer_state(p, "exp_avg_sq")
    if v is not None:
        return v
    master = p if engine.optimizer is engine.basic_optimizer else _unfused_master(engine, p)
    if master is None:
        return None
    return engine.basic_optimizer.state.get(master, {}).get("exp_avg_sq")


def optimizer_metrics(
    engine: Any, layers: list[str], *, before: dict[str, torch.Tensor], families: tuple[str, ...]
) -> dict[str, float]:
    """After the optimizer step: ``update/<layer>/ratio`` (``||W_after - W_before|| / ||W_before||``
    of the FP32 master, ``before`` from :func:`master_weights` at the boundary) and
    ``opt/<layer>/exp_avg_sq_underflow_{bf16,e4m3}`` (Adam's second moment: the share of its
    non-zero elements a BF16, or a per-tensor scaled E4M3, copy would flush to zero). Collectives
    under ZeRO: every rank calls."""
    vals: dict[str, torch.Tensor] = {}
    after = master_weights(engine, list(before)) if "update" in families else {}
    for layer, w0 in before.items():
        vals[f"update/{layer}/ratio"] = update_ratio(after[layer] - w0, w0)
    if "opt" in families:
        params = dict(engine.module.named_parameters())
        for layer in layers:
            p = params.get(f"{layer}.weight")
            v = _second_moment(engine, p) if p is not None else None
            if v is not None:
                fr = moment_underflow_from_sums(moment_underflow_sums(v))
                vals[f"opt/{layer}/exp_avg_sq_underflow_bf16"] = fr["underflow_bf16"]
                vals[f"opt/{layer}/exp_avg_sq_underflow_e4m3"] = fr["underflow_e4m3"]
    if not vals:
        return {}
    return dict(zip(vals, torch.stack([v.float() for v in vals.values()]).tolist()))


def grad_global_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm over all gradients, in FP32, without a host sync."""
    grads = [p.grad.float() for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
