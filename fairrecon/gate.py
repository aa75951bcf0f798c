"""The CI gate: does any loss's group gap exceed a threshold, with stated confidence?

One policy, three doors: `fairrecon check` (exit status), `assert_fair` (pytest) and the reports,
which all read one `stats.Analysis` decided by one `stats.Policy`. The gate compares the lower end
of each covered group pair's interval (the same intervals the reports show) with its threshold.

  0  pass         no loss's lower end exceeds the threshold
  1  fail         some loss with sufficient data has a lower end above the threshold
                  (`--max-ratio 1` fails exactly for the losses the reports call "clear gap")
  2  usage error  UserError (bad option or file), raised, mapped to 2 by the CLI
  3  insufficient no loss fails, and some loss's verdict is "insufficient data" (a failed cell, an
                  answer that had not settled (stats.gap_drift), fewer than 2 seeds, a group under
                  stats.MIN_GROUP_N images), or its --max-ratio decision had not settled: the ratio's drift
                  (the row's drift_low / drift_high) could carry its lower end across the threshold in as much
                  training again (settled.could_change, the rule the verdicts use at ratio 1)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import stats
from .errors import UserError
from .results import AuditResult
from .settled import could_change

PASS, FAIL, USAGE, INSUFFICIENT = 0, 1, 2, 3


@dataclass(frozen=True)
class Outcome:
    code: int
    message: str
    table: pd.DataFrame | None = None  # the analysis' disparities, one row per loss

    @property
    def passed(self) -> bool:
        return self.code == PASS


def check(
    source,
    *,
    metric: str = "mse",
    max_ratio: float | None = None,
    max_gap: float | None = None,
    adjusted: bool = False,
    alpha: float | None = None,
    reference: str = "best",
    losses: list[str] | None = None,
    pca: pd.DataFrame | None = None,
    policy: stats.Policy | None = None,
) -> Outcome:
    """Apply the gate to an Analysis (decided already), an AuditResult or a results folder (analysed
    here with `policy`, or the default policy at `alpha`). Raises UserError on a usage mistake."""
    _validate(metric, max_ratio, max_gap, adjusted)
    policy = _policy(policy, alpha)
    if isinstance(source, stats.Analysis):
        analysis = _matching(
            source,
            metric=metric,
            policy=policy,
            reference=reference,
            losses=losses,
            adjusted=adjusted or pca is not None,
        )
    else:
        analysis = stats.analyse(
            _as_result(source),
            metric=metric,
            policy=policy,
            reference=reference,
            losses=losses,
            adjusted=adjusted,
            pca=pca,
        )
    table = analysis.disparities
    if table.empty:
        return Outcome(INSUFFICIENT, "insufficient data: no loss to check")
    prefix = "adjusted_" if adjusted else ""
    what = f"{metric}{' in excess of per-group PCA' if adjusted else ''}"
    failures, short, lines = [], [], []
    for row in table.itertuples():
        if row.verdict == stats.INSUFFICIENT:
            short.append(row.loss)
            lines.append(f"INSUFFICIENT {row.loss}: {row.warnings}")
            continue
        worst, ref, gap, low, high, lcb = (
            getattr(row, prefix + k) for k in ("worst", "reference", "gap", "gap_low", "gap_high", "gap_lcb")
        )
        said = (
            f"{row.loss}: group {worst} vs {ref} ({what}): gap {gap:.4g} [{low:.4g}, {high:.4g}], lower end {lcb:.4g}"
        )
        if max_ratio is not None:
            said += (
                f"; ratio {row.ratio:.4g} [{row.ratio_low:.4g}, {row.ratio_high:.4g}], lower end {row.ratio_lcb:.4g}"
            )
        moving = _ratio_unsettled(row, max_ratio)
        if moving:
            short.append(row.loss)
            lines.append(f"INSUFFICIENT {said}: {moving}")
            continue
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
    confidence = f"{1 - analysis.policy.alpha:.0%} confidence"
    lines.append(analysis.method)
    if failures:
        head = f"fail: {len(failures)} loss(es) exceed the threshold with {confidence}: {', '.join(failures)}"
        code = FAIL
    elif short:
        others = " (the others pass)" if len(short) < len(table) else ""
        head = f"insufficient data for {', '.join(short)}: no verdict{others}"
        code = INSUFFICIENT
    else:
        head, code = f"pass: no loss exceeds the threshold with {confidence}", PASS
    return Outcome(code, "\n".join([head, *lines]), table)


def _ratio_unsettled(row, max_ratio: float | None) -> str | None:
    """Why the --max-ratio decision on `row` had not settled, or None: its ratio lower end (the number the gate
    compares), moved by the ratio's drift bound toward the threshold, could reach it in as much training again
    (at max_ratio 1 the verdict's own rule has decided this already)."""
    if max_ratio is None or not np.isfinite(row.ratio_lcb) or row.ratio_lcb <= 0:
        return None
    lcb, threshold = np.log(row.ratio_lcb), np.log(max_ratio)
    shift = np.log([row.drift_low, row.drift_high])
    if not could_change(lcb, lcb, threshold, *shift):
        return None
    toward = row.ratio_lcb * (row.drift_low if lcb > threshold else row.drift_high)
    return (
        f"the decision at --max-ratio {max_ratio:g} had not settled: in as much training again the ratio would move "
        f"x{row.drift_low:.3f} to x{row.drift_high:.3f} (one-sided 95% bounds), so its lower end "
        f"{row.ratio_lcb:.4g} could {'fall' if lcb > threshold else 'rise'} to {toward:.4g}"
    )


def assert_fair(source, **kwargs) -> Outcome:
    """pytest helper: the gate's policy as an assertion. Raises AssertionError unless it passes."""
    outcome = check(source, **kwargs)
    if not outcome.passed:
        raise AssertionError(outcome.message)
    return outcome


def _policy(policy: stats.Policy | None, alpha: float | None) -> stats.Policy:
    """The policy to decide with: the one given, or the default one at `alpha`; both given must agree."""
    if policy is None:
        return stats.Policy(alpha=alpha) if alpha is not None else stats.POLICY
    if alpha is not None and alpha != policy.alpha:
        raise UserError(f"alpha {alpha} disagrees with the policy's alpha {policy.alpha}; give one of them")
    return policy


def _matching(
    analysis: stats.Analysis,
    *,
    metric: str,
    policy: stats.Policy,
    reference: str,
    losses: list[str] | None,
    adjusted: bool,
) -> stats.Analysis:
    """An Analysis passed in is used as it is, so it must answer the question asked: refuse otherwise."""
    asked = {"metric": metric, "policy": policy, "reference": reference}
    differs = [f"{k} {getattr(analysis, k)!r} (asked: {v!r})" for k, v in asked.items() if getattr(analysis, k) != v]
    if losses is not None and tuple(losses) != analysis.losses:
        differs.append(f"losses {list(analysis.losses)} (asked: {list(losses)})")
    if adjusted and not analysis.adjusted:
        differs.append("no PCA-adjusted columns (asked: adjusted)")
    if differs:
        raise UserError("the analysis passed to the gate was made differently: " + "; ".join(differs))
    return analysis


def _as_result(result):
    if isinstance(result, (str, Path)):
        return AuditResult.load(result)
    if not isinstance(result, AuditResult):
        raise UserError(f"expected an Analysis, an AuditResult or a results folder, got {type(result).__name__}")
    return result


def _validate(metric: str, max_ratio, max_gap, adjusted: bool) -> None:
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
