"""``python -m train.report``: a real small sweep (2 recipes x 2 seeds, Hydra's basic launcher, real
training on CPU) turned into the offline report, the W&B Report spec and the terminal table; runs
in every state (in progress, failed, NaN, refused) listed instead of crashing; the HTML rendered in
headless Chromium."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from .conftest import ROOT, read_jsonl, run_lowbit

PNG = b"\x89PNG\r\n\x1a\n"
RECIPES = ("bf16", "mxfp4_e2m1")


def report(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "train.report", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)  # fmt: skip
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    sweep = tmp_path_factory.mktemp("report") / "sweep"
    args = ["-m", f"+recipe={','.join(RECIPES)}", "trainer.seed=1,2", "trainer.max_steps=16",
            "trainer.log_every=2", "stats.every=4", "trainer.eval_sequences=16", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    run_lowbit(args, timeout=600)
    return sweep


@pytest.fixture(scope="module")
def built(sweep) -> tuple[Path, subprocess.CompletedProcess]:
    return sweep / "report", report(str(sweep), "report.last_k=4")


def expected_deltas(sweep: Path, k: int) -> dict[str, list[float]]:
    """Per recipe, each seed's delta computed here from the raw files (independent of train.review)."""
    runs = {}
    for d in sorted(p for p in sweep.iterdir() if (p / "run_config.yaml").exists()):
        rc = yaml.safe_load((d / "run_config.yaml").read_text())["config"]
        runs[(rc["recipe"]["name"], rc["trainer"]["seed"])] = {
            r["step"]: r["train/loss"] for r in read_jsonl(d / "metrics.jsonl")
        }
    out: dict[str, list[float]] = {}
    for (recipe, seed), loss in runs.items():
        ref = runs[("bf16", seed)]
        steps = sorted(set(loss) & set(ref))[-k:]
        out.setdefault(recipe, []).append(
            float(np.mean([loss[s] for s in steps]) - np.mean([ref[s] for s in steps]))
        )
    return out


def test_report_lists_every_run_with_valid_plots(sweep, built):
    out, proc = built
    page = (out / "index.html").read_text()
    members = sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert len(members) == 4
    for m in members:
        assert f">{m}</a>" in page, m
    for recipe in RECIPES:
        assert recipe in page
    images = [p.split("'")[0] for p in page.split("<img src='")[1:]]
    assert {"loss_curves.png", "loss_delta.png", "grad_underflow.png", "throughput.png"} <= set(images), (
        images
    )
    for name in images:
        assert (out / name).read_bytes()[:8] == PNG, name


def test_verdict_column_follows_the_rule(sweep, built):
    out, _ = built
    rows = {r["recipe"]: r for r in csv.DictReader((out / "summary.csv").open())}
    assert set(rows) == set(RECIPES)
    assert rows["bf16"]["verdict"] == "reference"
    d = np.asarray(expected_deltas(sweep, k=4)["mxfp4_e2m1"])
    mean, se = d.mean(), d.std(ddof=1) / math.sqrt(len(d))
    if abs(mean) < 2 * se:
        want = "indistinguishable"
    else:
        want = f"{'worse' if mean > 0 else 'better'} by {abs(mean):.4f} ({abs(mean) / se:.1f} sigma)"
    assert rows["mxfp4_e2m1"]["verdict"] == want
    assert rows["mxfp4_e2m1"]["delta vs reference (+- SE)"] == f"{mean:+.4f} +- {se:.4f}"
    assert rows["mxfp4_e2m1"]["backend"] == "emulated" and rows["bf16"]["backend"] == "native"
    assert rows["mxfp4_e2m1"]["seeds"] == "1 2" and float(rows["mxfp4_e2m1"]["tokens/s"]) > 0
    assert rows["bf16"]["git"] and rows["bf16"]["torch"].startswith("2.")
    md = (out / "summary.md").read_text()
    assert rows["mxfp4_e2m1"]["verdict"] in md and "Verdict rule" in md


def test_terminal_table_and_wandb_spec(sweep, built):
    out, proc = built
    assert "mxfp4_e2m1" in proc.stdout and "verdict" in proc.stdout and "reference" in proc.stdout
    from train.review.wandb_report import load_spec

    spec = json.loads((out / "wandb_report.json").read_text())
    assert sweep.name in json.dumps(spec)  # filtered to the sweep's W&B group
    assert load_spec(out / "wandb_report.json") is not None


