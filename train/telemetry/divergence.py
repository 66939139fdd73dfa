"""Loss divergence against a BF16 (or FP32) reference trained on the same data order.

Two references, both on identical initial weights and global batches:

* ``reference.run_dir=PATH`` (file reference): the ``metrics.jsonl`` of a
  finished run, aligned by ``step``. It is refused at validation when its
  model, data, seed or batch schedule differ from this run (the message names
  the first differing key), using the reference's ``run_config.yaml``.
* ``reference.mode=lockstep``: a second DeepSpeed engine, built from the same
  FP32 initial weights in ``reference.precision`` (no recipe conversion),
  trains in the same process on the same micro-batches, step for step. Per-step
  deltas are exact: with ``+recipe=bf16`` and a bf16 reference they are 0.
  It costs a second model, optimizer state and forward/backward per step.

Keys (all pure functions below):

* ``div/loss_delta``      loss - ref_loss (train loss of this step)
* ``div/loss_rel``        (loss - ref_loss) / ref_loss
* ``div/loss_delta_ema``  EMA of loss_delta, ``ema_t = a * ema_{t-1} + (1 - a) * delta_t`` (a = reference.ema);
  the EMA of ``loss_rel`` is compared with ``reference.threshold`` to find
  ``div/first_divergence_step`` (run summary): the first logged step where it exceeds the threshold.
* ``div/spike``           1 on a loss spike (``is_spike``): the loss exceeds the mean of the previous
  ``window`` logged losses by more than ``z`` standard deviations AND by more than ``min_rel`` of that mean.
* lockstep only, per converted layer on stat steps: ``div/weight_drift/<layer>`` = ||W - W_ref|| / ||W_ref||
  (FP32 master weights after the step) and ``div/grad_cos/<layer>`` = cos(grad, grad_ref) (full
  gradients before the step).
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from train.distenv import mean_across_ranks
from train.telemetry.grads import full_master
from train.telemetry.loggers import decode_row

# ---------------------------------------------------------------- pure functions


def loss_divergence(loss: float, ref_loss: float) -> dict[str, float]:
    delta = loss - ref_loss
    return {"div/loss_delta": delta, "div/loss_rel": delta / ref_loss if ref_loss else math.nan}


def ema(prev: float | None, value: float, *, decay: float) -> float:
    return value if prev is None or not math.isfinite(prev) else decay * prev + (1 - decay) * value


def is_spike(
    history: list[float], loss: float, *, window: int = 20, z: float = 4.0, min_rel: float = 0.05
) -> bool:
    """Spike rule: ``loss > mean + z * std`` and ``loss > (1 + min_rel) * mean`` over the previous
    ``window`` values (needs at least ``window // 2`` of them). Non-finite losses are spikes."""
    if not math.isfinite(loss):
        return True
    prev = [v for v in history[-window:] if math.isfinite(v)]
    if len(prev) < max(window // 2, 2):
        return False
    mean = sum(prev) / len(prev)
    std = math.sqrt(sum((v - mean) ** 2 for v in prev) / (len(prev) - 1))
    return loss > mean + z * std and loss > (1 + min_rel) * mean


def relative_drift(w: torch.Tensor, w_ref: torch.Tensor) -> torch.Tensor:
    """||w - w_ref|| / ||w_ref||, accumulated in float64."""
    w, w_ref = w.double(), w_ref.double()
    return torch.linalg.vector_norm(w - w_ref) / torch.linalg.vector_norm(w_ref)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of two tensors seen as vectors, accumulated in float64."""
    a, b = a.double().flatten(), b.double().flatten()
    return (a @ b) / (torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b))


# ------------------------------------------------------------- file reference

COMPARED = (
    ("model", "config.model"),
    ("data", "config.data"),
    ("seed", "config.trainer.seed"),
    ("global batch", "config.trainer.global_batch_size"),
    ("data order", "fingerprints.data_order"),
    ("data", "fingerprints.data"),
    ("initial weights", "fingerprints.init_weights"),
)


def _get(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part, {}) if isinstance(d, dict) else {}
    return d


def reference_mismatch(ours: dict[str, Any], ref: dict[str, Any]) -> str | None:
    """Name the first way the reference run differs from ours (both are run_config dicts), or None.
    Fingerprints are only compared when both sides have them; model/data names are labels, not compared."""
    for what, key in COMPARED:
        a, b = _get(ours, key), _get(ref, key)
        if key.startswith("fingerprints") and (a == {} or b == {}):
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            diff = sorted(k for k in set(a) | set(b) if k != "name" and a.get(k) != b.get(k))
            pairs = [(f"{key}.{k}", b.get(k), a.get(k)) for k in diff]
        else:
            pairs = [(key, b, a)] if a != b else []
        if pairs:
            detail = "; ".join(f"{k}: reference {r!r}, this run {o!r}" for k, r, o in pairs[:3])
            return f"its {what} differs ({detail})"
    return None


def load_reference_run(run_dir: str | Path) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    import yaml

    run_dir = Path(run_dir)
    cfg = yaml.safe_load((run_dir / "run_config.yaml").read_text())
    rows = [decode_row(json.loads(line)) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]  # fmt: skip
    return cfg, {r["step"]: r for r in rows}


@dataclass
class DivergenceTracker:
    """Turns (step, loss, ref_loss) into ``div/`` keys and keeps the summary facts."""

    threshold: float
    decay: float
    delta_ema: float | None = None
    rel_ema: float | None = None
    first_divergence_step: int | None = None
    spikes: list[int] = field(default_factory=list)
    history: deque = field(default_factory=lambda: deque(maxlen=64))

    def update(self, step: int, loss: float, ref_loss: float | None) -> dict[str, float]:
        out: dict[str, float] = {}
        if ref_loss is not None:
            out.update(loss_divergence(loss, ref_loss))
            self.delta_ema = ema(self.delta_ema, out["div/loss_delta"], decay=self.decay)
            self.rel_ema = ema(self.rel_ema, out["div/loss_rel"], decay=self.decay)
            out["div/loss_delta_ema"] = self.delta_ema
            out["div/loss_rel_ema"] = self.rel_ema
            if self.first_divergence_step is None and abs(self.rel_ema) > self.threshold:
                self.first_divergence_step = step
        spike = is_spike(list(self.history), loss)
        out["div/spike"] = float(spike)
        if spike:
            self.spikes.append(step)
        self.history.append(loss)
        return out

    def replay(self, rows: list[dict[str, Any]]) -> None:
        """Restore the state ``update`` built from the rows it returned (a resumed run's
        ``metrics.jsonl`` up to its checkpoint): the same EMAs, first divergence step, spikes and
        spike history as if the run had never stopped, from the logged floats (JSON round-trips
        them exactly), not recomputed."""
        for row in rows:
            if "div/loss_delta" in row:
                self.delta_ema = ema(self.delta_ema, row["div/loss_delta"], decay=self.decay)
                self.rel_ema = ema(self.rel_ema, row["div/loss_rel"], decay=self.decay)
                if self.first_divergence_step is None and abs(self.rel_ema) > self.threshold:
                    self.first_divergence_step = row["step"]
            if row.get("div/spike"):
                self.spikes.append(row["step"])
            if "train/loss" in row:
                self.history.append(row["train/loss"])

    def summary(self) -> dict[str, Any]:
        return {
            "div/first_divergence_step": self.first_divergence_step,
            "div/spike_steps": list(self.spikes),
            "div/final_loss_delta_ema": self.delta_ema,
        }


# ------------------------------------------------------------- references in the run


def full_grads(engine: Any, names: list[str]) -> dict[str, torch.Tensor]:
    """FP32 full gradients of ``names`` (parameter names) at the accumulation boundary, before
    ``engine.step()``. Works under every ZeRO stage; must be called on all ranks."""
    from deepspeed.utils import safe_get_full_grad

    params = dict(engine.module.named_parameters())
    out = {}
    for n in names:
        g = safe_get_full_grad(params[n])
        if g is not None:
            out[n] = g.detach().float().clone()
    return out


def full_weights(engine: Any, names: list[str]) -> dict[str, torch.Tensor]:
    """FP32 master weights of ``names`` (every ZeRO stage and precision; call on all ranks)."""
    params = dict(engine.module.named_parameters())
    return {n: full_master(engine, params[n]).float().clone() for n in names}


class FileReference:
    """``reference.run_dir``: the train losses of a finished run, by step."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.config, self.rows = load_reference_run(run_dir)

    def fingerprint_mismatch(self, fingerprints: dict[str, str]) -> str | None:
        return reference_mismatch(
            {"fingerprints": fingerprints}, {"fingerprints": self.config.get("fingerprints", {})}
        )

    def micro_step(self, x: torch.Tensor, y: torch.Tensor, *, capture: list[str] | None = None) -> None:
        return None

    def step_loss(self, step: int) -> float | None:
        row = self.rows.get(step)
        return None if row is None else float(row["train/loss"])

    def end_step(self) -> None:
        return None


class LockstepReference:
    """A second engine (no recipe) trained on exactly the same micro-batches."""

    def __init__(self, engine: Any, *, world_size: int):
        self.engine = engine
        self.world_size = world_size
        self.losses: list[torch.Tensor] = []
        self.grads: dict[str, torch.Tensor] = {}
        self._last_mean: torch.Tensor | None = None

    def micro_step(self, x: torch.Tensor, y: torch.Tensor, *, capture: list[str] | None = None) -> None:
        loss = self.engine(x, y)
        self.engine.backward(loss)
        if capture and self.engine.is_gradient_accumulation_boundary():
            self.grads = full_grads(self.engine, capture)
        self.engine.step()
        self.losses.append(loss.detach())

    def end_step(self) -> None:
        self._last_mean = torch.stack(self.losses).float().mean()
        self.losses = []

    def step_loss(self, step: int) -> float | None:
        assert self._last_mean is not None, "end_step() first"
        return mean_across_ranks(self._last_mean, world_size=self.world_size)

    def layer_metrics(
        self, main_engine: Any, main_grads: dict[str, torch.Tensor], names: list[str]
    ) -> dict[str, float]:
        """``div/weight_drift/<layer>`` and ``div/grad_cos/<layer>`` for weight parameters ``names``."""
        ours, ref = full_weights(main_engine, names), full_weights(self.engine, names)
        out: dict[str, float] = {}
        for n in names:
            layer = n.removesuffix(".weight")
            out[f"div/weight_drift/{layer}"] = relative_drift(ours[n], ref[n]).item()
            if n in main_grads and n in self.grads:
                out[f"div/grad_cos/{layer}"] = cosine(main_grads[n], self.grads[n]).item()
        self.grads = {}
        return out
