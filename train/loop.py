"""Set up a run and train it: the step loop is ``train_loop`` below, top to bottom.

batch -> forward under the recipe -> backward -> optimizer step -> log / eval / checkpoint
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from recipes.base import Recipe, get_recipe
from recipes.numerics import get_spec
from train import dist as lbdist
from train.config import RunConfig
from train.data import BatchSchedule, TokenData, eval_indices, order_fingerprint, prepare_data
from train.divergence import DivergenceTracker, FileReference, LockstepReference, full_grads
from train.engine import build_engine, init_distributed, reset_deepspeed_state
from train.envinfo import environment
from train.loggers import MultiLogger, build_loggers
from train.metrics import grad_global_norm, weights_fingerprint
from train.model import build_model, count_params
from train.perf import PerfMeter
from train.preempt import PreemptionGuard
from train.stats import GradStatsCollector, weight_metrics
from train.validate import Plan

CHECKPOINT_DIR = "checkpoints"
REFERENCE_CHECKPOINT_DIR = "checkpoints_reference"


@dataclass
class Run:
    """Everything the step loop needs, built once by ``setup``."""

    cfg: RunConfig
    plan: Plan
    denv: lbdist.DistEnv
    run_dir: Path
    data: TokenData
    schedule: BatchSchedule
    recipe: Recipe
    engine: Any
    loggers: MultiLogger
    guard: PreemptionGuard
    reference: FileReference | LockstepReference | None = None
    tracker: DivergenceTracker = field(default_factory=lambda: DivergenceTracker(threshold=0.01, decay=0.9))
    stat_params: list[str] = field(default_factory=list)
    """Weight parameters of the layers the heavy statistics look at (the converted Linear layers,
    or every Linear when the recipe converts none)."""
    collector: GradStatsCollector | None = None
    perf: PerfMeter | None = None
    start_step: int = 0


def log0(denv: lbdist.DistEnv, msg: str) -> None:
    if denv.is_main:
        print(f"lowbit: {msg}", flush=True)


def setup(cfg: RunConfig, plan: Plan, run_dir: Path) -> Run:
    guard = PreemptionGuard().install()  # first: a signal during start-up must not kill the job
    torch.autograd.set_detect_anomaly(cfg.debug.detect_anomaly)
    denv = lbdist.detect()
    torch.set_num_threads(
        lbdist.threads_per_rank(configured=cfg.launcher.omp_threads, local_world_size=denv.local_world_size)
    )
    lbdist.export(denv)
    init_distributed(plan.device)
    if plan.device == "cuda":
        torch.cuda.set_device(denv.local_rank)
    if denv.is_distributed:  # every rank writes into rank 0's run directory
        shared = [str(run_dir)]
        dist.broadcast_object_list(shared, src=0)
        run_dir = Path(shared[0])

    data = prepare_data(cfg.data, seq_len=cfg.model.seq_len)
    vocab = cfg.model.vocab_size or data.vocab_size
    model = build_model(cfg.model, vocab_size=vocab, seed=cfg.trainer.seed)
    model.activation_checkpointing = cfg.trainer.activation_checkpointing
    init_fp = weights_fingerprint(model)  # before the recipe or the engine touch the weights
    schedule = BatchSchedule(
        len(data.train_idx), global_batch_size=cfg.trainer.global_batch_size, seed=cfg.trainer.seed
    )

    ref_model = copy.deepcopy(model) if cfg.reference.mode == "lockstep" else None
    recipe = get_recipe(cfg.recipe)
    recipe.backend, note = recipe.resolve_backend(plan.device)
    if note:
        log0(denv, note)
    report = recipe.convert(model)
    log0(denv, f"recipe {recipe.name} ({recipe.precision}, backend {recipe.backend}): {report.summary()}")
    engine = build_engine(model, cfg, plan)
    reference = build_reference(cfg, plan, ref_model)

    perf = PerfMeter.build(
        cfg,
        gemm_family=recipe.gemm_family(),
        vocab_size=vocab,
        world_size=plan.world_size,
        device=plan.device,
    )
    start_step = maybe_resume(engine, cfg, run_dir, denv, recipe)
    if isinstance(reference, LockstepReference) and start_step:
        reference.engine.load_checkpoint(str(run_dir / REFERENCE_CHECKPOINT_DIR))
    resolved = {
        "config": asdict(cfg),
        "resolved": {
            "device": plan.device,
            "world_size": plan.world_size,
            "grad_accum_steps": plan.grad_accum_steps,
            "launcher": denv.launcher,
            "vocab_size": vocab,
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
        raise RuntimeError(f"reference.run_dir={reference.run_dir} is not a reference for this run: {why}")
    if denv.is_main:
        write_run_config(run_dir, resolved)
        write_job_info(run_dir, start_step=start_step)
        truncate_metrics(run_dir / "metrics.jsonl", after_step=start_step)
    loggers = build_loggers(cfg, run_dir=run_dir, config=resolved, is_main=denv.is_main)
    names = {n for n, _ in engine.module.named_parameters()}
    stat_params = [f"{m}.weight" for m in (report.converted or report.kept) if f"{m}.weight" in names]
    tracker = DivergenceTracker(threshold=cfg.reference.threshold, decay=cfg.reference.ema)
    collector = None
    if cfg.stats.every:
        collector = GradStatsCollector(
            engine.module,
            [n.removesuffix(".weight") for n in stat_params],
            spec=recipe.grad_format(),
            shadow={f: get_spec(f) for f in cfg.stats.shadow_formats},
            world_size=plan.world_size,
        )
    return Run(
        cfg,
        plan,
        denv,
        run_dir,
        data,
        schedule,
        recipe,
        engine,
        loggers,
        guard,
        reference,
        tracker,
        stat_params,
        collector,
        perf,
        start_step=start_step,
    )


def build_reference(cfg: RunConfig, plan: Plan, ref_model: torch.nn.Module | None):
    if cfg.reference.run_dir:
        return FileReference(cfg.reference.run_dir)
    if ref_model is None:
        return None
    ref_cfg = replace(
        cfg, recipe=replace(cfg.recipe, name=cfg.reference.precision, precision=cfg.reference.precision)
    )
    return LockstepReference(build_engine(ref_model, ref_cfg, plan), world_size=plan.world_size)


def write_job_info(run_dir: Path, *, start_step: int) -> None:
    """Who ran this (Slurm job, host) and from which step: appended per (re)start."""
    info = {
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_array_job_id": os.environ.get("SLURM_ARRAY_JOB_ID"),
        "slurm_array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"),
        "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
        "host": os.uname().nodename,
        "start_step": start_step,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    with open(run_dir / "job.jsonl", "a") as f:
        f.write(json.dumps(info) + "\n")


def truncate_metrics(path: Path, *, after_step: int) -> None:
    """Drop rows logged after the step we (re)start from: a hard kill can leave some,
    and a rerun from scratch in the same directory starts a fresh file."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line)["step"] <= after_step]
    if len(kept) != len(rows):
        path.write_text("".join(line + "\n" for line in kept))


