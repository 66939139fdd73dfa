"""Predict one training step's time, bound, MFU and memory on an accelerator: a roofline model.

    python -m train.perfmodel model=1.3b +recipe=fp8_delayed parallel=zero2 hardware=h100 launcher.nproc_per_node=8
    python -m train.perfmodel --out pred.json model=13b +recipe=nvfp4 parallel=zero3 hardware=gb200 nodes=18 \\
        launcher.nproc_per_node=4 hardware.peak_tflops.fp4=20000     # a what-if chip
    python -m train.perfmodel +recipe=nvfp4 hardware=h100 +hardware.peak_tflops.fp4=4000  # a rate it lacks
    python -m train.perfmodel -m --out DIR model=tiny,125m,1.3b,13b +recipe=bf16,fp8_delayed,mxfp8,nvfp4 \\
        hardware=h100,b200                                    # a sweep: table + plots (train.perfmodel.sweep)

Own flags first, then Hydra overrides (the ``python -m train.<tool>`` convention). Every
override except ``hardware=NAME``, ``hardware.<field>=...`` and ``nodes=N`` composes the same
config as ``train/run.py`` (``train.cli.compose``), unchanged; those three compose
``conf/perfmodel.yaml`` (:class:`PerfModelConfig`: a ``conf/hardware/`` preset, default h100,
and the node count), so a training run's config, behaviour and losses do not move. GPUs per
node are ``launcher.nproc_per_node``. A hypothetical accelerator is one more YAML in
``conf/hardware/`` (or ``hardware.<field>`` overrides of an existing one).

It predicts the recipe and, on the same config, ``bf16`` (the speedup's denominator), prints the
breakdown and summary, and writes both as JSON with ``--out``. The model, its assumptions and
sources: ``train.perfmodel.roofline``, ``train.perfmodel.step``, ``train.perfmodel.predict``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recipes.base import get_recipe
from recipes.config import RecipeConfig
from recipes.errors import ConfigError
from train.cli import CONF_DIR, compose, config_error_exit, split_override
from train.config import RunConfig
from train.hwspec import HardwareConfig, from_dict, hardware_names, validate_hardware
from train.perfmodel.predict import OVERLAPS, predict_step


@dataclass
class PerfModelConfig:
    """What a prediction adds to ``train/run.py``'s config (``conf/perfmodel.yaml``)."""

    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    nodes: int = 1
    """Nodes of ``launcher.nproc_per_node`` GPUs each."""


def own_override(arg: str) -> bool:
    kv = split_override(arg)
    return kv is not None and (kv[0] in ("hardware", "nodes") or kv[0].startswith("hardware."))


