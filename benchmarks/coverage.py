"""Coverage of fairrecon's intervals, measured: synthetic per-image errors with a known truth, pushed
through the real statistics code (`fairrecon.stats`: `Moments` and `PairedMoments`, the Cochran-Cox t
quantiles, the log-scale intervals of means and the Fieller ratios that `analyse` and the gate use, and
the loss contrasts and tail diagnostics of `disparities` / `loss_contrasts`).

Each simulated audit has S seeds scored on the same n test images per group. Image i of group g
under seed s has error

    mu_g * A_s * A_sg * B_i * E_si          (every factor with mean 1)

A_s: a seed's luck shared by all groups; A_sg: its luck on group g; B_i: the image's difficulty;
E_si: the seed x image interaction. The factors are independent with mean 1, so group g's expected
error over seeds and test images is exactly mu_g, and the true gap and ratio are known. The factors are
log-normal, except in the "stopped early" regime, where a third of the seeds have every error 2.5x
(a seed that stopped on a plateau, as learned-sigma seeds did in issue 20), rescaled to mean 1.

Sections (`--section`):

  intervals  per regime, seed count (2, 3, 5, 10) and group count (2, 3): coverage of the two-sided 95%
             interval of the last-vs-first gap and ratio (Fieller, as reported: how often its upper end is
             infinite; and a log-scale delta-method ratio interval, always bounded, for comparison), of each
             group's mean and the overall mean (log scale, as reported; and the plain t interval they
             replaced: how often its lower end was below 0), the family-wise coverage of all three
             pairs' Bonferroni intervals for 3 groups, and widths against an oracle interval that knows
             the true sd of the estimate.
  contrasts  two losses scored on the same seeds and images (their seed luck correlated, image
             difficulty shared): coverage of the paired interval of the ratio of their worst/best ratios
             (`loss_contrasts`), under a null (equal ratios; both unfair, or both fair, where each loss's
             worst group is picked by noise) and a planted difference; width against an unpaired interval
             (the two ratios' variances added as if independent), and how often it says "clearly ...".
  tails      one-sided outliers: a share of the images of the worse group (or, for the null, of both)
             k times worse, on log-normal image difficulty of log-sd 0.45 (measured on real audits) or
             0.8 (a heavy tail), and clean tails of growing weight: coverage of the ratio interval (and of
             the log-scale one, for comparison, and of the sensitivity line's interval without each group's
             top 1%, against the same truth), of the worse group's mean (log scale; plain t), the top-1% share of the error (`stats.TAIL_SHARE` warns above it), how
             often the warning fires, coverage when it stays silent, and the "clear gap" rate.

    python benchmarks/coverage.py                        # every section, about 10 minutes on one core
    python benchmarks/coverage.py --section intervals --reps 500
"""

from __future__ import annotations

import argparse
import time
from itertools import combinations

import numpy as np
import pandas as pd

from fairrecon import stats
from fairrecon.stats import Moments, PairedMoments

# log-sd of each factor: shared seed luck, per-group seed luck, image difficulty, interaction. Measured on
# the default digits audit (20 seeds, null groups): per-image CV 0.40-0.49, interaction 0.15-0.18,
# per-group seed CV 2-5% with 0.65-0.97 correlation between groups; the per-seed gap's spread was
# 0.3-0.5x the image-sampling error (image-dominated). The issue measured 4-7x on a 1-epoch
# Fashion-MNIST audit (seed-dominated). "unstable": seeds that disagree by tens of percent (learned sigma
# in issue 20, whose per-group intervals went below 0); "stopped early": the same with a two-point law.
REGIMES = {
    "seed-dominated": dict(shared=0.05, seed=0.18, image=0.45, inter=0.16),
    "mixed": dict(shared=0.05, seed=0.04, image=0.45, inter=0.16),
    "image-dominated": dict(shared=0.05, seed=0.008, image=0.45, inter=0.16),
    "unstable": dict(shared=0.4, seed=0.3, image=0.45, inter=0.16),
    "stopped early": dict(shared=0.0, seed=0.05, image=0.45, inter=0.16, early=True),
}
MEANS = {2: (0.010, 0.011), 3: (0.010, 0.011, 0.012)}  # true group means: gaps of 10% and 20%
N_PER_GROUP = 180  # about the default digits audit's test groups (359 images in two groups)
TAIL = 0.025  # each tail of a two-sided 95% interval


