"""Text from results and their statistics: the terminal table, report.md, and the sentences and
tables that report.html shows too.

Intervals, gaps and verdicts come from one `stats.Analysis`, computed once and passed in; this
module only arranges them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from . import metrics
from .bymetric import ByMetric
from .dynamics import markdown_section
from .gradshare import kl_weight_over_training
from .losses import LOSSES
from .stats import CLEAR, FAIRER, INSUFFICIENT, LESS_FAIR, NO_CLEAR, Analysis, format_bound, positive_metric

if TYPE_CHECKING:
    from .results import AuditResult


def verdict_table(analysis: Analysis) -> pd.DataFrame:
    """One row per loss: the group it favours, the worse group, how much worse (the relative gap, worst /
    favoured - 1, with the ratio's interval: the one the verdict is decided on; in dB for psnr), the
    corrected p-value and the verdict.

    Columns are display strings: this is what the first screen of report.html and report.md show.

    Examples
    --------
    >>> from fairrecon import analyse, run_audit, verdict_table
    >>> result = run_audit(dataset="digits", losses="l1,l2", seeds=2, epochs=1, hidden=32, limit=200, test_limit=80)
    >>> table = verdict_table(analyse(result))
    >>> table.columns.tolist()
    ['loss', 'favours', 'worse group', 'mse: favoured → worse', 'worse by', '97.5% interval',
     'p (corrected)', 'how sure']
    >>> table[["loss", "favours", "worse group"]]
      loss favours worse group
    0   l1     0.3         0.9
    1   l2     0.3         0.9
    """
    metric = analysis.metric
    rows = []
    for d in analysis.disparities.itertuples(index=False):
        point, interval = relative_gap(d)
        rows.append(
            {
                "loss": d.loss,
                "favours": _text(d.reference),
                "worse group": _text(d.worst),
                f"{metric}: favoured → worse": f"{_num(d.reference_mean)} → {_num(d.worst_mean)}",
                "worse by": point,
                f"{_level(analysis)} interval": interval,
                "p (corrected)": _p(d.p_corrected),
                "how sure": d.verdict,
            }
        )
    return pd.DataFrame(rows)


def relative_gap(d: Any) -> tuple[str, str]:
    """How much worse the worse group is, and its interval, as text: for a positive metric the ratio's
    (Fieller) interval minus 1, in percent ('no upper bound' where it has none); for psnr the gap in dB."""
    if not positive_metric(d.metric):
        if not np.isfinite(d.gap):
            return "n/a", "n/a"
        unit = _unit(d.metric)
        return f"{d.gap:+.3g}{unit}", f"{d.gap_low:+.3g} to {d.gap_high:+.3g}{unit}"
    if not np.isfinite(d.ratio):
        return "n/a", "n/a"
    low = _pct(d.ratio_low - 1)
    if d.ratio_high == np.inf:
        if d.ratio_low == 0:
            return _pct(d.ratio - 1), "unbounded (no lower or upper bound: the group means are not clearly above 0)"
        return _pct(d.ratio - 1), f"{low} or more (no upper bound)"
    return _pct(d.ratio - 1), f"{low} to {_pct(d.ratio_high - 1)}"


def contrast_sentence(c: Any) -> str:
    """One loss against the reference loss, in words: the answer to "is it fairer?" first, by which metric,
    then the number."""
    if c.verdict == INSUFFICIENT:
        return f"{c.loss} against {c.reference} by {c.metric}: insufficient data to compare (see the warnings)."
    if positive_metric(c.metric):
        number = f"its worst/best {c.metric} ratio is {c.ratio:.3g}x {c.reference}'s [{c.low:.3g}, {c.high:.3g}]"
        above = c.ratio > 1
    else:
        unit = _unit(c.metric)
        number = (
            f"its {c.metric} gap is {c.difference:+.3g}{unit} against {c.reference}'s [{c.low:+.3g}, {c.high:+.3g}]"
        )
        above = c.difference > 0
    if c.verdict == LESS_FAIR:
        words = f"{c.loss} is clearly less fair than {c.reference}"
    elif c.verdict == FAIRER:
        words = f"{c.loss} is clearly fairer than {c.reference}"
    else:
        words = f"{c.loss} is not clearly {'less fair' if above else 'fairer'} than {c.reference}"
    return f"{words} by {c.metric}: {number}."


def contrast_table(analysis: Analysis) -> pd.DataFrame:
    """One row per loss against the reference loss: both ratios, their ratio with its interval, p, verdict
    (psnr: the difference of the two gaps, in dB). Display strings, as `verdict_table`'s."""
    rows = []
    for c in analysis.contrasts.itertuples(index=False):
        positive = positive_metric(c.metric)
        rows.append(
            {
                "loss": c.loss,
                "against": c.reference,
                "its worst/best": _num(c.loss_ratio) if positive else "",
                f"{c.reference}'s worst/best": _num(c.reference_ratio) if positive else "",
                "ratio of ratios" if positive else f"difference of gaps ({_unit(c.metric).strip() or c.metric})": _num(
                    c.ratio if positive else c.difference
                ),
                f"{100 * analysis.contrast_confidence:.4g}% interval": f"{_num(c.low)} to {_num(c.high)}",
                "p (corrected)": _p(c.p_corrected),
                "how sure": c.verdict,
            }
        )
    return pd.DataFrame(rows)


def headline(analysis: Analysis) -> str:
    """The answer in words. First each loss against the reference loss (is it fairer? by which metric), then
    which losses show a clear gap between groups (against which group, by how much), which do not, which have
    insufficient data, and at what confidence. Every surface prints this sentence (after the metric caveat,
    when there is one: `metric_caveat`).

    Examples
    --------
    >>> from fairrecon import analyse, headline, run_audit
    >>> result = run_audit(dataset="digits", losses="l1,l2", seeds=2, epochs=1, hidden=32, limit=200, test_limit=80)
    >>> print(headline(analyse(result)))
    l1 is ... than l2 by mse: its worst/best mse ratio is ...x l2's [...].
    Clear gap: l1 (group 0.9 worse than 0.3 by ...%, interval ...); l2 (...).
    Decided by mse (MSE per pixel) at 95% confidence for all 2 losses together, and for the comparison with l2.
    """
    clear, unclear, short = [], [], []
    for d in analysis.disparities.itertuples(index=False):
        if d.verdict == CLEAR:
            point, interval = relative_gap(d)
            clear.append(
                f"{d.loss} (group {d.worst} worse than {d.reference} by {point.lstrip('+')}, interval {interval})"
            )
        elif d.verdict == NO_CLEAR:
            unclear.append(str(d.loss))
        else:
            short.append(str(d.loss))
    if not len(analysis.disparities):
        return "No loss to compare (see Cells)."
    parts = [contrast_sentence(c) for c in analysis.contrasts.itertuples(index=False)]
    if clear:
        parts.append("Clear gap: " + "; ".join(clear) + ".")
    if unclear:
        parts.append(
            ("No clear gap" if clear else "No loss shows a clear gap")
            + ": "
            + ", ".join(unclear)
            + " (the gap's interval includes 0)."
        )
    if short:
        parts.append("Insufficient data, no verdict: " + ", ".join(short) + " (see the warnings).")
    pairs = " and every pair of groups" if analysis.pairs > 1 and analysis.reference == "best" else ""
    n = len(analysis.losses)
    losses = "the one loss" if n == 1 else f"all {n} losses"
    confidence = (
        f"Decided {verdicts_by(analysis.metric)} at {1 - analysis.policy.alpha:.0%} confidence for {losses}{pairs} "
        "together"
    )
    if len(analysis.contrasts):
        k = len(analysis.contrasts)
        confidence += (
            f", and for the comparison with {analysis.reference_loss}"
            if k == 1
            else f", and for the {k} comparisons with {analysis.reference_loss} together"
        )
    parts.append(confidence + ".")
    return " ".join(parts)


def error_table(analysis: Analysis) -> pd.DataFrame:
    """Rows: losses; columns: each group's 'mean [interval]', then the worst group, worst/best (dB below the
    best for psnr) and the verdict."""
    rows = []
    gaps = analysis.disparities.set_index("loss")
    for loss, part in analysis.intervals.groupby("loss", sort=False):
        row = {"loss": loss}
        for r in part.itertuples(index=False):
            row[str(r.group)] = f"{_num(r.mean)} [{_num(r.ci_low)}, {_num(r.ci_high)}]"
        if loss in gaps.index:
            d = gaps.loc[loss]
            row["worst group"] = _text(d["worst"])
            row["worst/best"] = _num(d["ratio"]) if positive_metric(analysis.metric) else _gap_text(d)
            row["verdict"] = d["verdict"]
        rows.append(row)
    return pd.DataFrame(rows)


FRONTIER_TITLE = "Fairness-accuracy frontier"


def frontier_table(analysis: Analysis) -> pd.DataFrame:
    """One row per loss: overall error [interval], worst/best [interval] (the verdict table's), the verdict and
    whether it is Pareto-optimal. Display strings, for report.md and report.html."""
    level = _level(analysis)
    rows = []
    for f in analysis.frontier.itertuples(index=False):
        rows.append(
            {
                "loss": f.loss,
                f"overall {analysis.metric}": _num(f.overall),
                f"{level} interval": f"{_num(f.overall_low)} to {_num(f.overall_high)}",
                "worst/best": _num(f.ratio),
                f"{level} interval of worst/best": f"{_num(f.ratio_low)} to {format_bound(f.ratio_high)}",
                "how sure": f.verdict,
                "Pareto-optimal": "yes" if f.pareto else "no",
            }
        )
    return pd.DataFrame(rows)


def frontier_sentence(analysis: Analysis) -> str:
    """Which losses are on the frontier, and what the flag means (point estimates, not a test)."""
    f = analysis.frontier
    if not f["pareto"].astype(bool).any():
        return (
            "No loss has both an overall error and a worst/best ratio"
            + ("" if metrics.get(analysis.metric).ratio else f" ({analysis.metric} has no ratio)")
            + ", so there is no frontier."
        )
    on = ", ".join(str(n) for n in f.loc[f["pareto"].astype(bool), "loss"])
    return (
        f"Pareto-optimal: {on}. A loss is Pareto-optimal when no other loss has both a lower overall held-out "
        f"{analysis.metric} and a lower worst/best ratio, by point estimates (not a test: read the intervals, at "
        f"{_level(analysis)}, the verdicts' level, before calling one loss better on either axis). The ratio "
        "and its interval are the verdict table's."
    )


def terminal_summary(analysis: Analysis, by_metric: ByMetric | None = None) -> str:
    """What `fairrecon audit` and `fairrecon report` print: the metric caveat (when `by_metric` has one), the
    headline, each loss against the reference loss, per-group error with intervals and each loss's verdict,
    the warnings, and how it was decided."""
    label = metrics.label(analysis.metric)
    caveat = metric_caveat(by_metric) if by_metric is not None else None
    lines = [*([caveat, ""] if caveat else []), headline(analysis), ""]
    if len(analysis.contrasts):
        lines += [
            f"Each loss against {analysis.reference_loss} by {analysis.metric} (paired by seed and test image)",
            contrast_table(analysis).to_string(index=False),
            "",
        ]
    lines += [
        f"Held-out {label} by group: mean [{1 - analysis.policy.alpha:.0%} interval of each group's mean]",
        error_table(analysis).to_string(index=False),
    ]
    lines += [f"warning: {loss}: {w}" for loss, w in loss_warnings(analysis)]
    lines.append(analysis.method)
    return "\n".join(lines)


def markdown_report(result: AuditResult, analysis: Analysis, by_metric: ByMetric | None = None) -> str:
    """report.md: the metric caveat (when `by_metric` has one), the headline, each loss against the reference
    loss, which group each loss favours and how sure, per-group error, every metric side by side, the groups,
    cell status."""
    spec = result.spec
    caveat = metric_caveat(by_metric) if by_metric is not None else None
    lines = [
        "# fairrecon audit",
        "",
        *([f"**{caveat}**", ""] if caveat else []),
        headline(analysis),
        "",
        describe_audit(result),
        "",
        f"## The answer in numbers ({_held_out(analysis.metric)})",
        "",
    ]
    if len(analysis.contrasts):
        lines += [
            f"### Each loss against {analysis.reference_loss} by {analysis.metric} (paired by seed and test image)",
            "",
            _markdown(contrast_table(analysis)),
            "",
        ]
    lines += [
        "### Which group does each loss favour?",
        "",
        _markdown(verdict_table(analysis)),
        "",
        f"_{analysis.method}_",
        "",
        f"## Per-group {metrics.label(analysis.metric)}: mean [{1 - analysis.policy.alpha:.0%} interval]",
        "",
        _markdown(error_table(analysis)),
        "",
    ]
    if by_metric is not None and len(by_metric.compared) > 1:
        lines += [f"## {BY_METRIC_TITLE}", "", by_metric_note(by_metric), "", _markdown(by_metric_table(by_metric)), ""]
    if len(analysis.frontier) > 1:
        lines += [f"## {FRONTIER_TITLE}", "", frontier_sentence(analysis), "", _markdown(frontier_table(analysis)), ""]
    warnings = loss_warnings(analysis)
    if warnings:
        lines += ["## Warnings", ""] + [f"- {loss}: {w}" for loss, w in warnings] + [""]
    lines += markdown_section(result)  # the answer over training, convergence warnings (dynamics.py)
    lines += vae_markdown(result)
    lines += [
        "## Groups as measured",
        "",
        _markdown(result.groups.round(4)),
        "",
        "## Cells",
        "",
        _markdown(
            result.cells.assign(
                likelihood=[LOSSES[n].likelihood if n in LOSSES else "(external model)" for n in result.cells["loss"]]
            ).round(6)
        ),
        "",
        f"Figures, distributions and reconstructions: `report.html` (re-render with `fairrecon report {spec.out or 'RESULT_DIR'}`).",
        "",
    ]
    return "\n".join(lines)


def vae_tables(result: AuditResult) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """VAEs: (per loss and group: mean KL, NLL, training share, generated_share; per loss and group: the effective
    KL weight over training), each None when absent. The one source of the VAE numbers in every report."""
    if not result.vae:
        return None, None
    kl_weight = kl_weight_over_training(result.grad_shares) if result.grad_shares is not None else None
    return result.vae_by_group(), kl_weight


def vae_terminal(result: AuditResult) -> str:
    """What `fairrecon audit` and `fairrecon report` print for VAEs (empty for autoencoders): per group, the mean
    KL and generated_share beside the training share (the numbers of report.md and summary.json)."""
    by_group, kl_weight = vae_tables(result)
    if by_group is None:
        return ""
    lines = [
        f"VAE (beta {result.spec.beta:g}): mean held-out KL per group (nats), and whom the generator produces",
        by_group.drop(columns=["nll", "generated_share_seed_std"], errors="ignore").round(4).to_string(index=False),
    ]
    if kl_weight is not None:
        lines += [
            "Effective KL weight ||grad beta KL_g|| / ||grad NLL_g|| at the first and last gradient snapshot",
            kl_weight[["loss", "group", "kl_weight_first", "kl_weight_last", "drift"]].round(4).to_string(index=False),
        ]
    return "\n".join(lines)


def vae_markdown(result: AuditResult) -> list[str]:
    """report.md's VAE section (empty for autoencoders)."""
    by_group, kl_weight = vae_tables(result)
    if by_group is None:
        return []
    lines = [
        "## VAEs: KL per group and whom the generator produces",
        "",
        f"beta = {result.spec.beta:g}. `kl`: mean KL(q(z|x) || N(0, I)) of the group's held-out images (nats; "
        "which group gets latent capacity); `nll`: the loss's NLL at one draw z ~ q(z|x); means over seeds.",
        "",
    ]
    gen = result.info.get("generation")
    if "generated_share" in by_group:
        lines += [
            f"`generated_share`: share of {gen['n'] if gen else 'the'} images decoded from the prior per cell "
            f"that fall in the group (assigned by {gen['method'] if gen else 'the audit'}), beside its share of "
            "the training images.",
            "",
        ]
        if gen and gen.get("near_chance"):
            lines += ["**warning:** the group classifier is near chance, so generated_share is not reliable.", ""]
    lines += [_markdown(by_group.round(4)), ""]
    if kl_weight is not None:
        lines += [
            "Effective KL weight over training, ||grad beta KL_g|| / ||grad NLL_g|| over the weights at the "
            "gradient snapshots (means over seeds); drift = last / first (< 1: the KL's pull fell relative "
            "to the likelihood's).",
            "",
            _markdown(kl_weight.round(4)),
            "",
        ]
    return lines


# ---------------------------------------------------------------- every metric side by side, and the caveat

BY_METRIC_TITLE = "Every metric side by side"


def verdicts_by(metric: str) -> str:
    """How a sentence names the metric its verdicts are about: 'by mse (MSE per pixel)'."""
    return f"by {metric} ({metrics.label(metric)})"


def metric_caveat(by_metric: ByMetric) -> str | None:
    """One sentence when the metrics name different worse groups for some loss (None when they agree): which
    group each metric calls worse, the losses where the gap is clear each way, and which metric the verdicts
    are by. Every surface shows it first, before the verdicts (terminal, report.md, report.html, summary.json).

    Losses that split the metrics the same way share a clause; the verdicts' metric's group comes first.
    """
    splits = by_metric.splits()
    if not splits:
        return None
    order = {m: i for i, m in enumerate(dict.fromkeys((by_metric.metric, *by_metric.compared)))}
    patterns: dict[tuple, list[str]] = {}
    for loss, sides in splits.items():
        ranked = sorted(sides.items(), key=lambda side: min(order[m] for m in side[1]))
        patterns.setdefault(tuple((g, tuple(ms)) for g, ms in ranked), []).append(loss)
    clauses = []
    for pattern, losses in patterns.items():
        said = [
            f"group {g} is worse by {_and(ms)}" if i == 0 else f"group {g} by {_and(ms)}"
            for i, (g, ms) in enumerate(pattern)
        ]
        clauses.append(f"for {_and(losses)}, {said[0]} but {_and(said[1:])}")
    both = [loss for loss in splits if by_metric.clear_both_ways(loss)]
    sure = f" (a clear gap each way for {_and(both)})" if both else " (for no loss is the gap clear in both directions)"
    return (
        "Which group is worse depends on the metric: "
        + "; ".join(clauses)
        + sure
        + f"; the verdicts here are {verdicts_by(by_metric.metric)}."
    )


def by_metric_table(by_metric: ByMetric) -> pd.DataFrame:
    """Rows: losses; columns: each compared metric's worse group, worst/best (psnr: the gap, in dB) and verdict.
    Display strings, for report.md and report.html."""
    out: dict[str, dict[str, str]] = {}
    for d in by_metric.table.itertuples(index=False):
        unit = metrics.get(d.metric).unit
        size = f"{_num(d.ratio)}x" if metrics.get(d.metric).ratio else f"gap {_num(d.gap)}{' ' + unit if unit else ''}"
        worse = f"{_text(d.worse)} worse" if isinstance(d.worse, str) else "n/a"
        out.setdefault(str(d.loss), {"loss": str(d.loss)})[d.metric] = f"{worse}, {size}: {d.verdict}"
    return pd.DataFrame(list(out.values()))


def by_metric_note(by_metric: ByMetric) -> str:
    """What the side-by-side table shows, and which metrics it could not compare."""
    labels = "; ".join(f"{m}: {metrics.label(m)}" for m in by_metric.compared)
    missing = (
        f" This result has no values of {_and(list(by_metric.missing))} (saved by an older fairrecon, or not defined "
        "for its images)."
        if by_metric.missing
        else ""
    )
    return (
        "The worse group of each loss under every metric a verdict may use, with worst/best (psnr: the gap in dB) "
        f"and the verdict `--metric M` gives, decided as the verdicts above ({labels}). Definitions: docs/metrics.md."
        + missing
    )


def _and(given: Sequence[object]) -> str:
    items = [str(i) for i in given]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _gap_text(d: Any) -> str:
    """worst - best in the metric's own units (psnr: '-0.48 dB', the worst group's PSNR below the best's), for
    metrics without a ratio."""
    value = d.gap if metrics.get(d.metric).higher_is_worse else -d.gap
    return "n/a" if not np.isfinite(value) else f"{_num(value)}{_unit(d.metric)}"


def _held_out(metric: str) -> str:
    """'held-out MSE per pixel, lower is better' for a heading."""
    m = metrics.get(metric)
    return f"held-out {m.label}, {'lower' if m.higher_is_worse else 'higher'} is better"


def describe_audit(result: AuditResult) -> str:
    """One sentence: dataset, groups, model, seeds, epochs."""
    spec = result.spec
    ablations = [
        f"`{v}` {name}"
        for name, v, default in (("output", spec.output, "linear"), ("input", spec.input_norm, "none"))
        if v != default
    ]
    return (
        f"Dataset `{spec.dataset}`, groups by `{spec.group_method}`"
        + (f" (contrast `{spec.contrast}`, polarity `{spec.polarity}`)" if spec.group_method == "transform" else "")
        + f", model `{spec.model}` (latent {spec.latent}{''.join(', ' + a for a in ablations)}), {spec.seeds} seed(s), "
        + (f"epochs `auto` (at most {spec.max_epochs})." if spec.epochs == "auto" else f"{spec.epochs} epoch(s).")
    )


def loss_warnings(analysis: Analysis) -> list[tuple[str, str]]:
    """(loss, warning text) for every loss whose statistics carry warnings, in table order, then
    ("loss vs reference loss", text) for every loss contrast that does."""
    out = []
    d, c = analysis.disparities, analysis.contrasts
    if "warnings" in d:
        out += [(str(loss), str(w)) for loss, w in zip(d["loss"], d["warnings"]) if isinstance(w, str) and w]
    out += [
        (f"{r.loss} vs {r.reference}", str(r.warnings))
        for r in c.itertuples(index=False)
        if isinstance(r.warnings, str) and r.warnings
    ]
    return out


def _unit(metric: str) -> str:
    """' dB' for psnr: the metric's unit with its space, '' for a pure number."""
    unit = metrics.get(metric).unit
    return f" {unit}" if unit else ""


def _level(analysis: Analysis) -> str:
    return f"{100 * analysis.confidence:.4g}%"


def _text(v: object) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else str(v)


def _markdown(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(out)


def _cell(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _num(v: float) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.3g}"


def _pct(v: float) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:+.1%}"


def _p(v: float) -> str:
    if v is None or not np.isfinite(v):
        return "n/a"
    return "< 0.001" if v < 0.001 else f"{v:.3f}"