def write_run_config(run_dir: Path, resolved: dict[str, Any]) -> None:
    import yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "run_config.yaml", "w") as f:
        yaml.safe_dump(resolved, f, sort_keys=False)


def maybe_resume(engine: Any, cfg: RunConfig, run_dir: Path, denv: lbdist.DistEnv, recipe: Recipe) -> int:
    resume = cfg.trainer.resume
    if resume == "none":
        return 0
    ckpt = run_dir / CHECKPOINT_DIR if resume == "auto" else Path(resume)
    if not (ckpt / "latest").exists():
        if resume != "auto":
            log0(denv, f"trainer.resume={resume}: no checkpoint in {ckpt}, starting from step 0")
        return 0
    _, client = engine.load_checkpoint(str(ckpt))
    recipe.load_state_dict(client.get("recipe", {}))  # e.g. delayed-scaling amax histories
    step = int(client["step"])
    log0(denv, f"resumed from {ckpt} at step {step}")
    return step


def save_checkpoint(run: Run, step: int) -> None:
    tag = f"step_{step:07d}"
    if isinstance(run.reference, LockstepReference):  # first, so `latest` of the run implies the reference's
        run.reference.engine.save_checkpoint(str(run.run_dir / REFERENCE_CHECKPOINT_DIR), tag=tag)
    run.engine.save_checkpoint(
        str(run.run_dir / CHECKPOINT_DIR),
        tag=tag,
        client_state={"step": step, "recipe": run.recipe.state_dict()},
    )


