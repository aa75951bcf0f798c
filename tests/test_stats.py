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

from fairrecon import metrics, stats
from fairrecon.errors import ExitCode, UserError
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
    for metric in result.metrics:  # the verdict metrics it has: mse, mae, psnr
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


@pytest.mark.slow
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
                # the upper ends the gate passes on: the largest over the covered pairs, dual alike
                assert (row.gap_ucb < 0) == (row.ratio_ucb < 1) and row.gap_lcb <= row.gap_ucb
                seen.add(clear)
    assert seen == {True, False}  # both verdicts occurred


@pytest.mark.slow
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


@pytest.mark.slow
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


# ---------------------------------------------------------------- positive errors, positive intervals


def test_means_of_errors_get_positive_log_scale_intervals():
    """Errors are positive: each group's mean and the overall mean get exp(log m +- q se / m) (closed form for
    a seed part alone), where the plain t interval (what was reported) went below 0 with seeds that disagree."""
    rng = np.random.default_rng(20)
    per_seed = np.array([[0.004, 0.006], [0.012, 0.015], [0.020, 0.025]])  # three seeds that stopped far apart
    codes = np.repeat([0, 1], [40, 40])
    values = per_seed[:, codes] * rng.uniform(0.999, 1.001, (3, 80))
    result = synthetic_result({"learned-sigma": values}, codes)
    table = stats.group_intervals(result).set_index("group")
    for g, name in enumerate("ab"):
        m = values[:, codes == g].mean()
        c = stats.Moments.of(values, codes, 2).contrast(np.eye(2)[g])
        assert c.low(0.025) < 0  # the old interval: an impossible negative MSE
        half = sps.t.isf(0.025, 2) * np.std(values[:, codes == g].mean(1), ddof=1) / np.sqrt(3) / m
        np.testing.assert_allclose(table.loc[name, ["ci_low", "ci_high"]], m * np.exp([-half, half]), rtol=1e-4)
        assert 0 < table.loc[name, "ci_low"] < table.loc[name, "mean"] < table.loc[name, "ci_high"] < np.inf
    f = stats.analyse(result).frontier.iloc[0]
    assert 0 < f.overall_low < f.overall < f.overall_high < np.inf
    # psnr is in dB (either sign, a log scale already): its interval stays the plain one
    psnr = stats.group_intervals(result, metric="psnr").set_index("group")
    c = stats.Moments.of(-10 * np.log10(values), codes, 2).contrast(np.array([1.0, 0.0]))
    assert psnr.loc["a", "ci_low"] == pytest.approx(c.low(0.025), rel=1e-12)


def test_positive_metric_is_the_registry_ratio_scale():
    """One list of metrics: which errors are ratio-scale (ratios, log-scale means) is the registry's `ratio`."""
    for name, m in metrics.METRICS.items():
        assert stats.positive_metric(name) == m.ratio
    assert stats.positive_metric("ssim_error") and not stats.positive_metric("psnr")


def _with_ssim_error(values: dict[str, np.ndarray], codes: np.ndarray, perfect: np.ndarray) -> AuditResult:
    """A synthetic result whose ssim_error is its mse, except on `perfect` images (a boolean per image): 0 or,
    on every other one, -1.2e-7, what float32 rounding leaves of 1 - SSIM for a near-perfect reconstruction."""
    result = synthetic_result(values, codes)
    samples = result.samples
    position = (samples["index"].to_numpy() - 7) // 3  # synthetic_result's image index is 3 i + 7
    below = np.where(position % 2 == 1, -1.2e-7, 0.0)
    samples["ssim_error"] = np.where(perfect[position], below, samples["mse"].to_numpy())
    return result


