"""Does ``div/warning`` come before the loss goes wrong? The early-warning evaluation, in one command.

Runs ``python train/run.py`` (BF16 unless overridden, tiny model, ``stats.every=2
trainer.log_every=1``) for each of ``--seeds`` seeds without an inducer, then under two spike
inducers switched on at step ``--at``, each trained against its same-seed plain run
(``reference.run_dir``: same weights, same batches, so every difference is the inducer's):

* ``lr``: the learning rate raised ``--lr-boost`` (10) x from that step on (``debug.lr_boost_at_step``);
* ``outlier``: one input feature of ``debug.inject_layer`` (default ``blocks.0.mlp.fc``) grows
  ``--growth`` x per step (``debug.inject_outlier_at_step``).

The rule's thresholds are fixed in ``train/telemetry/earlywarn.py`` (with their sources) and
are not tuned here. Per run it prints the first warning at or after the inducer and two events:
the first ``div/spike`` at or after it (a sudden jump of the loss over its own last 20 steps)
and ``div/first_divergence_step`` (the EMA of the loss's relative gap to the plain run passes
``reference.threshold``, 1 %: a slow departure that no spike rule sees), each with the lead
time (event step - warning step; a warning after the event, or none, is a miss), and the
warnings before the inducer (false warnings); on the plain runs every warning is false. Goals
(the telemetry issue): a lead of at least 10 steps in at least 5 of the 6 induced runs, no false
warning on the plain runs. ``--out DIR`` keeps the runs; a run already completed there is read
back, not re-run.

    python -m bench.early_warning                       # 9 runs, about 1 min each on 2 CPU cores
    python -m bench.early_warning --seeds 1 --steps 120 +recipe=mxfp8_e4m3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from train.sweep_index import run_state

ROOT = Path(__file__).resolve().parents[1]
INDUCERS = {"none": None, "lr": "debug.lr_boost_at_step", "outlier": "debug.inject_outlier_at_step"}
BASE = ["stats.every=2", "trainer.log_every=1", "stats.families=[act,update,opt]", "logger=none",
        "trainer.checkpoint_every=0"]  # fmt: skip


def run_one(
    out: Path, *, seed: int, inducer: str, at: int, steps: int, inducer_args: list[str], overrides: list[str]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One run (read back when ``out`` already holds it completed): its rows and its summary."""
    run_dir = out / f"{inducer}_seed{seed}"
    done = run_dir / "summary.json"
    if run_state(run_dir)[0] != "completed":
        argv = [*BASE, f"trainer.max_steps={steps}", f"trainer.eval_every={steps}", f"trainer.seed={seed}",
                f"hydra.run.dir={run_dir}", *overrides]  # fmt: skip
        if INDUCERS[inducer]:
            argv += [
                f"{INDUCERS[inducer]}={at}",
                *inducer_args,
                f"reference.run_dir={out / f'none_seed{seed}'}",
            ]
        proc = subprocess.run(
            [sys.executable, "train/run.py", *argv], cwd=ROOT, capture_output=True, text=True
        )
        if proc.returncode != 0:
            sys.exit(f"{run_dir.name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows, json.loads(done.read_text())


def evaluate(rows: list[dict[str, Any]], summary: dict[str, Any], *, at: int | None) -> dict[str, Any]:
    """First warning, spike and divergence at or after ``at`` (None: a plain run), leads, false warnings."""
    start = at if at is not None else 10**9
    warn = [r["step"] for r in rows if r.get("div/warning")]
    first_warn = next((s for s in warn if s >= start), None)
    first_spike = next((r["step"] for r in rows if r.get("div/spike") and r["step"] >= start), None)
    diverged = summary.get("div/first_divergence_step") if at is not None else None

    def lead(event: int | None) -> int | None:
        return event - first_warn if first_warn is not None and event is not None else None

    signal = next((r.get("div/warning_signal") for r in rows if r["step"] == first_warn), None)
    return {"first_warning": first_warn, "first_spike": first_spike, "spike_lead": lead(first_spike),
            "first_divergence": diverged, "divergence_lead": lead(diverged), "signal": signal,
            "false_warnings": [s for s in warn if s < start]}  # fmt: skip


def goals(results: list[dict[str, Any]], event: str) -> str:
    """The goal line for one event (``spike`` or ``divergence``)."""
    induced = [r for r in results if r["inducer"] != "none"]
    hit = [r for r in induced if r[f"first_{event}"] is not None]
    good = [r for r in hit if (r[f"{event}_lead"] or -1) >= 10]
    return f"lead >= 10 steps to the first {event}: {len(good)} of {len(hit)} runs with one ({len(induced)} induced; goal: >= 5 of 6)"


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.early_warning", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--at", type=int, default=80, help="the step the inducers switch on")
    ap.add_argument("--lr-boost", type=float, default=10.0, help="the lr inducer's factor (debug.lr_boost)")
    ap.add_argument(
        "--growth",
        type=float,
        default=1.25,
        help="the outlier's growth per step (debug.inject_outlier_growth)",
    )
    ap.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary dir)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = ap.parse_args()
    if not 0 < args.at < args.steps:
        ap.error("--at must lie inside the run (0 < --at < --steps)")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        todo = [(ind, s) for ind in INDUCERS for s in range(1, args.seeds + 1)]
        extra = {"none": [], "lr": [f"debug.lr_boost={args.lr_boost}"],
                 "outlier": [f"debug.inject_outlier_growth={args.growth}"]}  # fmt: skip
        for i, (inducer, seed) in enumerate(todo, 1):
            print(f"[{i}/{len(todo)}] {inducer} seed {seed} ...", flush=True)
            rows, summary = run_one(out, seed=seed, inducer=inducer, at=args.at, steps=args.steps,
                                    inducer_args=extra[inducer], overrides=args.overrides)  # fmt: skip
            res = evaluate(rows, summary, at=args.at if inducer != "none" else None)
            results.append({"inducer": inducer, "seed": seed, **res})
        print(f"\n| inducer | seed | first warning (step >= {args.at}) | first spike | lead | first divergence | lead "
              "| signal | false warnings |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|")
        for r in results:
            print(f"| {r['inducer']} | {r['seed']} | {r['first_warning']} | {r['first_spike']} | {r['spike_lead']} | "
                  f"{r['first_divergence']} | {r['divergence_lead']} | {r['signal'] or ''} | "
                  f"{len(r['false_warnings'])} {r['false_warnings'][:5]} |")  # fmt: skip
        false_plain = sum(len(r["false_warnings"]) for r in results if r["inducer"] == "none")
        print(f"\n{goals(results, 'spike')}\n{goals(results, 'divergence')}")
        print(f"false warnings on the plain runs: {false_plain} (goal: 0)")
        (out / "early_warning.json").write_text(json.dumps(results, indent=1) + "\n")
        if args.out:
            print(f"runs and early_warning.json in {out}")


if __name__ == "__main__":
    main()
