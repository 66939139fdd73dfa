"""Which layers must stay in BF16 for a recipe's loss gap to fall under a target?

    python -m train.sensitivity --target-gap 0.005 --budget 12 +recipe=mxfp4_e2m1
    python -m train.sensitivity --seeds 3 --budget 21 --verify --out outputs/sens hydra/launcher=slurm +recipe=nvfp4

Its own flags first, then Hydra overrides for every run (the ``python -m train.<tool>``
convention). On the same seeds (same initial weights and data order), in ``--out``:

1. **Noise first**: the BF16 run (``+recipe=bf16``) and the recipe on every seed; the recipe's
   runs train with a lock-step BF16 reference and statistics on (``--stats-every``), which give
   each converted layer's signals. The recipe's gap over the seeds is judged by the report's rule
   (``train.review.verdict``): if it is ``indistinguishable`` from seed noise and not under the
   target, no layer's contribution can be told from noise at this scale, and the tool says so.
2. **Rank** the converted layers by their lock-step signals (weight drift, gradient cosine, GEMM
   output SQNR; ``train.review.sensitivity``), worst first.
3. **Confirm** by bisection over how many of the ranked layers to keep in BF16: each candidate
   keeps the first ``k`` and is trained on the same seeds; it meets the target when the upper end
   of its gap's interval (mean + ``--z`` SE) is below ``--target-gap``.
4. **Answer**, written to ``--out`` and never into ``conf/``: the preset
   ``<out>/recipe/<name>.yaml`` (the recipe as composed, with the kept layers added to
   ``skip_modules`` as anchored ``^...$`` patterns), the exact command that trains it, and an
   evidence table (layer, signals, gap with and without it, interval) in ``sensitivity.md`` and
   ``sensitivity.json``. ``--verify`` also trains the answer against BF16 on fresh seeds.

``--budget`` counts training runs, seeds included, and caps the search: the noise runs take
``2 x seeds``, each candidate ``seeds``, ``--verify`` ``2 x seeds``. When the budget ends first,
the tool says the target was not met within it. Every member is a preset in ``<out>/recipe``
(``hydra.searchpath=[file://<out>]``), and a member whose runs completed is read back, so the
same command resumes. Exit status: 0 when the search ran to an answer (met, needs every layer,
not separable, or out of budget: each is a correct answer), 1 when a run failed, 2 on bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

from recipes.base import get_recipe
from recipes.config import RecipeConfig
from recipes.errors import ConfigError
from recipes.quantized_checks import layer_override
from train.ablation import ROOT, Progress, check_tool_args, refuse, seed_gap, without_recipe
from train.cli import config_error_exit, searchpath_entries, split_override, tool_args
from train.config import RunConfig
from train.review.sensitivity import (
    SIGNALS,
    Gap,
    judge,
    layer_signals,
    max_candidates,
    next_candidate,
    outcome,
    rank_layers,
)
from train.review.series import read_series

#: overrides the tool sets itself (a user value would be silently replaced)
OWNED = ("trainer.seed", "hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir", "reference.mode",
         "reference.run_dir", "stats.every")  # fmt: skip


def converted_layers(cfg: RunConfig) -> list[str]:
    """The Linear layers the recipe converts, in module order (meta device: no memory, no data)."""
    import torch

    from train.data import nominal_vocab_size
    from train.model import GPT

    with torch.device("meta"):
        model = GPT(cfg.model.resolve(nominal_vocab_size(cfg.data)))
    recipe = get_recipe(cfg.recipe)
    recipe.resolve("cpu")
    recipe.check(model)
    return list(recipe.convert(model).converted)


def anchored(layer: str) -> str:
    return f"^{re.escape(layer)}$"


def preset(rec: RecipeConfig, name: str, keep: list[str], header: str, converted: list[str]) -> str:
    """A ``conf/recipe``-style preset: the schema defaults, then every field where ``rec`` differs
    from them, with ``keep`` added to ``skip_modules`` as anchored patterns and the
    ``layer_formats`` keys that no longer apply to a converted layer dropped (a key matching only
    kept layers is refused as a likely typo)."""
    import yaml

    rest = [n for n in converted if n not in keep]
    used = {layer_override(rec, n)[0] for n in rest}
    rec = dataclasses.replace(rec, name=name, skip_modules=[*rec.skip_modules, *map(anchored, keep)],
                              layer_formats={k: v for k, v in rec.layer_formats.items() if k in used})  # fmt: skip
    base = dataclasses.asdict(RecipeConfig())
    delta = {k: v for k, v in dataclasses.asdict(rec).items() if v != base[k] or k == "name"}
    body = yaml.safe_dump(delta, sort_keys=False, default_flow_style=False, width=1000)
    return f"{header}defaults: [_schema, _self_]\n{body}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.sensitivity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument(
        "--target-gap", type=float, default=0.005, help="nats/token: the gap to BF16 to get under"
    )
    ap.add_argument("--budget", type=int, default=12, help="training runs at most, seeds included")
    ap.add_argument("--seeds", type=int, default=2, help="paired seeds per member (>= 2: the noise estimate)")
    ap.add_argument(
        "--out", type=Path, default=None, help="stable output dir (default outputs/sensitivity/<recipe>)"
    )
    ap.add_argument("--name", default=None, help="the answer preset's name (default <recipe>_sensitivity)")
    ap.add_argument("--last-k", type=int, default=10, help="logged steps averaged at the end of each run")
    ap.add_argument("--z", type=float, default=2.0, help="interval = mean +- z x SE (report.z)")
    ap.add_argument(
        "--stats-every", type=int, default=0, help="stat steps of the recipe's runs (0: steps/10)"
    )
    ap.add_argument(
        "--rank-by",
        choices=["auto", *SIGNALS],
        default="auto",
        help="auto: SQNR class, then lock-step signals (train.review.sensitivity)",
    )
    ap.add_argument("--verify", action="store_true", help="train the answer against BF16 on fresh seeds")
    ap.add_argument("--plan", action="store_true", help="print the plan and exit")
    args, cfg = tool_args(ap, argv)
    user = list(args.overrides)
    check_tool_args("train.sensitivity", user, owned=OWNED, owned_by="--seeds, --out, --stats-every",
                    seeds=args.seeds, positive={"--target-gap": args.target_gap, "--last-k": args.last_k,
                                                "--z": args.z})  # fmt: skip
    s = args.seeds
    verify_runs = 2 * s if args.verify else 0
    need = 2 * s + verify_runs
    if args.budget < need:
        refuse("--budget", args.budget, f"at least {need}: 2 x --seeds for BF16 and the recipe"
                + (", 2 x --seeds for --verify" if args.verify else ""))  # fmt: skip
    rec = cfg.recipe
    if rec.quantizer == "none":
        refuse(
            "recipe.quantizer",
            "none",
            "the search needs a quantized recipe: +recipe=NAME of a quantized preset",
        )
    if rec.quantize_attention:
        refuse("recipe.quantize_attention", True, "keeping a Linear in BF16 does not keep its attention "
                "matmuls; set it false")  # fmt: skip
    try:
        layers = converted_layers(cfg)
    except ConfigError as e:
        config_error_exit(e)
    if not layers:
        refuse(
            "recipe.skip_modules", rec.skip_modules, "the recipe converts no Linear layer: nothing to search"
        )
    steps = cfg.trainer.max_steps
    stats_every = args.stats_every or max(1, steps // 10)
    stem = re.sub(r"[^\w-]", "_", rec.name)
    name = args.name or f"{stem}_sensitivity"
    out = (args.out or ROOT / "outputs" / "sensitivity" / stem).resolve()
    n = len(layers)
    cands = min(max_candidates(n), (args.budget - need) // s)
    plan_runs = need + cands * s
    print(f"train.sensitivity: {rec.name}, {n} converted layers, target gap {args.target_gap:g} (upper end of "
          f"mean + {args.z:g} SE over {s} seeds); runs of {steps} steps: BF16 and the recipe x {s} seeds (noise "
          f"and signals: lock-step reference, stats every {stats_every}), then up to {cands} bisection "
          f"candidates x {s} (bisection over {n} layers needs at most {max_candidates(n)})"
          + (f", then the answer and BF16 on {s} fresh seeds" if args.verify else "")
          + f" = at most {plan_runs} runs, budget {args.budget}; in {out}", flush=True)  # fmt: skip
    if args.plan:
        return 0
    (out / "recipe").mkdir(parents=True, exist_ok=True)
    seeds = list(range(1, s + 1))
    # the presets it writes go first on the search path; the user's own entries (their presets) stay
    search = f"hydra.searchpath=[{','.join([f'file://{out}', *searchpath_entries(user)])}]"
    passed = [o for o in without_recipe(user) if (split_override(o) or ("",))[0] != "hydra.searchpath"]
    base = [*passed, search]
    progress = Progress("train.sensitivity", plan_runs)
    failed: list[str] = []
    ranked: list[str] = []

    def member(
        label: str,
        recipe_over: list[str],
        sweep: Path,
        on: list[int],
        extra: tuple[str, ...] | list[str] = (),
    ) -> None:
        if not progress.run_member(label, [*base, *recipe_over, *extra], on, sweep):
            failed.append(label)

    def candidate(k: int) -> Path:
        pname = f"{stem}_keep{k}"
        head = f"# train.sensitivity candidate: {rec.name} with its {k} top-ranked layers in BF16\n"
        (out / "recipe" / f"{pname}.yaml").write_text(preset(rec, pname, ranked[:k], head, layers))
        sweep = out / "runs" / pname
        member(f"keep {k}", [f"+recipe={pname}"], sweep, seeds,
               ["reference.mode=lockstep", f"stats.every={stats_every}"] if k == 0 else ["stats.every=0"])  # fmt: skip
        return sweep

    bf16 = out / "runs" / "bf16"
    member("bf16", ["+recipe=bf16"], bf16, seeds, ["stats.every=0"])
    evaluated: dict[int, Gap] = {}

    def gap(k: int, sweep: Path, on: list[int]) -> Gap:
        """The gap of ``sweep``'s seeds ``on`` to the BF16 runs of the same seeds."""
        deltas = [seed_gap(sweep / f"seed{x}", bf16 / f"seed{x}", last_k=args.last_k) for x in on]
        return judge(k, [d for d in deltas if d is not None], z=args.z)

    def evaluate(k: int, sweep: Path) -> None:
        g = evaluated[k] = gap(k, sweep, seeds)
        iv = g.interval
        print(f"train.sensitivity: keep {k}: gap {g.verdict.text}"
              + (f", mean {g.verdict.mean:+.4f} [{iv[0]:+.4f}, {iv[1]:+.4f}]" if iv else "")
              + f": {'meets' if g.meets(args.target_gap) else 'does not meet'} {args.target_gap:g}", flush=True)  # fmt: skip

    full = candidate(0)
    signals = layer_signals([read_series(full / f"seed{x}" / "metrics.jsonl") for x in seeds
                             if (full / f"seed{x}" / "metrics.jsonl").exists()], layers)  # fmt: skip
    ranked[:] = rank_layers(signals, args.rank_by)
    evaluate(0, full)
    used = 2 * s
    while (k := next_candidate(n, evaluated, args.target_gap)) is not None and not failed:
        if evaluated[0].verdict.kind == "indistinguishable" or used + s > args.budget - verify_runs:
            break
        evaluate(k, candidate(k))
        used += s
    res: dict = {"status": "failed", "k": None} if failed else outcome(n, evaluated, args.target_gap)
    answer = {"status": res["status"], "k": res["k"], "runs": used}
    text = _conclusion(res, evaluated, ranked, args, used=used, seeds=s, steps=steps, failed=failed)
    if res["status"] in ("met", "all_layers"):
        keep = ranked[: res["k"]]
        head = (f"# train.sensitivity: {rec.name} with {len(keep)} layers in BF16; gap target {args.target_gap:g} "
                f"over seeds {seeds}, {steps} steps (evidence: {out / 'sensitivity.md'})\n")  # fmt: skip
        (out / "recipe" / f"{name}.yaml").write_text(preset(rec, name, keep, head, layers))
        cmd = " ".join(["python train/run.py", search, f"+recipe={name}", *passed])
        answer |= {"keep": keep, "skip_modules": [*rec.skip_modules, *map(anchored, keep)],
                   "preset": str(out / "recipe" / f"{name}.yaml"), "command": cmd}  # fmt: skip
        text += f"\n\nPreset: `{answer['preset']}`\n\n    {cmd}\n"
        if args.verify:
            fresh = list(range(s + 1, 2 * s + 1))
            member("verify: bf16", ["+recipe=bf16"], bf16, fresh, ["stats.every=0"])
            member(f"verify: {name}", [f"+recipe={name}"], out / "runs" / name, fresh, ["stats.every=0"])
            used += 2 * s
            g = gap(res["k"], out / "runs" / name, fresh)
            ok = g.meets(args.target_gap)
            answer |= {"runs": used, "verify": {"seeds": fresh, **_gap_json(g), "meets": ok}}
            text += (f"\nOn fresh seeds {fresh}: gap {_cell(g)}: "
                     f"{'meets' if ok else 'does NOT meet'} the target {args.target_gap:g}.\n")  # fmt: skip
    table = _evidence(layers, ranked, signals, evaluated, args.target_gap)
    print("\n" + text + "\n" + table, flush=True)
    (out / "sensitivity.md").write_text(f"# {rec.name}: which layers stay in BF16\n\n{text}\n\n{table}")
    (out / "sensitivity.json").write_text(json.dumps({
        "recipe": rec.name, "target_gap": args.target_gap, "z": args.z, "seeds": seeds, "steps": steps,
        "last_k": args.last_k, "budget": args.budget, **answer, "ranked": ranked, "signals": signals,
        "candidates": {str(k): {"keep": ranked[:k], **_gap_json(g), "meets": g.meets(args.target_gap)}
                       for k, g in sorted(evaluated.items())}}, indent=1) + "\n")  # fmt: skip
    print(f"sensitivity.json, sensitivity.md in {out}", flush=True)
    if failed:
        print(
            f"lowbit: train.sensitivity: runs failed in {', '.join(failed)} (see their run dirs)",
            file=sys.stderr,
        )
        return 1
    return 0


