"""MkDocs hooks: parts of pages generated from the code, so the docs cannot disagree with it.

`<!-- spec-fields -->` in a page becomes the table of every AuditSpec field: its TOML key, its command-line
flag (or "spec file only"), its default and allowed values, and its help text, all read from fairrecon/spec.py
(the one home of defaults). `<!-- image-suffixes -->` becomes the image types an image folder may hold, from
fairrecon/data.py; `<!-- datasets -->` the `--dataset` choices, from fairrecon/spec.py.
"""

from __future__ import annotations

import dataclasses
import re

MARKERS = ("<!-- spec-fields -->", "<!-- image-suffixes -->", "<!-- datasets -->")


def spec_fields_table() -> str:
    """A Markdown table of every AuditSpec field, in the dataclass's order."""
    from fairrecon.spec import AuditSpec

    rows = ["| key | flag | default | meaning |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(AuditSpec):
        meta = f.metadata
        if meta["scope"] == "spec":
            flag = "spec file only"
        elif meta["scope"] == "data":
            flag = f"`--{f.name.replace('_', '-')}` (`audit`, `check --weights`, `split`)"
        else:
            flag = f"`--{f.name.replace('_', '-')}` (`audit`)"
        default = f.default
        shown = "none" if default is None else ",".join(map(str, default)) if isinstance(default, tuple) else default
        shown = f"`{str(shown).lower() if isinstance(default, bool) else shown}`"
        if meta["choices"]:
            shown += "; one of " + ", ".join(f"`{c}`" for c in meta["choices"])
        text = re.sub(r"\s+", " ", meta["help"]).replace("|", "\\|")
        rows.append(f"| `{f.name}` | {flag} | {shown} | {text} |")
    return "\n".join(rows)


def image_suffixes() -> str:
    """The image types `--dataset folder` reads, as the code lists them."""
    from fairrecon.data import IMAGE_SUFFIXES

    return ", ".join(f"`{s[1:]}`" for s in IMAGE_SUFFIXES)


def dataset_names() -> str:
    """The `--dataset` choices, as the spec lists them."""
    from fairrecon.spec import DATASETS

    return ", ".join(f"`{d}`" for d in DATASETS)


def on_page_markdown(markdown: str, **kwargs) -> str:
    """Replace each marker with the text generated from the code."""
    return (
        markdown.replace(MARKERS[0], spec_fields_table())
        .replace(MARKERS[1], image_suffixes())
        .replace(MARKERS[2], dataset_names())
    )
