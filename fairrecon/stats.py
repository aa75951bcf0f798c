"""Disparity statistics: each group's expected error, the gap and ratio between groups, and the one
decision policy that every verdict (terminal, report.md, report.html, summary.json, the gate) uses.

Estimand. Under a loss, group g's expected error mu_g is the mean held-out error over training runs
(seeds) and over the group's test population. Every question is about a contrast of group means,
c = sum_g w_g mu_g: the gap worst - reference is w = (+1, -1); "ratio <= R" is w = (+1, -R).

Estimate and interval. values[s, i] is image i's error under seed s; every seed is scored on the same
images. The estimate is the mean over seeds of the per-seed contrast. Its variance is the sum of
  * training randomness: the between-seed variance of the per-seed contrast, divided by S;
  * the test sample: each group's within-group variance of the seed-averaged per-image errors,
    times w_g^2 / n_g.
The seed x image interaction enters both parts, so it is counted twice (slightly conservative).
The critical value is Cochran-Cox's: the variance-weighted mean of the parts' t quantiles (S - 1 df
for the seed part, n_g - 1 for each group's image part), so intervals hold with few seeds (measured:
benchmarks/coverage.py; Welch-Satterthwaite's df undercovered there, see `Contrast`). An external
model (one trained model, no seeds) has the image part only.

Means (log scale). Errors (MSE, MAE) are positive, so a group's mean and a loss's overall mean get
their intervals on the log scale: log of the mean +- the critical value times its delta-method standard
error (se / mean: the same two parts, the same degrees of freedom). Both ends are positive and finite.

Ratios (Fieller). The ratio interval is the set of R >= 0 for which the contrast mu_worst - R mu_ref is
not rejected, found by bisection. Its lower end exceeds R exactly when the contrast test at R
rejects, so the ratio interval excludes 1 exactly when the gap interval excludes 0: one test decides.
Its upper end is infinite when the reference mean is not clearly above 0 at the interval's level ("no
upper bound"). The relative gap shown everywhere (worst / reference - 1) is this interval minus 1.
A log-scale (delta method) ratio interval, always bounded, was measured beside it and covered less
with heavy-tailed images (docs/method/statistics.md), so Fieller's stays.

Loss against loss (paired). Each loss's worst/reference ratio over the reference loss's, on the log
scale, with the seeds and the images paired across the two losses (`PairedMoments`). Objective against
erm (`objective_effects`): the same comparison (`paired_contrasts`) of each mitigated arm with its erm twin,
plus the change in overall error.

Policy. One `Policy` (alpha, correction, sidedness) decides everywhere. With the Bonferroni
correction over the family (losses x group pairs), each interval has level 1 - alpha/m and the
corrected p-value min(1, m p) < alpha exactly when that interval excludes "no gap" (its test is
the one the interval inverts). The loss contrasts are their own family (one hypothesis per loss
against the reference loss), and so are the objective effects (one per arm against its erm twin). The estimands, methods and their measured coverage: docs/method/statistics.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from itertools import permutations
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import optimize, special

from . import metrics
from .errors import UserError
from .metrics import PSNR_FLOOR_MSE
from .settled import DROP, Drift, could_change, seed_drift
from .spec import split_arm

if TYPE_CHECKING:  # types only: stats imports nothing that imports torch at run time
    from fairlearn.metrics import MetricFrame

    from .groups import GroupedData
    from .results import AuditResult
    from .spec import AuditSpec

METRICS = metrics.VERDICT_METRICS  # the metrics a verdict may use (metrics.py says which, and why not the others)
CORRECTIONS = ("bonferroni", "none")
MIN_GROUP_N = 30  # fewer test (or training) images in a group: "insufficient data"
POWER = 0.8  # power at which the minimum detectable gap is stated
CLEAR, NO_CLEAR, INSUFFICIENT = "clear gap", "no clear gap", "insufficient data"  # the verdict words


def higher_is_worse(metric: str) -> bool:
    return metrics.get(metric).higher_is_worse


def positive_metric(metric: str) -> bool:
    """Whether the metric is an error on a ratio scale (the registry's `ratio`: >= 0, 0 only for a perfect
    reconstruction): groups are compared by worst/best ratios and a positive mean gets its interval on the log
    scale. Not psnr (dB, a log scale already: plain intervals, gaps in dB)."""
    return metrics.get(metric).ratio


# ---------------------------------------------------------------- the decision policy


@dataclass(frozen=True)
class Policy:
    """How every verdict is decided: the family-wise error rate `alpha`, the correction over the
    family (losses x group pairs), and whether intervals are two-sided (the gate reads the lower end)
    or one-sided lower bounds ("the worse group is worse")."""

    alpha: float = 0.05
    correction: str = "bonferroni"
    two_sided: bool = True

    def __post_init__(self) -> None:
        if not (isinstance(self.alpha, (int, float)) and 0.0 < self.alpha < 1.0):
            raise UserError(f"alpha must be between 0 and 1, got {self.alpha}")
        if self.correction not in CORRECTIONS:
            raise UserError(f"unknown correction '{self.correction}'; allowed: {', '.join(CORRECTIONS)}")

    def tail(self, m: int) -> float:
        """Probability in each tail of one interval, when the family has m hypotheses."""
        each = self.alpha / m if self.correction == "bonferroni" else self.alpha
        return each / 2 if self.two_sided else each

    def divisor(self, m: int) -> int:
        return m if self.correction == "bonferroni" else 1


POLICY = Policy()  # the defaults, used by `fairrecon audit`, `report` and `check`


def _check_metric(metric: str, result: AuditResult | None = None, *, adjusted: bool = False) -> None:
    """A one-line UserError unless a verdict may use `metric` (adjusted, when asked), and `result` has its values."""
    metrics.for_verdicts(metric, adjusted=adjusted)
    if result is not None:
        result.require_metric(metric)


# ---------------------------------------------------------------- per-image errors


@dataclass(frozen=True)
class LossErrors:
    """One loss's per-image errors: values[s, i] for ok seed s and test image i (same images for every seed)."""

    loss: str
    seeds: np.ndarray  # (S,)
    index: np.ndarray  # (N,) test image index in the original dataset
    codes: np.ndarray  # (N,) group code into `names`
    names: tuple[str, ...]
    values: np.ndarray  # (S, N)

    @property
    def members(self) -> list[np.ndarray]:
        return [np.flatnonzero(self.codes == g) for g in range(len(self.names))]


def group_order(result: AuditResult) -> tuple[str, ...]:
    """The result's groups in their own order (categories of samples.group, else first appearance)."""
    g = result.samples["group"]
    names = g.cat.categories if isinstance(g.dtype, pd.CategoricalDtype) else pd.unique(g)
    return tuple(str(n) for n in names)


def family_losses(result: AuditResult, losses: list[str] | None = None) -> list[str]:
    """The losses a decision covers: every loss of the result (or the named ones), in cell order."""
    order = list(dict.fromkeys(result.cells["loss"]))
    if losses is None:
        return order
    unknown = sorted(set(losses) - set(order))
    if unknown:
        raise UserError(f"unknown loss(es) {unknown}; this result has {', '.join(order)}")
    return [name for name in order if name in losses]


def loss_errors(result: AuditResult, *, metric: str = "mse", losses: list[str] | None = None) -> list[LossErrors]:
    """Per-loss seed x image matrices of the ok cells (losses without any ok cell are left out)."""
    result = result.arms()  # one arm per (loss, objective), named in the loss column (AuditResult.arms)
    _check_metric(metric, result)
    names = group_order(result)
    code_of = {n: i for i, n in enumerate(names)}
    df = result.ok_samples
    out = []
    for loss in family_losses(result, losses):
        part = df[df["loss"] == loss]
        if part.empty:
            continue
        wide = part.pivot(index="index", columns="seed", values=metric)
        if wide.isna().any().any():
            raise UserError(f"loss {loss}: the seeds were not scored on the same test images")
        group = part.drop_duplicates("index").set_index("index")["group"].astype(str).reindex(wide.index)
        out.append(
            LossErrors(
                loss,
                wide.columns.to_numpy(),
                wide.index.to_numpy(),
                group.map(code_of).to_numpy(dtype=int),
                names,
                wide.to_numpy(dtype=float).T,
            )
        )
    return out


def _by_loss(
    result: AuditResult, metric: str, losses: list[str], errors: list[LossErrors] | None
) -> dict[str, LossErrors]:
    """The named losses' LossErrors by loss: from `errors` when the caller has them (`analyse`), else computed."""
    if errors is None:
        errors = loss_errors(result, metric=metric, losses=losses)
    return {le.loss: le for le in errors if le.loss in losses}


def to_metric_frame(result: AuditResult, loss: str, *, metric: str = "mse", seed: int | None = None) -> MetricFrame:
    """fairlearn MetricFrame of the mean per-image `metric` by group, for one loss (all ok seeds, or one)."""
    from fairlearn.metrics import MetricFrame

    _check_metric(metric, result)
    df = result.ok_samples
    part = df[(df["loss"] == loss) & ((df["seed"] == seed) if seed is not None else True)]
    if part.empty:
        raise UserError(f"no ok samples for loss '{loss}'" + (f" and seed {seed}" if seed is not None else ""))
    return MetricFrame(
        metrics={metric: _mean_error},
        y_true=np.zeros(len(part)),
        y_pred=part[metric].to_numpy(),
        sensitive_features=part["group"].astype(str).rename("group"),
    )


