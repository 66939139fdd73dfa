"""The local Slurm cluster (scripts/slurm_local.sh), slurm/env.sh and the sacct shim.

Cluster tests are marked `slurm` and skip unless `sinfo` answers; CI runs
`bash scripts/slurm_local.sh start` before pytest. The shim's parsing tests need no cluster.
Every wait is bounded (JOB_TIMEOUT_S) and fails with the job's output.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV_SH = ROOT / "slurm" / "env.sh"
JOB_TIMEOUT_S = 120


def _load_shim():
    spec = importlib.util.spec_from_file_location("sacct_shim", ROOT / "scripts" / "sacct_shim.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


shim = _load_shim()


def _cluster_skip_reason() -> str | None:
    if shutil.which("sinfo") is None:
        return "no sinfo on PATH: start the cluster with `bash scripts/slurm_local.sh start`"
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 10 s: is slurmctld running? (`bash scripts/slurm_local.sh status`)"
    if proc.returncode != 0:
        return f"sinfo failed ({proc.stderr.strip()}): `bash scripts/slurm_local.sh start`"
    if not any(s.startswith(("idle", "mix", "alloc")) for s in proc.stdout.split()):
        return f"no usable node (sinfo states: {proc.stdout.split()})"
    return None


def skip_or_fail(reason: str) -> None:
    """No cluster: skip with the reason, except where `.ci/run` started one (it exports
    LOWBIT_SLURM_STARTED=1): there a cluster that does not answer fails the tests."""
    if os.environ.get("LOWBIT_SLURM_STARTED") == "1":
        pytest.fail(f"the local Slurm cluster was started but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def cluster() -> None:
    reason = _cluster_skip_reason()
    if reason:
        skip_or_fail(reason)


def run(
    cmd: list[str], *, cwd: Path | None = None, timeout: float = JOB_TIMEOUT_S
) -> subprocess.CompletedProcess:
    """Run a Slurm client command; fail (not hang) after `timeout` seconds."""
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(
            f"`{shlex.join(cmd)}` did not finish in {timeout} s (stdout: {e.stdout!r}, stderr: {e.stderr!r})"
        )


def sbatch_wait(script: str, tmp_path: Path, *flags: str) -> tuple[str, str]:
    """Submit `script` with --wait from tmp_path; return (job id, job output). Fails on a non-zero exit."""
    path = tmp_path / "job.sh"
    path.write_text(script)
    out = tmp_path / "job.out"
    proc = run(
        ["sbatch", "--parsable", "--wait", f"--chdir={tmp_path}", f"--output={out}", *flags, str(path)]
    )
    text = out.read_text() if out.exists() else "<no output file>"
    assert proc.returncode == 0, (
        f"sbatch exited {proc.returncode}: {proc.stderr.strip()}\njob output:\n{text}"
    )
    return proc.stdout.strip().split(";")[0], text


def sacct_states(*job_ids: str) -> dict[str, str]:
    proc = run(
        ["sacct", "-o", "JobID,State,NodeList", "--parsable2", *(a for j in job_ids for a in ("-j", j))]
    )
    assert proc.returncode == 0, f"sacct failed: {proc.stderr.strip()}"
    lines = proc.stdout.splitlines()
    assert lines and lines[0] == "JobID|State|NodeList", f"unexpected sacct header: {proc.stdout!r}"
    return {row.split("|")[0]: row.split("|")[1] for row in lines[1:]}


def wait_state(job_id: str, want: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = sacct_states(job_id).get(job_id)
        if state == want:
            return state
        time.sleep(0.5)
    pytest.fail(f"job {job_id}: sacct says {state!r} after {timeout} s, expected {want}")


# --- the cluster -------------------------------------------------------------------------------


@pytest.mark.slurm
def test_sbatch_wrap_hostname(cluster, tmp_path):
    out = tmp_path / "wrap.out"
    proc = run(["sbatch", "--parsable", "--wait", f"--output={out}", "--wrap", "hostname"])
    assert proc.returncode == 0, f"sbatch --wrap hostname exited {proc.returncode}: {proc.stderr.strip()}"
    assert out.read_text().strip() == socket.gethostname().split(".")[0]


ALLREDUCE = """
import os, torch, torch.distributed as dist
rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)
t = torch.tensor([rank + 1.0])
dist.all_reduce(t)
print(f"rank={rank} world={world} local={os.environ['SLURM_LOCALID']} step={os.environ.get('SLURM_STEP_ID')} "
      f"master={os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} "
      f"omp={os.environ['OMP_NUM_THREADS']} allreduce={t.item()}", flush=True)