def _gap_json(g: Gap) -> dict:
    v = g.verdict
    return {"mean": v.mean, "se": v.se, "n": v.n, "interval": g.interval, "verdict": v.text}


def _cell(g: Gap | None, *, verdict: bool = True) -> str:
    if g is None:
        return "not run"
    iv = g.interval
    if iv is None:
        return g.verdict.text
    return f"{g.verdict.mean:+.4f} [{iv[0]:+.4f}, {iv[1]:+.4f}]" + (f" ({g.verdict.text})" if verdict else "")


def _conclusion(res: dict, evaluated: dict[int, Gap], ranked: list[str], args: argparse.Namespace, *,
                used: int, seeds: int, steps: int, failed: list[str]) -> str:  # fmt: skip
    st, k, t = res["status"], res["k"], args.target_gap
    runs = f"{used} runs of a budget of {args.budget}"
    if st == "failed":
        return (
            f"**No answer: runs failed** ({', '.join(failed)}); fix them and run the same command to resume."
        )
    if st == "not_separable":
        return (f"**Not separable from seed noise at this scale**: the recipe's gap {_cell(evaluated[0])} is "
                f"indistinguishable ({seeds} seeds, {steps} steps), so no layer's share can be told from noise; "
                f"train longer or on more seeds. {runs}.")  # fmt: skip
    if st == "budget":
        best = f"; the smallest gap was keep {k}: {_cell(evaluated[k])}" if k is not None else ""
        return f"**Target {t:g} not met within the budget** ({runs}){best}."
    if st == "all_layers":
        return (f"**Only keeping every converted layer in BF16 meets the target {t:g}** (keeping "
                f"{max(evaluated)} did not: {_cell(evaluated[max(evaluated)])}). {runs}.")  # fmt: skip
    if k == 0:
        return f"**The recipe already meets the target {t:g}**: gap {_cell(evaluated[0])}; nothing needs BF16. {runs}."
    return (f"**Keep {k} layer{'s' * (k > 1)} in BF16** ({', '.join(ranked[:k])}): gap {_cell(evaluated[k])}, "
            f"under the target {t:g} (the recipe: {_cell(evaluated[0])}). {runs}.")  # fmt: skip


