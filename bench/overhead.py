"""lowbit's training-step overhead against a plain PyTorch loop, measured in one run.

Both sides train the same model (same seed), on the same global batches, in the
same precision (BF16 parameters with FP32 master weights, or FP32), with the
same optimizer math (AdamW, warm-up + cosine, clipping at 1.0), on the same
device and thread count, logging loss, lr and grad norm every
``trainer.log_every`` steps (lowbit: its metrics row -> ``metrics.jsonl``; plain:
one JSON line per log step) and evaluating once at the end. lowbit runs its real
path (``train.assemble.setup`` then ``train.loop.train_loop``: DeepSpeed engine,
recipe, telemetry, loggers); the plain loop is the textbook PyTorch equivalent.

Switched off because the plain loop has no counterpart (legitimate for an
overhead bench; their cost is measured elsewhere or is opt-in):
``logger=none`` (no W&B run, no console line; metrics.jsonl is still written),
``stats.every=0`` (the per-layer numerics statistics, default every 50 steps:
priced by ``python -m bench.stats_overhead``), ``trainer.eval_every`` past the
end (one evaluation at the last step on both sides), ``trainer.checkpoint_every=0``,
``parallel=single``.

Timing: set-up is outside the clock on both sides (lowbit: data, model, recipe,
engine, loggers, run files; plain: model, master copy, optimizer). The clock
covers the steps and the final evaluation, and ends after a device synchronize.

Noise: one round runs, per recipe, lowbit and plain back to back, alternating
which goes first from round to round (and from recipe to recipe); ``--warmup``
rounds are discarded. Each round gives a ratio lowbit / plain; the summary is the
median ratio with its spread (min..max and interquartile range of the per-round
ratios) and the median seconds of each side. On a shared machine compare the
ratio, not the seconds. The default ``--reps`` is even so that, per recipe, each
side goes first equally often (the second run of a pair can profit from the
first's warm caches and allocator).

    python -m bench.overhead                        # tiny model, bf16 and fp32, 60 steps, 8 rounds
    python -m bench.overhead --recipes fp32 --steps 100 --reps 10 model.d_model=256
Last lines: a Markdown table ``| recipe | lowbit s | plain s | ratio (median) | spread | rounds |``
for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from train import distenv, hostmem
from train.cli import compose
from train.config import RunConfig
from train.data import BatchSchedule, TokenData, eval_indices, prepare_data
from train.engine import lr_lambda, param_groups
from train.model import build_model
from train.validate import Plan, validate

#: overrides that switch off what the plain loop has no counterpart for (see the docstring)
BENCH_OVERRIDES = (
    "logger=none",
    "stats.every=0",
    f"trainer.eval_every={10**9}",
    "trainer.checkpoint_every=0",
    "parallel=single",
)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def plain_loop(cfg: RunConfig, plan: Plan, data: TokenData, run_dir: Path) -> float:
    """The same training in plain PyTorch; returns wall seconds for all steps and the evaluation."""
    t, dev = cfg.trainer, plan.device
    model = build_model(cfg.model.resolve(data.vocab_size), seed=t.seed).to(dev)
    low = {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg.recipe.precision]
    params = list(model.parameters())
    master = [p.detach().clone().float() for p in params] if low != torch.float32 else params
    model.to(low)
    by_id = {id(p): m for p, m in zip(model.parameters(), master)}
    groups = [
        {"params": [by_id[id(p)] for p in g["params"]], "weight_decay": g["weight_decay"]}
        for g in param_groups(model, weight_decay=t.weight_decay)
    ]
    opt = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: lr_lambda(s, max_steps=t.max_steps, warmup_frac=t.warmup_frac, min_ratio=t.min_lr_ratio),
    )
    schedule = BatchSchedule(len(data.train_idx), global_batch_size=t.global_batch_size, seed=t.seed)
    mparams = list(model.parameters())
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "a") as log:
        sync(dev)
        start = time.perf_counter()
        for step in range(1, t.max_steps + 1):
            lr, losses = sched.get_last_lr()[0], []
            for idx in schedule.micro_batches(
                step, rank=0, world_size=1, micro_batch_size=plan.micro_batch_size
            ):
                x, y = (v.to(dev, non_blocking=True) for v in data.sequences(data.train_idx[idx]))
                loss = model(x, y)
                (loss / plan.grad_accum_steps).backward()
                losses.append(loss.detach())
            if low != torch.float32:
                for p, m in zip(mparams, master):
                    m.grad = p.grad.float()
                    p.grad = None
            norm = torch.nn.utils.clip_grad_norm_(master, t.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if low != torch.float32:
                with torch.no_grad():
                    torch._foreach_copy_(mparams, master)
            if step % t.log_every == 0 or step == t.max_steps:
                row = {"train/loss": torch.stack(losses).float().mean().item(), "train/lr": lr}
                log.write(json.dumps({"step": step, **row, "train/grad_norm": norm.item()}) + "\n")
                log.flush()
        model.eval()
        with torch.no_grad():
            idx = eval_indices(data, num_sequences=t.eval_sequences)
            for lo in range(0, len(idx), plan.micro_batch_size):
                x, y = (v.to(dev) for v in data.sequences(idx[lo : lo + plan.micro_batch_size]))
                model(x, y).item()
        sync(dev)
        return time.perf_counter() - start


def lowbit_loop(cfg: RunConfig, plan: Plan, run_dir: Path) -> float:
    """lowbit's real step loop, set-up excluded as in ``plain_loop``; returns wall seconds."""
    from train.assemble import setup
    from train.engine import reset_deepspeed_state
    from train.loop import train_loop

    run = None
    try:
        run = setup(cfg, plan, run_dir)
        sync(plan.device)
        start = time.perf_counter()
        train_loop(run)
        sync(plan.device)
        return time.perf_counter() - start
    finally:  # the teardown of train.loop.run_training, so the next round starts clean
        if run is not None:
            run.loggers.close()
            run.guard.restore()
        reset_deepspeed_state()


