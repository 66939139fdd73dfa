"""What a command would train, without training: the resolved config, the batch layout,
the recipe's conversion of the model, its numerics, and the FLOPs per token.

    python -m train.dryrun +recipe=nvfp4 model=125m parallel=zero2 launcher.nproc_per_node=8
    python -m train.dryrun --json +recipe=mxfp8 > plan.json

Everything runs on the meta device (no memory, no data download, no process group), so it
answers in seconds for any model size; it is also the reference use of the tools' convention
(``train.cli.tool_args``): the tool's flags first, then Hydra overrides.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

from recipes.base import get_recipe
from recipes.errors import ConfigError
from train.cli import config_error_exit, tool_args
from train.config import RunConfig
from train.data import nominal_vocab_size
from train.validate import validate


def dry_run(cfg: RunConfig, *, world_size: int) -> dict[str, Any]:
    import torch

    from train.model import GPT, count_params
    from train.telemetry.perf import flops_per_token

    plan = validate(cfg, world_size=world_size)
    model_cfg = cfg.model.resolve(nominal_vocab_size(cfg.data))
    with torch.device("meta"):
        model = GPT(model_cfg)
    recipe = get_recipe(cfg.recipe)
    note = recipe.resolve(plan.device)
    report = recipe.convert(model)
    grad = recipe.grad_format()
    return {
        "plan": asdict(plan),
        "model": {**asdict(model_cfg), "head_dim": model_cfg.head_dim, "ffn_dim": model_cfg.ffn_dim,
                  "num_params": count_params(model)},
        "flops_per_token": flops_per_token(model_cfg, vocab_size=model.vocab_size, seq_len=model_cfg.seq_len),
        "tokens_per_step": cfg.trainer.global_batch_size * model_cfg.seq_len,
        "recipe": {
            "name": recipe.name,
            "backend": recipe.backend,
            "backend_note": note,
            "conversion": report.summary(),
            "grad_format": None if grad is None else asdict(grad),
            "gemm_family": recipe.gemm_family(),
            "describe": recipe.describe(),
        },
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.dryrun", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the whole plan as JSON")
    parser.add_argument("--world-size", type=int, default=0,
                        help="ranks to plan for (default: launcher.nproc_per_node)")  # fmt: skip
    args, cfg = tool_args(parser, argv)
    try:
        out = dry_run(cfg, world_size=args.world_size or cfg.launcher.nproc_per_node)
    except ConfigError as e:
        config_error_exit(e)
    if args.json:
        print(json.dumps(out, indent=1, default=str))
        return
    p, m, r = out["plan"], out["model"], out["recipe"]
    print(f"model {m['name']}: {m['num_params'] / 1e6:.1f} M parameters, {m['n_layers']} layers x d_model "
          f"{m['d_model']} (heads {m['n_heads']} x {m['head_dim']}, FFN {m['ffn_dim']}), vocab {m['vocab_size']}")  # fmt: skip
    print(f"batch: {p['world_size']} rank(s) on {p['device']}, micro-batch {p['micro_batch_size']}, "
          f"accumulation {p['grad_accum_steps']}, {out['tokens_per_step']} tokens/step, "
          f"{out['flops_per_token'] / 1e6:.1f} MFLOP/token")  # fmt: skip
    print(f"recipe {r['name']} (backend {r['backend']}): {r['conversion']}")
    grad = r["grad_format"]
    print(f"  dY format: {grad['name'] if grad else 'engine precision'}; GEMM family: {r['gemm_family']}")
    if r["backend_note"]:
        print(f"  {r['backend_note']}")


if __name__ == "__main__":
    main()
