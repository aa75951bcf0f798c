"""Benchmark: the plain recipe against fairrecon, on the same grid and the same data, in one run.

    python benchmarks/bench.py                      # FashionMNIST, MLP, 4 losses x 3 seeds
    python benchmarks/bench.py --repeats 3 --scaling
    python benchmarks/bench.py --small              # seconds; what CI runs

The plain recipe is what one would write by hand: torchvision's FashionMNIST behind a
DataLoader, ToTensor and the per-image brightness map as transforms, one model at a time
with its own Adam. fairrecon: the same images as one tensor, brightness mapped in batch
(groups.py), every (loss, seed) cell trained at once (train.py). Both use the same seeded
initial weights, the same batch order and fairrecon.losses, so both train the same models:
the script prints how far apart the weights end up, and how many cell-steps each side took.

It reports; it never asserts timings. On a shared machine use the ratio of one run, and
--repeats for its spread.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torchvision  # imported up front so neither timed side pays for the import
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fairrecon.data import load_images  # noqa: E402
from fairrecon.groups import make_groups  # noqa: E402
from fairrecon.losses import get_loss  # noqa: E402
from fairrecon.models import build_model  # noqa: E402
from fairrecon.spec import AuditSpec  # noqa: E402
from fairrecon.train import Cell, TrainConfig, cell_bytes, train_cells  # noqa: E402

LOSSES = ("l1", "l2", "log-mse", "learned-sigma")

# ---------------------------------------------------------------- counting steps, memory

CELL_STEPS = {"n": 0}


def _count_cell_steps(opt, args, kwargs) -> None:
    """Global optimizer hook: an Adam step updates as many cells as its learned-loss-parameter group has rows."""
    CELL_STEPS["n"] += opt.param_groups[1]["params"][0].shape[0]


from torch.optim.optimizer import register_optimizer_step_post_hook  # noqa: E402

register_optimizer_step_post_hook(_count_cell_steps)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # Linux: resets the peak RSS (VmHWM)
        except OSError:
            pass


def peak_mb(device: torch.device, now: bool = False) -> float:
    """Peak memory since reset_peak (or, with now, current): CUDA allocated, or the process's RSS (Linux)."""
    if device.type == "cuda":
        return (torch.cuda.memory_allocated(device) if now else torch.cuda.max_memory_allocated(device)) / 2**20
    key = "VmRSS:" if now else "VmHWM:"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- the plain recipe

class MatchBrightness:
    """groups.match_to for one image: y = clip(b + c (z - mean z)), b by bisection so mean(y) = t.

    c is the dataset-wide contrast factor (one number, taken from fairrecon's grouping so
    both sides make the same images); z is the image or its negative, whichever has room.
    """

    def __init__(self, c: float):
        self.c = c

    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        flat = x.flatten().double()
        mu, lo, hi = flat.mean().item(), flat.min().item(), flat.max().item()

        def room(mu, lo, hi):
            below = t / (mu - lo) if mu - lo > 1e-12 else math.inf
            above = (1 - t) / (hi - mu) if hi - mu > 1e-12 else math.inf
            return min(below, above)

        z = 1 - flat if room(1 - mu, 1 - hi, 1 - lo) > room(mu, lo, hi) else flat
        centred = self.c * (z - z.mean())
        lo_b, hi_b = -centred.max().item(), 1 - centred.min().item()
        for _ in range(50):
            mid = (lo_b + hi_b) / 2
            if (centred + mid).clamp(0, 1).mean().item() < t:
                lo_b = mid
            else:
                hi_b = mid
        return ((lo_b + hi_b) / 2 + centred).clamp(0, 1).float().view_as(x)


class PlainGrouped(Dataset):
    """torchvision FashionMNIST -> ToTensor -> brightness map to the image's group target."""

    def __init__(self, root: str, index: list[int], targets: list[float], c: float):
        self.base = torchvision.datasets.FashionMNIST(root, train=True, transform=transforms.ToTensor())
        self.index, self.targets, self.brightness = index, targets, MatchBrightness(c)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> torch.Tensor:
        image, _ = self.base[self.index[i]]
        return self.brightness(image, self.targets[i])


class EpochPermutation(Sampler):
    """One torch.randperm per epoch from the cell's own generator: the batch order fairrecon uses.

    (torch's RandomSampler draws an extra permutation at the end of each epoch, which would
    give the two sides different orders from epoch 2 on, and so incomparable weights.)
    """

    def __init__(self, n: int, seed: int):
        self.n, self.generator = n, torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.generator).tolist())


