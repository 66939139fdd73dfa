"""lowbit's one entry point.

    python train/run.py                                   # tiny model, Shakespeare, CPU, W&B offline
    python train/run.py +recipe=fp8_delayed model=125m parallel=zero2
    python train/run.py parallel=zero2 launcher.nproc_per_node=2
    torchrun --nproc_per_node 8 train/run.py parallel=zero2 ...   # or srun / the deepspeed launcher
    python train/run.py -m +recipe=fp32,bf16                      # a local sweep

Errors in the user's input print one line, ``lowbit: config error:
<key>=<value>: <what to do>``, and exit with code 2 before any heavy start-up.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0]).resolve() == ROOT / "train":
    sys.path.pop(0)  # `python train/run.py` put train/ first; import it as the package `train`
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from recipes.errors import ConfigError  # noqa: E402
from train.cli import config_error_exit, preflight, register_resolvers, strip_launcher_args  # noqa: E402
from train.config import register_configs, to_run_config  # noqa: E402
from train.sweep_index import record_member_failure  # noqa: E402
from train.validate import validate  # noqa: E402

CONF_DIR = str(ROOT / "conf")


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    from train import distenv

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        cfg = to_run_config(dcfg)
        if multirun and cfg.logger.wandb.group is None:
            cfg.logger.wandb.group = Path(hc.sweep.dir).name  # one W&B group per sweep
        denv = distenv.detect()
        world = denv.world_size if denv.world_size > 1 else cfg.launcher.nproc_per_node
        plan = validate(cfg, world_size=world)
        from train.rundir import resume_layout_problem

        stage = cfg.parallel.zero_stage
        if why := resume_layout_problem(
            run_dir, cfg.trainer.resume, world_size=plan.world_size, zero_stage=stage
        ):
            raise why
    except ConfigError as e:
        if not multirun:
            config_error_exit(e)
        # a sweep member's mistake fails that member only: the others run, sweep.json records it
        # and the sweep exits non-zero (train.sweep_index)
        print(e.one_line(), file=sys.stderr, flush=True)
        record_member_failure(run_dir, "config_error", e.one_line())
        return
    from train.launch import exit_cleanly_at_exit, launch, set_exit_status

    try:
        summary = launch(cfg, plan, run_dir)
        if summary.get("state") == "config_error":  # a local worker's (train.launch.worker_entry)
            raise ConfigError(summary["key"], summary["value"], summary["fix"])
    except ConfigError as e:  # found once set-up began (e.g. a reference run's fingerprints)
        if not multirun:
            config_error_exit(e)
        print(e.one_line(), file=sys.stderr, flush=True)
        record_member_failure(run_dir, "config_error", e.one_line())
        return
    except Exception as e:
        if not multirun:
            raise
        import traceback

        traceback.print_exc()
        record_member_failure(run_dir, "failed", f"{type(e).__name__}: {e}")
        return
    if summary.get("state") == "nonfinite":  # trainer.on_nonfinite=stop: a distinct exit code
        from train.telemetry.nonfinite import EXIT_NONFINITE

        if multirun:
            record_member_failure(run_dir, "nonfinite", f"report: {summary.get('nonfinite_report')}")
            return
        set_exit_status(EXIT_NONFINITE)
    exit_cleanly_at_exit()


if __name__ == "__main__":
    sys.argv = strip_launcher_args(sys.argv)
    register_configs()
    register_resolvers()
    try:
        preflight(sys.argv[1:], conf_dir=CONF_DIR)
    except ConfigError as e:
        config_error_exit(e)
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    main()