def _mean_error(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """MetricFrame metric: y_pred carries each image's error (y_true is a placeholder)."""
    return float(np.mean(y_pred))


# ---------------------------------------------------------------- contrasts of group means


@dataclass(frozen=True)
class Contrast:
    """An estimated contrast of group means and its variance, as independent parts with their own
    degrees of freedom (the seed part: S - 1; each group's image part: n_g - 1).

    Its critical value is Cochran and Cox's: the variance-weighted mean of the parts' t quantiles.
    Welch-Satterthwaite's single df, computed from the same estimated variances, undercovered with
    3 seeds when seeds dominate (0.92 for a nominal 0.95, benchmarks/coverage.py): when the seed
    variance happens to come out small, its df jumps up too. Cochran-Cox does not (0.95-0.96).
    """

    estimate: float
    variances: np.ndarray  # (K,) variance of each part
    dfs: np.ndarray  # (K,) its degrees of freedom

    @property
    def se(self) -> float:
        return float(np.sqrt(self.variances.sum()))

    @property
    def seed_share(self) -> float:
        """The seed part's share of the variance (the first part; 0 for an external model)."""
        total = self.variances.sum()
        return float(self.variances[0] / total) if total > 0 else np.nan

    def quantile(self, tail: float) -> float:
        """The critical value with `tail` probability above it (scipy.special's t functions: scipy.stats.t's
        values at a hundredth of the cost, which matters inside the Fieller bisection)."""
        on = self.variances > 0
        if not on.any():
            return 0.0 if self.variances.sum() == 0 else np.nan
        return float((self.variances[on] * -special.stdtrit(self.dfs[on], tail)).sum() / self.variances[on].sum())

    def low(self, tail: float) -> float:
        return self.estimate - self.quantile(tail) * self.se

    def high(self, tail: float) -> float:
        return self.estimate + self.quantile(tail) * self.se

    def positive_interval(self, tail: float) -> tuple[float, float]:
        """The interval of a positive quantity (a mean error), made on the log scale by the delta method:
        exp(log estimate +- q se / estimate). Both ends are positive and finite, the upper one further from
        the estimate than the lower (errors are right-skewed); NaN unless the estimate is above 0."""
        if not (np.isfinite(self.estimate) and self.estimate > 0):
            return np.nan, np.nan
        half = self.quantile(tail) * self.se / self.estimate
        return float(self.estimate * np.exp(-half)), float(self.estimate * np.exp(half))

    def p_greater(self) -> float:
        """One-sided p-value of "contrast <= 0": the tail at which low(tail) = 0, so p_greater() < tail
        exactly when low(tail) > 0 (found by root finding on log(tail), to 1e-14)."""
        se = self.se
        if not np.isfinite(se) or not np.isfinite(self.estimate):
            return np.nan
        if se == 0:
            return 0.0 if self.estimate > 0 else 1.0
        t = self.estimate / se
        if t == 0:
            return 0.5
        beyond = self._tail_beyond(abs(t))
        return beyond if t > 0 else 1.0 - beyond

    def p_two_sided(self) -> float:
        """Two-sided p-value of "contrast = 0"."""
        p = self.p_greater()
        return float(np.minimum(1.0, 2 * np.minimum(p, 1 - p)))

    def _tail_beyond(self, x: float) -> float:
        """The tail probability whose critical value is x > 0 (critical values fall as the tail grows);
        0 below 1e-100, where t quantiles with few df lose precision."""
        smallest = np.log(1e-100)
        f = lambda u: self.quantile(np.exp(u)) - x  # noqa: E731
        if f(smallest) <= 0:
            return 0.0
        return float(np.exp(optimize.brentq(f, smallest, np.log(0.5), xtol=1e-14, rtol=1e-15)))


@dataclass(frozen=True)
class Moments:
    """What every contrast of one loss's group means needs: group means, the between-seed covariance
    of the per-seed group means, and each group's image variance of the seed-averaged errors."""

    mean: np.ndarray  # (G,) mean over seeds and images
    seed_cov: np.ndarray  # (G, G) covariance over seeds of per-seed group means (ddof 1)
    image_var: np.ndarray  # (G,) within-group variance over images of the seed-averaged errors (ddof 1)
    n: np.ndarray  # (G,) test images per group
    seeds: int
    seed_part: bool  # False for an external model: one trained model, test-image uncertainty only

    @classmethod
    def of(cls, values: np.ndarray, codes: np.ndarray, n_groups: int, *, seed_part: bool = True) -> Moments:
        """From values (S, N) and group codes (N,). With seed_part and S < 2 the seed part is unknown (NaN)."""
        s = values.shape[0]
        members = [np.flatnonzero(codes == g) for g in range(n_groups)]
        n = np.array([len(idx) for idx in members])
        per_seed = np.stack([values[:, idx].mean(1) if len(idx) else np.full(s, np.nan) for idx in members], 1)
        averaged = values.mean(0)
        image_var = np.array([averaged[idx].var(ddof=1) if len(idx) > 1 else np.nan for idx in members])
        if not seed_part:
            seed_cov = np.zeros((n_groups, n_groups))
        elif s >= 2:
            seed_cov = np.atleast_2d(np.cov(per_seed, rowvar=False, ddof=1))
        else:
            seed_cov = np.full((n_groups, n_groups), np.nan)
        return cls(per_seed.mean(0), seed_cov, image_var, n, s, seed_part)

    def contrast(self, w: np.ndarray) -> Contrast:
        """sum_g w_g mu_g: the estimate, and its variance as the seed part (between-seed variance of the
        per-seed contrast / S) plus each group's image part (w_g^2 image_var_g / n_g)."""
        on = np.flatnonzero(w != 0)
        seed_v = float(w @ self.seed_cov @ w) / self.seeds if self.seed_part else 0.0
        variances = np.concatenate([[seed_v], w[on] ** 2 * self.image_var[on] / self.n[on]])
        dfs = np.concatenate([[max(self.seeds - 1, 1)], self.n[on] - 1.0])
        return Contrast(float(w @ self.mean), variances, dfs)

    def pair(self, g: int, h: int, rho: float = 1.0) -> Contrast:
        """mu_g - rho mu_h."""
        w = np.zeros(len(self.mean))
        w[g], w[h] = 1.0, -rho
        return self.contrast(w)

    def ratio_interval(self, g: int, h: int, tail: float) -> tuple[float, float]:
        """Fieller interval of mu_g / mu_h: the ratios R whose contrast mu_g - R mu_h is not rejected."""
        return self.ratio_low(g, h, tail), self.ratio_high(g, h, tail)

    def ratio_low(self, g: int, h: int, tail: float) -> float:
        """Lower end of the Fieller interval, by bisection on "the contrast at R is still clearly > 0".

        When the estimate exceeds 1, R = 1 is made an end of the bracket, so "low > 1" is decided by the
        very comparison that decides "the gap's low > 0": the ratio and the gap never disagree.
        """
        point = self.ratio_point(g, h)
        if not np.isfinite(point):
            return np.nan
        above = lambda r: self.pair(g, h, r).low(tail) > 0  # noqa: E731
        lo, hi = 0.0, point
        if point > 1.0:
            lo, hi = (1.0, point) if above(1.0) else (0.0, 1.0)
        return _bisect(above, lo, hi)[1] if above(lo) else lo

    def ratio_high(self, g: int, h: int, tail: float) -> float:
        """Upper end of the Fieller interval (inf when the reference mean is not clearly above 0);
        "high < 1" is decided by the comparison that decides "the gap's high < 0"."""
        point = self.ratio_point(g, h)
        if not np.isfinite(point):
            return np.nan
        below = lambda r: self.pair(g, h, r).high(tail) < 0  # noqa: E731
        lo, hi = point, None
        if point < 1.0:
            lo, hi = (point, 1.0) if below(1.0) else (1.0, None)
        if hi is None:  # step right until rejected from above
            hi = 2 * lo
            while not below(hi):
                lo, hi = hi, 2 * hi
                if hi > 1e12 * max(point, 1.0):
                    return np.inf
        return _bisect(below, lo, hi)[0]

    def ratio_point(self, g: int, h: int) -> float:
        """mu_g / mu_h, or NaN unless mu_h > 0 and mu_g >= 0 (a ratio of errors)."""
        return self.mean[g] / self.mean[h] if self.mean[h] > 0 and self.mean[g] >= 0 else np.nan


@dataclass(frozen=True)
class PairedMoments:
    """`Moments` for several losses scored on the same seeds and the same test images (a paired design:
    the cells of one seed share their initial weights and batch order, and every cell is scored on the
    same images). A contrast sum_{l,g} W[l, g] mu_{l,g} gets the same two parts as one loss's: the
    between-seed variance of the per-seed contrast / S (seed s of every loss together), and per group the
    image variance of z_i = sum_l W[l, g] (image i's seed-averaged error under loss l) / n_g, which keeps
    each image's errors under the losses together. With one loss it is `Moments.contrast` (tested)."""

    per_seed: np.ndarray  # (S, L, G) per-seed group means
    averaged: np.ndarray  # (L, N) seed-averaged per-image errors
    members: tuple[np.ndarray, ...]  # (G,) image indices of each group

    @classmethod
    def of(cls, values: list[np.ndarray], codes: np.ndarray, n_groups: int) -> PairedMoments:
        """From values[l] (S, N), the same seeds in the same order and the same images for every loss."""
        stacked = np.stack(values, 1)  # (S, L, N)
        members = tuple(np.flatnonzero(codes == g) for g in range(n_groups))
        per_seed = np.stack([stacked[:, :, idx].mean(2) for idx in members], 2)
        return cls(per_seed, stacked.mean(0), members)

    @property
    def mean(self) -> np.ndarray:
        """(L, G) group means over seeds and images."""
        return self.per_seed.mean(0)

    def contrast(self, w: np.ndarray) -> Contrast:
        """sum W[l, g] mu_{l,g} for weights W (L, G)."""
        s = self.per_seed.shape[0]
        per_seed = (self.per_seed * w[None]).sum((1, 2))
        on = [g for g in range(w.shape[1]) if (w[:, g] != 0).any()]
        image_v = [(w[:, g] @ self.averaged[:, self.members[g]]).var(ddof=1) / len(self.members[g]) for g in on]
        variances = np.array([per_seed.var(ddof=1) / s if s >= 2 else np.nan, *image_v])
        dfs = np.array([max(s - 1, 1), *(len(self.members[g]) - 1.0 for g in on)])
        return Contrast(float((w * self.mean).sum()), variances, dfs)


def _bisect(pred: Callable[[float], bool], lo: float, hi: float) -> tuple[float, float]:
    """Shrink [lo, hi] to floating-point resolution keeping pred(lo) != pred(hi) as it was at the start."""
    at_lo = pred(lo)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if not lo < mid < hi:
            break
        if pred(mid) == at_lo:
            lo = mid
        else:
            hi = mid
    return lo, hi


def covered_pairs(groups: list[int], ref: int | None) -> list[tuple[int, int]]:
    """Ordered (worse, better) pairs a decision covers among `groups` (those with an image variance):
    every pair, or each group against the named reference."""
    return list(permutations(groups, 2)) if ref is None else [(g, ref) for g in groups if g != ref]


def hypotheses_per_loss(n_groups: int, ref: int | None, two_sided: bool) -> int:
    """Hypotheses per loss: pairs of groups (unordered when two-sided), or groups against the reference."""
    if ref is not None:
        return n_groups - 1
    return n_groups * (n_groups - 1) // (2 if two_sided else 1)


# ---------------------------------------------------------------- the analysis


def group_intervals(
    result: AuditResult, *, metric: str = "mse", policy: Policy = POLICY, errors: list[LossErrors] | None = None
) -> pd.DataFrame:
    """One row per (loss, group): mean error and its (1 - alpha) two-sided interval (one group alone: no correction).

    For reading, not deciding: the verdicts compare groups (`analyse`), with the family's correction. A
    positive metric's means get the log-scale interval (`Contrast.positive_interval`: positive, finite); psnr
    (dB, already a log scale) the plain one. `errors`: the result's `loss_errors` for `metric`, when the
    caller has them (`analyse`).

    Examples
    --------
    >>> from fairrecon import group_intervals, run_audit
    >>> result = run_audit(dataset="digits", losses="l2", seeds=2, epochs=1, hidden=32, limit=200, test_limit=80)
    >>> table = group_intervals(result)
    >>> table[["loss", "group", "metric", "n", "seeds"]]
      loss group metric   n  seeds
    0   l2   0.3    mse  40      2
    1   l2   0.9    mse  40      2
    >>> bool(((0 < table["ci_low"]) & (table["ci_low"] < table["mean"]) & (table["mean"] < table["ci_high"])).all())
    True
    """
    result = result.arms()  # one arm per (loss, objective), named in the loss column (AuditResult.arms)
    rows = []
    for le in errors if errors is not None else loss_errors(result, metric=metric):
        mom = Moments.of(le.values, le.codes, len(le.names), seed_part=not _external(result))
        for g, name in enumerate(le.names):
            c = mom.contrast(np.eye(len(le.names))[g])
            low, high = _mean_interval(c, policy.alpha / 2, metric)
            rows.append(
                {
                    "loss": le.loss,
                    "group": name,
                    "metric": metric,
                    "mean": c.estimate,
                    "ci_low": low,
                    "ci_high": high,
                    "n": int(mom.n[g]),
                    "seeds": len(le.seeds),
                }
            )
    return pd.DataFrame(rows, columns=["loss", "group", "metric", "mean", "ci_low", "ci_high", "n", "seeds"])


def _mean_interval(c: Contrast, tail: float, metric: str) -> tuple[float, float]:
    """A mean's interval: on the log scale for a positive metric, else (psnr, or a mean not above 0: every image
    reconstructed perfectly, up to float32 rounding, which can leave ssim_error a little below 0) the plain one."""
    if positive_metric(metric) and np.isfinite(c.estimate) and c.estimate > 0:
        return c.positive_interval(tail)
    return c.low(tail), c.high(tail)


DISPARITY_COLUMNS = [
    "loss",
    "metric",
    "reference",
    "worst",
    "reference_mean",
    "worst_mean",
    "gap",
    "gap_low",
    "gap_high",
    "ratio",
    "ratio_low",
    "ratio_high",
    "gap_lcb",
    "gap_ucb",
    "ratio_lcb",
    "ratio_ucb",
    "se",
    "seed_share",
    "p_value",
    "p_corrected",
    "mde",
    "mde_relative",
    "drift",
    "drift_low",
    "drift_high",
    "unsettled",
    "tail_group",
    "tail_images",
    "tail_share",
    "trimmed_ratio",
    "trimmed_ratio_low",
    "trimmed_ratio_high",
    "adjusted_reference",
    "adjusted_worst",
    "adjusted_gap",
    "adjusted_gap_low",
    "adjusted_gap_high",
    "adjusted_gap_lcb",
    "adjusted_gap_ucb",
    "n_min",
    "seeds",
    "verdict",
    "warnings",
]

CONTRAST_COLUMNS = [
    "loss",
    "reference",
    "metric",
    "pair",
    "reference_pair",
    "loss_ratio",
    "reference_ratio",
    "ratio",
    "difference",
    "low",
    "high",
    "p_value",
    "p_corrected",
    "seeds",
    "verdict",
    "warnings",
]


EFFECT_COLUMNS = [
    "loss",
    "objective",
    "arm",
    "metric",
    "pair",
    "erm_pair",
    "ratio",
    "erm_ratio",
    "ratio_change",
    "gap_change",
    "low",
    "high",
    "error_change",
    "error_low",
    "error_high",
    "p_value",
    "p_corrected",
    "seeds",
    "verdict",
    "warnings",
]


@dataclass(frozen=True)
class Analysis:
    """An audit's statistics for one metric, computed once by `analyse` and passed to every surface
    (terminal, report.md, report.html, summary.json, the gate): per-group intervals, one decided row
    per loss, each loss against the reference loss, and the policy and families that decided them.

    Examples
    --------
    >>> from fairrecon import analyse, run_audit
    >>> result = run_audit(dataset="digits", losses="l1,l2", seeds=2, epochs=1, hidden=32, limit=200, test_limit=80)
    >>> analysis = analyse(result)
    >>> analysis.metric, analysis.losses, analysis.pairs, analysis.m
    ('mse', ('l1', 'l2'), 1, 2)
    >>> analysis.confidence  # each interval's level: 1 - alpha / m
    0.975
    >>> analysis.reference_loss, analysis.contrasts["loss"].tolist()  # l1 against l2, paired
    ('l2', ['l1'])
    """

    metric: str
    intervals: pd.DataFrame  # loss, group, metric, mean, ci_low, ci_high, n, seeds
    disparities: pd.DataFrame  # one row per loss of the family: DISPARITY_COLUMNS, see `disparities`
    policy: Policy
    reference: str  # "best" or a group name
    losses: tuple[str, ...]  # the family's losses
    pairs: int  # hypotheses per loss (group pairs, or groups against the named reference)
    adjusted: bool  # whether the adjusted_* columns are filled
    frontier: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=FRONTIER_COLUMNS))  # see `frontier`
    contrasts: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=CONTRAST_COLUMNS))  # see below
    reference_loss: str | None = None  # the loss every other is compared with (`loss_contrasts`); None: one loss
    effects: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=EFFECT_COLUMNS))  # `objective_effects`
    external: bool = False  # one already-trained model: intervals over test images only
    trained_on_test: int = 0  # test images the model was trained on, as its user said (`external.audit_model`)

    @property
    def m(self) -> int:
        """The Bonferroni divisor: hypotheses in the family (1 without correction)."""
        return self.policy.divisor(len(self.losses) * self.pairs)

    @property
    def tail(self) -> float:
        """Probability in each tail of one interval of the family (the verdicts' intervals)."""
        return self.policy.tail(len(self.losses) * self.pairs)

    @property
    def confidence(self) -> float:
        """Each interval's own confidence level, 1 - alpha / m."""
        return 1 - self.policy.alpha / self.m

    @property
    def contrast_m(self) -> int:
        """The loss contrasts' own Bonferroni divisor: one hypothesis per loss compared with the reference loss."""
        return self.policy.divisor(max(len(self.contrasts), 1))

    @property
    def contrast_confidence(self) -> float:
        """Each loss contrast interval's confidence level (always two-sided: "fairer" and "less fair" are both claims)."""
        return 1 - self.policy.alpha / self.contrast_m

    @property
    def effect_m(self) -> int:
        """The objective effects' own Bonferroni divisor: one hypothesis per arm compared with its erm twin."""
        return self.policy.divisor(max(len(self.effects), 1))

    @property
    def effect_confidence(self) -> float:
        """Each objective effect interval's confidence level (two-sided, as the loss contrasts')."""
        return 1 - self.policy.alpha / self.effect_m

    @property
    def method(self) -> str:
        """How the intervals are made and how the verdicts are decided (one or two sentences)."""
        p, family = self.policy, f"{len(self.losses)} loss(es) x {self.pairs} group pair(s)"
        each = (
            f"Bonferroni over {family}, so each {'interval' if p.two_sided else 'lower bound'} is at "
            f"{100 * self.confidence:.4g}%"
            if p.correction == "bonferroni"
            else f"no correction over {family}"
        )
        check = "fairrecon check" + ("" if self.metric == metrics.DEFAULT else f" --metric {self.metric}")
        check += " --max-ratio 1" if positive_metric(self.metric) else " --max-gap 0"
        over = (
            "Intervals over test images only (one already-trained model: another training run of the same "
            "recipe is not covered)"
            if self.external
            else "Intervals over training seeds and test images"
        )
        scale = "; means on the log scale; ratios: Fieller" if positive_metric(self.metric) else ""
        text = (
            f"{over} (t quantiles, Cochran-Cox{scale}); "
            f"{1 - p.alpha:.0%} confidence for all verdicts together "
            f"({'two-sided' if p.two_sided else 'one-sided'}, {each}). "
            f"'clear gap' means `{check}` cannot pass."
        )
        if len(self.contrasts):
            compared = (
                f"each loss's worst/best ratio over {self.reference_loss}'s (log scale, delta method)"
                if positive_metric(self.metric)
                else f"each loss's gap minus {self.reference_loss}'s"
            )
            text += (
                f" Loss against loss: {compared}, paired by seed and test image, {1 - p.alpha:.0%} confidence "
                + ("for the comparison" if len(self.contrasts) == 1 else f"for the {len(self.contrasts)} together")
                + (f" (Bonferroni, each at {100 * self.contrast_confidence:.4g}%)." if self.contrast_m > 1 else ".")
            )
        if len(self.effects):
            k = len(self.effects)
            changed = "worst/best ratio over its erm twin's" if positive_metric(self.metric) else "gap minus erm's"
            text += (
                f" Objective against erm: each arm's {changed}, paired by seed and test image, "
                f"{1 - p.alpha:.0%} confidence "
                + ("for the comparison" if k == 1 else f"for the {k} together")
                + (f" (Bonferroni, each at {100 * self.effect_confidence:.4g}%)" if self.effect_m > 1 else "")
                + "; the change in overall error at the same level."
            )
        return text

    def policy_record(self) -> dict:
        """The policy and its families, enough to re-derive every decision (summary.json)."""
        return {
            "alpha": self.policy.alpha,
            "correction": self.policy.correction,
            "two_sided": self.policy.two_sided,
            "reference": self.reference,
            "losses": list(self.losses),
            "pairs_per_loss": self.pairs,
            "m": self.m,
            "interval_confidence": self.confidence,
            "reference_loss": self.reference_loss,
            "contrasts_m": self.contrast_m if len(self.contrasts) else 0,
            "contrast_interval_confidence": self.contrast_confidence if len(self.contrasts) else None,
            "effects_m": self.effect_m if len(self.effects) else 0,
            "effect_interval_confidence": self.effect_confidence if len(self.effects) else None,
            "test_images_trained_on": self.trained_on_test,
            "min_group_n": MIN_GROUP_N,
            "tail_share": TAIL_SHARE,
            "tail_fraction": TAIL_FRACTION,
        }


