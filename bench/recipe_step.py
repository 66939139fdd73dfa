"""Benchmark the training step of each emulated MX / FP8 recipe relative to the BF16 recipe.

Every recipe runs the trainer's own path on the same model and batch:
``build_model`` -> ``recipe.resolve`` -> ``recipe.convert`` ->
``train.engine.build_engine`` (DeepSpeed bf16 engine: BF16 params, FP32 master
weights, AdamW) -> per step ``engine(x, y)`` under ``recipe.forward_context()``,
``engine.backward``, ``engine.step``, ``recipe.on_optimizer_step``.

All engines are built first, then stepped **interleaved round-robin** (one
step of each recipe per round), so load drift on a shared machine hits every
recipe alike; the table shows the median step time over ``--steps`` rounds
after ``--warmup`` rounds, and the ratio to BF16 measured in this run.
``--compile`` adds a compiled twin of each recipe (``recipe.compile=true``);
its first steps compile the quantizers (reported as ``warm-up s``). ``--backends`` runs each
recipe on each backend (``emulated``, ``torch``: real FP8 scaled matmuls), ``--gemms`` with each
``recipe.emulated_gemm`` (auto = codes: BF16 GEMMs where exact, per-tensor FP8 / NVFP4 on their
BF16 codes; bf16: where exact only; fp32). ``--floor`` adds, per emulated recipe, the same step
with every converted Linear's role quantizers replaced by identities (no Hadamard transform) and
the same GEMM dtype: what the custom autograd, the upcasts and the GEMMs cost without any
quantization, the floor the issue's tiny-model ratios are read against. The ratio column is
the median of the per-round ratios to BF16, with their interquartile range.

    python -m bench.recipe_step                      # eager, tiny model, 2 threads
    python -m bench.recipe_step --compile --recipes mxfp8_e4m3 mxfp4_e2m1
    python -m bench.recipe_step --recipes fp8_current --backends emulated torch --model 20m
    python -m bench.recipe_step --recipes mxfp8_e4m3 mxfp4_e2m1 --gemms fp32 auto   # BF16 GEMMs vs FP32
    python -m bench.recipe_step --recipes mxfp8_e4m3 fp8_delayed --floor           # against the floor
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
import yaml

from recipes.base import get_recipe
from recipes.qlinear import ROLE_FIELDS, QuantLinear
from recipes.quantizers import RoleQuantizer
from train import distenv, hostmem
from train.cli import CONF_DIR, compose
from train.data import nominal_vocab_size
from train.engine import build_engine, init_distributed
from train.model import build_model
from train.telemetry.perf import device_peak_for_format, flops_per_token
from train.validate import validate


def quantized_presets() -> list[str]:
    """Every conf/recipe/*.yaml whose kind (``quantizer``) is not ``none``: presets are data."""
    files = sorted((CONF_DIR / "recipe").glob("*.yaml"))
    return [f.stem for f in files if (yaml.safe_load(f.read_text()) or {}).get("quantizer", "none") != "none"]


class IdentityRole(RoleQuantizer):
    """The floor's role: quantizes nothing (FP32 for an FP32 GEMM, BF16 for a BF16 one)."""

    axis_free = True

    def __call__(self, x: torch.Tensor, *, axis: int, training: bool = True) -> torch.Tensor:
        return x

    def for_gemm(self, x: torch.Tensor, *, axis: int, training: bool = True) -> torch.Tensor:
        return x.to(torch.bfloat16)

    def describe(self) -> str:
        return "identity"


def identity_quantizers(model: torch.nn.Module) -> int:
    """Replace every converted Linear's quantized roles by :class:`IdentityRole` (no Hadamard
    transform), keeping which roles are quantized and the GEMM dtype; returns the layer count."""
    ident, n = IdentityRole(), 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            qs = m.quantizers
            roles = {r: ident for r in ROLE_FIELDS
                     if getattr(qs, r) is not None}  # fmt: skip
            if qs.split_dy:
                roles["grad_output_wgrad"] = None if qs.wgrad_dy is None else ident
            m.quantizers = dataclasses.replace(qs, **roles, wgrad_transform=None)
            n += 1
    return n


class Contender:
    """One recipe's engine, ready to step."""

    def __init__(
        self, label: str, recipe_name: str, extra: list[str], common: list[str], *, floor: bool = False
    ):
        cfg = compose([f"+recipe={recipe_name}", *common, *extra])
        plan = validate(cfg, world_size=1)
        self.label = label
        self.recipe = get_recipe(cfg.recipe)
        self.recipe.resolve(plan.device)
        model = build_model(cfg.model.resolve(nominal_vocab_size(cfg.data)), seed=cfg.trainer.seed)
        self.recipe.convert(model)
        if floor and not identity_quantizers(model):
            raise SystemExit(f"--floor: {label} converts no Linear to an emulated QuantLinear")
        self.engine = build_engine(model, cfg, plan)
        self.times: list[float] = []
        self.warmup_s = 0.0

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        t0 = time.perf_counter()
        with self.recipe.forward_context():
            loss = self.engine(x, y)
        self.engine.backward(loss)
        self.recipe.on_micro_batch()
        self.engine.step()
        self.recipe.on_optimizer_step()
        if x.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=quantized_presets())
    p.add_argument("--steps", type=int, default=15, help="timed rounds (one step of every recipe per round)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also time each recipe with recipe.compile=true")
    p.add_argument("--no-eager", action="store_true", help="with --compile: skip the eager rows")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default="tiny")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--backends", nargs="+", default=["emulated"], help="recipe.backend values to time")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--gemms", nargs="+", default=["auto"],
                   help="recipe.emulated_gemm values to time (auto | codes | bf16 | fp32), e.g. --gemms fp32 auto")  # fmt: skip
    p.add_argument(
        "--host-malloc", default="auto", help="launcher.host_malloc (train.hostmem): auto | tuned | default"
    )
    p.add_argument("--floor", action="store_true",
                   help="also time each emulated recipe with identity quantizers (same GEMM dtype)")  # fmt: skip
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    malloc_note = hostmem.apply(args.host_malloc)  # as train/run.py does at set-up
    common = [f"model={args.model}", f"trainer.global_batch_size={args.batch}", "trainer.max_steps=1000000",
              "logger=none", f"trainer.device={args.device}"]  # fmt: skip
    distenv.export(distenv.detect())
    init_distributed(args.device)

    contenders = [Contender("bf16", "bf16", [], common)]
    for name in args.recipes:
        for backend, gemm in ((b, g) for b in args.backends for g in args.gemms):
            label, extra = (
                (name, [])
                if args.backends == ["emulated"]
                else (f"{name} {backend}", [f"recipe.backend={backend}"])
            )
            if args.gemms != ["auto"]:
                label, extra = f"{label} ({gemm} GEMMs)", [*extra, f"recipe.emulated_gemm={gemm}"]
            if not args.no_eager:
                contenders.append(Contender(label, name, ["recipe.compile=false", *extra], common))
                if args.floor and backend == "emulated":
                    contenders.append(Contender(f"{label} floor (identity quantizers)", name,
                                                ["recipe.compile=false", *extra], common, floor=True))  # fmt: skip
            if args.compile:
                contenders.append(
                    Contender(f"{label} (compiled)", name, ["recipe.compile=true", *extra], common)
                )
    cfg = compose(common)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.batch, cfg.model.seq_len), generator=g).to(args.device)
    y = torch.randint(0, 256, (args.batch, cfg.model.seq_len), generator=g).to(args.device)
    tokens = args.batch * cfg.model.seq_len
    model_cfg = cfg.model.resolve(nominal_vocab_size(cfg.data))
    flops = flops_per_token(model_cfg, vocab_size=model_cfg.vocab_size, seq_len=model_cfg.seq_len) * tokens
    name = torch.cuda.get_device_name() if args.device == "cuda" else None
    peak = device_peak_for_format(name, "bf16")

    for c in contenders:  # warm-up (compilation happens here)
        c.warmup_s = sum(c.step(x, y) for _ in range(args.warmup))
    for _ in range(args.steps):
        for c in contenders:
            c.times.append(c.step(x, y))

    base = contenders[0].times
    print(f"model={args.model} batch={args.batch}x{cfg.model.seq_len} threads={args.threads} "
          f"rounds={args.steps} (interleaved) torch={torch.__version__}; {malloc_note}")  # fmt: skip
    print("| recipe | median ms | min ms | x BF16 (median) | IQR | tokens/s | MFU | warm-up s |\n"
          "|---|---|---|---|---|---|---|---|")  # fmt: skip
    for c in contenders:
        ratios = [t / b for t, b in zip(c.times, base)]
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        med = statistics.median(c.times)
        mfu = "-" if peak is None else f"{flops / med / peak:.3f}"
        print(f"| {c.label} | {med * 1e3:.1f} | {min(c.times) * 1e3:.1f} | {statistics.median(ratios):.2f} | "
              f"{q[2] - q[0]:.2f} | {tokens / med:.0f} | {mfu} | {c.warmup_s:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
