"""Disparity statistics, each checked against an independent computation or a known truth."""

from __future__ import annotations

import importlib.util
import itertools

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO
from scipy import stats as sps

from fairrecon import stats
from fairrecon.errors import UserError
from fairrecon.groups import GroupedData
from fairrecon.results import AuditResult
from fairrecon.spec import AuditSpec


def _benchmark(name: str):
    """A script in benchmarks/ as a module (its name would clash with installed packages)."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


coverage = _benchmark("coverage")  # the simulation of benchmarks/coverage.py, shared with the quick coverage test


def synthetic_result(
    values: dict[str, np.ndarray], codes: np.ndarray, names=("a", "b"), status: dict[tuple[str, int], str] | None = None
) -> AuditResult:
    """An AuditResult from per-(seed, image) MSE matrices values[loss] (S, N) and group codes (N,)."""
    frames = []
    for loss, v in values.items():
        for s in range(v.shape[0]):
            frames.append(
                pd.DataFrame(
                    {
                        "loss": loss,
                        "seed": s,
                        "group": pd.Categorical.from_codes(codes, categories=list(names)),
                        "index": np.arange(len(codes)) * 3 + 7,
                        "mse": v[s],
                        "mae": np.sqrt(v[s]),
                        "psnr": -10 * np.log10(v[s]),
                    }
                )
            )
    samples = pd.concat(frames, ignore_index=True)
    cells = samples[["loss", "seed"]].drop_duplicates().reset_index(drop=True)
    cells["status"] = [(status or {}).get((r.loss, r.seed), "ok") for r in cells.itertuples()]
    groups = pd.DataFrame({"split": "test", "group": list(names), "n": np.bincount(codes, minlength=len(names))})
    spec = AuditSpec(losses=tuple(values), seeds=max(v.shape[0] for v in values.values()))
    history = pd.DataFrame(columns=["loss", "seed", "epoch", "train_nll", "train_mse"])
    return AuditResult(spec, samples, cells, groups, history, {})


def _curves(result, slopes, noise: float = 0.0, points: int = 20, seed: int = 0) -> pd.DataFrame:
    """Curves whose worst/best ratio follows log(ratio) = slopes[s] x log(step) + N(0, noise) for seed s, and
    jumps at the final (full test set) point, which the drift must ignore. Which group is worst is read from the
    final numbers, as the verdict does."""
    final = result.by_group().set_index("group")["mse"]
    worst, best = final.idxmax(), final.idxmin()
    rng = np.random.default_rng(seed)
    steps = np.arange(1, points + 1) * 10
    rows = []
    for s, b in zip(result.cells["seed"], slopes):
        ratio = np.exp(b * np.log(steps) + rng.normal(0, noise, points))
        ratio[-1] = 50.0
        for step, r in zip(steps, ratio):
            rows += [
                {"loss": "l1", "seed": s, "step": step, "epoch": step / 10, "group": best, "mse": 0.01},
                {"loss": "l1", "seed": s, "step": step, "epoch": step / 10, "group": worst, "mse": 0.01 * r},
            ]
    return pd.DataFrame(rows)


def simulate(rng, seeds=4, n=(80, 60), means=(0.01, 0.01), seed_sd=0.001, image_sd=0.003, noise_sd=0.001):
    """Crossed design: mse[s, i] = mean_g + seed effect (per group) + image effect + noise, all positive."""
    codes = np.repeat(np.arange(len(n)), n)
    mu = np.asarray(means)[codes]
    seed_effect = rng.normal(0, seed_sd, (seeds, len(n)))[:, codes]
    values = mu + seed_effect + rng.normal(0, image_sd, len(codes)) + rng.normal(0, noise_sd, (seeds, len(codes)))
    return np.abs(values), codes


def test_metric_frame_and_group_means_match_pandas():
    rng = np.random.default_rng(1)
    values, codes = simulate(rng, seeds=3)
    result = synthetic_result({"l1": values, "l2": values * 2}, codes)
    for metric in stats.METRICS:
        mf = stats.to_metric_frame(result, "l2", metric=metric)
        by_pandas = result.samples.query("loss == 'l2'").groupby("group", observed=True)[metric].mean()
        np.testing.assert_allclose(mf.by_group[metric].reindex(by_pandas.index.astype(str)), by_pandas)
        one_seed = stats.to_metric_frame(result, "l1", metric=metric, seed=2).by_group[metric]
        by_seed = result.samples.query("loss == 'l1' and seed == 2").groupby("group", observed=True)[metric].mean()
        np.testing.assert_allclose(one_seed.reindex(by_seed.index.astype(str)), by_seed)
    table = stats.group_intervals(result, metric="mse")
    expected = result.by_group()  # mean over seeds of per-seed group means
    merged = table.merge(expected, on=["loss", "group"], suffixes=("", "_expected"))
    np.testing.assert_allclose(merged["mean"], merged["mse"])
    assert (merged["ci_low"] < merged["mean"]).all() and (merged["mean"] < merged["ci_high"]).all()
    assert list(table.columns) == ["loss", "group", "metric", "mean", "ci_low", "ci_high", "n", "seeds"]


def test_one_model_with_equal_groups_is_a_t_interval_with_n_minus_1_df():
    """No seed part (an external model), equal group sizes: both parts have n - 1 df, so the Cochran-Cox
    critical value is t(n - 1) itself (closed form); its p-value is that t test's."""
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.gamma(2.0, 0.005, 60), rng.gamma(2.0, 0.006, 60)])
    codes = np.repeat([0, 1], 60)
    c = stats.Moments.of(x[None, :], codes, 2, seed_part=False).pair(1, 0)
    se = np.sqrt(x[codes == 1].var(ddof=1) / 60 + x[codes == 0].var(ddof=1) / 60)
    gap = x[codes == 1].mean() - x[codes == 0].mean()
    q = sps.t.isf(0.025, 59)
    np.testing.assert_allclose([c.low(0.025), c.high(0.025)], [gap - q * se, gap + q * se], rtol=1e-12)
    assert c.p_two_sided() == pytest.approx(2 * sps.t.sf(abs(gap) / se, 59), rel=1e-9)
    # many images: the interval is Welch's (scipy), both critical values being ~ the normal one
    y = np.concatenate([rng.gamma(2.0, 0.005, 4000), rng.gamma(2.0, 0.006, 3000)])
    big = np.repeat([0, 1], [4000, 3000])
    welch = sps.ttest_ind(y[big == 1], y[big == 0], equal_var=False).confidence_interval(0.95)
    c = stats.Moments.of(y[None, :], big, 2, seed_part=False).pair(1, 0)
    # the two critical values differ in the 4th digit at ~3,000 df (1.96071 vs 1.96075)
    np.testing.assert_allclose([c.low(0.025), c.high(0.025)], [welch.low, welch.high], rtol=1e-4)