def analyse(
    result: AuditResult,
    *,
    metric: str = "mse",
    policy: Policy = POLICY,
    reference: str = "best",
    losses: list[str] | None = None,
    adjusted: bool = False,
    pca: pd.DataFrame | None = None,
    reference_loss: str | None = None,
) -> Analysis:
    """The statistics of a result, once: per-group intervals, one decided row per loss, and each loss
    against the reference loss, paired by seed and test image (per arm, where cells differ by objective:
    AuditResult.arms).

    Parameters
    ----------
    result : AuditResult
        From `run_audit` or `AuditResult.load`.
    metric : str
        The error compared: one a verdict may use (`fairrecon metrics`; default mse).
    policy : Policy
        alpha, correction and sidedness (default `POLICY`, the one every surface uses).
    reference : str
        "best" (every pair of groups) or a group name (every group against it).
    losses : list of str, optional
        Decide for these losses only (a smaller family, so narrower intervals).
    adjusted : bool
        Also decide on each image's error in excess of its own group's rank-k PCA error.
    pca : DataFrame, optional
        That PCA baseline, per image or per group (default: recomputed from the result's spec).
    reference_loss : str, optional
        The loss every other is compared with (default: the one the result records, else l2 when present,
        else the first; none with one loss).

    Returns
    -------
    Analysis
        Its `disparities` has one row per loss (see `disparities` for the columns), its `contrasts` one row per
        loss against the reference loss (see `loss_contrasts`).

    Examples
    --------
    >>> from fairrecon import analyse, run_audit
    >>> result = run_audit(dataset="digits", losses="l1,l2", seeds=2, epochs=1, hidden=32, limit=200, test_limit=80)
    >>> analysis = analyse(result)
    >>> analysis.disparities[["loss", "worst", "reference", "seeds", "n_min"]]
      loss worst reference  seeds  n_min
    0   l1   0.9       0.3      2     40
    1   l2   0.9       0.3      2     40
    >>> sorted(set(analysis.disparities["verdict"]) - {"clear gap", "no clear gap", "insufficient data"})
    []
    >>> analysis.contrasts[["loss", "reference", "metric", "pair", "reference_pair", "seeds"]]
      loss reference metric     pair reference_pair  seeds
    0   l1        l2    mse  0.9/0.3        0.9/0.3      2
    """
    result = result.arms()
    errors = loss_errors(result, metric=metric)  # once, for every table below
    table = disparities(
        result,
        metric=metric,
        policy=policy,
        reference=reference,
        losses=losses,
        adjusted=adjusted,
        pca=pca,
        errors=errors,
    )
    names = group_order(result)
    ref = None if reference == "best" else names.index(reference)
    family = tuple(family_losses(result, losses))
    analysis = Analysis(
        metric,
        group_intervals(result, metric=metric, policy=policy, errors=errors),
        table,
        policy,
        reference,
        family,
        hypotheses_per_loss(len(names), ref, policy.two_sided),
        adjusted or pca is not None,
        external=_external(result),
        trained_on_test=int((result.info or {}).get("test_images_trained_on") or 0),
    )
    chosen = choose_reference_loss(result, family, reference_loss)
    return replace(
        analysis,
        frontier=frontier(result, analysis, errors=errors),
        contrasts=loss_contrasts(result, table, metric=metric, policy=policy, reference_loss=chosen, errors=errors),
        reference_loss=chosen,
        effects=objective_effects(result, table, metric=metric, policy=policy, errors=errors),
    )


