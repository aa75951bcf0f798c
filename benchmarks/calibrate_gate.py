"""Calibrate the gate's rule (gate.py): how often it passes a gap at or above its threshold (a false pass),
how often it fails a gap below it, and what it says about audits too small to tell.

The rule: pass only when every upper end is below the threshold, fail when a lower end is above it,
"insufficient data" (exit 3) otherwise. Two ways to measure it:

  simulated  audits drawn from benchmarks/coverage.py's model (S seeds x n images per group, log-normal
             seed, image and interaction factors with mean 1, so the true ratio is known exactly), at true
             ratios below, at and above the threshold, for a well-powered audit (180 images per group, 5
             seeds) and an underpowered one (40 images, 3 seeds). Thousands of audits in a minute.
  real       real null audits on the bundled digits (both groups at brightness 0.5: the same images split
             at random, so the population ratio is exactly 1), trained once per split seed and kept in
             --dir; a gap is planted by scaling the second group's per-image errors by (1 + f) under every
             loss, which makes the population ratio exactly 1 + f and keeps the real seed and image noise.

For each true ratio and threshold it prints the share of audits (or losses) that pass, fail and are
insufficient, and beside it what the old rule (pass whenever it does not fail) would have passed.

    python benchmarks/calibrate_gate.py simulated --reps 2000
    python benchmarks/calibrate_gate.py real --dir /tmp/gate --splits 12
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fairrecon import gate, run_audit, stats
from fairrecon.errors import ExitCode
from fairrecon.results import AuditResult


def _coverage():
    """benchmarks/coverage.py as a module (its name would clash with installed packages)."""
    spec = importlib.util.spec_from_file_location("benchmarks_coverage", Path(__file__).with_name("coverage.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


AUDITS = {  # simulated audit sizes: test images per group, seeds
    "powered (180 images/group, 5 seeds)": (180, 5),
    "underpowered (40 images/group, 3 seeds)": (40, 3),
}
RATIOS = (1.0, 1.05, 1.1, 1.2, 1.3)  # true worst/best ratios
THRESHOLDS = (1.0, 1.1, 1.2)
REAL = dict(dataset="digits", targets=(0.5, 0.5), seeds=3, epochs=5, batch_size=64, latent=8, hidden=64, device="cpu")


def _synthetic(values: np.ndarray, codes: np.ndarray, metric: str = "mse") -> AuditResult:
    """An AuditResult holding one loss's simulated per-image errors (S, N)."""
    from fairrecon.spec import AuditSpec

    seeds, n = values.shape
    names = ["a", "b"]
    samples = pd.DataFrame(
        {
            "loss": "l2",
            "seed": np.repeat(np.arange(seeds), n),
            "group": pd.Categorical.from_codes(np.tile(codes, seeds), categories=names),
            "index": np.tile(np.arange(n), seeds),
            "mse": values.ravel(),
        }
    )
    cells = pd.DataFrame({"loss": "l2", "seed": np.arange(seeds), "status": "ok"})
    groups = pd.DataFrame({"split": "test", "group": names, "n": np.bincount(codes)})
    history = pd.DataFrame(columns=["loss", "seed", "epoch", "train_nll", "train_mse"])
    return AuditResult(AuditSpec(losses=("l2",), seeds=seeds), samples, cells, groups, history, {})


def simulated(args) -> pd.DataFrame:
    cov = _coverage()
    rng = np.random.default_rng(args.random_state)
    rows = []
    for audit, (n, seeds) in AUDITS.items():
        for ratio in RATIOS:
            for _ in range(args.reps):
                values, codes = cov.simulate(
                    rng, seeds=seeds, means=(0.010, 0.010 * ratio), n=n, **cov.REGIMES["mixed"]
                )
                analysis = stats.analyse(_synthetic(values, codes))
                row = analysis.disparities.iloc[0]
                for threshold in THRESHOLDS:
                    code = gate.check(analysis, max_ratio=threshold).code
                    rows.append(
                        {
                            "audit": audit,
                            "true ratio": ratio,
                            "threshold": threshold,
                            "code": code,
                            "mde": row.mde_relative,
                        }
                    )
    return pd.DataFrame(rows)


