"""Which Linear layers a recipe converts: one pure function, ``select_modules``.

Rules, applied to each module name in order (the first that matches keeps the
layer in high precision):

1. a ``skip`` regex matches the name on whole dotted components (:func:`name_matches`: the
   match starts at the name's start or after a ``.`` and ends at its end or before a ``.``, so
   ``blocks.1`` keeps ``blocks.1.mlp.fc`` but not ``blocks.11.mlp.fc``, and ``mlp`` keeps every
   MLP Linear; ``^...$`` anchors the whole name). The default ``["lm_head"]`` keeps the output
   head in the engine precision, as TE / torchao recipes do;
2. the name sits in one of the first ``keep_first_blocks`` or last
   ``keep_last_blocks`` transformer blocks (``blocks.{i}.`` in the name;
   ``num_blocks`` is the model's block count);
3. otherwise the layer converts.

Embeddings are ``nn.Embedding``, not ``nn.Linear``, so they never reach the
filter. The same function decides which attention cores quantize QK^T / PV
(their names, e.g. ``blocks.0.attn.core``, pass through the same rules).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "FilterDecision",
    "NamePattern",
    "block_index",
    "compile_patterns",
    "name_matches",
    "num_blocks",
    "select_modules",
]

_BLOCK_RE = re.compile(r"(?:^|\.)blocks\.(\d+)(?:\.|$)")


def block_index(name: str) -> int | None:
    """The transformer block a module belongs to (``blocks.3.mlp.fc`` -> 3), or None."""
    m = _BLOCK_RE.search(name)
    return int(m.group(1)) if m else None


def num_blocks(names: Iterable[str]) -> int:
    """1 + the largest block index among ``names`` (0 if none is inside a block)."""
    idx = [i for i in map(block_index, names) if i is not None]
    return max(idx) + 1 if idx else 0


@dataclass(frozen=True)
class NamePattern:
    """A module-name pattern: the user's text (messages and reasons quote it) and its compiled
    form, which matches whole dotted components only (rule 1)."""

    pattern: str
    regex: re.Pattern[str]

    def search(self, name: str) -> re.Match[str] | None:
        return self.regex.search(name)


def compile_patterns(patterns: Sequence[str]) -> list[NamePattern]:
    """Compile module-name regexes (rule 1); a ``re.error`` is the user's pattern's own."""
    out = []
    for p in patterns:
        re.compile(p)  # the user's pattern alone, so an error message is about it, not the wrapper
        out.append(NamePattern(p, re.compile(rf"(?:^|(?<=\.))(?:{p})(?=\.|$)")))
    return out


def name_matches(pattern: str, name: str) -> bool:
    """Whether module-name ``pattern`` matches ``name`` on whole dotted components (rule 1)."""
    return compile_patterns([pattern])[0].search(name) is not None


@dataclass
class FilterDecision:
    converted: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    #: why each kept name was kept ("skip regex 'lm_head'", "first 1 blocks", ...)
    reasons: dict[str, str] = field(default_factory=dict)


def select_modules(
    names: Sequence[str],
    *,
    skip: Sequence[str] = ("lm_head",),
    keep_first_blocks: int = 0,
    keep_last_blocks: int = 0,
    total_blocks: int | None = None,
) -> FilterDecision:
    """Split ``names`` (module order kept) into converted and kept (module docstring)."""
    patterns = compile_patterns(skip)
    n = num_blocks(names) if total_blocks is None else total_blocks
    out = FilterDecision()
    for name in names:
        reason = None
        hit = next((p.pattern for p in patterns if p.search(name)), None)
        if hit is not None:
            reason = f"skip regex {hit!r}"
        else:
            b = block_index(name)
            if b is not None and b < keep_first_blocks:
                reason = f"first {keep_first_blocks} blocks"
            elif b is not None and b >= n - keep_last_blocks:
                reason = f"last {keep_last_blocks} blocks"
        if reason is None:
            out.converted.append(name)
        else:
            out.kept.append(name)
            out.reasons[name] = reason
    return out
