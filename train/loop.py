"""Train a run: ``train_loop`` is the step order, top to bottom.

batch -> forward under the recipe -> backward -> recipe micro-batch hook -> (boundary) observe -> optimizer step
-> end of step -> evaluate -> log -> checkpoint -> stop?

What the run observes (statistics, the lockstep reference, timing, the metrics row,
preemption) sits behind ``run.telemetry`` (``train/telemetry/collect.py``); set-up is
``train/assemble.py``; run-directory files and checkpoints are ``train/rundir.py``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from train import faults
from train.assemble import Run, setup
from train.data import eval_indices
from train.engine import reset_deepspeed_state, skip_optimizer_step
from train.rundir import checkpoint_due, save_checkpoint, write_outcome
from train.telemetry.collect import Decision
from train.validate import Plan


def train_loop(run: Run) -> dict[str, Any]:
    engine, obs, t = run.engine, run.telemetry, run.cfg.trainer
    step, decision = run.start_step, Decision.CONTINUE
    for step in range(run.start_step + 1, t.max_steps + 1):
        obs.begin_step(step, lr=engine.get_lr()[0])  # the lr this step applies; stat steps arm hooks
        for x, y in run.feed.micro_batches(step):
            with run.recipe.forward_context():
                loss = engine(x, y)
            engine.backward(loss)
            run.recipe.on_micro_batch()  # e.g. TE-cadence (per micro-batch) delayed scales
            skip = False
            if engine.is_gradient_accumulation_boundary():  # grad norm, lockstep grads, weight stats
                skip = obs.before_optimizer_step(engine) is Decision.SKIP  # trainer.on_nonfinite=skip
            with skip_optimizer_step(engine, skip):
                engine.step()  # DeepSpeed steps the optimizer at the boundary only
            obs.after_micro_step(loss, x, y)  # the lockstep reference trains on the same batch
        run.recipe.on_optimizer_step()  # e.g. delayed-scaling amax histories
        obs.stop_clock(step)  # evaluation and checkpoints are not step time
        val_loss = evaluate(run, step) if obs.eval_due(step) else None
        decision = obs.end_step(step, val_loss=val_loss)  # log steps: one row -> loggers
        if decision is Decision.NONFINITE:  # trainer.on_nonfinite=stop: the last good checkpoint stays
            break
        stop = decision is Decision.STOP  # a preemption signal reached some rank
        due = stop or checkpoint_due(every=t.checkpoint_every, step=step, last_step=t.max_steps)
        if due and obs.safe_to_checkpoint():  # never a checkpoint of a non-finite state
            save_checkpoint(engine, run.recipe, run.run_dir, step, reference_engine=run.reference_engine,
                            keep=t.keep_checkpoints)  # fmt: skip
        if stop:
            break
    return obs.summary(decision, step=step)


@torch.no_grad()
def evaluate(run: Run, step: int) -> float:
    """Mean validation loss over a fixed set of sequences, split evenly across ranks."""
    rank, world = run.denv.rank, run.denv.world_size
    idx = eval_indices(run.data, num_sequences=run.cfg.trainer.eval_sequences)
    idx = idx[: len(idx) - len(idx) % world][rank::world]
    run.engine.eval()
    total = loss_sums(run.engine, run.data, idx, micro_batch=run.plan.micro_batch_size, device=run.engine.device,
                      recipe=run.recipe, step=step)  # fmt: skip
    run.engine.train()
    if run.denv.is_distributed:
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


@torch.no_grad()
def loss_sums(
    forward: Any, data: Any, idx: Any, *, micro_batch: int, device: Any, recipe: Any, step: int = 0
) -> torch.Tensor:
    """float64 ``[sum over micro-batches of mean loss x sequences, sequences]`` of ``forward(x, y)``
    on the sequences ``idx`` (the trainer's evaluation, and ``train.export``'s)."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for lo in range(0, len(idx), micro_batch):
        x, y = (t.to(device) for t in data.sequences(idx[lo : lo + micro_batch]))
        with recipe.forward_context():
            loss = forward(x, y)
        count = torch.tensor(float(len(x)), dtype=torch.float64, device=loss.device)
        total += torch.stack([loss.double() * len(x), count])
        faults.hit("eval", step)  # debug.kill_in=eval: a real SIGKILL in the middle of evaluation
    return total


def run_training(cfg: Any, plan: Plan, run_dir: Path) -> dict[str, Any]:
    """Set up, train, and always tear down (process group, DeepSpeed state, loggers)."""
    run, summary = None, {"state": "failed"}
    try:
        run = setup(cfg, plan, run_dir)
        summary = train_loop(run)
        run.loggers.summary(summary)
        if run.denv.is_main:
            write_outcome(run.run_dir, summary)
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
