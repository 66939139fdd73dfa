"""``Telemetry``: everything the step loop observes, behind the calls the loop makes.

The loop (``train/loop.py``) calls, in order, per optimizer step::

    begin_step(step, lr=...)          stat steps arm the per-layer hooks; the step clock runs
    before_optimizer_step(engine)     at the accumulation boundary: grad norm (where DeepSpeed gives
                                      none), lockstep gradients, weight statistics
    after_micro_step(loss, x, y)      after each micro-batch; the lockstep reference trains on it
    stop_clock(step)                  the step's time ends: evaluation and checkpoints are not step time
    end_step(step, val_loss=...)      log steps: one metrics row -> loggers; returns the Decision
    summary(...)                      the run summary

It owns the cadence (log, stat and eval steps), the timing window, the metrics row and
the run summary; the values come from pure functions and small collectors beside it
(``grads``, ``divergence``, ``perf``). Host syncs happen on log steps only.

``end_step`` is the step's one decision point: ``Decision.STOP`` when a preemption signal
reached any rank (``train.preempt``), ``Decision.NONFINITE`` when the non-finite watch
(``train.telemetry.nonfinite``, ``trainer.on_nonfinite=stop``) found NaN/Inf. The boundary
decision is ``before_optimizer_step``'s: ``Decision.SKIP`` skips that optimizer step
(``trainer.on_nonfinite=skip``).
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from recipes.base import Recipe
from train.data import BatchFeed
from train.distenv import DistEnv, log0, mean_across_ranks
from train.preempt import PreemptionGuard
from train.telemetry.divergence import DivergenceTracker, FileReference, LockstepReference, full_grads
from train.telemetry.earlywarn import EarlyWarning, describe
from train.telemetry.grads import (
    GradStatsCollector,
    grad_global_norm,
    master_weights,
    optimizer_metrics,
    weight_metrics,
)
from train.telemetry.loggers import MultiLogger
from train.telemetry.nonfinite import NonFiniteWatch
from train.telemetry.perf import PerfMeter
from train.telemetry.selection import StatsPlan


class Decision(enum.Enum):
    """What the loop does after a step."""

    CONTINUE = "continue"
    STOP = "stop"
    """Checkpoint at this step boundary and exit for requeue (the run is ``preempted``)."""
    SKIP = "skip"
    """At the accumulation boundary: skip this optimizer step (``trainer.on_nonfinite=skip``)."""
    NONFINITE = "nonfinite"
    """Stop now without a checkpoint: the state is non-finite (``trainer.on_nonfinite=stop``)."""


@dataclass(frozen=True)
class Cadence:
    """Which steps log, evaluate and take the heavy statistics (``trainer.*``, ``stats.every``)."""

    max_steps: int
    log_every: int
    eval_every: int
    stats: StatsPlan

    def is_stat(self, step: int) -> bool:
        return self.stats.is_stat(step)

    def is_eval(self, step: int) -> bool:
        return step % self.eval_every == 0 or step == self.max_steps

    def is_log(self, step: int) -> bool:
        return self.is_stat(step) or self.is_eval(step) or step % self.log_every == 0


@dataclass
class _Step:
    """What one optimizer step has gathered so far."""

    step: int
    lr: float
    is_stat: bool
    is_log: bool
    capture: list[str] | None
    losses: list[torch.Tensor] = field(default_factory=list)
    manual_norm: torch.Tensor | None = None
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    before: dict[str, torch.Tensor] = field(default_factory=dict)
    """FP32 master weights at the boundary of a stat step (``update/`` ratios)."""


class Telemetry:
    def __init__(
        self,
        *,
        cadence: Cadence,
        engine: Any,
        recipe: Recipe,
        feed: BatchFeed,
        denv: DistEnv,
        device: str,
        loggers: MultiLogger,
        perf: PerfMeter,
        tracker: DivergenceTracker,
        guard: PreemptionGuard,
        reference: FileReference | LockstepReference | None = None,
        collector: GradStatsCollector | None = None,
        stat_params: list[str] | None = None,
        watch: NonFiniteWatch | None = None,
        run_dir: Any = None,
        early: EarlyWarning | None = None,
    ):
        self.cadence, self.engine, self.recipe, self.feed = cadence, engine, recipe, feed
        self.denv, self.device, self.loggers, self.perf = denv, device, loggers, perf
        self.tracker, self.guard, self.reference, self.collector = tracker, guard, reference, collector
        self.watch, self.run_dir, self.early = watch, run_dir, early
        self.report_path: str | None = None
        self.stat_params = list(stat_params or [])
        """Weight parameters of the layers the heavy statistics look at."""
        self.stat_layers = [n.removesuffix(".weight") for n in self.stat_params]
        self.lockstep = reference if isinstance(reference, LockstepReference) else None
        self.params = [p for p in engine.module.parameters() if p.requires_grad]
        # Without a DeepSpeed optimizer wrapper (ZeRO-0 FP32) get_global_grad_norm() is None: compute it.
        self.manual_norm_needed = engine.optimizer is engine.basic_optimizer
        self._cur: _Step | None = None
        self._window_start: float | None = None
        self._window_steps, self._data_time, self._step_time = 0, 0.0, math.nan
        self._last: dict[str, Any] = {}
        self._tok_rates: list[float] = []
        self._mfus: list[float] = []

    @property
    def current_step(self) -> int:
        """The step between ``begin_step`` and ``end_step`` (0 outside)."""
        return 0 if self._cur is None else self._cur.step

    # ------------------------------------------------------------------ the loop's calls
    def begin_step(self, step: int, *, lr: float) -> None:
        if self._window_start is None:  # the first step, or the one after a log step
            self._window_start, self._window_steps, self._data_time = time.perf_counter(), 0, 0.0
        is_stat = self.cadence.is_stat(step)
        capture = self.stat_params if (is_stat and self.lockstep) else None
        self._cur = _Step(step, lr, is_stat, is_stat or self.cadence.is_log(step), capture)
        if is_stat and self.collector:
            self.collector.arm()

    def before_optimizer_step(self, engine: Any) -> Decision:
        """Statistics at the accumulation boundary; ``Decision.SKIP`` when the step must not update
        (``trainer.on_nonfinite=skip`` and a non-finite loss or gradient on any rank)."""
        cur = self._step()
        if cur.is_log and self.manual_norm_needed:
            cur.manual_norm = grad_global_norm(self.params)
        if cur.capture:
            cur.grads = full_grads(engine, cur.capture)
        fams = self.cadence.stats.families
        if cur.is_stat and "update" in fams:
            cur.before = master_weights(engine, self.stat_layers)
        if cur.is_stat and "weight" in fams:
            cur.weights = weight_metrics(engine, self.stat_layers, grads=cur.grads, masters=cur.before)
        w = self.watch
        if w is not None and w.policy != "skip":
            w.fold()
        if w is not None and w.policy == "skip" and w.tripped(distributed=self.denv.is_distributed):
            w.count += 1
            w.reset()
            w.sticky = False  # the non-finite gradients are discarded with the step: the state is clean
            log0(self.denv, f"non-finite loss or gradient at step {cur.step}: optimizer step skipped")
            return Decision.SKIP
        return Decision.CONTINUE

    def after_micro_step(self, loss: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
        cur = self._step()
        cur.losses.append(loss.detach())
        if self.watch is not None:
            self.watch.observe_loss(loss)
        if self.reference is not None:
            self.reference.micro_step(x, y, capture=cur.capture)

    def eval_due(self, step: int) -> bool:
        return self.cadence.is_eval(step)

    def stop_clock(self, step: int) -> None:
        cur = self._step()
        if cur.is_stat and self.collector:
            self.collector.disarm()
        if self.reference is not None:
            self.reference.end_step()
        self._window_steps += 1
        self._data_time += self.feed.fetch_time_s
        if cur.is_log:
            if self.device == "cuda":
                torch.cuda.synchronize()
            assert self._window_start is not None
            self._step_time = (time.perf_counter() - self._window_start) / self._window_steps

    def end_step(self, step: int, *, val_loss: float | None) -> Decision:
        cur = self._step()
        fams = self.cadence.stats.families
        if cur.is_stat and ("update" in fams or "opt" in fams):  # the optimizer has stepped
            cur.weights.update(
                optimizer_metrics(self.engine, self.stat_layers, before=cur.before, families=fams)
            )
            cur.before = {}
        nonfinite = self._nonfinite_on_log_step(cur)
        if cur.is_log:
            metrics = self._row(cur, val_loss=val_loss)
            self.loggers.log(metrics, step)
            self._last.update(metrics)
            self._tok_rates.append(metrics["perf/tokens_per_s"])
            if "perf/mfu_bf16_peak" in metrics:
                self._mfus.append(metrics["perf/mfu_bf16_peak"])
            self._window_start = None  # the next step opens a new timing window
        self._cur = None
        if nonfinite:
            return Decision.NONFINITE
        if self.guard.should_stop(device=self.engine.device, distributed=self.denv.is_distributed):
            log0(self.denv, f"preemption signal: checkpoint at step {step}, then exit for requeue")
            return Decision.STOP
        return Decision.CONTINUE

    def safe_to_checkpoint(self) -> bool:
        """No non-finite value since the run began (a collective: every rank calls it)."""
        w = self.watch
        return w is None or not (w.sticky or w.tripped(distributed=self.denv.is_distributed))

    def _nonfinite_on_log_step(self, cur: _Step) -> bool:
        """Log steps, policies stop and log: read the flags (one collective). Stop: write the report."""
        w = self.watch
        if w is None or w.policy == "skip" or not cur.is_log:
            return False
        if not w.tripped(distributed=self.denv.is_distributed):
            return False
        w.count += 1
        if w.policy == "log":
            log0(
                self.denv,
                f"non-finite loss or gradient by step {cur.step} (trainer.on_nonfinite=log: going on)",
            )
            w.reset()
            return False
        report = w.report(cur.step, self.recipe.telemetry())
        if self.denv.is_main and self.run_dir is not None:
            self.report_path = str(w.write_report(self.run_dir, report))
        log0(self.denv, f"non-finite loss or gradient by step {cur.step}: {report['first_nonfinite']['what']} "
             f"of {report['first_nonfinite']['tensor']}; stopping without a checkpoint "
             f"(trainer.on_nonfinite=stop; report: {self.report_path})")  # fmt: skip
        return True

    def summary(self, decision: Decision, *, step: int) -> dict[str, Any]:
        self.guard.drain()
        if decision is Decision.STOP:
            return {"state": "preempted", "final/step": step}
        if decision is Decision.NONFINITE:
            return {"state": "nonfinite", "final/step": step, "nonfinite_report": self.report_path}
        return {
            "state": "completed",
            "final/train_loss": self._last.get("train/loss"),
            "final/val_loss": self._last.get("val/loss"),
            "final/step": step,
            "perf/mean_tokens_per_s": _mean_after_first(self._tok_rates),
            "perf/mean_mfu_bf16_peak": _mean_after_first(self._mfus),
            **self.tracker.summary(),
            **(self.early.summary() if self.early is not None else {}),
        }

    # ------------------------------------------------------------------ the metrics row
    def _row(self, cur: _Step, *, val_loss: float | None) -> dict[str, Any]:
        world = self.denv.world_size
        metrics: dict[str, Any] = {
            "train/loss": mean_across_ranks(torch.stack(cur.losses).float().mean(), world_size=world),
            "train/lr": cur.lr,
            "train/grad_norm": self._grad_norm(cur.manual_norm),
            **self.perf.metrics(step_time=self._step_time, data_time=self._data_time / self._window_steps),
        }
        if val_loss is not None:
            metrics["val/loss"] = val_loss
        if self.watch is not None and self.watch.policy != "stop":
            metrics["train/skipped_steps" if self.watch.policy == "skip" else "train/nonfinite_steps"] = (
                self.watch.count
            )
        if cur.is_stat:
            metrics["grad/global_norm"] = metrics["train/grad_norm"]
            metrics.update(cur.weights)
            if self.collector:
                metrics.update(self.collector.reduce(distributed=self.denv.is_distributed))
            metrics.update(self.recipe.telemetry())
            if self.early is not None:
                metrics.update(self.early.update(cur.step, metrics))
                self._say_warning(cur.step)
        ref_loss = self.reference.step_loss(cur.step) if self.reference is not None else None
        metrics.update(self.tracker.update(cur.step, metrics["train/loss"], ref_loss))
        if cur.capture and self.lockstep is not None:
            metrics.update(self.lockstep.layer_metrics(self.engine, cur.grads, self.stat_params))
        return metrics

    def _say_warning(self, step: int) -> None:
        """One line per new early warning (the first 5; every one is in the run summary)."""
        if self.early is None:
            return
        new = [w for w in self.early.warnings if w["step"] == step]
        if new and len(self.early.warnings) - len(new) < 5:
            more = f" (+{len(new) - 1} more)" if len(new) > 1 else ""
            log0(self.denv, f"early warning at step {step}: {describe(new[0])}{more}")

    def _grad_norm(self, manual: torch.Tensor | None) -> float:
        """DeepSpeed's pre-clip global norm; ZeRO-0 FP32 reports None, so use ours."""
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return float(manual) if manual is not None else float("nan")
        return float(norm)

    def _step(self) -> _Step:
        assert self._cur is not None, "Telemetry: begin_step() first"
        return self._cur


def _mean_after_first(values: list[float]) -> float | None:
    """The mean without the first (warm-up) window, when there is more than one."""
    return float(np.mean(values[1:] or values)) if values else None
