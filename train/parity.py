"""Cross-implementation parity: one recipe through every FP8 implementation on the same weights and batches.

    python -m train.parity +recipe=fp8_current model=tiny
    python -m train.parity --json parity.json --steps 5 +recipe=fp8_rowwise

Implementations (a row each; one that cannot run here says why):

* ``bf16``     the unconverted model in BF16: the reference of every comparison;
* ``emulated`` lowbit's fake quantization (``recipe.backend=emulated``);
* ``torch``    lowbit's real FP8 GEMMs through torch's scaled matmul (``recipe.backend=torch``);
* ``torchao``  torchao's ``Float8Linear`` (``convert_to_float8_training``), an independent FP8
  training implementation: ``tensorwise`` for per-tensor recipes, ``rowwise`` for ``fp8_rowwise``;
* ``te``       Transformer Engine (``recipe.backend=te``), where it is importable.

Per row: the forward output (logits), dgrad (the token-embedding gradient, which every converted
layer's dgrad feeds) and wgrad (every converted layer's weight gradient, concatenated) of one
forward+backward, each against BF16 as SQNR (dB) and max relative error; the fraction of the
first converted layer's FP8 input and weight codes equal to lowbit's (where both cast the same
way); the loss after ``--steps`` AdamW steps on the same batches; the mean step time; and the
semantics that differ from lowbit's recipe (named, not hidden).

Every implementation trains the same BF16 parameters with ``torch.optim.AdamW`` (no FP32 master
weights, no DeepSpeed): the harness compares GEMM implementations, not engines; ``train/run.py``
is the engine. Same seed, same initial weights, same batches for every row.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from recipes import peers
from recipes.base import get_recipe
from recipes.errors import ConfigError
from train.cli import config_error_exit, tool_args
from train.config import RunConfig

IMPLEMENTATIONS = ("bf16", "emulated", "torch", "torchao", "te")
#: the first converted layer, whose operand codes are compared
PROBE_LAYER = "blocks.0.attn.qkv"


@dataclass
class Row:
    impl: str
    gemm: str = ""
    skipped: str = ""
    fwd_sqnr_db: float | None = None
    fwd_max_rel: float | None = None
    dgrad_sqnr_db: float | None = None
    wgrad_sqnr_db: float | None = None
    wgrad_max_rel: float | None = None
    x_codes_equal: float | None = None
    w_codes_equal: float | None = None
    loss: float | None = None
    step_ms: float | None = None
    semantics: list[str] = field(default_factory=list)


def sqnr_db(ref: torch.Tensor, got: torch.Tensor) -> float:
    ref, got = ref.double(), got.double()
    noise = (ref - got).pow(2).sum()
    return math.inf if noise == 0 else float(10 * torch.log10(ref.pow(2).sum() / noise))


def max_rel(ref: torch.Tensor, got: torch.Tensor) -> float:
    ref, got = ref.double(), got.double()
    return float((ref - got).abs().max() / ref.abs().max().clamp_min(1e-30))


# ---------------------------------------------------------------------- building each implementation


def _lowbit(model: nn.Module, cfg: RunConfig, backend: str) -> tuple[nn.Module, str, list[str]]:
    rec = get_recipe(dataclasses.replace(cfg.recipe, backend=backend))
    rec.resolve(next(model.parameters()).device.type)
    rec.convert(model)
    model.lowbit_recipe = rec  # type: ignore[assignment]  # on_optimizer_step after each step
    return model, rec.gemm_impl, peers.recipe_notes(cfg.recipe, backend)


def build(
    impl: str, base: nn.Module, cfg: RunConfig, converted: list[str]
) -> tuple[nn.Module, str, list[str]]:
    model = copy.deepcopy(base)
    if impl == "bf16":
        return model, "torch.mm in BF16", []
    if impl in ("emulated", "torch", "te"):
        return _lowbit(model, cfg, impl)
    gemm, notes = peers.convert_torchao(model, cfg.recipe, converted)
    return model, gemm, notes


# ---------------------------------------------------------------------- measuring


def _probe_codes(
    models: dict[str, nn.Module], cfg: RunConfig, x: torch.Tensor
) -> dict[str, tuple[float, float]]:
    """Fraction of the probe layer's FP8 input / weight codes equal to lowbit's own cast."""
    captured: dict[str, torch.Tensor] = {}
    bf16 = models["bf16"]

    def hook(_m: nn.Module, inp: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        captured["x"] = inp[0].detach()

    h = bf16.get_submodule(PROBE_LAYER).register_forward_hook(hook)
    with torch.no_grad():
        bf16(x)
    h.remove()
    xin = captured["x"].reshape(-1, captured["x"].shape[-1])
    w = cast(nn.Linear, bf16.get_submodule(PROBE_LAYER)).weight
    codes = peers.probe_codes(cfg.recipe, xin, w, layer=PROBE_LAYER, torchao="torchao" in models)
    return {k: v for k, v in codes.items() if k in models}


def _one_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, converted: list[str]
) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    logits = model(x)
    nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten()).backward()
    grads = [cast(torch.Tensor, model.get_submodule(n).weight.grad).float().flatten() for n in converted]
    emb = cast(nn.Embedding, model.get_submodule("tok_emb"))
    return {"fwd": logits.detach().float(), "dgrad": cast(torch.Tensor, emb.weight.grad).float(),
            "wgrad": torch.cat(grads)}  # fmt: skip


def _train(
    model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], lr: float
) -> tuple[float, float]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rec = getattr(model, "lowbit_recipe", None)
    times, loss = [], float("nan")
    for x, y in batches:
        t0 = time.perf_counter()
        out = model(x, y)
        out.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if rec is not None:
            rec.on_optimizer_step()
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        loss = float(out.detach())
    steady = times[1:] or times
    return loss, 1e3 * sum(steady) / len(steady)


def run_parity(
    cfg: RunConfig, *, steps: int, sequences: int, impls: tuple[str, ...] = IMPLEMENTATIONS
) -> dict[str, Any]:
    from recipes.quantized import QuantizedRecipe
    from train.data import BatchSchedule, prepare_data
    from train.model import build_model
    from train.validate import resolve_device

    probe = get_recipe(dataclasses.replace(cfg.recipe, backend="emulated"))
    if not isinstance(probe, QuantizedRecipe):
        raise ConfigError("recipe", cfg.recipe.name, "parity compares quantized recipes; pick an FP8 recipe")
    data = prepare_data(cfg.data, seq_len=cfg.model.seq_len)
    model_cfg = cfg.model.resolve(data.vocab_size)
    device = resolve_device(cfg.trainer.device)
    base = build_model(model_cfg, seed=cfg.trainer.seed).to(device=device, dtype=torch.bfloat16)
    converted = list(probe.select(base).converted)
    sched = BatchSchedule(
        len(data.train_idx), global_batch_size=cfg.trainer.global_batch_size, seed=cfg.trainer.seed
    )
    batches = []
    for s in range(1, steps + 1):
        bx, by = data.sequences(data.train_idx[sched.global_batch(s)[:sequences]])
        batches.append((bx.to(device), by.to(device)))
    models: dict[str, nn.Module] = {}
    rows: dict[str, Row] = {}
    for impl in impls:
        try:
            model, gemm, notes = build(impl, base, cfg, converted)
        except (ConfigError, ImportError) as e:
            rows[impl] = Row(impl, skipped=str(e))
            continue
        models[impl], rows[impl] = model, Row(impl, gemm=gemm, semantics=notes)
    x, y = batches[0]
    ref = _one_step(models["bf16"], x, y, converted)
    for impl, model in models.items():
        got = _one_step(model, x, y, converted)
        r = rows[impl]
        r.fwd_sqnr_db, r.fwd_max_rel = sqnr_db(ref["fwd"], got["fwd"]), max_rel(ref["fwd"], got["fwd"])
        r.dgrad_sqnr_db = sqnr_db(ref["dgrad"], got["dgrad"])
        r.wgrad_sqnr_db, r.wgrad_max_rel = (
            sqnr_db(ref["wgrad"], got["wgrad"]),
            max_rel(ref["wgrad"], got["wgrad"]),
        )
    for impl, (xc, wc) in _probe_codes(models, cfg, x).items():
        rows[impl].x_codes_equal, rows[impl].w_codes_equal = xc, wc
    for impl in models:  # fresh copies: the one-step comparison above must not count as training
        model, *_ = build(impl, base, cfg, converted)
        rows[impl].loss, rows[impl].step_ms = _train(model, batches, cfg.trainer.lr)
    return {
        "recipe": cfg.recipe.name, "device": device, "quantizer": cfg.recipe.quantizer, "model": cfg.model.name,
        "tokens_per_step": sequences * cfg.model.seq_len, "steps": steps, "reference": "bf16",
        "rows": [dataclasses.asdict(r) for r in rows.values()],
    }  # fmt: skip


def format_table(result: dict[str, Any]) -> str:
    def f(v: float | None, fmt: str) -> str:
        width = int(fmt.split(".")[0] or 0)
        return ("-" if v is None else "inf" if math.isinf(v) else format(v, fmt)).rjust(width)

    head = f"parity: {result['recipe']} on {result['model']} ({result['device']}), {result['tokens_per_step']} tokens/step, {result['steps']} steps, vs BF16"
    cols = "impl       fwd dB  fwd rel  dgrad dB  wgrad dB  x codes  W codes   loss    ms/step  GEMM"
    lines = [head, cols]
    notes = []
    for r in result["rows"]:
        if r["skipped"]:
            lines.append(f"{r['impl']:<9}  skipped: {r['skipped']}")
            continue
        lines.append(
            f"{r['impl']:<9} {f(r['fwd_sqnr_db'], '6.1f')} {f(r['fwd_max_rel'], '8.4f')} {f(r['dgrad_sqnr_db'], '9.1f')} "
            f"{f(r['wgrad_sqnr_db'], '9.1f')} {f(r['x_codes_equal'], '8.4f')} {f(r['w_codes_equal'], '8.4f')} "
            f"{f(r['loss'], '7.4f')} {f(r['step_ms'], '9.1f')}  {r['gemm']}"
        )
        notes += [f"  {r['impl']}: {n}" for n in r["semantics"]]
    return "\n".join(lines + (["semantics:"] + notes if notes else []))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.parity", description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    parser.add_argument("--steps", type=int, default=3, help="AdamW steps for the loss column (default 3)")
    parser.add_argument("--sequences", type=int, default=4, help="sequences per batch (default 4)")
    args, cfg = tool_args(parser, argv)
    try:
        if args.steps < 1 or args.sequences < 1:
            raise ConfigError("--steps/--sequences", f"{args.steps}/{args.sequences}", "must be >= 1")
        from train.validate import validate

        validate(cfg, world_size=1)
        result = run_parity(cfg, steps=args.steps, sequences=args.sequences)
    except ConfigError as e:
        config_error_exit(e)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
