"""Text from results and their statistics: the terminal table, report.md, and the sentences and
tables that report.html shows too.

Intervals, gaps and verdicts come from one `stats.Analysis`, computed once and passed in; this
module only arranges them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .dynamics import markdown_section
from .gradshare import kl_weight_over_training
from .losses import LOSSES
from .spec import split_arm
from .stats import CLEAR, NO_CLEAR, Analysis

METRIC_LABELS = {"mse": "MSE per pixel", "mae": "MAE per pixel", "psnr": "PSNR (dB)"}


def verdict_table(analysis: Analysis) -> pd.DataFrame:
    """One row per loss: the group it favours, the worse group, the gap (relative, with the interval
    the verdict is decided on), the corrected p-value and the verdict.

    Columns are display strings: this is what the first screen of report.html and report.md show.
    """
    metric = analysis.metric
    rows = []
    for d in analysis.disparities.itertuples(index=False):
        rows.append(
            {
                "loss": d.loss,
                "favours": _text(d.reference),
                "worse group": _text(d.worst),
                f"{metric}: favoured → worse": f"{_num(d.reference_mean)} → {_num(d.worst_mean)}",
                "gap": _gap(d, d.gap),
                f"{_level(analysis)} interval of gap": f"{_gap(d, d.gap_low)} to {_gap(d, d.gap_high)}",
                "p (corrected)": _p(d.p_corrected),
                "how sure": d.verdict,
            }
        )
    return pd.DataFrame(rows)


def headline(analysis: Analysis) -> str:
    """The verdict in words: which losses show a clear gap (against which group, by how much), which do
    not, which have insufficient data, and at what confidence. Every surface prints this sentence."""
    clear, unclear, short = [], [], []
    for d in analysis.disparities.itertuples(index=False):
        if d.verdict == CLEAR:
            clear.append(
                f"{d.loss} (group {d.worst} worse than {d.reference} by {_gap(d, d.gap).lstrip('+')}, "
                f"interval {_gap(d, d.gap_low)} to {_gap(d, d.gap_high)})"
            )
        elif d.verdict == NO_CLEAR:
            unclear.append(str(d.loss))
        else:
            short.append(str(d.loss))
    if not len(analysis.disparities):
        return "No loss to compare (see Cells)."
    parts = []
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
    parts.append(f"Decided at {1 - analysis.policy.alpha:.0%} confidence for {losses}{pairs} together.")
    return " ".join(parts)


def error_table(analysis: Analysis) -> pd.DataFrame:
    """Rows: losses; columns: each group's 'mean [interval]', then the worst group, worst/best and the verdict."""
    rows = []
    gaps = analysis.disparities.set_index("loss")
    for loss, part in analysis.intervals.groupby("loss", sort=False):
        row = {"loss": loss}
        for r in part.itertuples(index=False):
            row[str(r.group)] = f"{_num(r.mean)} [{_num(r.ci_low)}, {_num(r.ci_high)}]"
        if loss in gaps.index:
            d = gaps.loc[loss]
            row["worst group"] = _text(d["worst"])
            row["worst/best"] = _num(d["ratio"]) if np.isfinite(d["ratio"]) else f"-{_num(d['gap'])} dB"
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
                f"{level} interval of worst/best": f"{_num(f.ratio_low)} to {_num(f.ratio_high)}",
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
            + (" (psnr has no ratio)" if analysis.metric == "psnr" else "")
            + ", so there is no frontier."
        )
    on = ", ".join(str(n) for n in f.loc[f["pareto"].astype(bool), "loss"])
    return (
        f"Pareto-optimal: {on}. A loss is Pareto-optimal when no other loss has both a lower overall held-out "
        f"{analysis.metric} and a lower worst/best ratio, by point estimates (not a test: read the intervals, at "
        f"{_level(analysis)}, the verdicts' level, before calling one loss better on either axis). The ratio "
        "and its interval are the verdict table's."
    )


