"""The layer order CONTRIBUTING.md states ("## Layers") is the one the code follows: each module imports only
from modules listed before it (imports inside functions count too)."""

from __future__ import annotations

import ast
import re

from conftest import REPO

PACKAGE = REPO / "fairrecon"


def layer_order() -> list[str]:
    text = (REPO / "CONTRIBUTING.md").read_text()
    block = text.split("## Layers", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    return [m.group(1) for m in re.finditer(r"^(\w+)\.py\b", block, re.M)]


def fairrecon_imports(path) -> set[str]:
    """Modules of the package that `path` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:  # from . import stats
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fairrecon."):
            found.add(node.module.split(".")[1])
    return found


def test_every_module_is_listed_once():
    order = layer_order()
    modules = sorted(p.stem for p in PACKAGE.glob("*.py") if not p.stem.startswith("__"))
    assert sorted(order) == modules and len(set(order)) == len(order)


def test_modules_import_only_from_earlier_layers():
    order = layer_order()
    rank = {name: i for i, name in enumerate(order)}
    upward = [
        f"{name} imports {dep}"
        for name in order
        for dep in sorted(fairrecon_imports(PACKAGE / f"{name}.py"))
        if rank.get(dep, -1) >= rank[name]
    ]
    assert not upward, "imports against the layer order: " + "; ".join(upward)


def test_the_checker_sees_function_level_imports(tmp_path):
    """The check would be vacuous if it missed imports inside functions: it does not."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from .stats import analyse\n    from . import gate\n")
    assert fairrecon_imports(module) == {"stats", "gate"}