def test_ssim_error_at_and_just_below_zero():
    """ssim_error = 1 - SSIM is >= 0 exactly (SSIM <= 1), 0 for a perfect reconstruction, and float32 rounding
    leaves it a little below 0 for a near-perfect one (measured with measure.ssim_per_image on 28x28 noise
    images: exactly 0 for x against itself, -1.19e-7 with 1e-4 noise added). Decided: it is a ratio-scale error
    (the registry's `ratio`): what needs a positive number is a group's mean, not each image. Zeros and tiny
    negatives among positive images: the log-scale interval (its ends' geometric mean is the mean), a finite
    ratio and the paired contrast. A group with every image perfect (mean not above 0): the plain interval
    (its ends' arithmetic mean is the mean), no ratio and no ratio of ratios, each said in words, never NaN or
    the log of a negative number."""
    from fairrecon import gate
    from fairrecon.report import headline

    rng = np.random.default_rng(31)
    l2, codes = simulate(rng, seeds=4, n=(80, 60), means=(0.05, 0.08), image_sd=0.01)
    l1, _ = simulate(rng, seeds=4, n=(80, 60), means=(0.05, 0.12), image_sd=0.01)
    some = (codes == 0) & (np.arange(len(codes)) % 3 == 0)  # a third of group a perfect
    analysis = stats.analyse(_with_ssim_error({"l2": l2, "l1": l1}, codes, some), metric="ssim_error")
    assert analysis.metric == "ssim_error" and (analysis.intervals["mean"] > 0).all()
    ends = analysis.intervals[["ci_low", "ci_high"]].to_numpy()
    assert (ends > 0).all() and np.isfinite(ends).all()
    np.testing.assert_allclose(np.sqrt(ends[:, 0] * ends[:, 1]), analysis.intervals["mean"], rtol=1e-12)
    d = analysis.disparities.set_index("loss")
    assert (d["verdict"] == stats.CLEAR).all() and np.isfinite(d[["ratio", "ratio_low", "ratio_high"]]).all().all()
    (c,) = analysis.contrasts.itertuples(index=False)
    assert c.loss == "l1" and c.verdict == stats.LESS_FAIR and 1 < c.low < c.ratio < c.high < np.inf
    assert "by ssim_error" in headline(analysis).split(". ")[0]

    every = codes == 0  # group a reconstructed perfectly under both losses
    analysis = stats.analyse(_with_ssim_error({"l2": l2, "l1": l1}, codes, every), metric="ssim_error")
    a = analysis.intervals[analysis.intervals["group"] == "a"]
    assert (a["mean"] <= 0).all() and np.isfinite(a[["ci_low", "ci_high"]]).all().all()
    np.testing.assert_allclose((a["ci_low"] + a["ci_high"]) / 2, a["mean"], rtol=1e-9)
    d = analysis.disparities
    assert (d["verdict"] == stats.INSUFFICIENT).all() and d["ratio"].isna().all() and (d["gap"] > 0).all()
    assert d["warnings"].str.contains("a group's mean error is not above 0: no ratio").all()
    (c,) = analysis.contrasts.itertuples(index=False)
    assert c.verdict == stats.INSUFFICIENT and "no ratio of ratios" in c.warnings
    outcome = gate.check(analysis, metric="ssim_error", max_ratio=1.5)
    assert outcome.code == ExitCode.INSUFFICIENT and "not above 0" in outcome.message
    assert gate.check(analysis, metric="ssim_error", max_gap=0.01).code == ExitCode.INSUFFICIENT


def test_coverage_of_the_log_scale_means_when_seeds_disagree():
    """The quick version of benchmarks/coverage.py's "unstable" regime (3 seeds; the plain t interval of a
    group mean went below 0 in about half the audits): the log-scale intervals still cover."""
    rng = np.random.default_rng(21)
    rows = pd.DataFrame(
        [coverage.replicate(rng, seeds=3, groups=2, regime=coverage.REGIMES["unstable"]) for _ in range(400)]
    )
    assert rows.mean_plain_below_zero.mean() > 0.3  # the regime is what it says
    # nominal 0.95; 0.92 is 2.8 binomial standard errors (0.011 at 400 replicates) below it
    assert rows.mean_covered.mean() >= 0.92 and rows.overall_covered.mean() >= 0.92
    truth = coverage.MEANS[2][1] / coverage.MEANS[2][0]
    assert ((rows.ratio_low <= truth) & (truth <= rows.ratio_high)).mean() >= 0.92
    assert (~np.isfinite(rows.ratio_high)).mean() > 0.2  # Fieller's ratio: often no upper bound with 3 such seeds


