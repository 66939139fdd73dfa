"""Faults a numerics lab meets: a SIGKILLed run resumes exactly; a failing sweep member is reported,
not hidden; bad inputs fail in one line before any start-up."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys

import pytest

from .conftest import ROOT, RUN_PY, run_lowbit
from .test_preemption import wait_for_step

#: wall-clock keys that differ between any two runs (everything else must be equal bit for bit)
WALL_CLOCK = ("perf/",)
STEPS = 30
COMMON = [f"trainer.max_steps={STEPS}", "trainer.log_every=1", "trainer.eval_every=15",
          "trainer.eval_sequences=16", "trainer.checkpoint_every=10", "logger=none"]  # fmt: skip


def numerics(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(WALL_CLOCK)} for r in rows]


@pytest.mark.parametrize("args", [
    ["+recipe=bf16"],
    ["+recipe=fp8_delayed", "recipe.backend=torch"],  # the delayed-scaling state of both backends
    pytest.param(["+recipe=bf16", "parallel=zero2", "launcher.nproc_per_node=2"], marks=pytest.mark.dist),
    # ZeRO-3, 2 accumulation micro-batches per rank, stochastic rounding on 2 ranks (the generator
    # state travels in the checkpoint; a single-rank nvfp4 case was folded into this one), a lockstep reference
    pytest.param(["+recipe=nvfp4", "parallel=zero3", "launcher.nproc_per_node=2", "trainer.micro_batch_size=4",
                  "reference.mode=lockstep"], marks=pytest.mark.dist),
], ids=["bf16", "fp8_delayed_torch", "bf16_zero2_2ranks", "nvfp4_zero3_accum_lockstep_2ranks"])  # fmt: skip
def test_sigkill_then_the_same_command_reproduces_the_uninterrupted_run(args, tmp_path):
    """SIGKILL (no handler, no last checkpoint) after step 15 of 30 with a checkpoint every 10 steps:
    the same command resumes from step 10 and its metrics.jsonl equals an uninterrupted run's in
    every key but the wall-clock ones."""
    ref = run_lowbit([*args, *COMMON], run_dir=tmp_path / "ref")
    run_dir = tmp_path / "killed"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    proc = subprocess.Popen([sys.executable, str(RUN_PY), *args, *COMMON, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    wait_for_step(run_dir / "metrics.jsonl", 15, proc=proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers, at once
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest in ("step_0000010", "step_0000020")  # 20 only if the machine stalled the kill
    resumed = run_lowbit([*args, *COMMON], run_dir=run_dir)
    assert f"at step {int(latest[5:])}" in resumed.proc.stdout
    assert numerics(resumed.metrics) == numerics(ref.metrics)


def test_a_failing_sweep_member_fails_the_sweep_and_the_others_still_run(tmp_path):
    """fp16 is refused on the CPU: that member is a config error, bf16 still trains, sweep.json says
    which is which, and the sweep exits 1 (it used to exit 0 with no sweep.json)."""
    res = run_lowbit(["-m", "+recipe=bf16,fp16", "trainer.max_steps=2", "trainer.eval_sequences=16", "logger=none",
                      f"hydra.sweep.dir={tmp_path}"], check=False)  # fmt: skip
    assert res.proc.returncode == 1, res.proc.stderr[-3000:]
    assert "lowbit: config error: recipe.precision=fp16:" in res.proc.stderr
    index = json.loads((tmp_path / "sweep.json").read_text())
    states = {tuple(j["overrides"])[0]: j for j in index["jobs"]}
    assert states["+recipe=bf16"]["state"] == "completed"
    fp16 = states["+recipe=fp16"]
    assert fp16["state"] == "config_error" and fp16["reason"].startswith(
        "lowbit: config error: recipe.precision"
    )
    assert "sweep member 1 config_error" in res.proc.stdout

    from scripts.resubmit_failed import resubmit_commands

    assert resubmit_commands(tmp_path) == []  # a config error would fail again: not resubmitted


@pytest.mark.parametrize("override,key", [
    ("trainer.lr=-1", "trainer.lr"),
    ("data.path=/nonexistent/corpus.txt", "data.path"),  # with data=shakespeare it used to be ignored
    ("hydra.run.dir=/proc/nope", "hydra.run.dir"),  # used to be Hydra's traceback
])  # fmt: skip
def test_bad_input_is_one_line_before_start_up(override, key, tmp_path):
    res = run_lowbit([override, "trainer.max_steps=2"], run_dir=tmp_path / "run", check=False, timeout=120)
    assert res.proc.returncode == 2
    lines = [line for line in res.proc.stderr.splitlines() if line.strip() and "Warning" not in line]
    assert len(lines) == 1 and lines[0].startswith(f"lowbit: config error: {key}="), res.proc.stderr[-2000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_metrics_jsonl_is_strict_json_with_non_finite_values(tmp_path):
    from train.telemetry.loggers import JsonlLogger, decode_row

    log = JsonlLogger(tmp_path / "metrics.jsonl")
    log.log(
        {"train/loss": float("nan"), "train/grad_norm": float("inf"), "x": -float("inf"), "ok": 1.5}, step=3
    )
    log.close()
    line = (tmp_path / "metrics.jsonl").read_text().strip()
    row = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert row["train/loss"] is None and row["train/loss/nonfinite"] == "nan"
    assert row["train/grad_norm/nonfinite"] == "inf" and row["x/nonfinite"] == "-inf" and row["ok"] == 1.5
    back = decode_row(row)
    assert (
        back["train/grad_norm"] == float("inf")
        and back["x"] == -float("inf")
        and back["train/loss"] != back["train/loss"]
    )
    assert set(back) == {"step", "train/loss", "train/grad_norm", "x", "ok"}


def test_wandb_online_without_a_key_trains_and_logs_offline(tmp_path):
    """It used to stop before training with W&B's UsageError traceback."""
    if os.environ.get("WANDB_API_KEY"):
        pytest.skip("this environment has a W&B API key; the case needs none")
    env = {"WANDB_MODE": "online", "HOME": str(tmp_path / "home"), "NETRC": str(tmp_path / "no_netrc")}
    res = run_lowbit(["trainer.max_steps=3", "trainer.eval_sequences=16"], run_dir=tmp_path / "run", env=env)
    assert "W&B is online but has no API key" in res.proc.stdout and "wandb sync" in res.proc.stdout
    assert [r["step"] for r in res.metrics][-1] == 3
    from tests.wandb_offline import find_run_files, read_run

    run = read_run(find_run_files(tmp_path / "run")[0])
    assert len(run["history"]) == len(res.metrics) >= 1


