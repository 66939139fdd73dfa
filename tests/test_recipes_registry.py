"""The recipe registry: keyed by kind (``recipe.quantizer``), open to kinds from outside the tree.

Plug-ins are real: a module on ``sys.path`` named by ``recipe.module``, and a minimal installed
distribution (a ``.dist-info`` directory with ``entry_points.txt``) found by
``importlib.metadata`` itself. Each test unregisters what it added.
"""

from __future__ import annotations

import ast
import sys
import textwrap
from pathlib import Path

import pytest

import recipes.base as base
from recipes.base import (
    ENTRY_POINT_GROUP,
    Recipe,
    get_recipe,
    known_kinds,
    register_recipe,
    unregister_recipe,
)
from recipes.config import RecipeConfig
from recipes.errors import ConfigError
from recipes.plain import PlainRecipe
from recipes.quantized import QuantizedRecipe

ROOT = Path(__file__).resolve().parents[1]
BUILTIN = {"none", "mx", "nvfp4", "fp8_delayed", "fp8_current", "fp8_rowwise", "fp8_block"}

PLUGIN = '''
from recipes.base import register_recipe
from recipes.plain import PlainRecipe


@register_recipe("my_kind")
class MyRecipe(PlainRecipe):
    """A user's recipe kind, registered by importing this module."""
'''


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """A directory on sys.path; the modules and kinds a test adds are removed afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(base, "_entry_point_errors", None)  # entry points load again, then restored
    before_mods, before_kinds = set(sys.modules), set(base.RECIPES)
    yield tmp_path
    unregister_recipe(*(set(base.RECIPES) - before_kinds))
    for name in set(sys.modules) - before_mods:
        if name.startswith("lowbit_test_"):
            del sys.modules[name]


def test_builtin_kinds_and_name_is_a_label():
    assert BUILTIN <= set(known_kinds())
    assert type(get_recipe(RecipeConfig())) is PlainRecipe
    rec = get_recipe(RecipeConfig(name="my label", quantizer="fp8_current", input_format="fp8_e4m3"))
    assert isinstance(rec, QuantizedRecipe) and rec.name == "my label"


def test_unknown_kind_is_a_config_error_listing_the_kinds():
    with pytest.raises(ConfigError) as e:
        get_recipe(RecipeConfig(quantizer="int3"))
    assert e.value.key == "recipe.quantizer" and e.value.value == "int3"
    assert e.value.fix.startswith("use one of: ") and all(k in e.value.fix for k in BUILTIN)


def test_a_kind_registers_once():
    with pytest.raises(KeyError, match="registered twice"):
        register_recipe("mx")(type("Other", (Recipe,), {}))
    assert base.RECIPES["mx"] is QuantizedRecipe


def test_resolve_records_the_backend_and_returns_the_note():
    rec = get_recipe(RecipeConfig(name="mxfp8_e4m3", quantizer="mx", input_format="fp8_e4m3", block_size=32))
    assert rec.resolve_backend("cpu")[0] == "emulated" and rec.backend is None  # the old call: no side effect
    note = rec.resolve("cpu")
    assert rec.backend == "emulated" and note == (
        "recipe.backend=auto resolved to 'emulated' on cpu (no hardware backend for mxfp8_e4m3)"
    )
    plain = get_recipe(RecipeConfig())
    assert plain.resolve("cpu") is None and plain.backend == "native"


def test_recipe_module_registers_a_kind_from_outside_the_tree(plugin_dir):
    (plugin_dir / "lowbit_test_my_recipes.py").write_text(PLUGIN)
    cfg = RecipeConfig(name="mine", quantizer="my_kind", module="lowbit_test_my_recipes")
    rec = get_recipe(cfg)
    assert type(rec).__name__ == "MyRecipe" and isinstance(rec, PlainRecipe) and rec.name == "mine"
    assert "my_kind" in known_kinds()


def test_recipe_module_errors_name_the_key(plugin_dir):
    with pytest.raises(ConfigError) as e:
        get_recipe(RecipeConfig(quantizer="my_kind", module="lowbit_test_no_such_module"))
    assert e.value.key == "recipe.module" and "ModuleNotFoundError" in e.value.fix
    (plugin_dir / "lowbit_test_empty.py").write_text("")
    with pytest.raises(ConfigError) as e:
        get_recipe(RecipeConfig(quantizer="my_kind", module="lowbit_test_empty"))
    assert e.value.key == "recipe.quantizer" and "registered no kind 'my_kind'" in e.value.fix


def _install_dist(root: Path, name: str, entry_points: str) -> None:
    """A minimal installed distribution: what ``pip install`` leaves in site-packages."""
    info = root / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{textwrap.dedent(entry_points)}")


def test_entry_points_register_kinds_lazily_once(plugin_dir):
    (plugin_dir / "lowbit_test_ep_recipes.py").write_text(
        "from recipes.plain import PlainRecipe\n\n\nclass EPRecipe(PlainRecipe):\n    pass\n"
    )
    _install_dist(
        plugin_dir,
        "lowbit_test_plugin",
        """\
        ep_kind = lowbit_test_ep_recipes:EPRecipe
        broken_kind = lowbit_test_missing_module:Nothing
        """,
    )
    get_recipe(RecipeConfig(quantizer="mx", input_format="fp8_e4m3", block_size=32))
    assert "lowbit_test_ep_recipes" not in sys.modules, "a known kind loads no entry point"
    rec = get_recipe(RecipeConfig(quantizer="ep_kind"))
    assert type(rec).__name__ == "EPRecipe" and base.RECIPES["ep_kind"] is type(rec)
    with pytest.raises(ConfigError) as e:
        get_recipe(RecipeConfig(quantizer="broken_kind"))
    assert e.value.key == "recipe.quantizer" and "entry point failed to load" in e.value.fix
    assert "lowbit_test_missing_module" in e.value.fix
    # loaded once: a distribution installed afterwards is not seen by this process
    (plugin_dir / "later").mkdir()
    _install_dist(plugin_dir / "later", "lowbit_test_later", "later_kind = lowbit_test_ep_recipes:EPRecipe\n")
    sys.path.insert(0, str(plugin_dir / "later"))
    try:
        with pytest.raises(ConfigError):
            get_recipe(RecipeConfig(quantizer="later_kind"))
    finally:
        sys.path.remove(str(plugin_dir / "later"))


def test_recipes_never_import_train():
    for path in sorted((ROOT / "recipes").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not any(n == "train" or n.startswith("train.") for n in names), path


def test_user_kind_trains_through_the_entry_point_with_recipe_module(tmp_path):
    """End to end: ``python train/run.py recipe.module=PKG recipe.quantizer=KIND`` with the user's
    module on PYTHONPATH, and no edit of lowbit; a module that does not import is one line, exit 2."""
    import os

    from .conftest import run_lowbit

    (tmp_path / "lowbit_test_user_recipes.py").write_text(PLUGIN.replace("my_kind", "user_kind"))
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    args = ["recipe.module=lowbit_test_user_recipes", "recipe.quantizer=user_kind", "recipe.name=users_own",
            "trainer.max_steps=2", "trainer.log_every=1", "trainer.eval_sequences=8", "logger=none"]  # fmt: skip
    res = run_lowbit(args, run_dir=tmp_path / "run", env=env)
    assert "recipe users_own (bf16, backend native)" in res.proc.stdout
    rec = res.run_config["config"]["recipe"]
    assert rec["quantizer"] == "user_kind" and rec["module"] == "lowbit_test_user_recipes"
    assert [m["step"] for m in res.metrics] == [1, 2]

    bad = run_lowbit([*args[1:], "recipe.module=lowbit_test_missing"], run_dir=tmp_path / "bad", env=env,
                     check=False)  # fmt: skip
    assert bad.proc.returncode == 2
    lines = [line for line in bad.proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lowbit: config error: recipe.module=lowbit_test_missing:")
