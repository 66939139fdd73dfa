"""Command-line plumbing around Hydra: pre-flight checks, resolvers, one-line errors."""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from omegaconf import OmegaConf

from recipes.errors import ConfigError

if TYPE_CHECKING:
    from train.config import RunConfig

#: the config tree of ``train/run.py`` (conf/ at the checkout root)
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

_HYDRA_FLAGS_WITHOUT_COMPOSE = (
    "--help",
    "-h",
    "--hydra-help",
    "--info",
    "-i",
    "--version",
    "--shell-completion",
    "-sc",
)
GROUPS = ("model", "parallel", "data", "trainer", "logger", "recipe", "experiment")


def config_error_exit(err: ConfigError) -> NoReturn:
    print(err.one_line(), file=sys.stderr, flush=True)
    sys.exit(2)


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop ``--local_rank=N`` / ``--local_rank N`` (the deepspeed launcher adds it; LOCAL_RANK is in the env)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a.startswith("--local_rank=") or a.startswith("--local-rank="):
            continue
        elif a in ("--local_rank", "--local-rank"):
            skip = True
        else:
            out.append(a)
    return out


#: Slurm's step ids above this are its batch / extern / interactive steps, not an ``srun`` step
_SLURM_MAX_STEP = 0xFFFFFFF0


def slurm_stamp(env: dict[str, str], claims: Path) -> str:
    """``slurm-<job>[_<task>].<step>[-<k>]``: unique per invocation, the same on every rank of it,
    and the same again after a requeue, from Slurm's ids alone (never a clock ranks could disagree on).

    ``<step>`` is the ``srun`` step id (``batch`` for a command the batch script runs itself);
    ``-<k>`` marks the k-th (k >= 2) invocation of ``train/run.py`` by the same rank in the same
    step, counted per rank and per ``SLURM_RESTART_COUNT`` in ``claims/`` (every rank runs the
    same commands, so each counts the same k without talking to the others; a requeued job
    counts from 1 again, so each command finds its own run directory and resumes it)."""
    job = env.get("SLURM_ARRAY_JOB_ID") or env["SLURM_JOB_ID"]
    task = env.get("SLURM_ARRAY_TASK_ID") if env.get("SLURM_ARRAY_JOB_ID") else None
    step = env.get("SLURM_STEP_ID", "")
    step = step if step.isdigit() and int(step) < _SLURM_MAX_STEP else "batch"
    base = f"slurm-{job}" + (f"_{task}" if task else "") + f".{step}"
    rank = env.get("SLURM_PROCID", "0")
    claims.mkdir(parents=True, exist_ok=True)
    tally = claims / f"{base}.restart{env.get('SLURM_RESTART_COUNT', '0')}.rank{rank}"
    with open(tally, "a+") as f:
        f.seek(0)
        k = len(f.read().splitlines()) + 1
        f.write(f"{os.getpid()}\n")
    return base if k == 1 else f"{base}-{k}"


@functools.cache
def run_stamp() -> str:
    """Run-directory name: ``slurm_stamp`` inside a Slurm job (so every rank of a job, and a
    requeued job, agrees on it), otherwise the local time. Once per process: every composition
    (the preflight's, Hydra's) sees the same name, and a Slurm invocation counts once."""
    if os.environ.get("SLURM_JOB_ID"):
        claims = Path(os.environ.get("LOWBIT_OUTPUTS", "outputs")) / "runs" / ".slurm_claims"
        return slurm_stamp(dict(os.environ), claims)
    return time.strftime("%Y-%m-%d_%H-%M-%S")


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("lowbit_run_stamp"):
        OmegaConf.register_new_resolver("lowbit_run_stamp", run_stamp, use_cache=True)


def split_override(arg: str) -> tuple[str, str] | None:
    if "=" not in arg or arg.startswith("-"):
        return None
    key, val = arg.split("=", 1)
    return key.lstrip("+~"), val


def _group_options(conf_dirs: list[str], group: str) -> list[str]:
    return sorted({p.stem for d in conf_dirs for p in Path(d, group).glob("*.yaml")})


def searchpath_entries(overrides: list[str]) -> list[str]:
    """The entries of ``hydra.searchpath=[...]`` overrides, in order (``file://DIR``, ``pkg://...``)."""
    return [entry.strip().strip("'\"") for arg in overrides if (kv := split_override(arg)) and kv[0] == "hydra.searchpath"
            for entry in kv[1].strip("[]").split(",") if entry.strip()]  # fmt: skip


def search_dirs(overrides: list[str]) -> list[str] | None:
    """The ``file://`` directories of a ``hydra.searchpath=[...]`` override (where a tool such as
    ``train.sensitivity`` writes presets); None when an entry is not a directory (``pkg://``),
    whose options this check cannot list."""
    entries = searchpath_entries(overrides)
    if not all(e.startswith("file://") for e in entries):
        return None
    return [e.removeprefix("file://") for e in entries]