def terminal_summary(analysis: Analysis) -> str:
    """What `fairrecon audit` and `fairrecon report` print: the headline, per-group error with
    intervals and each loss's verdict, the warnings, and how it was decided."""
    label = METRIC_LABELS.get(analysis.metric, analysis.metric)
    lines = [
        headline(analysis),
        "",
        f"Held-out {label} by group: mean [{1 - analysis.policy.alpha:.0%} interval of each group's mean]",
        error_table(analysis).to_string(index=False),
    ]
    lines += [f"warning: {loss}: {w}" for loss, w in loss_warnings(analysis)]
    lines.append(analysis.method)
    return "\n".join(lines)


def markdown_report(result, analysis: Analysis) -> str:
    """report.md: which group each loss favours and how sure, per-group error, the groups, cell status (arms in
    place of losses, where cells differ by objective: AuditResult.arms)."""
    result = result.arms()
    spec = result.spec
    lines = [
        "# fairrecon audit",
        "",
        describe_audit(result),
        "",
        "## Which group does each loss favour? (held-out MSE per pixel, lower is better)",
        "",
        headline(analysis),
        "",
        _markdown(verdict_table(analysis)),
        "",
        f"_{analysis.method}_",
        "",
        f"## Per-group MSE per pixel: mean [{1 - analysis.policy.alpha:.0%} interval]",
        "",
        _markdown(error_table(analysis)),
        "",
    ]
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
                likelihood=[
                    LOSSES[loss].likelihood if loss in LOSSES else "(external model)"
                    for loss, _ in map(split_arm, result.cells["loss"])
                ]
            ).round(6)
        ),
        "",
        f"Figures, distributions and reconstructions: `report.html` (re-render with `fairrecon report {spec.out or 'RESULT_DIR'}`).",
        "",
    ]
    return "\n".join(lines)


def vae_tables(result) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """VAEs: (per loss and group: mean KL, NLL, training share, generated_share; per loss and group: the effective
    KL weight over training), each None when absent. The one source of the VAE numbers in every report."""
    result = result.arms()  # one arm per (loss, objective), named in the loss column (AuditResult.arms)
    if not result.vae:
        return None, None
    kl_weight = kl_weight_over_training(result.grad_shares) if result.grad_shares is not None else None
    return result.vae_by_group(), kl_weight


def vae_terminal(result) -> str:
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


def vae_markdown(result) -> list[str]:
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


def describe_audit(result) -> str:
    """One sentence: dataset, groups, model, seeds, objectives (where not only erm), epochs."""
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
        + (
            f"objectives {', '.join(f'`{o}`' for o in spec.objectives)} (each crossed with every loss), "
            if spec.objectives != ("erm",)
            else ""
        )
        + (f"epochs `auto` (at most {spec.max_epochs})." if spec.epochs == "auto" else f"{spec.epochs} epoch(s).")
    )


def loss_warnings(analysis: Analysis) -> list[tuple[str, str]]:
    """(loss, warning text) for every loss whose statistics carry warnings, in table order."""
    d = analysis.disparities
    if "warnings" not in d:
        return []
    return [(str(loss), str(w)) for loss, w in zip(d["loss"], d["warnings"]) if isinstance(w, str) and w]


def _gap(d, value: float) -> str:
    """A gap (or one end of its interval) relative to the favoured group's mean; in dB for psnr."""
    if d.metric == "psnr":
        return "n/a" if not np.isfinite(value) else f"{value:+.3g} dB"
    ok = np.isfinite(d.reference_mean) and d.reference_mean
    return _pct(value / abs(d.reference_mean) if ok else np.nan)


def _level(analysis: Analysis) -> str:
    return f"{100 * analysis.confidence:.4g}%"


def _text(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else str(v)


def _markdown(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(out)


def _cell(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _num(v: float) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.3g}"


def _pct(v: float) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:+.1%}"


def _p(v: float) -> str:
    if v is None or not np.isfinite(v):
        return "n/a"
    return "< 0.001" if v < 0.001 else f"{v:.3f}"