def test_the_relative_gap_is_the_ratio_interval_on_every_surface():
    """One gap, one interval: the verdict table, the headline, the frontier table and the gate all show the
    ratio's interval (as ratio - 1 where relative), not the gap's interval over the reference's point mean."""
    from fairrecon import gate
    from fairrecon.report import frontier_table, headline, relative_gap, verdict_table

    rng = np.random.default_rng(22)
    values, codes = simulate(rng, seeds=5, n=(80, 60), means=(0.010, 0.013), seed_sd=0.0003)
    other, _ = simulate(rng, seeds=5, n=(80, 60), means=(0.010, 0.010))
    analysis = stats.analyse(synthetic_result({"l1": values, "l2": other}, codes))
    d = analysis.disparities.set_index("loss").loc["l1"]
    assert d.verdict == stats.CLEAR
    pct = lambda v: f"{v:+.1%}"  # noqa: E731
    ratio_text = f"{pct(d.ratio_low - 1)} to {pct(d.ratio_high - 1)}"
    old_text = f"{pct(d.gap_low / d.reference_mean)} to {pct(d.gap_high / d.reference_mean)}"
    assert ratio_text != old_text
    row = verdict_table(analysis).set_index("loss").loc["l1"]
    assert row["worse by"] == pct(d.ratio - 1) and row.iloc[4] == ratio_text
    assert f"interval {ratio_text})" in headline(analysis) and old_text not in headline(analysis)
    assert relative_gap(analysis.disparities.itertuples().__next__()) == (pct(d.ratio - 1), ratio_text)
    frontier = frontier_table(analysis).set_index("loss").loc["l1"]
    assert frontier.iloc[3] == f"{d.ratio_low:.3g} to {d.ratio_high:.3g}"
    message = gate.check(analysis, max_ratio=1.0).message
    assert f"ratio {d.ratio:.4g} [{d.ratio_low:.4g}, {d.ratio_high:.4g}]" in message


def test_an_unbounded_ratio_reads_as_no_upper_bound():
    """Three seeds that disagree tenfold on both groups' errors but not on their gap: the gap is clear, the
    reference group's mean is not clearly above 0 at the interval's level, so Fieller's ratio interval has
    a lower end above 1 and no upper end. Every surface says so in words (was "0 to n/a")."""
    from fairrecon.report import frontier_table, headline, verdict_table

    rng = np.random.default_rng(30)
    per_seed = np.array([[0.002, 0.005], [0.020, 0.023], [0.011, 0.014]])
    codes = np.repeat([0, 1], [60, 60])
    values = per_seed[:, codes] + rng.normal(0, 0.0002, (3, 120))
    analysis = stats.analyse(synthetic_result({"l1": values, "l2": values * 1.01}, codes))
    d = analysis.disparities.iloc[0]
    assert d.ratio_high == np.inf and d.ratio_ucb == np.inf and 1 < d.ratio_low < d.ratio
    text = verdict_table(analysis).iloc[0, 5]
    assert text == f"{d.ratio_low - 1:+.1%} or more (no upper bound)"
    assert frontier_table(analysis).iloc[0, 4] == f"{d.ratio_low:.3g} to no upper bound"
    assert "n/a" not in text and "n/a" not in frontier_table(analysis).to_string()
    from fairrecon import gate

    outcome = gate.check(analysis, max_ratio=2.0)
    assert outcome.code == ExitCode.INSUFFICIENT and "to no upper bound contain max-ratio 2" in outcome.message
    assert "n/a" not in headline(analysis)


def test_a_tiny_group_leaves_the_valid_pair_shown():
    """A group with one test image has no image variance: the other groups' pair is still shown (its ratio
    and interval), the verdict is "insufficient data" naming the tiny group, and no table says "-n/a dB"."""
    from fairrecon.report import error_table

    rng = np.random.default_rng(23)
    values, codes = simulate(rng, seeds=3, n=(50, 40, 1), means=(0.010, 0.013, 0.011))
    analysis = stats.analyse(synthetic_result({"l1": values}, codes, names=("a", "b", "c")))
    row = analysis.disparities.iloc[0]
    assert (row.worst, row.reference) == ("b", "a") and np.isfinite(row.ratio) and np.isfinite(row.ratio_high)
    assert row.verdict == stats.INSUFFICIENT and "c (n=1)" in row.warnings
    table = error_table(analysis)
    assert table["worst/best"].iloc[0] == f"{row.ratio:.3g}" and "n/a dB" not in table.to_string()
    psnr = error_table(stats.analyse(synthetic_result({"l1": values}, codes, names=("a", "b", "c")), metric="psnr"))
    assert psnr["worst/best"].iloc[0].endswith(" dB") and "n/a" not in psnr["worst/best"].iloc[0]