def test_seed_part_alone_is_the_one_sample_t_test_on_per_seed_gaps():
    """Images alike within a group (no image part): the interval is the t interval of the per-seed gaps, S - 1 df."""
    rng = np.random.default_rng(3)
    per_seed = rng.normal([0.010, 0.012], 0.001, size=(4, 2))  # (S, G) per-seed group means
    codes = np.repeat([0, 1], [50, 40])
    values = per_seed[:, codes]  # every image of a group has its seed's group mean
    c = stats.Moments.of(values, codes, 2).pair(1, 0)
    ref = sps.ttest_1samp(per_seed[:, 1] - per_seed[:, 0], 0.0)
    ci = ref.confidence_interval(0.95)
    np.testing.assert_allclose([c.low(0.025), c.high(0.025), c.p_two_sided()], [ci.low, ci.high, ref.pvalue], rtol=1e-9)


def test_p_value_is_the_tail_where_the_interval_touches_zero():
    """The test the interval inverts: at the p-value's own tail the lower end is exactly 0."""
    rng = np.random.default_rng(13)
    ps = []
    for seeds in (2, 3, 5, 10):
        values, codes = simulate(rng, seeds=seeds, n=(60, 90), means=(0.01, 0.0106))
        c = stats.Moments.of(values, codes, 2).pair(1, 0)
        ps.append(c.p_greater())
        assert c.low(ps[-1]) == pytest.approx(0.0, abs=1e-9 * c.se)  # root finding to 1e-14 in log(tail)
    assert min(ps) < 0.5 < max(ps)  # both sides of the estimate were tried