def plain_dataset(root: str, data) -> PlainGrouped:
    """The images fairrecon grouped (same indices, targets and contrast factor), the plain way."""
    targets = [data.targets[g] for g in data.train_g.tolist()]
    return PlainGrouped(root, data.train_index.tolist(), targets, data.contrast_factor)


def plain_recipe(root: str, data, cells: list[Cell], config: TrainConfig, device: torch.device,
                 workers: int = 0) -> tuple[list[torch.nn.Module], float]:
    """One model at a time, each with its own DataLoader pass and Adam -> models, seconds spent waiting for data."""
    dataset = plain_dataset(root, data)
    models, waited = [], 0.0
    for cell in cells:
        torch.manual_seed(cell.seed)
        model = build_model(config.model, tuple(data.train_x.shape[1:]), config.latent, config.hidden).to(device)
        loss = get_loss(cell.loss)
        learned = torch.zeros(1, len(loss.params), device=device, requires_grad=True)  # one cell's row, as in train.py
        opt = torch.optim.Adam([{"params": model.parameters(), "lr": config.lr},
                                {"params": [learned], "lr": config.sigma_lr}])
        loader = DataLoader(dataset, batch_size=config.batch_size, sampler=EpochPermutation(len(dataset), cell.seed),
                            num_workers=workers)
        for _ in range(config.epochs):
            batches = iter(loader)
            while True:
                t = time.perf_counter()
                xb = next(batches, None)
                waited += time.perf_counter() - t
                if xb is None:
                    break
                xb = xb.to(device)
                raw = {p.name: learned[0, k] for k, p in enumerate(loss.params)}
                nll = loss.per_sample(xb.flatten(1), model(xb).flatten(1), raw, config.sigma_floor)
                opt.zero_grad()
                nll.mean().backward()
                opt.step()
        models.append(model)
    sync(device)
    return models, waited


# ---------------------------------------------------------------- fairrecon

def spec_for(args, limit: int) -> AuditSpec:
    # Neither side measures held-out images here, so fairrecon's grouping maps only 2 test images.
    return AuditSpec(dataset="fashion-mnist", data_root=args.data_root, limit=limit, test_limit=2,
                     model=args.model, seeds=args.seeds, epochs=args.epochs, batch_size=args.batch_size,
                     losses=tuple(args.losses), device=args.device, grad_points=0)


def fairrecon_run(spec: AuditSpec, cells: list[Cell], config: TrainConfig, device: torch.device):
    """Load the files, map brightness in batch, train the grid: everything the plain side does."""
    images = load_images(spec.dataset, spec.data_root)
    data = make_groups(images, spec)
    return data, train_cells(data.train_x, data.train_g, cells, config, device)


def timed(fn, device):
    reset_peak(device)
    before = CELL_STEPS["n"]
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t, CELL_STEPS["n"] - before, peak_mb(device)


# ---------------------------------------------------------------- main

def compare(args, device: torch.device) -> None:
    spec = spec_for(args, args.limit)
    config = TrainConfig.from_spec(spec)
    cells = [Cell(loss, seed) for loss in args.losses for seed in range(args.seeds)]
    print(f"grid: {len(args.losses)} losses x {args.seeds} seeds = {len(cells)} cells, model {args.model}, "
          f"{args.limit} FashionMNIST images, {args.epochs} epoch(s), batch {args.batch_size}")
    ratios, train_ratios = [], []
    for r in range(args.repeats):
        (data, trained), t_fr, steps_fr, mem_fr = timed(lambda: fairrecon_run(spec, cells, config, device), device)
        models, t_plain, steps_plain, mem_plain = timed(
            lambda: plain_recipe(args.data_root, data, cells, config, device, args.workers), device)
        ratios.append(t_plain / t_fr)
        models, t_data = models
        train_ratios.append((t_plain - t_data) / trained.seconds)
        print(f"run {r + 1}: plain {t_plain:.2f} s ({steps_plain} cell-steps, peak {mem_plain:.0f} MB; "
              f"waiting for data {t_data:.2f} s) | fairrecon {t_fr:.2f} s ({steps_fr} cell-steps, peak {mem_fr:.0f} MB; "
              f"train {trained.seconds:.2f} s) | ratio {t_plain / t_fr:.2f}x, training alone {train_ratios[-1]:.2f}x")
    # the same maths: both sides' data and trained weights
    plain = plain_dataset(args.data_root, data)
    plain_x = torch.stack([plain[i] for i in range(min(64, len(plain)))])
    data_diff = (plain_x - data.train_x[:len(plain_x)]).abs().max().item()
    weight_diff: dict[str, float] = {}  # per loss: L1's sign(r) turns float rounding into different steps
    for c, m in enumerate(models):
        fr = trained.stacked.module(c).state_dict()
        diff = max((fr[k] - v.cpu()).abs().max().item() for k, v in m.state_dict().items())
        weight_diff[cells[c].loss] = max(weight_diff.get(cells[c].loss, 0.0), diff)
    print(f"same data: max |plain image - fairrecon image| = {data_diff:.1e} (first 64 images)")
    print("same models: max |plain weight - fairrecon weight| per loss: "
          + ", ".join(f"{loss} {d:.1e}" for loss, d in weight_diff.items()))
    print(f"cell-steps: plain {steps_plain}, fairrecon {steps_fr}")
    spread = f" (min {min(ratios):.2f}x, max {max(ratios):.2f}x, {len(ratios)} runs)" if len(ratios) > 1 else ""
    print(f"training alone (plain minus its time waiting for data, vs train_cells): {statistics.median(train_ratios):.2f}x median")
    print(f"ratio plain/fairrecon: {statistics.median(ratios):.2f}x median{spread}")