def choose_reference_loss(result: AuditResult, family: tuple[str, ...], given: str | None) -> str | None:
    """The loss every other loss is compared with: the one given, else the one the result records (an audit run
    with --reference-loss), else l2 when it is in the family, else the family's first loss; None for one loss."""
    chosen = given or (result.info or {}).get("reference_loss")
    if chosen is not None and chosen not in family:
        raise UserError(f"reference loss '{chosen}' is not among this analysis' losses: {', '.join(family)}")
    if len(family) < 2:
        return None
    return chosen or ("l2" if "l2" in family else family[0])


# ---------------------------------------------------------------- the fairness-accuracy frontier

FRONTIER_COLUMNS: list[str] = [
    "loss",
    "metric",
    "overall",
    "overall_low",
    "overall_high",
    "ratio",
    "ratio_low",
    "ratio_high",
    "worst",
    "reference",
    "verdict",
    "pareto",
]


def frontier(result: AuditResult, analysis: Analysis, *, errors: list[LossErrors] | None = None) -> pd.DataFrame:
    """The fairness-accuracy frontier: one row per loss of the analysis, its overall held-out error (the mean
    over seeds and every test image) against its worst/best ratio.

    overall_low/high: the overall mean's interval, made as every interval here is (seed part plus each group's
    image part, Cochran-Cox t; the overall mean is the contrast with weights n_g / N; on the log scale for a
    positive metric, as the group means) at the same level as the verdicts' intervals (1 - alpha/m). ratio,
    ratio_low, ratio_high, worst, reference and verdict are the verdict table's own values
    (`analysis.disparities`), not recomputed. pareto: no other loss has both a lower overall error and a lower
    ratio, by point estimates (False where either is missing). Ratios of psnr are not defined, so for psnr
    every pareto is False.
    """
    result = result.arms()  # one arm per (loss, objective), named in the loss column (AuditResult.arms)
    d = analysis.disparities.set_index("loss")
    by_loss = _by_loss(result, analysis.metric, list(analysis.losses), errors)
    external = _external(result)
    rows = []
    for loss in analysis.losses:
        row = {
            "loss": loss,
            "metric": analysis.metric,
            "overall": np.nan,
            "overall_low": np.nan,
            "overall_high": np.nan,
        }
        le = by_loss.get(loss)
        if le is not None:
            mom = Moments.of(le.values, le.codes, len(le.names), seed_part=not external)
            c = mom.contrast(mom.n / mom.n.sum())
            low, high = _mean_interval(c, analysis.tail, analysis.metric)
            row.update(overall=c.estimate, overall_low=low, overall_high=high)
        row.update({k: d.loc[loss, k] for k in ("ratio", "ratio_low", "ratio_high", "worst", "reference", "verdict")})
        rows.append(row)
    out = pd.DataFrame(rows, columns=FRONTIER_COLUMNS[:-1])
    out["pareto"] = pareto_flags(out["overall"].to_numpy(dtype=float), out["ratio"].to_numpy(dtype=float))
    return out


