"""Measure the notion of "settled" (fairrecon/settled.py): the stopping rule of --epochs auto, and the verdicts.

    python benchmarks/settled.py stopping NAME --dir D [--epochs K] --set key=value ...  # spec settings
    python benchmarks/settled.py subset NAME --dir D [--ends 20 50]  # the drift's image-sampling error, from `stopping`
    python benchmarks/settled.py verdicts DIR ... [--factors 1 1.1] [--csv F]  # saved audits of 10 seeds: two halves
    python benchmarks/settled.py verdicts --table F  # the table of a saved --csv

`stopping` trains every cell of a spec (with --epochs auto's validation split) for a fixed K epochs,
recording after every epoch each group's validation and training MSE and every test image's MSE; it saves
them (D/NAME.npz, reused when present) and then applies, offline, the stopping rule of this version
(settled.stops) and the one before it (`old_rule`: every group's validation and training error changed by
at most 5% over the last quarter, a log-linear fit in steps, after >= 16 epochs). A cell under --epochs auto
is exactly the fixed run's cell at the epoch it stops (tests/test_dynamics.py), so one fixed run gives the
error at the stop, at twice the stop and at K. For each, the relative change of the held-out MSE from the
stop to K, with a paired 95% t interval over the test images ("clearly lower": below -5% with the interval
below 0). It also compares how well the two trend shapes (a power law in steps, fitted on [T/2, T]; a
log-linear trend in steps, fitted on the same points) predict the held-out error at 2T.

`verdicts` reads saved audits, cuts each into two disjoint halves of its seeds, optionally plants a gap (the
second group's errors, per image and at every curve point, times a factor: the drift is unchanged), and
applies the verdict rule of this version (stats.disparities) and the one before (`old_refusal`: refused when
the mean over seeds of the ratio's signed last-quarter change exceeds 5%) to the same intervals: refusal
rates, how often the two halves of one audit differ in refusing, and how often they contradict each other
(one half "clear gap", the other "no clear gap"; "no rule": the intervals' words with no refusal at all).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats as sps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fairrecon import settled, stats  # noqa: E402
from fairrecon.data import load_images  # noqa: E402
from fairrecon.grid import Cell, TrainConfig  # noqa: E402
from fairrecon.groups import make_groups  # noqa: E402
from fairrecon.results import AuditResult  # noqa: E402
from fairrecon.spec import AuditSpec  # noqa: E402
from fairrecon.stacked import group_errors, residual_chunks  # noqa: E402
from fairrecon.train import train_cells  # noqa: E402

OLD_DROP, OLD_WINDOW, OLD_MIN_EPOCHS = 0.05, 0.25, 16  # the rule before this version (fairrecon 0.1.0)


def old_last_drop(steps, values) -> np.ndarray:
    """The old rule's trend: 1 - exp(slope x window x last step) of a line through log(value) against step over
    the last quarter (at least 3 points), per column (0.1.0's convergence.last_drop)."""
    steps, values = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
    first = min(int(np.searchsorted(steps, (1 - OLD_WINDOW) * steps[-1])), len(steps) - 3)
    s, v = steps[first:], values[first:].reshape(len(steps) - first, -1)
    logv = np.log(v)
    centred = s - s.mean()
    slope = centred @ (logv - logv.mean(0)) / (centred @ centred)
    return (1 - np.exp(slope * OLD_WINDOW * steps[-1])).reshape(values.shape[1:])


def old_rule(steps, val, train, epoch: int) -> bool:
    """0.1.0's stopping rule for one cell: val, train (T, G)."""
    return epoch >= OLD_MIN_EPOCHS and all((np.abs(old_last_drop(steps, v)) <= OLD_DROP).all() for v in (val, train))


def first_stop(rule, steps, val, train, cap: int) -> int:
    """The first epoch at which `rule` stops a cell (cap if none)."""
    for e in range(1, cap + 1):
        if rule(steps[:e], val[:e], train[:e], e):
            return e
    return cap


def new_rule(steps, val, train, epoch: int) -> bool:
    return bool(settled.stops(steps, val[:, None, :], epoch)[0])


# ---------------------------------------------------------------- stopping


def record(spec: AuditSpec, epochs: int) -> dict[str, np.ndarray]:
    """Train every cell of `spec` for `epochs` epochs; after each: val and train MSE per group, test MSE per image."""
    data = make_groups(load_images(spec.dataset, spec.data_root, spec.download, spec.split_seed), spec)
    cells = [Cell(loss, seed) for seed in range(spec.seeds) for loss in spec.losses]
    fixed = spec.replace(epochs=epochs, max_epochs=AuditSpec().max_epochs, eval_points=epochs)
    config = TrainConfig.from_spec(fixed)
    G, N = len(data.names), len(data.test_x)
    val = np.full((len(cells), epochs, G), np.nan)
    train = np.full((len(cells), epochs, G), np.nan)
    test = np.full((len(cells), epochs, N), np.nan, dtype=np.float32)
    steps = np.zeros(epochs)

    @torch.no_grad()
    def on_eval(point) -> None:
        e = int(round(point.epoch)) - 1
        steps[e] = point.step
        v, _ = group_errors(point.stacked, data.val_x, data.val_g, G)
        mse = torch.cat([r.pow(2).mean(2) for _, r in residual_chunks(point.stacked, data.test_x, 1024)], dim=1)
        for c, cell in enumerate(point.stacked.cells):
            k = cells.index(cell)
            val[k, e], train[k, e], test[k, e] = v[c].numpy(), point.train_mse[c].double().numpy(), mse[c].numpy()

    train_cells(data.train_x, data.train_g, cells, config, on_eval=on_eval, n_groups=G)
    return {
        "loss": np.array([c.loss for c in cells]),
        "seed": np.array([c.seed for c in cells]),
        "steps": steps,
        "val": val,
        "train": train,
        "test": test,
        "test_g": data.test_g.numpy(),
        "names": np.array(data.names),
    }


def paired_change(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """Relative change of the mean from a to b (per-image errors on the same images), with a 95% t interval
    (delta method: the per-image differences over the mean of a)."""
    d = b.astype(float) - a.astype(float)
    m = a.astype(float).mean()
    half = sps.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return d.mean() / m, (d.mean() - half) / m, (d.mean() + half) / m


def stopping_table(rec: dict[str, np.ndarray]) -> pd.DataFrame:
    rows = []
    steps, K = rec["steps"], len(rec["steps"])
    for c in range(len(rec["loss"])):
        val, train, test = rec["val"][c], rec["train"][c], rec["test"][c]
        row = {"loss": rec["loss"][c], "seed": int(rec["seed"][c])}
        for name, rule in (("old", old_rule), ("new", new_rule)):
            e = first_stop(rule, steps, val, train, K)
            change, low, high = paired_change(test[e - 1], test[K - 1])
            twice = min(2 * e, K)
            row.update(
                {
                    f"{name}_stop": e,
                    f"{name}_mse": float(test[e - 1].mean()),
                    f"{name}_mse_twice": float(test[twice - 1].mean()),
                    f"{name}_to_K": change,
                    f"{name}_to_K_low": low,
                    f"{name}_to_K_high": high,
                    f"{name}_clearly_lower": bool(change < -settled.DROP and high < 0),
                }
            )
        row["mse_K"] = float(test[K - 1].mean())
        rows.append(row)
    return pd.DataFrame(rows)


def projection_errors(rec: dict[str, np.ndarray], ends=(10, 15, 20, 25, 30, 40, 50)) -> pd.DataFrame:
    """Per cell and T (2T <= K): log(predicted / actual) held-out MSE at 2T, from a line through the points of
    [T/2, T] against log(step) (power law) and against step (log-linear)."""
    rows = []
    steps, K = rec["steps"], len(rec["steps"])
    for c in range(len(rec["loss"])):
        mse = rec["test"][c].astype(float).mean(1)
        for T in ends:
            if 2 * T > K:
                continue
            k = np.arange(T // 2 - 1, T)
            y = np.log(mse[k])
            actual = np.log(mse[2 * T - 1])
            for shape, x, x2 in (
                ("power law", np.log(steps[k]), np.log(steps[2 * T - 1])),
                ("log-linear", steps[k], steps[2 * T - 1]),
            ):
                b, a = np.polyfit(x, y, 1)
                rows.append({"loss": rec["loss"][c], "T": T, "shape": shape, "error": a + b * x2 - actual})
    return pd.DataFrame(rows)


def stopping(args) -> None:
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{args.name}.npz"
    settings = dict(kv.split("=", 1) for kv in args.settings)
    if path.exists():
        rec = dict(np.load(path, allow_pickle=False))
    else:
        spec = AuditSpec().replace(epochs="auto", **settings)
        torch.set_num_threads(args.threads)
        start = time.perf_counter()
        rec = record(spec, args.epochs)
        print(f"trained {len(rec['loss'])} cells x {args.epochs} epochs in {time.perf_counter() - start:.0f} s")
        np.savez_compressed(path, **rec)
    table = stopping_table(rec)
    table.to_csv(folder / f"{args.name}-stopping.csv", index=False)
    K = len(rec["steps"])
    print(f"\n{args.name}: held-out MSE at the stop, at twice the stop, and after a fixed {K} epochs")
    print("| loss | seed | old: stop | MSE | new: stop | MSE | MSE at 2x new stop | fixed K | K vs new stop [95%] |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in table.itertuples():
        print(
            f"| {r.loss} | {r.seed} | {r.old_stop} | {r.old_mse:.4g} | {r.new_stop} | {r.new_mse:.4g} | "
            f"{r.new_mse_twice:.4g} | {r.mse_K:.4g} | {r.new_to_K:+.1%} [{r.new_to_K_low:+.1%}, {r.new_to_K_high:+.1%}] |"
        )
    for name in ("old", "new"):
        at_cap = int((table[f"{name}_stop"] == K).sum())
        lower = int(table[f"{name}_clearly_lower"].sum())
        print(
            f"{name} rule: stopped before the cap {len(table) - at_cap} of {len(table)}; a fixed {K}-epoch run "
            f"clearly lower (by > {settled.DROP:.0%}, paired interval below 0) for {lower} of {len(table)} cells; "
            f"median change stop -> K {table[f'{name}_to_K'].median():+.1%}"
        )
    proj = projection_errors(rec)
    if len(proj):
        summary = proj.groupby("shape")["error"].agg(
            median_abs=lambda e: np.median(np.abs(e)), median=np.median, n="size"
        )
        print("\nprojection of the held-out MSE to 2T from [T/2, T] (log(predicted/actual)):")
        print(summary.to_string(float_format=lambda v: f"{v:+.3f}"))


def drift_sampling(rec: dict[str, np.ndarray], T: int, sizes, draws: int = 200, seed: int = 0) -> pd.DataFrame:
    """How many test images the curve points need: per loss, a fixed T-epoch run's drift of log(worst/best) over
    [T/2, T] (settled.seed_drift over seeds) on the whole test set, its seed standard error, and the image-sampling
    standard deviation of the same drift on a random stratified subset of n images per group (as the curve
    subset is: the same images for every seed and point, so this error is shared by the seeds and does not show
    in their spread)."""
    rng = np.random.default_rng(seed)
    codes = rec["test_g"]
    steps = rec["steps"][:T]
    rows = []
    for loss in dict.fromkeys(rec["loss"]):
        cells = np.flatnonzero(rec["loss"] == loss)
        test = rec["test"][cells, :T].astype(float)  # (S, T, N)
        final = np.array([test[:, -1, codes == g].mean() for g in range(codes.max() + 1)])
        worst, best = int(np.argmax(final)), int(np.argmin(final))

        def drift(members_w, members_b) -> settled.Drift:
            ratio = test[:, :, members_w].mean(2) / test[:, :, members_b].mean(2)  # (S, T)
            return settled.seed_drift([(steps, r) for r in ratio])

        whole = drift(codes == worst, codes == best)
        row = {"loss": loss, "T": T, "seeds": len(cells), "drift": whole.estimate}
        row["seed_se"] = (whole.high - whole.estimate) / sps.t.ppf(settled.CONFIDENCE, len(cells) - 1)
        w_all, b_all = np.flatnonzero(codes == worst), np.flatnonzero(codes == best)
        for n in sizes:
            if n > min(len(w_all), len(b_all)):
                continue
            est = [
                drift(rng.choice(w_all, n, replace=False), rng.choice(b_all, n, replace=False)).estimate
                for _ in range(draws)
            ]
            row[f"image_sd_{n}"] = float(np.std(est, ddof=1))
        rows.append(row)
    return pd.DataFrame(rows)


def subset(args) -> None:
    rec = dict(np.load(Path(args.dir) / f"{args.name}.npz", allow_pickle=False))
    table = pd.concat([drift_sampling(rec, T, args.sizes) for T in args.ends], ignore_index=True)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))


# ---------------------------------------------------------------- verdicts


def seed_subset(result, seeds) -> AuditResult:
    """The same audit restricted to some of its seeds (as if it had been run with only those)."""
    keep = lambda df: None if df is None else df[df["seed"].isin(seeds)].reset_index(drop=True)  # noqa: E731
    out = copy.copy(result)
    out.samples, out.cells, out.history = keep(result.samples), keep(result.cells), keep(result.history)
    out.curves = keep(result.curves)
    return out


def planted(result, factor: float) -> AuditResult:
    """A gap of known size: the second group's errors (per image and at every curve point) times `factor`."""
    if factor == 1.0:
        return result
    out = copy.copy(result)
    second = str(result.samples["group"].cat.categories[1])
    out.samples = result.samples.copy()
    out.samples.loc[out.samples["group"].astype(str) == second, ["mse", "mae"]] *= factor
    out.samples["psnr"] = -10 * np.log10(out.samples["mse"])
    out.curves = result.curves.copy()
    out.curves.loc[out.curves["group"].astype(str) == second, ["mse", "mae"]] *= factor
    return out


def old_refusal(result, row) -> float:
    """0.1.0's drift of the row's pair: the mean over seeds of the signed last-quarter change of worst/best."""
    curves = result.curves.assign(group=result.curves["group"].astype(str))
    drifts = []
    for _, cell in curves[curves["loss"] == row.loss].groupby("seed"):
        wide = cell[cell["step"] < cell["step"].max()].pivot(index="step", columns="group", values="mse")
        drifts.append(
            -float(old_last_drop(wide.index.to_numpy(float), (wide[row.worst] / wide[row.reference]).to_numpy()))
        )
    return float(np.mean(drifts))


def verdict_rows(result, name: str, half: str) -> list[dict]:
    """Per loss: the verdict under this version's rule and under 0.1.0's (the same intervals)."""
    rows = []
    for row in stats.analyse(result).disparities.itertuples():
        drift = old_refusal(result, row)
        decided = stats.CLEAR if row.ratio_lcb > 1 else stats.NO_CLEAR
        rows.append(
            {
                "audit": name,
                "half": half,
                "loss": row.loss,
                "ratio": row.ratio,
                "ratio_lcb": row.ratio_lcb,
                "ratio_high": row.ratio_high,
                "drift": row.drift,
                "drift_low": row.drift_low,
                "drift_high": row.drift_high,
                "new": row.verdict,
                "old_drift": drift,
                "old": stats.INSUFFICIENT if abs(drift) > OLD_DROP else decided,
                "decided": decided,
            }
        )
    return rows


def verdicts(args) -> None:
    """Per audit folder (an even number of seeds): all its seeds, and halves A (the first half) and B (the rest),
    at each planted factor. Rates with a standard error clustered by audit (the rows of one audit share its
    test images and training data)."""
    if args.table:  # the table of a saved --csv, without recomputing
        verdict_table(pd.read_csv(args.table))
        return
    rows = []
    for folder in args.audits:
        full = AuditResult.load(folder)
        seeds = sorted(full.cells["seed"].unique())
        halves = {"all": seeds, "A": seeds[: len(seeds) // 2], "B": seeds[len(seeds) // 2 :]}
        for factor in args.factors:
            for half, chosen in halves.items():
                found = verdict_rows(planted(seed_subset(full, chosen), factor), Path(folder).name, half)
                rows += [{**r, "factor": factor} for r in found]
    df = pd.DataFrame(rows)
    if args.csv:
        df.to_csv(args.csv, index=False)
    verdict_table(df)


def verdict_table(df: pd.DataFrame) -> None:
    """Print the verdicts table (markdown) from `verdicts`' rows."""
    df = df.copy()
    df["kind"] = df["audit"].str.replace(r"-s\d+$", "", regex=True)

    def rate(flags: pd.Series, audits: pd.Series) -> str:
        per_audit = flags.groupby(audits.to_numpy()).mean()
        se = per_audit.std(ddof=1) / np.sqrt(len(per_audit)) if len(per_audit) > 1 else np.nan
        return f"{int(flags.sum())}/{len(flags)} = {flags.mean():.2f} ± {se:.2f}"

    print(
        "| audits | planted | refused, 5 seeds: new | old | refused, all seeds: new | old | "
        "halves differ, refusal: new | old | halves contradict: new | old | no rule |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (kind, factor), part in df.groupby(["kind", "factor"], sort=False):
        half = part[part["half"] != "all"]
        every = part[part["half"] == "all"]
        wide = half.pivot_table(
            index=["audit", "loss"], columns="half", values=["new", "old", "decided"], aggfunc="first"
        )
        audits = wide.index.get_level_values("audit").to_series()
        refused = {k: (wide[k] == stats.INSUFFICIENT) for k in ("new", "old")}
        cells = [rate(half[k] == stats.INSUFFICIENT, half["audit"]) for k in ("new", "old")] + [
            rate(every[k] == stats.INSUFFICIENT, every["audit"]) for k in ("new", "old")
        ]
        cells += [rate(pd.Series((r["A"] != r["B"]).to_numpy()), audits) for r in refused.values()]
        for k in ("new", "old", "decided"):  # one half "clear gap", the other "no clear gap"
            a, b = wide[(k, "A")].to_numpy(), wide[(k, "B")].to_numpy()
            contra = ((a == stats.CLEAR) & (b == stats.NO_CLEAR)) | ((a == stats.NO_CLEAR) & (b == stats.CLEAR))
            cells.append(rate(pd.Series(contra), audits))
        print(f"| {kind} | x{factor:g} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("stopping")
    p.add_argument("name")
    p.add_argument("--set", dest="settings", nargs="*", default=[], help="spec settings: key=value ...")
    p.add_argument("--dir", required=True)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p = sub.add_parser("subset")
    p.add_argument("name")
    p.add_argument("--dir", required=True)
    p.add_argument("--ends", type=int, nargs="+", default=[20, 50])
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    p = sub.add_parser("verdicts")
    p.add_argument("audits", nargs="*", help="saved audit folders (an even number of seeds each)")
    p.add_argument("--table", help="print the table of a CSV saved by --csv instead")
    p.add_argument("--factors", type=float, nargs="+", default=[1.0], help="planted gaps: second group x factor")
    p.add_argument("--csv")
    args = parser.parse_args()
    {"stopping": stopping, "subset": subset, "verdicts": verdicts}[args.command](args)


if __name__ == "__main__":
    main()