def test_variance_is_seed_part_plus_image_part():
    """The standard error, recomputed with pandas from its two stated parts (crossed seeds x images)."""
    rng = np.random.default_rng(4)
    values, codes = simulate(rng, seeds=5, n=(60, 90), means=(0.01, 0.013))
    c = stats.Moments.of(values, codes, 2).pair(1, 0)
    df = pd.DataFrame(values.T).assign(group=codes)
    per_seed = df.groupby("group").mean().T  # (S, G)
    seed_part = (per_seed[1] - per_seed[0]).var(ddof=1) / 5
    averaged = df.drop(columns="group").mean(axis=1).groupby(df["group"])
    image_parts = averaged.var(ddof=1) / averaged.size()
    assert c.se**2 == pytest.approx(seed_part + image_parts.sum(), rel=1e-12)
    # Cochran-Cox: the critical value is the variance-weighted mean of t(S - 1) and each group's t(n_g - 1)
    weights = np.array([seed_part, *image_parts])
    quantiles = sps.t.isf(0.025, [4, *(averaged.size() - 1)])
    assert c.quantile(0.025) == pytest.approx((weights * quantiles).sum() / weights.sum(), rel=1e-12)
    assert c.estimate == pytest.approx(values[:, codes == 1].mean() - values[:, codes == 0].mean(), rel=1e-12)


def test_fieller_ratio_interval_matches_the_closed_form():
    """With a constant df (seed part only), Fieller's interval solves a quadratic: compare with its roots."""
    rng = np.random.default_rng(5)
    per_seed = rng.normal([0.010, 0.013], [0.0006, 0.0008], size=(6, 2))
    codes = np.repeat([0, 1], [30, 30])
    mom = stats.Moments.of(per_seed[:, codes], codes, 2)
    q = sps.t.isf(0.025, 5)
    a, b = per_seed[:, 1].mean(), per_seed[:, 0].mean()
    v = np.cov(per_seed[:, [1, 0]], rowvar=False) / 6  # covariance of the two means
    # (a - r b)^2 = q^2 (v_aa - 2 r v_ab + r^2 v_bb)  ->  A r^2 + B r + C = 0
    A, B, C = b * b - q * q * v[1, 1], -2 * (a * b - q * q * v[0, 1]), a * a - q * q * v[0, 0]
    roots = np.sort(np.roots([A, B, C]).real)
    np.testing.assert_allclose(mom.ratio_interval(1, 0, 0.025), roots, rtol=1e-9)


def test_ratio_gap_test_and_verdict_decide_alike():
    """Duality, on many random audits and policies: ratio interval excludes 1 <=> gap interval excludes 0
    <=> p_corrected < alpha <=> the verdict is "clear gap"."""
    rng = np.random.default_rng(6)
    seen = set()
    for r in range(40):
        groups = 2 + r % 2
        n = (40, 50, 45)[:groups]
        means = 0.010 * (1 + rng.uniform(0, 0.25, groups))  # from no gap to clear ones
        values, codes = simulate(rng, seeds=2 + r % 4, n=n, means=means)
        result = synthetic_result(
            {"l1": values, "l2": values * rng.uniform(0.9, 1.1, len(codes))}, codes, names=("a", "b", "c")[:groups]
        )
        policy = stats.Policy(
            alpha=[0.05, 0.1, 0.01][r % 3], correction=["bonferroni", "none"][r % 2], two_sided=r % 5 != 0
        )
        for reference in ("best", "a"):
            d = stats.disparities(result, policy=policy, reference=reference)
            for row in d.itertuples():
                clear = row.verdict == stats.CLEAR
                assert clear == (row.gap_lcb > 0) == (row.ratio_lcb > 1) == (row.p_corrected < policy.alpha)
                assert (row.gap_low > 0) == (row.ratio_low > 1) and (row.gap_high < 0) == (row.ratio_high < 1)
                assert row.ratio_low <= row.ratio <= row.ratio_high and row.gap_low <= row.gap <= row.gap_high
                seen.add(clear)
    assert seen == {True, False}  # both verdicts occurred


