"""Preemption: turn SIGUSR1 / SIGUSR2 / SIGTERM into "checkpoint at the next step boundary, then leave".

* ``slurm/train.sbatch`` asks Slurm for USR1 before the time limit
  (``--signal=B:USR1@120``) and forwards it to the ranks; after a clean exit
  it requeues the job, which resumes from the checkpoint
  (``trainer.resume=auto``: the run directory is derived from the job id).
* submitit (``hydra/launcher=slurm``) sends USR2; its own handler requeues the
  job. We save first, then hand the signal to the handler that was installed
  before ours, so submitit still requeues.
* SIGTERM (scancel, preemption, the hard limit): save and exit.

Ranks may see the signal at different steps, so with more than one rank the
decision is all-reduced (MAX): every rank stops at the same step boundary and the
collective checkpoint cannot deadlock. The all-reduce is non-blocking: each step
boundary starts one for this rank's flag and reads the one started at the previous
boundary, so no step waits on a collective or a host sync of its own, and a signal
is honoured one step after it arrives (well inside Slurm's signal-to-kill window:
``--signal=B:USR1@120``).
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGTERM")


class PreemptionGuard:
    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._pending: _FlagReduce | None = None

    def install(self) -> PreemptionGuard:
        for name in SIGNALS:
            signum = getattr(signal, name, None)
            if signum is None:
                continue
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                continue
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def should_stop(self, *, device: torch.device | str, distributed: bool) -> bool:
        """True on every rank, at the same step boundary, once any rank got a signal.

        One process: at once. Several: this call starts a non-blocking MAX all-reduce of this
        rank's flag and returns the result of the one the previous call started (module docstring).
        """
        if not distributed:
            return self.received is not None
        previous, self._pending = self._pending, _FlagReduce(self.received is not None, device)
        return previous is not None and previous.result()

    def drain(self) -> None:
        """Wait for the all-reduce still in flight (before the process group goes away)."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def hand_over(self) -> None:
        """After the checkpoint: give the signal to whoever handled it before us
        (submitit requeues the job there); otherwise just return."""
        signum = self.received
        previous = self._previous.get(signum) if signum is not None else None
        self.restore()
        if callable(previous) and signum is not None:
            handler: Callable[[int, Any], Any] = previous
            handler(signum, None)


class _FlagReduce:
    """A MAX all-reduce of one flag in flight. On CUDA the result is copied to pinned host
    memory behind the collective and an event marks it, so reading it waits only for the GPU
    to reach the previous step boundary; on CPU (gloo) it waits for the collective."""

    def __init__(self, flag: bool, device: torch.device | str):
        self.tensor = torch.tensor([float(flag)], device=device)
        self.work = dist.all_reduce(self.tensor, op=dist.ReduceOp.MAX, async_op=True)
        self.event: Any = None
        if self.tensor.is_cuda:
            self.work.wait()  # orders the copy after the collective on the stream; the host goes on
            host = torch.empty(1, pin_memory=True)
            host.copy_(self.tensor, non_blocking=True)
            self.tensor, self.event = host, torch.cuda.Event()
            self.event.record()

    def result(self) -> bool:
        if self.event is not None:
            self.event.synchronize()
        else:
            self.work.wait()
        return bool(self.tensor.item() > 0)