def _evidence(
    layers: list[str], ranked: list[str], signals: dict, evaluated: dict[int, Gap], target: float
) -> str:
    rows = ["| candidate | layers kept in BF16 | gap to BF16 [interval] | meets |", "|---|---|---|---|"]
    for k, g in sorted(evaluated.items()):
        rows.append(f"| keep {k} | {', '.join(ranked[:k]) or '(none: the recipe)'} | {_cell(g)} | "
                    f"{'yes' if g.meets(target) else 'no'} |")  # fmt: skip
    rows += ["", "| rank | layer | weight drift | grad cosine | min GEMM SQNR (dB) | gap with it in BF16 | "
             "gap without |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r, layer in enumerate(ranked):
        sig = signals.get(layer, {})
        with_k = min((k for k in evaluated if k > r), default=None)
        without_k = max((k for k in evaluated if k <= r), default=None)
        fmt = {"weight_drift": "{:.3g}", "grad_cos": "{:.4f}", "sqnr_db": "{:.1f}"}
        cells = [fmt[x].format(sig[x]) if x in sig else "-" for x in fmt]
        rows.append(f"| {r + 1} | {layer} | {' | '.join(cells)} | "
                    f"{_cell(evaluated.get(with_k), verdict=False) if with_k is not None else 'not run'} | "
                    f"{_cell(evaluated.get(without_k), verdict=False) if without_k is not None else 'not run'} |")  # fmt: skip
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
