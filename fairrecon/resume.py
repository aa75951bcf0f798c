"""Per-cell checkpoints, so an interrupted audit picks up where it stopped.

Every finished (loss, seed) cell is written to OUT/cells/ the moment its seed's training
ends, one CSV per table and then a small JSON marker (the audit's identity, spec and inputs, is
in OUT/fairrecon.json: see resultsdir.py):

  OUT/cells/<loss>-seed<k>.<table>.csv  samples, cells (one row), history, ... of that cell
  OUT/cells/<loss>-seed<k>.json         written last: the cell is complete (identity hash, tables)
  OUT/cells/examples.npz                seed 0's example reconstructions, for the report

Every file is written atomically (temp file + os.replace), and the marker goes last, so a
crash at any point leaves either a complete cell or one that is trained again. Floats are
saved as float64 (CSV writes them in full, pandas reads them back exactly): a resumed cell's numbers are
bit-identical to the ones it had in memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import UserError
from .fileio import atomic_write
from .grid import Cell
from .resultsdir import Identity, claim, result_fields, spec_hash  # noqa: F401  (result_fields: re-exported)

# Columns read back as text whatever they hold (a loss named "1", a host named "42", torch "2.10")
TEXT_COLUMNS = {
    name: str
    for name in ("loss", "group", "status", "host", "device", "device_name", "torch", "fairrecon", "python", "executor")
}
LEGACY_SPEC_FILE = "audit.json"  # an older fairrecon's record of the spec; the marker OUT/fairrecon.json replaced it


def cell_name(cell: Cell) -> str:
    """'learned-sigma-seed2', 'mix_0.5-seed0': a file name, one per cell, whatever the loss is called.

    Lowercase letters, digits, '.' and '-' are kept, the family colon becomes '_', and any other
    character becomes '+' and its UTF-8 bytes in hex ('A' -> '+41', '_' -> '+5f'). Each code starts
    with a different character, so two loss names never share a file name, not even on a
    case-insensitive file system (the result has no capitals); the seed is the digits after the
    last '-seed'.
    """

    def code(ch: str) -> str:
        if ch.isascii() and (ch.islower() or ch.isdigit() or ch in ".-"):
            return ch
        return "_" if ch == ":" else "".join(f"+{byte:02x}" for byte in ch.encode())

    return f"{''.join(map(code, cell.loss))}-seed{cell.seed}"


class CellStore:
    """The checkpoint folder OUT/cells of one audit: which cells are done, and their tables.

    A cell counts as done only when its marker carries this audit's identity hash (spec and inputs),
    so a cell of a changed spec or changed inputs is never reused.
    """

    def __init__(self, out: str | Path, identity: Identity):
        self.out = Path(out)
        self.folder = self.out / "cells"
        self.identity = identity
        self.hash = identity.hash

    def open(self) -> None:
        """Mark OUT as this audit's (the marker first), drop leftovers of a crash or of another identity."""
        claim(self.out, self.identity)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            for tmp in self.folder.glob(".*.tmp"):  # a write that a kill -9 cut short
                tmp.unlink()
            (self.folder / LEGACY_SPEC_FILE).unlink(missing_ok=True)
            for marker in self.folder.glob("*.json"):
                if self._marker(marker).get("spec_hash") != self.hash:
                    self._remove(marker.stem)
        except OSError as e:
            raise UserError(f"cannot write to output folder {self.out}: {e.strerror or e}") from None

    def done(self, cell: Cell) -> bool:
        """True when the cell was finished under this very spec."""
        return self._marker(self.folder / f"{cell_name(cell)}.json").get("spec_hash") == self.hash

    def save(self, cell: Cell, tables: dict[str, pd.DataFrame]) -> None:
        """Write a finished cell: every table, then the marker that says it is complete."""
        name = cell_name(cell)
        try:
            for table, df in tables.items():
                atomic_write(self.folder / f"{name}.{table}.csv", df.to_csv(index=False))
            marker = {"loss": cell.loss, "seed": cell.seed, "spec_hash": self.hash, "tables": sorted(tables)}
            atomic_write(self.folder / f"{name}.json", json.dumps(marker) + "\n")
        except OSError as e:
            raise UserError(f"cannot write to output folder {self.out}: {e.strerror or e}") from None

    def load(self, cell: Cell) -> dict[str, pd.DataFrame]:
        """The tables of a finished cell, exactly as they were saved."""
        name = cell_name(cell)
        tables = {}
        for table in self._marker(self.folder / f"{name}.json")["tables"]:
            path = self.folder / f"{name}.{table}.csv"
            try:
                tables[table] = pd.read_csv(path, keep_default_na=False, na_values=[""], dtype=TEXT_COLUMNS)
            except (OSError, ValueError) as e:
                raise UserError(f"{path}: cannot read checkpoint ({e}); delete it to train that cell again") from None
        return tables

    def _marker(self, path: Path) -> dict[str, Any]:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    def _remove(self, stem: str) -> None:
        (self.folder / f"{stem}.json").unlink(missing_ok=True)  # marker first: a half-removed cell is never 'done'
        for path in self.folder.glob(f"{stem}.*.csv"):
            path.unlink()
