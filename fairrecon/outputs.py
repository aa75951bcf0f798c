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

from . import dynamics
from .bymetric import ByMetric, by_metric
from .errors import UserError
from .fileio import json_default, write_files
from .gradshare import share_summary
from .html_report import html_report
from .report import headline, markdown_report, metric_caveat, vae_tables
from .results import AuditResult, records
from .resultsdir import (
    FIRST_RESULTS_VERSION,
    Identity,
    check_out,
    claim,
    input_fingerprint,
    input_paths,
    mark_complete,
    result_fields,
)
from .stats import Analysis, analyse


def summary_json(result: AuditResult, analysis: Analysis, compared: ByMetric | None = None) -> dict[str, Any]:
    """summary.json's content (schema in the README): the verdicts come from `analysis`, with the
    policy that decided them, so a reader can re-derive each one; `compared` (bymetric.by_metric, computed
    here when not given) gives the metric caveat and every metric's verdicts."""
    compared = compared if compared is not None else by_metric(result, analysis)
    caveat = metric_caveat(compared)
    extra: dict[str, Any] = {}
    if result.grad_shares is not None:
        extra["grad_shares"] = records(share_summary(result.grad_shares))
    by_group, kl_weight = vae_tables(result)
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
        "metric_caveat": caveat,
        "verdict": headline(analysis),
        "policy": analysis.policy_record(),
        "disparities": records(analysis.disparities),
        "loss_contrasts": records(analysis.contrasts),
        "frontier": records(analysis.frontier),
        "metrics": compared.record(caveat),
        **extra,
        "over_training": dynamics.over_training_record(result),
    }


def result_files(result: AuditResult, analysis: Analysis, compared: ByMetric | None = None) -> dict[str, bytes]:
    """Every file of a results folder, rendered in memory, summary.json last."""
    start = time.perf_counter()
    compared = compared if compared is not None else by_metric(result, analysis)
    files = dict(result.data_files())
    if result.split is not None:
        files["split.csv"] = result.split.to_csv(index=False).encode()
    files["report.md"] = markdown_report(result, analysis, compared).encode()
    files["report.html"] = html_report(result, analysis, compared).encode()
    result.info.setdefault("timings", {})["report_s"] = time.perf_counter() - start  # tables and reports, rendered
    record = summary_json(result, analysis, compared)
    files["summary.json"] = (json.dumps(record, indent=2, default=json_default) + "\n").encode()
    return files


def save_results(
    result: AuditResult, out: str | Path, analysis: Analysis | None = None, compared: ByMetric | None = None
) -> Path:
    """Write the whole results folder `out` (created if needed); the statistics (and every metric's verdicts)
    are computed here unless the caller already has them.

    `out` must be new, empty or fairrecon's, and hold none of the audit's inputs (one-line `UserError`
    otherwise). Returns `out` as a Path.

    Examples
    --------
    >>> import tempfile
    >>> from fairrecon import AuditResult, run_audit, save_results
    >>> result = run_audit(dataset="digits", losses="l2", seeds=2, epochs=1, hidden=32, limit=200, test_limit=80)
    >>> out = save_results(result, tempfile.mkdtemp() + "/audit")
    >>> sorted(p.name for p in out.iterdir())
    ['cells.csv', 'curves.csv', 'examples.npz', 'fairrecon.json', 'grad_shares.csv', 'groups.csv',
     'history.csv', 'report.html', 'report.md', 'samples.csv', 'summary.json']
    >>> AuditResult.load(out).samples.equals(result.samples)  # read back exactly
    True
    """
    out = Path(out)
    identity = identity_of(result)
    files_in, folders_in = input_paths(result.spec)
    check_out(out, identity, files=files_in, folders=folders_in, force=True)  # only fairrecon's, never over inputs
    if analysis is None:
        start = time.perf_counter()
        analysis = analyse(result)
        result.info.setdefault("timings", {})["stats_s"] = time.perf_counter() - start
    files = result_files(result, analysis, compared)
    claim(out, identity)
    try:
        write_files(out, files)
    except OSError as e:
        raise UserError(f"cannot write results to {out}: {e.strerror or e}") from None
    mark_complete(out, identity)
    return out


def identity_of(result: AuditResult) -> Identity:
    """The identity (spec fields, device type, inputs, results version) a result was computed under."""
    inputs = result.info["inputs"] if "inputs" in result.info else input_fingerprint(result.spec)
    fields = result_fields(result.spec, str(result.info.get("device", "cpu")).split(":")[0])
    return Identity(fields, inputs, result.info.get("results_version", FIRST_RESULTS_VERSION))


def write_reports(
    result: AuditResult,
    analysis: Analysis,
    folder: str | Path,
    compared: ByMetric | None = None,
    *,
    source: str | Path | None = None,
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
    compared = compared if compared is not None else by_metric(result, analysis)
    files = {
        "report.md": markdown_report(result, analysis, compared),
        "report.html": html_report(result, analysis, compared),
    }
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
