"""An audit's results as tidy DataFrames, and how its data files are written and read back.

This module holds data only: statistics (stats.py) and reports (report.py, html_report.py) are
computed from a result at the top and written beside these files by outputs.py.

Data files in a results folder:
  samples.csv   one row per (loss, seed, test image): loss, seed, group, index, mse, mae, psnr, nmse,
                ssim_error, rel_mse (the metrics of metrics.py; older results lack the later ones), pred_scale,
                nll, kl (nll, kl: VAEs only, empty for autoencoders)
  cells.csv     one row per (loss, seed): status, learned sigma, training MSE and NLL, epochs, convergence
  groups.csv    measured brightness, contrast, negative and clipped shares per split and group
  history.csv   training NLL and MSE per cell and epoch
  curves.csv    (audits of this version on) per curve point, cell and group: held-out MSE and MAE over training
  grad_shares.csv  (when grad_points > 0) per snapshot, cell and group: who drives the updates (gradshare.py)
  generated.csv (VAEs, generate > 0) per cell and group: images decoded from the prior assigned to it, share,
                their mean brightness
  examples.npz  a few test images per group with each loss's reconstruction (uint8), for the report
  split.csv     (written by outputs.py for image folders) every file's group and split
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .data import load_images_for
from .errors import UserError
from .fileio import npz_bytes
from .groups import GroupedData, make_groups
from .metrics import METRICS, VERDICT_METRICS
from .resultsdir import require_complete
from .spec import AuditSpec

TABLES = ("samples", "cells", "groups", "history")
EXAMPLES_FILE = "examples.npz"


@dataclass
class AuditResult:
    """An audit's results as tidy tables: what `run_audit` returns and `AuditResult.load` reads back.

    `samples` has one row per (loss, seed, test image) with its errors (mse, mae, psnr, nmse, ...);
    `cells` one per (loss, seed): status, learned parameters, training error, epochs, convergence;
    `groups` the groups as measured per split; `history` the training loss per epoch; `info` the
    versions, device, timings and warnings; the optional tables are None when the audit has none.

    Examples
    --------
    >>> from fairrecon import run_audit
    >>> result = run_audit(dataset="digits", losses="l2", seeds=2, epochs=1, hidden=32, limit=200, test_limit=80)
    >>> result.cells[["loss", "seed", "status", "epochs"]]
      loss  seed status  epochs
    0   l2     0     ok       1
    1   l2     1     ok       1
    >>> result.by_cell_group()[["seed", "group", "n"]]  # one row per (loss, seed, group)
       seed group   n
    0     0   0.3  40
    1     0   0.9  40
    2     1   0.3  40
    3     1   0.9  40
    """

    spec: AuditSpec
    samples: pd.DataFrame
    cells: pd.DataFrame
    groups: pd.DataFrame
    history: pd.DataFrame
    info: dict[str, Any] = field(default_factory=dict)  # versions, device, timings
    examples: dict[str, np.ndarray] | None = None  # measure.example_reconstructions; None when not kept
    grad_shares: pd.DataFrame | None = None  # gradient shares per snapshot, cell and group (optional)
    split: pd.DataFrame | None = None  # image folders: file, group, split (train / test / unused)
    curves: pd.DataFrame | None = None  # per-group held-out error over training (measure.curve_table; optional)
    generated: pd.DataFrame | None = None  # VAEs: per cell and group, its share of prior samples (generate.py)
    folder: Path | None = None  # the results folder it was loaded from (AuditResult.load), for messages

    @property
    def ok_samples(self) -> pd.DataFrame:
        """Per-sample rows of the cells that trained without failing."""
        ok = self.cells.loc[self.cells["status"] == "ok", ["loss", "seed"]]
        return self.samples.merge(ok, on=["loss", "seed"])

    @property
    def metrics(self) -> list[str]:
        """The metrics a verdict may use (metrics.py) that this result has values of: results saved before a
        metric existed lack its column, and ssim_error is empty on images too small for its window."""
        return [m for m in VERDICT_METRICS if m in self.samples.columns and self.samples[m].notna().any()]

    def require_metric(self, name: str) -> None:
        """A one-line UserError unless this result has values of metric `name` (a registry name)."""
        if name in self.samples.columns and self.samples[name].notna().any():
            return
        here = ", ".join(self.metrics)
        samples = f"{self.folder / 'samples.csv'}" if self.folder is not None else "this result's samples"
        if name not in self.samples.columns:
            raise UserError(
                f"{samples} has no '{name}' column (written by a fairrecon from before {name} existed; run the "
                f"audit again to get it); metrics it has: {here}"
            )
        raise UserError(f"{samples} has no '{name}' values: {METRICS[name].undefined}; metrics it has: {here}")

    def by_cell_group(self) -> pd.DataFrame:
        """One row per (loss, seed, group): n and mean of each metric over the group's test images."""
        df = self.ok_samples
        out = df.groupby(["loss", "seed", "group"], observed=True, sort=False)[self.metrics].mean()
        out.insert(0, "n", df.groupby(["loss", "seed", "group"], observed=True, sort=False).size())
        return out.reset_index()

    def by_group(self) -> pd.DataFrame:
        """One row per (loss, group): each metric's mean over seeds of the per-seed group means, and its spread."""
        cg = self.by_cell_group()
        agg = cg.groupby(["loss", "group"], observed=True, sort=False).agg(
            n=("n", "first"),
            seeds=("seed", "nunique"),
            **{m: (m, "mean") for m in self.metrics},
            **{f"{m}_seed_std": (m, "std") for m in self.metrics},
        )
        return agg.reset_index()

    @property
    def vae(self) -> bool:
        """True when the cells are VAEs (samples carry a KL)."""
        return "kl" in self.samples.columns and bool(self.samples["kl"].notna().any())

    def vae_by_group(self) -> pd.DataFrame | None:
        """VAEs: one row per (loss, group): mean held-out KL and NLL (means over seeds of per-seed group means),
        the group's share of the training images, and (with generated.csv) its mean generated_share over seeds
        and the mean brightness of the images generated in it."""
        if not self.vae:
            return None
        df = self.ok_samples
        per_seed = df.groupby(["loss", "seed", "group"], observed=True, sort=False)[["kl", "nll"]].mean()
        out = per_seed.groupby(["loss", "group"], observed=True, sort=False).mean().reset_index()
        out["group"] = out["group"].astype(str)
        train = self.groups[self.groups["split"] == "train"].set_index("group")["share"]
        out["train_share"] = out["group"].map(train)
        if self.generated is not None:
            ok = self.cells.loc[self.cells["status"] == "ok", ["loss", "seed"]]
            gen = self.generated.assign(group=self.generated["group"].astype(str)).merge(ok, on=["loss", "seed"])
            shares = gen.groupby(["loss", "group"], sort=False)["generated_share"].agg(["mean", "std"])
            shares = shares.rename(columns={"mean": "generated_share", "std": "generated_share_seed_std"})
            if "brightness" in gen:  # mean over seeds of the group's generated images' mean pixel
                shares["generated_brightness"] = gen.groupby(["loss", "group"], sort=False)["brightness"].mean()
            out = out.merge(shares.reset_index(), on=["loss", "group"], how="left")
        return out

    def grouped_data(self) -> GroupedData:
        """The images and groups this result was measured on, recomputed from its spec (deterministic), and
        checked against its samples: the same test images, each in the same group. For the PCA baseline of
        difficulty-adjusted gaps (stats.analyse(adjusted=True)), which needs every group's training images."""
        data = make_groups(load_images_for(self.spec), self.spec)
        seen = self.samples.drop_duplicates("index")
        recomputed = dict(zip(data.test_index.tolist(), (data.names[g] for g in data.test_g.tolist()), strict=True))
        if len(seen) != len(recomputed) or any(
            recomputed.get(int(i)) != str(g) for i, g in zip(seen["index"], seen["group"], strict=True)
        ):
            raise UserError(
                "the images recomputed from this result's spec do not match its samples "
                "(dataset files changed?); pass a PCA table explicitly"
            )
        return data

    def data_files(self) -> dict[str, bytes]:
        """The result's data files by name, rendered in memory (written by outputs.save_results)."""
        files = {f"{name}.csv": getattr(self, name).to_csv(index=False).encode() for name in TABLES}
        if self.grad_shares is not None:
            files["grad_shares.csv"] = self.grad_shares.to_csv(index=False).encode()
        if self.curves is not None:
            files["curves.csv"] = self.curves.to_csv(index=False).encode()
        if self.generated is not None:
            files["generated.csv"] = self.generated.to_csv(index=False).encode()
        if self.examples is not None:
            files[EXAMPLES_FILE] = npz_bytes(self.examples)
        return files

    @classmethod
    def load(cls, folder: str | Path) -> AuditResult:
        """Read a results folder written by outputs.save_results."""
        folder = Path(folder)
        if not folder.is_dir():
            what = "no such folder" if not folder.exists() else "a file, not a folder"
            raise UserError(f"{folder}: {what}; give the --out folder of a `fairrecon audit`")
        require_complete(folder)
        if not (folder / "summary.json").is_file():
            raise UserError(
                f"{folder}: not a fairrecon results folder (it has no summary.json); "
                "give the --out folder of a `fairrecon audit`"
            )
        try:
            summary = json.loads((folder / "summary.json").read_text())
            tables = {name: pd.read_csv(folder / f"{name}.csv") for name in TABLES}
        except FileNotFoundError as e:
            raise UserError(f"{folder}: an incomplete results folder ({Path(e.filename).name} missing)") from None
        except (OSError, ValueError) as e:
            raise UserError(f"{folder}: cannot read results ({e})") from None
        spec = AuditSpec.from_dict(summary["spec"], str(folder / "summary.json"))
        tables["samples"]["group"] = pd.Categorical(
            tables["samples"]["group"].astype(str), categories=_group_order(tables["groups"])
        )
        tables["groups"]["group"] = tables["groups"]["group"].astype(str)
        for name, what in (
            ("grad_shares", "gradient shares"),
            ("curves", "curves"),
            ("generated", "generated shares"),
        ):  # optional tables
            path = folder / f"{name}.csv"
            if path.exists():
                try:
                    tables[name] = pd.read_csv(path, dtype={"group": str})
                except (OSError, ValueError) as e:
                    raise UserError(f"{path}: cannot read {what} ({e})") from None
        split = folder / "split.csv"
        if split.exists():
            try:
                tables["split"] = pd.read_csv(split, dtype=str, keep_default_na=False)
            except (OSError, ValueError) as e:
                raise UserError(f"{split}: cannot read the split ({e})") from None
        info = {"fairrecon_version": summary.get("fairrecon_version"), **summary.get("info", {})}
        if summary.get("inputs") is not None:
            info["inputs"] = summary["inputs"]
        return cls(spec, info=info, examples=load_examples(folder), folder=folder, **tables)


def saved_verdict_metric(folder: str | Path) -> str | None:
    """The metric a results folder's verdicts are by (summary.json "metrics"."verdicts_by"; None when its
    summary.json predates that section)."""
    try:
        summary = json.loads((Path(folder) / "summary.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{folder}: cannot read summary.json ({e})") from None
    return (summary.get("metrics") or {}).get("verdicts_by")


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


def _group_order(groups: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(groups["group"].astype(str)))


def records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """A DataFrame as JSON-ready records (NaN -> null)."""
    return json.loads(df.to_json(orient="records"))