# ---------------------------------------------------------------- non-finite policies

NF = ["trainer.max_steps=8", "trainer.log_every=1", "trainer.eval_every=100", "trainer.eval_sequences=16",
      "logger=none", "debug.inject_nonfinite_at_step=5"]  # fmt: skip


def test_stop_names_the_layer_keeps_the_last_good_checkpoint_and_exits_3(tmp_path):
    """A backward-only fault (NaN output gradient of blocks.1.mlp.fc at step 5; the loss stays finite)
    under fp8_delayed: the run stops at step 5, writes no checkpoint from it, reports the layer."""
    res = run_lowbit([*NF, "+recipe=fp8_delayed", "debug.inject_layer=blocks.1.mlp.fc", "trainer.checkpoint_every=2"],
                     run_dir=tmp_path, check=False)  # fmt: skip
    assert res.proc.returncode == 3, res.proc.stderr[-3000:]
    report = json.loads((tmp_path / "nonfinite_report.json").read_text())
    assert report["step"] == 5 and report["policy"] == "stop" and not report["loss_nonfinite"]
    first = report["first_nonfinite"]
    assert first["layer"] == "blocks.1.mlp.fc" and first["tensor"] == "blocks.1.mlp.fc.weight"
    assert "wgrad" in first["what"]
    assert "fp8/blocks.1.mlp.fc/grad_output/scale" in report["layer_recipe_stats"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_0000004"
    assert not (tmp_path / "summary.json").exists()
    assert [r["step"] for r in res.metrics] == [1, 2, 3, 4, 5]
    assert "stopping without a checkpoint" in res.proc.stdout


def test_an_activation_fault_is_reported_as_the_loss(tmp_path):
    res = run_lowbit([*NF, "+recipe=bf16", "debug.inject_tensor=activation"], run_dir=tmp_path, check=False)
    assert res.proc.returncode == 3
    report = json.loads((tmp_path / "nonfinite_report.json").read_text())
    assert report["loss_nonfinite"] and report["first_nonfinite"]["layer"] is not None  # NaN flows back too
    row = res.metrics[-1]
    assert row["train/loss"] is None and row["train/loss/nonfinite"] == "nan"  # strict JSON


def test_log_goes_on_and_counts(tmp_path):
    res = run_lowbit([*NF, "+recipe=bf16", "trainer.on_nonfinite=log"], run_dir=tmp_path)
    counts = [r["train/nonfinite_steps"] for r in res.metrics]
    assert counts[:4] == [0, 0, 0, 0] and counts[4] == 1 and [r["step"] for r in res.metrics][-1] == 8


def _module_state(run_dir):
    import torch

    (path,) = (run_dir / "checkpoints").glob("step_*/mp_rank_00_model_states.pt")
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


@pytest.mark.parametrize("parallel", ["single", pytest.param("zero2_2ranks", marks=pytest.mark.dist)])
def test_skip_leaves_weights_and_optimizer_as_before_the_step(parallel, tmp_path):
    """Constant LR (no schedule to tell steps apart): 5 steps whose 5th is skipped end with exactly the
    weights of 4 steps; training then goes on with finite losses."""
    par = (
        ["parallel=zero2", "launcher.nproc_per_node=2"] if parallel == "zero2_2ranks" else ["parallel=single"]
    )
    common = [*par, "+recipe=bf16", "trainer.warmup_frac=0", "trainer.min_lr_ratio=1.0", "trainer.log_every=1",
              "trainer.eval_every=100", "trainer.eval_sequences=16", "logger=none"]  # fmt: skip
    four = run_lowbit(
        [*common, "trainer.max_steps=4", "trainer.checkpoint_every=4"], run_dir=tmp_path / "four"
    )
    skipped = run_lowbit([*common, "trainer.max_steps=5", "trainer.checkpoint_every=5", "trainer.on_nonfinite=skip",
                          "debug.inject_nonfinite_at_step=5"], run_dir=tmp_path / "skip")  # fmt: skip
    assert [r["train/skipped_steps"] for r in skipped.metrics] == [0, 0, 0, 0, 1]
    assert "optimizer step skipped" in skipped.proc.stdout
    a, b = _module_state(tmp_path / "four"), _module_state(tmp_path / "skip")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert four.losses() == {s: v for s, v in skipped.losses().items() if s <= 4}
    if parallel != "single":
        return
    more = run_lowbit([*common, "trainer.max_steps=8", "trainer.on_nonfinite=skip", "debug.inject_nonfinite_at_step=5"],
                      run_dir=tmp_path / "more")  # fmt: skip
    assert all(v == v for v in more.losses().values()) and more.metrics[-1]["train/skipped_steps"] == 1


def test_the_watch_syncs_with_the_host_only_when_a_policy_reads_it():
    """Hooks and the loss flag stay on the device; ``tripped`` is the one host sync (``skip`` pays it
    every step, ``stop`` and ``log`` on log steps only)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from train.telemetry.nonfinite import NonFiniteWatch

    class Syncs(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten._local_scalar_dense, torch.ops.aten.item):
                Syncs.n += 1
            return func(*args, **(kwargs or {}))

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    watch = NonFiniteWatch(model, policy="skip", device="cpu")
    with Syncs():
        for _ in range(3):  # three micro-batches
            loss = model(torch.randn(4, 8)).pow(2).mean()
            loss.backward()
            watch.observe_loss(loss)
    assert Syncs.n == 0
    with Syncs():
        assert watch.tripped(distributed=False) is False
    assert Syncs.n == 1
    model[1].weight.grad = None
    model(torch.full((2, 8), float("inf"))).sum().backward()
    assert watch.tripped(distributed=False) and watch.report(7, {})["first_nonfinite"]["layer"] == "1"


# ---------------------------------------------------------------- atomic checkpoints

CK = ["+recipe=bf16", "trainer.max_steps=30", "trainer.log_every=1", "trainer.eval_every=100",
      "trainer.eval_sequences=16", "trainer.checkpoint_every=10", "logger=none"]  # fmt: skip


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A completed 30-step run with checkpoints at 10, 20 and 30 (its metrics kept aside)."""
    run_dir = tmp_path_factory.mktemp("ckpt") / "run"
    res = run_lowbit(CK, run_dir=run_dir)
    return run_dir, numerics(res.metrics)


def _copy(run_dir, tmp_path):
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    return dst


def test_checkpoints_are_complete_with_a_manifest_and_latest_last(finished):
    run_dir, _ = finished
    ckpt = run_dir / "checkpoints"
    assert sorted(d.name for d in ckpt.iterdir() if d.is_dir()) == [
        "step_0000010",
        "step_0000020",
        "step_0000030",
    ]
    assert (ckpt / "latest").read_text() == "step_0000030" and not list(ckpt.glob("*.partial"))
    manifest = json.loads((ckpt / "step_0000030" / "manifest.json").read_text())
    assert "mp_rank_00_model_states.pt" in manifest["files"]


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(damage, finished, tmp_path):
    """truncate: caught by the manifest (size); garble (same size, header zeroed): the load fails. Either
    way the run resumes from step 20 with a warning naming the file and redoes 21..30 exactly."""
    run_dir = _copy(finished[0], tmp_path)
    target = run_dir / "checkpoints" / "step_0000030" / "mp_rank_00_model_states.pt"
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\0" * 64 + data[64:])
    (run_dir / "summary.json").unlink()
    res = run_lowbit(CK, run_dir=run_dir)
    assert f"checkpoint {run_dir / 'checkpoints' / 'step_0000030'} is unusable" in res.proc.stdout
    assert ("bytes, the manifest says" if damage == "truncate" else "failed to load") in res.proc.stdout
    assert "at step 20" in res.proc.stdout
    assert numerics(res.metrics) == finished[1]


def test_an_unfinished_checkpoint_is_never_resumed_from_and_keep_prunes(finished, tmp_path):
    """A kill while DeepSpeed writes leaves ``step_N.partial`` and ``latest`` on the previous one."""
    run_dir = _copy(finished[0], tmp_path)
    ckpt = run_dir / "checkpoints"
    (ckpt / "step_0000030").rename(ckpt / "step_0000030.partial")
    (ckpt / "latest").write_text("step_0000020")
    (run_dir / "summary.json").unlink()
    res = run_lowbit([*CK, "trainer.keep_checkpoints=2"], run_dir=run_dir)
    assert "at step 20" in res.proc.stdout and numerics(res.metrics) == finished[1]
    assert sorted(d.name for d in ckpt.iterdir() if d.is_dir()) == ["step_0000020", "step_0000030"]


def test_secrets_in_the_environment_reach_no_file_of_the_run(tmp_path):
    """API keys and tokens: never in run_config.yaml, metrics, the W&B run files or the console."""
    secret = "lowbit-secret-7f3a9c"
    env = {
        "WANDB_API_KEY": secret,
        "HF_TOKEN": secret,
        "MY_SERVICE_PASSWORD": secret,
        "WANDB_MODE": "offline",
    }
    res = run_lowbit(["trainer.max_steps=2", "trainer.eval_sequences=16"], run_dir=tmp_path / "run", env=env)
    assert secret not in res.proc.stdout + res.proc.stderr
    files = [f for f in (tmp_path / "run").rglob("*") if f.is_file()]
    assert any(f.suffix == ".wandb" for f in files) and any(f.name == "run_config.yaml" for f in files)
    leaked = [str(f) for f in files if secret.encode() in f.read_bytes()]
    assert not leaked, leaked


def test_wandb_online_with_a_server_that_never_answers_trains_offline(tmp_path):
    """A local socket that accepts connections and never answers stands in for an unreachable server."""
    import socket
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])  # accept, read nothing, answer nothing
            except OSError:
                continue

    threading.Thread(target=accept, daemon=True).start()
    try:
        env = {"WANDB_MODE": "online", "WANDB_API_KEY": "x" * 40,
               "WANDB_BASE_URL": f"http://127.0.0.1:{srv.getsockname()[1]}"}  # fmt: skip
        res = run_lowbit(["trainer.max_steps=2", "trainer.eval_sequences=16", "logger.wandb.init_timeout_s=2"],
                         run_dir=tmp_path / "run", env=env, timeout=120)  # fmt: skip
    finally:
        stop.set()
        srv.close()
        for c in held:
            c.close()
    assert "did not answer within 2 s" in res.proc.stdout and "logging offline" in res.proc.stdout
    assert [r["step"] for r in res.metrics][-1] == 2


