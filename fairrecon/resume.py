"""Per-cell checkpoints, so an interrupted audit picks up where it stopped.

Every finished (loss, seed) cell is written to OUT/cells/ the moment its seed's training
ends, one CSV per table and then a small JSON marker:

  OUT/cells/audit.json                 the spec fields that change results, and their hash
  OUT/cells/<loss>-seed<k>.<table>.csv  samples, cells (one row), history, ... of that cell
  OUT/cells/<loss>-seed<k>.json         written last: the cell is complete (spec hash, tables)

Every file is written atomically (temp file + os.replace), and the marker goes last, so a
crash at any point leaves either a complete cell or one that is trained again. Floats are
saved as float64 (CSV writes them in full, pandas reads them back exactly): a resumed cell's numbers are
bit-identical to the ones it had in memory.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import UserError
from .fileio import atomic_write
from .spec import AuditSpec
from .train import Cell

# Spec fields that do not change the numbers: where results go, whether to download,
# and the device *name* ("auto" and "cpu" on a CPU-only machine are the same run;
# the resolved device type is hashed instead).
NOT_HASHED = ("out", "download", "device")
SPEC_FILE = "audit.json"


def result_fields(spec: AuditSpec, device_type: str) -> dict[str, Any]:
    """The spec fields that decide an audit's numbers, plus the device type they ran on."""
    fields = {k: v for k, v in spec.to_dict().items() if k not in NOT_HASHED}
    fields["device_type"] = device_type
    return fields


def spec_hash(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
    """The checkpoint folder OUT/cells of one audit: which cells are done, and their tables."""

    def __init__(self, out: str | Path, fields: dict[str, Any]):
        self.out = Path(out)
        self.folder = self.out / "cells"
        self.fields = fields
        self.hash = spec_hash(fields)

    def check(self, force: bool = False) -> None:
        """Refuse (one line) an output folder that holds an audit of a different spec, unless forced.

        Reads only: nothing is written until `open`, so a bad input later on damages nothing.
        """
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"output folder {self.out} is an existing file, not a folder; pass another --out")
        old = self._previous_fields()
        if old is None or force or spec_hash(old) == self.hash:
            return
        changed = [f"{k} {old.get(k, '(unset)')!r} -> {self.fields.get(k, '(unset)')!r}"
                   for k in sorted(set(old) | set(self.fields)) if old.get(k) != self.fields.get(k)]
        shown = "; ".join(changed[:3]) + (f"; and {len(changed) - 3} more" if len(changed) > 3 else "")
        raise UserError(f"{self.out} holds an audit with a different spec ({shown}); "
                        "pass another --out folder, or --force to overwrite it")

    def _previous_fields(self) -> dict[str, Any] | None:
        """The result fields of the audit already in `out` (checkpoints, else a finished summary.json)."""
        try:
            meta = self.folder / SPEC_FILE
            if meta.is_file():
                return json.loads(meta.read_text())["fields"]
            summary = self.out / "summary.json"
            if summary.is_file():
                data = json.loads(summary.read_text())
                spec = AuditSpec.from_dict(data["spec"], str(summary))
                return result_fields(spec, str(data.get("info", {}).get("device", "cpu")).split(":")[0])
        except (OSError, ValueError, KeyError, TypeError, UserError) as e:
            raise UserError(f"{self.out}: cannot read the audit already there ({e}); "
                            "pass another --out folder, or --force to overwrite it") from None
        return None

    def open(self) -> None:
        """Create the folder, drop leftovers of a crash or of a different spec, record this spec."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            for tmp in self.folder.glob(".*.tmp"):  # a write that a kill -9 cut short
                tmp.unlink()
            for marker in self.folder.glob("*.json"):
                if marker.name != SPEC_FILE and self._marker(marker).get("spec_hash") != self.hash:
                    self._remove(marker.stem)
            atomic_write(self.folder / SPEC_FILE,
                         json.dumps({"spec_hash": self.hash, "fields": self.fields}, indent=2) + "\n")
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
                tables[table] = pd.read_csv(path, keep_default_na=False,
                                            na_values=[""], dtype={"loss": str, "group": str, "status": str})
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