def check_group_choices(overrides: list[str], *, conf_dir: str) -> None:
    extra = search_dirs(overrides)
    if extra is None:
        return  # compose() turns Hydra's own "could not find" into the one-line error
    for arg in overrides:
        kv = split_override(arg)
        if kv is None or kv[0] not in GROUPS:
            continue
        key, val = kv
        options = _group_options([conf_dir, *extra], key)
        for choice in val.split(","):
            if choice not in options:
                raise ConfigError(key, choice, f"unknown {key}; choose one of: {', '.join(options)}")


def _error_key(exc: BaseException | None) -> str | None:
    while exc is not None:
        key = getattr(exc, "full_key", None)
        if key:
            return str(key)
        exc = exc.__cause__ or exc.__context__
    return None


def compose(overrides: list[str], *, conf_dir: str | Path = CONF_DIR) -> RunConfig:
    """The typed config that ``python train/run.py OVERRIDES`` would run: the one compose
    helper of the CLI, the tools (``python -m train.<tool>``), the tests and the benches.
    A mistake raises a ConfigError naming the override."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from train.config import register_configs, to_run_config

    register_configs()
    register_resolvers()
    check_group_choices(overrides, conf_dir=str(conf_dir))
    try:
        with initialize_config_dir(config_dir=str(Path(conf_dir).resolve()), version_base="1.3"):
            return to_run_config(hydra_compose("config", overrides=overrides))
    except ConfigError:
        raise
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        key = _error_key(e)
        for arg in overrides:
            kv = split_override(arg)
            if kv and (key is None and kv[0] in msg or key == kv[0]):
                raise ConfigError(kv[0], kv[1], msg) from None
        raise ConfigError(key or "overrides", " ".join(overrides) or "(none)", msg) from None


def preflight(argv: list[str], *, conf_dir: str | Path = CONF_DIR) -> None:
    """Compose the config once before Hydra's own run, so mistakes in the command
    line become one-line ConfigErrors instead of tracebacks. With Hydra's ``--config-dir DIR``
    (a copy of conf/ with added presets) the checks use DIR."""
    if any(a in _HYDRA_FLAGS_WITHOUT_COMPOSE or a.startswith("--cfg") or a == "-c" for a in argv):
        return
    overrides, flag = [], None
    for a in argv:
        if flag in ("--config-dir", "-cd"):
            conf_dir = a
        elif a.startswith("--config-dir="):
            conf_dir = a.split("=", 1)[1]
        elif not a.startswith("-") and flag not in ("--config-path", "-cp", "--config-name", "-cn"):
            overrides.append(a)
        flag = a
    check_group_choices(overrides, conf_dir=str(conf_dir))
    check_launcher(overrides, multirun=any(a in ("-m", "--multirun") for a in argv))
    check_output_dirs(overrides)
    if any(a in ("-m", "--multirun") for a in argv):
        return
    compose(overrides, conf_dir=conf_dir)


def check_launcher(overrides: list[str], *, multirun: bool) -> None:
    """``hydra/launcher=slurm`` submits sweep members with sbatch (submitit): Hydra ignores a
    launcher without ``-m``, and without sbatch submitit fails with a traceback after the sweep dir
    exists."""
    for arg in overrides:
        if split_override(arg) != ("hydra/launcher", "slurm"):
            continue
        if not multirun:
            raise ConfigError("hydra/launcher", "slurm", "a Hydra launcher runs sweeps only (Hydra ignores it "
                              "here): add -m, or submit one run with sbatch slurm/train.sbatch")  # fmt: skip
        if shutil.which("sbatch") is None:
            raise ConfigError("hydra/launcher", "slurm", "sbatch is not on PATH: submit from a Slurm login node, "
                              "or drop hydra/launcher=slurm to sweep on this machine")  # fmt: skip


def check_output_dirs(overrides: list[str]) -> None:
    """``hydra.run.dir`` / ``hydra.sweep.dir`` must be creatable: create them now (Hydra would, a
    moment later, with a traceback when it cannot)."""
    for o in overrides:
        key, _, value = o.partition("=")
        if key in ("hydra.run.dir", "hydra.sweep.dir") and value and "${" not in value:
            try:
                Path(value).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(
                    key, value, f"cannot create it ({e.strerror}); choose a writable directory"
                ) from None


def tool_args(
    parser: argparse.ArgumentParser, argv: list[str] | None = None
) -> tuple[argparse.Namespace, RunConfig]:
    """The convention of every ``python -m train.<tool>``: the tool's own flags first
    (``parser``), then Hydra overrides for the same config tree as ``train/run.py``.
    A mistake in either prints one line, ``lowbit: config error: ...``, and exits 2."""
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train/run.py")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return args, compose(args.overrides)
    except ConfigError as e:
        config_error_exit(e)
