"""Step-time cost of lowbit's numerics statistics at a given cadence, measured in one run.

Runs lowbit's real step loop twice per repetition on the same config, once with
``stats.every=0`` (off) and once with the cadence under test (default: the
default ``stats.every``), alternating so machine noise hits both; prints the
ratio of the medians. Cheap keys are logged every ``trainer.log_every`` steps
either way; only the heavy per-layer statistics differ.

    python bench/stats_overhead.py                               # tiny model, bf16, 100 steps x 3
    python bench/stats_overhead.py --every 10 +recipe=mxfp4_e2m1 'stats.shadow_formats=[mxfp4_e2m1]'
Last line: ``stats overhead ratio: 1.02x`` (on / off).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from overhead import compose_config, lowbit_loop  # noqa: E402

from train.validate import validate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--every", type=int, default=None, help="stats.every under test (default: the config's)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    base = [*args.overrides, "logger=none", f"trainer.max_steps={args.steps}", f"trainer.eval_every={10**9}"]
    on = compose_config(base + ([f"stats.every={args.every}"] if args.every is not None else []))
    off = compose_config(base + ["stats.every=0"])
    for cfg in (on, off):
        cfg.logger.console = False
    plan = validate(on, world_size=1)
    torch.set_num_threads(max(1, len(__import__("os").sched_getaffinity(0))))
    print(
        f"recipe={on.recipe.name} steps={args.steps} stats.every={on.stats.every} "
        f"shadow={on.stats.shadow_formats} reps={args.reps}",
        flush=True,
    )
    t_on, t_off = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            t_off.append(lowbit_loop(off, plan, Path(tmp) / f"off{rep}"))
            t_on.append(lowbit_loop(on, plan, Path(tmp) / f"on{rep}"))
            print(
                f"rep {rep + 1}/{args.reps}: off {t_off[-1] / args.steps * 1e3:.1f} ms/step, "
                f"on {t_on[-1] / args.steps * 1e3:.1f} ms/step",
                flush=True,
            )
    a, b = statistics.median(t_on), statistics.median(t_off)
    print(f"median ms/step: off {b / args.steps * 1e3:.1f}, on {a / args.steps * 1e3:.1f}")
    print(f"stats overhead ratio: {a / b:.2f}x")


if __name__ == "__main__":
    main()
