"""Recipe protocol and registry (the Linear-layer filter is ``recipes.filter``).

A recipe is a small object built from a ``RecipeConfig``:

* ``precision``       the DeepSpeed engine precision (fp32 / bf16 / fp16);
* ``resolve(device)`` turns ``backend=auto`` (and other device-dependent
  settings) into concrete values for the device, loudly, so the run config
  records what actually ran;
* ``convert(model)``  swaps the modules it quantizes and reports what it did;
* ``forward_context`` wraps each forward pass (e.g. an FP8 autocast);
* ``grad_format`` / ``gemm_family`` answer what the trainer would otherwise guess
  from strings: the format of dY (for gradient statistics) and the GEMM rate
  class (for the format-peak MFU);
* ``on_micro_batch`` / ``on_optimizer_step`` update per-micro-batch / per-step state (e.g.
  delayed-scaling amax histories);
* ``state_dict`` / ``load_state_dict`` carry that state through checkpoints;
* ``describe()``      a dict for the run config and W&B.

Registry: recipes register by *kind*, the ``recipe.quantizer`` value
(``@register_recipe("my_kind")`` on the class); ``recipe.name`` is a label only.
``get_recipe(cfg)`` looks ``cfg.quantizer`` up, after importing ``cfg.module`` if
set; a kind still unknown loads the ``lowbit.recipes`` entry points (once) and
looks again. An unknown kind is a ``ConfigError`` on ``recipe.quantizer``. The
built-in kinds register when the package is imported (``recipes/__init__.py``
imports their modules; this module imports none of them).

Adding a recipe kind is one module that calls ``register_recipe`` plus one YAML
in ``conf/recipe/``; a new preset of an existing kind is the YAML alone.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from torch import nn

from recipes.config import RecipeConfig
from recipes.errors import ConfigError

if TYPE_CHECKING:
    from recipes.costs import OperandCast
    from recipes.numerics import FormatSpec
    from recipes.probes import LayerProbe


@dataclass
class ConversionReport:
    """What ``Recipe.convert`` did to the model's Linear layers."""

    converted: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    #: why a kept layer was kept, where a filter decided it ("skip regex 'lm_head'", "first 1 blocks")
    reasons: dict[str, str] = field(default_factory=dict)
    #: converted GEMMs whose reduction dim is zero-padded to whole scale blocks (``Recipe.padded_gemms``)
    padded: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        total = len(self.converted) + len(self.kept)
        if not self.converted:
            return f"no Linear converted; all {total} run in the engine precision"
        kept = ", ".join(self.kept) if self.kept else "none"
        pads = sorted(set(self.padded.values()))
        pad = f"; {len(self.padded)} GEMMs zero-padded: {', '.join(pads)}" if pads else ""
        return f"converted {len(self.converted)}/{total} Linear; kept in high precision: {kept}{pad}"


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

    def resolve(self, device: str) -> str | None:
        """Settle the device-dependent settings for ``device`` ("cpu" or "cuda") once: sets
        ``self.backend`` and returns the note to print (None when nothing was ``auto``)."""
        self.backend, note = self.resolve_backend(device)
        return note

    def resolve_backend(self, device: str) -> tuple[str, str | None]:
        """Return (backend, note). ``note`` explains an ``auto`` resolution. Prefer :meth:`resolve`,
        which also records the answer on the recipe."""
        usable = self.available_backends(device)
        if self.cfg.backend != "auto":
            if self.cfg.backend not in self.backends:
                raise ConfigError(
                    "recipe.backend", self.cfg.backend,
                    f"recipe {self.name} has no {self.cfg.backend} backend (it runs on: {', '.join(self.backends)}); "
                    "set recipe.backend=auto, or choose a recipe that has one",
                )  # fmt: skip
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

    def check_tokens(self, tokens: int) -> None:
        """Raise ConfigError if this recipe cannot train on micro-batches of ``tokens`` tokens
        (``trainer.micro_batch_size x model.seq_len``: the wgrad GEMM's reduction dim)."""
        return None

    def padded_gemms(self, tokens: int) -> dict[str, str]:
        """The converted GEMMs whose reduction dim is zero-padded to whole scale blocks on
        micro-batches of ``tokens`` tokens, ``{"<layer>.wgrad": "tokens 100 -> 128 (block 32)"}``
        (the trainer records them in the conversion report and says so once); none here."""
        return {}

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

    def gemm_families(self) -> dict[str, str]:
        """The rate class of each GEMM of a converted Linear, ``{"fwd"|"dgrad"|"wgrad": family}``
        (``recipes.config.GEMM_FAMILIES``), from the role fields: the wider of a GEMM's two
        operand formats, the engine precision where one stays high precision
        (``recipes.costs.gemm_families``). What ``python -m train.perfmodel`` times each GEMM at."""
        from recipes.costs import gemm_families

        return gemm_families(self.cfg)

    def operand_casts(self) -> list[OperandCast]:
        """The quantized operand copies each converted Linear makes per forward + backward, with
        the kind's scale layout (``recipes.costs.OperandCast``: element bits, scale bytes, amax
        passes and reductions); [] when nothing is quantized or the kind is not in that table."""
        from recipes.costs import operand_casts

        return operand_casts(self.cfg)

    def forward_context(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def on_micro_batch(self) -> None:
        """After each micro-batch's backward (e.g. TE-cadence delayed-scaling updates)."""
        return None

    def on_optimizer_step(self) -> None:
        return None

    def telemetry(self) -> dict[str, Any]:
        """Recipe state worth logging on stat steps (e.g. ``fp8/<tensor>/scale``)."""
        return {}

    def layer_probe(self, module: nn.Module) -> LayerProbe | None:
        """The numerics probe of one converted layer (``recipes.probes``: GEMM-output error, block
        scales, dY as quantized), or None when the layer quantizes nothing."""
        from recipes.probes import probe_for

        return probe_for(module)

    def state_dict(self) -> dict[str, Any]:
        """Recipe state a checkpoint must carry (e.g. delayed-scaling amax histories); {} if none."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (an empty dict is a no-op)."""
        return None

    @property
    def gemm_impl(self) -> str:
        """What runs the converted GEMMs (``resolved.recipe.gemm_impl``)."""
        return f"torch matmuls in {self.precision} (no converted GEMM)"

    def describe(self) -> dict[str, Any]:
        return {
            "config": asdict(self.cfg),
            "resolved_backend": self.backend,
            "gemm_impl": self.gemm_impl,
            "conversion": self.report.summary(),
            "converted": list(self.report.converted),
            "kept": list(self.report.kept),
            "kept_reasons": dict(self.report.reasons),
            "padded_gemms": dict(self.report.padded),
        }


#: recipe kind (``recipe.quantizer``) -> the class that serves it
RECIPES: dict[str, type[Recipe]] = {}
#: entry-point group of recipe kinds from other distributions: ``my_kind = my_pkg.recipes:MyRecipe``
#: (name = the kind; the value is imported, and registered under that name if it did not
#: call ``register_recipe`` itself)
ENTRY_POINT_GROUP = "lowbit.recipes"
#: kind -> why its entry point failed to load; None until the entry points are loaded (once)
_entry_point_errors: dict[str, str] | None = None

R = TypeVar("R", bound=type[Recipe])


def register_recipe(*kinds: str) -> Callable[[R], R]:
    """Class decorator: the class serves ``recipe.quantizer`` = each of ``kinds``."""
    if not kinds:
        raise TypeError("register_recipe needs at least one kind (a recipe.quantizer value)")

    def deco(cls: R) -> R:
        for kind in kinds:
            if kind in RECIPES and RECIPES[kind] is not cls:
                raise KeyError(
                    f"recipe kind {kind!r} registered twice: {RECIPES[kind].__qualname__} and {cls.__qualname__}"
                )
            RECIPES[kind] = cls
        return cls

    return deco


def unregister_recipe(*kinds: str) -> None:
    """Forget ``kinds`` (tests, plug-in development); an unknown kind is ignored."""
    for kind in kinds:
        RECIPES.pop(kind, None)


def known_kinds() -> list[str]:
    """Every registered kind, built-in and plug-in (loads the entry points, once)."""
    _load_entry_points()
    return sorted(RECIPES)


def import_recipe_module(module: str) -> None:
    """Import ``recipe.module`` (it registers its kinds); an import failure is a ConfigError."""
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(
            "recipe.module",
            module,
            f"cannot import it ({type(e).__name__}: {e}); put its package on PYTHONPATH or install it",
        ) from e


def recipe_class(kind: str, *, module: str | None = None) -> type[Recipe]:
    """The class registered for ``kind``: after importing ``module`` (if given) and, for a kind
    still unknown, the ``lowbit.recipes`` entry points. ConfigError on ``recipe.quantizer`` if none."""
    if module:
        import_recipe_module(module)
    if kind not in RECIPES:
        _load_entry_points()
    if kind in RECIPES:
        return RECIPES[kind]
    fix = f"use one of: {', '.join(sorted(RECIPES))}"
    if module:
        fix += f" (recipe.module={module} was imported but registered no kind {kind!r})"
    if kind in (errors := _entry_point_errors or {}):
        fix += f" (its {ENTRY_POINT_GROUP} entry point failed to load: {errors[kind]})"
    raise ConfigError("recipe.quantizer", kind, fix)


def get_recipe(cfg: RecipeConfig) -> Recipe:
    """The recipe object for ``cfg``, its class chosen by ``cfg.quantizer`` (see the module docstring)."""
    return recipe_class(cfg.quantizer, module=cfg.module)(cfg)


def _load_entry_points() -> None:
    """Import every ``lowbit.recipes`` entry point not registered yet, once per process. A broken
    plug-in is remembered, not raised: it fails the lookup of its own kind only."""
    global _entry_point_errors
    if _entry_point_errors is not None:
        return
    errors: dict[str, str] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in RECIPES:
            continue
        try:
            obj = ep.load()
        except Exception as e:  # a third-party module: any failure, kept for its kind's error
            errors[ep.name] = f"{ep.value}: {type(e).__name__}: {e}"
            continue
        if ep.name in RECIPES:
            continue
        if isinstance(obj, type) and issubclass(obj, Recipe):
            register_recipe(ep.name)(obj)
        else:
            errors[ep.name] = f"{ep.value} registered no kind {ep.name!r} and is not a Recipe class"
    _entry_point_errors = errors


def iter_linears(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            yield name, mod
