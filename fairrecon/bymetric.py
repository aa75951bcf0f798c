"""Every verdict metric side by side: for each loss, which group each metric calls worse, by how much, how sure.

The verdicts of an audit are about one metric (`--metric`, default mse), but absolute error (mse, mae, psnr),
structural error (ssim_error) and error relative to the image (rel_mse, nmse) can name different groups: when
each image's mean brightness is its group's target, rel_mse divides the bright group's error by a larger
number. Each row here comes from `stats.analyse` with that metric and the verdicts' own policy, reference and
losses, so it is the verdict `--metric M` would print; report.metric_caveat says so first when they disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from . import stats
from .metrics import VERDICT_METRICS
from .results import records

SHOWN = ["worst", "reference", "ratio", "ratio_low", "ratio_high", "gap", "gap_low", "gap_high", "verdict"]
COLUMNS = ["loss", "metric", *SHOWN, "worse"]


@dataclass(frozen=True)
class ByMetric:
    """The verdicts' metric and, per verdict metric this result has and loss, the verdict table's columns (the
    shown pair worst vs reference, its ratio and gap with their intervals at the verdicts' level, the verdict)
    and `worse`: the pair's worse group (the worst one, unless a named reference is worse still)."""

    metric: str  # the metric the verdicts are about
    table: pd.DataFrame  # COLUMNS, one row per (metric, loss)
    missing: tuple[str, ...]  # verdict metrics this result has no values of (older results)

    @property
    def compared(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.table["metric"]))

    def splits(self) -> dict[str, dict[str, list[str]]]:
        """Per loss whose metrics name different worse groups: {worse group: [metrics]} (metric order)."""
        out = {}
        for loss, part in self.table.dropna(subset=["worse"]).groupby("loss", sort=False):
            sides: dict[str, list[str]] = {}
            for row in part.itertuples(index=False):
                sides.setdefault(str(row.worse), []).append(str(row.metric))
            if len(sides) > 1:
                out[str(loss)] = sides
        return out

    def clear_both_ways(self, loss: str) -> bool:
        """Whether `loss` has a clear gap under some metric in each of at least two directions."""
        part = self.table[(self.table["loss"] == loss) & (self.table["verdict"] == stats.CLEAR)]
        return part["worse"].nunique() > 1

    def record(self, caveat: str | None) -> dict[str, Any]:
        """summary.json's "metrics" section."""
        return {
            "verdicts_by": self.metric,
            "compared": list(self.compared),
            "missing": list(self.missing),
            "caveat": caveat,
            "by_metric": records(self.table),
        }


def by_metric(result, analysis: stats.Analysis) -> ByMetric:
    """Each verdict metric's verdicts on `result`, decided as `analysis` decided its own (same policy, reference,
    losses and reference loss); the analysis itself stands for its metric. Metrics the result has no values of
    are `missing`."""
    rows, missing = [], []
    for metric in VERDICT_METRICS:
        if metric not in result.metrics:
            missing.append(metric)
            continue
        own = analysis
        if metric != analysis.metric:
            own = stats.analyse(
                result,
                metric=metric,
                policy=analysis.policy,
                reference=analysis.reference,
                losses=list(analysis.losses),
                reference_loss=analysis.reference_loss,
            )
        shown = own.disparities[["loss", *SHOWN]].assign(metric=metric)
        shown["worse"] = shown["worst"].where(~(shown["gap"] < 0), shown["reference"])
        rows.append(shown[COLUMNS])
    table = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=COLUMNS)
    return ByMetric(analysis.metric, table, tuple(missing))
