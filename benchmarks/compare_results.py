"""Two results folders -> the exact difference of their data tables (exit 0: identical, 1: not).

    python benchmarks/compare_results.py OLD NEW        # two results folders, or two folders of them

Compares samples, cells, history, curves, grad_shares, generated and groups (.csv) with pandas'
`assert_frame_equal(check_exact=True)` (floats parsed round-trip, so equal text is equal bits), and
examples.npz array by array. A table missing on one side and present on the other is a difference.
When both folders hold results folders (each with a fairrecon.json), every results folder of the first is
compared with the one of the same name in the second. Timings, versions and reports are not compared.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

TABLES = ("samples", "cells", "history", "curves", "grad_shares", "generated", "groups")
MARKER = "fairrecon.json"


def read(path: Path) -> pd.DataFrame:
    """A table with every number parsed by Python's float (correctly rounded: equal text, equal bits)."""
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    for column in df.columns:
        try:
            df[column] = [float(v) if v != "" else float("nan") for v in df[column]]
        except ValueError:
            pass  # a text column stays text
    return df


def compare_folder(old: Path, new: Path) -> list[str]:
    """One line per compared item: 'same' or what differs."""
    lines = []
    for name in TABLES:
        a, b = old / f"{name}.csv", new / f"{name}.csv"
        if not a.exists() and not b.exists():
            continue
        if a.exists() != b.exists():
            lines.append(f"DIFF {name}: only in {a.parent if a.exists() else b.parent}")
            continue
        left, right = read(a), read(b)
        try:
            pd.testing.assert_frame_equal(left, right, check_exact=True)
        except AssertionError as e:
            lines.append(f"DIFF {name}: {' '.join(str(e).split())[:300]}")
        else:
            lines.append(f"same {name} ({len(left)} rows x {left.shape[1]} columns)")
    a, b = old / "examples.npz", new / "examples.npz"
    if a.exists() or b.exists():
        if a.exists() != b.exists():
            lines.append("DIFF examples: only on one side")
        else:
            with np.load(a) as x, np.load(b) as y:
                differ = [k for k in sorted(set(x.files) | set(y.files)) if k not in x.files or k not in y.files]
                differ += [k for k in x.files if k in y.files and not np.array_equal(x[k], y[k])]
            lines.append(f"DIFF examples: {', '.join(differ)}" if differ else f"same examples ({len(x.files)} arrays)")
    return lines


def pairs(old: Path, new: Path) -> list[tuple[str, Path, Path]]:
    """(label, old folder, new folder) for each results folder to compare."""
    if (old / MARKER).exists() or (new / MARKER).exists():
        return [(old.name, old, new)]
    names = sorted(p.parent.name for p in old.glob(f"*/{MARKER}"))
    return [(name, old / name, new / name) for name in names]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    args = parser.parse_args()
    found = pairs(args.old, args.new)
    if not found:
        print(f"no results folders (with {MARKER}) in {args.old}", file=sys.stderr)
        return 2
    differ = 0
    for label, old, new in found:
        if not new.is_dir():
            print(f"{label}: DIFF missing in {args.new}")
            differ += 1
            continue
        for line in compare_folder(old, new):
            print(f"{label}: {line}")
            differ += line.startswith("DIFF")
    print(f"{len(found)} results folder(s), {differ} difference(s)")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
