"""Process topology: who am I, how many are we, and where is rank 0.

One entry point serves every launcher by reading its environment:

* torchrun / torch elastic / the ``deepspeed`` launcher: RANK, WORLD_SIZE,
  LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT.
* ``srun`` (Slurm job steps): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
  SLURM_STEP_NUM_TASKS / SLURM_NTASKS_PER_NODE; MASTER_ADDR is the first
  host of SLURM_JOB_NODELIST (slurm/env.sh exports it) and MASTER_PORT is
  derived from the job id. The batch shell itself is *not* a step (no
  SLURM_STEP_ID, or the "batch" step), so a plain ``python`` in an sbatch
  script runs as one process.
* nothing: one process, or ``launcher.nproc_per_node`` local workers that
  the entry point starts itself.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    launcher: str = "none"
    """none | torchrun | slurm | lowbit (workers started by train/run.py)."""

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _slurm_step_env(env: dict[str, str]) -> DistEnv | None:
    step = env.get("SLURM_STEP_ID")
    if "SLURM_PROCID" not in env or step is None or step in ("batch", "extern", "4294967294"):
        return None
    world = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")))
    tasks_per_node = env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_NTASKS_PER_NODE", str(world)))
    local_world = int(tasks_per_node.split("(")[0].split(",")[0])
    addr = env.get("MASTER_ADDR") or _first_slurm_host(
        env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", ""))
    )
    port = int(env.get("MASTER_PORT") or 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return DistEnv(
        rank=int(env["SLURM_PROCID"]),
        world_size=world,
        local_rank=int(env.get("SLURM_LOCALID", "0")),
        local_world_size=local_world,
        master_addr=addr,
        master_port=port,
        launcher="slurm",
    )


def _first_slurm_host(nodelist: str) -> str:
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=20
        )
        return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return nodelist.split(",")[0].split("[")[0]


def detect(env: dict[str, str] | None = None) -> DistEnv:
    """The topology this process was started into (not counting workers it may start)."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=world,
            local_rank=int(env.get("LOCAL_RANK", "0")),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", str(world))),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", "0")),
            launcher=env.get("LOWBIT_LAUNCHER", "torchrun"),
        )
    slurm = _slurm_step_env(env)
    if slurm is not None:
        return slurm
    return DistEnv()


def export(denv: DistEnv) -> None:
    """Write the topology into the variables torch.distributed's env:// reads."""
    if denv.world_size > 1 and not denv.master_port:
        raise RuntimeError(
            f"{denv.launcher} started {denv.world_size} ranks without a MASTER_PORT; "
            "with torchrun use --standalone or --master_port=<port>"
        )
    port = denv.master_port or free_port()
    os.environ.update(
        RANK=str(denv.rank),
        WORLD_SIZE=str(denv.world_size),
        LOCAL_RANK=str(denv.local_rank),
        LOCAL_WORLD_SIZE=str(denv.local_world_size),
        MASTER_ADDR=denv.master_addr,
        MASTER_PORT=str(port),
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def threads_per_rank(*, configured: int, local_world_size: int) -> int:
    if configured > 0:
        return configured
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(local_world_size, 1))


def log0(denv: DistEnv, msg: str) -> None:
    """``lowbit: msg`` on global rank 0 only."""
    if denv.is_main:
        print(f"lowbit: {msg}", flush=True)


def mean_across_ranks(x: Any, *, world_size: int) -> float:
    """The mean of a scalar tensor over all ranks (one all-reduce and one host sync)."""
    import torch.distributed as dist

    x = x.detach().float().clone()
    if world_size > 1:
        dist.all_reduce(x)
        x /= world_size
    return x.item()
