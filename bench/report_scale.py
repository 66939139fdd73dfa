"""How long ``python -m train.report`` takes on a large sweep: the table, and the whole report.

Writes a synthetic sweep once (default: 50 runs = 5 recipes x 10 seeds, 10k logged steps each,
~10 keys per row and ~100 more every 50 steps: 12 layers x 8 statistics; real ``run_config.yaml``
from a tiny run's shape), then times, per round: reading every ``metrics.jsonl`` and building the
comparison table (``table``), and the whole report with every plot and file (``report``). The
must-hold: table < 10 s, report < 60 s on the 2-core CI machine. Prints the median and spread.

    python -m bench.report_scale                       # 50 runs x 10k steps, 3 rounds
    python -m bench.report_scale --runs 4 --steps 200 --reps 1   # smoke
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from bench.overhead import Spread

LAYERS = [f"blocks.{i // 4}.{n}" for i, n in enumerate(["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"] * 3)]
STATS = (
    "norm",
    "absmax",
    "zero_frac",
    "underflow_frac",
    "overflow_frac",
    "sqnr_db",
    "rel_error",
    "weight_norm",
)


def write_sweep(root: Path, *, runs: int, steps: int, recipes: int = 5, stat_every: int = 50) -> Path:
    rng = np.random.default_rng(0)
    names = ["bf16"] + [f"synthetic_{i}" for i in range(1, recipes)]
    t = np.arange(1, steps + 1)
    for j in range(runs):
        recipe, seed = names[j % recipes], 1 + j // recipes
        d = root / str(j)
        d.mkdir(parents=True)
        cfg = {
            "config": {
                "model": {"name": "tiny", "d_model": 128, "seq_len": 128},
                "data": {"name": "shakespeare"},
                "parallel": {"name": "single", "zero_stage": 0},
                "trainer": {"seed": seed, "global_batch_size": 16},
                "recipe": {"name": recipe, "backend": "auto"},
            },
            "resolved": {"recipe": {"resolved_backend": "native" if recipe == "bf16" else "emulated"}},
            "fingerprints": {"init_weights": f"w{seed}", "data_order": f"d{seed}", "data": "x"},
            "env": {"git_sha": "0" * 40, "packages": {"torch": "2.13.0", "deepspeed": "0.19.8"}},
        }
        (d / "run_config.yaml").write_text(yaml.safe_dump(cfg))
        loss = 5.5 * np.exp(-t / 2000) + 1.5 + 0.002 * (j % recipes) + 0.01 * rng.standard_normal(steps)
        with open(d / "metrics.jsonl", "w") as f:
            for i, step in enumerate(t.tolist()):
                row = {"step": step, "train/loss": float(loss[i]), "train/lr": 1e-3, "train/grad_norm": 1.0,
                       "perf/step_time_s": 0.05, "perf/tokens_per_s": 4e4, "perf/tokens_per_s_per_device": 4e4,
                       "perf/tflops": 0.1, "perf/data_time_frac": 0.01, "perf/max_rss_gib": 0.6,
                       "div/spike": 0.0}  # fmt: skip
                if step % stat_every == 0:
                    row.update({f"grad/{layer}/{s}": float(rng.random()) for layer in LAYERS for s in STATS})
                f.write(json.dumps(row) + "\n")
        (d / "summary.json").write_text(json.dumps({"state": "completed", "final/step": steps}))
    return root


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.report_scale", description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    from train.review.compare import ReportConfig, compare, table
    from train.review.runs import find_run_dirs, load_run

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        sweep = write_sweep(Path(tmp) / "sweep", runs=args.runs, steps=args.steps)
        size = sum(p.stat().st_size for p in sweep.rglob("metrics.jsonl")) / 2**20
        print(f"synthetic sweep: {args.runs} runs x {args.steps} steps, {size:.0f} MiB of metrics.jsonl "
              f"(written in {time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
        t_table, t_report = [], []
        for rep in range(args.reps):
            t0 = time.perf_counter()
            runs = [load_run(d) for d in find_run_dirs([sweep])]
            table(compare(runs, ReportConfig()))
            t_table.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            from train.report import _args, build

            build(*_args([str(sweep), "--out", str(Path(tmp) / f"report{rep}")]))
            t_report.append(time.perf_counter() - t0)
            print(
                f"round {rep + 1}/{args.reps}: table {t_table[-1]:.2f} s, report {t_report[-1]:.2f} s",
                flush=True,
            )
    print("| what | median s | spread | rounds | must hold |")
    print("|---|---|---|---|---|")
    for what, vals, limit in (("table", t_table, 10), ("report", t_report, 60)):
        s = Spread.of(vals)
        print(f"| {what} | {s.median:.2f} | {s.text()} | {s.n} | < {limit} s |")


if __name__ == "__main__":
    main()