def bench_config(recipe: str, overrides: list[str], *, steps: int) -> tuple[RunConfig, Plan]:
    """The bench's config for ``+recipe=RECIPE``; ``overrides`` come last, so they may turn
    back on what ``BENCH_OVERRIDES`` turns off (e.g. ``stats.every=50``)."""
    cfg = compose([f"+recipe={recipe}", *BENCH_OVERRIDES, f"trainer.max_steps={steps}", *overrides])
    return cfg, validate(cfg, world_size=1)


def use_threads(cfg: RunConfig) -> int:
    """The thread count ``setup`` gives a single rank; set before each side so both use it."""
    n = distenv.threads_per_rank(configured=cfg.launcher.omp_threads, local_world_size=1)
    torch.set_num_threads(n)
    return n


def with_threads(cfg: RunConfig, side: Callable[..., float], *args: object) -> float:
    use_threads(cfg)
    return side(*args)


def run_round(sides: tuple[Callable[[], float], Callable[[], float]], *, swap: bool) -> tuple[float, float]:
    """Run both sides once (the second first when ``swap``); their seconds in the given order."""
    if swap:
        b = sides[1]()
        return sides[0](), b
    a = sides[0]()
    return a, sides[1]()


@dataclass(frozen=True)
class Spread:
    """The median of per-round values and how far they spread."""

    median: float
    lo: float
    hi: float
    iqr: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
        return cls(statistics.median(values), min(values), max(values), q[2] - q[0], len(values))

    def text(self) -> str:
        return f"{self.lo:.3f}..{self.hi:.3f}, IQR {self.iqr:.3f}"


def markdown_table(rows: list[tuple[str, float, float, Spread]]) -> list[str]:
    """``rows``: (recipe, median lowbit s, median plain s, spread of the ratio)."""
    out = [
        "| recipe | lowbit s | plain s | ratio (median) | spread | rounds |",
        "|---|---|---|---|---|---|",
    ]
    for name, lb, pl, s in rows:
        out.append(f"| {name} | {lb:.3f} | {pl:.3f} | {s.median:.3f} | {s.text()} | {s.n} |")
    return out


Case = tuple[RunConfig, Plan, TokenData]