def test_the_frontier_figure_stays_readable():
    """Axes span the points and their intervals: no 1e6 y axis, no negative x axis (issue 20's figure)."""
    from fairrecon.figures import frontier_figure

    frontier = pd.DataFrame(
        {
            "loss": ["a", "b", "c"],
            "metric": "mse",
            "overall": [0.010, 0.012, 0.0095],
            "overall_low": [0.009, 0.004, 0.009],
            "overall_high": [0.011, 0.036, 0.0101],
            "ratio": [1.1, 1.3, 1.05],
            "ratio_low": [1.0, 0.5, 0.98],
            "ratio_high": [1.2, np.inf, 1.12],
            "pareto": [False, False, True],
        }
    )
    ax = frontier_figure(frontier).axes[0]
    low, high = ax.get_ylim()
    assert 0 <= low < 0.5 and 1.3 < high < 2.5
    assert ax.get_xlim()[0] >= 0 and ax.get_xlim()[1] < 0.05
    assert any(t.get_text() == "no upper bound" for t in ax.texts)


# ---------------------------------------------------------------- loss against loss


def test_paired_moments_of_one_loss_are_the_moments():
    rng = np.random.default_rng(24)
    values, codes = simulate(rng, seeds=4, n=(50, 40), means=(0.010, 0.013))
    w = np.array([1.0, -1.3])
    one, paired = stats.Moments.of(values, codes, 2).contrast(w), stats.PairedMoments.of([values], codes, 2)
    two = paired.contrast(w[None, :])
    assert two.estimate == pytest.approx(one.estimate, rel=1e-12)
    np.testing.assert_allclose(two.variances, one.variances, rtol=1e-12)
    np.testing.assert_array_equal(two.dfs, one.dfs)


def test_paired_variance_keeps_each_seed_and_image_together():
    """Two losses on the same seeds and images: the variance of their difference, recomputed with pandas from
    its two stated parts, is far smaller than the two losses' variances added (what unpaired intervals do)."""
    rng = np.random.default_rng(25)
    a, codes = simulate(rng, seeds=5, n=(60, 50), means=(0.010, 0.012))
    b = a * rng.normal(1.0, 0.02, a.shape)  # the same seeds' models and the same images, nearly the same errors
    w = np.array([[1.0, -1.0], [-1.0, 1.0]])  # (a's gap) - (b's gap)
    c = stats.PairedMoments.of([a, b], codes, 2).contrast(w)
    df = pd.DataFrame((a - b).T).assign(group=codes)
    per_seed = df.groupby("group").mean().T
    seed_part = (per_seed[1] - per_seed[0]).var(ddof=1) / 5
    image_part = (df.drop(columns="group").mean(axis=1).groupby(df["group"]).var(ddof=1) / [60, 50]).sum()
    assert c.se**2 == pytest.approx(seed_part + image_part, rel=1e-10)
    unpaired = sum(stats.Moments.of(v, codes, 2).pair(1, 0).se ** 2 for v in (a, b))
    assert c.se**2 < unpaired / 10


