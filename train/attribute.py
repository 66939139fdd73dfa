"""Where does a recipe's loss gap come from? Exact Shapley shares of its three GEMMs, with seed noise.

    python -m train.attribute --seeds 3 +recipe=mxfp4_e2m1 trainer.max_steps=400
    python -m train.attribute --seeds 3 --out outputs/attr hydra/launcher=slurm +recipe=nvfp4

Its own flags first, then Hydra overrides for every run (the ``python -m train.<tool>``
convention). On the same seeds (so the same initial weights and data order) it trains the 2^3
subsets of {fwd, dgrad, wgrad} of every converted Linear: BF16 (``+recipe=bf16``, the empty
subset), each GEMM alone, each pair, and the whole recipe. A GEMM left out keeps both of its
operands in high precision through the recipe's role fields (``fwd``: ``input_format``,
``weight_format``; ``dgrad``: ``grad_output_dgrad_format``, ``weight_dgrad_format``; ``wgrad``:
``grad_output_wgrad_format``, ``input_wgrad_format``); everything else is the recipe's. In a
converted layer a GEMM left out runs as the emulated backend runs high-precision operands (FP32
GEMM on the upcast BF16 operands, output rounded once to BF16), which BF16's ``nn.Linear``
matches up to accumulation order. A GEMM the recipe does not quantize at all makes no runs of
its own: its subsets are the runs without it, and its share is 0.

Each subset is one Hydra multirun over the seeds (``trainer.seed=1,2,3``), so it runs on the
basic launcher and on Slurm (``hydra/launcher=slurm``) alike, in ``<out>/<subset>/seed<N>``.
``--out`` is the tool's stable directory: a member whose ``summary.json`` says ``completed`` is
read back, not trained again, so the same command resumes. Per seed, the gap of a subset is
``train.review.verdict.seed_delta`` against that seed's BF16 run (the last ``--last-k`` logged
steps), and ``train.review.attribution`` turns the eight gaps into each GEMM's Shapley share,
``only g`` and ``all but g`` gaps, each with mean, standard error and interval over the seeds and
the report's verdict rule (``--z``). Written to ``<out>``: ``attribution.json``,
``attribution.md`` and ``attribution.png`` (the shares with their intervals). The plan (runs to
train, runs done) prints first; each member then prints its runs and the time left, estimated
from the runs trained so far (``train.ablation.Progress``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from recipes.config import OPERAND_FIELDS
from recipes.quantized_checks import role_formats
from train.ablation import ROOT, Progress, check_tool_args, completed, refuse, seed_gap, without_recipe
from train.cli import tool_args
from train.review.attribution import GEMMS, SUBSETS, attribute, render, subset_name, to_json

#: overrides the tool sets itself (a user value would be silently replaced)
OWNED = ("trainer.seed", "hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir")


def member_overrides(
    user: list[str], formats: dict[str, str | None], name: str, subset: tuple[str, ...]
) -> list[str]:
    """The overrides of one subset's runs: the user's, then the role fields of the GEMMs it leaves
    in high precision set to null (BF16: the user's recipe overrides replaced by ``+recipe=bf16``)."""
    if not subset:
        return [*without_recipe(user), "+recipe=bf16"]
    out = [*user, f"recipe.name={name}.{subset_name(subset)}"]
    for gemm, fields in OPERAND_FIELDS.items():
        for key in fields:
            fmt = formats[key] if gemm in subset else None
            out.append(f"recipe.{key}={'null' if fmt is None else fmt}")
    return out


def effective(formats: dict[str, str | None]) -> set[str]:
    """The GEMMs the recipe quantizes at all (one of their two operands has a format)."""
    return {g for g, fields in OPERAND_FIELDS.items() if any(formats[k] is not None for k in fields)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.attribute", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--seeds", type=int, default=3, help="paired seeds per subset (>= 2: the noise estimate)")
    ap.add_argument(
        "--out", type=Path, default=None, help="stable output dir (default outputs/attribute/<recipe>)"
    )
    ap.add_argument("--last-k", type=int, default=10, help="logged steps averaged at the end of each run")
    ap.add_argument("--z", type=float, default=2.0, help="|mean| < z x SE is indistinguishable (report.z)")
    ap.add_argument("--plan", action="store_true", help="print the plan and exit")
    args, cfg = tool_args(ap, argv)
    user = list(args.overrides)
    check_tool_args("train.attribute", user, owned=OWNED, owned_by="--seeds, --out", seeds=args.seeds,
                    positive={"--last-k": args.last_k, "--z": args.z})  # fmt: skip
    rec = cfg.recipe
    if rec.quantizer == "none":
        refuse(
            "recipe.quantizer",
            "none",
            "attribution needs a quantized recipe: +recipe=NAME of a quantized preset (conf/recipe/)",
        )
    if rec.quantize_attention:
        refuse(
            "recipe.quantize_attention",
            True,
            "the attention matmuls are not one of the three GEMMs; set it false",
        )
    if rec.layer_formats:
        refuse("recipe.layer_formats", dict(rec.layer_formats), "attribution switches the recipe's GEMM roles, "
                "which per-layer formats would override; drop them (or attribute a preset without them)")  # fmt: skip
    formats = role_formats(rec)
    active = effective(formats)
    out = (args.out or ROOT / "outputs" / "attribute" / rec.name).resolve()
    seeds = list(range(1, args.seeds + 1))
    plan = []
    for subset in dict.fromkeys(tuple(g for g in s if g in active) for s in SUBSETS):
        name = subset_name(subset)
        todo = [s for s in seeds if not completed(out / name / f"seed{s}")]
        plan.append((subset, name, todo))
    runs = sum(len(t) for *_, t in plan)
    idle = [g for g in GEMMS if g not in active]
    print(f"train.attribute: {rec.name}, {len(plan)} distinct subsets x {len(seeds)} seeds = {len(plan) * len(seeds)} "
          f"runs of {cfg.trainer.max_steps} steps; {runs} to train, {len(plan) * len(seeds) - runs} done, in {out}"
          + (f"; {', '.join(idle)} quantize nothing in this recipe (their subsets are the runs without them)"
             if idle else ""), flush=True)  # fmt: skip
    if args.plan:
        for _, name, todo in plan:
            print(f"  {name}: seeds {todo or 'done'}")
        return 0
    failed = []
    progress = Progress("train.attribute", runs)
    for subset, name, todo in plan:
        if todo and not progress.run_member(
            name, member_overrides(user, formats, rec.name, subset), seeds, out / name
        ):
            failed.append(name)
    gaps: dict[frozenset[str], dict[int, float]] = {}
    for subset in SUBSETS[1:]:
        eff = tuple(g for g in subset if g in active)
        for s in seeds:
            ref, run = out / "bf16" / f"seed{s}", out / subset_name(eff) / f"seed{s}"
            if not eff:  # the same run as BF16: no gap by construction
                if completed(ref):
                    gaps.setdefault(frozenset(subset), {})[s] = 0.0
                continue
            if (d := seed_gap(run, ref, last_k=args.last_k)) is not None:
                gaps.setdefault(frozenset(subset), {})[s] = d
    result = attribute(gaps, z=args.z)
    text = render(result)
    print("\n" + text)
    (out / "attribution.json").write_text(json.dumps({"recipe": rec.name, "steps": cfg.trainer.max_steps,
                                                      "last_k": args.last_k, **to_json(result)}, indent=1) + "\n")  # fmt: skip
    (out / "attribution.md").write_text(f"# {rec.name}: where the loss gap comes from\n\n{text}")
    _plot(result, out / "attribution.png", title=f"{rec.name}: Shapley share of the loss gap per GEMM")
    print(f"attribution.json, attribution.md, attribution.png in {out}")
    if failed:
        print(
            f"lowbit: train.attribute: runs failed in {', '.join(failed)} (see their run dirs)",
            file=sys.stderr,
        )
        return 1
    return 0


def _plot(result: dict, path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = result["shares"]["shapley"]
    names = list(shares)
    means = [shares[g].verdict.mean or 0.0 for g in names]
    errs = [result["z"] * (shares[g].verdict.se or 0.0) for g in names]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(names, means, yerr=errs, capsize=6, color=["#4c72b0", "#dd8452", "#55a868"])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel(f"share of final-loss gap (nats), +- {result['z']:g} SE")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
