"""Real faults at chosen points, for the reliability tests: the process SIGKILLs itself.

``debug.kill_at_step=N debug.kill_in=eval|checkpoint`` arms one point; at step ``N`` the process
sends itself SIGKILL (no handler runs, nothing is flushed or cleaned up), at that point exactly:

* ``eval``: after the first validation micro-batch of step N (a kill during evaluation);
* ``checkpoint``: after DeepSpeed wrote step N's files into ``step_N.partial/`` and before the
  manifest, the rename and ``latest`` (a kill inside a checkpoint write).

Every rank kills itself at the same point. Rerunning the same command without the ``debug.kill_*``
keys resumes from the last complete checkpoint (``train.rundir``).
"""

from __future__ import annotations

import os
import signal

POINTS = ("eval", "checkpoint")
_armed: dict[str, int] = {}


def arm(point: str, step: int) -> None:
    if step > 0:
        _armed[point] = step


def hit(point: str, step: int) -> None:
    """Die here if this point is armed for this step."""
    if _armed.get(point) == step:
        print(f"lowbit: debug.kill_in={point}: SIGKILL at step {step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
