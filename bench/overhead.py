"""lowbit's training-step overhead against a plain PyTorch loop, measured in one run.

Both sides train the same model (same seed), on the same global batches, in the
same precision (BF16 parameters with FP32 master weights, or FP32), with the
same optimizer math (AdamW, warm-up + cosine, clipping at 1.0), logging the loss
every ``trainer.log_every`` steps and evaluating once at the end. lowbit runs
its real path (DeepSpeed engine, recipe, loggers writing metrics.jsonl); the
plain loop is the textbook PyTorch equivalent. Repetitions alternate between
the two so machine noise hits both; the ratio uses the medians.

    python bench/overhead.py                      # tiny model, bf16, 60 steps x 3 repetitions
    python bench/overhead.py --steps 100 +recipe=fp32
Last line: ``overhead ratio: 1.03x`` (lowbit / plain).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from train.config import RunConfig  # noqa: E402
from train.data import BatchSchedule, TokenData, eval_indices, prepare_data  # noqa: E402
from train.engine import lr_lambda, param_groups  # noqa: E402
from train.model import build_model  # noqa: E402
from train.validate import Plan, validate  # noqa: E402


def compose_config(overrides: list[str]) -> RunConfig:
    from hydra import compose, initialize_config_dir

    from train.cli import register_resolvers
    from train.config import register_configs, to_run_config

    register_configs()
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return to_run_config(compose("config", overrides=overrides))


def plain_loop(cfg: RunConfig, plan: Plan, data: TokenData) -> float:
    """The same training in plain PyTorch; returns wall seconds for all steps."""
    t = cfg.trainer
    model = build_model(cfg.model, vocab_size=data.vocab_size, seed=t.seed)
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
    start = time.perf_counter()
    for step in range(1, t.max_steps + 1):
        for idx in schedule.micro_batches(step, rank=0, world_size=1, micro_batch_size=plan.micro_batch_size):
            x, y = data.sequences(data.train_idx[idx])
            loss = model(x, y) / plan.grad_accum_steps
            loss.backward()
        if low != torch.float32:
            for p, m in zip(mparams, master):
                m.grad = p.grad.float()
                p.grad = None
        torch.nn.utils.clip_grad_norm_(master, t.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if low != torch.float32:
            with torch.no_grad():
                torch._foreach_copy_(mparams, master)
        if step % t.log_every == 0 or step == t.max_steps:
            loss.item()
    model.eval()
    with torch.no_grad():
        idx = eval_indices(data, num_sequences=t.eval_sequences)
        for lo in range(0, len(idx), plan.micro_batch_size):
            x, y = data.sequences(idx[lo : lo + plan.micro_batch_size])
            model(x, y).item()
    return time.perf_counter() - start


def lowbit_loop(cfg: RunConfig, plan: Plan, run_dir: Path) -> float:
    """lowbit's real step loop (engine set-up excluded); returns wall seconds."""
    from train.engine import reset_deepspeed_state
    from train.loop import setup, train_loop

    run = setup(cfg, plan, run_dir)
    try:
        start = time.perf_counter()
        train_loop(run)
        return time.perf_counter() - start
    finally:
        run.loggers.close()
        reset_deepspeed_state()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. +recipe=fp32 model.d_model=256")
    args = ap.parse_args()
    cfg = compose_config(
        [
            *args.overrides,
            "logger=none",
            f"trainer.max_steps={args.steps}",
            f"trainer.eval_every={10**9}",
            "parallel=single",
        ]
    )
    cfg.logger.console = False
    plan = validate(cfg, world_size=1)
    torch.set_num_threads(max(1, len(__import__("os").sched_getaffinity(0))))
    data = prepare_data(cfg.data, seq_len=cfg.model.seq_len)
    print(
        f"model={cfg.model.name} recipe={cfg.recipe.name} steps={args.steps} reps={args.reps} "
        f"threads={torch.get_num_threads()}",
        flush=True,
    )
    plain, lowbit = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            plain.append(plain_loop(cfg, plan, data))
            lowbit.append(lowbit_loop(cfg, plan, Path(tmp) / f"rep{rep}"))
            print(
                f"rep {rep + 1}/{args.reps}: plain {plain[-1] / args.steps * 1e3:.1f} ms/step, "
                f"lowbit {lowbit[-1] / args.steps * 1e3:.1f} ms/step",
                flush=True,
            )
    p, lb = statistics.median(plain), statistics.median(lowbit)
    print(f"median ms/step: plain {p / args.steps * 1e3:.1f}, lowbit {lb / args.steps * 1e3:.1f}")
    print(f"overhead ratio: {lb / p:.2f}x")


if __name__ == "__main__":
    main()
