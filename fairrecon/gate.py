"""The CI gate: does any loss's group gap exceed a threshold, with stated confidence?

One policy, three doors: `fairrecon check` (exit status), `assert_fair` (pytest) and the reports,
which all read one `stats.Analysis` decided by one `stats.Policy`. The gate compares the lower end
of each covered group pair's interval (the same intervals the reports show) with its threshold.

  0  pass         no loss's lower end exceeds the threshold
  1  fail         some loss with sufficient data has a lower end above the threshold
                  (`--max-ratio 1` fails exactly for the losses the reports call "clear gap")
  2  usage error  UserError (bad option or file), raised, mapped to 2 by the CLI
  3  insufficient no loss fails, and some loss's verdict is "insufficient data" (a failed cell, an
                  answer still moving at the end of training (stats.gap_drift), fewer than 2 seeds, a
                  group under stats.MIN_GROUP_N images)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from . import metrics, stats
from .errors import ExitCode, UserError
from .results import AuditResult


@dataclass(frozen=True)
class Outcome:
    """The gate's answer: the exit status `fairrecon check` ends with, the message it prints, and the table
    it decided on.

    Examples
    --------
    >>> from fairrecon import ExitCode, Outcome
    >>> Outcome(ExitCode.PASS, "pass: no loss exceeds the threshold with 95% confidence").passed
    True
    """

    code: ExitCode
    message: str
    table: pd.DataFrame | None = None  # the analysis' disparities, one row per loss

    @property
    def passed(self) -> bool:
        return self.code == ExitCode.PASS


def check(
    source: stats.Analysis | AuditResult | str | Path,
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
    """Apply the gate: does some loss's group gap exceed a threshold, with confidence?

    The lower end of each covered group pair's interval (the one the reports show) is compared with
    the threshold: `max_ratio` (worst over reference) or `max_gap` (in metric units). Raises
    `UserError` on a usage mistake (no threshold, a ratio for psnr, an Analysis made differently).

    Parameters
    ----------
    source : Analysis, AuditResult, str or Path
        An Analysis (decided already: used as it is), or a result or results folder (analysed here
        with `policy`, or the default policy at `alpha`).
    metric, reference, losses, adjusted, pca
        As for `analyse`.
    max_ratio, max_gap : float, optional
        The thresholds; give one or both.
    alpha : float, optional
        1 - confidence for all losses together (default 0.05).
    policy : Policy, optional
        The whole decision policy instead of `alpha`.

    Returns
    -------
    Outcome
        `code` is `ExitCode.PASS`, `FAIL` or `INSUFFICIENT` (no loss fails, some has no verdict).

    Examples
    --------
    >>> from fairrecon import check, run_audit
    >>> result = run_audit(dataset="digits", losses="l1,l2", seeds=2, epochs=1, hidden=32, limit=200, test_limit=80)
    >>> outcome = check(result, max_ratio=1.1)  # at most 10% worse, with 95% confidence
    >>> outcome.code, outcome.passed
    (<ExitCode.FAIL: 1>, False)
    >>> print(outcome.message.splitlines()[0])
    fail: 2 loss(es) exceed the threshold with 95% confidence: l1, l2
    """
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
        return Outcome(ExitCode.INSUFFICIENT, "insufficient data: no loss to check")
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
        code = ExitCode.FAIL
    elif short:
        others = " (the others pass)" if len(short) < len(table) else ""
        head = f"insufficient data for {', '.join(short)}: no verdict{others}"
        code = ExitCode.INSUFFICIENT
    else:
        head, code = f"pass: no loss exceeds the threshold with {confidence}", ExitCode.PASS
    return Outcome(code, "\n".join([head, *lines]), table)


def assert_fair(source: stats.Analysis | AuditResult | str | Path, **kwargs: Any) -> Outcome:
    """pytest helper: the gate's policy as an assertion. Raises AssertionError unless it passes.

    Takes `check`'s arguments; returns its `Outcome` when it passes.

    Examples
    --------
    >>> from fairrecon import assert_fair, run_audit
    >>> result = run_audit(dataset="digits", losses="l1,l2", seeds=2, epochs=1, hidden=32, limit=200, test_limit=80)
    >>> assert_fair(result, max_ratio=100).passed  # in a test: fails the test unless it passes
    True
    >>> assert_fair(result, max_ratio=1.1)
    Traceback (most recent call last):
    ...
    AssertionError: fail: 2 loss(es) exceed the threshold with 95% confidence: l1, l2
    ...
    """
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


def _as_result(result: object) -> AuditResult:
    if isinstance(result, (str, Path)):
        return AuditResult.load(result)
    if not isinstance(result, AuditResult):
        raise UserError(f"expected an Analysis, an AuditResult or a results folder, got {type(result).__name__}")
    return result


def _validate(metric: str, max_ratio: float | None, max_gap: float | None, adjusted: bool) -> None:
    known = metrics.for_verdicts(metric)
    if max_ratio is None and max_gap is None:
        raise UserError("give a threshold: --max-ratio R (worst/best, e.g. 1.1) or --max-gap D (in metric units)")
    if max_ratio is not None:
        if not known.ratio:
            raise UserError(
                f"--max-ratio is not defined for {metric} (no ratio: see `fairrecon metrics`); use --max-gap"
                + (f" in {known.unit}" if known.unit else "")
            )
        if adjusted:
            raise UserError("--adjusted compares excess errors, which may be near zero; use --max-gap, not --max-ratio")
        if not max_ratio >= 1.0:
            raise UserError(f"--max-ratio must be >= 1 (worst over reference), got {max_ratio}")
    if max_gap is not None and not max_gap >= 0.0:
        raise UserError(f"--max-gap must be >= 0, got {max_gap}")
