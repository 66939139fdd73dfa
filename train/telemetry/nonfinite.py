"""Non-finite forensics: NaN/Inf in the loss or any gradient, flagged on the device, obeyed per policy.

``trainer.on_nonfinite`` (default ``stop``):

=========  ===============================================================================
``stop``   read on log steps; the run stops at that step without a checkpoint (the last good
           one stays ``latest``), writes ``nonfinite_report.json`` and exits with code
           :data:`EXIT_NONFINITE` (3)
``skip``   read before every optimizer step (one host sync and one all-reduce of a single int
           per step: the price of deciding before the weights change); a step with a non-finite
           loss or gradient on any rank skips its optimizer step on every rank (DeepSpeed's
           overflow path: gradients zeroed, ``skipped_steps`` counted, the LR schedule does not
           advance); ``trainer.max_steps`` counts attempted steps, so a skipped step still uses
           its batch. ``train/skipped_steps`` is logged.
``log``    read on log steps; logged as ``train/nonfinite_steps`` and printed, training goes on
=========  ===============================================================================

How: a hook on every parameter's gradient (it fires with each rank's local gradient, before
DeepSpeed reduces or partitions it) keeps ``grad.sum()`` on the device, and so does each
micro-batch's loss; a policy's read folds them into per-parameter flags (one host sync, one
all-reduce). Cost: one reduction kernel per gradient per micro-batch.
The report names the step, the first parameter whose gradient went non-finite in backward order
(the layer nearest the loss, where a backward fault starts) or the loss when only the forward
went non-finite, and the layer's last logged recipe statistics (``fp8/<layer>/...`` scales and
amaxes).

Fault injection for tests (``debug.inject_nonfinite_at_step=N``, ``debug.inject_layer=NAME``,
``debug.inject_tensor=grad_output|activation``): at step N that module's output gradient
(a backward-only fault: the loss stays finite) or its output activation becomes NaN.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["EXIT_NONFINITE", "POLICIES", "NonFiniteWatch", "inject_fault"]

POLICIES = ("stop", "skip", "log")
#: exit code of a run stopped by ``trainer.on_nonfinite=stop`` (config errors exit 2)
EXIT_NONFINITE = 3


class NonFiniteWatch:
    """One ``sum()`` per gradient and per loss, kept on the device: a sum is non-finite iff some
    element is (NaN and Inf propagate; a finite sum that overflows is a broken state too). The
    sums are folded into per-parameter flags only when a policy reads them."""

    def __init__(self, model: nn.Module, *, policy: str, device: torch.device | str):
        self.policy = policy
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.device = torch.device(device)
        self.flags = torch.zeros(len(named), dtype=torch.int32, device=device)
        self.loss_flag = torch.zeros((), dtype=torch.bool, device=device)
        self.order: list[int] = []  # parameter indices in the order their first gradient hook fired
        self.count = 0  # steps found non-finite (skip: skipped; log: logged)
        self.sticky = False  # a non-finite value was seen at some point (no checkpoint after that)
        self._seen: set[int] = set()
        self._sums: list[torch.Tensor] = []  # 0-d gradient sums since the last fold
        self._index: list[int] = []  # their parameter indices
        self._losses: list[torch.Tensor] = []
        self._idx_cache: dict[tuple[int, ...], torch.Tensor] = {}
        self._handles = [p.register_hook(self._hook(i)) for i, (_, p) in enumerate(named)]

    def _hook(self, i: int):
        def hook(grad: torch.Tensor) -> None:
            if i not in self._seen:
                self._seen.add(i)
                self.order.append(i)
            self._sums.append(grad.sum())
            self._index.append(i)

        return hook

    def observe_loss(self, loss: torch.Tensor) -> None:
        self._losses.append(loss.detach().sum())

    def fold(self) -> None:
        """Fold this step's sums into the flags, on the device (no host sync; bounds the memory)."""
        self._fold()

    def _fold(self) -> None:
        if self._sums:
            bad = (~torch.isfinite(torch.stack([s.float() for s in self._sums]))).to(torch.int32)
            key = tuple(self._index)  # the same backward order every step: one copy to the device, once
            if key not in self._idx_cache:
                self._idx_cache[key] = torch.tensor(key, device=self.flags.device)
            self.flags.scatter_reduce_(0, self._idx_cache[key], bad.to(self.flags.device), reduce="amax")
            self._sums, self._index = [], []
        if self._losses:
            self.loss_flag |= ~torch.isfinite(torch.stack(self._losses).float()).all().to(
                self.loss_flag.device
            )
            self._losses = []

    def tripped(self, *, distributed: bool) -> bool:
        """Any rank saw a non-finite loss or gradient since the last ``reset`` (one host sync)."""
        self._fold()
        bad = ((self.flags.amax() > 0) | self.loss_flag).to(torch.int32).reshape(1)
        if distributed:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        found = bool(bad.item())
        self.sticky |= found
        return found

    def reset(self) -> None:
        self._fold()
        self.flags.zero_()
        self.loss_flag.zero_()

    def report(self, step: int, recipe_stats: dict[str, float]) -> dict[str, Any]:
        """What went non-finite first (this rank's view), with the layer's last recipe statistics."""
        self._fold()
        flags = [bool(f) for f in self.flags.tolist()]
        first = next((self.names[i] for i in self.order if flags[i]), None)
        layer, _, kind = (first or "").rpartition(".")
        where: dict[str, Any]
        if first is None:
            where = {"tensor": "loss", "layer": None, "what": "the forward loss (no gradient was non-finite)"}
        else:
            what = "weight gradient (the wgrad GEMM output)" if kind == "weight" else f"{kind} gradient"
            where = {"tensor": first, "layer": layer, "what": what}
        stats = {k: v for k, v in recipe_stats.items() if layer and f"/{layer}/" in f"/{k}"}
        return {
            "step": step,
            "policy": self.policy,
            "first_nonfinite": where,
            "nonfinite_parameters": [self.names[i] for i in self.order if flags[i]],
            "loss_nonfinite": bool(self.loss_flag.item()),
            "layer_recipe_stats": stats,
        }

    def write_report(self, run_dir: Path, report: dict[str, Any]) -> Path:
        path = run_dir / "nonfinite_report.json"
        path.write_text(json.dumps(report, indent=1) + "\n")
        return path


def inject_fault(model: nn.Module, *, layer: str, tensor: str, at_step: int, step_of: Any) -> None:
    """Make ``layer``'s output gradient (``grad_output``) or output (``activation``) NaN at step
    ``at_step`` (``step_of()`` returns the current step). For tests of the policies."""
    mod = model.get_submodule(layer)

    def hook(_m: nn.Module, _inp: Any, out: torch.Tensor) -> torch.Tensor | None:
        if step_of() != at_step or not _m.training:
            return None
        if tensor == "activation":
            return out * float("nan")
        if out.requires_grad:
            out.register_hook(lambda g: torch.full_like(g, float("nan")))
        return None

    mod.register_forward_hook(hook)
