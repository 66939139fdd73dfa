"""Which layers must stay in BF16: rank the converted layers by lock-step signals, then bisect.

Pure arithmetic (no files, no training), so ``python -m train.sensitivity`` and the tests on
synthetic gaps call the same code.

**Signals** (``layer_signals``), per converted layer, from the full recipe's runs trained with a
lock-step BF16 reference (``reference.mode=lockstep``) and statistics on (``stats.every``), each
averaged over the stat steps and then over seeds:

* ``weight_drift``: ``div/weight_drift/<layer>`` at the last stat step (it accumulates), higher is
  worse;
* ``grad_cos``: ``div/grad_cos/<layer>``, the cosine of the layer's gradient with the reference's
  (lower is worse);
* ``sqnr_db``: the lowest of ``gemm/<layer>/<fwd|dgrad|wgrad>/sqnr_db``, the GEMM output's SQNR
  against the same GEMM on the high-precision operands (lower is worse).

**Ranking** (``rank_layers``, worst first): by SQNR class first (3 dB wide: the layers whose GEMM
output is measurably noisier, e.g. a layer in a coarser format), then within a class by the mean
rank of the two lock-step signals. The lock-step signals alone are poor at telling a locally
noisy layer from one that merely sits downstream of it (every layer's weights drift once the
trajectories part), which is why they only order layers that quantize alike; the confirming runs
decide in the end.

**Search** (``next_candidate``): a candidate keeps the first ``k`` ranked layers in BF16; ``k = 0``
is the recipe itself, ``k = n`` keeps every converted layer (the BF16 run: gap 0 by
construction, never trained). A candidate *meets* the target when the upper end of its gap's
interval (``mean + z SE`` over paired seeds, the report's rule) is below it. Assuming the gap
falls as layers are kept (monotone in ``k``), bisection finds the smallest ``k`` that meets it in
``ceil(log2 n)`` candidates: ``lo`` = the largest evaluated ``k`` that fails below ``hi`` = the
smallest evaluated ``k`` that meets (``n`` if none has), and the next candidate is their midpoint.
The evaluations are all kept, so a non-monotone gap shows in the evidence table.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from train.review.series import Series
from train.review.verdict import Verdict, decide, interval

#: signal -> whether a higher value is worse
SIGNALS = {"weight_drift": True, "grad_cos": False, "sqnr_db": False}
_GEMM_SQNR = re.compile(r"^gemm/(?P<layer>.+)/(?:fwd|dgrad|wgrad)/sqnr_db$")


def _finite(series: Series, key: str) -> np.ndarray:
    _, v = series.get(key)
    return v[np.isfinite(v)]


def layer_signals(runs: list[Series], layers: list[str]) -> dict[str, dict[str, float]]:
    """Per layer, the signals of the module docstring averaged over ``runs`` (seeds); a signal a
    run did not log is left out (not NaN)."""
    out: dict[str, dict[str, list[float]]] = {layer: {} for layer in layers}
    for s in runs:
        sqnr: dict[str, list[float]] = {}
        for key in s.keys():
            if (m := _GEMM_SQNR.match(key)) and m["layer"] in out and len(v := _finite(s, key)):
                sqnr.setdefault(m["layer"], []).append(float(v.mean()))
        for layer in layers:
            got = out[layer]
            if len(v := _finite(s, f"div/weight_drift/{layer}")):
                got.setdefault("weight_drift", []).append(float(v[-1]))
            if len(v := _finite(s, f"div/grad_cos/{layer}")):
                got.setdefault("grad_cos", []).append(float(v.mean()))
            if layer in sqnr:
                got.setdefault("sqnr_db", []).append(min(sqnr[layer]))
    return {layer: {k: float(np.mean(v)) for k, v in sig.items()} for layer, sig in out.items()}


#: GEMM-output SQNR classes: layers within one class quantize alike (a factor 2 in error power)
SQNR_CLASS_DB = 3.0


def rank_layers(signals: dict[str, dict[str, float]], by: str = "auto") -> list[str]:
    """Layers worst first (module docstring), ties in module order.

    ``by="auto"``: first by SQNR class (``floor(sqnr_db / 3 dB)``, lowest first: a layer whose
    GEMM output is twice as noisy as another's ranks before it whatever the lock-step signals say;
    a layer with no SQNR quantizes nothing measurable and goes last), then, within a class, by the
    mean rank of its lock-step signals (weight drift, gradient cosine), which say how much the
    trajectory cares. ``by=<signal>``: that signal alone (layers without it last)."""
    layers = list(signals)

    def order(name: str) -> dict[str, int]:
        have = [x for x in layers if name in signals[x]]
        worse_first = sorted(have, key=lambda x: (-signals[x][name] if SIGNALS[name] else signals[x][name],
                                                  layers.index(x)))  # fmt: skip
        return {x: r for r, x in enumerate(worse_first)}

    if by != "auto":
        r = order(by)
        return sorted(layers, key=lambda x: (r.get(x, len(layers)), layers.index(x)))
    lock = [order(name) for name in ("weight_drift", "grad_cos")]

    def key(x: str) -> tuple[float, float, int]:
        sq = signals[x].get("sqnr_db")
        klass = math.floor(sq / SQNR_CLASS_DB) if sq is not None and math.isfinite(sq) else math.inf
        ranks = [r[x] for r in lock if x in r]
        return (klass, float(np.mean(ranks)) if ranks else math.inf, layers.index(x))

    return sorted(layers, key=key)


@dataclass(frozen=True)
class Gap:
    """One candidate's gap to BF16 over paired seeds, judged by the report's rule."""

    k: int
    verdict: Verdict
    z: float

    @property
    def upper(self) -> float | None:
        iv = self.interval
        return None if iv is None else iv[1]

    @property
    def interval(self) -> tuple[float, float] | None:
        return interval(self.verdict, self.z)

    def meets(self, target: float) -> bool:
        return self.upper is not None and self.upper < target


def judge(k: int, deltas: list[float], *, z: float) -> Gap:
    return Gap(k, decide(deltas, z=z), z)


def bounds(n: int, evaluated: dict[int, Gap], target: float) -> tuple[int, int]:
    """``(lo, hi)``: the smallest evaluated ``k`` that meets the target (``n`` if none) and the
    largest evaluated ``k`` below it that does not (``-1`` if none)."""
    hi = min((k for k, g in evaluated.items() if g.meets(target)), default=n)
    lo = max((k for k, g in evaluated.items() if k < hi and not g.meets(target)), default=-1)
    return lo, hi


def next_candidate(n: int, evaluated: dict[int, Gap], target: float) -> int | None:
    """The next ``k`` to train, or None when the search is done. ``k = 0`` (the recipe) first."""
    if 0 not in evaluated:
        return 0
    lo, hi = bounds(n, evaluated, target)
    if lo < 0 or hi - lo <= 1:
        return None
    return (lo + hi) // 2


def max_candidates(n: int) -> int:
    """Candidates bisection needs after ``k = 0`` in the worst case, over ``1..n``."""
    return math.ceil(math.log2(n)) if n > 1 else (1 if n == 1 else 0)


def outcome(n: int, evaluated: dict[int, Gap], target: float) -> dict:
    """The answer: ``status`` and the chosen ``k``.

    * ``met``: ``k`` layers in BF16 meet the target (``k = 0``: the recipe already does);
    * ``all_layers``: only keeping every converted layer (the BF16 run) meets it;
    * ``not_separable``: the recipe's own gap is ``indistinguishable`` from seed noise, so no
      layer's contribution can be told from noise at this scale;
    * ``budget``: the search stopped (its run budget) before a candidate met the target (``k`` is
      the evaluated candidate with the smallest mean gap).
    """
    full = evaluated.get(0)
    if full is not None and full.verdict.kind == "indistinguishable" and not full.meets(target):
        return {"status": "not_separable", "k": None}
    lo, hi = bounds(n, evaluated, target)
    done = next_candidate(n, evaluated, target) is None
    if hi in evaluated:
        return {"status": "met", "k": hi, "converged": done}
    if done:
        return {"status": "all_layers", "k": n, "converged": True}
    means = {k: g.verdict.mean for k, g in evaluated.items() if g.verdict.mean is not None}
    best = min(means, key=lambda k: means[k]) if means else None
    return {"status": "budget", "k": best, "converged": False}
