#!/usr/bin/env python3
"""A minimal `sacct` for a Slurm cluster without slurmdbd (scripts/slurm_local.sh installs it).

Why: without accounting, Debian's sacct prints "accounting storage is disabled" and exits 1;
submitit then sees every job as UNKNOWN, and `job.result()` of a job that died without writing a
result (scancel, SIGKILL, node loss) waits forever. This shim answers from `scontrol show job -o`,
which keeps finished jobs for MinJobAge (3600 s in our slurm.conf).

Supported: what submitit sends, `sacct -o JobID,State,NodeList --parsable2 -j ID [-j ID ...]`, plus
comma lists, `-j 123_4` (one array task), `--format=`, `-p`, `-n`, `-X`, `-a`, `-s STATE[,..]`.
Other options are accepted and ignored. Jobs are whole allocations only (no `.batch`/`.0` steps).
JobID is sacct's: `123` for a plain job, `123_4` for an array task, `123_[5-7%2]` for array tasks
still pending. Stdlib only; `#!` is rewritten to /usr/bin/python3 on install.
"""

from __future__ import annotations

import re
import subprocess
import sys

DEFAULT_FIELDS = ["JobID", "JobName", "Partition", "Account", "AllocCPUS", "State", "ExitCode"]

# sacct field (lower case) -> scontrol key; a callable computes it from the parsed record.
FIELD_KEYS = {
    "jobidraw": "JobId",
    "jobname": "JobName",
    "partition": "Partition",
    "account": "Account",
    "alloccpus": "NumCPUs",
    "ncpus": "NumCPUs",
    "nnodes": "NumNodes",
    "exitcode": "ExitCode",
    "reason": "Reason",
    "start": "StartTime",
    "end": "EndTime",
    "submit": "SubmitTime",
    "elapsed": "RunTime",
    "timelimit": "TimeLimit",
    "workdir": "WorkDir",
    "qos": "QOS",
    "priority": "Priority",
    "restarts": "Restarts",
    "arrayjobid": "ArrayJobId",
    "arraytaskid": "ArrayTaskId",
}

# Options that take a value (the value is consumed even when the option itself is ignored).
VALUE_OPTS = set(
    "-o --format -j --jobs -s --state -S --starttime -E --endtime -u --user -A --accounts"
    " -r --partition -M --clusters -N --nodelist --name -i --nnodes -k --timelimit-min"
    " -K --timelimit-max -q --qos --delimiter -g --gid --group -W --wckeys -x --associations"
    " -C --constraints -f --file --units".split()
)
STATE_ABBREV = {
    "PD": "PENDING",
    "R": "RUNNING",
    "CD": "COMPLETED",
    "F": "FAILED",
    "CA": "CANCELLED",
    "TO": "TIMEOUT",
    "NF": "NODE_FAIL",
    "PR": "PREEMPTED",
    "RQ": "REQUEUED",
    "S": "SUSPENDED",
    "OOM": "OUT_OF_MEMORY",
    "BF": "BOOT_FAIL",
    "DL": "DEADLINE",
    "RS": "RESIZING",
    "CG": "COMPLETING",
}
KEY_RE = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=")


def parse_args(argv: list[str]) -> dict:
    opts: dict = {"fields": None, "jobs": [], "states": [], "parsable": None, "header": True}
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, inline = arg.partition("=")
        if arg.startswith("--") and eq:
            value: str | None = inline
        elif arg in VALUE_OPTS and i + 1 < len(argv):
            name, value = arg, argv[i + 1]
            i += 1
        elif len(arg) > 2 and arg[0] == "-" and arg[1] != "-" and arg[:2] in VALUE_OPTS:
            name, value = arg[:2], arg[2:]  # -j123
        else:
            name, value = arg, None
        i += 1
        if name in ("-o", "--format") and value is not None:
            opts["fields"] = [f.split("%")[0] for f in value.split(",") if f]
        elif name in ("-j", "--jobs") and value is not None:
            opts["jobs"] += [j for j in value.split(",") if j]
        elif name in ("-s", "--state") and value is not None:
            opts["states"] += [STATE_ABBREV.get(s.upper(), s.upper()) for s in value.split(",") if s]
        elif name in ("-P", "--parsable2"):
            opts["parsable"] = "|"
        elif name in ("-p", "--parsable"):
            opts["parsable"] = "|+"  # trailing delimiter, like sacct -p
        elif name in ("-n", "--noheader"):
            opts["header"] = False
        elif name in ("-h", "--help", "--usage"):
            print(__doc__)
            sys.exit(0)
    return opts


