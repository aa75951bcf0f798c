"""The CI gate: is every loss's group gap below a threshold, with stated confidence?

One policy, three doors: `fairrecon check` (exit status), `assert_fair` (pytest) and the reports,
which all read one `stats.Analysis` decided by one `stats.Policy`. The gate reads the intervals the
reports show, over every covered pair of groups (every pair, or each group against the named
reference), and puts the burden of proof on "pass":

  0  pass          every checked loss's upper ends are below the threshold: the data show the gap
                   is smaller than the threshold (the test of "gap >= threshold" rejects)
  1  fail          some loss with sufficient data has a lower end above the threshold
                   (`--max-ratio 1` fails exactly for the losses the reports call "clear gap")
  2  usage error   UserError (bad option or file; a model scored on images it was trained on, unless
                   allowed), raised, mapped to 2 by the CLI
  3  insufficient  no loss fails, and some loss is undecided: its interval contains the threshold (the
                   audit cannot tell a gap this size from none: its detectable gap is larger), or its
                   verdict is "insufficient data" (a failed cell, an answer that had not settled
                   (stats.gap_drift), fewer than 2 seeds, a group under stats.MIN_GROUP_N images), or its
                   --max-ratio pass or fail had not settled: the ratio's drift over seeds (the row's drift_low /
                   drift_high) could carry the end that decides across the threshold in as much training again
                   (settled.could_change, the rule the verdicts use at ratio 1; a verdict refused only for
                   that rule at ratio 1, the row's `unsettled`, is gated at the threshold by it alone)

The same rule gates the loss contrasts (`--max-contrast R`): a loss passes when the upper end of its
worst/best ratio over the reference loss's is below R, fails when the lower end is above R. The rule
and its measured error rates: docs/method/statistics.md ("The gate").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import metrics, stats
from .errors import ExitCode, UserError
from .results import AuditResult, records
from .settled import could_change

WORDS = {ExitCode.PASS: "pass", ExitCode.FAIL: "fail", ExitCode.INSUFFICIENT: "insufficient data"}
RULE = (
    "pass: every upper end of the checked intervals is below its threshold; fail: some lower end is above "
    "it; insufficient data: otherwise (an interval contains the threshold), or the verdict's data checks failed, "
    "or as much training again could carry the deciding end across the threshold (the ratio's drift over seeds)"
)
OUTCOME_COLUMNS = ["kind", "loss", "against", "quantity", "low", "high", "threshold", "outcome", "reason"]


@dataclass(frozen=True)
class Outcome:
    """The gate's answer: the exit status `fairrecon check` ends with, the message it prints, and the table
    it decided on.

    Examples
    --------
    >>> from fairrecon import ExitCode, Outcome
    >>> Outcome(ExitCode.PASS, "pass: every checked interval is below its threshold with 95% confidence").passed
    True
    """

    code: ExitCode
    message: str
    table: pd.DataFrame | None = None  # the analysis' disparities, one row per loss
    outcomes: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=OUTCOME_COLUMNS))  # per check
    thresholds: dict[str, float | None] = field(default_factory=dict)
    policy: dict[str, Any] = field(default_factory=dict)  # stats.Analysis.policy_record()
    contrasts: pd.DataFrame | None = None  # the analysis' loss contrasts, one row per loss against the reference

    @property
    def passed(self) -> bool:
        return self.code == ExitCode.PASS

    def record(self) -> dict[str, Any]:
        """The decision as JSON-ready data: result, exit code, rule, thresholds, policy, one outcome per check."""
        return {
            "result": WORDS.get(self.code, "error"),
            "exit_code": self.code,
            "rule": RULE,
            "thresholds": self.thresholds,
            "policy": self.policy,
            "outcomes": records(self.outcomes),
        }


def check(
    source: stats.Analysis | AuditResult | str | Path,
    *,
    metric: str = "mse",
    max_ratio: float | None = None,
    max_gap: float | None = None,
    max_contrast: float | None = None,
    adjusted: bool = False,
    alpha: float | None = None,
    reference: str = "best",
    losses: list[str] | None = None,
    pca: pd.DataFrame | None = None,
    policy: stats.Policy | None = None,
    reference_loss: str | None = None,
    allow_trained_on_test: bool = False,
) -> Outcome:
    """Apply the gate: is every loss's group gap shown to be below a threshold, with confidence?

    The intervals the reports show, over every covered pair of groups, are compared with each threshold:
    `max_ratio` (worst over reference), `max_gap` (in metric units) and `max_contrast` (each loss's worst/best
    ratio over the reference loss's). Pass: every upper end is below its threshold; fail: some lower end is
    above it; insufficient data: otherwise, or a verdict's data checks failed. Raises `UserError` on a usage
    mistake (no threshold, a ratio for psnr, an Analysis made differently), and when the model was scored on
    test images it was trained on (unless `allow_trained_on_test`).

    Parameters
    ----------
    source : Analysis, AuditResult, str or Path
        An Analysis (decided already: used as it is), or a result or results folder (analysed here
        with `policy`, or the default policy at `alpha`).
    metric, reference, losses, adjusted, pca, reference_loss
        As for `analyse`.
    max_ratio, max_gap, max_contrast : float, optional
        The thresholds; give one or more.
    alpha : float, optional
        1 - confidence for all the gate's intervals together (default 0.05).
    policy : Policy, optional
        The whole decision policy instead of `alpha`.
    allow_trained_on_test : bool
        Gate a model scored on test images it was trained on anyway.

    Returns
    -------
    Outcome
        `code` is `ExitCode.PASS`, `FAIL` or `INSUFFICIENT` (no loss fails, some interval contains its
        threshold or has no verdict).

    Examples
    --------
    >>> from fairrecon import check, run_audit
    >>> result = run_audit(dataset="digits", losses="l1,l2", seeds=2, epochs=1, hidden=32, limit=200, test_limit=80)
    >>> outcome = check(result, max_ratio=1.1)  # at most 10% worse, with 95% confidence
    >>> outcome.code, outcome.passed
    (<ExitCode.FAIL: 1>, False)
    >>> print(outcome.message.splitlines()[0])
    fail: l1, l2: above the threshold with 95% confidence
    """
    _validate(metric, max_ratio, max_gap, max_contrast, adjusted)
    policy = _policy(policy, alpha)
    if isinstance(source, stats.Analysis):
        analysis = _matching(
            source,
            metric=metric,
            policy=policy,
            reference=reference,
            losses=losses,
            adjusted=adjusted or pca is not None,
            reference_loss=reference_loss,
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
            reference_loss=reference_loss,
        )
    if analysis.trained_on_test and not allow_trained_on_test:
        raise UserError(
            f"the model was trained on {analysis.trained_on_test} of the test images it is scored on: their errors "
            "are training errors, so a pass would not mean the gap is small on new images; score it on held-out "
            "images only (train on split.csv's train files), or pass --allow-trained-on-test to gate anyway"
        )
    if max_contrast is not None and analysis.contrasts.empty:
        raise UserError(f"--max-contrast compares losses, and this analysis has one: {', '.join(analysis.losses)}")
    thresholds = {"max_ratio": max_ratio, "max_gap": max_gap, "max_contrast": max_contrast}
    table = analysis.disparities
    if table.empty:
        return Outcome(ExitCode.INSUFFICIENT, "insufficient data: no loss to check", table, thresholds=thresholds)
    rows: list[dict[str, Any]] = []
    lines: list[str] = []
    if max_ratio is not None or max_gap is not None:
        for row in table.itertuples():
            checked, said = _loss_outcome(row, analysis, max_ratio=max_ratio, max_gap=max_gap, adjusted=adjusted)
            rows += checked
            lines += said
    if max_contrast is not None:
        for row in analysis.contrasts.itertuples():
            one, said = _contrast_outcome(row, max_contrast)
            rows.append(one)
            lines += said
    outcomes = pd.DataFrame(rows, columns=OUTCOME_COLUMNS)
    per_item = outcomes.groupby(["kind", "loss"], sort=False)["outcome"].agg(_combine)
    failed = [f"{k} {loss}" if k == "contrast" else loss for (k, loss), o in per_item.items() if o == "fail"]
    short = [f"{k} {loss}" if k == "contrast" else loss for (k, loss), o in per_item.items() if o == "insufficient"]
    confidence = f"{1 - analysis.policy.alpha:.0%} confidence"
    lines.append(analysis.method)
    lines.append(f"Rule: {RULE}.")
    if failed:
        head, code = f"fail: {', '.join(failed)}: above the threshold with {confidence}", ExitCode.FAIL
    elif short:
        others = " (the others pass)" if len(short) < len(per_item) else ""
        head, code = f"insufficient data for {', '.join(short)}: no verdict{others}", ExitCode.INSUFFICIENT
    else:
        head, code = f"pass: every checked interval is below its threshold with {confidence}", ExitCode.PASS
    record = analysis.policy_record()
    return Outcome(code, "\n".join([head, *lines]), table, outcomes, thresholds, record, analysis.contrasts)


def _combine(outcomes: pd.Series) -> str:
    """One item's outcome from its checks: fail if any fails, pass if all pass, else insufficient."""
    values = set(outcomes)
    return "fail" if "fail" in values else "pass" if values == {"pass"} else "insufficient"


def _decide(low: float, high: float, threshold: float) -> str:
    if low > threshold:
        return "fail"
    if high < threshold:
        return "pass"
    return "insufficient"


def _loss_outcome(
    row: Any, analysis: stats.Analysis, *, max_ratio: float | None, max_gap: float | None, adjusted: bool
) -> tuple[list[dict[str, Any]], list[str]]:
    """One loss's checks (ratio and/or gap) as outcome records, and its lines of the message."""
    prefix = "adjusted_" if adjusted else ""
    what = f"{analysis.metric}{' in excess of per-group PCA' if adjusted else ''}"
    worst, ref, gap, low, high = (
        getattr(row, prefix + k) for k in ("worst", "reference", "gap", "gap_low", "gap_high")
    )
    base = {"kind": "loss", "loss": row.loss, "against": None}
    # a verdict refused only because it had not settled at ratio 1 (row.unsettled) leaves a --max-ratio decision to
    # its own settledness at its threshold; any other refusal (and --max-gap, whose drift is not judged) stands
    only_ratio = bool(row.unsettled) and max_gap is None
    if row.verdict == stats.INSUFFICIENT and not only_ratio:
        asked = [("ratio", max_ratio), ("gap", max_gap)]
        out = [
            {
                **base,
                "quantity": q,
                "low": np.nan,
                "high": np.nan,
                "threshold": t,
                "outcome": "insufficient",
                "reason": row.warnings,
            }
            for q, t in asked
            if t is not None
        ]
        return out, [f"INSUFFICIENT {row.loss}: {row.warnings}"]
    said = f"{row.loss}: group {worst} vs {ref} ({what}): gap {gap:.4g} [{low:.4g}, {high:.4g}]"
    out = []
    checks: list[tuple[str, float, float, float, str]] = []
    if max_ratio is not None:
        said += f"; ratio {row.ratio:.4g} [{row.ratio_low:.4g}, {stats.format_bound(row.ratio_high, 4)}]"
        checks.append(("ratio", row.ratio_lcb, row.ratio_ucb, max_ratio, "max-ratio"))
    if max_gap is not None:
        checks.append(("gap", getattr(row, prefix + "gap_lcb"), getattr(row, prefix + "gap_ucb"), max_gap, "max-gap"))
    reasons = []
    for quantity, lcb, ucb, threshold, flag in checks:
        outcome = _decide(lcb, ucb, threshold)
        moving = (
            _ratio_unsettled(row, lcb, ucb, threshold) if quantity == "ratio" and outcome != "insufficient" else None
        )
        if moving:
            outcome, reason = "insufficient", moving
        elif outcome == "fail":
            reason = f"{quantity} bound {lcb:.4g} > {flag} {threshold:g}"
        elif outcome == "pass":
            reason = f"{quantity} upper bound {ucb:.4g} < {flag} {threshold:g}"
        else:
            reason = (
                f"{quantity} bounds {lcb:.4g} to {stats.format_bound(ucb, 4)} contain {flag} {threshold:g}: "
                "the data cannot tell a gap this size from none"
                + (f" (detectable gap about {row.mde_relative:.0%})" if np.isfinite(row.mde_relative) else "")
            )
        reasons.append(reason)
        out.append(
            {
                **base,
                "quantity": quantity,
                "low": lcb,
                "high": ucb,
                "threshold": threshold,
                "outcome": outcome,
                "reason": reason,
            }
        )
    word = {"fail": "FAIL", "pass": "ok  ", "insufficient": "INSUFFICIENT"}[
        _combine(pd.Series([o["outcome"] for o in out]))
    ]
    lines = [f"{word} {said}: {'; '.join(reasons)}"]
    if row.warnings:
        lines.append(f"     warning: {row.warnings}")
    return out, lines


def _ratio_unsettled(row: Any, lcb: float, ucb: float, max_ratio: float) -> str | None:
    """Why a --max-ratio pass or fail on `row` had not settled, or None: the end that decides (the upper end for a
    pass, the lower end for a fail), moved by the ratio's drift bound toward the threshold (the row's drift_low /
    drift_high), could reach it in as much training again (settled.could_change). At max_ratio 1 a fail is the
    verdict's "clear gap", which the verdict's own rule has judged already."""
    if not (np.isfinite(lcb) and lcb > 0) or np.isnan(ucb):
        return None
    low, high, threshold = np.log(lcb), np.log(ucb), np.log(max_ratio)
    shift = np.log([row.drift_low, row.drift_high])
    if not could_change(low, high, threshold, *shift):
        return None
    end, name = (lcb * row.drift_low, "lower") if low > threshold else (ucb * row.drift_high, "upper")
    value = lcb if low > threshold else ucb
    return (
        f"the decision at --max-ratio {max_ratio:g} had not settled: in as much training again the ratio would move "
        f"x{row.drift_low:.3f} to x{row.drift_high:.3f} (one-sided 95% bounds), so its {name} end {value:.4g} "
        f"could {'fall' if low > threshold else 'rise'} to {end:.4g}"
    )


def _contrast_outcome(row: Any, max_contrast: float) -> tuple[dict[str, Any], list[str]]:
    """One loss against the reference loss, gated at max_contrast on the ratio of their worst/best ratios."""
    base = {
        "kind": "contrast",
        "loss": row.loss,
        "against": row.reference,
        "quantity": "ratio of ratios",
        "low": row.low,
        "high": row.high,
        "threshold": max_contrast,
    }
    if row.verdict == stats.INSUFFICIENT:
        return {**base, "outcome": "insufficient", "reason": row.warnings}, [
            f"INSUFFICIENT {row.loss} vs {row.reference}: {row.warnings}"
        ]
    outcome = _decide(row.low, row.high, max_contrast)
    reason = {
        "fail": f"lower end {row.low:.4g} > max-contrast {max_contrast:g}",
        "pass": f"upper end {row.high:.4g} < max-contrast {max_contrast:g}",
        "insufficient": f"interval contains max-contrast {max_contrast:g}",
    }[outcome]
    word = {"fail": "FAIL", "pass": "ok  ", "insufficient": "INSUFFICIENT"}[outcome]
    said = (
        f"{word} {row.loss} vs {row.reference}: worst/best ratio {row.loss_ratio:.4g} vs {row.reference_ratio:.4g}, "
        f"ratio of ratios {row.ratio:.4g} [{row.low:.4g}, {row.high:.4g}]: {reason}"
    )
    return {**base, "outcome": outcome, "reason": reason}, [said] + (
        [f"     warning: {row.warnings}"] if row.warnings else []
    )


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
    AssertionError: fail: l1, l2: above the threshold with 95% confidence
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
    reference_loss: str | None,
) -> stats.Analysis:
    """An Analysis passed in is used as it is, so it must answer the question asked: refuse otherwise."""
    asked = {"metric": metric, "policy": policy, "reference": reference}
    if reference_loss is not None:
        asked["reference_loss"] = reference_loss
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