def micro_batches(run: Run, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    idx = run.schedule.micro_batches(
        step, rank=run.denv.rank, world_size=run.denv.world_size, micro_batch_size=run.plan.micro_batch_size
    )
    dev = run.engine.device
    return [
        tuple(t.to(dev, non_blocking=True) for t in run.data.sequences(run.data.train_idx[i])) for i in idx
    ]


def mean_across_ranks(x: torch.Tensor, denv: lbdist.DistEnv) -> float:
    x = x.detach().float().clone()
    if denv.is_distributed:
        dist.all_reduce(x)
        x /= denv.world_size
    return x.item()


@torch.no_grad()
def evaluate(run: Run) -> float:
    """Mean validation loss over a fixed set of sequences, split evenly across ranks."""
    idx = eval_indices(run.data, num_sequences=run.cfg.trainer.eval_sequences)
    idx = idx[: len(idx) - len(idx) % run.denv.world_size][run.denv.rank :: run.denv.world_size]
    mb = run.plan.micro_batch_size
    total = torch.zeros(2, dtype=torch.float64, device=run.engine.device)
    run.engine.eval()
    for lo in range(0, len(idx), mb):
        x, y = (t.to(run.engine.device) for t in run.data.sequences(idx[lo : lo + mb]))
        with run.recipe.forward_context():
            loss = run.engine(x, y)
        total += torch.stack(
            [loss.double() * len(x), torch.tensor(float(len(x)), dtype=torch.float64, device=loss.device)]
        )
    run.engine.train()
    if run.denv.is_distributed:
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


def grad_norm_after_step(run: Run, manual: torch.Tensor | None) -> float:
    """DeepSpeed's pre-clip global norm; ZeRO-0 FP32 reports None, so use ours."""
    norm = run.engine.get_global_grad_norm()
    if norm is None:
        return float(manual) if manual is not None else float("nan")
    return float(norm)


def step_metrics(
    run: Run,
    step: int,
    *,
    losses: list[torch.Tensor],
    lr: float,
    manual_norm: torch.Tensor | None,
    step_time: float,
    data_time: float,
) -> dict[str, Any]:
    """The logged values of one step (host syncs happen here, on log steps only)."""
    t = run.cfg.trainer
    metrics: dict[str, Any] = {
        "train/loss": mean_across_ranks(torch.stack(losses).float().mean(), run.denv),
        "train/lr": lr,
        "train/grad_norm": grad_norm_after_step(run, manual_norm),
        **run.perf.metrics(step_time=step_time, data_time=data_time),
    }
    if step % t.eval_every == 0 or step == t.max_steps:
        metrics["val/loss"] = evaluate(run)
    if not np.isfinite(metrics["train/loss"]):
        log0(run.denv, f"non-finite loss at step {step}")
    return metrics


def train_loop(run: Run) -> dict[str, Any]:
    t, engine = run.cfg.trainer, run.engine
    params = [p for p in engine.module.parameters() if p.requires_grad]
    # Without a DeepSpeed optimizer wrapper (ZeRO-0 FP32) get_global_grad_norm() is None: compute it here.
    manual_norm_needed = engine.optimizer is engine.basic_optimizer
    window_start, window_steps, data_time, tok_rates, mfus = time.perf_counter(), 0, 0.0, [], []
    last: dict[str, Any] = {}
    lockstep = run.reference if isinstance(run.reference, LockstepReference) else None
    for step in range(run.start_step + 1, t.max_steps + 1):
        is_stat = bool(run.cfg.stats.every) and step % run.cfg.stats.every == 0
        is_log = is_stat or step % t.log_every == 0 or step % t.eval_every == 0 or step == t.max_steps
        capture = run.stat_params if (is_stat and lockstep) else None
        lr = engine.get_lr()[0]  # the lr this step applies
        losses, manual_norm, grads, weights = [], None, {}, {}
        t_data = time.perf_counter()
        batches = micro_batches(run, step)
        data_time += time.perf_counter() - t_data
        if is_stat and run.collector:
            run.collector.arm()
        for x, y in batches:
            with run.recipe.forward_context():
                loss = engine(x, y)
            engine.backward(loss)
            if engine.is_gradient_accumulation_boundary():
                if is_log and manual_norm_needed:
                    manual_norm = grad_global_norm(params)
                if capture:
                    grads = full_grads(engine, capture)
                if is_stat:
                    weights = weight_metrics(
                        engine, [n.removesuffix(".weight") for n in run.stat_params], grads=grads
                    )
            engine.step()
            losses.append(loss.detach())
            if run.reference is not None:
                run.reference.micro_step(x, y, capture=capture)
        if is_stat and run.collector:
            run.collector.disarm()
        run.recipe.on_optimizer_step()
        if run.reference is not None:
            run.reference.end_step()
        window_steps += 1

        if is_log:
            if run.plan.device == "cuda":
                torch.cuda.synchronize()
            step_time = (time.perf_counter() - window_start) / window_steps
            metrics = step_metrics(
                run,
                step,
                losses=losses,
                lr=lr,
                manual_norm=manual_norm,
                step_time=step_time,
                data_time=data_time / window_steps,
            )
            if is_stat:
                metrics["grad/global_norm"] = metrics["train/grad_norm"]
                metrics.update(weights)
                if run.collector:
                    metrics.update(run.collector.reduce(distributed=run.denv.is_distributed))
                metrics.update(run.recipe.telemetry())
            ref_loss = run.reference.step_loss(step) if run.reference is not None else None
            metrics.update(run.tracker.update(step, metrics["train/loss"], ref_loss))
            if capture:
                metrics.update(lockstep.layer_metrics(engine, grads, run.stat_params))
            run.loggers.log(metrics, step)
            last.update(metrics)
            tok_rates.append(metrics["perf/tokens_per_s"])
            if "perf/mfu_bf16_peak" in metrics:
                mfus.append(metrics["perf/mfu_bf16_peak"])
        checkpointed = bool(t.checkpoint_every) and (step % t.checkpoint_every == 0 or step == t.max_steps)
        if checkpointed:
            save_checkpoint(run, step)
        if run.guard.should_stop(device=engine.device, distributed=run.denv.is_distributed):
            log0(run.denv, f"preemption signal: checkpoint at step {step}, then exit for requeue")
            if not checkpointed:
                save_checkpoint(run, step)
            return {"state": "preempted", "final/step": step}
        if is_log:
            window_start, window_steps, data_time = time.perf_counter(), 0, 0.0

    return {
        "state": "completed",
        "final/train_loss": last.get("train/loss"),
        "final/val_loss": last.get("val/loss"),
        "final/step": t.max_steps,
        "perf/mean_tokens_per_s": float(np.mean(tok_rates[1:] or tok_rates)) if tok_rates else None,
        "perf/mean_mfu_bf16_peak": float(np.mean(mfus[1:] or mfus)) if mfus else None,
        **run.tracker.summary(),
    }


def run_training(cfg: RunConfig, plan: Plan, run_dir: Path) -> dict[str, Any]:
    """Set up, train, and always tear down (process group, DeepSpeed state, loggers)."""
    run, summary = None, {"state": "failed"}
    try:
        run = setup(cfg, plan, run_dir)
        summary = train_loop(run)
        run.loggers.summary(summary)
        if run.denv.is_main and summary["state"] == "completed":
            with open(run.run_dir / "summary.json", "w") as f:
                json.dump(summary, f, indent=1)
        if dist.is_initialized():
            dist.barrier()  # only on success: after a failure the other ranks may never arrive
    finally:
        if run is not None:
            run.loggers.close()
            if run.guard.received is None:
                run.guard.restore()
        reset_deepspeed_state()
        os.environ.pop("LOWBIT_LAUNCHER", None)
    if run is not None and summary["state"] == "preempted":
        run.guard.hand_over()  # e.g. submitit's USR2 handler requeues the job
    return summary
