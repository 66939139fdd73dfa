"""Preemption: turn SIGUSR1 / SIGUSR2 / SIGTERM into "checkpoint at the next step boundary, then leave".

* ``slurm/train.sbatch`` asks Slurm for USR1 before the time limit
  (``--signal=B:USR1@120``) and forwards it to the ranks; after a clean exit
  it requeues the job, which resumes from the checkpoint
  (``trainer.resume=auto``: the run directory is derived from the job id).
* submitit (``hydra/launcher=slurm``) sends USR2; its own handler requeues the
  job. We save first, then hand the signal to the handler that was installed
  before ours, so submitit still requeues.
* SIGTERM (scancel, preemption, the hard limit): save and exit.

Ranks may see the signal at different steps, so the decision is all-reduced
(MAX) every step when there is more than one rank: every rank stops at the same
step boundary and the collective checkpoint cannot deadlock.
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
        """True on every rank as soon as any rank got a signal (one collective per call)."""
        flag = float(self.received is not None)
        if distributed:
            t = torch.tensor([flag], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = t.item()
        return flag > 0

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
