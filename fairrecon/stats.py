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

Ratios (Fieller). The ratio interval is the set of R for which the contrast mu_worst - R mu_ref is
not rejected, found by bisection. Its lower end exceeds R exactly when the contrast test at R
rejects, so the ratio interval excludes 1 exactly when the gap interval excludes 0.

Policy. One `Policy` (alpha, correction, sidedness) decides everywhere. With the Bonferroni
correction over the family (losses x group pairs), each interval has level 1 - alpha/m and the
corrected p-value min(1, m p) < alpha exactly when that interval excludes "no gap".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from itertools import permutations

import numpy as np
import pandas as pd
from scipy import optimize, special

from .errors import UserError
from .measure import PSNR_FLOOR_MSE
from .settled import DROP, Drift, could_change, seed_drift

METRICS = ("mse", "mae", "psnr")
CORRECTIONS = ("bonferroni", "none")
MIN_GROUP_N = 30  # fewer test (or training) images in a group: "insufficient data"
POWER = 0.8  # power at which the minimum detectable gap is stated
CLEAR, NO_CLEAR, INSUFFICIENT = "clear gap", "no clear gap", "insufficient data"  # the verdict words


def higher_is_worse(metric: str) -> bool:
    return metric != "psnr"


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


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise UserError(f"unknown metric '{metric}'; allowed: {', '.join(METRICS)}")


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


def group_names(result) -> tuple[str, ...]:
    """The result's groups in their own order (categories of samples.group, else first appearance)."""
    g = result.samples["group"]
    names = g.cat.categories if isinstance(g.dtype, pd.CategoricalDtype) else pd.unique(g)
    return tuple(str(n) for n in names)


def family_losses(result, losses: list[str] | None = None) -> list[str]:
    """The losses a decision covers: every loss of the result (or the named ones), in cell order."""
    order = list(dict.fromkeys(result.cells["loss"]))
    if losses is None:
        return order
    unknown = sorted(set(losses) - set(order))
    if unknown:
        raise UserError(f"unknown loss(es) {unknown}; this result has {', '.join(order)}")
    return [name for name in order if name in losses]


def loss_errors(result, *, metric: str = "mse", losses: list[str] | None = None) -> list[LossErrors]:
    """Per-loss seed x image matrices of the ok cells (losses without any ok cell are left out)."""
    _check_metric(metric)
    names = group_names(result)
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


def to_metric_frame(result, loss: str, *, metric: str = "mse", seed: int | None = None):
    """fairlearn MetricFrame of the mean per-image `metric` by group, for one loss (all ok seeds, or one)."""
    from fairlearn.metrics import MetricFrame

    _check_metric(metric)
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


def covered_pairs(n_groups: int, ref: int | None) -> list[tuple[int, int]]:
    """Ordered (worse, better) pairs a decision covers: every pair, or each group against the named reference."""
    return list(permutations(range(n_groups), 2)) if ref is None else [(g, ref) for g in range(n_groups) if g != ref]


def hypotheses_per_loss(n_groups: int, ref: int | None, two_sided: bool) -> int:
    """Hypotheses per loss: pairs of groups (unordered when two-sided), or groups against the reference."""
    if ref is not None:
        return n_groups - 1
    return n_groups * (n_groups - 1) // (2 if two_sided else 1)


# ---------------------------------------------------------------- the analysis


def group_intervals(result, *, metric: str = "mse", policy: Policy = POLICY) -> pd.DataFrame:
    """One row per (loss, group): mean error and its (1 - alpha) two-sided interval (one group alone: no correction)."""
    rows = []
    for le in loss_errors(result, metric=metric):
        mom = Moments.of(le.values, le.codes, len(le.names), seed_part=not _external(result))
        for g, name in enumerate(le.names):
            c = mom.contrast(np.eye(len(le.names))[g])
            rows.append(
                {
                    "loss": le.loss,
                    "group": name,
                    "metric": metric,
                    "mean": c.estimate,
                    "ci_low": c.low(policy.alpha / 2),
                    "ci_high": c.high(policy.alpha / 2),
                    "n": int(mom.n[g]),
                    "seeds": len(le.seeds),
                }
            )
    return pd.DataFrame(rows, columns=["loss", "group", "metric", "mean", "ci_low", "ci_high", "n", "seeds"])


