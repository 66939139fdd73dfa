"""Consolidated FP32 weights of a run, loadable without DeepSpeed.

    python -m train.export RUN_DIR                      # RUN_DIR/export/: model.safetensors + config.json
    python -m train.export RUN_DIR --tag step_0000200 --out DIR
    python -m train.export RUN_DIR --eval               # + the validation loss of the exported weights

From any ZeRO stage and world size: the FP32 master weights, not the BF16 working copy. ZeRO 1-3
shards are merged with DeepSpeed's own ``zero_to_fp32`` reader; at stage 0 the master weights are
DeepSpeed's ``fp32_groups`` (BF16/FP16 engines) or the module itself (FP32 engines). Every file is
read with ``torch.load(weights_only=True)``. ``config.json`` holds what rebuilds the model
(``train.model.GPT``: the resolved model config and vocabulary size) and where the weights came from
(run dir, checkpoint tag, step, recipe, fingerprints). Tied weights are stored once (safetensors
refuses shared storage) and re-tied on load (``load_export``).

``--eval`` rebuilds the model from the export alone, applies the run's recipe in the run's engine
precision, and computes the mean loss over the run's fixed validation sequences: at the
checkpoint of the last step it reproduces the run's final ``val/loss``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import yaml

from recipes.errors import ConfigError
from train.rundir import CHECKPOINT_DIR, MANIFEST

#: DeepSpeed's model-states file: ZeRO 0-2 write one, ZeRO-3 one per rank (rank 0's has the config)
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def _model_states(d: Path) -> Path | None:
    return next((d / n for n in MODEL_STATES if (d / n).exists()), None)


def _stage0_master(
    states: dict[str, Any], model: torch.nn.Module, weight_decay: float
) -> dict[str, torch.Tensor]:
    from train.engine import param_groups

    opt = states.get("optimizer") or {}
    module = states["module"]
    if "fp32_groups" not in opt:  # an FP32 engine: the module's parameters are the master weights
        bad = [k for k, v in module.items() if v.is_floating_point() and v.dtype != torch.float32]
        if bad:
            raise ValueError(
                f"stage-0 checkpoint without FP32 master weights ({bad[0]} is {module[bad[0]].dtype})"
            )
        return {k: v.float() for k, v in module.items()}
    names = {id(p): n for n, p in model.named_parameters()}
    out = {k: v.float() for k, v in module.items()}  # buffers; parameters are replaced below
    for group, master in zip(param_groups(model, weight_decay=weight_decay), opt["fp32_groups"]):
        for p, w in zip(group["params"], master):
            name = names[id(p)]
            if tuple(w.shape) != tuple(p.shape):
                raise ValueError(
                    f"fp32 master weight for {name} has shape {tuple(w.shape)}, model {tuple(p.shape)}"
                )
            out[name] = w.float()
    return out


def fp32_state_dict(run_dir: Path, tag: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(FP32 state dict by parameter name, info) of checkpoint ``tag`` (default: ``latest``)."""
    ckpt = run_dir / CHECKPOINT_DIR
    if not (ckpt / "latest").exists() and tag is None:
        raise ConfigError("RUN_DIR", run_dir, "has no checkpoint: train with trainer.checkpoint_every=N")
    tag = tag or (ckpt / "latest").read_text().strip()
    states_file = _model_states(ckpt / tag)
    if states_file is None:
        tags = sorted(p.name for p in ckpt.glob("step_*") if p.is_dir())
        raise ConfigError(
            "--tag", tag, f"no such checkpoint in {ckpt}; there are: {', '.join(tags) or 'none'}"
        )
    rc = yaml.safe_load((run_dir / "run_config.yaml").read_text())
    states = torch.load(states_file, map_location="cpu", weights_only=True)
    stage = int((states.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0))
    if stage > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = {k: v.float() for k, v in get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag).items()}
    else:
        sd = _stage0_master(states, build_plain_model(rc), rc["config"]["trainer"]["weight_decay"])
    manifest = ckpt / tag / MANIFEST
    info = {
        "run_dir": str(run_dir),
        "tag": tag,
        "step": states.get("step", states.get("global_steps")),
        "zero_stage": stage,
        "world_size": json.loads(manifest.read_text()).get("world_size") if manifest.exists() else None,
        "recipe": rc["config"]["recipe"]["name"],
        "precision": rc["config"]["recipe"]["precision"],
        "fingerprints": rc.get("fingerprints", {}),
    }
    return sd, info


