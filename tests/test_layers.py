"""The package's layers point only downward: no module imports a module of a higher layer.

Lowest first:
  0  pillsnap/_lazy.py, config/, utils/            (plain helpers, no model code)
  1  data/, models/, metrics/                      (data and models must not import each other)
  2  engine/                                       (training)
  3  infer/                                        (the pipeline over trained checkpoints, and the files fit for it)
  4  eval/                                         (measures the models and the pipeline: runs infer, never run by it)
  5  serve/, monitor/, demo.py, train.py, cli.py   (entry points)

No two packages may import each other either, even on one layer (data and models, say): a cycle between
packages makes both one unit that can only be understood, tested and changed together.

Every import counts, wherever it is written: module level, inside functions (lazy imports), under
TYPE_CHECKING, `importlib.import_module("pillsnap....")` with a literal name, and the module names in the
lazy-export tables (`_EXPORTS`) of package `__init__` files, which import on first attribute access.
The source is parsed, never imported, so this test needs neither torch nor ultralytics.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "pillsnap"

# Module name prefix -> (layer, group). The longest matching prefix wins.
LAYERS: dict[str, tuple[int, str]] = {
    "pillsnap": (0, "root"),  # the bare package: only __version__
    "pillsnap._lazy": (0, "_lazy"),
    "pillsnap.config": (0, "config"),
    "pillsnap.utils": (0, "utils"),
    "pillsnap.data": (1, "data"),
    "pillsnap.models": (1, "models"),
    "pillsnap.metrics": (1, "metrics"),
    "pillsnap.engine": (2, "engine"),
    "pillsnap.infer": (3, "infer"),
    "pillsnap.eval": (4, "eval"),
    "pillsnap.serve": (5, "serve"),
    "pillsnap.monitor": (5, "monitor"),
    "pillsnap.demo": (5, "demo"),
    "pillsnap.train": (5, "train"),
    "pillsnap.cli": (5, "cli"),
    "pillsnap.__main__": (5, "cli"),  # `python -m pillsnap` runs the command line
}
# Same-layer groups that must still not import each other (either direction).
FORBIDDEN_PAIRS = {("data", "models"), ("models", "data")}


def layer_of(module: str) -> tuple[int, str] | None:
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        found = LAYERS.get(".".join(parts[:end]))
        if found is not None and (end > 1 or len(parts) == 1):
            return found
    return None


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE_DIR.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> list[Path]:
    return sorted(PACKAGE_DIR.rglob("*.py"))


def _resolve_relative(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _export_table_strings(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, module name) for each "pillsnap..." string in a dict literal of an __init__ (the lazy-export tables)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for value in [*node.keys, *node.values]:
                for const in ast.walk(value) if value is not None else ():
                    if (isinstance(const, ast.Constant) and isinstance(const.value, str)
                            and const.value.startswith("pillsnap.") and " " not in const.value):
                        found.append((const.lineno, const.value))
    return found


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, pillsnap module) for every pillsnap import the file makes, wherever it is written."""
    module = module_name(path)
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve_relative(node, module, is_package)
            for alias in node.names:
                # `from pillsnap import data` imports the subpackage pillsnap.data, not just `pillsnap`.
                candidate = f"{source}.{alias.name}"
                found.append((node.lineno, candidate if _exists(candidate) else source))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (getattr(node.func, "attr", None) == "import_module" or getattr(node.func, "id", None)
                   in ("import_module", "__import__"))):
            found.append((node.lineno, node.args[0].value))
    if is_package:
        found += _export_table_strings(tree)
    return [(line, name) for line, name in found if name == "pillsnap" or name.startswith("pillsnap.")]


def _exists(module: str) -> bool:
    rel = Path(*module.split("."))
    root = PACKAGE_DIR.parent
    return (root / rel).with_suffix(".py").is_file() or (root / rel / "__init__.py").is_file()


def _describe(module: str) -> str:
    layer, group = layer_of(module) or (None, "?")
    return f"{module} (L{layer} {group})"


def test_every_module_has_a_layer() -> None:
    unplaced = [module_name(p) for p in package_modules() if layer_of(module_name(p)) is None]
    assert not unplaced, "modules with no layer in tests/test_layers.py LAYERS: " + ", ".join(unplaced)


