"""An audit's results: tidy DataFrames, and how they are saved to and read from a folder.

Files in a results folder (all written atomically: a crash never leaves half a file):
  samples.csv   one row per (loss, seed, test image): loss, seed, group, index, mse, mae, psnr
  cells.csv     one row per (loss, seed): status, learned sigma, training MSE and NLL
  groups.csv    measured brightness and contrast per split and group
  history.csv   training NLL and MSE per cell and epoch
  grad_shares.csv  (when grad_points > 0) per snapshot, cell and group: who drives the updates (gradshare.py)
  summary.json  spec, versions, per-(loss, group) means over seeds, the above in brief, timings
  examples.npz  a few test images per group with each loss's reconstruction (uint8), for the report
  report.md     a short table for pull requests (report.html: written by `fairrecon audit --out` / `report`)
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import UserError
from .gradshare import share_summary
from .spec import AuditSpec

METRICS = ("mse", "mae", "psnr")
TABLES = ("samples", "cells", "groups", "history")
EXAMPLES_FILE = "examples.npz"


@dataclass
class AuditResult:
    spec: AuditSpec
    samples: pd.DataFrame
    cells: pd.DataFrame
    groups: pd.DataFrame
    history: pd.DataFrame
    info: dict[str, Any] = field(default_factory=dict)  # versions, device, timings
    examples: dict[str, np.ndarray] | None = None  # measure.example_reconstructions; None when not kept
    grad_shares: pd.DataFrame | None = None  # gradient shares per snapshot, cell and group (optional)

    @property
    def ok_samples(self) -> pd.DataFrame:
        """Per-sample rows of the cells that trained without failing."""
        ok = self.cells.loc[self.cells["status"] == "ok", ["loss", "seed"]]
        return self.samples.merge(ok, on=["loss", "seed"])

    def by_cell_group(self) -> pd.DataFrame:
        """One row per (loss, seed, group): n and mean of each metric over the group's test images."""
        df = self.ok_samples
        out = df.groupby(["loss", "seed", "group"], observed=True, sort=False)[list(METRICS)].mean()
        out.insert(0, "n", df.groupby(["loss", "seed", "group"], observed=True, sort=False).size())
        return out.reset_index()

    def by_group(self) -> pd.DataFrame:
        """One row per (loss, group): each metric's mean over seeds of the per-seed group means, and its spread."""
        cg = self.by_cell_group()
        agg = cg.groupby(["loss", "group"], observed=True, sort=False).agg(
            n=("n", "first"), seeds=("seed", "nunique"),
            **{m: (m, "mean") for m in METRICS}, **{f"{m}_seed_std": (m, "std") for m in METRICS})
        return agg.reset_index()

    def summary(self) -> dict[str, Any]:
        extra = {"grad_shares": _records(share_summary(self.grad_shares))} if self.grad_shares is not None else {}
        return {
            "fairrecon_version": self.info.get("fairrecon_version"),
            "spec": self.spec.to_dict(),
            "info": {k: v for k, v in self.info.items() if k != "fairrecon_version"},
            "groups": _records(self.groups),
            "cells": _records(self.cells),
            "by_group": _records(self.by_group()),
            "disparities": self._disparities(),
            **extra,
        }

    def _disparities(self) -> list[dict[str, Any]] | dict[str, str]:
        """stats.disparities (MSE, raw gaps) as records; imported here, as stats comes after results."""
        from .stats import disparities

        try:
            return _records(disparities(self))
        except UserError as e:
            return {"error": str(e)}

    def save(self, out: str | Path) -> Path:
        """Write every table, summary.json and report.md into `out` (created if needed)."""
        from .report import markdown_report

        out = Path(out)
        try:
            out.mkdir(parents=True, exist_ok=True)
            for name in TABLES:
                atomic_write(out / f"{name}.csv", getattr(self, name).to_csv(index=False))
            if self.grad_shares is not None:
                atomic_write(out / "grad_shares.csv", self.grad_shares.to_csv(index=False))
            atomic_write(out / "summary.json", json.dumps(self.summary(), indent=2, default=_json_default) + "\n")
            if self.examples is not None:
                atomic_write_bytes(out / EXAMPLES_FILE, npz_bytes(self.examples))
            atomic_write(out / "report.md", markdown_report(self))
        except OSError as e:
            raise UserError(f"cannot write results to {out}: {e.strerror or e}") from None
        return out

    @classmethod
    def load(cls, folder: str | Path) -> "AuditResult":
        """Read a results folder written by `save`."""
        folder = Path(folder)
        try:
            summary = json.loads((folder / "summary.json").read_text())
            tables = {name: pd.read_csv(folder / f"{name}.csv") for name in TABLES}
        except FileNotFoundError as e:
            raise UserError(f"{folder}: not a fairrecon results folder ({Path(e.filename).name} missing)") from None
        except (OSError, ValueError) as e:
            raise UserError(f"{folder}: cannot read results ({e})") from None
        spec = AuditSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in summary["spec"].items()})
        tables["samples"]["group"] = pd.Categorical(tables["samples"]["group"].astype(str),
                                                    categories=_group_order(tables["groups"]))
        tables["groups"]["group"] = tables["groups"]["group"].astype(str)
        shares = folder / "grad_shares.csv"
        if shares.exists():
            try:
                tables["grad_shares"] = pd.read_csv(shares, dtype={"group": str})
            except (OSError, ValueError) as e:
                raise UserError(f"{shares}: cannot read gradient shares ({e})") from None
        info = {"fairrecon_version": summary.get("fairrecon_version"), **summary.get("info", {})}
        return cls(spec, info=info, examples=load_examples(folder), **tables)


def load_examples(folder: str | Path) -> dict[str, np.ndarray] | None:
    """examples.npz as a dict of arrays, or None when the folder has none (older results)."""
    path = Path(folder) / EXAMPLES_FILE
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read saved examples ({e})") from None


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """A compressed .npz file's bytes (for atomic_write_bytes)."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def _group_order(groups: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(groups["group"].astype(str)))


_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read the process umask (umask can only be read by setting it)


def atomic_write(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, then rename over the target."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """atomic_write for bytes."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are ordinary files
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return json.loads(df.to_json(orient="records"))


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
