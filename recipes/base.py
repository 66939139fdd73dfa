"""Recipe protocol and registry (the Linear-layer filter is ``recipes.filter``).

A recipe is a small object built from a ``RecipeConfig``:

* ``precision``       the DeepSpeed engine precision (fp32 / bf16 / fp16);
* ``resolve_backend`` turns ``backend=auto`` into a concrete backend for the
  device, loudly, so the run config records what actually ran;
* ``convert(model)``  swaps the modules it quantizes and reports what it did;
* ``forward_context`` wraps each forward pass (e.g. an FP8 autocast);
* ``grad_format`` / ``gemm_family`` answer what the trainer would otherwise guess
  from strings: the format of dY (for gradient statistics) and the GEMM rate
  class (for the format-peak MFU);
* ``on_optimizer_step`` updates per-step state (e.g. delayed-scaling amaxes);
* ``state_dict`` / ``load_state_dict`` carry that state through checkpoints;
* ``describe()``      a dict for the run config and W&B.

Adding a recipe is one module that calls ``register_recipe`` plus one YAML in
``conf/recipe/``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from recipes.config import RecipeConfig

if TYPE_CHECKING:
    from recipes.numerics import FormatSpec


@dataclass
class ConversionReport:
    """What ``Recipe.convert`` did to the model's Linear layers."""

    converted: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)

    def summary(self) -> str:
        total = len(self.converted) + len(self.kept)
        if not self.converted:
            return f"no Linear converted; all {total} run in the engine precision"
        kept = ", ".join(self.kept) if self.kept else "none"
        return f"converted {len(self.converted)}/{total} Linear; kept in high precision: {kept}"


class Recipe:
    """Base recipe: the engine runs in ``cfg.precision``; no layer is converted."""

    #: backends this recipe can run on, best first; ``auto`` takes the first available.
    backends: tuple[str, ...] = ("native",)

    def __init__(self, cfg: RecipeConfig):
        self.cfg = cfg
        self.backend: str | None = None
        self.report = ConversionReport()

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def precision(self) -> str:
        return self.cfg.precision

    def available_backends(self, device: str) -> tuple[str, ...]:
        """Backends usable on ``device`` ("cpu" or "cuda"); subclasses narrow this."""
        return self.backends

    def resolve_backend(self, device: str) -> tuple[str, str | None]:
        """Return (backend, note). ``note`` explains an ``auto`` resolution."""
        usable = self.available_backends(device)
        if self.cfg.backend != "auto":
            return self.cfg.backend, None
        chosen = usable[0]
        note = None
        if chosen == "emulated":
            note = f"recipe.backend=auto resolved to 'emulated' on {device} (no hardware backend for {self.name})"
        return chosen, note

    def check(self, model: nn.Module) -> None:
        """Raise ConfigError if this recipe cannot run on ``model`` (built on the
        meta device at validation time, so no memory or compute is spent)."""
        return None

    def convert(self, model: nn.Module) -> ConversionReport:
        self.report = ConversionReport(kept=[n for n, m in model.named_modules() if isinstance(m, nn.Linear)])
        return self.report

    def grad_format(self) -> FormatSpec | None:
        """The format each converted Linear's output gradient dY is quantized to, as a
        ``recipes.numerics.FormatSpec`` (None: dY stays in the engine precision). The gradient
        statistics (``grad/<layer>/underflow_frac``...) are taken against it."""
        warnings.warn(
            f"recipe {self.name} ({type(self).__name__}) does not say which format its gradients are "
            "quantized to (Recipe.grad_format): grad/ statistics are taken against none",
            stacklevel=2,
        )
        return None

    def gemm_family(self) -> str:
        """The tensor-core rate its GEMMs run at, one of ``recipes.config.GEMM_FAMILIES``:
        ``perf/mfu_format_peak`` divides by the device's peak for it."""
        warnings.warn(
            f"recipe {self.name} ({type(self).__name__}) does not name its GEMM family "
            f"(Recipe.gemm_family): perf/mfu_format_peak uses the {self.precision} peak",
            stacklevel=2,
        )
        return self.precision

    def forward_context(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def on_optimizer_step(self) -> None:
        return None

    def telemetry(self) -> dict[str, float]:
        """Recipe state worth logging on stat steps (e.g. ``fp8/<tensor>/scale``)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Recipe state a checkpoint must carry (e.g. delayed-scaling amax histories); {} if none."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (an empty dict is a no-op)."""
        return None

    def describe(self) -> dict[str, Any]:
        return {
            "config": asdict(self.cfg),
            "resolved_backend": self.backend,
            "conversion": self.report.summary(),
            "converted": list(self.report.converted),
            "kept": list(self.report.kept),
        }


RECIPES: dict[str, type[Recipe]] = {}


def register_recipe(*names: str) -> Callable[[type[Recipe]], type[Recipe]]:
    def deco(cls: type[Recipe]) -> type[Recipe]:
        for n in names:
            if n in RECIPES:
                raise KeyError(f"recipe {n!r} registered twice")
            RECIPES[n] = cls
        return cls

    return deco


def get_recipe(cfg: RecipeConfig) -> Recipe:
    _load_builtin_recipes()
    try:
        cls = RECIPES[cfg.name]
    except KeyError:
        raise KeyError(f"unknown recipe {cfg.name!r}; known: {', '.join(sorted(RECIPES))}") from None
    return cls(cfg)


def known_recipes() -> list[str]:
    _load_builtin_recipes()
    return sorted(RECIPES)


def _load_builtin_recipes() -> None:
    # Importing a recipe module registers it. Keep this list the only place that
    # names the built-in modules.
    import recipes.emulated  # noqa: F401
    import recipes.precision  # noqa: F401


def iter_linears(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            yield name, mod
