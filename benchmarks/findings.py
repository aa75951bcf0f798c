"""Tables and the figure of the findings (README.md, docs/findings.md), from saved results folders (no training).

    python benchmarks/findings.py verdicts NAME=DIR ...        # per audit and loss: the verdict at the end
    python benchmarks/findings.py controls NAME=DIR ...        # per control and loss: the gap, its change vs the first
    python benchmarks/findings.py figure OUT.png NAME=DIR ...  # the gap over training: a row per audit, a column per loss
    python benchmarks/findings.py objectives NAME=DIR ...      # per audit and (loss, objective) arm: ratio, error

Every number comes from the folders' files through fairrecon itself (`AuditResult.load`,
`fairrecon.stats.analyse`, `fairrecon.dynamics`), so re-running this after a change to the
statistics re-derives the findings' tables from the same trained models.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fairrecon.dynamics import gap_over_training  # noqa: E402
from fairrecon.figures import _figure, _style  # noqa: E402
from fairrecon.results import AuditResult  # noqa: E402
from fairrecon.spec import split_arm  # noqa: E402
from fairrecon.stats import analyse  # noqa: E402


def load(pairs: list[str]) -> list[tuple[str, AuditResult]]:
    out = []
    for pair in pairs:
        name, _, folder = pair.partition("=")
        out.append((name, AuditResult.load(folder)))
    return out


def ratio_text(d) -> str:
    """'1.07 [1.05, 1.09] 0.9' : worst/best MSE ratio, its 95% interval, and the worse group."""
    return f"{d.ratio:.2f} [{d.ratio_low:.2f}, {d.ratio_high:.2f}] ({d.worst} worse)"


def verdicts(audits) -> str:
    rows = [
        "| audit | epochs (per cell) | not converged | " + " | ".join(audits[0][1].spec.losses) + " |",
        "|---|---|---|" + "---|" * len(audits[0][1].spec.losses),
    ]
    for name, result in audits:
        d = analyse(result).disparities.set_index("loss")
        cells = result.cells
        epochs = cells["epochs"]
        span = (
            f"{epochs.min()}"
            if epochs.min() == epochs.max()
            else f"{epochs.min()}-{epochs.max()} (median {epochs.median():g})"
        )
        flagged = int((~cells["converged"].astype(bool) & (cells["status"] == "ok")).sum())
        rows.append(
            f"| {name} | {span} | {flagged} of {len(cells)} | "
            + " | ".join(ratio_text(d.loc[loss]) for loss in result.spec.losses)
            + " |"
        )
    return "\n".join(rows)


def controls(audits) -> str:
    """Each control's worst/best ratio per loss, written as (group 0.9 MSE) / (group 0.3 MSE) so that the
    direction shows, with the bootstrap interval of that ratio."""
    losses = audits[0][1].spec.losses
    rows = [
        "| control | " + " | ".join(f"{loss}: MSE 0.9 / 0.3 [95% CI]" for loss in losses) + " |",
        "|---|" + "---|" * len(losses),
    ]
    for name, result in audits:
        d = analyse(result).disparities.set_index("loss")
        cells = []
        for loss in losses:
            r = d.loc[loss]
            if str(r.worst) == "0.9":
                cells.append(f"{r.ratio:.2f} [{r.ratio_low:.2f}, {r.ratio_high:.2f}]")
            else:  # invert the ratio and its interval, so every cell reads 0.9 over 0.3
                cells.append(f"{1 / r.ratio:.2f} [{1 / r.ratio_high:.2f}, {1 / r.ratio_low:.2f}]")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def objectives(audits) -> str:
    """Per audit and arm (a loss under a training objective; docs/method/objectives.md): the worst/best ratio
    and the overall held-out MSE, each with its interval at the verdicts' level, and the verdict (the frontier
    table's numbers)."""
    rows = [
        "| audit | loss | objective | worse group | worst/best [interval] | overall MSE [interval] | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, result in audits:
        analysis = analyse(result)
        for f in analysis.frontier.itertuples():
            loss, objective = split_arm(f.loss)
            rows.append(
                f"| {name} | {loss} | {objective} | {f.worst} | {f.ratio:.2f} [{f.ratio_low:.2f}, {f.ratio_high:.2f}] "
                f"| {f.overall:.4g} [{f.overall_low:.4g}, {f.overall_high:.4g}] | {f.verdict} |"
            )
    return "\n".join(rows)


def figure(out: str, audits) -> None:
    """Rows: audits; columns: losses; the relative gap of group 0.9 over group 0.3 over training. A row's y axis
    spans the 2nd to 98th percentile of its curves (and 0): Adam's rare one-point spikes (a 2-3x jump of one
    group's error for an epoch) run off the axis, marked by a triangle at its edge."""
    losses = list(audits[0][1].spec.losses)
    fig = _figure(2.2 * len(audits) + 0.9)
    axes = fig.subplots(len(audits), len(losses), squeeze=False, sharey="row")
    for i, (name, result) in enumerate(audits):
        gaps = gap_over_training(result)
        sign = np.where(gaps["worst"] == "0.9", 100.0, -100.0)  # always 0.9 over 0.3, in %
        gaps = gaps.assign(mid=sign * gaps["gap"], a=sign * gaps["gap_low"], b=sign * gaps["gap_high"])
        values = gaps["mid"].to_numpy()
        lo, hi = np.nanpercentile(values, [2, 98]) if len(values) else (-1.0, 1.0)
        pad = 0.15 * (hi - lo) + 1.0
        lo, hi = min(lo - pad, -2.0), max(hi + pad, 2.0)
        for j, loss in enumerate(losses):
            ax = axes[i, j]
            g = gaps[gaps["loss"] == loss].sort_values("step")
            ax.fill_between(
                g["epoch"],
                np.minimum(g["a"], g["b"]).clip(lo, hi),
                np.maximum(g["a"], g["b"]).clip(lo, hi),
                color="0.7",
                alpha=0.55,
                linewidth=0,
            )
            ax.plot(g["epoch"], g["mid"].clip(lo, hi), color="0.1", linewidth=1.6)
            off = g[(g["mid"] > hi) | (g["mid"] < lo)]
            ax.plot(off["epoch"], off["mid"].clip(lo, hi), linestyle="none", marker="^", color="0.1", markersize=4)
            ax.axhline(0, color="0.35", linestyle=":", linewidth=1.2)
            ax.set_ylim(lo, hi)
            if i == 0:
                ax.set_title(loss, fontweight="bold")
            if j == 0:
                ax.set_ylabel(f"{name}\n0.9 vs 0.3 (%)")
            if i == len(audits) - 1:
                ax.set_xlabel("epoch")
            _style(ax)
    fig.suptitle(
        "The gap over training: (MSE of group 0.9 - MSE of group 0.3) relative to the group better at the end, "
        "mean over 3 seeds\nband: 95% t interval over seeds; > 0: the bright group is worse; "
        "triangles: one-epoch spikes beyond the axis",
        fontsize=10,
    )
    fig.savefig(out, dpi=fig.dpi, metadata={"Software": None})


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "figure":
        figure(args[0], load(args[1:]))
    else:
        print({"verdicts": verdicts, "controls": controls, "objectives": objectives}[command](load(args)))