def test_runs_in_every_state_are_listed_not_fatal(sweep, tmp_path):
    """Copies of real runs put in each state the report must survive: in progress, failed,
    NaN loss (strict and bare), refused (another model), and a recipe without a reference seed."""
    mix = tmp_path / "mix"
    members = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    for i, m in enumerate(members):
        shutil.copytree(m, mix / str(i), ignore=shutil.ignore_patterns("wandb"))
    running = mix / "4"
    shutil.copytree(mix / "2", running)
    (running / "summary.json").unlink()
    rows = (running / "metrics.jsonl").read_text().splitlines()
    (running / "metrics.jsonl").write_text("\n".join(rows[:4]) + "\n" + rows[4][:25])  # a torn last line
    cfg = yaml.safe_load((running / "run_config.yaml").read_text())
    cfg["config"]["recipe"]["name"] = "in_progress_copy"
    (running / "run_config.yaml").write_text(yaml.safe_dump(cfg))
    nan = mix / "5"
    shutil.copytree(mix / "3", nan)
    rows = read_jsonl(nan / "metrics.jsonl")
    text = [json.dumps(r) for r in rows]
    text[3] = json.dumps({**rows[3], "train/loss": None, "train/loss/nonfinite": "nan"})
    text[5] = json.dumps({**rows[5], "train/loss": float("inf")})  # older files: bare Infinity
    (nan / "metrics.jsonl").write_text("\n".join(text) + "\n")
    cfg = yaml.safe_load((nan / "run_config.yaml").read_text())
    cfg["config"]["recipe"]["name"] = "nan_copy"
    (nan / "run_config.yaml").write_text(yaml.safe_dump(cfg))
    failed = mix / "6"
    (failed / ".hydra").mkdir(parents=True)
    (failed / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["+recipe=broken", "trainer.seed=1"]))
    (failed / "member_error.json").write_text(
        json.dumps({"state": "config_error", "reason": "lowbit: config error: x=y: z"})
    )
    other = mix / "7"
    shutil.copytree(mix / "2", other)
    cfg = yaml.safe_load((other / "run_config.yaml").read_text())
    cfg["config"]["recipe"]["name"], cfg["config"]["model"]["d_model"] = "other_model", 256
    (other / "run_config.yaml").write_text(yaml.safe_dump(cfg))

    report(str(mix), "--no-plots", "report.last_k=4")
    rows = {r["recipe"]: r for r in csv.DictReader((mix / "report" / "summary.csv").open())}
    assert rows["in_progress_copy"]["verdict"] == "in progress"
    assert rows["nan_copy"]["verdict"] == f"diverged at step {read_jsonl(nan / 'metrics.jsonl')[3]['step']}"
    assert rows["broken"]["verdict"].startswith("failed")
    assert "other_model" not in rows
    page = (mix / "report" / "index.html").read_text()
    assert "Refused from the comparison" in page and "its model differs" in page and "d_model" in page
    assert "config_error" in page and "lowbit: config error: x=y: z" in page

    one = tmp_path / "one"
    report(str(members[0]), "--out", str(one))  # a report of one run works
    assert next(csv.DictReader((one / "summary.csv").open()))["verdict"] == "reference"


@pytest.mark.parametrize(
    "args, key",
    [(["report.z=abc"], "report.z=abc"), (["report.last_k=0"], "report.last_k=0"),
     (["report.nope=1"], "report.nope=1"), (["/no/such/dir"], "paths=/no/such/dir"), ([], "paths=[]")],
)  # fmt: skip
def test_bad_input_is_one_line_exit_2(args, key):
    proc = report(*args, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lowbit: config error: {key}:"), proc.stderr


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_html_renders_in_headless_chromium(built, tmp_path):
    browser = chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing: .ci/run installs Debian's chromium package")
        pytest.skip("no Chromium on this machine (apt-get install chromium); CI installs it")
    out, _ = built
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--allow-file-access-from-files", "--virtual-time-budget=10000"]  # fmt: skip
    # the report has no script: a copy beside it (same relative image paths) counts loaded images
    probe = out / "_render_check.html"
    probe.write_text(
        (out / "index.html")
        .read_text()
        .replace(
            "</body>",
            """<script>
window.addEventListener('load', () => { const im = [...document.images];
  document.body.dataset.images = im.length;
  document.body.dataset.loaded = im.filter(i => i.complete && i.naturalWidth > 0).length; });
</script></body>""",
        )
    )
    dom = subprocess.run([*flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    probe.unlink()
    assert dom.returncode == 0, dom.stderr[-2000:]
    images = int(dom.stdout.split('data-images="')[1].split('"')[0])
    loaded = int(dom.stdout.split('data-loaded="')[1].split('"')[0])
    assert images >= 4 and loaded == images, (images, loaded)
    shot = tmp_path / "report.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1280,2400", (out / "index.html").as_uri()],
                   capture_output=True, timeout=120, check=True)  # fmt: skip
    assert shot.read_bytes()[:8] == PNG and shot.stat().st_size > 20_000
    if os.environ.get("LOWBIT_SCREENSHOT_DIR"):
        shutil.copy(shot, Path(os.environ["LOWBIT_SCREENSHOT_DIR"]) / "report.png")


def test_unknown_flag_is_one_line_too():
    proc = report("--nope", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("lowbit: config error: arguments=--nope: unrecognized arguments: --nope")


def test_the_same_runs_read_from_their_wandb_files_give_the_same_table(sweep, built, tmp_path):
    """`--from-wandb-files`: the adapter `--wandb ENTITY/PROJECT` uses, on the runs' real offline W&B
    files: the same recipes, verdicts, deltas and speeds as from metrics.jsonl."""
    out, _ = built
    report(str(sweep), "--from-wandb-files", "--out", str(tmp_path), "--no-plots", "report.last_k=4")
    ours = list(csv.DictReader((out / "summary.csv").open()))
    theirs = list(csv.DictReader((tmp_path / "summary.csv").open()))
    columns = [
        "recipe",
        "backend",
        "seeds",
        "final loss",
        "delta vs reference (+- SE)",
        "verdict",
        "tokens/s",
    ]
    assert [[r[c] for c in columns] for r in theirs] == [[r[c] for c in columns] for r in ours]
