"""Set-up: the composition root. ``setup`` builds every part of a run once, in order, and
hands the step loop a ``Run``: data, model, recipe, engine, reference, loggers, telemetry.

A composition root imports what it composes; nothing below it takes the whole ``Run``.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from recipes.base import Recipe, get_recipe
from recipes.config import RecipeConfig
from recipes.errors import ConfigError
from recipes.numerics import get_spec
from train import distenv, faults, hostmem, rundir
from train.config import RunConfig
from train.data import BatchFeed, BatchSchedule, TokenData, order_fingerprint, prepare_data
from train.engine import build_engine, init_distributed, warmup_steps
from train.model import build_model, count_params, weights_fingerprint
from train.preempt import PreemptionGuard
from train.telemetry.collect import Cadence, Telemetry
from train.telemetry.divergence import DivergenceTracker, FileReference, LockstepReference
from train.telemetry.earlywarn import EarlyWarning
from train.telemetry.envinfo import environment
from train.telemetry.grads import COLLECTOR_FAMILIES, GradStatsCollector
from train.telemetry.loggers import MultiLogger, build_loggers
from train.telemetry.nonfinite import NonFiniteWatch, inject_fault
from train.telemetry.perf import PerfMeter
from train.telemetry.selection import pick_layers
from train.telemetry.selection import resolve as resolve_stats
from train.validate import Plan


@dataclass
class Run:
    """Everything the step loop needs, built once by ``setup``."""

    cfg: RunConfig
    plan: Plan
    denv: distenv.DistEnv
    run_dir: Path
    data: TokenData
    feed: BatchFeed
    recipe: Recipe
    engine: Any
    loggers: MultiLogger
    guard: PreemptionGuard
    telemetry: Telemetry
    reference_engine: Any | None = None
    """The lockstep reference's engine (checkpointed with the run), if any."""
    start_step: int = 0


