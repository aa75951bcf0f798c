"""The CI gate: does any loss's group gap exceed a threshold, with stated confidence?

One policy, two doors: `fairrecon check` (exit status) and `assert_fair` (pytest), so the
command line and the code never disagree.

  0  pass         no loss's lower confidence bound exceeds the threshold
  1  fail         some loss's one-sided lower (1 - alpha) bound on its largest gap (or ratio)
                  exceeds the threshold; simultaneous over group pairs and losses (Bonferroni)
  2  usage error  UserError (bad option or file), raised, mapped to 2 by the CLI
  3  insufficient a cell failed, or a group has fewer than stats.MIN_GROUP_N test images
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from . import stats
from .errors import UserError
from .results import AuditResult

PASS, FAIL, USAGE, INSUFFICIENT = 0, 1, 2, 3


@dataclass(frozen=True)
class Outcome:
    code: int
    message: str
    table: pd.DataFrame | None = None  # stats.disparities, when it was computed

    @property
    def passed(self) -> bool:
        return self.code == PASS


def check(result, *, metric: str = "mse", max_ratio: float | None = None, max_gap: float | None = None,
          adjusted: bool = False, alpha: float = 0.05, reference: str = "best",
          losses: list[str] | None = None, pca: pd.DataFrame | None = None,
          n_boot: int = 4000, n_perm: int = stats.N_PERM) -> Outcome:
    """Apply the gate to an AuditResult (or a results folder). Raises UserError on a usage mistake."""
    result = _as_result(result)
    _validate(metric, max_ratio, max_gap, adjusted, alpha)
    cells = result.cells if losses is None else result.cells[result.cells["loss"].isin(losses)]
    failed = cells[cells["status"] != "ok"]
    if len(failed):
        listed = ", ".join(f"{r.loss}/seed{r.seed} ({r.status})" for r in failed.itertuples())
        return Outcome(INSUFFICIENT, f"insufficient data: {len(failed)} cell(s) did not train: {listed}")
    sizes = result.samples.drop_duplicates("index")["group"].astype(str).value_counts()
    sizes = sizes.reindex(stats.group_names(result), fill_value=0)
    small = sizes[sizes < stats.MIN_GROUP_N]
    if len(small):
        listed = ", ".join(f"{g} (n={n})" for g, n in small.items())
        return Outcome(INSUFFICIENT, f"insufficient data: group(s) {listed} have fewer than "
                                     f"{stats.MIN_GROUP_N} test images; use more test images")
    table = stats.disparities(result, metric=metric, reference=reference, alpha=alpha, adjusted=adjusted, pca=pca,
                              losses=losses, n_boot=n_boot, n_perm=n_perm)
    if table.empty:
        return Outcome(INSUFFICIENT, "insufficient data: no loss has a trained cell")
    confidence = f"{1 - alpha:.0%}"
    prefix = "adjusted_" if adjusted else ""
    what = f"{metric}{' in excess of per-group PCA' if adjusted else ''}"
    failures, lines = [], []
    for row in table.itertuples():
        worst, ref, gap, lcb = (getattr(row, prefix + "worst"), getattr(row, prefix + "reference"),
                                getattr(row, prefix + "gap"), getattr(row, prefix + "gap_lcb"))
        said = (f"{row.loss}: group {worst} vs {ref} ({what}): gap {gap:.4g} "
                f"(lower {confidence} bound {lcb:.4g})")
        if max_ratio is not None:
            said += f", ratio {row.ratio:.4g} (lower {confidence} bound {row.ratio_lcb:.4g})"
        over = []
        if max_gap is not None and lcb > max_gap:
            over.append(f"gap bound {lcb:.4g} > max-gap {max_gap:g}")
        if max_ratio is not None and row.ratio_lcb > max_ratio:
            over.append(f"ratio bound {row.ratio_lcb:.4g} > max-ratio {max_ratio:g}")
        lines.append(("FAIL " if over else "ok   ") + said + (": " + "; ".join(over) if over else ""))
        if over:
            failures.append(row.loss)
        if row.warnings:
            lines.append(f"     warning: {row.warnings}")
    if failures:
        head = f"fail: {len(failures)} loss(es) exceed the threshold with {confidence} confidence: {', '.join(failures)}"
        return Outcome(FAIL, "\n".join([head, *lines]), table)
    return Outcome(PASS, "\n".join([f"pass: no loss exceeds the threshold with {confidence} confidence", *lines]), table)


def assert_fair(result_or_dir, **kwargs) -> Outcome:
    """pytest helper: the gate's policy as an assertion. Raises AssertionError unless it passes."""
    outcome = check(result_or_dir, **kwargs)
    if not outcome.passed:
        raise AssertionError(outcome.message)
    return outcome


def _as_result(result):
    if isinstance(result, (str, Path)):
        return AuditResult.load(result)
    if not isinstance(result, AuditResult):
        raise UserError(f"expected an AuditResult or a results folder, got {type(result).__name__}")
    return result


def _validate(metric: str, max_ratio, max_gap, adjusted: bool, alpha: float) -> None:
    if metric not in stats.METRICS:
        raise UserError(f"unknown metric '{metric}'; allowed: {', '.join(stats.METRICS)}")
    if max_ratio is None and max_gap is None:
        raise UserError("give a threshold: --max-ratio R (worst/best, e.g. 1.1) or --max-gap D (in metric units)")
    if max_ratio is not None:
        if metric == "psnr":
            raise UserError("--max-ratio is not defined for psnr (a log scale); use --max-gap in dB")
        if adjusted:
            raise UserError("--adjusted compares excess errors, which may be near zero; use --max-gap, not --max-ratio")
        if not max_ratio >= 1.0:
            raise UserError(f"--max-ratio must be >= 1 (worst over reference), got {max_ratio}")
    if max_gap is not None and not max_gap >= 0.0:
        raise UserError(f"--max-gap must be >= 0, got {max_gap}")
    if not 0.0 < alpha < 1.0:
        raise UserError(f"--alpha must be between 0 and 1, got {alpha}")
