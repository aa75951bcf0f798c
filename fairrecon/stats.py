"""Disparity statistics: per-group error with confidence intervals, the gap and ratio of the
worst group against a reference group, a permutation test of "no gap" with Holm's correction
across losses, and the difficulty-adjusted gap against per-group PCA (Samadi et al. 2018).

Two sources of uncertainty, combined by one crossed ("pigeonhole") bootstrap:
  * training randomness: the unit is the seed (one trained model per loss and seed);
  * the test sample: the unit is the test image, resampled WITHIN its group so that every
    group keeps its size in every replicate (a small group never vanishes).
Every seed is scored on the same test images, so seeds and images are crossed factors.
A replicate draws S seeds with replacement and, independently, n_g images with replacement
inside each group g; the same image draw is used for every drawn seed (and for every loss,
and for the PCA baseline), and the replicate's group mean is the weighted mean of the
(seed, image) errors. Resampling both factors at once is conservative for a crossed design
(Owen 2007: it counts the seed x image interaction twice), which we prefer to intervals
that are too narrow. With few seeds (< MIN_SEEDS) the seed part is crude; a warning says so.

Point estimates are fairlearn MetricFrame group means (pooled over seeds, which equals the
mean of per-seed means because every seed sees the same images).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import permutations

import numpy as np
import pandas as pd
from scipy import stats as sps

from .errors import UserError
from .measure import PSNR_FLOOR_MSE

METRICS = ("mse", "mae", "psnr")
N_BOOT = 2000  # bootstrap replicates
N_PERM = 1999  # permutations for the "no gap" test (p resolution 1/2000)
MIN_GROUP_N = 30  # fewer test images in a group: warning (and the gate says "insufficient data")
MIN_SEEDS = 5  # fewer seeds: the seed part of the interval rests on too few runs
POWER = 0.8  # power at which the minimum detectable gap is stated
RANDOM_STATE = 0  # resampling is seeded: the same result gives the same table


def higher_is_worse(metric: str) -> bool:
    return metric != "psnr"


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


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise UserError(f"unknown metric '{metric}'; allowed: {', '.join(METRICS)}")


def _check_alpha(alpha: float) -> None:
    if not (0.0 < alpha < 1.0):
        raise UserError(f"alpha must be between 0 and 1, got {alpha}")


def group_names(result) -> tuple[str, ...]:
    """The result's groups in their own order (categories of samples.group, else first appearance)."""
    g = result.samples["group"]
    names = g.cat.categories if isinstance(g.dtype, pd.CategoricalDtype) else pd.unique(g)
    return tuple(str(n) for n in names)


def loss_errors(result, *, metric: str = "mse", losses: list[str] | None = None) -> list[LossErrors]:
    """Per-loss seed x image matrices of the ok cells (losses without any ok cell are left out)."""
    _check_metric(metric)
    names = group_names(result)
    code_of = {n: i for i, n in enumerate(names)}
    df = result.ok_samples
    order = list(dict.fromkeys(result.cells["loss"]))
    if losses is not None:
        unknown = sorted(set(losses) - set(order))
        if unknown:
            raise UserError(f"unknown loss(es) {unknown}; this result has {', '.join(order)}")
        order = [name for name in order if name in losses]
    out = []
    for loss in order:
        part = df[df["loss"] == loss]
        if part.empty:
            continue
        wide = part.pivot(index="index", columns="seed", values=metric)
        if wide.isna().any().any():
            raise UserError(f"loss {loss}: the seeds were not scored on the same test images")
        group = part.drop_duplicates("index").set_index("index")["group"].astype(str).reindex(wide.index)
        out.append(LossErrors(loss, wide.columns.to_numpy(), wide.index.to_numpy(),
                              group.map(code_of).to_numpy(dtype=int), names, wide.to_numpy(dtype=float).T))
    return out