def train(folder: Path, splits: int) -> None:
    """Null audits, one results folder per split seed; rerunning resumes (finished cells are kept)."""
    for split in range(splits):
        start = time.perf_counter()
        run_audit(**REAL, losses=("l1", "l2"), split_seed=split, out=str(folder / f"split{split}"), threads=1)
        print(f"split {split}: trained in {time.perf_counter() - start:.0f} s", flush=True)


def planted(result: AuditResult, f: float) -> AuditResult:
    """The same audit with the second group's per-image MSE scaled by (1 + f) under every loss."""
    samples = result.samples.copy()
    second = samples["group"].astype(str) == stats.group_order(result)[1]
    samples.loc[second, "mse"] *= 1 + f
    return AuditResult(result.spec, samples, result.cells, result.groups, result.history, result.info, curves=None)


def real(args) -> pd.DataFrame:
    train(args.dir, args.splits)
    rows = []
    for split in range(args.splits):
        result = AuditResult.load(args.dir / f"split{split}")
        for ratio in RATIOS:
            analysis = stats.analyse(planted(result, ratio - 1))
            for threshold in THRESHOLDS:
                outcome = gate.check(analysis, max_ratio=threshold)
                for o, d in zip(outcome.outcomes.itertuples(), analysis.disparities.itertuples()):
                    rows.append(
                        {
                            "audit": "digits null, planted",
                            "split": split,
                            "loss": o.loss,
                            "true ratio": ratio,
                            "threshold": threshold,
                            "code": {"pass": ExitCode.PASS, "fail": ExitCode.FAIL}.get(
                                o.outcome, ExitCode.INSUFFICIENT
                            ),
                            "mde": d.mde_relative,
                        }
                    )
    return pd.DataFrame(rows)


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Shares of pass / fail / insufficient per audit size, true ratio and threshold, the old rule's pass
    share (everything that did not fail), and the median detectable gap."""
    out = (
        df.assign(
            passed=df.code == ExitCode.PASS,
            failed=df.code == ExitCode.FAIL,
            insufficient=df.code == ExitCode.INSUFFICIENT,
            old_passed=df.code != ExitCode.FAIL,
        )
        .groupby(["audit", "true ratio", "threshold"], sort=False)
        .agg(
            n=("code", "size"),
            passed=("passed", "mean"),
            failed=("failed", "mean"),
            insufficient=("insufficient", "mean"),
            old_rule_passed=("old_passed", "mean"),
            median_detectable_gap=("mde", "median"),
        )
        .reset_index()
    )
    out["wrong"] = np.where(out["true ratio"] >= out["threshold"], out["passed"], out["failed"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="how", required=True)
    s = sub.add_parser("simulated")
    s.add_argument("--reps", type=int, default=2000, help="simulated audits per audit size and true ratio")
    s.add_argument("--random-state", type=int, default=0)
    r = sub.add_parser("real")
    r.add_argument("--dir", type=Path, required=True, help="where the null audits are trained (and resumed)")
    r.add_argument("--splits", type=int, default=12)
    parser.add_argument("--csv", help="write one row per audit (per loss for real), true ratio and threshold")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models on a shared machine: extra threads only contend
    start = time.perf_counter()
    df = simulated(args) if args.how == "simulated" else real(args)
    if args.csv:
        df.to_csv(args.csv, index=False)
    table = summarise(df)
    print(
        f"gate rule: {gate.RULE}; alpha {stats.POLICY.alpha}, {stats.POLICY.correction}. 'wrong': passed at a true "
        "ratio >= threshold (a false pass), or failed below it (a false fail)."
    )
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    worst = table[table["true ratio"] >= table["threshold"]]["passed"].max()
    print(f"largest false-pass rate (true ratio >= threshold): {worst:.3f}; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