def scaling_point(args, device: torch.device) -> None:
    """One point of the scaling table, in its own process so peak memory is its own."""
    spec = spec_for(args, args.limit)
    config = TrainConfig.from_spec(spec)
    cells = [Cell(LOSSES[i % len(LOSSES)], i // len(LOSSES)) for i in range(args.point_cells)]
    data = make_groups(load_images(spec.dataset, spec.data_root), spec)
    rss = peak_mb(device, now=True)
    (_, t, steps, peak) = timed(lambda: train_cells(data.train_x, data.train_g, cells, config, device, max_cells=len(cells)), device)
    est = len(cells) * cell_bytes(config, tuple(data.train_x.shape[1:])) / 2**20
    print(json.dumps({"cells": len(cells), "images": len(data.train_x), "seconds": t, "cell_steps": steps,
                      "peak_mb": peak, "before_mb": rss, "estimate_mb": est}))


def scaling(args) -> None:
    cells = [1, 2, 4, 12, 24] if not args.small else [1, 4]
    sizes = [args.limit // 4, args.limit // 2, args.limit] if not args.small else [args.limit // 2, args.limit]
    points = [(c, args.limit) for c in cells] + [(len(args.losses) * args.seeds, n) for n in sizes[:-1]]
    print("\nscaling (fairrecon, train_cells only, each point in a fresh process):")
    print(f"{'cells':>5} {'images':>7} {'seconds':>8} {'s/cell-step':>11} {'peak MB':>8} {'+train MB':>9} {'estimate MB':>11}")
    for c, n in points:
        cmd = [sys.executable, __file__, "--_point", str(c), "--limit", str(n), "--epochs", str(args.epochs),
               "--model", args.model, "--device", args.device, "--data-root", args.data_root,
               "--batch-size", str(args.batch_size), "--threads", str(torch.get_num_threads())]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if out.returncode != 0:
            print(f"{c:>5} {n:>7} failed: {out.stderr.strip().splitlines()[-1:]}")
            continue
        p = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{p['cells']:>5} {p['images']:>7} {p['seconds']:>8.2f} {p['seconds'] / p['cell_steps'] * 1e3:>9.2f}ms "
              f"{p['peak_mb']:>8.0f} {p['peak_mb'] - p['before_mb']:>9.0f} {p['estimate_mb']:>11.0f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=10000, help="training images (default 10000)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--losses", type=lambda s: s.split(","), default=list(LOSSES))
    ap.add_argument("--model", choices=("mlp", "conv"), default="mlp")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--data-root", default=str(REPO.parent / "shared" / "datasets"))
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers for the plain recipe")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--scaling", action="store_true", help="also time fairrecon across grid and dataset sizes")
    ap.add_argument("--scaling-only", action="store_true", help="only the scaling table")
    ap.add_argument("--small", action="store_true", help="CI preset: 256 images, 1 epoch, 2 losses x 1 seed")
    ap.add_argument("--_point", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.small:
        args.limit, args.epochs, args.seeds, args.losses = 256, 1, 1, ["l2", "learned-sigma"]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args._point is not None:
        args.point_cells = args._point
        return scaling_point(args, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"torch {torch.__version__}, device {device} ({name}), {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} threads, load average {load}")
    if not args.scaling_only:
        compare(args, device)
    if args.scaling or args.scaling_only:
        scaling(args)


if __name__ == "__main__":
    main()