def crossed_bootstrap(values: np.ndarray, codes: np.ndarray, n_groups: int, *, n_boot: int = N_BOOT,
                      random_state: int = RANDOM_STATE, baseline: np.ndarray | None = None,
                      block: int = 256) -> tuple[np.ndarray, np.ndarray | None]:
    """Replicates of each group's mean error, (n_boot, G), resampling seeds and within-group images.

    values (S, N): error of image i under seed s. baseline (N,), optional: a per-image quantity
    (the PCA error) resampled with the very same image draws, returned as its own (n_boot, G).
    Seeds and images use separate generators, so the image draws do not depend on S.
    """
    n_seeds = values.shape[0]
    img_rng, seed_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(random_state).spawn(2))
    members = [np.flatnonzero(codes == g) for g in range(n_groups)]
    out = np.empty((n_boot, n_groups))
    base = np.empty((n_boot, n_groups)) if baseline is not None else None
    for lo in range(0, n_boot, block):  # replicates in blocks: bounded memory
        b = min(block, n_boot - lo)
        weights = seed_rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=b) / n_seeds  # (b, S)
        for g, idx in enumerate(members):
            n = len(idx)
            draws = img_rng.integers(0, n, size=(b, n)) + n * np.arange(b)[:, None]
            counts = np.bincount(draws.ravel(), minlength=b * n).reshape(b, n) / n  # (b, n) image weights
            out[lo:lo + b, g] = ((counts @ values[:, idx].T) * weights).sum(1)
            if base is not None:
                base[lo:lo + b, g] = counts @ baseline[idx]
    return out, base


def to_metric_frame(result, loss: str, *, metric: str = "mse", seed: int | None = None):
    """fairlearn MetricFrame of the mean per-image `metric` by group, for one loss (all ok seeds, or one)."""
    from fairlearn.metrics import MetricFrame

    _check_metric(metric)
    df = result.ok_samples
    part = df[(df["loss"] == loss) & ((df["seed"] == seed) if seed is not None else True)]
    if part.empty:
        raise UserError(f"no ok samples for loss '{loss}'" + (f" and seed {seed}" if seed is not None else ""))
    return MetricFrame(metrics={metric: _mean_error}, y_true=np.zeros(len(part)), y_pred=part[metric].to_numpy(),
                       sensitive_features=part["group"].astype(str).rename("group"))


