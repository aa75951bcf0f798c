"""What "settled" means: one notion for stopping (`--epochs auto`), for a cell's convergence note, and for
refusing a verdict ("the answer had not settled").

A quantity followed over training (a cell's error in a group; a loss's worst/best error ratio) is settled
when training as much again could not carry it across the boundary that matters, judged with the
uncertainty that can be measured. Precisely:

* **trend**: over the last WINDOW (half) of training, the curve points with step >= WINDOW x the last step
  (at least MIN_POINTS), a least-squares line through log(quantity) against log(step): a power law, the
  shape of these errors under Adam at a constant learning rate (a log-linear trend in steps overstates
  how far they still fall: docs/method/settled.md measures both);
* **horizon**: as much training again (the last step doubled), over which the trend moves log(quantity)
  by slope x log(2) (HORIZON);
* **uncertainty**: for one cell, the fit's residual scatter (t, points - 2 degrees of freedom); for a loss
  over seeds, the spread of the per-seed slopes (their mean and its t interval, seeds - 1 degrees of
  freedom);
* **boundary**: stopping: a fall of DROP (5%) in the cell's validation error, "a clearly lower error";
  a verdict: the decision's own boundary, an interval's end at ratio 1 (or the gate's threshold).

Stopping waits at least AUTO_MIN_EPOCHS epochs and AUTO_MIN_STEPS optimizer steps.

Settled: the projection's one-sided CONFIDENCE bound toward the boundary does not reach it. So a cell
stops when its validation error, with 95% confidence, would not fall by more than 5% in as much training
again (`stops`); a verdict stands unless the ratio's drift could move its interval across the boundary
within the horizon (`could_change`): a gap growing away from 1 is never refused, a plateau is only
settled once it has lasted half of training.

Numpy and scipy only (no torch), so the statistics use it without importing training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

WINDOW = 0.5  # the trend is fitted over the last half of training: steps >= WINDOW x the last step
HORIZON = float(np.log(2.0))  # projected over as much training again: log(2 T) - log(T), in log steps
CONFIDENCE = 0.95  # one-sided, toward the boundary
DROP = 0.05  # stopping: a fall of more than this in as much training again is "a clearly lower error"
MIN_POINTS = 3  # a line through fewer points has no residual scatter
# epochs="auto" never stops before this many epochs (as before this notion): the last half then holds at least
# 9 epoch-end points, 7 residual degrees of freedom for the scatter (t quantile 1.89 rather than 2.9 at 4 points).
AUTO_MIN_EPOCHS = 16
# ... and never before this many optimizer steps: a saddle plateau early in training (digits L2, epochs 8-24 at 11
# steps an epoch) fills the last half of training and reads as settled although the error then falls fourfold;
# measured in docs/method/settled.md (removes those stops, changes no other stop of the measured runs).
AUTO_MIN_STEPS = 500


def window_start(steps) -> int:
    """Index of the first point of the last WINDOW of training (steps ascending): step >= WINDOW x the last
    step, but at least the MIN_POINTS latest points (all of them if there are fewer)."""
    steps = np.asarray(steps, dtype=float)
    return max(0, min(int(np.searchsorted(steps, WINDOW * steps[-1])), len(steps) - MIN_POINTS))


@dataclass(frozen=True)
class Trend:
    """A power-law trend per column: log(value) = a + slope x log(step) over the last WINDOW of training."""

    slope: np.ndarray  # per column; NaN where fewer than MIN_POINTS points or a value is not positive and finite
    se: np.ndarray  # the slope's standard error from the fit's residual scatter
    df: int  # residual degrees of freedom: points - 2

    @property
    def change(self) -> np.ndarray:
        """The projected change of log(value) over the HORIZON (as much training again)."""
        return self.slope * HORIZON

    def bound(self, *, upper: bool) -> np.ndarray:
        """The one-sided CONFIDENCE bound of `change` (upper or lower), from the residual scatter."""
        q = sps.t.ppf(CONFIDENCE, self.df) if self.df >= 1 else np.nan
        return (self.slope + (q if upper else -q) * self.se) * HORIZON


def trend(steps, values) -> Trend:
    """Fit the trend to each column of values (T,) or (T, K) at `steps` (T,), ascending; see Trend."""
    steps, values = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
    shape = values.shape[1:]
    if len(steps) < MIN_POINTS:
        nan = np.full(shape, np.nan)
        return Trend(nan, nan, 0)
    first = window_start(steps)
    x, v = np.log(steps[first:]), values[first:].reshape(len(steps) - first, -1)
    ok = np.isfinite(v).all(0) & (v > 0).all(0)
    y = np.log(np.where(ok, v, 1.0))
    xc = x - x.mean()
    sxx = xc @ xc
    slope = xc @ (y - y.mean(0)) / sxx
    residual = y - y.mean(0) - np.outer(xc, slope)
    df = len(x) - 2
    se = np.sqrt((residual**2).sum(0) / df / sxx)
    nan = np.full(slope.shape, np.nan)
    return Trend(np.where(ok, slope, nan).reshape(shape), np.where(ok, se, nan).reshape(shape), df)


def projected_fall(steps, values) -> np.ndarray:
    """Per column: how far the value is projected to fall over as much training again, 1 - exp(change)
    (> 0 falling, < 0 rising); NaN where the trend cannot be fitted."""
    return 1 - np.exp(trend(steps, values).change)


def fall_bound(steps, values) -> np.ndarray:
    """Per column: the one-sided CONFIDENCE upper bound of `projected_fall` (NaN where it cannot be fitted)."""
    return 1 - np.exp(trend(steps, values).bound(upper=False))


def error_settled(steps, values) -> np.ndarray:
    """Per column: whether an error has settled: with CONFIDENCE, as much training again would not lower it by
    more than DROP (`fall_bound` <= DROP). A rising error is settled (more training would not lower it); NaN
    (too few points) is not."""
    return fall_bound(steps, values) <= DROP


def stops(steps, val, epoch: int) -> np.ndarray:
    """epochs="auto": per cell, whether it stops after `epoch` epochs: at least AUTO_MIN_EPOCHS and
    AUTO_MIN_STEPS optimizer steps (the last point's step), and every group's validation error has settled
    (`error_settled`) over the epoch-end points so far. `steps` (T,) are the points' steps, `val` (T, C, G)
    each group's validation error at them -> (C,) bool."""
    val = np.asarray(val, dtype=float)
    old_enough = epoch >= AUTO_MIN_EPOCHS and len(steps) > 0 and float(np.asarray(steps)[-1]) >= AUTO_MIN_STEPS
    return old_enough & error_settled(steps, val).reshape(val.shape[1:]).all(1)


@dataclass(frozen=True)
class Drift:
    """How far a quantity followed over several seeds (a loss's worst/best ratio) is projected to move over
    the HORIZON: `slopes` are the per-seed trend slopes (log scale per log step); the estimate is their mean
    times HORIZON, `low` / `high` its one-sided CONFIDENCE bounds (t, seeds - 1 degrees of freedom)."""

    slopes: np.ndarray  # (S,)

    @property
    def seeds(self) -> int:
        return len(self.slopes)

    @property
    def estimate(self) -> float:
        return float(np.mean(self.slopes)) * HORIZON if self.seeds else float("nan")

    def _half_width(self) -> float:
        if self.seeds < 2:
            return float("nan")
        se = float(np.std(self.slopes, ddof=1)) / np.sqrt(self.seeds)
        return float(sps.t.ppf(CONFIDENCE, self.seeds - 1)) * se * HORIZON

    @property
    def low(self) -> float:
        return self.estimate - self._half_width()

    @property
    def high(self) -> float:
        return self.estimate + self._half_width()

    def factors(self) -> tuple[float, float, float]:
        """(estimate, low, high) as factors on the quantity: exp of each."""
        return float(np.exp(self.estimate)), float(np.exp(self.low)), float(np.exp(self.high))


def seed_drift(curves: list[tuple[np.ndarray, np.ndarray]]) -> Drift:
    """A Drift from each seed's curve (steps, values) of one positive quantity; seeds whose trend cannot be
    fitted (too few points, a value not positive) are left out."""
    slopes = np.array([float(trend(steps, values).slope) for steps, values in curves], dtype=float)
    return Drift(slopes[np.isfinite(slopes)])


def could_change(low: float, high: float, boundary: float, shift_low: float, shift_high: float) -> bool:
    """Whether the decision an interval [low, high] makes against `boundary` (above it, below it, or across it;
    all on one additive scale, e.g. log ratio) could be different after as much training again, when the
    quantity is projected to move by [shift_low, shift_high] (a Drift's one-sided bounds): the interval moved
    by the bound toward the boundary reaches or crosses it. Above: low + shift_low <= boundary; below:
    high + shift_high >= boundary; across: low + shift_high > boundary or high + shift_low < boundary (it
    could leave it). The trend is linear over the horizon, so a crossing anywhere within it shows at its end.
    False when a shift is not finite (the drift cannot be judged)."""
    if not (np.isfinite(shift_low) and np.isfinite(shift_high)):
        return False
    if low > boundary:
        return bool(low + shift_low <= boundary)
    if high < boundary:
        return bool(high + shift_high >= boundary)
    return bool(low + shift_high > boundary or high + shift_low < boundary)


def rule() -> dict[str, float]:
    """The notion's constants, as results record them (summary.json info.convergence): the window (share of
    training the trend is fitted over), the horizon (the factor training is projected to), the one-sided
    confidence, and the fall a cell's error may still have in it to count as settled."""
    return {"window": WINDOW, "horizon": 2.0, "confidence": CONFIDENCE, "drop": DROP}