def test_a_wandb_exception_never_stops_training(tmp_path, capsys):
    """A real W&B failure (its Histogram refuses non-numbers) inside log(): printed once, W&B off."""
    from train.cli import compose
    from train.telemetry.loggers import WandbLogger

    cfg = compose(["logger.wandb.mode=offline"])
    wb = WandbLogger(cfg, run_dir=tmp_path, config={})
    wb.log({"train/loss": 1.0}, step=1)
    wb.log({"grad/x_hist": ["not", "numbers"]}, step=2)
    wb.log({"train/loss": 0.5}, step=3)
    wb.summary({"state": "completed"})
    wb.close()
    out = capsys.readouterr().out
    assert wb.failed and out.count("lowbit: W&B failed") == 1 and "metrics.jsonl has every row" in out
    import wandb

    assert wandb.run is None  # finished anyway: the next wandb.init in this process starts a new run


# ---------------------------------------------------------------- processes


def _spawned_workers(root: int) -> list[int]:
    """Pids of the processes multiprocessing spawned directly below ``root`` (the local workers; lowbit's
    launcher sets RANK inside them, so /proc/PID/environ does not tell which is which)."""
    out = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            cmd = open(f"/proc/{entry}/cmdline", "rb").read()
        except OSError:
            continue
        if ppid == root and b"spawn_main" in cmd:
            out.append(int(entry))
    return sorted(out)