def test_loss_contrasts_by_hand_and_their_words():
    """The ratio of two losses' worst/best ratios with its paired log-scale interval, recomputed by hand; the
    verdict words; a failed seed paired out of both; images that differ refused; the reference loss chosen."""
    from fairrecon.report import contrast_sentence, headline

    rng = np.random.default_rng(26)
    l2, codes = simulate(rng, seeds=4, n=(60, 50), means=(0.010, 0.012), seed_sd=0.0003)
    worse = l2 * np.where(codes == 1, 1.25, 1.0) * rng.normal(1, 0.01, l2.shape)
    alike = l2 * rng.normal(1, 0.01, l2.shape)
    analysis = stats.analyse(synthetic_result({"l1": worse, "l2": l2, "mix": alike}, codes))
    assert analysis.reference_loss == "l2" and analysis.contrast_m == 2
    c = analysis.contrasts.set_index("loss")
    assert list(c.index) == ["l1", "mix"] and c.loc["l1", "verdict"] == stats.LESS_FAIR
    assert c.loc["mix", "verdict"] == stats.NOT_DIFFERENT
    d = analysis.disparities.set_index("loss")
    assert c.loc["l1", "ratio"] == pytest.approx(d.loc["l1", "ratio"] / d.loc["l2", "ratio"], rel=1e-12)
    # by hand: per seed, the log ratio of ratios linearised at the means; per image, the same with seed-averaged
    # errors; the two parts, Cochran-Cox's critical value at the family's tail (2 contrasts, two-sided)
    ma = [worse[:, codes == g].mean() for g in (0, 1)]
    mb = [l2[:, codes == g].mean() for g in (0, 1)]
    lin = lambda v, m, g: v / m[g]  # noqa: E731
    seed_c = [
        lin(worse[s, codes == 1].mean(), ma, 1)
        - lin(worse[s, codes == 0].mean(), ma, 0)
        - lin(l2[s, codes == 1].mean(), mb, 1)
        + lin(l2[s, codes == 0].mean(), mb, 0)
        for s in range(4)
    ]
    parts = [np.var(seed_c, ddof=1) / 4]
    for g, sign in ((0, -1), (1, 1)):
        z = sign * (worse.mean(0)[codes == g] / ma[g] - l2.mean(0)[codes == g] / mb[g])
        parts.append(z.var(ddof=1) / (codes == g).sum())
    dfs = [3, 59, 49]
    q = np.dot(parts, sps.t.isf(0.05 / 2 / 2, dfs)) / np.sum(parts)
    log_rr = np.log(ma[1] / ma[0]) - np.log(mb[1] / mb[0])
    np.testing.assert_allclose(
        c.loc["l1", ["low", "high"]].astype(float),
        np.exp(log_rr + np.array([-1, 1]) * q * np.sqrt(np.sum(parts))),
        rtol=1e-10,
    )
    sentence = contrast_sentence(analysis.contrasts.itertuples().__next__())
    assert sentence.startswith("l1 is clearly less fair than l2 by mse: its worst/best mse ratio is")
    assert headline(analysis).startswith(sentence)
    # the contrasts are about the verdicts' metric, and say which: mae here (synthetic mae = sqrt(mse))
    pair = synthetic_result({"l1": worse, "l2": l2}, codes)
    by_mae = stats.analyse(pair, metric="mae")
    mae = {
        loss: pair.samples.query("loss == @loss").groupby("group", observed=True)["mae"].mean() for loss in ("l1", "l2")
    }
    expected = (mae["l1"]["b"] / mae["l1"]["a"]) / (mae["l2"]["b"] / mae["l2"]["a"])
    (c_mae,) = by_mae.contrasts.itertuples(index=False)
    assert c_mae.metric == "mae" and c_mae.ratio == pytest.approx(expected, rel=1e-12)
    assert headline(by_mae).startswith("l1 is clearly less fair than l2 by mae: its worst/best mae ratio is")
    # a failed seed of either loss: paired on the seeds ok under both, and said; the verdict still given
    failed = synthetic_result({"l1": worse, "l2": l2}, codes, status={("l1", 2): "failed: nan"})
    row = stats.analyse(failed).contrasts.iloc[0]
    assert row.seeds == 3 and "paired on the 3 seed(s) ok under both losses (seed(s) 2 left out" in row.warnings
    assert row.verdict == stats.LESS_FAIR
    assert stats.analyse(failed).disparities.set_index("loss").loc["l1", "verdict"] == stats.INSUFFICIENT
    # the reference loss: named, recorded, l2, else the first; one loss: none
    named = stats.analyse(synthetic_result({"l1": worse, "l2": l2, "mix": alike}, codes), reference_loss="mix")
    assert named.reference_loss == "mix" and list(named.contrasts["loss"]) == ["l1", "l2"]
    assert stats.analyse(synthetic_result({"a": worse, "b": l2}, codes)).reference_loss == "a"
    recorded = synthetic_result({"a": worse, "b": l2}, codes)
    recorded.info["reference_loss"] = "b"
    assert stats.analyse(recorded).reference_loss == "b"
    assert stats.analyse(synthetic_result({"a": worse}, codes)).contrasts.empty
    with pytest.raises(UserError, match="reference loss 'l9'"):
        stats.analyse(synthetic_result({"a": worse, "b": l2}, codes), reference_loss="l9")
    shifted = synthetic_result({"l1": worse, "l2": l2}, codes)
    shifted.samples.loc[shifted.samples["loss"] == "l1", "index"] += 1
    with pytest.raises(UserError, match="not scored on the same test images"):
        stats.analyse(shifted)


