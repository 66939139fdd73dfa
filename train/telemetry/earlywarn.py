"""Early warning before a loss spike: ``div/warning`` from the per-layer signals of stat steps.

The rule (:class:`WarningRule`, thresholds fixed before any evaluation run, with their sources)
looks at three signals of every stat layer on every stat step after the learning-rate warm-up,
each against its own baseline, the median of that layer's previous ``window`` stat-step values
(at least ``min_history`` of them):

=====================================  ==========================  ===============================
signal                                 fires when                  source of the threshold
=====================================  ==========================  ===============================
``update/<layer>/ratio``               >= 2x baseline              Marin #1368 (32B spikes): Adam
                                                                   update-norm spikes of about 2x
                                                                   precede loss and grad-norm spikes
``act/<layer>/kurtosis``               >= 2x baseline and >= 10    FOG (arXiv 2505.20524) and Fishman
                                                                   et al. (2409.12517): activation
                                                                   kurtosis / outlier growth precedes
                                                                   FP8 divergence; 10 is over 3x a
                                                                   Gaussian's 3
``opt/<layer>/exp_avg_sq_underflow_    >= baseline + 0.10          FP8-LM / MS-AMP store Adam moments
e4m3``                                                             in FP8 with per-tensor scaling: a
                                                                   tenth more of v flushing to 0 means
                                                                   one outlier set the amax
=====================================  ==========================  ===============================

Warm-up is left out, of the judgement and of the baselines (the ratio rises with the learning
rate by design), so the first ``min_history`` stat steps after it only build the baselines. A non-finite signal
fires. ``div/warning`` is 1.0 on a stat step where some signal fires, else 0.0;
``div/warning_signal`` names the first ``<signal> <layer> = <value> (<x> x baseline <b>)``. The
run summary lists every warning (``div/warnings``: step, layer, signal, value, baseline) and
``div/first_warning_step``. ``bench/early_warning.py`` measures the lead time to ``div/spike``.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any

#: the signals: (metrics key prefix, key suffix)
SIGNALS = {
    "update_ratio": ("update/", "/ratio"),
    "kurtosis": ("act/", "/kurtosis"),
    "moment_underflow_e4m3": ("opt/", "/exp_avg_sq_underflow_e4m3"),
}


@dataclass(frozen=True)
class WarningRule:
    """The thresholds (module docstring); fixed, not tuned on the evaluation runs."""

    window: int = 8
    min_history: int = 4
    update_ratio_x: float = 2.0
    kurtosis_x: float = 2.0
    kurtosis_floor: float = 10.0
    moment_underflow_rise: float = 0.10

    def fires(self, signal: str, value: float, baseline: float) -> bool:
        if not math.isfinite(value):
            return True
        if signal == "update_ratio":
            return value >= self.update_ratio_x * baseline
        if signal == "kurtosis":
            return value >= self.kurtosis_floor and value >= self.kurtosis_x * baseline
        return value >= baseline + self.moment_underflow_rise


@dataclass
class EarlyWarning:
    """Keeps each (signal, layer) history and turns a stat-step row into ``div/warning`` keys."""

    warmup_steps: int
    rule: WarningRule = field(default_factory=WarningRule)
    history: dict[tuple[str, str], deque] = field(default_factory=dict)
    warnings: list[dict[str, Any]] = field(default_factory=list)

    def update(self, step: int, row: dict[str, Any]) -> dict[str, Any]:
        """``div/warning`` (and ``div/warning_signal``) of a stat step's metrics row."""
        fired: list[dict[str, Any]] = []
        for signal, layer, value in _signals(row):
            if step <= self.warmup_steps:
                continue  # neither judged nor part of a baseline
            hist = self.history.setdefault((signal, layer), deque(maxlen=self.rule.window))
            if len(hist) >= self.rule.min_history:
                base = statistics.median(hist)
                if self.rule.fires(signal, value, base):
                    fired.append(
                        {"step": step, "layer": layer, "signal": signal, "value": value, "baseline": base}
                    )
            hist.append(value)
        self.warnings.extend(fired)
        out: dict[str, Any] = {"div/warning": float(bool(fired))}
        if fired:
            out["div/warning_signal"] = describe(fired[0])
        return out

    def replay(self, rows: list[dict[str, Any]]) -> None:
        """Rebuild the histories and warnings of a resumed run from its logged rows."""
        for row in rows:
            if "div/warning" in row:
                self.update(row["step"], row)

    def summary(self) -> dict[str, Any]:
        return {
            "div/first_warning_step": self.warnings[0]["step"] if self.warnings else None,
            "div/warnings": list(self.warnings),
        }


def describe(w: dict[str, Any]) -> str:
    x = w["value"] / w["baseline"] if w["baseline"] else math.inf
    return f"{w['signal']} {w['layer']} = {w['value']:.4g} ({x:.2f}x baseline {w['baseline']:.4g})"


def _signals(row: dict[str, Any]) -> list[tuple[str, str, float]]:
    out = []
    for key, value in row.items():
        for signal, (pre, suf) in SIGNALS.items():
            if key.startswith(pre) and key.endswith(suf) and isinstance(value, (int, float)):
                out.append((signal, key[len(pre) : -len(suf)], float(value)))
    return sorted(out, key=lambda s: (s[1], s[0]))