def pareto_flags(error: np.ndarray, ratio: np.ndarray) -> np.ndarray:
    """True where no other point has both a lower error and a lower ratio (strictly); False where either is NaN."""
    ok = np.isfinite(error) & np.isfinite(ratio)
    dominated = ((error[None, :] < error[:, None]) & (ratio[None, :] < ratio[:, None]) & ok[None, :]).any(1)
    return ok & ~dominated


def disparities(
    result: AuditResult,
    *,
    metric: str = "mse",
    policy: Policy = POLICY,
    reference: str = "best",
    losses: list[str] | None = None,
    adjusted: bool = False,
    pca: pd.DataFrame | None = None,
    errors: list[LossErrors] | None = None,
) -> pd.DataFrame:
    """One row per loss of the family: the worst group's gap and ratio against the reference, decided by `policy`.

    gap = worst - reference in the metric's bad direction (for psnr: reference dB - worst dB), so
    gap >= 0 when reference="best"; ratio = worst / reference (positive metrics only, not psnr), with
    Fieller's interval, the one interval of the relative gap (ratio - 1) on every surface.
    gap_low/gap_high and ratio_low/ratio_high: that pair's interval at the per-interval level 1 - alpha/m.
    The decision covers every pair of groups (reference="best") or every group against the named reference,
    among the groups with at least two test images: gap_lcb / ratio_lcb are the largest lower ends over
    those (worse, better) pairs (gap_lcb > 0 exactly when ratio_lcb > 1), gap_ucb / ratio_ucb the largest
    upper ends (ratio_ucb may be inf: no upper bound), the numbers the gate compares with its thresholds
    (`gate.py`). se: the row pair's standard error; seed_share: the part of its variance that training
    randomness contributes (near 1: more seeds narrow the interval; near 0: only more test images do).
    p_value: the row pair's two-sided test of "no gap" (the one its interval inverts); p_corrected: the
    family's, min over covered pairs of min(1, m p), < alpha exactly when gap_lcb > 0. mde: the gap the row
    pair would detect with 80% power (mde_relative: over the reference mean). tail_*: the group whose top TAIL_FRACTION of images (tail_images of them)
    carry the largest share of its summed error (tail_share); trimmed_ratio*: the row pair's ratio and
    interval without each group's top TAIL_FRACTION of images (a sensitivity line, not the verdict).
    verdict: see `verdict`; warnings: its reasons and other notes.
    adjusted_*: the same for each image's error in excess of its own group's rank-k PCA error
    (k = spec.latent), filled when adjusted=True or `pca` is given (per image from `pca_errors`, or
    per group from `pca_reference`).
    """
    result = result.arms()  # one arm per (loss, objective), named in the loss column (AuditResult.arms)
    _check_metric(metric, result, adjusted=adjusted or pca is not None)
    family = family_losses(result, losses)
    by_loss = _by_loss(result, metric, family, errors)
    names = group_order(result)
    if reference != "best" and reference not in names:
        raise UserError(f"reference group '{reference}' not in this result; groups: {', '.join(names)} (or 'best')")
    ref = None if reference == "best" else names.index(reference)
    with_pca = adjusted or pca is not None
    if with_pca and by_loss:
        baseline_of = _baseline_lookup(result, metric, pca)
        if any(np.isnan(baseline_of(le)).any() for le in by_loss.values()):
            raise UserError("the PCA table does not cover every test image (or group) of this result")
    m = len(family) * hypotheses_per_loss(len(names), ref, policy.two_sided)
    decide: dict[str, Any] = dict(
        names=names, ref=ref, tail=policy.tail(m), scale=policy.divisor(m) * (2 if policy.two_sided else 1)
    )
    sign = 1.0 if higher_is_worse(metric) else -1.0
    ratio = positive_metric(metric)
    external = _external(result)
    rows = []
    for loss in family:
        row: dict[str, Any] = {"loss": loss, "metric": metric}
        le, decisive = by_loss.get(loss), None
        if le is not None:
            mom = Moments.of(sign * le.values, le.codes, len(names), seed_part=not external)
            row.update(n_min=int(mom.n.min()), seeds=len(le.seeds))
            valid = [g for g in range(len(names)) if mom.n[g] >= 2]  # a group needs two images for an image variance
            if len(valid) >= 2 and (ref is None or ref in valid):
                decisive = _decide(row, mom, valid=valid, ratio=ratio, **decide)
                row.update(
                    reference_mean=sign * mom.mean[names.index(row["reference"])],
                    worst_mean=sign * mom.mean[names.index(row["worst"])],
                )
                if ratio and sign > 0:
                    pair_codes = names.index(row["worst"]), names.index(row["reference"])
                    row.update(_tails(le, *pair_codes, decide["tail"], external=external))
                if with_pca:
                    excess = Moments.of(
                        sign * (le.values - baseline_of(le)[None, :]), le.codes, len(names), seed_part=not external
                    )
                    adj: dict = {}
                    _decide(adj, excess, valid=valid, ratio=False, **decide)
                    row.update(
                        {
                            "adjusted_" + k: adj[k]
                            for k in ("reference", "worst", "gap", "gap_low", "gap_high", "gap_lcb", "gap_ucb")
                        }
                    )
        pair = (row["worst"], row["reference"]) if "worst" in row else None
        drift = gap_drift(result, loss, *pair, metric=metric) if pair and pair[0] != pair[1] else None
        row.update(zip(("drift", "drift_low", "drift_high"), np.exp(_drift_logs(drift))))
        reasons = insufficient(result, loss, le, pair=pair, external=external)  # the data checks
        if ratio and np.isfinite(row.get("gap_lcb", np.nan)) and not np.isfinite(row.get("ratio_lcb", np.nan)):
            reasons.append("a group's mean error is not above 0: no ratio")
        # the verdict at ratio 1 had not settled (last of the reasons, so a gate at another threshold can tell a
        # refusal for this alone and judge its own decision's settledness instead: gate._loss_outcome)
        moving = _unsettled(result, loss, pair, row) if pair is not None and pair[0] != pair[1] else None
        row["unsettled"] = bool(moving) and not reasons
        reasons += [moving] if moving else []
        row["verdict"] = verdict(gap_lcb=row.get("gap_lcb", np.nan), reasons=reasons)
        notes = _notes(row, decisive, external, result.spec)
        row["warnings"] = "; ".join(reasons + unconverged(result, loss) + notes)
        rows.append(row)
    return pd.DataFrame(rows, columns=DISPARITY_COLUMNS)


def verdict(*, gap_lcb: float, reasons: list[str]) -> str:
    """The words for one loss, used by every surface: "insufficient data" when a check failed (or there
    is no interval), else "clear gap" when some covered pair's interval excludes "no gap" (gap_lcb > 0,
    which is ratio_lcb > 1, p_corrected < alpha and `check --max-ratio 1` failing), else "no clear gap"."""
    if reasons or not np.isfinite(gap_lcb):
        return INSUFFICIENT
    return CLEAR if gap_lcb > 0 else NO_CLEAR


def _decide(
    row: dict,
    mom: Moments,
    *,
    names: tuple[str, ...],
    valid: list[int],
    ref: int | None,
    tail: float,
    scale: int,
    ratio: bool,
) -> tuple[str, str] | None:
    """Fill `row` with the row pair's gap, ratio and test and the decision over the covered pairs (among the
    `valid` groups); return the covered pair with the largest lower end (the one that decides)."""
    worst, r = _pick(mom.mean, ref, valid)
    c = mom.pair(worst, r)
    pairs = covered_pairs(valid, ref)
    lows = np.array([mom.pair(g, h).low(tail) for g, h in pairs])
    row.update(
        reference=names[r],
        worst=names[worst],
        gap=c.estimate,
        gap_low=c.low(tail),
        gap_high=c.high(tail),
        gap_lcb=float(lows.max()),
        gap_ucb=float(np.max([mom.pair(g, h).high(tail) for g, h in pairs])),
        se=c.se,
        seed_share=c.seed_share,
        p_value=c.p_two_sided(),
        p_corrected=float(np.minimum(1.0, scale * np.min([mom.pair(g, h).p_greater() for g, h in pairs]))),
    )
    row["mde"] = (c.quantile(tail) + c.quantile(1 - POWER)) * c.se
    row["mde_relative"] = row["mde"] / abs(mom.mean[r]) if ratio and mom.mean[r] != 0 else np.nan
    if ratio:
        row.update(
            ratio=mom.ratio_point(worst, r),
            ratio_low=mom.ratio_low(worst, r, tail),
            ratio_high=mom.ratio_high(worst, r, tail),
            ratio_lcb=float(np.max([mom.ratio_low(g, h, tail) for g, h in pairs])),
            ratio_ucb=float(np.max([mom.ratio_high(g, h, tail) for g, h in pairs])),
        )
    if np.isnan(lows).all():
        return None
    g, h = pairs[int(np.nanargmax(lows))]
    return names[g], names[h]


