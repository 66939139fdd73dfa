"""Golden runs: a change that is not about numerics must reproduce these bit for bit.

Each entry is a command line for ``python train/run.py``; its recorded file in
``tests/assets/losses/NAME.json`` holds every logged row of the run except the
timing-dependent ``perf/`` keys: losses, learning rates, grad norms, validation
losses and, on stat steps, every per-layer statistic (``grad/``, ``act/``,
``weight/``, ``fp8/``). ``python -m scripts.update_golden`` regenerates them,
only for changes that are meant to touch numerics.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

GOLDEN_DIR = Path(__file__).parent / "assets" / "losses"

#: one recipe of each kind, 50 steps on the tiny model (about 10 s each on 2 CPU cores)
RECIPE_STEPS = 50
RECIPE_COMMON = (
    f"parallel=single trainer.max_steps={RECIPE_STEPS} trainer.log_every=1 trainer.eval_every=25 "
    "trainer.eval_sequences=32 stats.every=25"
)
RECIPE_GOLDEN = {
    f"tiny_{r}": f"+recipe={r} {RECIPE_COMMON}"
    for r in (
        "mxfp8_e4m3",
        "mxfp4_e2m1",
        "mxfp8",
        "nvfp4",
        "fp8_delayed",
        "fp8_current",
        "fp8_block",
        "fp8_rowwise",
    )
}


#: loss tolerance on a machine other than the one that recorded the golden file (see machine_signature)
OTHER_MACHINE_LOSS_ATOL = 2e-2


def machine_signature() -> dict[str, Any]:
    """What decides the bits of a CPU run besides the code: BLAS/oneDNN and ATen pick their
    kernels (vector width, AMX) by the CPU, and reduction order by the thread count. Measured:
    the same tree gives last-bit different FP32 losses on two CPU models, and pinning
    ``MKL_CBWR``/``ONEDNN_MAX_CPU_ISA``/``ATEN_CPU_CAPABILITY`` did not make them agree, so a
    golden file is bit-exact on the machine kind that recorded it and close elsewhere."""
    import torch

    model = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), "")
    return {
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu": model,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpus": os.cpu_count(),
    }


def _cpuinfo() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read().splitlines()
    except OSError:
        return []


def same_machine(golden: dict[str, Any]) -> bool:
    return golden.get("signature") == machine_signature()


def golden_rows(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of a run with the timing-dependent keys dropped."""
    return [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in metrics]