def build_plain_model(rc: dict[str, Any]) -> torch.nn.Module:
    """An FP32 ``GPT`` of the run's shape (weights unset: they are loaded next)."""
    from train.config import to_run_config
    from train.model import GPT

    cfg = to_run_config(rc["config"])
    return GPT(cfg.model.resolve(int(rc["resolved"]["vocab_size"])))


def export(run_dir: Path, out: Path, *, tag: str | None = None) -> Path:
    from safetensors.torch import save_file

    sd, info = fp32_state_dict(run_dir, tag)
    rc = yaml.safe_load((run_dir / "run_config.yaml").read_text())
    model = build_plain_model(rc)
    tied = _tied(model)
    missing = sorted(set(model.state_dict()) - set(sd) - set(tied))
    if missing:
        raise ValueError(f"checkpoint {info['tag']} lacks {missing[:3]}")
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.contiguous() for k, v in sd.items() if k not in tied}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt", "source": "lowbit"})
    config = {"model": rc["config"]["model"], "vocab_size": rc["resolved"]["vocab_size"], "tied": tied,
              "data": rc["config"]["data"], "trainer": rc["config"]["trainer"], "recipe_config": rc["config"]["recipe"],
              **info}  # fmt: skip
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    return out


def _tied(model: torch.nn.Module) -> dict[str, str]:
    """Parameter names that share another's tensor: name -> the name it is stored under."""
    first: dict[int, str] = {}
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out[name] = first[id(p)]
        else:
            first[id(p)] = name
    return out


def load_export(out: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The FP32 ``GPT`` from an export directory (no DeepSpeed, no run directory)."""
    from safetensors.torch import load_file

    config = json.loads((out / "config.json").read_text())
    model = build_plain_model(
        {"config": {"model": config["model"]}, "resolved": {"vocab_size": config["vocab_size"]}}
    )
    sd = load_file(str(out / "model.safetensors"))
    sd.update({name: sd[src] for name, src in config["tied"].items()})
    model.load_state_dict(sd, strict=True)
    return model, config


@torch.no_grad()
def evaluate_export(out: Path) -> float:
    """Mean validation loss of the exported weights on the run's fixed validation sequences, under
    the run's recipe in its engine precision (one process; the trainer's micro-batch size)."""
    from recipes.base import get_recipe
    from recipes.config import RecipeConfig
    from train.config import to_run_config
    from train.data import eval_indices, prepare_data
    from train.loop import loss_sums

    model, config = load_export(out)
    cfg = to_run_config({"model": config["model"], "data": config["data"], "trainer": config["trainer"]})
    recipe = get_recipe(RecipeConfig(**config["recipe_config"]))
    recipe.resolve("cpu")
    recipe.convert(model)
    model = model.to({"bf16": torch.bfloat16, "fp16": torch.float16}.get(config["precision"], torch.float32))
    model.eval()
    data = prepare_data(cfg.data, seq_len=cfg.model.seq_len)
    idx = eval_indices(data, num_sequences=cfg.trainer.eval_sequences)
    mb = cfg.trainer.micro_batch_size or cfg.trainer.global_batch_size
    total = loss_sums(model, data, idx, micro_batch=mb, device="cpu", recipe=recipe)
    return (total[0] / total[1]).item()


def main(argv: list[str] | None = None) -> None:
    from train.cli import config_error_exit

    p = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--tag", help="checkpoint tag (default: latest)")
    p.add_argument("--out", type=Path, help="output directory (default: RUN_DIR/export)")
    p.add_argument("--eval", action="store_true", help="print the validation loss of the exported weights")
    args = p.parse_args(argv)
    try:
        if not (args.run_dir / "run_config.yaml").exists():
            raise ConfigError("RUN_DIR", args.run_dir, "not a lowbit run directory (no run_config.yaml)")
        out = export(args.run_dir, args.out or args.run_dir / "export", tag=args.tag)
    except ConfigError as e:
        config_error_exit(e)
    print(
        f"lowbit: exported {out / 'model.safetensors'} ({json.loads((out / 'config.json').read_text())['tag']})"
    )
    if args.eval:
        print(f"val/loss {evaluate_export(out):.10f}", flush=True)


if __name__ == "__main__":
    main()
