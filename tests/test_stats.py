"""Disparity statistics, each checked against an independent computation or a known truth."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as sps

from fairrecon import stats
from fairrecon.errors import UserError
from fairrecon.groups import GroupedData
from fairrecon.results import AuditResult
from fairrecon.spec import AuditSpec


def synthetic_result(values: dict[str, np.ndarray], codes: np.ndarray, names=("a", "b"),
                     status: dict[tuple[str, int], str] | None = None) -> AuditResult:
    """An AuditResult from per-(seed, image) MSE matrices values[loss] (S, N) and group codes (N,)."""
    frames = []
    for loss, v in values.items():
        for s in range(v.shape[0]):
            frames.append(pd.DataFrame({
                "loss": loss, "seed": s, "group": pd.Categorical.from_codes(codes, categories=list(names)),
                "index": np.arange(len(codes)) * 3 + 7, "mse": v[s], "mae": np.sqrt(v[s]),
                "psnr": -10 * np.log10(v[s])}))
    samples = pd.concat(frames, ignore_index=True)
    cells = samples[["loss", "seed"]].drop_duplicates().reset_index(drop=True)
    cells["status"] = [(status or {}).get((r.loss, r.seed), "ok") for r in cells.itertuples()]
    groups = pd.DataFrame({"split": "test", "group": list(names), "n": np.bincount(codes, minlength=len(names))})
    spec = AuditSpec(losses=tuple(values), seeds=max(v.shape[0] for v in values.values()))
    history = pd.DataFrame(columns=["loss", "seed", "epoch", "train_nll", "train_mse"])
    return AuditResult(spec, samples, cells, groups, history, {})


def simulate(rng, seeds=4, n=(80, 60), means=(0.01, 0.01), seed_sd=0.001, image_sd=0.003, noise_sd=0.001):
    """Crossed design: mse[s, i] = mean_g + seed effect (per group) + image effect + noise, all positive."""
    codes = np.repeat(np.arange(len(n)), n)
    mu = np.asarray(means)[codes]
    seed_effect = rng.normal(0, seed_sd, (seeds, len(n)))[:, codes]
    values = mu + seed_effect + rng.normal(0, image_sd, len(codes)) + rng.normal(0, noise_sd, (seeds, len(codes)))
    return np.abs(values), codes


def test_holm_matches_hand_worked_example():
    # sorted p: 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    got = stats.holm([0.01, 0.04, 0.03, 0.005, np.nan])
    np.testing.assert_allclose(got[:4], [0.03, 0.06, 0.06, 0.02])
    assert np.isnan(got[4])
    np.testing.assert_allclose(stats.holm([0.6, 0.5]), [1.0, 1.0])  # capped at 1


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
    table = stats.group_intervals(result, metric="mse", n_boot=200)
    expected = result.by_group()  # mean over seeds of per-seed group means
    merged = table.merge(expected, on=["loss", "group"], suffixes=("", "_expected"))
    np.testing.assert_allclose(merged["mean"], merged["mse"])
    assert (merged["ci_low"] < merged["mean"]).all() and (merged["mean"] < merged["ci_high"]).all()
    assert list(table.columns) == ["loss", "group", "metric", "mean", "ci_low", "ci_high", "n", "seeds"]


def test_image_bootstrap_matches_scipy_bootstrap():
    """One seed: the within-group bootstrap is the ordinary bootstrap of a mean; compare with scipy's."""
    rng = np.random.default_rng(2)
    x = rng.gamma(2.0, 0.01, 150)
    boot, _ = stats.crossed_bootstrap(x[None, :], np.zeros(150, dtype=int), 1, n_boot=8000, random_state=3)
    ours = np.quantile(boot[:, 0], [0.025, 0.975])
    ref = sps.bootstrap((x,), np.mean, method="percentile", n_resamples=8000, rng=4).confidence_interval
    width = ref.high - ref.low
    assert abs(ours[0] - ref.low) < 0.05 * width and abs(ours[1] - ref.high) < 0.05 * width
    # and the bootstrap standard error agrees with the closed form s / sqrt(n)
    np.testing.assert_allclose(boot[:, 0].std(), x.std(ddof=1) / np.sqrt(len(x)), rtol=0.05)