def _pick(mu: np.ndarray, ref: int | None, valid: list[int]) -> tuple[int, int]:
    """(worst, reference) among the valid groups: the reference is the best one unless named; the worst is
    never the reference."""
    r = valid[int(np.argmin(mu[valid]))] if ref is None else ref
    others = [g for g in valid if g != r]
    return others[int(np.argmax(mu[others]))], r


def _external(result: AuditResult) -> bool:
    return bool((result.info or {}).get("external_model"))


# ---------------------------------------------------------------- a few images carrying the error (tails)

TAIL_FRACTION = 0.01  # the share of a group's images whose share of the error is measured (the top 1%)
TAIL_SHARE = (
    0.10  # above this share, the verdict warns (chosen by benchmarks/coverage.py --tails; docs/method/statistics.md)
)


def _tails(le: LossErrors, worst: int, ref: int, tail: float, *, external: bool = False) -> dict:
    """How much of each group's summed (seed-averaged) error its top TAIL_FRACTION of images carry (the group
    where it is largest), and the row pair's ratio with its Fieller interval without each group's top images."""
    averaged = le.values.mean(0)
    keep = np.ones(len(averaged), dtype=bool)
    best: dict[str, Any] = {"tail_group": None, "tail_images": 0, "tail_share": np.nan}
    for g, idx in enumerate(le.members):
        k = top_count(len(idx))
        if not len(idx) or averaged[idx].sum() <= 0:
            continue
        top = idx[np.argsort(averaged[idx])[::-1][:k]]
        keep[top] = False
        share = float(averaged[top].sum() / averaged[idx].sum())
        if not share <= best["tail_share"]:  # the first group, or a larger share
            best = {"tail_group": le.names[g], "tail_images": k, "tail_share": share}
    trimmed = Moments.of(le.values[:, keep], le.codes[keep], len(le.names), seed_part=not external)
    if (not external and le.values.shape[0] < 2) or (trimmed.n < 2).any():
        return {**best, "trimmed_ratio": np.nan, "trimmed_ratio_low": np.nan, "trimmed_ratio_high": np.nan}
    low, high = trimmed.ratio_interval(worst, ref, tail)
    return {
        **best,
        "trimmed_ratio": trimmed.ratio_point(worst, ref),
        "trimmed_ratio_low": low,
        "trimmed_ratio_high": high,
    }


def top_count(n: int) -> int:
    """How many images are a group's top TAIL_FRACTION: at least one."""
    return max(1, int(np.ceil(TAIL_FRACTION * n))) if n else 0


# ---------------------------------------------------------------- loss against loss (paired contrasts)

FAIRER, LESS_FAIR, NOT_DIFFERENT = "clearly fairer", "clearly less fair", "not clearly different"


def loss_contrasts(
    result: AuditResult,
    table: pd.DataFrame,
    *,
    metric: str = "mse",
    policy: Policy = POLICY,
    reference_loss: str | None = None,
    errors: list[LossErrors] | None = None,
) -> pd.DataFrame:
    """Each loss of `table` (a `disparities` table) against `reference_loss`, paired by seed and test image.

    For a positive metric, ratio = (the loss's worst/reference ratio) / (the reference loss's), each loss
    on its own row pair (its worst group over its reference group, as in `table`): > 1, the loss is less
    fair. Its interval is made on the log scale: log ratio is a contrast of four group means' logs, whose
    variance (delta method: weights 1 / mean) has the two parts of every interval here, with the seeds and
    the images paired across the two losses (`PairedMoments`), and Cochran-Cox's t. For psnr: difference =
    the loss's dB gap minus the reference loss's, on the plain scale. Only seeds ok under both losses are
    paired (a failed seed of either is left out of both, and said). The family is the contrasts (Bonferroni
    over them), two-sided at the policy's alpha. verdict: "clearly less fair" (low > 1), "clearly fairer"
    (high < 1), "not clearly different", or "insufficient data" (a reason from either loss's verdict other
    than failed cells, fewer than 2 paired seeds, no pair of groups).

    Where cells differ by objective (`table` has arms, AuditResult.arms), the losses compared are those
    trained under the reference loss's objective (the plain losses, for a plain reference loss); each
    objective against erm is `objective_effects`.
    """
    if reference_loss is None or table.empty:
        return pd.DataFrame(columns=CONTRAST_COLUMNS)
    objective = split_arm(reference_loss)[1]
    others = [a for a in table["loss"] if a != reference_loss and split_arm(a)[1] == objective]
    rows = paired_contrasts(
        result, table, [(a, reference_loss) for a in others], metric=metric, policy=policy, errors=errors
    )
    return pd.DataFrame(rows, columns=CONTRAST_COLUMNS)


def paired_contrasts(
    result: AuditResult,
    table: pd.DataFrame,
    compared: list[tuple[str, str]],
    *,
    metric: str = "mse",
    policy: Policy = POLICY,
    errors: list[LossErrors] | None = None,
    overall: bool = False,
    kind: str = "loss",
) -> list[dict]:
    """The one paired comparison of two arms of `table` (a `disparities` table), for each (arm, reference) in
    `compared`, all one Bonferroni family (two-sided): rows with CONTRAST_COLUMNS (see `loss_contrasts`);
    `kind` names what is compared in the warnings ("loss" or "arm"). With
    `overall`, each row also has the change in overall error from the same `PairedMoments` at the same level
    (`_overall_change`): error_change, error_low, error_high."""
    if not compared:
        return []
    names_in = list(dict.fromkeys(n for pair in compared for n in pair))
    by_loss = _by_loss(result, metric, names_in, errors)
    rows_of = table.set_index("loss")
    m = len(compared)
    tail = replace(policy, two_sided=True).tail(m)
    ratio_scale = positive_metric(metric)
    sign = 1.0 if higher_is_worse(metric) else -1.0
    external = _external(result)
    kinds = {"loss": "losses", "arm": "arms"}[kind]
    out = []
    for loss, reference_loss in compared:
        a, b = rows_of.loc[loss], rows_of.loc[reference_loss]
        row: dict = {"loss": loss, "reference": reference_loss, "metric": metric}
        reasons, notes = [], []
        for name, r in ((loss, a), (reference_loss, b)):
            why = insufficient(
                result, name, by_loss.get(name), pair=_pair(r), external=external, count_failed=False, row=r.to_dict()
            )
            if why:
                reasons.append(
                    f"{name}: {'; '.join(why)}"
                    if name == loss
                    else f"the reference {kind} {name} has insufficient data (see its warning)"
                )
            if not isinstance(r["worst"], str):
                reasons.append(f"{name}: no pair of groups to compare")
        le_a, le_b = by_loss.get(loss), by_loss.get(reference_loss)
        if le_a is not None and le_b is not None and isinstance(a["worst"], str) and isinstance(b["worst"], str):
            if not np.array_equal(le_a.index, le_b.index):
                raise UserError(f"{kinds} {loss} and {reference_loss} were not scored on the same test images")
            common = np.intersect1d(le_a.seeds, le_b.seeds)
            left_out = sorted(set(le_a.seeds) ^ set(le_b.seeds))
            if left_out:
                notes.append(
                    f"paired on the {len(common)} seed(s) ok under both {kinds} "
                    f"(seed(s) {', '.join(map(str, left_out))} left out of both)"
                )
            row.update(
                seeds=len(common),
                pair=f"{a['worst']}/{a['reference']}",
                reference_pair=f"{b['worst']}/{b['reference']}",
            )
            if len(common) < 2:
                reasons.append(f"only {len(common)} seed(s) ok under both {kinds}: pairing needs at least 2")
            else:
                names = le_a.names
                pm = PairedMoments.of(
                    [sign * le.values[np.searchsorted(le.seeds, common)] for le in (le_a, le_b)],
                    le_a.codes,
                    len(names),
                )
                numbers = _contrast_numbers(pm, names, a, b, tail, m, policy, ratio_scale)
                if not numbers:
                    reasons.append(f"a group's mean error is not above 0 under one of the {kinds}: no ratio of ratios")
                row.update(numbers)
                if overall:
                    row.update(_overall_change(pm, tail, ratio_scale, sign))
                if row["pair"] != row["reference_pair"]:
                    notes.append(
                        f"the two {kinds}' gaps are between different groups ({loss}: {row['pair']}, {reference_loss}: "
                        f"{row['reference_pair']}): the comparison is of their sizes, not their direction"
                    )
        row["verdict"] = _contrast_verdict(row, reasons, ratio_scale)
        row["warnings"] = "; ".join(reasons + notes)
        out.append(row)
    return out


def _overall_change(pm: PairedMoments, tail: float, ratio: bool, sign: float) -> dict:
    """Arm 0's overall mean error against arm 1's (the overall mean: the contrast with weights n_g / N, as in
    the frontier), paired: for a positive metric their ratio, its interval on the log scale (delta method);
    for psnr the difference of the overall means in the metric's own units (dB; `pm` holds the signed values,
    so the sign is undone)."""
    n = np.array([len(idx) for idx in pm.members], dtype=float)
    share = n / n.sum()
    mean = pm.mean
    w = np.zeros_like(mean)
    if ratio:
        level = mean @ share  # (2,) overall means
        if not (level > 0).all():
            return {}
        w[0], w[1] = share / level[0], -share / level[1]
        c = replace(pm.contrast(w), estimate=float(np.log(level[0]) - np.log(level[1])))
        return {
            "error_change": float(np.exp(c.estimate)),
            "error_low": float(np.exp(c.low(tail))),
            "error_high": float(np.exp(c.high(tail))),
        }
    w[0], w[1] = share, -share
    c = pm.contrast(w)
    ends = sorted((sign * c.low(tail), sign * c.high(tail)))
    return {"error_change": sign * c.estimate, "error_low": ends[0], "error_high": ends[1]}


