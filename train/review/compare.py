"""From runs to the report's comparison: references, pairing, refusals, one row per recipe.

The reference of a run is its own ``div/`` keys when it trained against one (lockstep or
``reference.run_dir``), else the same-seed run of the sweep whose recipe is ``report.reference``
(``bf16`` by default). A run whose model, data, seed, batch schedule or initial-weight / data
fingerprints differ from its reference's is refused from the comparison, with the reason
(``train.telemetry.divergence.reference_mismatch``, the check ``reference.run_dir`` uses).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from train.review.runs import Run
from train.review.verdict import Verdict, decide, first_nonfinite_step, own_delta, seed_delta
from train.telemetry.divergence import reference_mismatch

LOSS = "train/loss"


@dataclass(frozen=True)
class ReportConfig:
    z: float = 2.0  # report.z: |mean delta| < z x SE is "indistinguishable"
    last_k: int = 10  # report.last_k: logged steps averaged at the end of each run
    reference: str = "bf16"  # report.reference: the recipe whose same-seed run is the reference


@dataclass
class RecipeRow:
    recipe: str
    runs: list[Run]
    verdict: Verdict
    deltas: dict[int, float] = field(default_factory=dict)  # seed -> delta
    backend: str = ""
    gemm_impl: str = ""
    final_loss: float | None = None
    divergence_step: int | None = None
    tokens_per_s: float | None = None
    speedup: float | None = None
    mfu: float | None = None
    memory_gib: float | None = None
    provenance: dict[str, str] = field(default_factory=dict)

    @property
    def seeds(self) -> list[int]:
        return sorted({r.seed for r in self.runs})

    @property
    def delta_text(self) -> str:
        v = self.verdict
        if v.mean is None:
            return ""
        return f"{v.mean:+.4f}" + (f" +- {v.se:.4f}" if v.se is not None else "")


@dataclass
class Comparison:
    config: ReportConfig
    rows: list[RecipeRow]
    excluded: list[Run]
    references: dict[int, Run]  # seed -> the sweep's reference run


def references_by_seed(runs: list[Run], recipe: str) -> dict[int, Run]:
    out: dict[int, Run] = {}
    for r in runs:
        if r.recipe == recipe and r.seed not in out and len(r.series.get(LOSS)[0]):
            out[r.seed] = r
    return out


def _mean_last(r: Run, key: str, k: int | None = None) -> float | None:
    """Mean of the last ``k`` finite values of ``key`` (every one when ``k`` is None)."""
    _, v = r.series.get(key)
    v = v[np.isfinite(v)]
    v = v[-k:] if k else v
    return float(v.mean()) if len(v) else None


def _mean_of(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def run_delta(run: Run, ref: Run | None, *, k: int) -> float | None:
    if run.has_own_reference:
        steps, d = run.series.get("div/loss_delta")
        ok = np.isfinite(d)
        return own_delta(steps[ok], d[ok], k=k)
    if ref is None or ref is run:
        return None
    s, v = run.series.get(LOSS)
    rs, rv = ref.series.get(LOSS)
    ok, rok = np.isfinite(v), np.isfinite(rv)
    return seed_delta(s[ok], v[ok], rs[rok], rv[rok], k=k)


def compare(runs: list[Run], cfg: ReportConfig) -> Comparison:
    refs = references_by_seed(runs, cfg.reference)
    excluded: list[Run] = []
    for r in runs:
        ref = refs.get(r.seed)
        if r.has_own_reference or ref is None or ref is r or not r.config or not ref.config:
            continue
        why = reference_mismatch(r.config, ref.config)
        if why:
            r.excluded = f"refused: {why} (reference {ref.name})"
            excluded.append(r)
    kept = [r for r in runs if not r.excluded]
    recipes = list(dict.fromkeys(r.recipe for r in kept))
    ref_tps = _mean_of([_mean_last(r, "perf/tokens_per_s") for r in refs.values()])
    rows = []
    for name in recipes:
        members = sorted((r for r in kept if r.recipe == name), key=lambda r: r.seed)
        deltas = {
            r.seed: d for r in members if (d := run_delta(r, refs.get(r.seed), k=cfg.last_k)) is not None
        }
        diverged = [s for r in members if (s := first_nonfinite_step(*r.series.get(LOSS))) is not None]
        verdict = decide(
            list(deltas.values()),
            z=cfg.z,
            states=[r.state for r in members],
            diverged_at=diverged,
            is_reference=name == cfg.reference and not any(r.has_own_reference for r in members),
        )
        tps = _mean_of([_mean_last(r, "perf/tokens_per_s") for r in members])
        first_div = [s for r in members if (s := r.summary.get("div/first_divergence_step")) is not None]
        rows.append(
            RecipeRow(
                recipe=name,
                runs=members,
                verdict=verdict,
                deltas=deltas,
                backend=", ".join(dict.fromkeys(r.backend for r in members)),
                gemm_impl="; ".join(dict.fromkeys(r.gemm_impl for r in members if r.gemm_impl)),
                final_loss=_mean_of([_mean_last(r, LOSS, 1) for r in members]),
                divergence_step=min(first_div) if first_div else None,
                tokens_per_s=tps,
                speedup=tps / ref_tps if tps and ref_tps else None,
                mfu=_mean_of([_mean_last(r, "perf/mfu_bf16_peak") for r in members]),
                memory_gib=_max_memory(members),
                provenance=members[0].provenance if members else {},
            )
        )
    return Comparison(cfg, rows, excluded, refs)


def _max_memory(runs: list[Run]) -> float | None:
    out: list[float] = []
    for r in runs:
        for key in ("perf/max_memory_allocated_gib", "perf/max_rss_gib"):
            _, v = r.series.get(key)
            if len(v):
                out.append(float(np.nanmax(v)))
                break
    return max(out) if out else None


def table(cmp: Comparison) -> tuple[list[str], list[list[Any]]]:
    """The summary table (header, rows of plain values): HTML, CSV, Markdown and the terminal share it."""
    header = ["recipe", "backend", "GEMM implementation", "seeds", "final loss", "delta vs reference (+- SE)",
              "verdict", "divergence step", "tokens/s", "speedup vs reference", "MFU (BF16 peak)",
              "memory GiB", "git", "torch", "deepspeed", "runs"]  # fmt: skip
    rows = []
    for r in cmp.rows:
        rows.append([
            r.recipe, r.backend, r.gemm_impl, " ".join(map(str, r.seeds)),
            _fmt(r.final_loss, ".4f"), r.delta_text, r.verdict.text,
            "" if r.divergence_step is None else r.divergence_step,
            _fmt(r.tokens_per_s, ".0f"), _fmt(r.speedup, ".2f", "x"), _fmt(r.mfu, ".1%"),
            _fmt(r.memory_gib, ".2f"), r.provenance.get("git", ""), r.provenance.get("torch", ""),
            r.provenance.get("deepspeed", ""), " ".join(f"{m.name}:{m.state}" for m in r.runs),
        ])  # fmt: skip
    return header, rows


def _fmt(v: float | None, spec: str, suffix: str = "") -> str:
    return "" if v is None else format(v, spec) + suffix