def test_crossed_bootstrap_keeps_group_sizes_and_resamples_seeds():
    codes = np.array([0] * 5 + [1] * 2)
    values = np.vstack([np.arange(7.0), np.arange(7.0) + 100])  # seed 1 is 100 worse everywhere
    boot, base = stats.crossed_bootstrap(values, codes, 2, n_boot=500, baseline=np.arange(7.0))
    # group 1 holds images 5 and 6: any replicate mean is (one of 5, 5.5, 6) + (0, 50 or 100)
    assert set(np.round(boot[:, 1], 6)) <= {a + b for a in (5.0, 5.5, 6.0) for b in (0.0, 50.0, 100.0)}
    assert {0.0, 50.0, 100.0} <= set(np.round(boot[:, 1] - base[:, 1], 6))  # seeds are resampled
    assert set(np.round(base[:, 1], 6)) <= {5.0, 5.5, 6.0}  # the baseline shares the image draw


def test_crossed_bootstrap_covers_the_truth():
    """Simulated crossed data with known group means: the 95% intervals cover at least ~nominal."""
    rng = np.random.default_rng(5)
    truth = np.array([0.010, 0.012])
    reps, hit_mean, hit_gap = 150, 0, 0
    for r in range(reps):
        values, codes = simulate(rng, seeds=8, means=truth, seed_sd=0.001, image_sd=0.003)
        boot, _ = stats.crossed_bootstrap(values, codes, 2, n_boot=600, random_state=r)
        lo, hi = np.quantile(boot[:, 0], [0.025, 0.975])
        hit_mean += lo <= truth[0] <= hi
        lo, hi = np.quantile(boot[:, 1] - boot[:, 0], [0.025, 0.975])
        hit_gap += lo <= truth[1] - truth[0] <= hi
    assert hit_mean / reps >= 0.88 and hit_gap / reps >= 0.88


def test_image_only_resampling_would_undercover_with_seed_effects():
    """The seed part matters: with seed effects, resampling images alone covers far too rarely."""
    rng = np.random.default_rng(6)
    reps, hit = 100, 0
    for r in range(reps):
        values, codes = simulate(rng, seeds=8, means=(0.01, 0.01), seed_sd=0.003, image_sd=0.001)
        boot, _ = stats.crossed_bootstrap(values.mean(0, keepdims=True), codes, 2, n_boot=400, random_state=r)
        lo, hi = np.quantile(boot[:, 0], [0.025, 0.975])
        hit += lo <= 0.01 <= hi
    assert hit / reps < 0.7


def test_permutation_p_matches_exact_enumeration():
    rng = np.random.default_rng(7)
    x = rng.normal(size=8)
    codes = np.array([0, 0, 0, 1, 1, 1, 2, 2])

    def stat(c):
        means = [x[c == g].mean() for g in range(3)]
        return max(means) - min(means)

    observed = stat(codes)
    splits = {tuple(p) for p in itertools.permutations(codes)}  # 8! / (3! 3! 2!) = 560 labellings
    exact = np.mean([stat(np.array(p)) >= observed - 1e-12 for p in splits])
    assert len(splits) == 560
    assert stats.permutation_p(x, codes, 3, n_perm=9999) == pytest.approx(exact)


def test_permutation_p_is_uniform_under_the_null():
    rng = np.random.default_rng(8)
    p = [stats.permutation_p(rng.normal(size=60), np.repeat([0, 1], 30), 2, n_perm=199, random_state=i)
         for i in range(150)]
    assert sps.kstest(p, "uniform").pvalue > 0.001
    assert np.mean(np.array(p) <= 0.05) < 0.12