def test_intervals_cover_with_three_seeds_when_seeds_dominate():
    """The quick version of benchmarks/coverage.py: the regime where the old bootstrap covered 77%."""
    rng = np.random.default_rng(7)
    reps = 500
    rows = pd.DataFrame(
        [coverage.replicate(rng, seeds=3, groups=2, regime=coverage.REGIMES["seed-dominated"]) for _ in range(reps)]
    )
    truth = coverage.MEANS[2][1] - coverage.MEANS[2][0], coverage.MEANS[2][1] / coverage.MEANS[2][0]
    gap = ((rows.gap_low <= truth[0]) & (truth[0] <= rows.gap_high)).mean()
    ratio = ((rows.ratio_low <= truth[1]) & (truth[1] <= rows.ratio_high)).mean()
    assert rows.seed_over_image.median() > 3  # the regime is what it says
    # nominal 0.95; 0.92 is 3 binomial standard errors (0.0097 at 500 replicates) below it
    assert gap >= 0.92 and ratio >= 0.92


def test_image_part_alone_would_undercover_when_seeds_dominate():
    """The seed part matters: an interval over test images alone (one-model Welch) covers far too rarely."""
    rng = np.random.default_rng(8)
    hits = 0
    for _ in range(150):
        values, codes = coverage.simulate(
            rng, seeds=5, means=coverage.MEANS[2], n=180, **coverage.REGIMES["seed-dominated"]
        )
        c = stats.Moments.of(values, codes, 2, seed_part=False).pair(1, 0)
        hits += c.low(0.025) <= coverage.MEANS[2][1] - coverage.MEANS[2][0] <= c.high(0.025)
    assert hits / 150 < 0.75


def test_disparities_on_a_planted_gap():
    rng = np.random.default_rng(9)
    fair, codes = simulate(rng, seeds=5, means=(0.01, 0.01))
    unfair, _ = simulate(rng, seeds=5, means=(0.010, 0.016))
    result = synthetic_result({"l1": fair, "l2": unfair}, codes)
    d = stats.disparities(result).set_index("loss")
    means = result.samples.groupby(["loss", "group"], observed=True)["mse"].mean()
    row = d.loc["l2"]
    assert (row.worst, row.reference) == ("b", "a")
    assert row.gap == pytest.approx(means["l2", "b"] - means["l2", "a"])
    assert row.ratio == pytest.approx(means["l2", "b"] / means["l2", "a"])
    assert row.gap_low < row.gap < row.gap_high and row.gap_lcb > 0 and row.ratio_lcb > 1
    assert row.verdict == stats.CLEAR and d.loc["l1", "verdict"] == stats.NO_CLEAR
    # two losses, one pair: Bonferroni m = 2, each interval at 97.5%
    c = stats.Moments.of(unfair, codes, 2).pair(1, 0)
    assert row.gap_low == pytest.approx(c.low(0.05 / 2 / 2)) and row.p_corrected == pytest.approx(2 * row.p_value)
    assert d.loc["l1", "gap_lcb"] < 0 and d.loc["l1", "p_corrected"] > 0.05
    # psnr: worse means fewer dB; the gap is reference dB minus worst dB
    p = stats.disparities(result, metric="psnr").set_index("loss").loc["l2"]
    db = result.samples.groupby(["loss", "group"], observed=True)["psnr"].mean()
    assert p.worst == "b" and p.gap == pytest.approx(db["l2", "a"] - db["l2", "b"]) and np.isnan(p.ratio)
    # a named reference: the other group is the worst even when it is the better one
    named = stats.disparities(result, reference="b").set_index("loss").loc["l2"]
    assert (named.reference, named.worst) == ("b", "a") and named.gap < 0 and named.verdict == stats.NO_CLEAR


def test_three_groups_cover_every_pair():
    rng = np.random.default_rng(10)
    values, codes = simulate(rng, seeds=4, n=(60, 60, 60), means=(0.010, 0.0101, 0.014))
    result = synthetic_result({"l2": values}, codes, names=("a", "b", "c"))
    analysis = stats.analyse(result)
    row = analysis.disparities.iloc[0]
    assert analysis.pairs == 3 and analysis.m == 3 and (row.worst, row.reference) in {("c", "a"), ("c", "b")}
    mom = stats.Moments.of(values, codes, 3)
    tail = 0.05 / 3 / 2
    lows = [mom.pair(g, h).low(tail) for g, h in itertools.permutations(range(3), 2)]
    assert row.gap_lcb == pytest.approx(max(lows))
    ps = [min(1.0, 2 * mom.pair(g, h).p_greater()) for g, h in itertools.permutations(range(3), 2)]
    assert row.p_corrected == pytest.approx(min(1.0, 3 * min(ps)))
    named = stats.analyse(result, reference="b")
    assert named.pairs == 2 and named.m == 2  # each group against b