dist.destroy_process_group()
"""


@pytest.mark.slurm
def test_two_task_gloo_allreduce_with_env_sh(cluster, tmp_path):
    script = f"""#!/bin/bash
set -euo pipefail
source {shlex.quote(str(ENV_SH))}
echo "batch step=${{SLURM_STEP_ID-unset}} procid=$SLURM_PROCID ntasks=$SLURM_NTASKS"
srun --kill-on-bad-exit=1 {shlex.quote(sys.executable)} -c {shlex.quote(ALLREDUCE)}
"""
    job_id, text = sbatch_wait(script, tmp_path, "--ntasks=2", "--cpus-per-task=1")
    host = socket.gethostname().split(".")[0]
    master = f"master={host}:{20000 + int(job_id) % 20000}"
    # the batch shell is not a step: SLURM_STEP_ID is unset there although SLURM_PROCID is 0
    assert "batch step=unset procid=0 ntasks=2" in text, text
    for rank in (0, 1):
        line = f"rank={rank} world=2 local={rank} step=0 {master} omp=1 allreduce=3.0"
        assert line in text, f"missing {line!r} in job output:\n{text}"


@pytest.mark.slurm
def test_sacct_shim_completed_cancelled_and_array(cluster, tmp_path):
    done_id, _ = sbatch_wait("#!/bin/bash\ntrue\n", tmp_path)
    assert sacct_states(done_id) == {done_id: "COMPLETED"}

    array_id, _ = sbatch_wait("#!/bin/bash\ntrue\n", tmp_path, "--array=0-1")
    assert sacct_states(array_id) == {f"{array_id}_0": "COMPLETED", f"{array_id}_1": "COMPLETED"}

    proc = run(["sbatch", "--parsable", f"--chdir={tmp_path}", "--output=/dev/null", "--wrap", "sleep 300"])
    assert proc.returncode == 0, proc.stderr
    sleeper = proc.stdout.strip().split(";")[0]
    try:
        wait_state(sleeper, "RUNNING")
    finally:
        run(["scancel", sleeper], timeout=30)
    wait_state(sleeper, "CANCELLED")
    # several -j, as submitit passes them
    assert sacct_states(done_id, sleeper) == {done_id: "COMPLETED", sleeper: "CANCELLED"}


# --- the sacct shim's parsing (no cluster) ------------------------------------------------------

ARRAY_TASK = (
    "JobId=124 ArrayJobId=123 ArrayTaskId=1 JobName=my job UserId=root(0) JobState=FAILED "
    "Reason=NonZeroExitCode ExitCode=3:0 NodeList=vm TRES=cpu=1,mem=1G,node=1 Command=/bin/sh -c x"
)
ARRAY_PENDING = "JobId=123 ArrayJobId=123 ArrayTaskId=2-5%2 JobName=a JobState=PENDING NodeList=(null)"
PLAIN = "JobId=7 JobName=wrap JobState=TIMEOUT NodeList=vm ExitCode=0:15"


def test_shim_parse_record_keeps_values_with_spaces():
    rec = shim.parse_record(ARRAY_TASK)
    assert rec["JobName"] == "my job"
    assert rec["TRES"] == "cpu=1,mem=1G,node=1"
    assert rec["Command"] == "/bin/sh -c x"


def test_shim_job_ids_match_sacct_and_submitit():
    task, pending, plain = map(shim.parse_record, (ARRAY_TASK, ARRAY_PENDING, PLAIN))
    assert [shim.sacct_job_id(r) for r in (task, pending, plain)] == ["123_1", "123_[2-5%2]", "7"]
    assert shim.matches(task, ["123"]) and shim.matches(task, ["123_1"]) and shim.matches(task, ["124"])
    assert not shim.matches(task, ["123_0"]) and not shim.matches(plain, ["70"])
    assert shim.matches(pending, ["123_4"]) and not shim.matches(pending, ["123_6"])
    assert shim.field_value(pending, "NodeList") == "None assigned"
    assert shim.field_value(task, "ExitCode") == "3:0" and shim.field_value(task, "User") == "root"


def test_shim_parses_submitit_command_line():
    opts = shim.parse_args(["-o", "JobID,State,NodeList", "--parsable2", "-j", "5", "-j", "6_1,7"])
    assert opts["fields"] == ["JobID", "State", "NodeList"]
    assert opts["jobs"] == ["5", "6_1", "7"] and opts["parsable"] == "|" and opts["header"]
    opts = shim.parse_args(["--format=JobID%20,State", "-n", "-X", "-S", "now-1day", "-s", "CA,F", "-j123"])
    assert opts["fields"] == ["JobID", "State"] and opts["jobs"] == ["123"] and not opts["header"]
    assert opts["states"] == ["CANCELLED", "FAILED"]
