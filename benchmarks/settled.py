"""Measure the notion of "settled" (fairrecon/settled.py): the stopping rule of --epochs auto, and the verdicts.

    python benchmarks/settled.py stopping NAME --dir D [--epochs K] --set key=value ...  # spec settings
    python benchmarks/settled.py verdicts DIR ...            # saved audits (e.g. 10 seeds each)
    python benchmarks/settled.py halves DIR ...              # the same audits, as two disjoint seed halves

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

`verdicts` and `halves` read saved audits and apply the verdict rule of this version (stats.disparities)
and the one before (`old_refusal`: the mean over seeds of the ratio's signed last-quarter change beyond 5%).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats as sps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fairrecon import settled  # noqa: E402
from fairrecon.data import load_images  # noqa: E402
from fairrecon.grid import Cell, TrainConfig  # noqa: E402
from fairrecon.groups import make_groups  # noqa: E402
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


# ---------------------------------------------------------------- verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("stopping")
    p.add_argument("name")
    p.add_argument("--set", dest="settings", nargs="*", default=[], help="spec settings: key=value ...")
    p.add_argument("--dir", required=True)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    {"stopping": stopping}[args.command](args)


if __name__ == "__main__":
    main()
