"""Is a recipe's loss gap real? One rule, fixed before any data is looked at, calibrated to seed noise.

Pure functions (no files, no plotting), so the ablation tooling and the tests call the same code.

Per seed, the **delta** is the mean ``train/loss`` over the last ``K`` logged steps minus the
reference's mean over the *same* steps (the run's own ``div/loss_delta`` when it trained against a
reference, which is that difference step by step; else the same-seed reference run of the sweep).
Over ``n`` paired seeds: the mean delta and its standard error ``SE = s / sqrt(n)`` (``s`` the
sample standard deviation, ``ddof=1``). The verdict, checked in this order:

1. ``diverged at step N``: a seed's training loss became non-finite (or the trainer stopped on
   it: state ``nonfinite``); ``N`` is the earliest such step over seeds;
2. ``failed``: a seed failed, had a config error, or never started;
3. ``in progress``: a seed is still running or waits for requeue after a preemption;
4. ``no reference``: no seed could be paired with a reference;
5. ``single seed: no verdict``: one paired seed (no noise estimate; its delta is still shown);
6. ``indistinguishable`` when ``|mean| < z * SE`` (or the mean is exactly 0);
7. else ``worse by X (k sigma)`` (mean > 0: higher loss) or ``better by X (k sigma)``,
   ``X = |mean|`` in nats per token, ``k = |mean| / SE``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

RULE = (
    "Verdict rule (fixed before the data): per seed, delta = mean train/loss over the last {k} logged steps "
    "minus the reference's mean over the same steps; over n paired seeds, mean delta +- SE (sample std / sqrt(n)). "
    "'indistinguishable' if |mean| < {z:g} x SE, else 'worse by X (k sigma)' / 'better by X (k sigma)'; "
    "'diverged at step N' if a seed's loss went non-finite; 'failed', 'in progress' and "
    "'single seed: no verdict' as they say."
)

#: states of a seed that end the comparison early (see the rule)
FAILED_STATES = ("failed", "config_error", "missing")
OPEN_STATES = ("running", "preempted")


@dataclass(frozen=True)
class Verdict:
    kind: str  # reference | indistinguishable | worse | better | diverged | failed | in_progress | no_reference | single_seed
    text: str
    n: int = 0
    mean: float | None = None
    se: float | None = None
    sigma: float | None = None
    step: int | None = None  # diverged at


def interval(v: Verdict, z: float) -> tuple[float, float] | None:
    """``mean -+ z SE`` of a verdict over paired seeds (None without a mean and an SE)."""
    return None if v.mean is None or v.se is None else (v.mean - z * v.se, v.mean + z * v.se)


def seed_delta(
    steps: np.ndarray, loss: np.ndarray, ref_steps: np.ndarray, ref_loss: np.ndarray, *, k: int
) -> float | None:
    """Mean loss minus the reference's mean over the last ``k`` steps both logged (None if none)."""
    common, ia, ib = np.intersect1d(steps, ref_steps, return_indices=True)
    if not len(common):
        return None
    ia, ib = ia[-k:], ib[-k:]
    return float(np.mean(loss[ia]) - np.mean(ref_loss[ib]))


def own_delta(steps: np.ndarray, loss_delta: np.ndarray, *, k: int) -> float | None:
    """The same, from a run's own per-step ``div/loss_delta``."""
    return float(np.mean(loss_delta[-k:])) if len(steps) else None


def first_nonfinite_step(steps: np.ndarray, loss: np.ndarray) -> int | None:
    bad = np.flatnonzero(~np.isfinite(loss))
    return int(steps[bad[0]]) if len(bad) else None


def decide(
    deltas: list[float],
    *,
    z: float,
    states: list[str] | None = None,
    diverged_at: list[int] | None = None,
    is_reference: bool = False,
) -> Verdict:
    """The verdict for one recipe from its paired seeds' deltas and every seed's state."""
    states = states or []
    if is_reference:
        return Verdict("reference", "reference", n=len(states))
    if diverged_at:
        step = min(diverged_at)
        return Verdict("diverged", f"diverged at step {step}", step=step, n=len(deltas))
    if "nonfinite" in states:
        return Verdict("diverged", "diverged (stopped on a non-finite value)", n=len(deltas))
    if any(s in FAILED_STATES for s in states):
        bad = sum(s in FAILED_STATES for s in states)
        return Verdict("failed", f"failed ({bad} of {len(states)} seeds)", n=len(deltas))
    if any(s in OPEN_STATES for s in states):
        return Verdict("in_progress", "in progress", n=len(deltas))
    d = np.asarray([x for x in deltas if x is not None and math.isfinite(x)], dtype=np.float64)
    if not len(d):
        return Verdict("no_reference", "no reference", n=0)
    mean = float(d.mean())
    if len(d) == 1:
        return Verdict("single_seed", "single seed: no verdict", n=1, mean=mean)
    se = float(d.std(ddof=1) / math.sqrt(len(d)))
    sigma = abs(mean) / se if se > 0 else (math.inf if mean else 0.0)
    if mean == 0 or abs(mean) < z * se:
        return Verdict("indistinguishable", "indistinguishable", n=len(d), mean=mean, se=se, sigma=sigma)
    word = "worse" if mean > 0 else "better"
    k = "inf" if math.isinf(sigma) else f"{sigma:.1f}"
    return Verdict(word, f"{word} by {abs(mean):.4f} ({k} sigma)", n=len(d), mean=mean, se=se, sigma=sigma)
