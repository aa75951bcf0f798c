"""Power of the gate on real audits: how often `fairrecon check --max-ratio 1` detects a planted gap.

Step 1 trains null audits once: the default audit (digits, 4 losses, 50 epochs) with both groups
at the same brightness (0.5 and 0.5), many seeds, several split seeds (a new random split and group
assignment each). Both groups then come from the same distribution: the true gap is zero.

    python benchmarks/power.py train --dir /tmp/power --splits 16 --seeds 20

Step 2 forms replicate audits from disjoint sets of S seeds of one split (S = 3, 5, 10), plants a gap
by scaling every per-image error of the second group by (1 + f) under every loss (f = 0, 5%, 10%,
20%; f = 0 is the null), and runs the gate at its default policy. Scaling keeps the real seed and
image noise and makes the gap exact: the second group's expected error is (1 + f) times the first's.

    python benchmarks/power.py analyse --dir /tmp/power

It prints the detection rate (any loss "clear", i.e. `check --max-ratio 1` exits 1) with its binomial
standard error and one clustered by split (replicates of a split share its test images), per planted
gap and number of seeds, the per-loss rates, the median seed share of the variance (stats'
`seed_share`) and the median minimum detectable gap (`mde_relative`). Rates, not speed: a busy machine is fine (one torch thread).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fairrecon import gate, run_audit, stats
from fairrecon.errors import ExitCode
from fairrecon.results import AuditResult

NULL = dict(dataset="digits", targets=(0.5, 0.5), device="cpu", grad_points=0)


def train(folder: Path, splits: int, seeds: int, overrides: dict) -> None:
    """Null audits, one results folder per split seed; rerunning resumes (finished cells are kept)."""
    for split in range(splits):
        start = time.perf_counter()
        run_audit(**{**NULL, **overrides}, seeds=seeds, split_seed=split, out=str(folder / f"split{split}"))
        print(f"split {split}: {seeds} seeds in {time.perf_counter() - start:.0f} s", flush=True)


def replicates(result: AuditResult, seeds: int):
    """Disjoint sets of `seeds` seeds of one audit, each as its own AuditResult."""
    all_seeds = sorted(result.cells["seed"].unique())
    for k in range(len(all_seeds) // seeds):
        chosen = all_seeds[k * seeds : (k + 1) * seeds]
        yield AuditResult(
            result.spec,
            result.samples[result.samples["seed"].isin(chosen)].reset_index(drop=True),
            result.cells[result.cells["seed"].isin(chosen)].reset_index(drop=True),
            result.groups,
            result.history,
            result.info,
        )


def planted(result: AuditResult, f: float) -> AuditResult:
    """The same audit with the second group's per-image MSE scaled by (1 + f): its expected MSE is
    exactly (1 + f) times the first group's (the null groups are equal in distribution)."""
    samples = result.samples.copy()
    second = samples["group"].astype(str) == stats.group_order(result)[1]
    samples.loc[second, "mse"] *= 1 + f
    return AuditResult(result.spec, samples, result.cells, result.groups, result.history, result.info)


def analyse(folder: Path, seed_counts: list[int], gaps: list[float]) -> pd.DataFrame:
    """One row per (split, seed set, planted gap): the gate's exit code at --max-ratio 1, per-loss verdicts."""
    rows = []
    for path in sorted(folder.glob("split*"), key=lambda p: int(p.name[5:])):
        result = AuditResult.load(path)
        for seeds in seed_counts:
            for k, part in enumerate(replicates(result, seeds)):
                for f in gaps:
                    analysis = stats.analyse(planted(part, f))
                    outcome = gate.check(analysis, max_ratio=1.0)
                    d = analysis.disparities
                    rows.append(
                        {
                            "split": path.name,
                            "set": k,
                            "seeds": seeds,
                            "gap": f,
                            "detected": outcome.code == ExitCode.FAIL,
                            "code": outcome.code,
                            **{f"clear {r.loss}": r.verdict == stats.CLEAR for r in d.itertuples()},
                            "seed_share": d["seed_share"].median(),
                            "mde": d["mde_relative"].median(),
                            "ratio_low": d["ratio_lcb"].max(),
                        }
                    )
    return pd.DataFrame(rows)


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Detection rate per planted gap and seed count, with two standard errors: binomial (replicate
    audits as independent), and by split (the replicates of one split share its test images, which
    dominate the noise on digits: the sd of the per-split rates / sqrt(splits), the honest one)."""
    per_loss = [c for c in df.columns if c.startswith("clear ")]
    out = df.groupby(["gap", "seeds"]).agg(
        audits=("detected", "size"),
        splits=("split", "nunique"),
        detected=("detected", "mean"),
        **{c[6:]: (c, "mean") for c in per_loss},
        seed_share=("seed_share", "median"),
        mde=("mde", "median"),
    )
    by_split = df.groupby(["gap", "seeds", "split"])["detected"].mean().groupby(["gap", "seeds"])
    out.insert(3, "se_binomial", np.sqrt(out["detected"] * (1 - out["detected"]) / out["audits"]))
    out.insert(4, "se_by_split", by_split.std(ddof=1) / np.sqrt(by_split.size()))
    return out.reset_index()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    t = sub.add_parser("train", help="train the null audits")
    t.add_argument("--dir", type=Path, required=True)
    t.add_argument("--splits", type=int, default=16)
    t.add_argument("--seeds", type=int, default=20)
    for flag in ("dataset", "data-root"):
        t.add_argument(f"--{flag}", default=None, help="default: the spec's (digits)")
    for flag in ("epochs", "limit", "test-limit"):
        t.add_argument(f"--{flag}", type=int, default=None, help="default: the spec's")
    a = sub.add_parser("analyse", help="plant gaps, gate replicate audits, print the table")
    a.add_argument("--dir", type=Path, required=True)
    a.add_argument("--seeds", default="3,5,10", help="seeds per replicate audit")
    a.add_argument("--gaps", default="0,0.05,0.1,0.2", help="planted relative gaps (0: the null)")
    a.add_argument("--csv", help="write one row per replicate audit here")
    a.add_argument("--from-csv", help="summarise the rows a previous run wrote, without re-analysing")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small models on a shared 2-core machine: extra threads only contend
    if args.step == "train":
        given = {k: getattr(args, k) for k in ("dataset", "data_root", "epochs", "limit", "test_limit")}
        train(args.dir, args.splits, args.seeds, {k: v for k, v in given.items() if v is not None})
        return
    start = time.perf_counter()
    df = (
        pd.read_csv(args.from_csv)
        if args.from_csv
        else analyse(args.dir, [int(s) for s in args.seeds.split(",")], [float(g) for g in args.gaps.split(",")])
    )
    if args.csv:
        df.to_csv(args.csv, index=False)
    print(
        f"{df['split'].nunique()} null audits ({args.dir}), disjoint seed sets, gate at its default policy "
        f"(alpha {stats.POLICY.alpha}, {stats.POLICY.correction} over the losses), --max-ratio 1"
    )
    print(summarise(df).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