def test_disparities_difficulty_adjusted_by_hand():
    rng = np.random.default_rng(10)
    values, codes = simulate(rng, seeds=3, means=(0.010, 0.016))
    result = synthetic_result({"l2": values}, codes)
    per_group = pd.DataFrame({"group": ["a", "b"], "mse": [0.002, 0.009], "mae": [0.0, 0.0], "psnr": [0.0, 0.0]})
    row = stats.disparities(result, pca=per_group).iloc[0]
    # raw: b worse by ~0.006; in excess of PCA: a is 0.008 over, b 0.007 over -> a is (slightly) worse
    raw_gap = values[:, codes == 1].mean() - values[:, codes == 0].mean()
    excess = [values[:, codes == 0].mean() - 0.002, values[:, codes == 1].mean() - 0.009]
    assert row.worst == "b" and row.gap == pytest.approx(raw_gap)
    assert row.adjusted_worst == ("a" if excess[0] > excess[1] else "b")
    assert row.adjusted_gap == pytest.approx(abs(excess[0] - excess[1]))
    # a constant per group shifts the means, not the spread: the same interval width
    assert row.adjusted_gap_high - row.adjusted_gap_low == pytest.approx(row.gap_high - row.gap_low, rel=1e-9)
    per_image = pd.DataFrame({"index": result.samples["index"].unique(), "mse": np.where(codes == 0, 0.002, 0.009)})
    again = stats.disparities(result, pca=per_image).iloc[0]
    assert again.adjusted_gap == pytest.approx(row.adjusted_gap)
    with pytest.raises(UserError, match="does not cover"):
        stats.disparities(result, pca=per_image.iloc[:-1])


def test_small_or_broken_data_is_insufficient_never_clear():
    """A huge gap, but data that cannot support a verdict: "insufficient data", with the reason."""
    rng = np.random.default_rng(11)
    values, codes = simulate(rng, seeds=3, n=(50, 40), means=(0.010, 0.030))
    assert stats.analyse(synthetic_result({"l1": values}, codes)).disparities.verdict[0] == stats.CLEAR

    def verdict(result) -> tuple[str, str]:
        row = stats.analyse(result).disparities.iloc[0]
        return row.verdict, row.warnings

    failed = synthetic_result({"l1": values}, codes, status={("l1", 2): "failed: non-finite loss in epoch 1"})
    assert verdict(failed) == (
        stats.INSUFFICIENT,
        "1 failed cell(s) left out: l1/seed2 (failed: non-finite loss in epoch 1)",
    )
    tiny_test, tiny_codes = simulate(rng, seeds=3, n=(50, 12), means=(0.010, 0.030))
    v, w = verdict(synthetic_result({"l1": tiny_test}, tiny_codes))
    assert v == stats.INSUFFICIENT and "test group(s) b (n=12): fewer than 30 test images" in w
    one_seed = synthetic_result({"l1": values[:1]}, codes)
    v, w = verdict(one_seed)
    assert v == stats.INSUFFICIENT and "only 1 trained seed" in w
    assert stats.analyse(one_seed).intervals["ci_low"].isna().all()  # no interval without a seed spread
    stuck = synthetic_result({"l1": values}, codes)
    stuck.cells["converged"] = [True, False, True]  # an error still falling: a note, the verdict stands
    v, w = verdict(stuck)
    assert v == verdict(synthetic_result({"l1": values}, codes))[0] != stats.INSUFFICIENT
    assert "1 of 3 cell(s) not converged" in w and "l1/seed1" in w
    small_train = synthetic_result({"l1": values}, codes)
    small_train.groups = pd.concat(
        [small_train.groups, pd.DataFrame({"split": "train", "group": ["a", "b"], "n": [3, 2]})]
    )
    v, w = verdict(small_train)
    assert v == stats.INSUFFICIENT and "training group(s) a (n=3), b (n=2)" in w
    every_cell_failed = synthetic_result(
        {"l1": values, "l2": values}, codes, status={("l2", s): "failed: nan" for s in range(3)}
    )
    d = stats.analyse(every_cell_failed).disparities.set_index("loss")
    assert d.loc["l2", "verdict"] == stats.INSUFFICIENT and d.loc["l1", "verdict"] == stats.CLEAR