def measure(cases: dict[str, Case], *, steps: int, reps: int, warmup: int) -> dict[str, tuple[list, list]]:
    """Seconds per run of each recipe, (lowbit, plain), over ``reps`` rounds after ``warmup``
    discarded ones. Within a round the recipes run in turn, each as lowbit + plain back to
    back; which side goes first alternates between rounds and between neighbouring recipes."""
    times: dict[str, tuple[list, list]] = {name: ([], []) for name in cases}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(warmup + reps):
            label = f"warm-up {r + 1}/{warmup}" if r < warmup else f"{r - warmup + 1}/{reps}"
            for i, (name, (cfg, plan, data)) in enumerate(cases.items()):
                run_dir = Path(tmp) / f"{name}-r{r}"
                sides = (
                    partial(with_threads, cfg, lowbit_loop, cfg, plan, run_dir / "lowbit"),
                    partial(with_threads, cfg, plain_loop, cfg, plan, data, run_dir / "plain"),
                )
                swap = (r + i) % 2 == 1
                lb, pl = run_round(sides, swap=swap)
                if r >= warmup:
                    times[name][0].append(lb)
                    times[name][1].append(pl)
                print(
                    f"round {label} {name} ({'plain' if swap else 'lowbit'} first): "
                    f"lowbit {lb / steps * 1e3:.1f} ms/step, plain {pl / steps * 1e3:.1f} ms/step, "
                    f"ratio {lb / pl:.3f}",
                    flush=True,
                )
    return times


def main() -> None:
    ap = argparse.ArgumentParser(
        prog="python -m bench.overhead",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    ap.add_argument("--reps", type=int, default=8, help="measured rounds (one lowbit + one plain run each)")
    ap.add_argument("--warmup", type=int, default=1, help="discarded rounds before the measured ones")
    ap.add_argument("--recipes", nargs="+", default=["bf16", "fp32"], help="recipes (+recipe=NAME) to bench")
    ap.add_argument(
        "overrides", nargs="*", help="Hydra overrides for every recipe (last), e.g. model.d_model=256"
    )
    args = ap.parse_args()
    if any(o.lstrip("+~").split("=", 1)[0] == "recipe" for o in args.overrides):
        ap.error("choose recipes with --recipes, not a recipe= override")
    if args.reps < 1 or args.warmup < 0:
        ap.error("--reps must be at least 1 and --warmup at least 0")
    cases: dict[str, Case] = {}
    for name in args.recipes:
        cfg, plan = bench_config(name, args.overrides, steps=args.steps)
        cases[name] = (cfg, plan, prepare_data(cfg.data, seq_len=cfg.model.seq_len))
    cfg0, plan0, _ = cases[args.recipes[0]]
    # lowbit's set-up applies launcher.host_malloc process-wide: apply it first, so both sides
    # run under the same allocator policy from the first round on
    malloc_note = hostmem.apply(cfg0.launcher.host_malloc)
    print(
        f"model={cfg0.model.name} recipes={','.join(args.recipes)} steps={args.steps} rounds={args.reps} "
        f"(+{args.warmup} warm-up) device={plan0.device} threads={use_threads(cfg0)} torch={torch.__version__}; "
        f"{malloc_note}",
        flush=True,
    )
    times = measure(cases, steps=args.steps, reps=args.reps, warmup=args.warmup)
    rows = []
    for name, (lbs, pls) in times.items():
        s = Spread.of([a / b for a, b in zip(lbs, pls)])
        lb, pl = statistics.median(lbs), statistics.median(pls)
        rows.append((name, lb, pl, s))
        print(
            f"{name}: ratio lowbit/plain median {s.median:.3f} (min..max {s.lo:.3f}..{s.hi:.3f}, "
            f"IQR {s.iqr:.3f}, {s.n} rounds); median s: lowbit {lb:.3f}, plain {pl:.3f}"
        )
    print(f"\n{args.steps} steps per run, model {cfg0.model.name}, {plan0.device}:")
    print("\n".join(markdown_table(rows)), flush=True)


if __name__ == "__main__":
    main()
