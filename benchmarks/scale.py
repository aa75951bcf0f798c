"""Benchmark for docs/scale.md: Ray against in-process on a conv grid, Ray's scaling with workers, the cost of
one cell-step, and from it a projection of the findings sweep and a 64x64 conv face sweep on N workers.

The commands for docs/scale.md's tables (each prints the Markdown tables to paste there):

    python benchmarks/scale.py --repeats 3 --json scale-cpu.json
        on a quiet CPU machine: "In-process vs Ray", "Scaling with workers", "Cost of one cell-step"
        (MLP 28x28 and conv 64x64 on the CPU) and "Projection" on N CPU workers
    python benchmarks/scale.py --parts cost --device cuda --repeats 3 --json scale-gpu.json
        on a GPU machine: "Cost of one cell-step" on the GPU and "Projection" on N GPUs
    python benchmarks/scale.py --small
        a minute or two: proves the script, measures nothing

What each part runs (every run a fresh `python -m fairrecon audit ...` process, timed from outside, the
configurations interleaved over --repeats and the median reported):

* in-process vs Ray: the conv grid (Fashion-MNIST, --limit images, 4 losses x --seeds seeds, --epochs) in
  process at 1 and at 2 threads, and on a local Ray (2 CPUs, 1 CPU and 1 thread per task: 2 workers).
  Whole process: start-up, data, Ray's start (named separately, from the driver's log line "started a
  local Ray on 127.0.0.1 in X s"), training, statistics, reports.
* scaling: the same grid on a local Ray with W workers (--cpus-per-task = usable CPUs / W, 1 thread each)
  for W = 1, 2, 4, ... up to the usable CPUs: cells per second after Ray's start.
* cell-step cost: train_s / (cells x steps) in process at 1 thread, one seed's 4 cells trained together
  (a task's unit): the MLP on 28x28 Fashion-MNIST (the findings' model) and the conv model on the 164 Yale
  faces resized to 64x64 (made in a temporary folder from ../shared/datasets/yalefaces).
* projection (arithmetic, marked as such): cell-steps of a sweep x the measured cost / N workers, assuming
  perfect scaling (part 2 says how far that holds) plus Ray's start. The findings sweep: audits/sweeps/
  findings.toml (8 settings x 12 cells, 10,000 training images, batch 128; the 4 auto settings counted at
  their 100-epoch cap: an upper bound). The face sweep: 6 settings (latent 8/16/32 x output linear/sigmoid)
  x 4 losses x 5 seeds, 50 epochs, 131 training images (80% of 164).

It reports; it never asserts timings. Report the machine, its load and the repeats beside the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fairrecon.audit import usable_cpus  # noqa: E402

LOSSES = "l1,l2,log-mse,learned-sigma"
STARTED = re.compile(r"started a local Ray on 127\.0\.0\.1 in ([0-9.]+) s")


def audit(args: list[str], out: Path) -> dict:
    """One `fairrecon audit` process: wall seconds (from outside), Ray's start (from its log), summary timings."""
    command = [
        sys.executable,
        "-m",
        "fairrecon",
        "audit",
        *args,
        "--out",
        str(out),
    ]  # not --quiet: Ray's start is logged
    start = time.perf_counter()
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if run.returncode != 0:
        raise SystemExit(f"failed ({run.returncode}): {' '.join(command)}\n{run.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    ray_start = STARTED.search(run.stderr)
    cells = summary["cells"]
    return {
        "wall_s": wall,
        "ray_start_s": float(ray_start.group(1)) if ray_start else 0.0,
        "train_s": summary["info"]["timings"]["train_s"],
        "cells": len(cells),
        "epochs": [c["epochs"] for c in cells],
        "train_images": sum(g["n"] for g in summary["groups"] if g["split"] == "train"),
        "batch_size": summary["spec"]["batch_size"],
    }


def interleaved(configs: dict[str, list[str]], repeats: int, tmp: Path) -> dict[str, list[dict]]:
    """Each configuration `repeats` times, interleaved (a, b, c, a, b, c, ...), each into a new folder."""
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    for r in range(repeats):
        for name, args in configs.items():
            runs[name].append(audit(args, tmp / f"{name}-{r}"))
            print(f"  {name} #{r + 1}: {runs[name][-1]['wall_s']:.1f} s", file=sys.stderr)
    return runs


def median(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def cell_step_cost(run: dict) -> float:
    """Seconds per cell-step: training time over (cells x optimizer steps per cell)."""
    steps = sum(e * math.ceil(run["train_images"] / run["batch_size"]) for e in run["epochs"])
    return run["train_s"] / steps


def faces_64(tmp: Path, data_root: Path) -> tuple[Path, Path]:
    """The Yale faces at 64x64 in a folder of their own, and a labels CSV (brighter/darker half by brightness)."""
    import pandas as pd
    from PIL import Image

    source = data_root / "yalefaces"
    images = tmp / "faces64" / "images"
    images.mkdir(parents=True)
    table = pd.read_csv(source / "faces.csv")
    for name in table["file"]:
        Image.open(source / "images" / name).resize((64, 64), Image.LANCZOS).save(images / name)
    table["group"] = (table["brightness"] >= table["brightness"].median()).map({True: "brighter", False: "darker"})
    table["file"] = "images/" + table["file"]
    labels = tmp / "faces64" / "groups.csv"
    table[["file", "group"]].to_csv(labels, index=False)
    return images.parent, labels


PARTS = ("vs", "scaling", "cost")


def commands() -> str:
    """The docstring's commands for docs/scale.md's tables (tests/test_docs.py checks the page names these)."""
    return "commands" + __doc__.split("The commands", 1)[1].split("\n\nWhat each part runs", 1)[0]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] + " " + __doc__.splitlines()[1],
        epilog=commands(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--small", action="store_true", help="tiny sizes, 1 repeat: proves the script, measures nothing")
    ap.add_argument(
        "--parts",
        default=",".join(PARTS),
        help="which parts, comma-separated: vs (in-process vs Ray), scaling (Ray with 1, 2, 4, ... workers), "
        "cost (cell-step cost and the projection)  [default: %(default)s]",
    )
    ap.add_argument("--repeats", type=int, default=3, help="runs per configuration, interleaved  [default: 3]")
    ap.add_argument("--limit", type=int, default=2000, help="training images of the conv grid  [default: 2000]")
    ap.add_argument("--seeds", type=int, default=4, help="seeds of the conv grid (= tasks)  [default: 4]")
    ap.add_argument("--epochs", type=int, default=2, help="epochs of the conv grid and the MLP  [default: 2]")
    ap.add_argument("--device", default="cpu", help="the cell-step cost's device: cpu, or cuda  [default: cpu]")
    ap.add_argument("--data-root", default=str(REPO.parent / "shared" / "datasets"), help="[default: %(default)s]")
    ap.add_argument("--json", help="also write every measurement to this file")
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = parser()
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not parts or any(p not in PARTS for p in parts):
        ap.error(f"--parts {args.parts}: choose from {', '.join(PARTS)}")
    if args.device != "cpu" and parts != ["cost"]:
        ap.error(
            f"--device {args.device} is the cell-step cost's; give --parts cost with it (the grids run on the CPU)"
        )
    if args.small:
        args.repeats, args.limit, args.seeds, args.epochs = 1, 256, 2, 1
    cpus = usable_cpus()[0]
    data = ["--data-root", args.data_root, "--device", "cpu"]
    grid = ["--dataset", "fashion-mnist", "--model", "conv", "--losses", LOSSES, "--limit", str(args.limit)]
    grid += ["--test-limit", str(min(args.limit, 2000)), "--seeds", str(args.seeds), "--epochs", str(args.epochs)]
    grid += data
    ray = ["--executor", "ray", "--threads", "1"]
    report: dict = {"usable_cpus": cpus, "args": vars(args)}

    vs: dict[str, list[dict]] = {}
    scaling: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        if "vs" in parts:
            print("1. in-process vs Ray (conv grid)", file=sys.stderr)
            vs = interleaved(
                {
                    "in-process, 1 thread": [*grid, "--threads", "1"],
                    "in-process, 2 threads": [*grid, "--threads", "2"],
                    "ray, 2 workers x 1 thread": [*grid, *ray, "--cpus-per-task", str(max(cpus // 2, 1))],
                },
                args.repeats,
                tmp / "vs",
            )
            report["in_process_vs_ray"] = vs

        if "scaling" in parts:
            print("2. scaling with workers (local Ray)", file=sys.stderr)
            workers = [w for w in (1, 2, 4, 8, 16, 32, 64) if w <= cpus and cpus % w == 0]
            scaling = interleaved(
                {f"{w} worker(s)": [*grid, *ray, "--cpus-per-task", str(cpus // w)] for w in workers},
                args.repeats,
                tmp / "scaling",
            )
            report["scaling"] = scaling

        if "cost" in parts:
            print(f"3. cell-step cost (in-process on {args.device}, 1 thread, one seed's 4 cells)", file=sys.stderr)
            one = ["--seeds", "1", "--threads", "1", "--losses", LOSSES, "--device", args.device]
            mlp = ["--dataset", "fashion-mnist", "--data-root", args.data_root, "--model", "mlp", "--latent", "16"]
            mlp += ["--limit", str(args.limit), "--test-limit", "1000", "--epochs", str(args.epochs)]
            folder, labels = faces_64(tmp, Path(args.data_root))
            face = ["--dataset", "folder", "--data-root", str(folder / "images"), "--labels", str(labels)]
            face += ["--model", "conv", "--epochs", "1" if args.small else "5"]
            costs = interleaved(
                {"mlp 28x28": [*mlp, *one], "conv 64x64 faces": [*face, *one]}, args.repeats, tmp / "cost"
            )
            report["cell_step_cost"] = {k: statistics.median(map(cell_step_cost, v)) for k, v in costs.items()}

    print(f"usable CPUs: {cpus}; {args.repeats} interleaved run(s) per configuration, medians")
    if vs:
        print("\n## In-process vs Ray: conv grid, whole process (median of", args.repeats, "interleaved runs)\n")
        print("| run | wall s | Ray start s | train s (sum over tasks) |\n|---|---|---|---|")
        for name, runs in vs.items():
            print(
                f"| {name} | {median(runs, 'wall_s'):.1f} | {median(runs, 'ray_start_s'):.1f} | "
                f"{median(runs, 'train_s'):.1f} |"
            )
    if scaling:
        print("\n## Scaling with workers (local Ray, 1 thread per task)\n")
        print("| workers | wall s | cells per second after Ray's start |\n|---|---|---|")
        for name, runs in scaling.items():
            rate = statistics.median(r["cells"] / max(r["wall_s"] - r["ray_start_s"], 1e-9) for r in runs)
            print(f"| {name} | {median(runs, 'wall_s'):.1f} | {rate:.3f} |")
    if "cost" in parts:
        cost = report["cell_step_cost"]
        print(f"\n## Cell-step cost on {args.device} (1 thread, 4 cells trained together)\n")
        for name, seconds in cost.items():
            print(f"- {name}: {1000 * seconds:.2f} ms per cell-step")
        steps_per_epoch = math.ceil(10000 / 128)
        findings = 4 * 12 * 20 * steps_per_epoch + 4 * 12 * 100 * math.ceil(9000 / 128)  # auto: 10% for validation
        faces = 6 * 4 * 5 * 50 * math.ceil(131 / 128)
        ray_start = median(vs["ray, 2 workers x 1 thread"], "ray_start_s") if vs else 0.0
        report["projection"] = {"findings_cell_steps": findings, "faces_cell_steps": faces, "ray_start_s": ray_start}
        started = f"plus Ray's start, {ray_start:.1f} s" if vs else "Ray's start not included (part vs not run)"
        print(
            f"\n## Projection on N {args.device} workers (arithmetic from the costs above, perfect scaling assumed, "
            f"{started}; not a measurement)\n"
        )
        print("| sweep | cell-steps | 1 worker | 4 workers | 16 workers | 64 workers |\n|---|---|---|---|---|---|")
        for name, steps, each in (
            ("findings (MLP 28x28, auto at its 100-epoch cap)", findings, cost["mlp 28x28"]),
            ("faces (conv 64x64, 50 epochs)", faces, cost["conv 64x64 faces"]),
        ):
            hours = [(steps * each / n + ray_start) / 3600 for n in (1, 4, 16, 64)]
            print(f"| {name} | {steps:,} | " + " | ".join(f"{h:.2f} h" for h in hours) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
