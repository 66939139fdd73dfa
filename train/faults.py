"""Real faults at chosen points, for the reliability tests: the process SIGKILLs itself.

``debug.kill_at_step=N debug.kill_in=eval|checkpoint`` arms one point; at step ``N`` the process
sends itself SIGKILL (no handler runs, nothing is flushed or cleaned up), at that point exactly:

* ``eval``: after the first validation micro-batch of step N (a kill during evaluation);
* ``checkpoint``: after DeepSpeed wrote step N's files into ``step_N.partial/`` and before the
  manifest, the rename and ``latest`` (a kill inside a checkpoint write).

Every rank kills itself at the same point. Rerunning the same command without the ``debug.kill_*``
keys resumes from the last complete checkpoint (``train.rundir``).

``inject_outlier`` is a spike inducer for the early-warning evaluation
(``debug.inject_outlier_at_step``): one input feature of a layer grows geometrically.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

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


def inject_outlier(
    model: nn.Module, *, layer: str, channel: int, growth: float, at_step: int, step_of: Callable[[], int]
) -> None:
    """From step ``at_step`` on, multiply feature ``channel`` of ``layer``'s input by
    ``growth ** (step - at_step + 1)`` in training forwards (evaluation is untouched): an
    outlier feature that grows until the loss spikes."""

    def hook(m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        step = step_of()
        if not m.training or step < at_step:
            return None
        x = args[0]
        gain = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
        gain[channel] = growth ** (step - at_step + 1)
        return (x * gain, *args[1:])

    model.get_submodule(layer).register_forward_pre_hook(hook)
