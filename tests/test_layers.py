"""The import contracts in pyproject.toml ([tool.importlinter]) hold, and the checker is not vacuous.

`lint-imports` (import-linter) checks them in .ci/run; these tests check them under `python -m pytest` too.
The layer order: each module imports only from the modules listed below it, and every module of the
package is listed. Since `stats` imports nothing that imports torch, reading and analysing results
needs no torch.
"""

from __future__ import annotations

import re
import textwrap
import tomllib
from pathlib import Path

import pytest
from conftest import REPO
from importlinter.cli import lint_imports

PYPROJECT = str(REPO / "pyproject.toml")


def test_the_layer_order_holds_and_lists_every_module(capsys):
    code = lint_imports(PYPROJECT, limit_to_contracts=("layers",), no_cache=True, no_logo=True)
    assert code == 0, capsys.readouterr().out


def test_contributing_states_the_contract_s_layer_order():
    """CONTRIBUTING.md's "## Layers" block (lowest first) is the contract's order (highest first), so the
    guide a newcomer reads cannot drift from what CI checks."""
    text = (REPO / "CONTRIBUTING.md").read_text()
    block = text.split("## Layers", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    stated = [m.group(1) for m in re.finditer(r"^(\w+)\.py\b", block, re.M)]
    contract = next(
        c
        for c in tomllib.loads(Path(PYPROJECT).read_text())["tool"]["importlinter"]["contracts"]
        if c["id"] == "layers"
    )
    layers = [name for layer in reversed(contract["layers"]) for name in layer.split(" | ")]
    assert stated == layers


def test_stats_imports_nothing_that_imports_torch(capsys):
    code = lint_imports(PYPROJECT, limit_to_contracts=("stats-without-torch",), no_cache=True, no_logo=True)
    assert code == 0, capsys.readouterr().out


def _package(root, modules: dict[str, str], layers: list[str]) -> str:
    """A package `layered` with the given modules, and a pyproject.toml with its exhaustive layers contract."""
    (root / "layered").mkdir()
    (root / "layered" / "__init__.py").write_text("")
    for name, source in modules.items():
        (root / "layered" / f"{name}.py").write_text(textwrap.dedent(source))
    config = root / "pyproject.toml"
    config.write_text(
        '[tool.importlinter]\nroot_package = "layered"\n\n[[tool.importlinter.contracts]]\nid = "layers"\n'
        f'name = "layers"\ntype = "layers"\ncontainers = ["layered"]\nexhaustive = true\nlayers = {layers!r}\n'
    )
    return str(config)


@pytest.mark.parametrize(
    "modules, broken",
    [
        ({"top": "from . import bottom\n", "bottom": ""}, False),
        ({"top": "", "bottom": "def f():\n    from .top import g\n"}, True),  # upward, inside a function
        ({"top": "from . import bottom\n", "bottom": "", "middle": ""}, True),
    ],
    ids=["downward", "upward inside a function", "a module left out of the layers"],
)
def test_the_checker_sees_function_level_imports_and_unlisted_modules(tmp_path, monkeypatch, capsys, modules, broken):
    """The contract would be vacuous if it missed imports inside functions or modules nobody listed: it does not."""
    monkeypatch.syspath_prepend(str(tmp_path))
    config = _package(tmp_path, modules, ["top", "bottom"])
    code = lint_imports(config, no_cache=True, no_logo=True)
    assert code == (1 if broken else 0), capsys.readouterr().out
