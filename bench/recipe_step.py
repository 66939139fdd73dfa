"""Benchmark the training step of each emulated MX / FP8 recipe relative to the BF16 recipe.

Every recipe runs the trainer's own path on the same model and batch:
``build_model`` -> ``recipe.resolve_backend`` -> ``recipe.convert`` ->
``train.engine.build_engine`` (DeepSpeed bf16 engine: BF16 params, FP32 master
weights, AdamW) -> per step ``engine(x, y)`` under ``recipe.forward_context()``,
``engine.backward``, ``engine.step``, ``recipe.on_optimizer_step``.

All engines are built first, then stepped **interleaved round-robin** (one
step of each recipe per round), so load drift on a shared machine hits every
recipe alike; the table shows the median step time over ``--steps`` rounds
after ``--warmup`` rounds, and the ratio to BF16 measured in this run.
``--compile`` adds a compiled twin of each recipe (``recipe.compile=true``);
its first steps compile the quantizers (reported as ``warm-up s``).

    python bench/recipe_step.py                      # eager, tiny model, 2 threads
    python bench/recipe_step.py --compile --recipes mxfp8_e4m3 mxfp4_e2m1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402

from recipes.base import get_recipe  # noqa: E402
from recipes.emulated import EMULATED_RECIPES  # noqa: E402
from train import distenv  # noqa: E402
from train.cli import register_resolvers  # noqa: E402
from train.config import RunConfig, register_configs, to_run_config  # noqa: E402
from train.engine import build_engine, init_distributed  # noqa: E402
from train.model import build_model  # noqa: E402
from train.validate import validate  # noqa: E402


def compose_cfg(overrides: list[str]) -> RunConfig:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return to_run_config(compose("config", overrides=overrides))


class Contender:
    """One recipe's engine, ready to step."""

    def __init__(self, label: str, recipe_name: str, extra: list[str], common: list[str]):
        cfg = compose_cfg([f"+recipe={recipe_name}", *common, *extra])
        plan = validate(cfg, world_size=1)
        self.label = label
        self.recipe = get_recipe(cfg.recipe)
        self.recipe.backend, _ = self.recipe.resolve_backend(plan.device)
        model = build_model(cfg.model, vocab_size=cfg.model.vocab_size or 256, seed=cfg.trainer.seed)
        self.recipe.convert(model)
        self.engine = build_engine(model, cfg, plan)
        self.times: list[float] = []
        self.warmup_s = 0.0

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        t0 = time.perf_counter()
        with self.recipe.forward_context():
            loss = self.engine(x, y)
        self.engine.backward(loss)
        self.engine.step()
        self.recipe.on_optimizer_step()
        return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=list(EMULATED_RECIPES))
    p.add_argument("--steps", type=int, default=15, help="timed rounds (one step of every recipe per round)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also time each recipe with recipe.compile=true")
    p.add_argument("--no-eager", action="store_true", help="with --compile: skip the eager rows")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default="tiny")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    register_configs()
    register_resolvers()
    common = [f"model={args.model}", f"trainer.global_batch_size={args.batch}", "trainer.max_steps=1000000",
              "logger=none", "trainer.device=cpu"]  # fmt: skip
    distenv.export(distenv.detect())
    init_distributed("cpu")

    contenders = [Contender("bf16", "bf16", [], common)]
    for name in args.recipes:
        if not args.no_eager:
            contenders.append(Contender(name, name, ["recipe.compile=false"], common))
        if args.compile:
            contenders.append(Contender(f"{name} (compiled)", name, ["recipe.compile=true"], common))
    cfg = compose_cfg(common)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.batch, cfg.model.seq_len), generator=g)
    y = torch.randint(0, 256, (args.batch, cfg.model.seq_len), generator=g)

    for c in contenders:  # warm-up (compilation happens here)
        c.warmup_s = sum(c.step(x, y) for _ in range(args.warmup))
    for _ in range(args.steps):
        for c in contenders:
            c.times.append(c.step(x, y))

    base = statistics.median(contenders[0].times)
    print(f"model={args.model} batch={args.batch}x{cfg.model.seq_len} threads={args.threads} "
          f"rounds={args.steps} (interleaved) torch={torch.__version__}")  # fmt: skip
    print(f"{'recipe':<28} {'median ms':>10} {'min ms':>8} {'x BF16':>7} {'warm-up s':>10}")
    for c in contenders:
        med = statistics.median(c.times)
        print(
            f"{c.label:<28} {med * 1e3:>10.1f} {min(c.times) * 1e3:>8.1f} {med / base:>7.2f} {c.warmup_s:>10.1f}"
        )


if __name__ == "__main__":
    main()