COLUMNS = [
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
    "ratio_lcb",
    "se",
    "seed_share",
    "p_value",
    "p_corrected",
    "mde",
    "mde_relative",
    "drift",
    "drift_low",
    "drift_high",
    "adjusted_reference",
    "adjusted_worst",
    "adjusted_gap",
    "adjusted_gap_low",
    "adjusted_gap_high",
    "adjusted_gap_lcb",
    "n_min",
    "seeds",
    "verdict",
    "warnings",
]


@dataclass(frozen=True)
class Analysis:
    """An audit's statistics for one metric, computed once by `analyse` and passed to every surface
    (terminal, report.md, report.html, summary.json, the gate): per-group intervals, one decided row
    per loss, and the policy and family (losses x group pairs) that decided them."""

    metric: str
    intervals: pd.DataFrame  # loss, group, metric, mean, ci_low, ci_high, n, seeds
    disparities: pd.DataFrame  # one row per loss of the family: COLUMNS, see `disparities`
    policy: Policy
    reference: str  # "best" or a group name
    losses: tuple[str, ...]  # the family's losses
    pairs: int  # hypotheses per loss (group pairs, or groups against the named reference)
    adjusted: bool  # whether the adjusted_* columns are filled
    frontier: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=FRONTIER_COLUMNS))  # see `frontier`

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
    def method(self) -> str:
        """One sentence: how the intervals are made and how the verdicts are decided."""
        p, family = self.policy, f"{len(self.losses)} loss(es) x {self.pairs} group pair(s)"
        each = (
            f"Bonferroni over {family}, so each {'interval' if p.two_sided else 'lower bound'} is at "
            f"{100 * self.confidence:.4g}%"
            if p.correction == "bonferroni"
            else f"no correction over {family}"
        )
        check = "fairrecon check" + ("" if self.metric == "mse" else f" --metric {self.metric}")
        check += " --max-gap 0" if self.metric == "psnr" else " --max-ratio 1"
        return (
            f"Intervals over training seeds and test images (t quantiles, Cochran-Cox; ratios: Fieller); "
            f"{1 - p.alpha:.0%} confidence for all verdicts together "
            f"({'two-sided' if p.two_sided else 'one-sided'}, {each}). "
            f"'clear gap' means `{check}` fails."
        )

    def policy_record(self) -> dict:
        """The policy and its family, enough to re-derive every decision (summary.json)."""
        return {
            "alpha": self.policy.alpha,
            "correction": self.policy.correction,
            "two_sided": self.policy.two_sided,
            "reference": self.reference,
            "losses": list(self.losses),
            "pairs_per_loss": self.pairs,
            "m": self.m,
            "interval_confidence": self.confidence,
            "min_group_n": MIN_GROUP_N,
        }


def analyse(
    result,
    *,
    metric: str = "mse",
    policy: Policy = POLICY,
    reference: str = "best",
    losses: list[str] | None = None,
    adjusted: bool = False,
    pca: pd.DataFrame | None = None,
) -> Analysis:
    """The statistics of a result, once: per-group intervals and one decided row per loss."""
    table = disparities(
        result, metric=metric, policy=policy, reference=reference, losses=losses, adjusted=adjusted, pca=pca
    )
    names = group_names(result)
    ref = None if reference == "best" else names.index(reference)
    analysis = Analysis(
        metric,
        group_intervals(result, metric=metric, policy=policy),
        table,
        policy,
        reference,
        tuple(family_losses(result, losses)),
        hypotheses_per_loss(len(names), ref, policy.two_sided),
        adjusted or pca is not None,
    )
    return replace(analysis, frontier=frontier(result, analysis))


# ---------------------------------------------------------------- the fairness-accuracy frontier

