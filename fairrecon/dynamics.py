"""The answer over training: the gap between groups at every curve point, when the worse group
changes, and which cells had not converged.

Read from an AuditResult's `curves` (measure.curve_table: each group's held-out MSE and MAE per
cell at `eval_points` steps; the last point is the final model on the full test set, earlier
points a fixed stratified subset of it) and `cells` (`converged`, `last_drop`, `last_drop_of`).

The gap at a point is the one the verdict reports at the end: the final worst group against the
final best group (by the mean over seeds of the final per-group means), as a relative gap
(worst - best) / best per seed. Its interval at each point is a seed-level t interval (mean over
seeds ± t_{S-1} · sd / sqrt(S)): training randomness only, with the test images held fixed, which
is enough to see whether and when the gap's sign settles; the verdict's interval (stats.py) also
counts the test sample.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from .results import records
from .settled import rule

GAP_COLUMNS = ["loss", "step", "epoch", "worst", "best", "seeds", "n", "gap", "gap_low", "gap_high", "worse_now"]


def _ok_curves(result) -> pd.DataFrame | None:
    curves = getattr(result, "curves", None)
    if curves is None or curves.empty:
        return None
    ok = result.cells.loc[result.cells["status"] == "ok", ["loss", "seed"]]
    df = curves.merge(ok, on=["loss", "seed"])
    return df.assign(group=df["group"].astype(str))


def group_curves(result, *, metric: str = "mse") -> pd.DataFrame | None:
    """Per loss, group and step: the mean over ok seeds of the group's held-out `metric` (and the epoch)."""
    result = result.arms()  # one arm per (loss, objective), named in the loss column (AuditResult.arms)
    df = _ok_curves(result)
    if df is None:
        return None
    return (
        df.groupby(["loss", "group", "step"], sort=False)
        .agg(epoch=("epoch", "first"), seeds=("seed", "nunique"), **{metric: (metric, "mean")})
        .reset_index()
    )


def gap_over_training(result, *, metric: str = "mse", alpha: float = 0.05) -> pd.DataFrame:
    """One row per (loss, curve step): the relative gap of the final worst group over the final best one,
    its mean over seeds with a seed-level t interval, and the group that is worse at that point."""
    result = result.arms()  # one arm per (loss, objective), named in the loss column (AuditResult.arms)
    df = _ok_curves(result)
    if df is None:
        return pd.DataFrame(columns=GAP_COLUMNS)
    final = result.by_group()
    rows = []
    for loss, part in df.groupby("loss", sort=False):
        own = final[final["loss"] == loss]
        means = own.set_index(own["group"].astype(str))[metric]
        if len(means) < 2:
            continue
        worst, best = means.idxmax(), means.idxmin()
        wide = part.pivot_table(index=["step", "seed"], columns="group", values=metric, aggfunc="first")
        gap = ((wide[worst] - wide[best]) / wide[best]).rename("gap").reset_index()
        epoch = part.groupby("step")["epoch"].first()
        n = part[part["group"].isin([worst, best])].groupby("step")["n"].min()
        for step, at in gap.groupby("step"):
            g = at["gap"].to_numpy()
            s = len(g)
            mean = float(g.mean())
            half = sps.t.ppf(1 - alpha / 2, s - 1) * g.std(ddof=1) / np.sqrt(s) if s > 1 else np.nan
            rows.append(
                {
                    "loss": loss,
                    "step": int(step),
                    "epoch": float(epoch[step]),
                    "worst": worst,
                    "best": best,
                    "seeds": s,
                    "n": int(n[step]),
                    "gap": mean,
                    "gap_low": mean - half,
                    "gap_high": mean + half,
                    "worse_now": worst if mean > 0 else best,
                }
            )
    return pd.DataFrame(rows, columns=GAP_COLUMNS)


def epoch_text(epoch: float) -> str:
    """An epoch as a sentence shows it: curve points fall at steps, so a point's epoch is often fractional
    (step 22 of 3 per epoch: 7.333...); one decimal places it ('7.3', '2.5', '12'), two digits below 1 ('0.05')."""
    epoch = float(epoch)
    return f"{epoch:.2g}" if abs(epoch) < 1 else f"{epoch:.1f}".removesuffix(".0")