def test_imports_point_only_downward() -> None:
    offenders = []
    for path in package_modules():
        module = module_name(path)
        own_layer, own_group = layer_of(module)
        for line, target in imported_modules(path):
            found = layer_of(target)
            if found is None:
                offenders.append(f"{path.relative_to(PACKAGE_DIR.parent)}:{line}: {module} imports {target}, "
                                 f"which has no layer")
                continue
            layer, group = found
            if layer > own_layer or (own_group, group) in FORBIDDEN_PAIRS:
                offenders.append(f"{path.relative_to(PACKAGE_DIR.parent)}:{line}: {_describe(module)} imports "
                                 f"{_describe(target)}")
    assert not offenders, f"{len(offenders)} import(s) against the layers:\n  " + "\n  ".join(sorted(set(offenders)))


@pytest.mark.parametrize(("source", "expected"), [
    ("from pillsnap.eval.metrics import f\n", ["pillsnap.eval.metrics"]),
    ("def f():\n    from pillsnap.models.detector import g\n", ["pillsnap.models.detector"]),
    ("import pillsnap.engine.trainer as t\n", ["pillsnap.engine.trainer"]),
    ("from pillsnap import serve\n", ["pillsnap.serve"]),
    ("import importlib\nimportlib.import_module('pillsnap.infer.pipeline')\n", ["pillsnap.infer.pipeline"]),
    ("from pillsnap import __version__\n", ["pillsnap"]),
    ("from .. import serve\n", ["pillsnap.serve"]),
    ("import numpy\nfrom os import path\n", []),
])
def test_import_finder_sees_every_form(tmp_path, monkeypatch, source, expected) -> None:
    fake = tmp_path / "pillsnap"
    (fake / "data").mkdir(parents=True)
    (fake / "serve").mkdir()
    (fake / "serve" / "__init__.py").write_text("")
    path = fake / "data" / "probe.py"
    path.write_text(source)
    monkeypatch.setitem(globals(), "PACKAGE_DIR", fake)
    assert [name for _, name in imported_modules(path)] == expected


def test_export_tables_count_as_imports(tmp_path, monkeypatch) -> None:
    fake = tmp_path / "pillsnap" / "utils"
    fake.mkdir(parents=True)
    init = fake / "__init__.py"
    init.write_text('_EXPORTS = {"read_image": "pillsnap.data.datasets", "pillsnap.utils.io": ("x",)}\n')
    monkeypatch.setitem(globals(), "PACKAGE_DIR", tmp_path / "pillsnap")
    assert sorted(name for _, name in imported_modules(init)) == ["pillsnap.data.datasets", "pillsnap.utils.io"]


def package_graph(paths: list[Path]) -> dict[str, set[str]]:
    """Group -> the other groups it imports (the top-level package or module under pillsnap)."""
    graph: dict[str, set[str]] = {}
    for path in paths:
        _, own = layer_of(module_name(path))
        targets = {layer_of(target) for _, target in imported_modules(path)}
        graph.setdefault(own, set()).update(group for _, group in filter(None, targets) if group != own)
    return graph


def package_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle between groups, each once, as the path that closes it (depth-first from each group)."""
    cycles: set[tuple[str, ...]] = set()

    def walk(path: list[str]) -> None:
        for nxt in sorted(graph.get(path[-1], ())):
            if nxt == path[0]:
                start = path.index(min(path))
                cycles.add(tuple(path[start:] + path[:start]))
            elif nxt not in path:
                walk([*path, nxt])

    for group in sorted(graph):
        walk([group])
    return [[*cycle, cycle[0]] for cycle in sorted(cycles)]


def test_no_cycle_between_packages() -> None:
    cycles = package_cycles(package_graph(package_modules()))
    assert not cycles, "packages that import each other: " + "; ".join(" -> ".join(c) for c in cycles)


def test_cycle_finder_sees_a_cycle_through_three_packages() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert package_cycles(graph) == [["a", "b", "c", "a"]]
    assert package_cycles({"a": {"b"}, "b": set()}) == []