def _drift_by_hand(curves: pd.DataFrame, worst: str, best: str) -> tuple[float, float, float]:
    """The projected change of log(worst/best) over a doubling of training, computed independently: per seed,
    scipy's linregress of log(ratio) on log(step) over the points of the last half before the final one; the
    mean over seeds and its one-sided 95% t bounds (seeds - 1 df), times log 2."""
    slopes = []
    for _, cell in curves.groupby("seed"):
        wide = cell.pivot(index="step", columns="group", values="mse").iloc[:-1]
        wide = wide[wide.index >= wide.index[-1] / 2]
        ratio = wide[worst] / wide[best]
        slopes.append(sps.linregress(np.log(wide.index.to_numpy(float)), np.log(ratio.to_numpy())).slope)
    slopes = np.array(slopes)
    half = sps.t.ppf(0.95, len(slopes) - 1) * sps.sem(slopes)
    return tuple(np.log(2) * np.array([slopes.mean(), slopes.mean() - half, slopes.mean() + half]))


@pytest.mark.parametrize(
    "means, shift, refused",
    [
        ((0.010, 0.016), "away", False),  # a clear gap growing away from 1 (+15% per doubling): never refused
        ((0.010, 0.016), "to_cross", True),  # a clear gap whose lower end the drift could take below 1
        ((0.010, 0.016), "small", False),  # falling, but not far enough to cross
        ((0.010, 0.0103), "up", True),  # no clear gap whose lower end could reach above 1
        ((0.010, 0.0103), "none", False),  # no clear gap, no trend: settled
    ],
)
def test_an_answer_is_refused_only_when_more_training_could_change_the_decision(means, shift, refused):
    """Planted per-seed trends of the worst/best ratio with known noise: the drift columns are the closed form
    (`_drift_by_hand`), and the verdict is refused exactly when the interval moved by that drift's bound toward
    the boundary reaches it: a clear gap when lower end x exp(low) <= 1, no clear gap when lower end x exp(high)
    > 1 or upper end x exp(low) < 1. The rule before this version refused whenever the mean last-quarter drift
    exceeded 5% whatever the decision: here it also refused the growing gap (+6.0%) and the small fall (-5.2%)."""
    rng = np.random.default_rng(21)
    values, codes = simulate(rng, seeds=4, n=(80, 80), means=means, seed_sd=0.0003)
    result = synthetic_result({"l1": values}, codes)
    row = stats.analyse(result).disparities.iloc[0]
    low, high = np.log(row.ratio_lcb), np.log(row.ratio_high)
    per_doubling = {  # the planted mean change of log(ratio) per doubling of training
        "away": np.log(1.15),
        "to_cross": -low - 0.05,
        "small": -0.4 * low,
        "up": -low + 0.06,
        "none": 0.0,
    }[shift]
    slopes = per_doubling / np.log(2) + np.array([-0.01, 0.005, 0.01, -0.005])
    result.curves = _curves(result, slopes, noise=0.004)
    estimate, d_low, d_high = _drift_by_hand(result.curves, row.worst, row.reference)
    row = stats.analyse(result).disparities.iloc[0]
    assert (row.drift, row.drift_low, row.drift_high) == pytest.approx(np.exp([estimate, d_low, d_high]), rel=1e-9)
    if low > 0:
        expected = low + d_low <= 0
    else:
        expected = low + d_high > 0 or high + d_low < 0
    assert expected == refused, (low, high, estimate, d_low, d_high)  # the construction does what it says
    assert (row.verdict == stats.INSUFFICIENT) == refused, row.warnings
    assert ("the answer had not settled" in row.warnings) == refused
    if refused:
        bound = np.exp(low + (d_low if low > 0 else d_high))
        assert f"lower end {np.exp(low):.3g} could {'fall to' if low > 0 else 'reach'} {bound:.3g}" in row.warnings


