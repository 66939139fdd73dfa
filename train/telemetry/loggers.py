"""Loggers share ``log(metrics, step)`` and ``close()``. Only global rank 0 builds them.

* ``JsonlLogger``   always: ``metrics.jsonl`` in the run directory, one JSON
  object per logged step, flushed as written.
* ``WandbLogger``   W&B, imported lazily, files inside the run directory, mode
  from ``logger.wandb.mode`` or ``$WANDB_MODE`` (default offline, so a
  machine without network never hangs).
* ``ConsoleLogger`` one progress line per logged step.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Literal, Protocol

from train.config import RunConfig


class Logger(Protocol):
    def log(self, metrics: dict[str, Any], step: int) -> None: ...
    def summary(self, values: dict[str, Any]) -> None:
        """The run's final values (W&B run summary); loggers without one ignore them."""

    def close(self) -> None: ...


class JsonlLogger:
    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "a", buffering=1)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._f.write(json.dumps(encode_row({"step": step, **metrics}), allow_nan=False) + "\n")
        self._f.flush()

    def summary(self, values: dict[str, Any]) -> None:
        return None  # summary.json is written by the trainer

    def close(self) -> None:
        self._f.close()


#: suffix of the key that names a non-finite value's kind in strict-JSON metrics rows
NONFINITE_SUFFIX = "/nonfinite"


