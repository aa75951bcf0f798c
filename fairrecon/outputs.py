"""A results folder, written in one pass from a result and its statistics.

  data files    results.AuditResult.data_files(): samples.csv, cells.csv, groups.csv, history.csv, ...
  report.md     for pull requests (report.py)
  report.html   the same with figures, one self-contained file (html_report.py)
  summary.json  spec, versions, inputs, per-group means, the statistics, gradient shares; written last
  split.csv     (image folders) every file with its group and split: train, test or unused

Every file is rendered in memory before the first one is written, so an error while computing
(a bad group, a failing figure) leaves the folder as it was; each file is then written
atomically (fileio.py). The folder must be new, empty or fairrecon's, and hold none of the run's
inputs; its marker (resultsdir.py) is written first and says "complete" after summary.json.
The statistics come in as one `stats.Analysis`, so summary.json and both reports say the same thing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import dynamics
from .errors import UserError
from .fileio import write_files
from .gradshare import share_summary
from .html_report import html_report
from .report import headline, markdown_report, vae_tables
from .results import AuditResult, records
from .resultsdir import Identity, check_out, claim, input_fingerprint, input_paths, mark_complete, result_fields
from .stats import Analysis, analyse


def summary(result: AuditResult, analysis: Analysis) -> dict[str, Any]:
    """summary.json's content (schema in the README): the verdicts come from `analysis`, with the
    policy that decided them, so a reader can re-derive each one. Cells and per-group means name each cell's
    objective, where cells differ by it; the summaries computed per loss are per arm (AuditResult.arms)."""
    arms = result.arms()
    extra = {"grad_shares": records(share_summary(arms.grad_shares))} if arms.grad_shares is not None else {}
    by_group, kl_weight = vae_tables(arms)
    if by_group is not None:
        extra["vae"] = {
            "beta": result.spec.beta,
            "generation": result.info.get("generation"),
            "by_group": records(by_group),
            "kl_weight": records(kl_weight) if kl_weight is not None else None,
        }
    return {
        "fairrecon_version": result.info.get("fairrecon_version"),
        "spec": result.spec.to_dict(),
        "inputs": result.info.get("inputs"),
        "info": {k: v for k, v in result.info.items() if k not in ("fairrecon_version", "inputs")},
        "groups": records(result.groups),
        "cells": records(result.cells),
        "by_group": records(result.by_group()),
        "verdict": headline(analysis),
        "policy": analysis.policy_record(),
        "disparities": records(analysis.disparities),
        "frontier": records(analysis.frontier),
        **extra,
        "over_training": dynamics.summary(arms),
    }


def result_files(result: AuditResult, analysis: Analysis) -> dict[str, bytes]:
    """Every file of a results folder, rendered in memory, summary.json last."""
    start = time.perf_counter()
    files = dict(result.data_files())
    if result.split is not None:
        files["split.csv"] = result.split.to_csv(index=False).encode()
    files["report.md"] = markdown_report(result, analysis).encode()
    files["report.html"] = html_report(result, analysis).encode()
    result.info.setdefault("timings", {})["report_s"] = time.perf_counter() - start  # tables and reports, rendered
    files["summary.json"] = (json.dumps(summary(result, analysis), indent=2, default=_json_default) + "\n").encode()
    return files


def save_results(result: AuditResult, out: str | Path, analysis: Analysis | None = None) -> Path:
    """Write the whole results folder `out` (created if needed); the statistics are computed here
    unless the caller already has them."""
    out = Path(out)
    identity = identity_of(result)
    files_in, folders_in = input_paths(result.spec)
    check_out(out, identity, files=files_in, folders=folders_in, force=True)  # only fairrecon's, never over inputs
    if analysis is None:
        start = time.perf_counter()
        analysis = analyse(result)
        result.info.setdefault("timings", {})["stats_s"] = time.perf_counter() - start
    files = result_files(result, analysis)
    claim(out, identity)
    try:
        write_files(out, files)
    except OSError as e:
        raise UserError(f"cannot write results to {out}: {e.strerror or e}") from None
    mark_complete(out, identity)
    return out


def identity_of(result: AuditResult) -> Identity:
    """The identity (spec fields, device type, inputs) a result was computed under."""
    inputs = result.info["inputs"] if "inputs" in result.info else input_fingerprint(result.spec)
    return Identity(result_fields(result.spec, str(result.info.get("device", "cpu")).split(":")[0]), inputs)


def write_reports(
    result: AuditResult, analysis: Analysis, folder: str | Path, *, source: str | Path | None = None
) -> dict[str, Path]:
    """Only report.md and report.html (re-rendered from a saved result by `fairrecon report`).

    `folder` must be the results folder `source` the result was read from, or new, empty or one of the
    same audit (its identity): reports of one audit beside another audit's summary.json and tables would
    contradict them, so a folder of another audit (complete, or reports only) is refused, as `audit`
    refuses it without --force.
    """
    folder = Path(folder)
    files_in, folders_in = input_paths(result.spec)
    identity = identity_of(result)
    own = source is not None and folder.resolve() == Path(source).resolve()
    check_out(
        folder,
        identity,
        files=files_in,
        folders=folders_in,
        force=own,  # its own folder: the reports of the tables beside them, whatever version wrote its marker
        remedy="reports of one audit are never written among another's files: pass a new or empty --out folder "
        "(or the audit's own)",
    )
    files = {"report.md": markdown_report(result, analysis), "report.html": html_report(result, analysis)}
    new = not folder.is_dir() or not any(folder.iterdir())
    if new:
        claim(folder, identity)  # a folder of reports only is fairrecon's too
    try:
        write_files(folder, files)
    except OSError as e:
        raise UserError(f"cannot write reports to {folder}: {e.strerror or e}") from None
    if new:
        mark_complete(folder, identity)
    return {"md": folder / "report.md", "html": folder / "report.html"}


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