def _validate(
    metric: str, max_ratio: float | None, max_gap: float | None, max_contrast: float | None, adjusted: bool
) -> None:
    known = metrics.for_verdicts(metric)
    if max_ratio is None and max_gap is None and max_contrast is None:
        raise UserError(
            "give a threshold: --max-ratio R (worst/best, e.g. 1.1), --max-gap D (in metric units) or "
            "--max-contrast R (a loss's worst/best ratio over the reference loss's, e.g. 1.0)"
        )
    if max_ratio is not None:
        if not stats.positive_metric(metric):
            raise UserError(
                f"--max-ratio is not defined for {metric} (no ratio: see `fairrecon metrics`); use --max-gap"
                + (f" in {known.unit}" if known.unit else "")
            )
        if adjusted:
            raise UserError("--adjusted compares excess errors, which may be near zero; use --max-gap, not --max-ratio")
        if not max_ratio >= 1.0:
            raise UserError(f"--max-ratio must be >= 1 (worst over reference), got {max_ratio}")
    if max_contrast is not None:
        if not stats.positive_metric(metric):
            raise UserError(f"--max-contrast is a ratio of ratios, not defined for {metric}")
        if not max_contrast > 0:
            raise UserError(
                f"--max-contrast must be > 0 (a ratio of ratios, 1: as fair as the reference loss), got {max_contrast}"
            )
    if max_gap is not None and not max_gap >= 0.0:
        raise UserError(f"--max-gap must be >= 0, got {max_gap}")