def encode_row(row: dict[str, Any]) -> dict[str, Any]:
    """Strict JSON: a non-finite float becomes ``null`` plus ``<key>/nonfinite`` = nan | inf | -inf
    (the convention of the team-review issue; ``decode_row`` turns it back)."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        if isinstance(v, float) and not math.isfinite(v):
            out[k] = None
            out[k + NONFINITE_SUFFIX] = "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
        else:
            out[k] = v
    return out


def decode_row(row: dict[str, Any]) -> dict[str, Any]:
    """The floats ``encode_row`` wrote (bare ``NaN`` / ``Infinity`` of older files load as floats anyway)."""
    out = {k: v for k, v in row.items() if not k.endswith(NONFINITE_SUFFIX)}
    for k, v in row.items():
        if k.endswith(NONFINITE_SUFFIX):
            out[k[: -len(NONFINITE_SUFFIX)]] = float(v)
    return out


class ConsoleLogger:
    def __init__(self, *, max_steps: int, stream=sys.stdout):
        self.max_steps = max_steps
        self.stream = stream
        self._t0 = time.perf_counter()
        self._step0: int | None = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self._step0 is None:
            self._step0, self._t0 = step, time.perf_counter()
        done = step - self._step0
        eta = (time.perf_counter() - self._t0) / done * (self.max_steps - step) if done else math.nan
        parts = [f"step {step:>6}/{self.max_steps}"]
        if "train/loss" in metrics:
            parts.append(f"loss {metrics['train/loss']:.4f}")
        if "val/loss" in metrics:
            parts.append(f"val {metrics['val/loss']:.4f}")
        if "train/lr" in metrics:
            parts.append(f"lr {metrics['train/lr']:.2e}")
        if "perf/tokens_per_s" in metrics:
            parts.append(f"{metrics['perf/tokens_per_s'] / 1e3:.1f}k tok/s")
        parts.append(f"ETA {_hms(eta)}")
        print(" | ".join(parts), file=self.stream, flush=True)

    def summary(self, values: dict[str, Any]) -> None:
        return None

    def close(self) -> None:
        return None


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


WANDB_MODES = ("online", "offline", "disabled")


def wandb_mode(cfg: RunConfig) -> Literal["online", "offline", "disabled"]:
    """``logger.wandb.mode``, else ``$WANDB_MODE``, else offline (validated at the boundary)."""
    mode = cfg.logger.wandb.mode or os.environ.get("WANDB_MODE") or "offline"
    assert mode in WANDB_MODES, mode
    return mode  # type: ignore[return-value]  # checked just above


def wandb_api_key_present() -> bool:
    """``WANDB_API_KEY`` is set, or the netrc file (``$NETRC``, else ``~/.netrc``, where ``wandb
    login`` writes it) has an entry for the W&B host (``$WANDB_BASE_URL``, else api.wandb.ai)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or ""
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_server_problem(timeout_s: float) -> str | None:
    """None when the W&B server (``$WANDB_BASE_URL``, else api.wandb.ai) answers an HTTP request
    within ``timeout_s`` (any status counts: it is up), else what went wrong."""
    import urllib.error
    import urllib.request

    url = (os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").rstrip("/")
    try:
        urllib.request.urlopen(url + "/healthz", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return f"{url} did not answer within {timeout_s:g} s ({reason})"
    return None


def run_name(cfg: RunConfig, config: dict[str, Any]) -> str:
    """What a run is, for W&B's run list: ``<model>-<recipe>-<backend>-zero<stage>-s<seed>``
    (``tiny-mxfp4_e2m1-emulated-zero0-s1``; ``logger.wandb.name`` wins). The backend is the one the
    recipe resolved to (``config``: the run_config dict), else the configured one."""
    backend = config.get("resolved", {}).get("recipe", {}).get("resolved_backend") or cfg.recipe.backend
    return f"{cfg.model.name}-{cfg.recipe.name}-{backend}-zero{cfg.parallel.zero_stage}-s{cfg.trainer.seed}"


def run_tags(cfg: RunConfig, config: dict[str, Any]) -> list[str]:
    """The recipe's name, kind and element formats, the backend, the model and the parallelism, as
    tags (the recipe's own values, never parsed), after the user's ``logger.wandb.tags``."""
    r = cfg.recipe
    backend = config.get("resolved", {}).get("recipe", {}).get("resolved_backend")
    found = [r.name, r.quantizer, r.input_format, r.weight_format, r.grad_output_format, backend,
             cfg.model.name, cfg.parallel.name]  # fmt: skip
    return [str(t) for t in dict.fromkeys(found) if t not in (None, "none", "")]


class WandbLogger:
    def __init__(self, cfg: RunConfig, *, run_dir: Path, config: dict[str, Any]):
        import wandb

        w = cfg.logger.wandb
        run_id = self._run_id(run_dir)
        mode = wandb_mode(cfg)
        if mode == "online" and not wandb_api_key_present():
            # without a key W&B refuses to start (a UsageError): train anyway, logged offline
            print(f"lowbit: W&B is online but has no API key (WANDB_API_KEY, or `wandb login`): logging "
                  f"offline; sync later with `wandb sync {run_dir / 'wandb'}`", flush=True)  # fmt: skip
            mode = "offline"
        if mode == "online" and (why := wandb_server_problem(w.init_timeout_s)):
            # W&B's own init would wait for minutes: train now, logged offline
            print(f"lowbit: W&B server {why}: logging offline; sync later with `wandb sync {run_dir / 'wandb'}`",
                  flush=True)  # fmt: skip
            mode = "offline"
        self.run = wandb.init(
            project=w.project,
            entity=w.entity,
            group=w.group,
            name=w.name or run_name(cfg, config),
            tags=list(dict.fromkeys([*w.tags, *run_tags(cfg, config)]))[:64],
            config=config,
            dir=str(run_dir),
            mode=mode,
            id=run_id,
            resume="allow",
            settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
        )
        self.failed = False
        self.run.define_metric("step")
        self.run.define_metric("val/loss", step_metric="step", summary="min")
        self._families: set[str] = set()

    @staticmethod
    def _run_id(run_dir: Path) -> str:
        """One W&B run per run directory: a requeued or resumed job continues the same run."""
        import secrets

        path = run_dir / "wandb_run_id"
        if not path.exists():
            path.write_text(secrets.token_hex(4))
        return path.read_text().strip()

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._guard(self._log, metrics, step)

    def _guard(self, fn: Any, *args: Any) -> None:
        """W&B never stops training: its first exception is printed once, then W&B is switched off
        for the rest of the run (metrics.jsonl stays complete)."""
        if self.failed:
            return
        try:
            fn(*args)
        except Exception as e:  # anything W&B raises: a network, disk or protocol failure
            self.failed = True
            print(f"lowbit: W&B failed ({type(e).__name__}: {e}); W&B is off for the rest of this run, "
                  "metrics.jsonl has every row", flush=True)  # fmt: skip

    def _log(self, metrics: dict[str, Any], step: int) -> None:
        import wandb

        for family in {k.split("/", 1)[0] for k in metrics if "/" in k} - self._families:
            self.run.define_metric(f"{family}/*", step_metric="step")  # every family plots against the step
            self._families.add(family)
        row = {k: _wandb_value(wandb, k, v) for k, v in metrics.items()}
        self.run.log({"step": step, **row}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        self._guard(self.run.summary.update, values)

    def close(self) -> None:
        """Finish the W&B run, also after a W&B failure switched logging off: an unfinished run
        would be handed back by the next ``wandb.init`` in this process (a local sweep runs its
        members in one process) instead of a new one."""
        if not self.failed:
            self._guard(self.run.finish)
            return
        try:
            self.run.finish()
        except Exception:  # W&B already failed once and said so; finishing is best effort
            pass


def _wandb_value(wandb: Any, key: str, v: Any) -> Any:
    """``*_hist`` keys as W&B histograms: a list of values (W&B bins them), or the pre-binned
    ``{"_type": "histogram", "bins": edges, "values": counts}`` of ``metrics.jsonl``."""
    if not key.endswith("_hist"):
        return v
    if isinstance(v, list):
        return wandb.Histogram(v)
    if isinstance(v, dict) and v.get("_type") == "histogram":
        return wandb.Histogram(np_histogram=(v["values"], v["bins"]))
    return v


class MultiLogger:
    def __init__(self, loggers: list[Logger]):
        self.loggers = loggers

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for lg in self.loggers:
            lg.log(metrics, step)

    def summary(self, values: dict[str, Any]) -> None:
        for lg in self.loggers:
            lg.summary(values)

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()


def build_loggers(cfg: RunConfig, *, run_dir: Path, config: dict[str, Any], is_main: bool) -> MultiLogger:
    if not is_main:
        return MultiLogger([])
    loggers: list[Logger] = [JsonlLogger(run_dir / "metrics.jsonl")]
    if cfg.logger.wandb.enabled and wandb_mode(cfg) != "disabled":
        loggers.append(WandbLogger(cfg, run_dir=run_dir, config=config))
    if cfg.logger.console:
        loggers.append(ConsoleLogger(max_steps=cfg.trainer.max_steps))
    return MultiLogger(loggers)