def objective_effects(
    result: AuditResult,
    table: pd.DataFrame,
    *,
    metric: str = "mse",
    policy: Policy = POLICY,
    errors: list[LossErrors] | None = None,
) -> pd.DataFrame:
    """Each training objective against erm, loss by loss: every arm of `table` (a `disparities` table of arms,
    AuditResult.arms) trained under an objective other than erm, against its erm twin (the same loss, the
    same seeds' initial weights and batch order, the same test images), by `paired_contrasts`, the machinery
    of `loss_contrasts`, as their own Bonferroni family (two-sided) with the same verdict words.

    ratio_change: the arm's worst/reference ratio over its erm twin's (< 1: the objective shrinks the gap),
    each on its own row pair (psnr: gap_change, the arm's dB gap minus erm's); low, high: its interval.
    error_change: the arm's overall mean error over erm's (psnr: the difference of the overall means, dB), with
    error_low, error_high at the same level; it does not enter the verdict. Arms whose erm twin is not in
    `table` are left out. Empty where every cell is erm."""
    arms = [a for a in table["loss"] if split_arm(a)[1] != "erm" and split_arm(a)[0] in set(table["loss"])]
    rows = paired_contrasts(
        result,
        table,
        [(a, split_arm(a)[0]) for a in arms],
        metric=metric,
        policy=policy,
        errors=errors,
        overall=True,
        kind="arm",
    )
    out = []
    for r in rows:
        loss, objective = split_arm(r["loss"])
        out.append(
            {
                **r,
                "loss": loss,
                "objective": objective,
                "arm": r["loss"],
                "erm_pair": r.get("reference_pair"),
                "ratio": r.get("loss_ratio", np.nan),
                "erm_ratio": r.get("reference_ratio", np.nan),
                "ratio_change": r.get("ratio", np.nan),
                "gap_change": r.get("difference", np.nan),
            }
        )
    return pd.DataFrame(out, columns=EFFECT_COLUMNS)


def _pair(row: pd.Series) -> tuple[str, str] | None:
    return (row["worst"], row["reference"]) if isinstance(row["worst"], str) else None


def _contrast_numbers(
    pm: PairedMoments,
    names: tuple[str, ...],
    a: pd.Series,
    b: pd.Series,
    tail: float,
    m: int,
    policy: Policy,
    ratio: bool,
) -> dict:
    """The contrast of loss a's row pair against loss b's: ratio of ratios (log scale) or difference of gaps."""
    wa, ra, wb, rb = (
        names.index(a["worst"]),
        names.index(a["reference"]),
        names.index(b["worst"]),
        names.index(b["reference"]),
    )
    mean = pm.mean
    w = np.zeros_like(mean)
    if ratio:
        if not (mean[0, [wa, ra]] > 0).all() or not (mean[1, [wb, rb]] > 0).all():
            return {}
        w[0, wa] += 1 / mean[0, wa]
        w[0, ra] -= 1 / mean[0, ra]
        w[1, wb] -= 1 / mean[1, wb]
        w[1, rb] += 1 / mean[1, rb]
        loss_ratio, reference_ratio = mean[0, wa] / mean[0, ra], mean[1, wb] / mean[1, rb]
        c = replace(pm.contrast(w), estimate=float(np.log(loss_ratio) - np.log(reference_ratio)))
        numbers = {
            "loss_ratio": loss_ratio,
            "reference_ratio": reference_ratio,
            "ratio": float(np.exp(c.estimate)),
            "low": float(np.exp(c.low(tail))),
            "high": float(np.exp(c.high(tail))),
        }
    else:
        w[0, wa] += 1
        w[0, ra] -= 1
        w[1, wb] -= 1
        w[1, rb] += 1
        c = pm.contrast(w)
        numbers = {"difference": c.estimate, "low": c.low(tail), "high": c.high(tail)}
    p = c.p_two_sided()
    return {**numbers, "p_value": p, "p_corrected": float(min(1.0, policy.divisor(m) * p))}


def _contrast_verdict(row: dict, reasons: list[str], ratio: bool) -> str:
    """The words of one loss contrast: "clearly less fair" (its interval above "equal"), "clearly fairer"
    (below), "not clearly different", or "insufficient data"."""
    low, high, equal = row.get("low", np.nan), row.get("high", np.nan), 1.0 if ratio else 0.0
    if reasons or not (np.isfinite(low) and np.isfinite(high)):
        return INSUFFICIENT
    return LESS_FAIR if low > equal else FAIRER if high < equal else NOT_DIFFERENT


# ---------------------------------------------------------------- why a verdict cannot be given, and notes


def gap_drift(result: AuditResult, loss: str, worst: str, best: str, *, metric: str = "mse") -> Drift | None:
    """How far the answer is projected to move in as much training again (settled.py): per ok cell of `loss`,
    the trend of log(worst / best held-out error) against log(step) over the last half of its training, on the
    curve points before its final one (the fixed test subset, so every point sees the same images; in the
    metric where the curves record it (mse, mae), else in mse); `settled.Drift` holds the per-seed slopes, their mean and its t interval.
    None without curves (a model of yours); a Drift of fewer than 2 seeds cannot be judged."""
    curves = getattr(result, "curves", None)
    if curves is None or curves.empty:
        return None
    column = metric if metric in curves.columns else metrics.DEFAULT  # curves record mse and mae
    cells = result.cells
    ok = cells.loc[(cells["loss"] == loss) & (cells["status"] == "ok"), "seed"]
    part = curves[(curves["loss"] == loss) & curves["seed"].isin(ok)].assign(group=lambda d: d["group"].astype(str))
    per_seed = []
    for _, cell in part.groupby("seed"):
        wide = cell[cell["step"] < cell["step"].max()].pivot(index="step", columns="group", values=column)
        if worst in wide and best in wide:
            per_seed.append((wide.index.to_numpy(), (wide[worst] / wide[best]).to_numpy()))
    return seed_drift(per_seed)


DB_PER_LOG = 10 / np.log(10)  # a psnr gap in dB moves by this times the change of log(worst / best mse)


def _drift_logs(drift: Drift | None) -> tuple[float, float, float]:
    """A drift's (estimate, low, high) on the log scale of the ratio; NaN when it cannot be judged."""
    if drift is None or drift.seeds < 2:
        return (np.nan, np.nan, np.nan)
    return (drift.estimate, drift.low, drift.high)


def insufficient(
    result: AuditResult,
    loss: str,
    le: LossErrors | None,
    *,
    pair: tuple[str, str] | None = None,
    external: bool = False,
    count_failed: bool = True,
    row: dict | None = None,
) -> list[str]:
    """Why a loss's data cannot support a verdict (empty when they can): failed cells (unless count_failed is
    False: a paired contrast leaves them out of both losses), an answer that had not settled (the decided `row`'s
    interval, moved by its `drift_low` / `drift_high`, could cross the decision's boundary in as much training
    again: settled.could_change), fewer than 2 trained seeds, a test or training
    group under MIN_GROUP_N images."""
    reasons = []
    cells = result.cells[result.cells["loss"] == loss]
    failed = cells[cells["status"] != "ok"]
    if le is None:
        reasons.append("no cell trained without failing")
    elif len(failed) and count_failed:
        reasons.append(
            f"{len(failed)} failed cell(s) left out: "
            + ", ".join(f"{loss}/seed{r.seed} ({r.status})" for r in failed.itertuples())
        )
    if pair is not None and pair[0] != pair[1] and row is not None:
        reason = _unsettled(result, loss, pair, row)
        if reason:
            reasons.append(reason)
    if le is None:
        return reasons
    if not external and len(le.seeds) < 2:
        reasons.append(f"only {len(le.seeds)} trained seed: measuring training randomness needs at least 2")
    small = [f"{n} (n={len(i)})" for n, i in zip(le.names, le.members) if len(i) < MIN_GROUP_N]
    if small:
        reasons.append(f"test group(s) {', '.join(small)}: fewer than {MIN_GROUP_N} test images")
    if not external and "split" in result.groups:
        train = result.groups[result.groups["split"] == "train"]
        tiny = [f"{r.group} (n={r.n})" for r in train.itertuples() if r.n < MIN_GROUP_N]
        if tiny:
            reasons.append(f"training group(s) {', '.join(tiny)}: fewer than {MIN_GROUP_N} training images")
    return reasons