def compose_perfmodel(overrides: list[str]) -> PerfModelConfig:
    """``conf/perfmodel.yaml`` with the hardware / nodes overrides; ConfigError on a mistake."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    for arg in overrides:
        kv = split_override(arg)
        if kv and kv[0] == "hardware" and kv[1] not in hardware_names():
            raise ConfigError(
                "hardware", kv[1], f"unknown hardware; choose one of: {', '.join(hardware_names())}"
            )
    ConfigStore.instance().store(name="perfmodel_schema", node=PerfModelConfig)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            dcfg = hydra_compose("perfmodel", overrides=overrides)
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PerfModelConfig), dcfg))
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        pairs = sorted((kv for kv in map(split_override, overrides) if kv), key=lambda kv: -len(kv[0]))
        for key, value in pairs:  # the override the message (or its full_key) names, longest first
            if key in msg or key == getattr(e, "full_key", None):
                raise ConfigError(key, value, msg) from None
        raise ConfigError("overrides", " ".join(overrides) or "(none)", msg) from None
    assert isinstance(obj, PerfModelConfig)
    validate_hardware(obj.hardware)
    return obj


def _fmt_s(t: float) -> str:
    return f"{t * 1e3:9.3f} ms" if t >= 1e-4 else f"{t * 1e6:9.2f} us"


def render(pred: dict[str, Any], base: dict[str, Any]) -> str:
    s, m = pred["summary"], pred["memory_bytes"]
    lines = [
        f"perfmodel: {s['recipe']} on {s['gpus']} x {s['hardware']} ({s['nodes']} node(s) x {s['gpus_per_node']}), "
        f"ZeRO-{s['zero_stage']}, micro-batch {s['micro_batch']} x {s['grad_accum_steps']} accumulation, "
        f"{s['tokens_per_step']:,} tokens/step; {s['converted_linears']}/{s['linears']} Linear converted",
        "",
        f"{'component (x per step)':<46} {'bound':<8} {'family':<10} {'FLOP/B':>8} {'time/step':>12}",
    ]  # fmt: skip
    groups: dict[str, dict[str, Any]] = {}
    from train.perfmodel.predict import group

    for c in pred["components"]:
        if c["kind"] == "comm":
            continue
        g = groups.setdefault(group(c["name"]), {**c, "n": 0, "total": 0.0})
        g["n"] += c["count"]
        g["total"] += c["total_s"]
    for name, g in sorted(groups.items(), key=lambda kv: -kv[1]["total"]):
        fam = g.get("family") or ""
        if g.get("emulated_as"):
            fam += f"->{g['emulated_as']}"
        ai = f"{g['arithmetic_intensity']:8.0f}" if g.get("arithmetic_intensity") else f"{'':8}"
        lines.append(
            f"{name + ' x' + str(g['n']):<46} {g['bound']:<8} {fam:<10} {ai} {_fmt_s(g['total']):>12}"
        )
    lines.append("communication (ring; per step, exposed after overlap):")
    for c in (c for c in pred["components"] if c["kind"] == "comm"):
        lines.append(f"  {c['name'] + ' x' + str(c['count']):<44} {c['bound']:<8} {c['link_gb_s']:>6g} GB/s "
                     f"{_fmt_s(c['total_s']):>12}, exposed {_fmt_s(c['exposed_s']).strip()}")  # fmt: skip
    gb = 1e9
    lines += [
        "",
        f"memory per GPU: {m['total'] / gb:.1f} GB of {pred['hardware']['hbm_gb']:.4g} "
        f"({'fits' if s['fits_in_hbm'] else 'DOES NOT FIT'}): params {m['params'] / gb:.1f}, grads "
        f"{m['grads'] / gb:.1f}, optimizer {m['optimizer'] / gb:.1f}, activations {m['activations'] / gb:.1f} "
        f"(no checkpointing {m['activations_no_checkpointing'] / gb:.1f}, checkpointing "
        f"{m['activations_checkpointing'] / gb:.1f}), logits {m['logits'] / gb:.1f}, recipe weight copies "
        f"{m['recipe_weight_copies'] / gb:.2f}",
        f"step {s['step_time_s'] * 1e3:.1f} ms (compute {s['compute_time_s'] * 1e3:.1f}, communication "
        f"{s['comm_total_s'] * 1e3:.1f} of which exposed {s['comm_exposed_s'] * 1e3:.1f}, overlap={s['overlap']})",
        f"tokens/s {s['tokens_per_s']:,.0f} ({s['tokens_per_s_per_gpu']:,.0f} per GPU); MFU {s['mfu_bf16_peak']:.1%} "
        f"of the BF16 peak, {s['mfu_format_peak']:.1%} of the {s['format_family']} peak"
        + (f" (the chip lacks {s['format_family']}: emulated as {s['format_emulated_as']})"
           if s["format_emulated_as"] else ""),
        f"speedup over bf16: {base['summary']['step_time_s'] / s['step_time_s']:.3f}x "
        f"(bf16 step {base['summary']['step_time_s'] * 1e3:.1f} ms); top bottleneck: {s['top_bottleneck']} "
        f"({s['time_by_kind_s'][s['top_bottleneck']] / s['step_time_s']:.0%} of the step)",
    ]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.perfmodel", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--out", type=Path, default=None, help="write the prediction (and bf16's) as JSON here")
    ap.add_argument("--overlap", default="hidden", help=f"communication overlap: {' | '.join(OVERLAPS)}")
    ap.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    ap.add_argument(
        "--hardware-file",
        type=Path,
        default=None,
        help="a hardware YAML outside conf/hardware/ (e.g. one --calibrate wrote)",
    )
    ap.add_argument(
        "--calibrate",
        action="store_true",
        help="measure this machine (matmul per dtype, memory bandwidth, dispatch latency) into "
        "outputs/hardware/<--name>.yaml (or --out) and exit",
    )
    ap.add_argument("--name", default=None, help="--calibrate: the spec's name (default: cpu, or the GPU's)")
    ap.add_argument("--quick", action="store_true", help="--calibrate: tiny sizes, few repeats (tests)")
    ap.add_argument(
        "--trace",
        action="store_true",
        help="run one training step of OVERRIDES' engine here under a dispatch trace and cost its "
        "aten ops at --hardware-file's rates (train.perfmodel.optrace); nothing timed",
    )
    ap.add_argument(
        "-m",
        "--multirun",
        action="store_true",
        help="sweep: KEY=a,b,c overrides, one prediction per point of their product; a table and "
        "plots into --out DIR (train.perfmodel.sweep)",
    )
    ap.add_argument(
        "overrides", nargs="*", help="Hydra overrides, as for train/run.py, plus hardware=, nodes="
    )
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if args.calibrate:
        return run_calibration(args)
    if args.multirun and not args.trace:
        return run_multirun(args)
    if args.trace:
        return run_trace(args)
    try:
        point = compose_point(args.overrides, hardware_path=args.hardware_file)
        pred, base = predict_point(point, overlap=args.overlap)
    except ConfigError as e:
        config_error_exit(e)
    pred["summary"]["speedup_over_bf16"] = base["summary"]["step_time_s"] / pred["summary"]["step_time_s"]
    out = {"prediction": pred, "bf16": base, "overrides": args.overrides}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(json.dumps(out, indent=1, default=str) if args.json else render(pred, base))
    if args.out and not args.json:
        print(f"JSON: {args.out}")
    return 0


def compose_point(
    overrides: list[str], *, hardware_path: Path | None = None
) -> tuple[RunConfig, PerfModelConfig]:
    """The run config and the perfmodel config (hardware, nodes) of one prediction."""
    mine = [o for o in overrides if own_override(o)]
    if hardware_path and any(split_override(o)[0].startswith("hardware") for o in mine):  # type: ignore[index]
        raise ConfigError("--hardware-file", hardware_path, "it replaces hardware=...; drop those overrides")
    pm = compose_perfmodel(mine)
    if hardware_path:
        pm.hardware = hardware_file(hardware_path)
    return compose([o for o in overrides if not own_override(o)]), pm


def predict_point(
    point: tuple[RunConfig, PerfModelConfig], *, overlap: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the recipe's prediction, bf16's on the same config: the speedup's denominator)."""
    cfg, pm = point
    pred = predict_step(cfg, pm.hardware, get_recipe(cfg.recipe), nodes=pm.nodes, overlap=overlap)
    bf16 = RecipeConfig(skip_modules=list(cfg.recipe.skip_modules))
    return pred, predict_step(cfg, pm.hardware, get_recipe(bf16), nodes=pm.nodes, overlap=overlap)


