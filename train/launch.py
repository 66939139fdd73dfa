"""Start the training processes: in this process, or N local workers via torch's elastic launch API."""

from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path
from typing import Any

from train import distenv
from train.config import RunConfig
from train.validate import Plan

#: the status ``exit_cleanly_at_exit`` leaves with (a sweep with a failed member sets 1)
_EXIT_STATUS = [0]


def set_exit_status(code: int) -> None:
    _EXIT_STATUS[0] = code


def exit_cleanly_at_exit() -> None:
    """After a run, leave with the recorded status (0 unless ``set_exit_status``) without running
    C++ static destructors: torch's gloo teardown sometimes aborts the process at exit
    (``terminate called without an active exception``) after all work is done."""

    def _exit() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[0])

    atexit.register(_exit)


def worker_entry(cfg: RunConfig, plan: Plan, run_dir: str) -> dict[str, Any]:
    """Runs in each local worker started by ``launch``; torch elastic set RANK & co. A worker dies
    with the process that started it (Linux ``PR_SET_PDEATHSIG``): a SIGKILLed launcher leaves no
    orphans training on."""
    from recipes.errors import ConfigError
    from train.loop import run_training

    die_with_parent()
    try:
        summary = run_training(cfg, plan, Path(run_dir))
    except ConfigError as e:  # found after set-up began (every rank finds it): the one line, not a traceback
        summary = {
            "state": "config_error",
            "reason": e.one_line(),
            "key": e.key,
            "value": str(e.value),
            "fix": e.fix,
        }
    exit_cleanly_at_exit()
    return summary


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (a no-op elsewhere)."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def launch(cfg: RunConfig, plan: Plan, run_dir: Path) -> dict[str, Any]:
    denv = distenv.detect()
    nproc = cfg.launcher.nproc_per_node
    if denv.world_size > 1 or nproc == 1:
        from train.loop import run_training

        if denv.world_size > 1 and nproc > 1 and denv.is_main:
            print(
                f"lowbit: launcher.nproc_per_node={nproc} ignored: already started by {denv.launcher}",
                flush=True,
            )
        return run_training(cfg, plan, run_dir)
    return launch_local_workers(cfg, plan, run_dir, nproc=nproc)


def launch_local_workers(cfg: RunConfig, plan: Plan, run_dir: Path, *, nproc: int) -> dict[str, Any]:
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from train.data import prepare_data

    prepare_data(cfg.data, seq_len=cfg.model.seq_len)  # once, here; workers then read the cache
    port = distenv.free_port()
    lc = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"lowbit-{os.getpid()}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{port}",
        max_restarts=0,
        monitor_interval=0.2,
        start_method="spawn",
        local_addr="127.0.0.1",
    )
    os.environ["LOWBIT_LAUNCHER"] = "lowbit"
    os.environ.setdefault(
        "OMP_NUM_THREADS",
        str(distenv.threads_per_rank(configured=cfg.launcher.omp_threads, local_world_size=nproc)),
    )
    try:
        results = elastic_launch(lc, worker_entry)(cfg, plan, str(run_dir))
    finally:
        os.environ.pop("LOWBIT_LAUNCHER", None)
    return results[0]