def worse_group_changes(gaps: pd.DataFrame, *, spelled_out: int = 4) -> dict[str, str]:
    """Per loss whose worse group (by the mean gap over seeds) changes during training, one sentence saying when:
    each stretch with its epochs when there are at most `spelled_out` stretches, else the count and the last one."""
    out = {}
    for loss, part in gaps.groupby("loss", sort=False):
        part = part.sort_values("step")
        worse, epochs = part["worse_now"].tolist(), part["epoch"].tolist()
        starts = [0] + [i for i in range(1, len(worse)) if worse[i] != worse[i - 1]]
        if len(starts) < 2:
            continue
        if len(starts) <= spelled_out:
            ends = [s - 1 for s in starts[1:]]
            stretches = [f"the {worse[starts[0]]} group was worse until epoch {epoch_text(epochs[ends[0]])}"]
            stretches += [
                f"the {worse[s]} group "
                + (
                    f"from epoch {epoch_text(epochs[s])} to {epoch_text(epochs[e])}"
                    if e > s
                    else f"at epoch {epoch_text(epochs[s])}"
                )
                for s, e in zip(starts[1:-1], ends[1:])
            ]
            stretches.append(f"the {worse[starts[-1]]} group from epoch {epoch_text(epochs[starts[-1]])} on")
            out[loss] = f"{loss}: " + ", ".join(stretches)
        else:
            out[loss] = (
                f"{loss}: the worse group changed {len(starts) - 1} times during training; the "
                f"{worse[starts[-1]]} group from epoch {epoch_text(epochs[starts[-1]])} on (the {worse[starts[-1] - 1]} "
                "group before)"
            )
    return out


def convergence_warnings(result) -> list[str]:
    """One line per ok cell whose held-out error had not settled at the end of training (settled.py)."""
    result = result.arms()  # one arm per (loss, objective), named in the loss column (AuditResult.arms)
    cells = result.cells
    if "converged" not in cells:
        return []
    conv = (result.info or {}).get("convergence") or rule()  # the rule the cells were judged by
    out = []
    for row in cells[(cells["status"] == "ok") & ~cells["converged"].astype(bool)].itertuples():
        if not np.isfinite(row.last_drop):
            why = "too few curve points to judge"
        elif "horizon" not in conv:  # a result of fairrecon 0.1.0: its cells were judged over the last quarter
            moved = f"still fell {row.last_drop:.1%}" if row.last_drop > 0 else f"rose {-row.last_drop:.1%}"
            why = f"{row.last_drop_of} {moved} over the last {conv['window']:.0%} of training (threshold {conv['drop']:.0%})"
        elif row.last_drop > 0:
            why = (
                f"{row.last_drop_of} would fall {row.last_drop:.1%} more in as much training again, by its trend "
                f"over the last half (settled: at most {conv['drop']:.0%}, with {conv['confidence']:.0%} confidence)"
            )
        else:
            why = (
                f"{row.last_drop_of} scattered too much over the last half of training to rule out a fall of more "
                f"than {conv['drop']:.0%} in as much training again"
            )
        out.append(f"{row.loss}/seed{row.seed} not converged after {row.epochs} epoch(s): {why}")
    return out


def over_training_record(result) -> dict[str, Any]:
    """summary.json's "over_training": the convergence rule and its warnings, the worse-group changes,
    and the gap at every curve point."""
    conv = (result.info or {}).get("convergence") or rule()
    gaps = gap_over_training(result)
    return {
        "convergence": {**conv, "warnings": convergence_warnings(result)},
        "worse_group_changes": list(worse_group_changes(gaps).values()),
        "gap": records(gaps),
    }


def markdown_section(result) -> list[str]:
    """report.md's lines on the answer over training (nothing for results without curves)."""
    gaps = gap_over_training(result)
    warnings = convergence_warnings(result)
    if gaps.empty and not warnings:
        return []
    changes = worse_group_changes(gaps)
    lines = ["## The answer over training", ""]
    lines += [f"- {s}." for s in changes.values()] or [
        "- The worse group did not change during training under any loss."
    ]
    if not gaps.empty:
        lines += ["", "| loss | gap of | first point | halfway | last point |", "|---|---|---|---|---|"]
        for loss, part in gaps.groupby("loss", sort=False):
            part = part.sort_values("step")
            at = [part.iloc[i] for i in (0, len(part) // 2, len(part) - 1)]
            lines.append(
                f"| {loss} | {at[0]['worst']} over {at[0]['best']} | "
                + " | ".join(f"{r['gap']:+.1%} (epoch {epoch_text(r['epoch'])})" for r in at)
                + " |"
            )
    if warnings:
        lines += [
            "",
            "Not converged (the verdict holds for this training length; `--epochs auto` trains each cell until its "
            "validation error has settled in the same sense, up to `--max-epochs`):",
            "",
        ]
        lines += [f"- {w}" for w in warnings]
    return lines + [""]
