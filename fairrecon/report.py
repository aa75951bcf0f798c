"""Tables from results, for the terminal and for pull requests, and writing both reports to a folder.

Intervals and gaps come from `fairrecon.stats`; this module only arranges them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import UserError
from .losses import get_loss

METRIC_LABELS = {"mse": "MSE per pixel", "mae": "MAE per pixel", "psnr": "PSNR (dB)"}


@dataclass(frozen=True)
class Uncertainty:
    """Per-group intervals and per-loss gaps for one metric, and a sentence saying how they were made."""

    intervals: pd.DataFrame  # loss, group, metric, mean, ci_low, ci_high, n, seeds
    disparities: pd.DataFrame  # loss, metric, reference, worst, gap, gap_low, gap_high, ratio, ..., p_holm, warnings
    method: str


def uncertainty(result, metric: str = "mse") -> Uncertainty:
    """Per-group intervals and per-loss gaps from fairrecon.stats (computed once per result)."""
    from . import stats

    method = ("95% intervals from fairrecon.stats (bootstrap over seeds and test images); "
              "p: permutation test over test images (seed-averaged errors), Holm-corrected across losses.")
    return Uncertainty(stats.group_intervals(result, metric), stats.disparities(result, metric), method)


def verdict_table(result, metric: str = "mse", unc: Uncertainty | None = None) -> pd.DataFrame:
    """One row per loss: the group it favours, the worse group, the gap (relative, with its interval), how sure.

    Columns are display strings: this is what the first screen of report.html and report.md show.
    """
    unc = unc or uncertainty(result, metric)
    rows = []
    for d in unc.disparities.itertuples(index=False):
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


def headline(unc: Uncertainty) -> str:
    """One or two sentences: which losses show a clear gap, against which group, and which do not."""
    clear, unclear, unknown = [], [], []
    for d in unc.disparities.itertuples(index=False):
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


def error_table(result, metric: str = "mse", unc: Uncertainty | None = None) -> pd.DataFrame:
    """Rows: losses; columns: each group's 'mean [95% CI]', then the worst group, worst/best and how sure."""
    unc = unc or uncertainty(result, metric)
    rows = []
    gaps = unc.disparities.set_index("loss")
    for loss, part in unc.intervals.groupby("loss", sort=False):
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


def terminal_summary(result, unc: Uncertainty | None = None) -> str:
    """The compact table `fairrecon audit` prints: per-group MSE with intervals, worst group, how sure."""
    unc = unc or uncertainty(result, "mse")
    table = error_table(result, "mse", unc).to_string(index=False)
    return f"Held-out MSE per pixel by group: mean [95% interval; fairrecon.stats bootstrap]\n{table}"


def markdown_report(result, unc: Uncertainty | None = None) -> str:
    """report.md: which group each loss favours and how sure, per-group error, the groups, cell status."""
    spec = result.spec
    unc = unc or uncertainty(result, "mse")
    lines = [
        "# fairrecon audit",
        "",
        describe_audit(result),
        "",
        "## Which group does each loss favour? (held-out MSE per pixel, lower is better)",
        "",
        headline(unc),
        "",
        _markdown(verdict_table(result, "mse", unc)),
        "",
        f"_{unc.method}_",
        "",
        "## Per-group MSE per pixel: mean [95% CI]",
        "",
        _markdown(error_table(result, "mse", unc)),
        "",
    ]
    warnings = [w for w in unc.disparities.get("warnings", pd.Series(dtype=str)).astype(str) if w and w != "nan"]
    if warnings:
        lines += ["## Warnings", ""] + [f"- {loss}: {w}" for loss, w in zip(unc.disparities["loss"], warnings)] + [""]
    lines += [
        "## Groups as measured",
        "",
        _markdown(result.groups.round(4)),
        "",
        "## Cells",
        "",
        _markdown(result.cells.assign(likelihood=[get_loss(n).likelihood for n in result.cells["loss"]]).round(6)),
        "",
        f"Figures, distributions and reconstructions: `report.html` (re-render with `fairrecon report {spec.out or 'RESULT_DIR'}`).",
        "",
    ]
    return "\n".join(lines)


def describe_audit(result) -> str:
    """One sentence: dataset, groups, model, seeds, epochs."""
    spec = result.spec
    return (f"Dataset `{spec.dataset}`, groups by `{spec.group_method}`"
            + (f" (contrast `{spec.contrast}`)" if spec.group_method == "transform" else "")
            + f", model `{spec.model}` (latent {spec.latent}), {spec.seeds} seed(s), {spec.epochs} epoch(s).")


def write_reports(result, folder: str | Path, unc: Uncertainty | None = None) -> dict[str, Path]:
    """Write report.md and report.html into `folder`; returns their paths."""
    from .html_report import html_report
    from .results import atomic_write

    folder = Path(folder)
    unc = unc or uncertainty(result, "mse")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        paths = {"md": folder / "report.md", "html": folder / "report.html"}
        atomic_write(paths["md"], markdown_report(result, unc))
        atomic_write(paths["html"], html_report(result, unc))
    except OSError as e:
        raise UserError(f"cannot write reports to {folder}: {e.strerror or e}") from None
    return paths


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
