"""The convergence rule, one for the warning (audit, dynamics, stats) and for the stopping of epochs="auto".

Numpy only (no torch), so the statistics can use it without importing training.

A group's error whose fitted trend still changes by more than CONVERGED_DROP (5%) over the last
CONVERGED_WINDOW (quarter) of training, falling or rising, has not converged. Why 5%: with Adam at a constant
learning rate these models keep improving slowly for hundreds of epochs (digits: -10% per last quarter at 600
epochs; Fashion-MNIST 10k: -5 to -10% at 100), so a tighter bound flags every practical run forever; runs still
in their fast phase fall 10-30% (digits at 50 epochs, Fashion-MNIST at 20). Rising counts too: an error that
jumped at the end (Adam can spike the error by 20-100% for an epoch or two) is no settled answer either.
"""

from __future__ import annotations

import numpy as np

CONVERGED_DROP = 0.05
CONVERGED_WINDOW = 0.25
# epochs="auto" never stops before this many epochs: its last-quarter window then holds at least 5 epoch-end
# points, so the trend is not fitted to 2 or 3 (with 5, a learned-sigma cell on Fashion-MNIST stopped at epoch
# 11 on a short plateau, while the other cells of its seed ran 38-69 epochs).
AUTO_MIN_EPOCHS = 16


def settled(drop) -> np.ndarray:
    """The convergence rule on `last_drop` values: |change| <= CONVERGED_DROP (NaN: not settled)."""
    return np.abs(np.asarray(drop, dtype=float)) <= CONVERGED_DROP


def last_drop(steps, values, *, window: float = CONVERGED_WINDOW) -> np.ndarray:
    """Relative fall over the last `window` of training, per column of values (T,) or (T, K).

    A straight line is fitted to log(value) against step over the points in the window (step >=
    (1 - window) * last step; at least 3, else the 3 latest), and its fall over the window is
    returned: 1 - exp(slope * window * last step). A fit, not two end points, so that one spiky
    point (learned sigma can jump) does not decide. A rise gives a negative drop; NaN where there
    are fewer than 3 points or a value is not positive and finite.
    """
    steps, values = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
    shape = values.shape[1:]
    if len(steps) < 3:
        return np.full(shape, np.nan)
    first = min(int(np.searchsorted(steps, (1 - window) * steps[-1])), len(steps) - 3)
    s, v = steps[first:], values[first:].reshape(len(steps) - first, -1)
    ok = np.isfinite(v).all(0) & (v > 0).all(0)
    logv = np.log(np.where(ok, v, 1.0))
    centred = s - s.mean()
    slope = centred @ (logv - logv.mean(0)) / (centred @ centred)
    return np.where(ok, 1 - np.exp(slope * window * steps[-1]), np.nan).reshape(shape)


def flattened(steps, val, train, epoch: int) -> np.ndarray:
    """epochs="auto": per cell, whether it may stop after `epoch` epochs: at least AUTO_MIN_EPOCHS, and every
    group's validation and training error has `settled` over the epoch-end points so far. `steps` (T,) are the
    points' steps, `val` and `train` (T, C, G) each group's error at them -> (C,) bool."""
    return (epoch >= AUTO_MIN_EPOCHS) & settled(last_drop(steps, val)).all(1) & settled(last_drop(steps, train)).all(1)
