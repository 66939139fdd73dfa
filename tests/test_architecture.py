"""The layout rules the architecture issue set, checked on the source (no training).

* ``train/`` names no quantizer kind and no element format: the recipe answers what the
  trainer needs (``Recipe.grad_format``, ``Recipe.gemm_family``), so a new kind or format
  edits ``recipes/`` and ``conf/`` only;
* ``train_loop`` is the step order: no metric key, no timing call, no ``isinstance``;
* no import cycle among the project's modules;
* no module inside ``train/`` or ``recipes/`` is named after an installed top-level package
  or a standard-library module (``python train/run.py`` puts ``train/`` first on sys.path);
* no source file over 400 lines.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("train", "recipes")


def sources(*packages: str) -> list[Path]:
    return sorted(p for pkg in packages for p in (ROOT / pkg).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def recipe_vocabulary() -> set[str]:
    """Quantizer kinds (from the presets, which are data) and element / format names."""
    from recipes.config import GEMM_FAMILIES, PRECISIONS
    from recipes.fp8 import FP8_FORMATS
    from recipes.mx import FORMATS
    from recipes.numerics import FORMAT_SPECS

    kinds = {
        yaml.safe_load(p.read_text()).get("quantizer") for p in (ROOT / "conf" / "recipe").glob("*.yaml")
    }
    words = {k for k in kinds if k} | set(FORMATS) | set(FP8_FORMATS) | set(FORMAT_SPECS)
    # engine precisions and GEMM rate classes are the trainer's own words (DeepSpeed, peak tables)
    return words - set(PRECISIONS) - set(GEMM_FAMILIES) - {"none"}


def string_constants(tree: ast.AST) -> list[tuple[int, str]]:
    """Every string literal that is code, not documentation (docstrings and field docstrings,
    i.e. bare string statements, are left out), with its line."""
    docs = {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs
    ]


def test_vocabulary_is_not_empty():
    vocab = recipe_vocabulary()
    assert {"mx", "nvfp4", "fp8_delayed", "fp8_e4m3", "fp4_e2m1", "mxfp8_e4m3", "e5m2"} <= vocab, vocab


def test_train_names_no_quantizer_kind_or_element_format():
    vocab = recipe_vocabulary()
    found = []
    for path in sources("train"):
        for line, text in string_constants(ast.parse(path.read_text())):
            hits = set(re.findall(r"[A-Za-z0-9_]+", text)) & vocab
            if hits:
                found.append(f"{path.relative_to(ROOT)}:{line}: {sorted(hits)} in {text!r}")
    assert not found, "train/ decodes recipe vocabulary; ask the recipe instead:\n" + "\n".join(found)


def _function(path: Path, name: str) -> ast.FunctionDef:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise AssertionError(f"no {name} in {path}")


def test_train_loop_is_only_the_step_order():
    fn = _function(ROOT / "train" / "loop.py", "train_loop")
    problems = []
    for node in ast.walk(fn):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node is not fn.body[0]:
            problems.append(f"line {node.lineno}: string {node.value!r} (metric keys belong to telemetry)")
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            if name == "isinstance" or owner == "time" or name in ("perf_counter", "monotonic", "time"):
                problems.append(f"line {node.lineno}: call {owner + '.' if owner else ''}{name}")
    assert not problems, problems
    length = fn.end_lineno - fn.lineno + 1
    assert length <= 35, f"train_loop is {length} lines; keep it the step order (~35)"


def _imports(path: Path, known: set[str]) -> set[str]:
    """Project modules ``path`` imports (anywhere, except under ``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    me = module_name(path)
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                pkg = me.split(".")[: -node.level] if not path.name == "__init__.py" else me.split(".")
                base = ".".join(pkg + ([base] if base else []))
            for a in node.names:
                if f"{base}.{a.name}" in known:
                    out.add(f"{base}.{a.name}")
                elif base in known:
                    out.add(base)
    return out - {me}


def test_no_import_cycle():
    files = sources(*PACKAGES)
    known = {module_name(p) for p in files}
    graph = {module_name(p): _imports(p, known) for p in files}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep) :] + [dep] if dep in stack else [node, dep])
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = "done"

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])
    # a package's __init__ importing its own submodules is how a package face works, not a cycle
    real = [
        c for c in cycles if not any(a.startswith(b + ".") or b.startswith(a + ".") for a, b in zip(c, c[1:]))
    ]
    assert not real, "import cycles:\n" + "\n".join(" -> ".join(c) for c in real)


def test_no_module_named_after_an_installed_or_stdlib_package():
    installed = {name.lower() for name in importlib.metadata.packages_distributions()}
    taken = installed | set(sys.stdlib_module_names)
    clashes = []
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*"):
            name = path.stem if path.suffix == ".py" else path.name if path.is_dir() else None
            if name and name not in ("__init__", "__pycache__") and name.lower() in taken - set(PACKAGES):
                clashes.append(str(path.relative_to(ROOT)))
    assert not clashes, f"modules shadowing installed or stdlib packages: {clashes}"


def test_no_source_file_over_400_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for p in sources(*PACKAGES)
        if (n := len(p.read_text().splitlines())) > 400
    }
    assert not long, long
