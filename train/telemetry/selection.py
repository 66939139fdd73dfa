"""Which statistics a run takes, of which layers, on which steps: ``stats.*``, or a Transformer
Engine debug YAML (``stats.inspect_config``, the nvdlfw-inspect format).

``resolve(cfg.stats)`` is called by validation (bad values are one-line config errors before
any start-up) and by set-up; ``pick_layers`` applies the layer regexes and the key budget
(``stats.max_keys``) to the candidate layers, and says which layers it dropped.

Families (``stats.families``) and the most keys each adds per layer and step (the budget's
estimate; ``shadow`` per ``stats.shadow_formats`` entry):

=========  ====  ===========================================================================
family     keys  what (README: Telemetry)
=========  ====  ===========================================================================
grad       9     ``grad/<layer>/...`` dY against the recipe's format; ``grad/global_norm``
act        2     ``act/<layer>/absmax``, ``act/<layer>/kurtosis``
weight     2     ``weight/<layer>/absmax``, ``grad/<layer>/weight_norm``
shadow     6     ``shadow/<format>/<layer>/...``
gemm       12    ``gemm/<layer>/<fwd|dgrad|wgrad>/...``: the GEMM-output error
scales     30    ``scales/<layer>/<role>/...``: block-scale statistics and histograms
update     1     ``update/<layer>/ratio``
opt        2     ``opt/<layer>/exp_avg_sq_underflow_{bf16,e4m3}``
=========  ====  ===========================================================================

The nvdlfw-inspect YAML: every enabled top-level section has ``layers``
(``layer_name_regex_pattern``, or ``layer_types``: substrings of the layer name) and, under
``transformer_engine``, features. The statistics features ``LogTensorStats``,
``LogFp8TensorStats`` and ``LogNvfp4TensorStats`` map to families by their ``tensors`` and
``stats`` (:data:`TE_TENSORS`, :data:`TE_STATS`); their ``freq``, ``start_step`` and
``end_step`` set the cadence (the smallest ``freq``, the widest window). Features that change
numerics (``DisableFP8GEMM``, ``FakeQuant``, ``PerTensorScaling``, ...) are refused: in lowbit
that is a recipe setting, not a statistic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipes.errors import ConfigError

#: family -> the most keys it adds per layer per stat step
FAMILIES = {"grad": 9, "act": 2, "weight": 2, "shadow": 6, "gemm": 12, "scales": 30, "update": 1, "opt": 2}
#: TE debug tensor name -> lowbit families
TE_TENSORS = {"activation": ("act",), "gradient": ("grad",), "weight": ("weight", "update", "opt"),
              "output": ("gemm",), "dgrad": ("gemm",), "wgrad": ("gemm",)}  # fmt: skip
#: TE debug statistic (LogFp8TensorStats / LogNvfp4TensorStats names; recipe prefixes such as
#: ``mxfp8_`` dropped) -> the lowbit family that measures it; LogTensorStats' plain statistics
#: (min, max, mean, std, norms, cur_amax) are the tensor's own family
TE_STATS = {"underflows%": "grad", "overflows%": "grad", "mse": "gemm", "scale_inv_min": "scales",
            "scale_inv_max": "scales", "max_blockwise_dynamic_range": "scales", "dynamic_range": "scales"}  # fmt: skip
TE_STAT_FEATURES = ("LogTensorStats", "LogFp8TensorStats", "LogNvfp4TensorStats")


@dataclass(frozen=True)
class StatsPlan:
    """The resolved selection: cadence window, families, layer regexes, key budget."""

    every: int
    start_step: int
    end_step: int
    families: tuple[str, ...]
    layers: tuple[str, ...]
    max_keys: int
    source: str = "stats.*"

    def is_stat(self, step: int) -> bool:
        return (
            bool(self.every)
            and step % self.every == 0
            and step >= self.start_step
            and (not self.end_step or step <= self.end_step)
        )


def resolve(stats: Any) -> StatsPlan:
    """``stats`` (a ``StatsConfig``) as a plan; a ConfigError names the key and the fix."""
    for fam in stats.families:
        if fam not in FAMILIES:
            raise ConfigError("stats.families", fam, f"use some of: {', '.join(FAMILIES)}")
    for pat in stats.layers:
        _regex("stats.layers", pat)
    for key in ("start_step", "end_step", "max_keys"):
        if getattr(stats, key) < 0:
            raise ConfigError(f"stats.{key}", getattr(stats, key), "must be >= 0")
    plan = StatsPlan(stats.every, stats.start_step, stats.end_step, tuple(stats.families), tuple(stats.layers),
                     stats.max_keys)  # fmt: skip
    return _from_inspect_yaml(stats.inspect_config, plan) if stats.inspect_config else plan


def _regex(key: str, pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(key, pattern, f"not a regular expression ({e})") from None


def _from_inspect_yaml(path: str, base: StatsPlan) -> StatsPlan:
    import yaml

    key = "stats.inspect_config"
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(
            key, path, f"cannot read it as YAML ({type(e).__name__}); give an nvdlfw-inspect config"
        ) from None
    if not isinstance(doc, dict):
        raise ConfigError(key, path, "expected a mapping of config sections (nvdlfw-inspect format)")
    families: set[str] = set()
    layers: list[str] = []
    freqs, starts, ends = [], [], []
    for name, sec in doc.items():
        if not isinstance(sec, dict) or not sec.get("enabled", False):
            continue
        sel = sec.get("layers") or {}
        if "layer_name_regex_pattern" in sel:
            layers.append(_regex(key, str(sel["layer_name_regex_pattern"])).pattern)
        for t in sel.get("layer_types", []) or []:
            layers.append(re.escape(str(t)))
        for feature, fcfg in (sec.get("transformer_engine") or {}).items():
            if feature not in TE_STAT_FEATURES:
                raise ConfigError(key, f"{path} ({name}.{feature})", "changes numerics, not a statistic: "
                                  "set it as a recipe.* option instead; statistics features: "
                                  + ", ".join(TE_STAT_FEATURES))  # fmt: skip
            fcfg = fcfg or {}
            if not fcfg.get("enabled", True):
                continue
            families.update(_te_families(key, path, fcfg))
            freqs.append(int(fcfg.get("freq", 1)))
            starts.append(int(fcfg.get("start_step") or 0))
            ends.append(int(fcfg.get("end_step") or 0))
    if not families:
        raise ConfigError(key, path, "no enabled statistics feature (" + ", ".join(TE_STAT_FEATURES) + ")")
    return StatsPlan(
        every=min(freqs),
        start_step=min(starts),
        end_step=0 if 0 in ends else max(ends),
        families=tuple(f for f in FAMILIES if f in families),
        layers=tuple(layers) or base.layers,
        max_keys=base.max_keys,
        source=f"stats.inspect_config={path}",
    )


def _te_families(key: str, path: str, fcfg: dict[str, Any]) -> set[str]:
    out: set[str] = set()
    tensors = fcfg.get("tensors") or [t.get("tensor") for t in fcfg.get("tensors_struct") or []]
    for t in tensors:
        if t not in TE_TENSORS:
            raise ConfigError(key, f"{path} (tensor {t})", f"use some of: {', '.join(TE_TENSORS)}")
        out.update(TE_TENSORS[t])
    stats = list(fcfg.get("stats") or [])
    stats += [s for t in fcfg.get("tensors_struct") or [] for s in t.get("stats") or []]
    for stat in map(str, stats):  # a recipe prefix (``<recipe>_scale_inv_min``) is ignored
        out.update(fam for name, fam in TE_STATS.items() if stat == name or stat.endswith("_" + name))
    return out


def keys_per_layer(plan: StatsPlan, *, shadow_formats: int) -> int:
    return sum(
        n * (shadow_formats if f == "shadow" else 1) for f, n in FAMILIES.items() if f in plan.families
    )


def pick_layers(
    plan: StatsPlan, candidates: list[str], *, shadow_formats: int
) -> tuple[list[str], str | None]:
    """The stat layers: ``candidates`` matching ``plan.layers`` (all when empty), thinned to
    evenly spaced ones (first and last kept) when the key budget is exceeded; and the line
    that says so (None when nothing was dropped by the budget)."""
    pats = [re.compile(p) for p in plan.layers]
    chosen = [c for c in candidates if not pats or any(p.search(c) for p in pats)]
    per = keys_per_layer(plan, shadow_formats=shadow_formats)
    if not plan.max_keys or not per or len(chosen) * per <= plan.max_keys:
        return chosen, None
    n = max(1, plan.max_keys // per)
    idx = sorted({round(i * (len(chosen) - 1) / max(1, n - 1)) for i in range(n)}) if n > 1 else [0]
    kept = [chosen[i] for i in idx]
    msg = (f"stats: {len(chosen)} layers x {per} keys > stats.max_keys={plan.max_keys}: statistics of "
           f"{len(kept)} evenly spaced layers ({', '.join(kept[:3])}{', ...' if len(kept) > 3 else ''}); "
           "set stats.layers or stats.max_keys to choose")  # fmt: skip
    return kept, msg
