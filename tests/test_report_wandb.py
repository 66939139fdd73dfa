"""The report from W&B: real offline W&B runs read back into ``Run`` records, and the W&B Report
built, serialised and loaded back, all without a server or a network call.

The runs are made here with ``wandb.init(mode="offline")`` the way ``WandbLogger`` logs (the
run_config dict as the config, a ``step`` key in every row, the trainer's ``state`` in the
summary), one lowbit-style run directory each; one of them is resumed (two W&B files).
"""

from __future__ import annotations

import json
import socket
import time

import numpy as np
import pytest

from train.review.compare import ReportConfig, compare
from train.review.wandb_runs import merge_histories, offline_runs, run_from_wandb, wandb_state

GROUP = "sweep-2026-12-02_04-33-45"
STEPS = list(range(12))
LAYERS = ("blocks.0.mlp.fc", "blocks.1.attn.qkv")
# (run dir name, recipe, seed): a reference recipe and a quantized one, two seeds each
RUNS = [("0", "bf16", 1), ("1", "bf16", 2), ("2", "mxfp4_e2m1", 1), ("3", "mxfp4_e2m1", 2)]
RESUMED = "3"  # its W&B run is resumed: the first file's steps 5..7 are logged again

# wandb_workspaces' own pydantic-v1-style validators warn on import
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:wandb_workspaces.*")


def loss(recipe: str, seed: int, step: int) -> float:
    base = 4.0 - 0.1 * step + 0.01 * seed
    return base + (0.05 + 0.01 * seed if recipe != "bf16" else 0.0)


def row(recipe: str, seed: int, step: int) -> dict:
    r = {"step": step, "train/loss": loss(recipe, seed, step), "perf/tokens_per_s": 1000.0 + 10 * seed}
    if recipe != "bf16":
        for layer in LAYERS:
            r[f"grad/{layer}/underflow_frac"] = 0.01 * step
            r[f"grad/{layer}/sqnr_db"] = 20.0 - step
    return r


def run_config(recipe: str, seed: int) -> dict:
    return {
        "config": {
            "recipe": {"name": recipe},
            "trainer": {"seed": seed, "max_steps": len(STEPS), "global_batch_size": 4},
            "model": {"name": "tiny", "seq_len": 16},
            "data": {"name": "synthetic"},
        },
        "resolved": {"recipe": {"resolved_backend": "emulated"}},
        "fingerprints": {},
        "env": {"git_sha": "0123456789abcdef", "packages": {"torch": "2.13.0"}},
    }


def _block_network(mp: pytest.MonkeyPatch) -> list:
    """Any IPv4/IPv6 connect from this process fails (and is recorded): unix sockets still work."""
    calls: list = []
    real = socket.socket.connect

    def guarded(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            calls.append(address)
            raise OSError(f"test: no network ({address})")
        return real(self, address)

    mp.setattr(socket.socket, "connect", guarded)
    return calls


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    import wandb

    tmp = tmp_path_factory.mktemp("wandb_sweep")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp / "wandb_dir"),
                     "WANDB_CACHE_DIR": str(tmp / "wandb_cache"), "WANDB_CONSOLE": "off"}.items():  # fmt: skip
            mp.setenv(k, v)
        mp.delenv("WANDB_API_KEY", raising=False)
        calls = _block_network(mp)
        if wandb.run is not None:  # a run another test left open would be handed back by init
            wandb.finish()
        settings = wandb.Settings(console="off", x_disable_stats=True, x_disable_meta=True, silent=True)
        t0 = time.perf_counter()
        for name, recipe, seed in RUNS:
            run_dir = tmp / "sweep" / name
            run_dir.mkdir(parents=True)
            init = dict(project="lowbit-test", group=GROUP, name=name, id=f"run{name}", dir=str(run_dir),
                        mode="offline", config=run_config(recipe, seed), settings=settings)  # fmt: skip
            parts = [STEPS[:8], STEPS[5:]] if name == RESUMED else [STEPS]
            for i, steps in enumerate(parts):
                run = wandb.init(**init, resume="allow", reinit="create_new")
                for s in steps:
                    r = row(recipe, seed, s)
                    if name == RESUMED and i == 0 and s >= 5:
                        r["train/loss"] += 1.0  # logged again (correctly) after the resume
                    run.log(r, step=s)
                if i == len(parts) - 1:
                    run.summary.update(
                        {"state": "completed", "final/train_loss": loss(recipe, seed, STEPS[-1])}
                    )
                run.finish()
        elapsed = time.perf_counter() - t0
    assert not calls, f"W&B offline tried the network: {calls}"
    return tmp / "sweep", elapsed


def test_offline_runs_read_back_what_was_logged(sweep):
    root, elapsed = sweep
    assert elapsed < 20, f"making {len(RUNS)} offline runs took {elapsed:.1f} s"
    assert len(list((root / RESUMED).glob("wandb/*run-*/run-*.wandb"))) == 2
    runs = offline_runs([root])
    assert [(r.name, r.recipe, r.seed, r.state) for r in runs] == [
        (n, rc, s, "completed") for n, rc, s in RUNS
    ]
    for r, (name, recipe, seed) in zip(runs, RUNS):
        assert r.path == root / name and r.url is None
        steps, values = r.series.get("train/loss")
        assert steps.tolist() == STEPS  # the resumed run: one row per step, the later file's row
        assert values.tolist() == [loss(recipe, seed, s) for s in STEPS]
        assert r.summary["final/train_loss"] == loss(recipe, seed, STEPS[-1])
        assert r.cfg("config.model.name") == "tiny" and r.backend == "emulated"
        assert not any(k.startswith("_") for k in r.series.keys())
        assert ("grad/blocks.0.mlp.fc/underflow_frac" in r.series) == (recipe != "bf16")