def test_an_external_model_has_image_intervals_and_says_so():
    rng = np.random.default_rng(12)
    values, codes = simulate(rng, seeds=1, n=(60, 50), means=(0.010, 0.014))
    result = synthetic_result({"model": values}, codes)
    result.info["external_model"] = "model"
    row = stats.analyse(result).disparities.iloc[0]
    welch = sps.ttest_ind(values[0, codes == 1], values[0, codes == 0], equal_var=False)
    assert row.se == pytest.approx(row.gap / welch.statistic, rel=1e-10)  # Welch's standard error: images only
    assert row.seed_share == 0 and row.verdict == stats.CLEAR
    assert "one already-trained model" in row.warnings and "seed" not in row.warnings


def test_pca_error_is_the_sum_of_discarded_eigenvalues():
    """Eckart-Young: the rank-k PCA's mean squared error on its own data is sum(discarded eigenvalues) / M."""
    rng = np.random.default_rng(12)
    x = rng.normal(size=(60, 4)) @ rng.normal(size=(4, 12)) + 0.1 * rng.normal(size=(60, 12)) + 0.5
    eig = np.sort(np.linalg.eigvalsh(np.cov(x.T, bias=True)))[::-1]
    for k in (1, 3, 5):
        mse = ((stats.pca_reconstruct(x, x, k) - x) ** 2).mean()
        assert mse == pytest.approx(eig[k:].sum() / x.shape[1], rel=1e-9)


def test_pca_errors_per_group_on_known_subspaces():
    rng = np.random.default_rng(13)

    def flat_group(n, k, offset):  # images on a k-dim affine subspace of 16 pixels
        return torch.from_numpy(rng.normal(size=(n, k)) @ rng.normal(size=(k, 16)) + offset).float().view(n, 1, 4, 4)

    train = torch.cat([flat_group(40, 2, 0.3), flat_group(40, 6, 0.7)])
    test = torch.cat([flat_group(10, 2, 0.3), flat_group(10, 6, 0.7)])
    g = torch.repeat_interleave(torch.arange(2), torch.tensor([40, 40]))
    gt = torch.repeat_interleave(torch.arange(2), torch.tensor([10, 10]))
    data = GroupedData(("a", "b"), train, g, torch.arange(80), test, gt, torch.arange(20))
    ref = stats.pca_reference(data, k=2).set_index("group")
    per_image = stats.pca_errors(data, k=2)
    assert ref.loc["b", "mse"] > 1e-3  # group b needs 6 dims; at k=2 it loses some
    np.testing.assert_allclose(per_image.groupby("group")["mse"].mean()["b"], ref.loc["b", "mse"])
    # images on the 2-dim affine subspace the training images span are reconstructed exactly at k = 2
    same = GroupedData(("a",), train[:40], g[:40], torch.arange(40), train[:5], g[:5], torch.arange(5))
    assert stats.pca_errors(same, k=2)["mse"].max() < 1e-10


def test_usage_errors():
    rng = np.random.default_rng(14)
    values, codes = simulate(rng, seeds=2)
    result = synthetic_result({"l1": values}, codes)
    with pytest.raises(UserError, match="unknown metric"):
        stats.disparities(result, metric="rmse")
    with pytest.raises(UserError, match="reference group 'c'"):
        stats.disparities(result, reference="c")
    with pytest.raises(UserError, match="unknown loss"):
        stats.disparities(result, losses=["l9"])
    with pytest.raises(UserError, match="alpha"):
        stats.Policy(alpha=1.5)
    with pytest.raises(UserError, match="unknown correction 'holm'"):
        stats.Policy(correction="holm")


# ---------------------------------------------------------------- the fairness-accuracy frontier


def brute_force_pareto(points: list[tuple[float, float]]) -> list[bool]:
    """Pareto by a sweep: sort by error; a point is kept when its ratio is at most the least ratio of the
    strictly lower-error points (written independently of stats.pareto_flags' pairwise comparison)."""
    order = sorted(range(len(points)), key=lambda i: points[i][0])
    keep, best, i = [False] * len(points), np.inf, 0
    while i < len(order):  # points with equal error do not dominate each other: take them as one block
        block = [j for j in order if points[j][0] == points[order[i]][0]]
        for j in block:
            keep[j] = bool(points[j][1] <= best)
        best = min(best, *(points[j][1] for j in block))
        i += len(block)
    return keep