def test_paired_contrast_covers_under_a_shared_seed_and_image_null():
    """The quick version of benchmarks/coverage.py's contrasts section: two losses with equal ratios on the
    same seeds and images (seed luck correlated, images shared), 3 seeds; and the paired interval is narrower
    than adding the two losses' variances."""
    rng = np.random.default_rng(27)
    rows = pd.DataFrame(
        [
            coverage.contrast_replicate(rng, seeds=3, scenario="null, both unfair", regime=coverage.REGIMES["mixed"])
            for _ in range(400)
        ]
    )
    assert rows.covered.mean() >= 0.92  # nominal 0.95; 2.8 binomial SE below it
    assert (rows.width / rows.unpaired_width).median() < 0.9


# ---------------------------------------------------------------- tails


def test_a_heavy_tail_warns_with_a_sensitivity_line():
    """2 of 180 images 50x worse in one group: the warning names the group, how many images and their share of
    its summed error (computed here by hand), and the ratio without each group's top 1% (recomputed by hand);
    a clean audit does not warn."""
    rng = np.random.default_rng(28)
    values, codes = coverage.simulate(rng, seeds=4, means=(0.010, 0.011), n=180, **coverage.REGIMES["mixed"])
    clean = stats.analyse(synthetic_result({"l1": values}, codes)).disparities.iloc[0]
    assert clean.tail_share < stats.TAIL_SHARE and "heavy tail" not in clean.warnings
    hit = np.flatnonzero(codes == 1)[[3, 77]]
    values[:, hit] *= 50
    row = stats.analyse(synthetic_result({"l1": values}, codes)).disparities.iloc[0]
    group = values.mean(0)[codes == 1]
    share = np.sort(group)[-2:].sum() / group.sum()
    assert (row.tail_group, row.tail_images) == ("b", 2) and row.tail_share == pytest.approx(share, rel=1e-12)
    assert f"heavy tail: in group b the top 2 image(s) (1% of the group) carry {share:.0%}" in row.warnings
    keep = np.ones(len(codes), dtype=bool)
    for g in (0, 1):
        idx = np.flatnonzero(codes == g)
        keep[idx[np.argsort(values.mean(0)[idx])[-2:]]] = False
    trimmed = values[:, keep][:, codes[keep] == 1].mean() / values[:, keep][:, codes[keep] == 0].mean()
    assert row.trimmed_ratio == pytest.approx(trimmed, rel=1e-12) and row.trimmed_ratio < row.ratio
    assert f"ratio {trimmed:.3g} [" in row.warnings and "(a sensitivity line, not the verdict)" in row.warnings


# ---------------------------------------------------------------- what the texts say


def test_texts_for_one_trained_model_and_fixed_test_sets():
    """One trained model: "over test images only", no "training randomness"; low power advice that fits the
    dataset: add images to a folder; a torchvision test set is fixed, so it says what can be done instead."""
    rng = np.random.default_rng(29)
    values, codes = simulate(rng, seeds=1, n=(60, 50), means=(0.010, 0.0102), image_sd=0.004)
    result = synthetic_result({"model": values}, codes)
    result.info["external_model"] = "model"
    result.spec = result.spec.replace(dataset="folder")
    analysis = stats.analyse(result)
    row = analysis.disparities.iloc[0]
    assert analysis.method.startswith("Intervals over test images only") and "training seeds" not in analysis.method
    assert row.verdict == stats.NO_CLEAR and "low power" in row.warnings
    assert "training randomness" not in row.warnings and "add images to the folder" in row.warnings
    seeds, _ = simulate(rng, seeds=4, n=(60, 50), means=(0.010, 0.0102), image_sd=0.004, seed_sd=0.00001)
    fixed = synthetic_result({"l1": seeds}, codes)
    fixed.spec = fixed.spec.replace(dataset="fashion-mnist")
    w = stats.analyse(fixed).disparities.iloc[0].warnings
    assert "fashion-mnist's test set is fixed" in w and "add test images" not in w


def test_renamed_helpers():
    assert stats.group_order(synthetic_result({"l1": np.ones((2, 4))}, np.array([0, 0, 1, 1]))) == ("a", "b")
    assert not hasattr(stats, "group_names") and not hasattr(stats, "COLUMNS")
    assert stats.DISPARITY_COLUMNS[:4] == ["loss", "metric", "reference", "worst"]
