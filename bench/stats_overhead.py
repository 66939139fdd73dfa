"""Step-time cost of lowbit's numerics statistics at a given cadence, measured in one run.

Runs lowbit's real step loop twice per round on the same config, once with
``stats.every=0`` (off) and once with the cadence under test (default: the
config's ``stats.every``), alternating which goes first from round to round;
``--warmup`` rounds are discarded. Prints the median of the per-round ratios
on / off with their spread (min..max, IQR). Cheap keys are logged every
``trainer.log_every`` steps either way; only the heavy per-layer statistics differ.
Everything else is as in ``bench.overhead`` (logger=none, one evaluation at the end).

    python -m bench.stats_overhead                        # tiny model, bf16, 100 steps x 6 rounds
    python -m bench.stats_overhead --every 10 +recipe=mxfp4_e2m1 'stats.shadow_formats=[mxfp4_e2m1]'
Last line: ``stats overhead ratio: 1.02x (min..max 1.00..1.05, IQR 0.02, 6 rounds)`` (on / off).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from functools import partial
from pathlib import Path

from bench.overhead import BENCH_OVERRIDES, Spread, lowbit_loop, run_round, use_threads, with_threads
from train.cli import compose
from train.validate import validate


def main() -> None:
    ap = argparse.ArgumentParser(
        prog="python -m bench.stats_overhead",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--reps", type=int, default=6, help="measured rounds (one run on + one run off each)")
    ap.add_argument("--warmup", type=int, default=1, help="discarded rounds before the measured ones")
    ap.add_argument("--every", type=int, default=None, help="stats.every under test (default: the config's)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.reps < 1 or args.warmup < 0:
        ap.error("--reps must be at least 1 and --warmup at least 0")
    bench = [o for o in BENCH_OVERRIDES if not o.startswith("stats.every=")]
    base = [*bench, f"trainer.max_steps={args.steps}", *args.overrides]
    on = compose([*base, *([f"stats.every={args.every}"] if args.every is not None else [])])
    off = compose([*base, "stats.every=0"])
    plan = validate(on, world_size=1)
    print(
        f"recipe={on.recipe.name} steps={args.steps} stats.every={on.stats.every} "
        f"shadow={on.stats.shadow_formats} rounds={args.reps} (+{args.warmup} warm-up) "
        f"threads={use_threads(on)}",
        flush=True,
    )
    t_on, t_off = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.warmup + args.reps):
            label = (
                f"warm-up {r + 1}/{args.warmup}" if r < args.warmup else f"{r - args.warmup + 1}/{args.reps}"
            )
            sides = (
                partial(with_threads, on, lowbit_loop, on, plan, Path(tmp) / f"on{r}"),
                partial(with_threads, off, lowbit_loop, off, plan, Path(tmp) / f"off{r}"),
            )
            swap = r % 2 == 1
            a, b = run_round(sides, swap=swap)
            if r >= args.warmup:
                t_on.append(a)
                t_off.append(b)
            print(
                f"round {label} ({'off' if swap else 'on'} first): off {b / args.steps * 1e3:.1f} ms/step, "
                f"on {a / args.steps * 1e3:.1f} ms/step, ratio {a / b:.3f}",
                flush=True,
            )
    s = Spread.of([a / b for a, b in zip(t_on, t_off)])
    a, b = statistics.median(t_on), statistics.median(t_off)
    print(f"median ms/step: off {b / args.steps * 1e3:.1f}, on {a / args.steps * 1e3:.1f}")
    print(
        f"stats overhead ratio: {s.median:.2f}x (min..max {s.lo:.2f}..{s.hi:.2f}, IQR {s.iqr:.2f}, {s.n} rounds)"
    )


if __name__ == "__main__":
    main()
