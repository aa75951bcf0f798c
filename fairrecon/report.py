"""Text from results and their statistics: the terminal table, report.md, and the sentences and
tables that report.html shows too.

Intervals, gaps and verdicts come from one `stats.Analysis`, computed once and passed in; this
module only arranges them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .dynamics import markdown_section
from .losses import LOSSES
from .stats import Analysis

METRIC_LABELS = {"mse": "MSE per pixel", "mae": "MAE per pixel", "psnr": "PSNR (dB)"}


def verdict_table(analysis: Analysis) -> pd.DataFrame:
    """One row per loss: the group it favours, the worse group, the gap (relative, with its interval), how sure.

    Columns are display strings: this is what the first screen of report.html and report.md show.
    """
    metric = analysis.metric
    rows = []
    for d in analysis.disparities.itertuples(index=False):
        rel = [g / abs(d.reference_mean) if d.reference_mean else np.nan for g in (d.gap, d.gap_low, d.gap_high)]
        p = d.p_holm if np.isfinite(d.p_holm) else d.p_value
        rows.append({
            "loss": d.loss,
            "favours": d.reference,
            "worse group": d.worst,
            f"{metric}: favoured → worse": f"{_num(d.reference_mean)} → {_num(d.worst_mean)}",
            "gap": _pct(rel[0]),
            "95% CI of gap": f"{_pct(rel[1])} to {_pct(rel[2])}",
            "p (Holm)": _p(p),
            "how sure": sureness(d.gap_low, d.gap_high),
        })
    return pd.DataFrame(rows)


def headline(analysis: Analysis) -> str:
    """One or two sentences: which losses show a clear gap, against which group, and which do not."""
    clear, unclear, unknown = [], [], []
    for d in analysis.disparities.itertuples(index=False):
        rel = d.gap / abs(d.reference_mean) if d.reference_mean else np.nan
        if not (np.isfinite(d.gap_low) and np.isfinite(d.gap_high)):
            unknown.append(f"{d.loss} (group {d.worst} worse by {_pct(rel).lstrip('+')})")
        elif d.gap_low > 0:
            clear.append(f"{d.loss} (group {d.worst} worse by {_pct(rel).lstrip('+')})")
        else:
            unclear.append(str(d.loss))
    parts = []
    if clear:
        parts.append("Clear gaps: " + "; ".join(clear) + ".")
    if unclear:
        parts.append(("No clear gap" if clear else "No loss shows a clear gap") + ": " + ", ".join(unclear)
                     + " (the 95% interval of the gap includes 0).")
    if unknown:
        parts.append("No interval (too few seeds), so no verdict: " + "; ".join(unknown) + ".")
    return " ".join(parts) or "No loss has a cell that trained without failing: nothing to compare (see Cells)."


def sureness(gap_low: float, gap_high: float) -> str:
    """Plain words for a gap interval (gap >= 0 means the worse group really is worse)."""
    if not (np.isfinite(gap_low) and np.isfinite(gap_high)):
        return "unknown: too few seeds"
    if gap_low > 0:
        return "clear: CI excludes 0"
    return "unclear: CI includes 0"


def error_table(analysis: Analysis) -> pd.DataFrame:
    """Rows: losses; columns: each group's 'mean [95% CI]', then the worst group, worst/best and how sure."""
    rows = []
    gaps = analysis.disparities.set_index("loss")
    for loss, part in analysis.intervals.groupby("loss", sort=False):
        row = {"loss": loss}
        for r in part.itertuples(index=False):
            row[str(r.group)] = f"{_num(r.mean)} [{_num(r.ci_low)}, {_num(r.ci_high)}]"
        if loss in gaps.index:
            d = gaps.loc[loss]
            row["worst group"] = str(d["worst"])
            row["worst/best"] = _num(d["ratio"]) if np.isfinite(d["ratio"]) else f"-{_num(d['gap'])} dB"
            row["sure?"] = "yes" if d["gap_low"] > 0 else "no" if np.isfinite(d["gap_low"]) else "?"
        rows.append(row)
    return pd.DataFrame(rows)


def terminal_summary(analysis: Analysis) -> str:
    """The compact table `fairrecon audit` prints: per-group MSE with intervals, worst group, how sure."""
    table = error_table(analysis).to_string(index=False)
    return f"Held-out MSE per pixel by group: mean [95% interval; fairrecon.stats bootstrap]\n{table}"


def markdown_report(result, analysis: Analysis) -> str:
    """report.md: which group each loss favours and how sure, per-group error, the groups, cell status."""
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
        "## Per-group MSE per pixel: mean [95% CI]",
        "",
        _markdown(error_table(analysis)),
        "",
    ]
    warnings = loss_warnings(analysis)
    if warnings:
        lines += ["## Warnings", ""] + [f"- {loss}: {w}" for loss, w in warnings] + [""]
    lines += markdown_section(result)  # the answer over training, convergence warnings (dynamics.py)
    lines += [
        "## Groups as measured",
        "",
        _markdown(result.groups.round(4)),
        "",
        "## Cells",
        "",
        _markdown(result.cells.assign(likelihood=[LOSSES[n].likelihood if n in LOSSES else "(external model)"
                                                  for n in result.cells["loss"]]).round(6)),
        "",
        f"Figures, distributions and reconstructions: `report.html` (re-render with `fairrecon report {spec.out or 'RESULT_DIR'}`).",
        "",
    ]
    return "\n".join(lines)


def describe_audit(result) -> str:
    """One sentence: dataset, groups, model, seeds, epochs."""
    spec = result.spec
    ablations = [f"`{v}` {name}" for name, v, default in (("output", spec.output, "linear"),
                                                           ("input", spec.input_norm, "none")) if v != default]
    return (f"Dataset `{spec.dataset}`, groups by `{spec.group_method}`"
            + (f" (contrast `{spec.contrast}`, polarity `{spec.polarity}`)" if spec.group_method == "transform" else "")
            + f", model `{spec.model}` (latent {spec.latent}{''.join(', ' + a for a in ablations)}), {spec.seeds} seed(s), "
            + (f"epochs `auto` (at most {spec.max_epochs})." if spec.epochs == "auto" else f"{spec.epochs} epoch(s)."))


def loss_warnings(analysis: Analysis) -> list[tuple[str, str]]:
    """(loss, warning text) for every loss whose statistics carry warnings, in table order."""
    d = analysis.disparities
    if "warnings" not in d:
        return []
    return [(str(loss), str(w)) for loss, w in zip(d["loss"], d["warnings"]) if isinstance(w, str) and w]


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