def run_multirun(args: argparse.Namespace) -> int:
    """``-m``: the sweep (``train.perfmodel.sweep``): expand, compose all, predict all, write."""
    import os
    import time

    from train.perfmodel import sweep

    try:
        if args.json:
            raise ConfigError(
                "--json", True, "a sweep writes its table and plots into --out DIR; drop --json"
            )
        swept, points = sweep.expand(args.overrides)
        sweep.run_sweep(points, compose=lambda o: compose_point(o, hardware_path=args.hardware_file),
                        predict=lambda c: predict_point(c, overlap=args.overlap))  # fmt: skip
    except ConfigError as e:
        config_error_exit(e)
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    out = args.out or Path(os.environ.get("LOWBIT_OUTPUTS", "outputs")) / "perfmodel" / f"sweep-{stamp}"
    title = f"perfmodel sweep over {', '.join(swept) or 'one point'}"
    paths = sweep.write(points, swept, out, overrides=args.overrides, title=title)
    print(f"{title}: {len(points)} point(s), overlap={args.overlap}\n")
    print(sweep.markdown([{k: p.row[k] for k in SWEEP_COLUMNS if k in p.row} for p in points]))
    print("wrote: " + ", ".join(str(p) for p in paths))
    return 0


#: the columns the sweep prints (the files hold every column)
SWEEP_COLUMNS = ("model", "recipe", "hardware", "gpus", "step_ms", "speedup_over_bf16", "mfu_bf16_peak_pct",
                 "emulated_as", "memory_per_gpu_gb", "fits_in_hbm", "top_bottleneck")  # fmt: skip