def test_disparities_on_a_planted_gap():
    rng = np.random.default_rng(9)
    fair, codes = simulate(rng, seeds=5, means=(0.01, 0.01))
    unfair, _ = simulate(rng, seeds=5, means=(0.010, 0.016))
    result = synthetic_result({"l1": fair, "l2": unfair}, codes)
    d = stats.disparities(result, n_boot=1000).set_index("loss")
    means = result.samples.groupby(["loss", "group"], observed=True)["mse"].mean()
    row = d.loc["l2"]
    assert (row.worst, row.reference) == ("b", "a")
    assert row.gap == pytest.approx(means["l2", "b"] - means["l2", "a"])
    assert row.ratio == pytest.approx(means["l2", "b"] / means["l2", "a"])
    assert row.gap_low < row.gap < row.gap_high and row.gap_lcb > 0 and row.ratio_lcb > 1
    assert row.gap_lcb <= row.gap_low + 1e-12  # the simultaneous one-sided bound is the more cautious
    assert row.p_value < 0.01 and d.loc["l1", "p_value"] > 0.01
    assert d.loc["l1", "gap_lcb"] < 0
    np.testing.assert_allclose(d["p_holm"], stats.holm(d["p_value"]))
    # psnr: worse means fewer dB; the gap is reference dB minus worst dB
    p = stats.disparities(result, metric="psnr", n_boot=300).set_index("loss").loc["l2"]
    db = result.samples.groupby(["loss", "group"], observed=True)["psnr"].mean()
    assert p.worst == "b" and p.gap == pytest.approx(db["l2", "a"] - db["l2", "b"]) and np.isnan(p.ratio)
    # a named reference: the other group is the worst even when it is the better one
    named = stats.disparities(result, reference="b", n_boot=300).set_index("loss").loc["l2"]
    assert (named.reference, named.worst) == ("b", "a") and named.gap < 0


def test_disparities_difficulty_adjusted_by_hand():
    rng = np.random.default_rng(10)
    values, codes = simulate(rng, seeds=3, means=(0.010, 0.016))
    result = synthetic_result({"l2": values}, codes)
    per_group = pd.DataFrame({"group": ["a", "b"], "mse": [0.002, 0.009], "mae": [0.0, 0.0], "psnr": [0.0, 0.0]})
    row = stats.disparities(result, pca=per_group, n_boot=300).iloc[0]
    # raw: b worse by ~0.006; in excess of PCA: a is 0.008 over, b 0.007 over -> a is (slightly) worse
    raw_gap = values[:, codes == 1].mean() - values[:, codes == 0].mean()
    excess = [values[:, codes == 0].mean() - 0.002, values[:, codes == 1].mean() - 0.009]
    assert row.worst == "b" and row.gap == pytest.approx(raw_gap)
    assert row.adjusted_worst == ("a" if excess[0] > excess[1] else "b")
    assert row.adjusted_gap == pytest.approx(abs(excess[0] - excess[1]))
    per_image = pd.DataFrame({"index": result.samples["index"].unique(), "mse": np.where(codes == 0, 0.002, 0.009)})
    again = stats.disparities(result, pca=per_image, n_boot=300).iloc[0]
    assert again.adjusted_gap == pytest.approx(row.adjusted_gap)
    with pytest.raises(UserError, match="does not cover"):
        stats.disparities(result, pca=per_image.iloc[:-1], n_boot=10)


def test_warnings_for_tiny_groups_few_seeds_and_failed_cells():
    rng = np.random.default_rng(11)
    values, codes = simulate(rng, seeds=3, n=(50, 12))
    result = synthetic_result({"l1": values}, codes, status={("l1", 2): "failed: non-finite loss in epoch 1"})
    row = stats.disparities(result, n_boot=200).iloc[0]
    assert "tiny group(s) b (n=12)" in row.warnings and "only 2 seed(s)" in row.warnings
    assert "1 failed cell(s)" in row.warnings and row.seeds == 2


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
        stats.group_intervals(result, alpha=1.5)