def _mean_error(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """MetricFrame metric: y_pred carries each image's error (y_true is a placeholder)."""
    return float(np.mean(y_pred))


def group_intervals(result, *, metric: str = "mse", alpha: float = 0.05, n_boot: int = N_BOOT,
                    random_state: int = RANDOM_STATE) -> pd.DataFrame:
    """One row per (loss, group): mean error (MetricFrame) and its (1 - alpha) crossed-bootstrap interval."""
    _check_alpha(alpha)
    rows = []
    for le in loss_errors(result, metric=metric):
        by_group = to_metric_frame(result, le.loss, metric=metric).by_group[metric]
        boot, _ = crossed_bootstrap(le.values, le.codes, len(le.names), n_boot=n_boot, random_state=random_state)
        low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2], axis=0)
        for g, (name, idx) in enumerate(zip(le.names, le.members)):
            rows.append({"loss": le.loss, "group": name, "metric": metric, "mean": float(by_group[name]),
                         "ci_low": low[g], "ci_high": high[g], "n": len(idx), "seeds": len(le.seeds)})
    return pd.DataFrame(rows, columns=["loss", "group", "metric", "mean", "ci_low", "ci_high", "n", "seeds"])


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control); NaN entries stay NaN."""
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    m = len(order)
    out[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return out


def _max_minus_min(*samples: np.ndarray, axis: int = -1) -> np.ndarray:
    means = np.stack([s.mean(axis=axis) for s in samples])
    return means.max(0) - means.min(0)


def permutation_p(per_image: np.ndarray, codes: np.ndarray, n_groups: int, *, n_perm: int = N_PERM,
                  random_state: int = RANDOM_STATE) -> float:
    """p-value of "no gap": group labels permuted over per-image errors, statistic max - min of group means."""
    samples = [per_image[codes == g] for g in range(n_groups)]
    res = sps.permutation_test(samples, _max_minus_min, permutation_type="independent", vectorized=True,
                               n_resamples=n_perm, alternative="greater", rng=random_state)
    return float(res.pvalue)


def _lower_bound(boot: np.ndarray, pairs: list[tuple[int, int]], level: float, ratio: bool) -> float:
    """Largest one-sided lower bound over (worse, better) pairs, each at `level`: a bound on max - min."""
    stat = [(boot[:, g] / boot[:, h]) if ratio else (boot[:, g] - boot[:, h]) for g, h in pairs]
    return float(max(np.quantile(s, level) for s in stat))


def _pairs(n_groups: int, ref: int | None) -> list[tuple[int, int]]:
    return list(permutations(range(n_groups), 2)) if ref is None else [(g, ref) for g in range(n_groups) if g != ref]


def _pick(mu: np.ndarray, ref: int | None) -> tuple[int, int]:
    """(worst, reference): the reference is the best group unless named; the worst is never the reference."""
    r = int(np.argmin(mu)) if ref is None else ref
    others = [g for g in range(len(mu)) if g != r]
    return others[int(np.argmax(mu[others]))], r


def disparities(result, *, metric: str = "mse", reference: str = "best", alpha: float = 0.05,
                adjusted: bool = False, pca: pd.DataFrame | None = None, losses: list[str] | None = None,
                n_boot: int = N_BOOT, n_perm: int = N_PERM, random_state: int = RANDOM_STATE) -> pd.DataFrame:
    """One row per loss: the worst group's gap and ratio against the reference group, with intervals and tests.

    gap = worst - reference in the metric's bad direction (for psnr: reference dB - worst dB), so gap >= 0
    when reference="best". gap_low/gap_high: (1 - alpha) percentile interval of that difference.
    gap_lcb / ratio_lcb: one-sided lower (1 - alpha) confidence bound on the largest gap (ratio) between
    any two groups (any group and the named reference), simultaneous over group pairs and the losses in
    the table (Bonferroni): the number the gate compares with its threshold.
    p_value: permutation test of "no gap" on seed-averaged per-image errors; p_holm: Holm across losses.
    adjusted_*: the same for each group's excess error over its own rank-k PCA error (k = spec.latent),
    filled when adjusted=True or `pca` is given (per image from `pca_errors`, or per group from `pca_reference`).
    """
    _check_alpha(alpha)
    table = loss_errors(result, metric=metric, losses=losses)
    names = group_names(result)
    if reference != "best" and reference not in names:
        raise UserError(f"reference group '{reference}' not in this result; groups: {', '.join(names)} (or 'best')")
    ref = None if reference == "best" else names.index(reference)
    if (adjusted or pca is not None) and table:
        baseline_of = _baseline_lookup(result, metric, pca)
        if any(np.isnan(baseline_of(le)).any() for le in table):
            raise UserError("the PCA table does not cover every test image (or group) of this result")
    sign = 1.0 if higher_is_worse(metric) else -1.0
    level = alpha / max(1, len(table)) / len(_pairs(len(names), ref))
    z = sps.norm.ppf(1 - alpha / 2) + sps.norm.ppf(POWER)
    failed = result.cells[result.cells["status"] != "ok"]
    rows = []
    for le in table:
        bad = sign * le.values
        baseline = sign * baseline_of(le) if (adjusted or pca is not None) else None
        boot, base = crossed_bootstrap(bad, le.codes, len(names), n_boot=n_boot, random_state=random_state,
                                       baseline=baseline)
        mu = np.array([bad[:, idx].mean() for idx in le.members])
        worst, r = _pick(mu, ref)
        diff = boot[:, worst] - boot[:, r]
        row = {"loss": le.loss, "metric": metric, "reference": names[r], "worst": names[worst],
               "reference_mean": sign * mu[r], "worst_mean": sign * mu[worst],
               "gap": mu[worst] - mu[r], **_interval("gap", diff, alpha),
               "gap_lcb": _lower_bound(boot, _pairs(len(names), ref), level, ratio=False)}
        if metric != "psnr":
            row.update({"ratio": mu[worst] / mu[r], **_interval("ratio", boot[:, worst] / boot[:, r], alpha),
                        "ratio_lcb": _lower_bound(boot, _pairs(len(names), ref), level, ratio=True)})
        else:
            row.update({"ratio": np.nan, "ratio_low": np.nan, "ratio_high": np.nan, "ratio_lcb": np.nan})
        row["p_value"] = permutation_p(bad.mean(0), le.codes, len(names), n_perm=n_perm, random_state=random_state)
        row["mde"] = z * float(diff.std(ddof=1)) if n_boot > 1 else np.nan
        if base is not None:
            excess = boot - base
            mu_adj = mu - np.array([baseline[idx].mean() for idx in le.members])
            aw, ar = _pick(mu_adj, ref)
            row.update({"adjusted_reference": names[ar], "adjusted_worst": names[aw],
                        "adjusted_gap": mu_adj[aw] - mu_adj[ar],
                        **_interval("adjusted_gap", excess[:, aw] - excess[:, ar], alpha),
                        "adjusted_gap_lcb": _lower_bound(excess, _pairs(len(names), ref), level, ratio=False)})
        row["n_min"] = min(len(idx) for idx in le.members)
        row["seeds"] = len(le.seeds)
        row["warnings"] = "; ".join(_warnings(le, row, failed))
        rows.append(row)
    out = pd.DataFrame(rows, columns=_COLUMNS)
    out.insert(out.columns.get_loc("p_value") + 1, "p_holm", holm(out["p_value"].to_numpy(dtype=float)))
    return out


_COLUMNS = ["loss", "metric", "reference", "worst", "reference_mean", "worst_mean",
            "gap", "gap_low", "gap_high", "gap_lcb", "ratio", "ratio_low", "ratio_high", "ratio_lcb",
            "p_value", "mde", "adjusted_reference", "adjusted_worst", "adjusted_gap", "adjusted_gap_low",
            "adjusted_gap_high", "adjusted_gap_lcb", "n_min", "seeds", "warnings"]


@dataclass(frozen=True)
class Analysis:
    """An audit's statistics for one metric, computed once by `analyse` and passed to every surface
    that shows them (terminal, report.md, report.html, summary.json): per-group intervals, per-loss
    gaps, and a sentence saying how they were made."""

    metric: str
    intervals: pd.DataFrame  # loss, group, metric, mean, ci_low, ci_high, n, seeds
    disparities: pd.DataFrame  # one row per loss, see `disparities`
    method: str


METHOD = ("95% intervals from fairrecon.stats (bootstrap over seeds and test images); "
          "p: permutation test over test images (seed-averaged errors), Holm-corrected across losses.")


def analyse(result, *, metric: str = "mse") -> Analysis:
    """The statistics of a result, once: group intervals and disparities for `metric`."""
    return Analysis(metric, group_intervals(result, metric=metric), disparities(result, metric=metric), METHOD)


def _interval(name: str, reps: np.ndarray, alpha: float) -> dict[str, float]:
    low, high = np.quantile(reps, [alpha / 2, 1 - alpha / 2])
    return {f"{name}_low": float(low), f"{name}_high": float(high)}


def _warnings(le: LossErrors, row: dict, failed: pd.DataFrame) -> list[str]:
    out = []
    lost = failed[failed["loss"] == le.loss]
    if len(lost):
        out.append(f"{len(lost)} failed cell(s) left out ({', '.join(f'seed {s}' for s in lost['seed'])})")
    small = [f"{n} (n={len(i)})" for n, i in zip(le.names, le.members) if len(i) < MIN_GROUP_N]
    if small:
        out.append(f"tiny group(s) {', '.join(small)}: fewer than {MIN_GROUP_N} test images")
    if len(le.seeds) < MIN_SEEDS:
        out.append(f"only {len(le.seeds)} seed(s): the training-seed part of the interval is crude "
                   f"(use >= {MIN_SEEDS} seeds)")
    if np.isfinite(row["mde"]) and row["gap_low"] <= 0 and abs(row["gap"]) < row["mde"]:
        out.append(f"low power: no gap detected, but the minimum detectable gap {row['mde']:.3g} "
                   f"(at {POWER:.0%} power) exceeds the observed {row['gap']:.3g}")
    return out


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
        mse = (residual ** 2).mean(1)
        frames.append(pd.DataFrame({"group": name, "index": data.test_index[data.test_g == code].numpy(),
                                    "mse": mse, "mae": np.abs(residual).mean(1),
                                    "psnr": -10.0 * np.log10(np.maximum(mse, PSNR_FLOOR_MSE))}))
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
    if (tuple(data.names) != group_names(result) or len(seen) != len(data.test_index)
            or set(seen["index"]) != set(data.test_index.tolist())):
        raise UserError("the images recomputed from this result's spec do not match its samples "
                        "(dataset files changed?); pass a PCA table explicitly")
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