@pytest.mark.parametrize("seed", range(20))
def test_pareto_flags_match_a_brute_force_sweep(seed):
    """Random clouds, with ties on a coarse grid so that equal errors and equal ratios occur."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 12))
    error, ratio = rng.integers(0, 6, n) / 5.0, 1 + rng.integers(0, 6, n) / 5.0
    got = stats.pareto_flags(error, ratio)
    for i in range(n):  # the definition itself, point by point
        assert got[i] == (not any(error[j] < error[i] and ratio[j] < ratio[i] for j in range(n)))
    assert list(got) == brute_force_pareto(list(zip(error, ratio)))
    assert got.any()  # the point of least error with the least ratio among them is never dominated
    with_nan = stats.pareto_flags(np.append(error, np.nan), np.append(ratio, 0.0))
    assert not with_nan[-1] and list(with_nan[:-1]) == list(got)  # a missing point neither is nor dominates


def test_frontier_is_the_verdict_tables_numbers_and_the_overall_mean_interval():
    """Three losses with planted overall errors and gaps: the frontier's ratio columns are the verdict table's
    (one answer everywhere), the overall error is the plain mean over seeds and images, its standard error the
    stated two parts (recomputed with pandas), and the Pareto flags are the planted ones: a (accurate, unfair)
    and b (less accurate, fair) are Pareto-optimal, c (worse than b on both axes) is not."""
    rng = np.random.default_rng(11)
    planted = {"a": (0.010, 0.016), "b": (0.014, 0.0145), "c": (0.016, 0.022)}  # group means (a, b) per loss
    values = {}
    for loss, means in planted.items():
        v, codes = simulate(rng, seeds=5, n=(80, 60), means=means, seed_sd=0.0003, image_sd=0.001, noise_sd=0.0003)
        values[loss] = v
    result = synthetic_result(values, codes)
    analysis = stats.analyse(result)
    f = analysis.frontier
    assert list(f.columns) == stats.FRONTIER_COLUMNS and list(f["loss"]) == ["a", "b", "c"]
    d = analysis.disparities.set_index("loss")
    for col in ("ratio", "ratio_low", "ratio_high", "worst", "reference", "verdict"):
        assert list(f[col]) == list(d.loc[f["loss"], col])
    for row in f.itertuples(index=False):
        v = values[row.loss]
        assert row.overall == pytest.approx(v.mean(), rel=1e-12)
        df = pd.DataFrame(v.T).assign(group=codes)
        w = df["group"].value_counts(normalize=True).sort_index().to_numpy()  # n_g / N
        seed_part = (df.groupby("group").mean().T.to_numpy() @ w).var(ddof=1) / v.shape[0]
        averaged = df.drop(columns="group").mean(axis=1).groupby(df["group"])
        image_part = (w**2 * averaged.var(ddof=1).to_numpy() / averaged.size().to_numpy()).sum()
        se = np.sqrt(seed_part + image_part)
        # Cochran-Cox's critical value lies between the t quantiles of the fewest and the most df
        tail = analysis.tail
        half = (row.overall_high - row.overall_low) / 2
        assert sps.t.isf(tail, 79) * se * (1 - 1e-12) <= half <= sps.t.isf(tail, 4) * se * (1 + 1e-12)
        assert row.overall_low < row.overall < row.overall_high
    # a: lowest error; b: lowest ratio; c: worse than both on both axes
    assert list(f["pareto"]) == [True, True, False]
    assert f.set_index("loss").loc["a", "ratio"] > f.set_index("loss").loc["b", "ratio"]


def test_frontier_leaves_out_what_it_cannot_place():
    """A loss without any ok cell has no point: NaN numbers, not Pareto, and does not dominate anyone."""
    rng = np.random.default_rng(5)
    v, codes = simulate(rng, seeds=3, means=(0.01, 0.02))
    w, _ = simulate(rng, seeds=3, means=(0.001, 0.001))
    status = {("w", s): "failed: planted" for s in range(3)}
    f = stats.analyse(synthetic_result({"v": v, "w": w}, codes, status=status)).frontier
    assert f["pareto"].tolist() == [True, False] and np.isnan(f["overall"].iloc[1])