def _start_two_ranks(run_dir):
    args = ["+recipe=bf16", "parallel=zero2", "launcher.nproc_per_node=2", "trainer.max_steps=400",
            "trainer.log_every=1", "logger=none", f"hydra.run.dir={run_dir}"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    proc = subprocess.Popen([sys.executable, str(RUN_PY), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    wait_for_step(run_dir / "metrics.jsonl", 3, proc=proc)
    workers = _spawned_workers(proc.pid)
    assert len(workers) == 2, workers
    return proc, workers


def _gone(pids, timeout=30.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [
            p
            for p in pids
            if os.path.exists(f"/proc/{p}") and "Z" not in open(f"/proc/{p}/stat").read().split(")")[1][:3]
        ]
        if not alive:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.dist
def test_workers_die_with_a_sigkilled_launcher(tmp_path):
    """torch elastic's spawned workers already end when their agent dies; ``die_with_parent``
    (``PR_SET_PDEATHSIG``) makes it a guarantee. Either way no worker may train on as an orphan."""
    proc, workers = _start_two_ranks(tmp_path / "run")
    try:
        os.kill(proc.pid, signal.SIGKILL)  # the launcher only: no handler runs, nothing is forwarded
        proc.communicate(timeout=30)
        assert _gone(workers), "orphaned workers kept running"
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.dist
def test_a_dead_rank_ends_the_run_instead_of_hanging(tmp_path):
    proc, workers = _start_two_ranks(tmp_path / "run")
    try:
        os.kill(workers[1], signal.SIGKILL)
        out, err = proc.communicate(timeout=120)  # well inside launcher.collective_timeout_s
        assert proc.returncode != 0 and _gone(workers)
        assert not (tmp_path / "run" / "summary.json").exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_slurm_run_dirs_are_unique_per_invocation_and_found_again_after_requeue(tmp_path):
    """Two runs in one allocation never share a run dir; ranks agree without talking; a requeue
    (SLURM_RESTART_COUNT + 1) maps each command back to its own dir (the real-cluster side:
    tests/test_slurm_train.py)."""
    from train.cli import slurm_stamp

    claims = tmp_path / "claims"
    job = {"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0"}

    def stamps(env: dict[str, str], n: int) -> list[str]:
        return [slurm_stamp(env, claims) for _ in range(n)]

    first = stamps(job, 3)
    assert first == ["slurm-77.0", "slurm-77.0-2", "slurm-77.0-3"]
    assert stamps({**job, "SLURM_PROCID": "1"}, 3) == first  # rank 1 of the same commands: same dirs
    assert stamps({**job, "SLURM_STEP_ID": "1"}, 1) == ["slurm-77.1"]  # another srun step
    assert stamps({**job, "SLURM_RESTART_COUNT": "1"}, 2) == first[:2]  # requeued: its own dirs again
    assert stamps({"SLURM_JOB_ID": "78", "SLURM_STEP_ID": "4294967294"}, 1) == ["slurm-78.batch"]
    array = {
        "SLURM_JOB_ID": "90",
        "SLURM_ARRAY_JOB_ID": "89",
        "SLURM_ARRAY_TASK_ID": "3",
        "SLURM_STEP_ID": "0",
    }
    assert stamps(array, 1) == ["slurm-89_3.0"]


@pytest.fixture(scope="module")
def bf16_uninterrupted(tmp_path_factory):
    return run_lowbit(["+recipe=bf16", *COMMON], run_dir=tmp_path_factory.mktemp("uninterrupted"))


@pytest.mark.parametrize("point,step,resumes_at", [("eval", 15, 10), ("checkpoint", 20, 10)])
def test_a_real_sigkill_during_evaluation_or_a_checkpoint_write_loses_nothing(point, step, resumes_at,
                                                                                bf16_uninterrupted, tmp_path):  # fmt: skip
    """The process SIGKILLs itself (train.faults) in the middle of step 15's evaluation, or after
    DeepSpeed wrote step 20's files and before the manifest and rename: the same command then
    resumes from step 10, the unfinished step_20.partial is not used, and metrics.jsonl equals the
    uninterrupted run's in every non-wall-clock key."""
    run_dir = tmp_path / "killed"
    killed = run_lowbit(["+recipe=bf16", *COMMON, f"debug.kill_at_step={step}", f"debug.kill_in={point}"],
                        run_dir=run_dir, check=False)  # fmt: skip
    assert killed.proc.returncode == -signal.SIGKILL, killed.proc.stderr[-2000:]
    assert f"debug.kill_in={point}: SIGKILL at step {step}" in killed.proc.stdout
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{resumes_at:07d}"
    if point == "checkpoint":
        assert (run_dir / "checkpoints" / f"step_{step:07d}.partial").is_dir()
    resumed = run_lowbit(["+recipe=bf16", *COMMON], run_dir=run_dir)
    assert f"resumed from {run_dir / 'checkpoints'} at step {resumes_at}" in resumed.proc.stdout
    assert numerics(resumed.metrics) == numerics(bf16_uninterrupted.metrics)
    assert not list((run_dir / "checkpoints").glob("*.partial"))  # the next save cleaned it up