FRONTIER_COLUMNS = [
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


def frontier(result, analysis: Analysis) -> pd.DataFrame:
    """The fairness-accuracy frontier: one row per loss of the analysis, its overall held-out error (the mean
    over seeds and every test image) against its worst/best ratio.

    overall_low/high: the overall mean's interval, made as every interval here is (seed part plus each group's
    image part, Cochran-Cox t; the overall mean is the contrast with weights n_g / N) at the same level as the
    verdicts' intervals (1 - alpha/m). ratio, ratio_low, ratio_high, worst, reference and verdict are the
    verdict table's own values (`analysis.disparities`), not recomputed. pareto: no other loss has both a
    lower overall error and a lower ratio, by point estimates (False where either is missing). Ratios of
    psnr are not defined, so for psnr every pareto is False.
    """
    d = analysis.disparities.set_index("loss")
    errors = {le.loss: le for le in loss_errors(result, metric=analysis.metric, losses=list(analysis.losses))}
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
        le = errors.get(loss)
        if le is not None:
            mom = Moments.of(le.values, le.codes, len(le.names), seed_part=not external)
            c = mom.contrast(mom.n / mom.n.sum())
            row.update(overall=c.estimate, overall_low=c.low(analysis.tail), overall_high=c.high(analysis.tail))
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
    result,
    *,
    metric: str = "mse",
    policy: Policy = POLICY,
    reference: str = "best",
    losses: list[str] | None = None,
    adjusted: bool = False,
    pca: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per loss of the family: the worst group's gap and ratio against the reference, decided by `policy`.

    gap = worst - reference in the metric's bad direction (for psnr: reference dB - worst dB), so
    gap >= 0 when reference="best"; ratio = worst / reference (not for psnr). gap_low/gap_high and
    ratio_low/ratio_high: that pair's interval at the per-interval level 1 - alpha/m. The decision
    covers every pair of groups (reference="best") or every group against the named reference:
    gap_lcb / ratio_lcb are the largest lower ends over those (worse, better) pairs, the numbers the
    gate compares with its thresholds (gap_lcb > 0 exactly when ratio_lcb > 1). se: the row pair's
    standard error; seed_share: the part of its variance that training randomness contributes (near 1:
    more seeds narrow the interval; near 0: only more test images do). p_value: the row pair's
    two-sided test of "no gap" (the one its interval inverts); p_corrected: the family's, min over covered pairs of min(1, m p), < alpha exactly when
    gap_lcb > 0. mde: the gap the row pair would detect with 80% power (mde_relative: over the
    reference mean). verdict: see `verdict`; warnings: its reasons and other notes.
    adjusted_*: the same for each image's error in excess of its own group's rank-k PCA error
    (k = spec.latent), filled when adjusted=True or `pca` is given (per image from `pca_errors`, or
    per group from `pca_reference`).
    """
    _check_metric(metric)
    family = family_losses(result, losses)
    errors = {le.loss: le for le in loss_errors(result, metric=metric, losses=losses)}
    names = group_names(result)
    if reference != "best" and reference not in names:
        raise UserError(f"reference group '{reference}' not in this result; groups: {', '.join(names)} (or 'best')")
    ref = None if reference == "best" else names.index(reference)
    with_pca = adjusted or pca is not None
    if with_pca and errors:
        baseline_of = _baseline_lookup(result, metric, pca)
        if any(np.isnan(baseline_of(le)).any() for le in errors.values()):
            raise UserError("the PCA table does not cover every test image (or group) of this result")
    m = len(family) * hypotheses_per_loss(len(names), ref, policy.two_sided)
    decide = dict(names=names, ref=ref, tail=policy.tail(m), scale=policy.divisor(m) * (2 if policy.two_sided else 1))
    sign = 1.0 if higher_is_worse(metric) else -1.0
    external = _external(result)
    rows = []
    for loss in family:
        row, le, decisive = {"loss": loss, "metric": metric}, errors.get(loss), None
        if le is not None:
            mom = Moments.of(sign * le.values, le.codes, len(names), seed_part=not external)
            row.update(n_min=int(mom.n.min()), seeds=len(le.seeds))
            if mom.n.min() >= 2:  # a group needs two images for an image variance
                decisive = _decide(row, mom, ratio=metric != "psnr", **decide)
                row.update(
                    reference_mean=sign * mom.mean[names.index(row["reference"])],
                    worst_mean=sign * mom.mean[names.index(row["worst"])],
                )
                if with_pca:
                    excess = Moments.of(
                        sign * (le.values - baseline_of(le)[None, :]), le.codes, len(names), seed_part=not external
                    )
                    adj: dict = {}
                    _decide(adj, excess, ratio=False, **decide)
                    row.update(
                        {
                            "adjusted_" + k: adj[k]
                            for k in ("reference", "worst", "gap", "gap_low", "gap_high", "gap_lcb")
                        }
                    )
        pair = (row["worst"], row["reference"]) if "worst" in row else None
        drift = gap_drift(result, loss, *pair, metric=metric) if pair and pair[0] != pair[1] else None
        row.update(zip(("drift", "drift_low", "drift_high"), np.exp(_drift_logs(drift))))
        reasons = insufficient(result, loss, le, pair=pair, external=external, row=row)
        if metric != "psnr" and np.isfinite(row.get("gap_lcb", np.nan)) and not np.isfinite(row["ratio_lcb"]):
            reasons.append("a group's mean error is not above 0: no ratio")
        row["verdict"] = verdict(gap_lcb=row.get("gap_lcb", np.nan), reasons=reasons)
        row["warnings"] = "; ".join(reasons + unconverged(result, loss) + _notes(row, decisive, external))
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def verdict(*, gap_lcb: float, reasons: list[str]) -> str:
    """The words for one loss, used by every surface: "insufficient data" when a check failed (or there
    is no interval), else "clear gap" when some covered pair's interval excludes "no gap" (gap_lcb > 0,
    which is ratio_lcb > 1, p_corrected < alpha and `check --max-ratio 1` failing), else "no clear gap"."""
    if reasons or not np.isfinite(gap_lcb):
        return INSUFFICIENT
    return CLEAR if gap_lcb > 0 else NO_CLEAR


def _decide(
    row: dict, mom: Moments, *, names: tuple[str, ...], ref: int | None, tail: float, scale: int, ratio: bool
) -> tuple[str, str]:
    """Fill `row` with the row pair's gap, ratio and test and the decision over the covered pairs;
    return the covered pair with the largest lower end (the one that decides)."""
    worst, r = _pick(mom.mean, ref)
    c = mom.pair(worst, r)
    pairs = covered_pairs(len(names), ref)
    lows = np.array([mom.pair(g, h).low(tail) for g, h in pairs])
    row.update(
        reference=names[r],
        worst=names[worst],
        gap=c.estimate,
        gap_low=c.low(tail),
        gap_high=c.high(tail),
        gap_lcb=float(lows.max()),
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
        )
    if np.isnan(lows).all():
        return None
    g, h = pairs[int(np.nanargmax(lows))]
    return names[g], names[h]


def _pick(mu: np.ndarray, ref: int | None) -> tuple[int, int]:
    """(worst, reference): the reference is the best group unless named; the worst is never the reference."""
    r = int(np.argmin(mu)) if ref is None else ref
    others = [g for g in range(len(mu)) if g != r]
    return others[int(np.argmax(mu[others]))], r


def _external(result) -> bool:
    return bool((result.info or {}).get("external_model"))


def gap_drift(result, loss: str, worst: str, best: str, *, metric: str = "mse") -> Drift | None:
    """How far the answer is projected to move in as much training again (settled.py): per ok cell of `loss`,
    the trend of log(worst / best held-out error) against log(step) over the last half of its training, on the
    curve points before its final one (the fixed test subset, so every point sees the same images; mae for
    metric "mae", else mse); `settled.Drift` holds the per-seed slopes, their mean and its t interval.
    None without curves (a model of yours); a Drift of fewer than 2 seeds cannot be judged."""
    curves = getattr(result, "curves", None)
    if curves is None or curves.empty:
        return None
    column = "mae" if metric == "mae" else "mse"
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
    result,
    loss: str,
    le: LossErrors | None,
    *,
    pair: tuple[str, str] | None = None,
    external: bool = False,
    row: dict | None = None,
) -> list[str]:
    """Why a loss's data cannot support a verdict (empty when they can): failed cells, an answer that had not
    settled (the decided `row`'s interval, moved by its `drift_low` / `drift_high`, could cross the decision's
    boundary in as much training again: settled.could_change), fewer than 2 trained seeds, a test or training
    group under MIN_GROUP_N images."""
    reasons = []
    cells = result.cells[result.cells["loss"] == loss]
    failed = cells[cells["status"] != "ok"]
    if le is None:
        reasons.append("no cell trained without failing")
    elif len(failed):
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


def _unsettled(result, loss: str, pair: tuple[str, str], row) -> str | None:
    """The "had not settled" reason, or None. The decision is the row's: clear gap when the largest lower end
    over the covered pairs is above "no gap" (ratio_lcb > 1; psnr: gap_lcb > 0 dB), else no clear gap; the
    upper end is the row pair's. Both move with the shown pair's drift (exactly the decision for two groups)."""
    shift = np.log(np.array([row.get(k, np.nan) for k in ("drift", "drift_low", "drift_high")], dtype=float))
    if not np.isfinite(shift).all():
        return None
    if row.get("metric") == "psnr":
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


def _longer(result, loss: str, *, more_seeds: bool) -> str:
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


def unconverged(result, loss: str) -> list[str]:
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


def _notes(row: dict, decisive: tuple[str, str] | None, external: bool) -> list[str]:
    """Warnings that do not change the verdict."""
    notes = []
    if external:
        notes.append(
            "one already-trained model: the interval covers the choice of test images, "
            "not another training run of the same recipe"
        )
    if row["verdict"] == CLEAR and decisive and decisive != (row["worst"], row["reference"]):
        notes.append(f"decided by group {decisive[0]} vs {decisive[1]}, not the pair shown")
    if row["verdict"] == NO_CLEAR and row["mde"] > abs(row["gap"]):
        size = f"{row['mde_relative']:.1%}" if np.isfinite(row["mde_relative"]) else f"{row['mde']:.3g}"
        more = "seeds" if row["seed_share"] > 0.5 else "test images"
        notes.append(
            f"low power: a gap of {size} would be found {POWER:.0%} of the time; smaller ones may be "
            f"missed (training randomness is {row['seed_share']:.0%} of the variance: add {more})"
        )
    return notes


# ---------------------------------------------------------------- difficulty adjustment (PCA)


def pca_reconstruct(train: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
    """Rank-k PCA (affine: mean + top-k principal directions) fitted on `train` (n, M), applied to x (m, M)."""
    mean = train.mean(0)
    _, _, vt = np.linalg.svd(train - mean, full_matrices=False)
    v = vt[:k]
    return mean + (x - mean) @ v.T @ v


def pca_errors(data, k: int) -> pd.DataFrame:
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


def pca_reference(data, k: int) -> pd.DataFrame:
    """One row per group: the mean of `pca_errors` over the group's test images."""
    return pca_errors(data, k).groupby("group", sort=False)[list(METRICS)].mean().reset_index()


def grouped_data(result):
    """Recompute the result's images and groups from its spec (deterministic), checked against its samples."""
    from .data import load_images
    from .groups import make_groups

    spec = result.spec
    data = make_groups(load_images(spec.dataset, spec.data_root, spec.download, spec.split_seed), spec)
    seen = result.samples.drop_duplicates("index")
    if (
        tuple(data.names) != group_names(result)
        or len(seen) != len(data.test_index)
        or set(seen["index"]) != set(data.test_index.tolist())
    ):
        raise UserError(
            "the images recomputed from this result's spec do not match its samples "
            "(dataset files changed?); pass a PCA table explicitly"
        )
    return data


def _baseline_lookup(result, metric: str, pca: pd.DataFrame | None):
    """A function LossErrors -> per-image PCA baseline (N,) in the loss's image order."""
    if pca is None:
        pca = pca_errors(grouped_data(result), result.spec.latent)
    if "index" in pca.columns:
        per_image = pca.set_index("index")[metric]
        return lambda le: per_image.reindex(le.index).to_numpy(dtype=float)
    per_group = pca.assign(group=pca["group"].astype(str)).set_index("group")[metric]
    return lambda le: per_group.reindex(np.asarray(le.names)[le.codes]).to_numpy(dtype=float)