def parse_record(line: str) -> dict[str, str]:
    """`Key=Value Key2=Value with spaces ...` -> dict; a value runs up to the next ` Key=`."""
    matches = list(KEY_RE.finditer(line))
    record = {}
    for m, nxt in zip(matches, [*matches[1:], None]):
        end = nxt.start() if nxt is not None else len(line)
        record[m.group(1)] = line[m.end() : end].strip()
    return record


def read_jobs() -> list[dict[str, str]]:
    try:
        proc = subprocess.run(
            ["scontrol", "show", "job", "-o"], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        sys.exit(f"sacct shim: scontrol failed: {e}")
    if proc.returncode != 0:
        sys.exit(f"sacct shim: scontrol show job failed: {proc.stderr.strip()}")
    return [parse_record(line) for line in proc.stdout.splitlines() if "JobId=" in line]


def sacct_job_id(rec: dict[str, str]) -> str:
    array_id, task = rec.get("ArrayJobId"), rec.get("ArrayTaskId")
    if not array_id or task in (None, "", "(null)"):
        return rec["JobId"]
    if re.fullmatch(r"\d+", task):
        return f"{array_id}_{task}"
    return f"{array_id}_[{task}]"  # pending remainder, e.g. 0-3%2


def task_ids(task: str) -> set[int] | None:
    """ArrayTaskId `0-3,7%2` -> {0, 1, 2, 3, 7}; None when unparseable."""
    out: set[int] = set()
    for part in task.split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            return None
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def matches(rec: dict[str, str], wanted: list[str]) -> bool:
    if not wanted:
        return True
    array_id, task = rec.get("ArrayJobId"), rec.get("ArrayTaskId", "")
    for w in wanted:
        main, _, sub = w.partition("_")
        sub = sub.strip("[]")
        if rec.get("JobId") == main and not sub:
            return True
        if array_id == main:
            if not sub:
                return True
            ids = task_ids(task) if task else None
            if ids is not None and sub.isdigit() and int(sub) in ids:
                return True
    return False


def field_value(rec: dict[str, str], field: str) -> str:
    key = field.lower()
    if key == "jobid":
        return sacct_job_id(rec)
    if key == "state":
        return rec.get("JobState", "UNKNOWN")
    if key == "nodelist":
        nodes = rec.get("NodeList", "")
        return "None assigned" if nodes in ("", "(null)") else nodes
    if key == "user":
        return rec.get("UserId", "").split("(")[0]
    value = rec.get(FIELD_KEYS.get(key, field), "")
    return "" if value == "(null)" else value


def main(argv: list[str]) -> int:
    opts = parse_args(argv)
    fields = opts["fields"] or DEFAULT_FIELDS
    rows = []
    for rec in read_jobs():
        if not matches(rec, opts["jobs"]):
            continue
        if opts["states"] and rec.get("JobState", "") not in opts["states"]:
            continue
        rows.append([field_value(rec, f) for f in fields])
    rows.sort(key=lambda r: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", r[0])])
    if opts["parsable"]:
        trail = "|" if opts["parsable"] == "|+" else ""
        lines = ([fields] if opts["header"] else []) + rows
        print("\n".join("|".join(r) + trail for r in lines))
    else:
        widths = [max(10, len(f), *(len(r[i]) for r in rows)) for i, f in enumerate(fields)]
        if opts["header"]:
            print(" ".join(f.rjust(w) for f, w in zip(fields, widths)))
            print(" ".join("-" * w for w in widths))
        for r in rows:
            print(" ".join(v.rjust(w) for v, w in zip(r, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
