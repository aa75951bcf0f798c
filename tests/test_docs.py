"""The documentation says what the code does.

* docs/results-format.md lists exactly the files, columns and keys a results folder holds: a small audit that
  writes every optional file (an image folder with a labels CSV, a VAE, --epochs auto) is compared with the page.
* The command-line reference, rendered as MkDocs renders it (mkdocs-click), has every command and every option.
* Generated parts (docs/hooks.py), README sections the site includes, the nav, and the README's links resolve.
* `mkdocs build --strict` itself runs in CI (.ci/run, before the test command), not here: it needs the docs
  extra and takes seconds of imports; `test_ci_builds_the_docs_strictly_then_runs_the_readme_tests` checks
  that .ci/run does it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import tomllib

import numpy as np
import pandas as pd
import pytest
from conftest import REPO

DOCS = REPO / "docs"
README = (REPO / "README.md").read_text()
TEST_COMMAND = 'python3 -m venv .venv && . .venv/bin/activate && pip install -q -e ".[test]" && python -m pytest'


def load_hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def documented(page: str, text: str | None = None) -> dict[str, list[str]]:
    """Per heading of a page: the first-column names (`name`) of the table rows under it."""
    out: dict[str, list[str]] = {}
    heading = None
    for line in (text if text is not None else (DOCS / page).read_text()).splitlines():
        if m := re.match(r"^#{1,4} (.+)$", line):
            heading = m.group(1).strip()
            out.setdefault(heading, [])
        elif heading and (m := re.match(r"^\| `([^`]+)` \|", line)):
            out[heading].append(m.group(1))
    return out


# --- the results folder --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A results folder with every optional file: 100 digit images as PNGs with a labels CSV, a VAE with
    generation, --epochs auto (a validation split), gradient shares and curves (the defaults)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from fairrecon import runners
    from fairrecon.cli import main

    root = tmp_path_factory.mktemp("format")
    (root / "images").mkdir()
    rows = ["file,group"]
    for i, image in enumerate(load_digits().images[:100]):
        Image.fromarray((image * 255 / 16).astype("uint8")).save(root / "images" / f"d{i:03d}.png")
        rows.append(f"d{i:03d}.png,{'odd' if i % 2 else 'even'}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    args = ["audit", "--dataset", "folder", "--data-root", root / "images", "--labels", root / "labels.csv"]
    args += ["--model", "vae", "--generate", "20", "--epochs", "auto", "--max-epochs", "2", "--seeds", "2"]
    args += ["--losses", "l2", "--hidden", "16", "--latent", "4", "--batch-size", "32", "--device", "cpu"]
    with runners.one_thread(), pytest.raises(SystemExit) as exit_:
        main([str(a) for a in [*args, "--threads", "1", "--quiet", "--out", root / "out"]])
    assert exit_.value.code == 0
    return root / "out"


def test_results_page_lists_every_file_the_code_writes(written):
    from fairrecon.cli import ERROR_LOG

    files = documented("results-format.md")["Files"]
    assert ERROR_LOG in files  # written only after an internal error, so not in this folder
    on_disk = {p.name + ("/" if p.is_dir() else "") for p in written.iterdir()}
    assert on_disk == set(files) - {ERROR_LOG}
    sections = documented("results-format.md")
    for name in files:  # every data file has a section of its own, with its columns or keys
        if name.endswith((".csv", ".json", ".npz", "/")):
            assert sections.get(f"`{name}`"), name


@pytest.mark.parametrize(
    "table",
    [
        "samples.csv",
        "cells.csv",
        "groups.csv",
        "history.csv",
        "curves.csv",
        "grad_shares.csv",
        "generated.csv",
        "split.csv",
    ],
)
def test_results_page_lists_every_column_of_each_table(written, table):
    columns = list(pd.read_csv(written / table, nrows=0).columns)
    assert columns == documented("results-format.md")[f"`{table}`"], f"{table}: update docs/results-format.md"


def test_results_page_lists_every_key_of_the_json_files_and_arrays_of_examples(written):
    from fairrecon.provenance import COLUMNS

    page = documented("results-format.md")
    summary = json.loads((written / "summary.json").read_text())
    assert list(summary) == page["`summary.json`"]
    assert sorted(summary["info"]) == sorted(page["`info`"])
    assert sorted(summary["info"]["timings"]) == sorted(page["`info.timings`"])
    provenance = summary["info"]["provenance"]  # a record per cell, its keys the page's and the checkpoint's
    assert len(provenance) == len(summary["cells"]) and all(
        list(row) == page["`info.provenance`"] for row in provenance
    )
    assert list(COLUMNS) == page["`info.provenance`"]
    assert list(json.loads((written / "fairrecon.json").read_text())) == page["`fairrecon.json`"]
    with np.load(written / "examples.npz", allow_pickle=False) as npz:
        assert sorted(npz.files) == sorted(page["`examples.npz`"])
    # the validation split and its files are there, as the page says
    assert "validation" in set(pd.read_csv(written / "groups.csv")["split"])
    assert "validation" in set(pd.read_csv(written / "split.csv")["split"])


def test_results_page_lists_every_checkpoint_file(written):
    pattern = re.compile(r"^l2-seed(\d)(\..+)$")
    on_disk = {
        ("<loss>-seed<k>" + m.group(2)) if (m := pattern.match(p.name)) else p.name
        for p in (written / "cells").iterdir()
    }
    assert on_disk == set(documented("results-format.md")["`cells/`"])
    for path in (written / "cells").glob("*.provenance.csv"):  # a cell's record of info.provenance
        assert list(pd.read_csv(path, nrows=0).columns) == documented("results-format.md")["`info.provenance`"]


def test_the_page_parser_sees_a_missing_column(written):
    """The checks above would be vacuous if the parser read nothing: without its `kl` row, the page no longer
    matches samples.csv."""
    text = (DOCS / "results-format.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `kl` |"))
    columns = list(pd.read_csv(written / "samples.csv", nrows=0).columns)
    assert documented("results-format.md")["`samples.csv`"] == columns
    assert documented("", text.replace(row + "\n", ""))["`samples.csv`"] == [c for c in columns if c != "kl"]


# --- the command-line reference --------------------------------------------------------------------------------


def test_every_command_and_option_is_in_the_cli_reference():
    """The reference page rendered the way MkDocs renders it: each command's section holds its usage line, the
    first line of its help and every one of its options (so `audit` has --model's vae choices, --beta, --generate)."""
    markdown = pytest.importorskip("markdown")
    pytest.importorskip("mkdocs_click", reason='the docs extra (pip install -e ".[docs]") renders the CLI reference')
    from fairrecon.cli import cli

    html = markdown.markdown((DOCS / "reference" / "cli.md").read_text(), extensions=["mkdocs-click", "toc", "tables"])
    sections = dict(re.findall(r"<h\d[^>]*>(?:fairrecon )?(\w+)</h\d>(.*?)(?=<h\d|\Z)", html, re.S))
    for name, command in cli.commands.items():
        section = sections[name]
        assert f"fairrecon {name} [OPTIONS]" in section
        assert command.help.split("\n")[0].strip() in " ".join(section.split())
        for param in command.params:
            for opt in param.opts if param.param_type_name == "option" else []:
                assert opt in section, f"{name} {opt}"
    assert "vae|conv-vae" in sections["audit"] and "--beta" in sections["audit"] and "--generate" in sections["audit"]


# --- generated parts, snippets, nav, links -------------------------------------------------------------------


def test_spec_table_has_every_field_with_its_default_and_the_example_spec_loads():
    from fairrecon.spec import AuditSpec

    table = load_hooks().spec_fields_table()
    for f in dataclasses.fields(AuditSpec):
        row = next(line for line in table.splitlines() if line.startswith(f"| `{f.name}` |"))
        default = f.default
        shown = "none" if default is None else ",".join(map(str, default)) if isinstance(default, tuple) else default
        assert f"`{str(shown).lower() if isinstance(default, bool) else shown}`" in row, f.name
    page = (DOCS / "reference" / "spec.md").read_text()
    assert "<!-- spec-fields -->" in page
    example = page.split("```toml\n", 1)[1].split("```", 1)[0]
    spec = AuditSpec.from_dict(tomllib.loads(example), "docs/reference/spec.md")
    assert spec.proportions == (0.9, 0.1) and spec.dataset == "mnist"


def test_generated_lists_come_from_the_code_and_every_marker_is_replaced():
    from fairrecon.data import IMAGE_SUFFIXES
    from fairrecon.spec import DATASETS

    hooks = load_hooks()
    assert re.findall(r"`(\w+)`", hooks.image_suffixes()) == [s[1:] for s in IMAGE_SUFFIXES]
    assert re.findall(r"`([\w-]+)`", hooks.dataset_names()) == list(DATASETS)
    used = set()
    for page in DOCS.rglob("*.md"):
        text = page.read_text()
        used |= {m for m in hooks.MARKERS if m in text}
        rendered = hooks.on_page_markdown(text, page=None, config=None, files=None)
        assert not any(m in rendered for m in hooks.MARKERS), page
    assert used == set(hooks.MARKERS)  # each marker is used somewhere, so none is dead code


def test_readme_sections_the_site_includes_exist_and_are_not_empty():
    included = {
        name for page in DOCS.rglob("*.md") for name in re.findall(r'--8<-- "README\.md:(\w+)"', page.read_text())
    }
    assert included >= {"question", "commands", "output", "findings"}
    for name in included:
        body = README.split(f"<!-- --8<-- [start:{name}] -->", 1)[1].split(f"<!-- --8<-- [end:{name}] -->", 1)[0]
        assert len(body.strip()) > 100, name


def test_every_page_is_in_the_nav_and_every_nav_entry_exists():
    config = (REPO / "mkdocs.yml").read_text()
    nav = re.findall(r"^\s+- (?:[^:#\n]+: )?([\w/.-]+\.md)\s*$", config.split("\nnav:", 1)[1], re.M)
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert sorted(nav) == pages


def test_readme_is_short_and_its_links_resolve():
    assert len(README.splitlines()) <= 250
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    assert len(links) > 10
    for link in links:
        assert (REPO / link).exists(), link
    assert TEST_COMMAND in README and "fairrecon audit --out results/default" in README


def test_ci_builds_the_docs_strictly_then_runs_the_readme_tests():
    lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[-1] == TEST_COMMAND
    build = next(i for i, line in enumerate(lines) if "mkdocs build --strict" in line)
    installs_docs = [
        i for i, line in enumerate(lines) if "pip install" in line and "docs" in line.split("pip install")[1]
    ]
    assert installs_docs and installs_docs[0] < build < len(lines) - 1


def test_the_scale_page_runs_exactly_the_benchmark_s_commands():
    """docs/scale.md's measurements name the commands `python benchmarks/scale.py --help` lists, in order, and
    each is a command the script takes."""
    spec = importlib.util.spec_from_file_location("scale_benchmark", REPO / "benchmarks" / "scale.py")
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    listed = [c.strip() for c in re.findall(r"^\s+(python benchmarks/scale\.py .*)$", scale.commands(), re.M)]
    assert len(listed) == 3 and scale.commands() in scale.parser().format_help()
    measurements = (DOCS / "scale.md").read_text().split("## Measurements", 1)[1]
    block = measurements.split("```bash\n", 1)[1].split("```", 1)[0]
    assert [line.split("#")[0].strip() for line in block.splitlines()] == listed
    for command in listed:
        scale.parser().parse_args(command.split()[2:])


def test_contributing_names_the_quick_loop_and_the_docs_build():
    text = (REPO / "CONTRIBUTING.md").read_text()
    assert 'pytest -m "not slow"' in text and "mkdocs build --strict" in text and "## Layers" in text
    assert "Copyright (c) the fairrecon authors" in (REPO / "LICENSE").read_text()