def _unsettled(result: AuditResult, loss: str, pair: tuple[str, str], row: dict[str, Any]) -> str | None:
    """The "had not settled" reason, or None. The decision is the row's: clear gap when the largest lower end
    over the covered pairs is above "no gap" (ratio_lcb > 1; psnr: gap_lcb > 0 dB), else no clear gap; the
    upper end is the row pair's. Both move with the shown pair's drift (exactly the decision for two groups)."""
    shift = np.log(np.array([row.get(k, np.nan) for k in ("drift", "drift_low", "drift_high")], dtype=float))
    if not np.isfinite(shift).all():
        return None
    if not positive_metric(row.get("metric", metrics.DEFAULT)):  # psnr: a gap in dB, moved in dB
        low, high, shift, show = row.get("gap_lcb", np.nan), row.get("gap_high", np.nan), shift * DB_PER_LOG, "dB"
    else:
        with np.errstate(divide="ignore", invalid="ignore"):  # a ratio end at 0 is -inf on the log scale
            low, high, show = np.log(row.get("ratio_lcb", np.nan)), np.log(row.get("ratio_high", np.nan)), "ratio"
    if np.isnan(low) or np.isnan(high) or not could_change(low, high, 0.0, shift[1], shift[2]):
        return None

    def value(v: float) -> str:
        return f"{v:.3g} dB" if show == "dB" else f"{np.exp(v):.3g}"

    if low > 0:
        what = f"its lower end {value(low)} could fall to {value(low + shift[1])}: no clear gap"
    elif low + shift[2] > 0:
        what = f"its lower end {value(low)} could reach {value(low + shift[2])}: a clear gap"
    else:
        what = f"its upper end {value(high)} could fall to {value(high + shift[1])}: group {pair[1]} clearly worse"
    factors = np.exp(shift / DB_PER_LOG if show == "dB" else shift)
    seeds = int(((result.cells["loss"] == loss) & (result.cells["status"] == "ok")).sum())
    trend_alone = could_change(low, high, 0.0, shift[0], shift[0])  # the trend itself, not only its uncertainty
    return (
        f"the answer had not settled: in as much training again the {pair[0]}/{pair[1]} ratio would move "
        f"x{factors[0]:.3f} (one-sided 95% bounds x{factors[1]:.3f} to x{factors[2]:.3f}; its trend over the last "
        f"half of training, {seeds} seeds), and {what}; {_longer(result, loss, more_seeds=not trend_alone)}"
    )


def _longer(result: AuditResult, loss: str, *, more_seeds: bool) -> str:
    """The advice for an answer that had not settled: twice the training (the horizon the rule looked at); more
    seeds too where only the drift's uncertainty, not its trend, reaches the boundary."""
    cells = result.cells[result.cells["loss"] == loss]
    epochs = int(cells["epochs"].max()) if "epochs" in cells and cells["epochs"].notna().any() else None
    spec = result.spec
    if spec.epochs == "auto" and epochs is not None and epochs >= spec.max_epochs:
        advice = f"raise --max-epochs (cells reached its {spec.max_epochs})"
    elif epochs is not None:
        advice = f"train twice as long (--epochs {2 * epochs})"
    else:
        advice = "train longer"
    return advice + (f" or add seeds (--seeds {2 * len(cells)}): the trend's uncertainty decides" if more_seeds else "")


def unconverged(result: AuditResult, loss: str) -> list[str]:
    """A note (not a reason) when some cells' errors had not settled (settled.py): the verdict is about this
    training length; whether the answer itself could still change is `gap_drift`'s question."""
    cells = result.cells[(result.cells["loss"] == loss) & (result.cells["status"] == "ok")]
    if "converged" not in cells:
        return []
    stuck = cells[cells["converged"].astype("boolean").eq(False).fillna(False)]
    if not len(stuck):
        return []
    return [
        f"{len(stuck)} of {len(cells)} cell(s) not converged (an error could still fall by more than "
        f"{DROP:.0%} in as much training again: "
        + ", ".join(f"{loss}/seed{s}" for s in stuck["seed"])
        + "): the verdict holds for this training length"
    ]


def _notes(row: dict, decisive: tuple[str, str] | None, external: bool, spec: AuditSpec) -> list[str]:
    """Warnings that do not change the verdict: one trained model, the deciding pair, low power, a heavy tail."""
    notes = []
    if external:
        notes.append(
            "one already-trained model: the interval covers the choice of test images, "
            "not another training run of the same recipe"
        )
    if row["verdict"] == CLEAR and decisive and decisive != (row["worst"], row["reference"]):
        notes.append(f"decided by group {decisive[0]} vs {decisive[1]}, not the pair shown")
    if row["verdict"] == NO_CLEAR and _low_power(row):
        size = f"{row['mde_relative']:.1%}" if np.isfinite(row["mde_relative"]) else f"{row['mde']:.3g}"
        found = f"low power: a gap of {size} would be found {POWER:.0%} of the time; smaller ones may be missed"
        if external:
            notes.append(f"{found} (the interval covers test images only: {more_test_images(spec)})")
        else:
            more = "add seeds" if row["seed_share"] > 0.5 else more_test_images(spec)
            notes.append(f"{found} (training randomness is {row['seed_share']:.0%} of the variance: {more})")
    if np.isfinite(row.get("tail_share", np.nan)) and row["tail_share"] > TAIL_SHARE:
        notes.append(tail_warning(row))
    return notes


def _low_power(row: dict) -> bool:
    """The gap detectable with POWER is larger than the one estimated."""
    return bool(row.get("mde", np.nan) > abs(row.get("gap", np.nan)))


def tail_warning(row: dict | pd.Series) -> str:
    """The heavy-tail warning of a disparity row, with its sensitivity line (the ratio without the top images)."""
    k, share = int(row["tail_images"]), float(row["tail_share"])
    text = (
        f"heavy tail: in group {row['tail_group']} the top {k} image(s) ({TAIL_FRACTION:.0%} of the group) carry "
        f"{share:.0%} of its summed error, so the mean and its interval rest on a few images"
    )
    if np.isfinite(row.get("trimmed_ratio", np.nan)):
        text += (
            f"; without each group's top {TAIL_FRACTION:.0%}: {row['worst']}/{row['reference']} ratio "
            f"{row['trimmed_ratio']:.3g} [{format_bound(row['trimmed_ratio_low'])}, "
            f"{format_bound(row['trimmed_ratio_high'])}] (a sensitivity line, not the verdict)"
        )
    return text


def format_bound(v: float, digits: int = 3) -> str:
    """One end of an interval as text: 'no upper bound' for +inf, 'n/a' for NaN."""
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "n/a"
    return "no upper bound" if v == np.inf else f"{v:.{digits}g}"


def more_test_images(spec: AuditSpec | None) -> str:
    """What can be done about too few test images, for this dataset: add images where the test split is a
    share of them (folder), a bigger dataset (digits), nothing but balance and the limit where it is fixed."""
    dataset = getattr(spec, "dataset", None)
    limit = getattr(spec, "test_limit", None)
    if limit:
        return f"raise --test-limit (now {limit})"
    if dataset == "folder":
        return "add images to the folder (a share of them is held out for testing)"
    if dataset == "digits":
        return "digits holds 1,797 images in all; a larger dataset (e.g. mnist) has more test images"
    return (
        f"{dataset}'s test set is fixed, and more seeds will not help: balanced group proportions give the "
        "smaller group more test images; otherwise only larger gaps can be told apart here"
    )


# ---------------------------------------------------------------- difficulty adjustment (PCA)


def pca_reconstruct(train: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
    """Rank-k PCA (affine: mean + top-k principal directions) fitted on `train` (n, M), applied to x (m, M)."""
    mean = train.mean(0)
    _, _, vt = np.linalg.svd(train - mean, full_matrices=False)
    v = vt[:k]
    return mean + (x - mean) @ v.T @ v


def pca_errors(data: GroupedData, k: int) -> pd.DataFrame:
    """Per test image: MSE, MAE and PSNR of its own group's rank-k PCA (fitted on that group's training images).

    Each group's best achievable linear reconstruction at capacity k (Samadi et al. 2018): the
    difficulty baseline. An autoencoder is nonlinear and can beat it, so excess error may be negative.
    """
    if k < 1:
        raise UserError(f"PCA rank must be >= 1, got {k}")
    frames = []
    for code, name in enumerate(data.names):
        train = data.train_x[data.train_g == code].flatten(1).double().numpy()
        test = data.test_x[data.test_g == code].flatten(1).double().numpy()
        residual = pca_reconstruct(train, test, k) - test
        mse = (residual**2).mean(1)
        frames.append(
            pd.DataFrame(
                {
                    "group": name,
                    "index": data.test_index[data.test_g == code].numpy(),
                    "mse": mse,
                    "mae": np.abs(residual).mean(1),
                    "psnr": -10.0 * np.log10(np.maximum(mse, PSNR_FLOOR_MSE)),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def pca_reference(data: GroupedData, k: int) -> pd.DataFrame:
    """One row per group: the mean of `pca_errors` over the group's test images."""
    errors = pca_errors(data, k)
    return errors.groupby("group", sort=False)[[m for m in metrics.NAMES if m in errors]].mean().reset_index()


def _baseline_lookup(result: AuditResult, metric: str, pca: pd.DataFrame | None) -> Callable[[LossErrors], np.ndarray]:
    """A function LossErrors -> per-image PCA baseline (N,) in the loss's image order."""
    if pca is None:
        pca = pca_errors(result.grouped_data(), result.spec.latent)  # results.AuditResult.grouped_data
    if "index" in pca.columns:
        per_image = pca.set_index("index")[metric]
        return lambda le: per_image.reindex(le.index).to_numpy(dtype=float)
    per_group = pca.assign(group=pca["group"].astype(str)).set_index("group")[metric]
    return lambda le: per_group.reindex(np.asarray(le.names)[le.codes]).to_numpy(dtype=float)