def lognormal(rng: np.random.Generator, sd: float, size) -> np.ndarray:
    """Log-normal factors with mean exactly 1."""
    return np.exp(rng.normal(-sd * sd / 2, sd, size))


def early_stops(rng: np.random.Generator, size) -> np.ndarray:
    """A seed factor with mean exactly 1: 2.5x (stopped early) with probability 1/3, else 1, rescaled."""
    return np.where(rng.random(size) < 1 / 3, 2.5, 1.0) / (2 / 3 + 2.5 / 3)


def simulate(
    rng: np.random.Generator,
    *,
    seeds: int,
    means: tuple[float, ...],
    n: int,
    shared: float,
    seed: float,
    image: float,
    inter: float,
    early: bool = False,
    outliers: tuple[float, float, tuple[int, ...]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """values (S, N) and group codes (N,) of one simulated audit. outliers = (share, factor, groups): in
    those groups each image is `factor` times harder with probability `share`; group g's expected error is
    then means[g] * (1 - share + share * factor) (`true_means`)."""
    g = len(means)
    codes = np.repeat(np.arange(g), n)
    mu = np.asarray(means)[codes]
    difficulty = lognormal(rng, image, len(codes))
    if outliers is not None:
        share, factor, groups = outliers
        hit = np.isin(codes, groups) & (rng.random(len(codes)) < share)
        difficulty = np.where(hit, difficulty * factor, difficulty)
    seed_luck = early_stops(rng, (seeds, 1)) if early else lognormal(rng, shared, (seeds, 1))
    values = (
        mu
        * seed_luck
        * lognormal(rng, seed, (seeds, g))[:, codes]
        * difficulty
        * lognormal(rng, inter, (seeds, len(codes)))
    )
    return values, codes


def true_means(means: tuple[float, ...], outliers=None) -> np.ndarray:
    out = np.asarray(means, dtype=float).copy()
    if outliers is not None:
        share, factor, groups = outliers
        out[list(groups)] *= 1 - share + share * factor
    return out


def covers(low: float, high: float, truth: float) -> bool:
    return bool(low <= truth <= high)


# ---------------------------------------------------------------- intervals


def replicate(rng, *, seeds: int, groups: int, regime: dict, n: int = N_PER_GROUP) -> dict:
    """One simulated audit through fairrecon.stats: the last-vs-first gap and ratio, the group means, the
    overall mean, and the family."""
    means = MEANS[groups]
    values, codes = simulate(rng, seeds=seeds, means=means, n=n, **regime)
    mom = Moments.of(values, codes, groups)
    last = groups - 1
    gap = mom.pair(last, 0)
    out = {
        "gap": gap.estimate,
        "gap_low": gap.low(TAIL),
        "gap_high": gap.high(TAIL),
        "ratio": mom.mean[last] / mom.mean[0],
    }
    out["ratio_low"], out["ratio_high"] = mom.ratio_interval(last, 0, TAIL)
    out["log_low"], out["log_high"] = log_ratio_interval(mom, last, 0, TAIL)
    mean_hits, plain_hits, below_zero = [], [], []
    for g in range(groups):
        c = mom.contrast(np.eye(groups)[g])
        mean_hits.append(covers(*c.positive_interval(TAIL), means[g]))
        plain_hits.append(covers(c.low(TAIL), c.high(TAIL), means[g]))
        below_zero.append(c.low(TAIL) < 0)
    overall = mom.contrast(mom.n / mom.n.sum())
    truth = float(np.dot(means, mom.n) / mom.n.sum())
    out.update(
        mean_covered=np.mean(mean_hits),
        mean_plain_covered=np.mean(plain_hits),
        mean_plain_below_zero=np.mean(below_zero),
        overall_covered=covers(*overall.positive_interval(TAIL), truth),
        overall_plain_covered=covers(overall.low(TAIL), overall.high(TAIL), truth),
    )
    per_seed = np.stack([values[:, codes == k].mean(1) for k in range(groups)], 1)
    seed_sd = float(np.std(per_seed[:, last] - per_seed[:, 0], ddof=1)) if seeds > 1 else np.nan
    averaged = values.mean(0)
    image_se = float(np.sqrt(sum(averaged[codes == k].var(ddof=1) / n for k in (0, last))))
    out["seed_over_image"] = seed_sd / image_se
    if groups > 2:  # every pair's Bonferroni interval covers its true gap at once
        pairs = list(combinations(range(groups), 2))
        tail = 0.05 / len(pairs) / 2
        out["family_covered"] = all(
            mom.pair(h, g).low(tail) <= means[h] - means[g] <= mom.pair(h, g).high(tail) for g, h in pairs
        )
    return out


def log_ratio_interval(mom: Moments, g: int, h: int, tail: float) -> tuple[float, float]:
    """The alternative measured beside Fieller's: exp(log(m_g / m_h) +- q se), se by the delta method (the
    contrast with weights 1 / m_g and -1 / m_h: the same two parts, Cochran-Cox's q). Always bounded."""
    w = np.zeros(len(mom.mean))
    w[g], w[h] = 1.0 / mom.mean[g], -1.0 / mom.mean[h]
    c = mom.contrast(w)
    half = c.quantile(tail) * c.se
    point = np.log(mom.mean[g] / mom.mean[h])
    return float(np.exp(point - half)), float(np.exp(point + half))


def cell(rng, *, seeds: int, groups: int, regime: str, reps: int) -> dict:
    """Coverage and widths over `reps` simulated audits of one configuration."""
    df = pd.DataFrame([replicate(rng, seeds=seeds, groups=groups, regime=REGIMES[regime]) for _ in range(reps)])
    means = MEANS[groups]
    true_gap, true_ratio = means[-1] - means[0], means[-1] / means[0]
    gap_cov = ((df.gap_low <= true_gap) & (true_gap <= df.gap_high)).mean()
    ratio_cov = ((df.ratio_low <= true_ratio) & (true_ratio <= df.ratio_high)).mean()
    log_cov = ((df.log_low <= true_ratio) & (true_ratio <= df.log_high)).mean()
    oracle_gap, oracle_ratio = 2 * 1.96 * df.gap.std(), 2 * 1.96 * df.ratio.std()
    oracle_cov = (np.abs(df.gap - true_gap) <= 1.96 * df.gap.std()).mean()
    return {
        "regime": regime,
        "groups": groups,
        "seeds": seeds,
        "seed/image": df.seed_over_image.median(),
        "gap cover": gap_cov,
        "ratio cover": ratio_cov,
        "ratio unbounded": (~np.isfinite(df.ratio_high)).mean(),
        "log-ratio cover": log_cov,
        "family cover": df.family_covered.mean() if "family_covered" in df else np.nan,
        "mean cover": df.mean_covered.mean(),
        "mean cover (plain t)": df.mean_plain_covered.mean(),
        "plain t below 0": df.mean_plain_below_zero.mean(),
        "overall cover": df.overall_covered.mean(),
        "overall cover (plain t)": df.overall_plain_covered.mean(),
        "oracle cover": oracle_cov,
        "gap width/oracle": (df.gap_high - df.gap_low).median() / oracle_gap,
        "ratio width/oracle": (df.ratio_high - df.ratio_low)[np.isfinite(df.ratio_high)].median() / oracle_ratio,
        "log-ratio width/oracle": (df.log_high - df.log_low).median() / oracle_ratio,
    }


def intervals(rng, args) -> pd.DataFrame:
    rows = []
    for regime in args.regimes.split(","):
        for groups in map(int, args.groups.split(",")):
            for seeds in map(int, args.seeds.split(",")):
                rows.append(cell(rng, seeds=seeds, groups=groups, regime=regime, reps=args.reps))
                _progress(rows)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- loss against loss (paired)

# (candidate loss's group means, reference loss's group means): the ratio of their ratios is known
CONTRASTS = {
    "null, both unfair": ((0.010, 0.011), (0.010, 0.011)),
    "null, both fair": ((0.010, 0.010), (0.010, 0.010)),
    "candidate 9% less fair": ((0.010, 0.012), (0.010, 0.011)),
    "null, reversed groups": ((0.011, 0.010), (0.010, 0.011)),
    "null, both unfair, 1% of images 50x": ((0.010, 0.011), (0.010, 0.011)),
}
CONTRAST_OUTLIERS = {"null, both unfair, 1% of images 50x": (0.01, 50.0)}  # images hard under both losses
PAIRING = dict(seed_corr=0.7, inter_corr=0.5)  # correlation of two losses' seed luck and interaction (logs)


def paired(
    rng, *, seeds: int, means: tuple, regime: dict, n: int = N_PER_GROUP, outliers: tuple[float, float] | None = None
) -> tuple[list[np.ndarray], np.ndarray]:
    """Two losses' values (S, N) on the same seeds and images: image difficulty shared, seed luck and the
    seed x image interaction correlated (PAIRING), each factor log-normal with mean 1 per loss."""
    codes = np.repeat([0, 1], n)
    difficulty = lognormal(rng, regime["image"], len(codes))
    if outliers is not None:  # the same images, in both groups, are `factor` times harder under both losses
        difficulty = np.where(rng.random(len(codes)) < outliers[0], difficulty * outliers[1], difficulty)

    def correlated(sd: float, size, rho: float) -> list[np.ndarray]:
        z0 = rng.normal(size=size)
        return [np.exp(sd * (rho * z0 + np.sqrt(1 - rho * rho) * rng.normal(size=size)) - sd * sd / 2) for _ in means]

    shared = correlated(regime["shared"], (seeds, 1), PAIRING["seed_corr"])
    seed = correlated(regime["seed"], (seeds, 2), PAIRING["seed_corr"])
    inter = correlated(regime["inter"], (seeds, len(codes)), PAIRING["inter_corr"])
    values = [np.asarray(m)[codes] * shared[k] * seed[k][:, codes] * difficulty * inter[k] for k, m in enumerate(means)]
    return values, codes


def contrast_replicate(rng, *, seeds: int, scenario: str, regime: dict) -> dict:
    """One pair of simulated losses through stats.loss_contrasts' arithmetic (`_contrast_numbers`) on each
    loss's own worst/best pair, as the disparities table picks it; the truth is the ratio of the two
    losses' true ratios on those pairs."""
    means = CONTRASTS[scenario]
    values, codes = paired(rng, seeds=seeds, means=means, regime=regime, outliers=CONTRAST_OUTLIERS.get(scenario))
    pm = PairedMoments.of(values, codes, 2)
    rows, truths = [], []
    for k in range(2):
        worst = int(np.argmax(pm.mean[k]))
        rows.append(pd.Series({"worst": str(worst), "reference": str(1 - worst)}))
        truths.append(means[k][worst] / means[k][1 - worst])
    got = stats._contrast_numbers(pm, ("0", "1"), rows[0], rows[1], TAIL, 1, stats.POLICY, True)
    truth = truths[0] / truths[1]
    # unpaired: each loss's log-ratio variance from its own Moments, added as if independent
    var = 0.0
    for k in range(2):
        mom = Moments.of(values[k], codes, 2)
        w, r = int(rows[k]["worst"]), int(rows[k]["reference"])
        weights = np.zeros(2)
        weights[w], weights[r] = 1 / mom.mean[w], -1 / mom.mean[r]
        var += mom.contrast(weights).se ** 2
    q = stats.Contrast(0.0, np.array([var]), np.array([seeds - 1.0])).quantile(TAIL)
    return {
        "covered": covers(got["low"], got["high"], truth),
        "width": np.log(got["high"]) - np.log(got["low"]),
        "unpaired_width": 2 * q * np.sqrt(var),
        "claims": got["low"] > 1 or got["high"] < 1,
        "truth": truth,
    }


def contrasts(rng, args) -> pd.DataFrame:
    rows = []
    for regime in args.regimes.split(","):
        for scenario in CONTRASTS:
            for seeds in map(int, args.seeds.split(",")):
                if seeds < 3 and regime == "stopped early":
                    continue
                df = pd.DataFrame(
                    [
                        contrast_replicate(rng, seeds=seeds, scenario=scenario, regime=REGIMES[regime])
                        for _ in range(args.reps)
                    ]
                )
                rows.append(
                    {
                        "regime": regime,
                        "scenario": scenario,
                        "seeds": seeds,
                        "cover": df.covered.mean(),
                        "says clearly": df.claims.mean(),
                        "width/unpaired": (df.width / df.unpaired_width).median(),
                    }
                )
                _progress(rows)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- tails

TAILS = {  # image log-sd, outliers (share, factor, groups), group means
    "clean (log-sd 0.45)": (0.45, None, (0.010, 0.011)),
    "clean (log-sd 0.8)": (0.8, None, (0.010, 0.011)),
    "clean (log-sd 1.2)": (1.2, None, (0.010, 0.011)),
    "1% of one group 50x": (0.45, (0.01, 50.0, (1,)), (0.010, 0.011)),
    "0.5% of one group 100x, log-sd 0.8": (0.8, (0.005, 100.0, (1,)), (0.010, 0.011)),
    "null, 1% of both 50x": (0.45, (0.01, 50.0, (0, 1)), (0.010, 0.010)),
    "null, 0.5% of both 100x, log-sd 0.8": (0.8, (0.005, 100.0, (0, 1)), (0.010, 0.010)),
}
SHARES = (0.05, 0.075, 0.10, 0.15, 0.20)  # candidate warning thresholds on the top-1% share


def tail_replicate(rng, *, seeds: int, scenario: str, regime: dict) -> dict:
    image, outliers, means = TAILS[scenario]
    values, codes = simulate(
        rng, seeds=seeds, means=means, n=N_PER_GROUP, **{**regime, "image": image}, outliers=outliers
    )
    truth = true_means(means, outliers)
    mom = Moments.of(values, codes, 2)
    le = stats.LossErrors("l", np.arange(seeds), np.arange(len(codes)), codes, ("0", "1"), values)
    tail = stats._tails(le, 1, 0, TAIL)
    low, high = mom.ratio_interval(1, 0, TAIL)
    return {
        "covered": covers(low, high, truth[1] / truth[0]),
        "log_covered": covers(*log_ratio_interval(mom, 1, 0, TAIL), truth[1] / truth[0]),
        "mean_covered": covers(*mom.contrast(np.array([0.0, 1.0])).positive_interval(TAIL), truth[1]),
        "mean_plain_covered": covers(
            mom.contrast(np.array([0.0, 1.0])).low(TAIL), mom.contrast(np.array([0.0, 1.0])).high(TAIL), truth[1]
        ),
        "clear": low > 1 or high < 1,
        "share": tail["tail_share"],
        "trimmed_covered": covers(tail["trimmed_ratio_low"], tail["trimmed_ratio_high"], truth[1] / truth[0]),
    }


def tails(rng, args) -> pd.DataFrame:
    rows = []
    seeds = int(args.seeds.split(",")[-1]) if args.tail_seeds is None else args.tail_seeds
    for scenario in TAILS:
        df = pd.DataFrame(
            [tail_replicate(rng, seeds=seeds, scenario=scenario, regime=REGIMES["mixed"]) for _ in range(args.reps)]
        )
        row = {
            "scenario": scenario,
            "seeds": seeds,
            "cover": df.covered.mean(),
            "log-ratio cover": df.log_covered.mean(),
            "worse group's mean cover": df.mean_covered.mean(),
            "(plain t)": df.mean_plain_covered.mean(),
            "trimmed cover": df.trimmed_covered.mean(),
            "clear gap": df.clear.mean(),
            "median top-1% share": df.share.median(),
            "p95 top-1% share": df.share.quantile(0.95),
        }
        for x in SHARES:
            warned = df.share > x
            row[f"warns >{x:.3g}"] = warned.mean()
            row[f"cover if silent >{x:.3g}"] = df.covered[~warned].mean() if (~warned).any() else np.nan
        rows.append(row)
        _progress(rows)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- main


def _progress(rows: list[dict]) -> None:
    print(
        pd.DataFrame(rows[-1:]).to_string(index=False, header=len(rows) == 1, float_format=lambda v: f"{v:.3f}"),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", default="intervals,contrasts,tails")
    parser.add_argument("--reps", type=int, default=1000, help="simulated audits per cell")
    parser.add_argument("--seeds", default="2,3,5,10")
    parser.add_argument("--groups", default="2,3")
    parser.add_argument("--regimes", default=",".join(REGIMES))
    parser.add_argument("--tail-seeds", type=int, default=5, help="seeds of the tails section's audits")
    parser.add_argument("--random-state", type=int, default=0)
    parser.add_argument("--csv", help="also write each section's table here (SECTION inserted before .csv)")
    args = parser.parse_args()
    rng = np.random.default_rng(args.random_state)
    se = np.sqrt(0.95 * 0.05 / args.reps)
    for section in args.section.split(","):
        start = time.perf_counter()
        table = {"intervals": intervals, "contrasts": contrasts, "tails": tails}[section](rng, args)
        if args.csv:
            table.to_csv(args.csv.replace(".csv", f"-{section}.csv"), index=False)
        print(
            f"\n[{section}] {args.reps} simulated audits per row, {N_PER_GROUP} test images per group; nominal 0.95 "
            f"(Monte Carlo SE {se:.3f} at 0.95)"
        )
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        if section == "intervals":
            cols = ["gap cover", "ratio cover", "family cover", "mean cover", "overall cover"]
            worst = table[table.seeds >= 3][cols].min().min()
            print(f"lowest coverage with >= 3 seeds: {worst:.3f} (goal >= 0.93)")
        print(f"[{section}] {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
