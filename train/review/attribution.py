"""Which GEMM a loss gap comes from: exact Shapley shares over the 2^3 subsets of {fwd, dgrad, wgrad}.

Pure arithmetic on per-seed gaps (no files, no training), so ``python -m train.attribute``, the
report and the tests call the same code.

Input: for each subset ``S`` of the three GEMMs of every converted Linear (``fwd`` = forward
``x W^T``, ``dgrad`` = ``dY W``, ``wgrad`` = ``dY^T x``), the per-seed gap ``v_seed(S)`` of the
run with exactly the GEMMs in ``S`` quantized against the same-seed BF16 run (the delta of
``train.review.verdict``: mean loss over the last ``K`` logged steps minus the reference's over
the same steps). ``v(empty) = 0``: the empty subset *is* the BF16 reference.

Output, per GEMM ``g`` (``n = 3`` players):

* the **Shapley share** ``phi_g = sum over S not containing g of |S|! (n - |S| - 1)! / n! x
  (v(S + g) - v(S))``: weights 1/3 (``S`` empty), 1/6 (one other GEMM), 1/3 (both others). The
  shares add up to the full recipe's gap exactly (efficiency), per seed and so in the mean;
* ``only g``: ``v({g})``, the gap with only that GEMM quantized;
* ``all but g``: ``v(N - {g})``, the gap with every GEMM quantized but that one (the recipe's
  gap minus it is what keeping ``g`` in BF16 would recover).

Each is computed *per seed* (the eight runs of a seed share weights and batches) and then
summarised over seeds with :func:`train.review.verdict.decide`: mean, its standard error, the
interval ``mean +- z SE`` and the same verdict words (``indistinguishable`` below ``z`` SE). A
share is only called real by that rule: the report's rule, one definition.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from train.review.verdict import Verdict, decide, interval

GEMMS = ("fwd", "dgrad", "wgrad")
#: every subset of the GEMMs, as sorted tuples, smallest first
SUBSETS: tuple[tuple[str, ...], ...] = tuple(
    c for r in range(len(GEMMS) + 1) for c in itertools.combinations(GEMMS, r)
)


def subset_name(subset: tuple[str, ...] | frozenset[str]) -> str:
    """``bf16`` for the empty subset, else the GEMMs joined by ``+`` in ``GEMMS`` order."""
    s = [g for g in GEMMS if g in subset]
    return "+".join(s) if s else "bf16"


def shapley(values: dict[frozenset[str], float], players: tuple[str, ...] = GEMMS) -> dict[str, float]:
    """Exact Shapley values of ``players`` for a game given on every subset (``values[empty]``
    is taken as given, normally 0)."""
    n = len(players)
    out = {}
    for p in players:
        others = [q for q in players if q != p]
        total = 0.0
        for r in range(n):
            w = math.factorial(r) * math.factorial(n - r - 1) / math.factorial(n)
            for s in itertools.combinations(others, r):
                total += w * (values[frozenset(s) | {p}] - values[frozenset(s)])
        out[p] = total
    return out


@dataclass(frozen=True)
class Share:
    """One GEMM's statistic over seeds: mean, SE, interval and the verdict of the report's rule."""

    gemm: str
    what: str  # shapley | only | all_but
    verdict: Verdict
    z: float

    @property
    def interval(self) -> tuple[float, float] | None:
        return interval(self.verdict, self.z)

    def as_dict(self) -> dict:
        v = self.verdict
        return {"gemm": self.gemm, "what": self.what, "mean": v.mean, "se": v.se, "n": v.n,
                "interval": self.interval, "verdict": v.text}  # fmt: skip


def attribute(gaps: dict[frozenset[str], dict[int, float]], *, z: float) -> dict:
    """Shapley shares, ``only g`` and ``all but g`` gaps per GEMM, and the full gap, from
    ``gaps[subset][seed]`` (the empty subset may be absent: it is 0). Only seeds present in every
    non-empty subset are used (paired); ``missing`` lists the subsets that lack a used seed."""
    full = frozenset(GEMMS)
    need = [frozenset(s) for s in SUBSETS if s]
    seeds = sorted(set.intersection(*(set(gaps.get(s, {})) for s in need))) if need else []
    missing = [subset_name(s) for s in need if not gaps.get(s)]
    per_seed: dict[str, dict[str, list[float]]] = {
        w: {g: [] for g in GEMMS} for w in ("shapley", "only", "all_but")
    }
    full_gap: list[float] = []
    for seed in seeds:
        v = {s: gaps[s][seed] for s in need} | {frozenset(): gaps.get(frozenset(), {}).get(seed, 0.0)}
        for g, phi in shapley(v).items():
            per_seed["shapley"][g].append(phi)
            per_seed["only"][g].append(v[frozenset({g})])
            per_seed["all_but"][g].append(v[full - {g}])
        full_gap.append(v[full])
    shares = {w: {g: Share(g, w, decide(per_seed[w][g], z=z), z) for g in GEMMS} for w in per_seed}
    return {
        "seeds": seeds,
        "missing": missing,
        "full": Share("all", "full", decide(full_gap, z=z), z),
        "shares": shares,
        "z": z,
    }


def to_json(result: dict) -> dict:
    """The JSON form of :func:`attribute`'s result."""
    return {
        "seeds": result["seeds"],
        "missing": result["missing"],
        "z": result["z"],
        "full": result["full"].as_dict(),
        **{w: {g: s.as_dict() for g, s in by.items()} for w, by in result["shares"].items()},
    }


def render(result: dict) -> str:
    """A Markdown table: per GEMM its Shapley share, only-g and all-but-g gaps with intervals."""

    def cell(s: Share) -> str:
        v = s.verdict
        if v.mean is None:
            return v.text
        iv = s.interval
        return f"{v.mean:+.4f}" + (f" [{iv[0]:+.4f}, {iv[1]:+.4f}]" if iv else "") + f" ({v.text})"

    full = result["full"]
    lines = [f"full recipe gap over {len(result['seeds'])} seeds: {cell(full)}", "",
             "| GEMM | Shapley share | only this GEMM quantized | all but this GEMM |", "|---|---|---|---|"]  # fmt: skip
    sh = result["shares"]
    for g in GEMMS:
        lines.append(f"| {g} | {cell(sh['shapley'][g])} | {cell(sh['only'][g])} | {cell(sh['all_but'][g])} |")
    if result["missing"]:
        lines.append(f"\nmissing runs: {', '.join(result['missing'])}")
    return "\n".join(lines) + "\n"