def test_state_from_summary_or_exit_code():
    assert wandb_state({"exit_code": 0}, {"state": "nonfinite"}) == ("nonfinite", "")
    assert wandb_state({"exit_code": None}, {}) == ("running", "")
    for code in (0, 1):  # lowbit finishes W&B with 0 even when training raised
        state, reason = wandb_state({"exit_code": code}, {})
        assert state == "failed" and f"exit code {code}" in reason
    r = run_from_wandb({"name": "x"}, {}, [{"step": 1, "_step": 1, "train/loss": 2.0}], {}, url="https://w/r")
    assert (r.recipe, r.seed, r.state, r.url, r.series.keys()) == (
        "?",
        0,
        "running",
        "https://w/r",
        ["train/loss"],
    )


def test_merge_histories_later_file_wins_per_step():
    first = [{"step": 0, "a": 1}, {"step": 1, "a": 2}, {"step": 1, "b": 3}, {"x": 9}]
    second = [{"step": 1, "a": 20}, {"step": 2, "a": 30}]
    assert merge_histories([first, second]) == [
        {"step": 0, "a": 1},
        {"step": 1, "a": 20},
        {"step": 2, "a": 30},
    ]
    assert merge_histories([first])[1] == {"step": 1, "a": 2, "b": 3}


def test_wandb_report_round_trip_offline(sweep, tmp_path, monkeypatch):
    pytest.importorskip("wandb_workspaces")
    from train.review.wandb_report import (
        RECIPE_KEY,
        build_report,
        load_spec,
        save_online,
        spec_json,
        write_spec,
    )

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path))
    calls = _block_network(monkeypatch)
    root, _ = sweep
    t0 = time.perf_counter()
    cmp = compare(offline_runs([root]), ReportConfig())
    verdicts = {row.recipe: row.verdict for row in cmp.rows}
    assert verdicts["bf16"].kind == "reference" and verdicts["mxfp4_e2m1"].kind == "worse"
    assert np.isclose(verdicts["mxfp4_e2m1"].mean, 0.065)

    report = build_report(cmp, entity="lowbit-team", project="lowbit-test", group=GROUP, title="Sweep | test")
    path = write_spec(report, tmp_path / "report.json")
    loaded = load_spec(path)
    assert spec_json(loaded) == spec_json(report)
    assert json.loads(path.read_text()) == json.loads(spec_json(report))

    spec = json.loads(path.read_text())
    assert spec["project"] == {"name": "lowbit-test", "entityName": "lowbit-team"}
    grids = [b for b in spec["spec"]["blocks"] if b["type"] == "panel-grid"]
    assert len(grids) == 4
    for grid in grids:
        (rs,) = grid["metadata"]["runSets"]
        assert "project" not in rs  # a runset naming a project is looked up by GraphQL
        assert rs["filters"]["filters"] == [
            {"key": {"section": "run", "name": "group"}, "op": "=", "value": GROUP, "disabled": False}
        ]
        assert rs["grouping"] == [{"section": "config", "name": "config.value.recipe.name"}]
    panels = [p["config"] for g in grids for p in g["metadata"]["panelBankSectionConfig"]["panels"]]
    metrics = {m for p in panels for m in p.get("metrics", [])}
    assert {
        "train/loss",
        "div/loss_delta",
        "div/loss_rel",
        "perf/tokens_per_s",
        "perf/mfu_bf16_peak",
    } <= metrics
    assert {f"grad/{layer}/underflow_frac" for layer in LAYERS} <= metrics
    assert {p.get("metricRegex") for p in panels} >= {r"^grad/.+/underflow_frac$", r"^grad/.+/sqnr_db$"}
    assert all(p["xAxis"] == "step" for p in panels if "xAxis" in p)

    kinds = [type(b).__name__ for b in loaded.blocks]
    assert kinds[:2] == ["H1", "P"] and kinds.count("PanelGrid") == 4
    assert loaded.blocks[0].text == "Sweep | test"
    texts = [b.text if isinstance(b.text, str) else str(b.text) for b in loaded.blocks if hasattr(b, "text")]
    assert any("Verdict rule" in t and "last 10 logged steps" in t for t in texts)
    summary_md = next(b.text for b in loaded.blocks if type(b).__name__ == "MarkdownBlock")
    for row in cmp.rows:
        assert f"| {row.recipe} |" in summary_md and row.verdict.text in summary_md
    assert loaded.blocks[kinds.index("PanelGrid")].runsets[0].groupby == ["config.config.value.recipe.name"]
    assert RECIPE_KEY == "config.config.recipe.name"

    assert save_online(report) is None  # offline: nothing published, at once
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert save_online(report) is None  # a key, but WANDB_MODE=offline
    assert time.perf_counter() - t0 < 10
    assert not calls, f"building / serialising the report tried the network: {calls}"


def test_markdown_table_escapes_pipes_and_newlines():
    from train.review.wandb_report import markdown_table

    md = markdown_table(["recipe", "a|b"], [["x|y", "two\nlines"], [3, None]])
    assert md == "| recipe | a\\|b |\n|---|---|\n| x\\|y | two lines |\n| 3 | None |\n"
    for line in md.splitlines():  # every line has the header's cell count (escaped pipes do not split)
        assert len(line.replace("\\|", "").strip("|").split("|")) == 2