def setup(cfg: RunConfig, plan: Plan, run_dir: Path) -> Run:
    guard = PreemptionGuard().install()  # first: a signal during start-up must not kill the job
    torch.autograd.set_detect_anomaly(cfg.debug.detect_anomaly)
    denv = distenv.detect()
    torch.set_num_threads(
        distenv.threads_per_rank(configured=cfg.launcher.omp_threads, local_world_size=denv.local_world_size)
    )
    distenv.log0(denv, hostmem.apply(cfg.launcher.host_malloc))
    distenv.export(denv)
    init_distributed(plan.device, timeout_s=cfg.launcher.collective_timeout_s)
    if plan.device == "cuda":
        torch.cuda.set_device(denv.local_rank)
    if denv.is_distributed:  # every rank writes into rank 0's run directory
        shared = [str(run_dir)]
        dist.broadcast_object_list(shared, src=0)
        run_dir = Path(shared[0])

    data = prepare_data(cfg.data, seq_len=cfg.model.seq_len)
    model_cfg = cfg.model.resolve(data.vocab_size)
    model = build_model(model_cfg, seed=cfg.trainer.seed)
    model.activation_checkpointing = cfg.trainer.activation_checkpointing
    init_fp = weights_fingerprint(model)  # before the recipe or the engine touch the weights
    schedule = BatchSchedule(
        len(data.train_idx), global_batch_size=cfg.trainer.global_batch_size, seed=cfg.trainer.seed
    )

    ref_model = copy.deepcopy(model) if cfg.reference.mode == "lockstep" else None
    recipe = get_recipe(cfg.recipe)
    note = recipe.resolve(plan.device)  # records recipe.backend
    if note:
        distenv.log0(denv, note)
    report = recipe.convert(model)
    report.padded = recipe.padded_gemms(plan.micro_batch_size * cfg.model.seq_len)
    distenv.log0(
        denv, f"recipe {recipe.name} ({recipe.precision}, backend {recipe.backend}): {report.summary()}"
    )
    engine = build_engine(model, cfg, plan)
    reference = build_reference(cfg, plan, ref_model)
    reference_engine = reference.engine if isinstance(reference, LockstepReference) else None

    perf = PerfMeter.build(
        cfg, gemm_family=recipe.gemm_family(), vocab_size=model.vocab_size, world_size=plan.world_size,
        device=plan.device,
    )  # fmt: skip
    start_step, resume_note = rundir.resume(
        engine, recipe, run_dir, resume=cfg.trainer.resume, reference_engine=reference_engine
    )
    if resume_note:
        distenv.log0(denv, resume_note)
    resolved = {
        "config": asdict(cfg),
        "resolved": {
            "device": plan.device,
            "world_size": plan.world_size,
            "grad_accum_steps": plan.grad_accum_steps,
            "launcher": denv.launcher,
            "vocab_size": model_cfg.vocab_size,
            "num_params": count_params(model),
            "recipe": recipe.describe(),
            "perf": perf.describe(),
        },
        "fingerprints": {
            "init_weights": init_fp,
            "data": data.fingerprint,
            "data_order": order_fingerprint(schedule),
        },
        "env": environment(plan.device),
    }
    if isinstance(reference, FileReference) and (
        why := reference.fingerprint_mismatch(resolved["fingerprints"])
    ):
        raise ConfigError(
            "reference.run_dir", reference.run_dir,
            f"not a reference for this run: {why}; train the reference with this code and config, or drop it",
        )  # fmt: skip
    if denv.is_main:
        rundir.write_run_config(run_dir, resolved)
        rundir.write_job_info(run_dir, start_step=start_step)
        rundir.truncate_metrics(run_dir / "metrics.jsonl", after_step=start_step)
    loggers = build_loggers(cfg, run_dir=run_dir, config=resolved, is_main=denv.is_main)
    names = {n for n, _ in engine.module.named_parameters()}
    stats = resolve_stats(cfg.stats)
    layers, why = pick_layers(stats, [m for m in (report.converted or report.kept) if f"{m}.weight" in names],
                              shadow_formats=len(cfg.stats.shadow_formats))  # fmt: skip
    if why and stats.every:
        distenv.log0(denv, why)
    stat_params = [f"{m}.weight" for m in layers]
    collector = None
    if stats.every:
        collector = GradStatsCollector(
            engine.module,
            layers,
            spec=recipe.grad_format(),
            shadow={f: get_spec(f) for f in cfg.stats.shadow_formats},
            world_size=plan.world_size,
            probes={n: p for n in layers if (p := recipe.layer_probe(engine.module.get_submodule(n)))},
            families=tuple(f for f in stats.families if f in COLLECTOR_FAMILIES),
        )
    feed = BatchFeed(
        data, schedule, rank=denv.rank, world_size=denv.world_size, micro_batch_size=plan.micro_batch_size,
        device=engine.device,
    )  # fmt: skip
    t = cfg.trainer
    tracker = DivergenceTracker(threshold=cfg.reference.threshold, decay=cfg.reference.ema)
    early = (
        EarlyWarning(warmup_steps=warmup_steps(max_steps=t.max_steps, warmup_frac=t.warmup_frac))
        if stats.every
        else None
    )
    if start_step:  # resumed: the div/ EMAs, spikes, spike history and warning baselines continue
        done = [r for r in rundir.read_metrics(run_dir / "metrics.jsonl") if r["step"] <= start_step]
        tracker.replay(done)
        if early is not None:
            early.replay(done)
    telemetry = Telemetry(
        cadence=Cadence(max_steps=t.max_steps, log_every=t.log_every, eval_every=t.eval_every, stats=stats),
        engine=engine, recipe=recipe, feed=feed, denv=denv, device=plan.device, loggers=loggers, perf=perf,
        tracker=tracker,
        guard=guard, reference=reference, collector=collector, stat_params=stat_params,
        watch=NonFiniteWatch(engine.module, policy=t.on_nonfinite, device=engine.device), run_dir=run_dir,
        early=early,
    )  # fmt: skip
    d = cfg.debug
    faults.arm(d.kill_in, d.kill_at_step)
    if d.inject_nonfinite_at_step:
        inject_fault(engine.module, layer=d.inject_layer, tensor=d.inject_tensor, at_step=d.inject_nonfinite_at_step,
                     step_of=lambda: telemetry.current_step)  # fmt: skip
    if d.inject_outlier_at_step:
        faults.inject_outlier(engine.module, layer=d.inject_layer, channel=d.inject_outlier_channel,
                              growth=d.inject_outlier_growth, at_step=d.inject_outlier_at_step,
                              step_of=lambda: telemetry.current_step)  # fmt: skip
    return Run(cfg, plan, denv, run_dir, data, feed, recipe, engine, loggers, guard, telemetry,
               reference_engine=reference_engine, start_step=start_step)  # fmt: skip


def build_reference(
    cfg: RunConfig, plan: Plan, ref_model: torch.nn.Module | None
) -> FileReference | LockstepReference | None:
    if cfg.reference.run_dir:
        return FileReference(cfg.reference.run_dir)
    if ref_model is None:
        return None
    precision = cfg.reference.precision  # the plain-precision recipe: nothing quantized
    ref_cfg = replace(cfg, recipe=RecipeConfig(name=precision, precision=precision))
    return LockstepReference(build_engine(ref_model, ref_cfg, plan), world_size=plan.world_size)
