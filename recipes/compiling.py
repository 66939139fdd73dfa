"""torch.compile plumbing for the quantizers: one cache of compiled functions, one recompile headroom.

Numerics: none of its own. ``compiled(fn)`` is ``torch.compile(fn, dynamic=False)`` of the
same pure Python function the eager path calls, so every compiled result has the eager bits
(tested per quantizer and per Linear body). Each distinct (format, role, rounding, shape)
traces one graph; :func:`recompile_headroom` raises dynamo's per-function graph limit (default
8) to :data:`RECOMPILE_LIMIT` for the duration of a call, so a model with many layer shapes does
not fall back to eager silently.

Used by ``recipes.mx.quantize`` (the MX fake-quant body), ``recipes.quantizers`` (the pure parts
of each role) and ``recipes.qlinear`` (whole forward / backward GEMM bodies).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

__all__ = ["RECOMPILE_LIMIT", "call", "compiled", "recompile_headroom"]

#: graphs kept per compiled function (one per format / role / rounding / shape)
RECOMPILE_LIMIT = 256

F = TypeVar("F", bound=Callable[..., Any])


@functools.cache
def compiled(fn: F) -> F:
    """``torch.compile(fn, dynamic=False)``, built once per function."""
    return torch.compile(fn, dynamic=False)  # type: ignore[return-value]


def recompile_headroom() -> Any:
    """Scoped dynamo config raising the recompile limit to :data:`RECOMPILE_LIMIT` (a context manager)."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    return cfg.patch(**{name: max(getattr(cfg, name), RECOMPILE_LIMIT)})


def call(fn: Callable[..., Any], compile: bool, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, or the same pure function under ``torch.compile`` (same bits)."""
    if not compile:
        return fn(*args, **kwargs)
    with recompile_headroom():
        return compiled(fn)(*args, **kwargs)