def hardware_file(path: Path) -> HardwareConfig:
    """A hardware YAML by path, validated like the presets."""
    import yaml

    if not path.is_file():
        raise ConfigError(
            "--hardware-file", path, "no such file (python -m train.perfmodel --calibrate writes one)"
        )
    return from_dict(yaml.safe_load(path.read_text()))


def run_trace(args: argparse.Namespace) -> int:
    """``--trace``: one step of the composed engine traced op by op, costed on a hardware file."""
    try:
        if args.multirun:
            raise ConfigError("--trace", True, "traces one config; drop -m")
        if args.hardware_file is None:
            raise ConfigError("--trace", True, "needs --hardware-file FILE (python -m train.perfmodel "
                              "--calibrate writes one: outputs/hardware/cpu.yaml)")  # fmt: skip
        if any(own_override(o) for o in args.overrides):
            raise ConfigError(
                "--trace", True, "the rates come from --hardware-file; drop hardware= and nodes="
            )
        hw = hardware_file(args.hardware_file)
        defaults = [d for d in ("logger=none", "trainer.device=cpu")
                    if not any(o.split("=", 1)[0].lstrip("+") == d.split("=")[0] for o in args.overrides)]  # fmt: skip
        cfg = compose([*defaults, *args.overrides])
        from train.perfmodel.optrace import predict_traced, render

        pred = predict_traced(cfg, hw)
    except ConfigError as e:
        config_error_exit(e)
    pred["overrides"] = args.overrides
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(pred, indent=1, default=str) + "\n")
    print(json.dumps(pred, indent=1, default=str) if args.json else render(pred, " ".join(args.overrides)))
    return 0


def run_calibration(args: argparse.Namespace) -> int:
    import os
    import re

    import torch

    from train import hostmem
    from train.perfmodel.calibrate import calibrate, write_yaml

    malloc_note = hostmem.apply("auto")  # measure under the trainer's default allocator policy

    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = args.name or (
        "cpu" if device == "cpu" else re.sub(r"\W+", "_", torch.cuda.get_device_name()).lower()
    )
    hw, notes = calibrate(name, device=device, quick=args.quick)
    notes["hbm_tb_s"] = f"{notes.get('hbm_tb_s', 'one rank')}; {malloc_note}"  # the bandwidth depends on it
    out = args.out or Path(os.environ.get("LOWBIT_OUTPUTS", "outputs")) / "hardware" / f"{name}.yaml"
    write_yaml(hw, notes, out)
    peaks = ", ".join(f"{k} {v:.3g} TFLOP/s" for k, v in hw.peak_tflops.items())
    print(f"calibrated {name} ({device}): {peaks}; memory {hw.hbm_tb_s * 1e3:.1f} GB/s; "
          f"dispatch {hw.kernel_launch_us:.1f} us -> {out} (use: --hardware-file {out})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
