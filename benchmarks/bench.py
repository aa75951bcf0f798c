"""Benchmark: the whole `fairrecon audit` process against a competent plain PyTorch loop, same grid, data and epochs.

    python benchmarks/bench.py --limit 5000 --model conv --repeats 3   # 4 losses x 3 seeds, 1 epoch
    python benchmarks/bench.py --limit 60000 --model mlp               # full Fashion-MNIST
    python benchmarks/bench.py --check-competent --limit 512 --test-limit 128 --epochs 2   # same training?
    python benchmarks/bench.py --scaling-only                          # time, memory vs cells, images, image size
    python benchmarks/bench.py --small                                 # seconds; what CI runs

Each side is a fresh process, timed from the outside, interleaved (competent, [transform,] fairrecon, ...):

* fairrecon: `python -m fairrecon audit ... --out TMP`: load, groups, training (with its gradient
  shares and curves), measurement, statistics, report.md/report.html/summary.json. Its breakdown
  comes from summary.json's info.timings; "other" is the rest of the process (start-up, imports,
  writing files).
* competent plain loop (the main row): the grouped images built once as tensors (fairrecon's vectorised
  grouping, timed as its "images"), batches taken by index from memory, one model at a time with its own Adam
  at torch's default threads, then every held-out image's error. The same images, seeded initial weights, batch
  order and fairrecon.losses as fairrecon (`--check-competent` compares the trained weights and errors).
* per-image-transform recipe (`--transform-row`, a second labelled row): torchvision's FashionMNIST behind a
  DataLoader, ToTensor and the per-image brightness map (a 50-step bisection) as transforms, one model at a time
  with its own Adam, then each model over the held-out images (the same transform) for every image's error.
  Which images go to which group (fairrecon's assignment) is worked out first and left out of its time ("setup").

The machine's limit, in the same run (the main process, at the thread count used, before the comparison):
sgemm GFLOP/s (a --sgemm-n square float32 matmul, median of --limit-repeats), one cell's forward + backward at
--layers-batch, the grid's training FLOPs counted from the layer shapes (step_flops: 2 m n k per matmul forward,
the same again for the weight gradient and for the input gradient of every layer but the first; biases,
activations, losses and Adam not counted), training's achieved GFLOP/s (FLOPs / training seconds) and its
fraction of sgemm, and each phase's share of fairrecon's whole process. --json FILE writes these numbers.

It reports; it never asserts timings. On a shared machine use the median ratio of interleaved
--repeats and say so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fairrecon.data import load_images  # noqa: E402
from fairrecon.grid import Cell, TrainConfig  # noqa: E402
from fairrecon.groups import make_groups  # noqa: E402
from fairrecon.losses import get_loss  # noqa: E402
from fairrecon.memory import cell_bytes  # noqa: E402
from fairrecon.models import build_model, split_output  # noqa: E402
from fairrecon.spec import AuditSpec  # noqa: E402
from fairrecon.stacked import init_cells  # noqa: E402
from fairrecon.threads import default_threads  # noqa: E402
from fairrecon.train import train_cells  # noqa: E402

LOSSES = ("l1", "l2", "log-mse", "learned-sigma")

# ---------------------------------------------------------------- counting steps, memory

CELL_STEPS = {"n": 0}


def _count_cell_steps(opt, args, kwargs) -> None:
    """Global optimizer hook: an Adam step updates as many cells as its learned-loss-parameter group has rows."""
    CELL_STEPS["n"] += opt.param_groups[1]["params"][0].shape[0]


def peak_mb(now: bool = False) -> float:
    """This process's peak (or, with now, current) resident memory, Linux's VmHWM / VmRSS."""
    key = "VmRSS:" if now else "VmHWM:"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def run_process(cmd: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """Run cmd to its end -> (wall seconds, its own peak RSS in MB (wait4), its stdout); stderr on failure."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=REPO, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}: {err.read().strip()[-2000:]}")
        return wall, usage.ru_maxrss / 1024, out.read()


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

    def __init__(self, root: str, index: list[int], targets: list[float], c: float, *, train: bool = True):
        self.base = torchvision.datasets.FashionMNIST(root, train=train, transform=transforms.ToTensor())
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


def spec_for(args) -> AuditSpec:
    """The audit both sides run (bench flags -> spec fields)."""
    return AuditSpec(
        dataset="fashion-mnist",
        data_root=args.data_root,
        limit=args.limit,
        test_limit=args.test_limit,
        model=args.model,
        seeds=args.seeds,
        epochs=args.epochs,
        batch_size=args.batch_size,
        losses=tuple(args.losses),
        device=args.device,
    )


def plain_datasets(root: str, data) -> tuple[PlainGrouped, PlainGrouped]:
    """The images fairrecon grouped (same indices, targets and contrast factor), the plain way."""

    def one(index, g, train):
        return PlainGrouped(
            root, index.tolist(), [data.targets[k] for k in g.tolist()], data.contrast_factor, train=train
        )

    return one(data.train_index, data.train_g, True), one(data.test_index, data.test_g, False)


def plain_recipe(
    train_set: PlainGrouped, test_set: PlainGrouped, shape, cells: list[Cell], config: TrainConfig, device: torch.device
) -> dict[str, float]:
    """One model at a time: its own DataLoader pass and Adam, then every held-out image's MSE -> seconds per part."""
    seconds = {"train_s": 0.0, "eval_s": 0.0, "waited_s": 0.0}
    for cell in cells:
        start = time.perf_counter()
        torch.manual_seed(cell.seed)
        model = build_model(config.model, shape, config.latent, config.hidden).to(device)
        loss = get_loss(cell.loss)
        learned = torch.zeros(
            1, len(loss.params), device=device, requires_grad=True
        )  # one cell's row, as in stacked.py
        opt = torch.optim.Adam(
            [{"params": model.parameters(), "lr": config.lr}, {"params": [learned], "lr": config.sigma_lr}]
        )
        loader = DataLoader(
            train_set, batch_size=config.batch_size, sampler=EpochPermutation(len(train_set), cell.seed)
        )
        for _ in range(int(config.epochs)):
            batches = iter(loader)
            while True:
                t = time.perf_counter()
                xb = next(batches, None)
                seconds["waited_s"] += time.perf_counter() - t
                if xb is None:
                    break
                xb = xb.to(device)
                raw = {p.name: learned[0, k] for k, p in enumerate(loss.params)}
                nll = loss.per_sample(xb.flatten(1), model(xb).flatten(1), raw, config.sigma_floor)
                opt.zero_grad()
                nll.mean().backward()
                opt.step()
        middle = time.perf_counter()
        with torch.no_grad():  # the audit's product: every held-out image's error under this model
            errors = [
                (model(xb.to(device)) - xb.to(device)).pow(2).flatten(1).mean(1).cpu()
                for xb in DataLoader(test_set, batch_size=config.batch_size)
            ]
        assert len(torch.cat(errors)) == len(test_set)
        seconds["train_s"] += middle - start
        seconds["eval_s"] += time.perf_counter() - middle
    return seconds


def plain_main(args) -> None:
    """--_plain: one plain-recipe process; prints its timings as one JSON line."""
    start = time.perf_counter()
    spec = spec_for(args)
    data = make_groups(load_images(spec.dataset, spec.data_root), spec)  # the assignment only: "setup", not timed
    config = TrainConfig.from_spec(spec)
    cells = [Cell(loss, seed) for loss in spec.losses for seed in range(spec.seeds)]
    setup = time.perf_counter() - start
    t = time.perf_counter()
    train_set, test_set = plain_datasets(args.data_root, data)
    seconds = {"load_s": time.perf_counter() - t}
    before = CELL_STEPS["n"]
    seconds.update(
        plain_recipe(train_set, test_set, tuple(data.train_x.shape[1:]), cells, config, torch.device(args.device))
    )
    n = min(64, len(train_set))  # both sides made the same images
    data_diff = (torch.stack([train_set[i] for i in range(n)]) - data.train_x[:n]).abs().max().item()
    steps_per_epoch = math.ceil(len(data.train_x) / config.batch_size)
    print(
        json.dumps(
            {
                "setup_s": setup,
                **seconds,
                "cell_steps": CELL_STEPS["n"] - before,
                "data_diff": data_diff,
                "fairrecon_cell_steps": len(cells) * int(config.epochs) * steps_per_epoch,
                "train_images": len(data.train_x),
                "test_images": len(data.test_x),
            }
        )
    )


# ---------------------------------------------------------------- the competent plain loop


def competent_recipe(
    x: torch.Tensor, test_x: torch.Tensor, cells: list[Cell], config: TrainConfig, device: torch.device
) -> tuple[dict[str, float], torch.Tensor, list[dict[str, torch.Tensor]]]:
    """What a competent user writes: the grouped images as tensors in memory, batches taken by index, one model at
    a time with its own Adam (torch's defaults), then every held-out image's error. The same images, seeded
    initial weights (stacked.init_cells), batch order (one torch.randperm per epoch from the seed's generator,
    train.ChunkTraining) and losses (stacked.StackedCells.cell_nll) as fairrecon's training; fixed epochs, no
    VAEs. -> (seconds per part, each cell's held-out MSE per pixel (C, N_test), each cell's trained weights)."""
    if config.vae or config.auto:
        raise ValueError("the competent plain loop trains autoencoders for a fixed number of epochs")
    x, test_x = x.to(device), test_x.to(device)
    shape = tuple(x.shape[1:])
    stats = (x.mean(0), x.std(0, correction=0)) if config.input_norm == "standardize" else None
    seconds = {"train_s": 0.0, "eval_s": 0.0}
    errors, weights = [], []
    for cell in cells:
        start = time.perf_counter()
        loss = get_loss(cell.loss)
        torch.manual_seed(cell.seed)
        model = config.build(shape, scale_head=loss.pixel_scale)
        if stats is not None:
            model.set_input_stats(*stats)
        model = model.to(device)
        learned = torch.zeros(len(loss.params), device=device, requires_grad=True)
        opt = torch.optim.Adam(
            [{"params": list(model.parameters()), "lr": config.lr}, {"params": [learned], "lr": config.sigma_lr}]
        )
        order = torch.Generator().manual_seed(cell.seed)
        for _ in range(int(config.epochs)):
            for idx in torch.randperm(len(x), generator=order).to(device).split(config.batch_size):
                xb = x[idx]
                x_hat, raw_scale = split_output(model(xb), shape[0])
                raw = {p.name: learned[k, None, None] for k, p in enumerate(loss.params)}
                scale = raw_scale.flatten(1) if raw_scale is not None else None
                nll = loss.per_sample(xb.flatten(1), x_hat.flatten(1), raw, config.sigma_floor, raw_scale=scale)
                opt.zero_grad()
                nll.mean().backward()
                opt.step()
        middle = time.perf_counter()
        with torch.no_grad():
            errors.append(
                torch.cat(
                    [
                        (split_output(model(xb), shape[0])[0] - xb).pow(2).flatten(1).mean(1).cpu()
                        for xb in test_x.split(1024)
                    ]
                )
            )
        weights.append({k: v.detach().cpu() for k, v in model.state_dict().items()})
        seconds["train_s"] += middle - start
        seconds["eval_s"] += time.perf_counter() - middle
    return seconds, torch.stack(errors), weights


def competent_main(args) -> None:
    """--_competent: one competent-plain-loop process at torch's default threads; prints its timings as one JSON
    line. Building the grouped images (fairrecon's vectorised groups.make_groups, as any reasonable vectorised
    code would) counts as its load_s."""
    spec = spec_for(args)
    t = time.perf_counter()
    data = make_groups(load_images(spec.dataset, spec.data_root), spec)
    seconds = {"load_s": time.perf_counter() - t}
    cells = [Cell(loss, seed) for loss in spec.losses for seed in range(spec.seeds)]
    part, errors, _ = competent_recipe(
        data.train_x, data.test_x, cells, TrainConfig.from_spec(spec), torch.device(args.device)
    )
    seconds.update(part)
    print(
        json.dumps(
            {
                **seconds,
                "threads": torch.get_num_threads(),
                "errors": list(errors.shape),
                "train_images": len(data.train_x),
                "shape": list(data.train_x.shape[1:]),
            }
        )
    )


def check_competent(args) -> None:
    """--check-competent: in one process, the competent plain loop and fairrecon's train_cells (Adam's default,
    not fused, kernel on both sides) on the same small data: every cell's initial weights, trained weights and
    held-out errors compared. Equal initial weights and trained weights equal to rounding mean the same images,
    batch order and losses (another order or loss would move the weights by far more)."""
    spec = spec_for(args)
    data = make_groups(load_images(spec.dataset, spec.data_root), spec)
    config = TrainConfig.from_spec(spec)
    cells = [Cell(loss, seed) for loss in spec.losses for seed in range(spec.seeds)]
    device = torch.device(args.device)
    zero = dataclasses.replace(config, epochs=0)  # the initial weights
    _, _, init_plain = competent_recipe(data.train_x[:1], data.test_x[:1], cells, zero, device)
    init_fair = [init_cells([cell], tuple(data.train_x.shape[1:]), config, device).module(0) for cell in cells]
    _, errors, trained = competent_recipe(data.train_x, data.test_x, cells, config, device)
    result = train_cells(data.train_x, data.train_g, cells, config, device, fused=False)
    fair_errors = (result.stacked.reconstruct(data.test_x.to(device)) - data.test_x.to(device)).pow(2)
    fair_errors = fair_errors.flatten(2).mean(2).cpu()
    print(f"competent plain loop vs fairrecon: {len(cells)} cells, {len(data.train_x)} images, {spec.epochs} epoch(s)")
    for c, cell in enumerate(cells):
        module = result.stacked.module(c)
        init_equal = all(torch.equal(init_plain[c][k], init_fair[c].state_dict()[k]) for k in init_plain[c])
        moved = max((trained[c][k] - init_plain[c][k]).abs().max().item() for k in trained[c])
        fair = module.state_dict()  # a cell without a scale head has a zero one here (concat_stacked)
        diff = max((v - fair[k]).abs().max().item() for k, v in trained[c].items())
        err = ((errors[c] - fair_errors[c]).abs() / fair_errors[c]).max().item()
        print(
            f"  {cell.loss} seed {cell.seed}: initial weights equal {init_equal}; trained weights max |diff| "
            f"{diff:.1e} (training moved them up to {moved:.1e}); held-out errors max relative diff {err:.1e} "
            f"over {len(fair_errors[c])} images"
        )


# ---------------------------------------------------------------- the machine's limit (issue 22 item 4)

LAYERS = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d)


def layer_flops(model: torch.nn.Module, shape: tuple[int, ...]) -> list[tuple[str, int]]:
    """Each matmul-like layer's forward FLOPs for ONE image, from its shapes: 2 * m * n * k, one multiply and one
    add per term. Linear: 2 * in * out. Conv2d: 2 * (C_out * H_out * W_out) * (C_in / groups * kh * kw).
    ConvTranspose2d: each input pixel scatters C_out * kh * kw products: 2 * (C_in * H_in * W_in) * (C_out / groups
    * kh * kw). The spatial sizes come from one forward pass of a single image. -> [(layer name, FLOPs)]"""
    found: list[tuple[str, int]] = []

    def hook(name: str):
        def record(layer, inputs, output) -> None:
            if isinstance(layer, torch.nn.Linear):
                flops = 2 * layer.in_features * layer.out_features
            elif isinstance(layer, torch.nn.Conv2d):
                k = layer.in_channels // layer.groups * math.prod(layer.kernel_size)
                flops = 2 * output[0].numel() * k
            else:
                k = layer.out_channels // layer.groups * math.prod(layer.kernel_size)
                flops = 2 * inputs[0][0].numel() * k
            found.append((name, flops))

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, LAYERS)]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *shape))
    finally:
        for h in handles:
            h.remove()
    return found


def step_flops(model: torch.nn.Module, shape: tuple[int, ...]) -> int:
    """One image's training FLOPs in the matmul-like layers: forward (1x), the weight gradient (1x) and the input
    gradient (1x) of every layer but the first, whose input (the images) needs no gradient. Left out: biases,
    activations, the loss, Adam (elementwise work, a few FLOPs per parameter or pixel)."""
    layers = layer_flops(model, shape)
    return 3 * sum(f for _, f in layers) - layers[0][1]


def training_flops(config: TrainConfig, shape: tuple[int, ...], losses: list[str], seeds: int, images: int) -> int:
    """The grid's training FLOPs (step_flops per image-step; every epoch passes every training image once)."""
    per_image = [step_flops(config.build(shape, scale_head=get_loss(loss).pixel_scale), shape) for loss in losses]
    return sum(per_image) * seeds * int(config.epochs) * images


def median_seconds(fn, repeats: int) -> float:
    """fn's median wall time over repeats calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def machine_limit(config: TrainConfig, shape: tuple[int, ...], *, n: int, batch: int, repeats: int) -> dict:
    """At this process's thread count: sgemm GFLOP/s (an n x n x n float32 matmul, median of repeats) and one cell's
    forward + backward (an l2 cell, no Adam) at a large batch, counted with step_flops."""
    a, b = torch.rand(n, n), torch.rand(n, n)
    sgemm = 2 * n**3 / median_seconds(lambda: a @ b, repeats)
    torch.manual_seed(0)
    model = config.build(shape)
    x = torch.rand(batch, *shape)

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        (model(x) - x).pow(2).mean().backward()

    layers = step_flops(model, shape) * batch / median_seconds(forward_backward, repeats)
    return {
        "threads": torch.get_num_threads(),
        "sgemm_n": n,
        "sgemm_gflops": sgemm / 1e9,
        "layers_batch": batch,
        "layers_gflops": layers / 1e9,
    }


# ---------------------------------------------------------------- fairrecon, as a user runs it


def fairrecon_cmd(args, out: str) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "fairrecon",
        "audit",
        "--dataset",
        "fashion-mnist",
        "--data-root",
        args.data_root,
        "--limit",
        str(args.limit),
        "--model",
        args.model,
        "--seeds",
        str(args.seeds),
        "--epochs",
        str(args.epochs),
        "--losses",
        ",".join(args.losses),
        "--batch-size",
        str(args.batch_size),
        "--device",
        args.device,
        "--out",
        out,
        "--force",
        "--quiet",
        "--threads",
        str(args.threads),
    ]
    return cmd + (["--test-limit", str(args.test_limit)] if args.test_limit else [])


PARTS = ("load_s", "groups_s", "train_s", "curves_s", "measure_s", "stats_s", "report_s", "other_s")


def breakdown(summary: dict, wall: float) -> dict[str, float]:
    """Where the fairrecon process's time went: info.timings' phases (training without its curve points), and as
    other_s the rest of the process (start-up, imports, each cell's tables written as it finishes): the parts add up
    to the process's wall time."""
    t = dict(summary["info"]["timings"])
    t["train_s"] -= t["curves_s"]  # curve points run inside the training loop (train_cells' on_eval)
    t["other_s"] = wall - sum(t.get(k, 0.0) for k in PARTS if k != "other_s")
    return {k: t.get(k, float("nan")) for k in PARTS}


def compare(args) -> None:
    cells = len(args.losses) * args.seeds
    print(
        f"grid: {len(args.losses)} losses x {args.seeds} seeds = {cells} cells, model {args.model}, "
        f"FashionMNIST limit {args.limit} (test limit {args.test_limit or 'none'}), {args.epochs} epoch(s), "
        f"batch {args.batch_size}, {args.threads} thread(s) on each side"
    )
    plain_cmd = [
        sys.executable,
        __file__,
        "--_plain",
        "--limit",
        str(args.limit),
        "--model",
        args.model,
        "--seeds",
        str(args.seeds),
        "--epochs",
        str(args.epochs),
        "--losses",
        ",".join(args.losses),
        "--batch-size",
        str(args.batch_size),
        "--device",
        args.device,
        "--data-root",
        args.data_root,
        "--threads",
        str(args.threads),
    ] + (["--test-limit", str(args.test_limit)] if args.test_limit else [])
    competent_cmd = [a for a in plain_cmd if a != "--_plain"] + ["--_competent"]
    config = TrainConfig.from_spec(spec_for(args))
    shape = (1, 28, 28)  # Fashion-MNIST
    limit = machine_limit(config, shape, n=args.sgemm_n, batch=args.layers_batch, repeats=args.limit_repeats)
    print(
        f"machine limit at {limit['threads']} thread(s), median of {args.limit_repeats}: sgemm "
        f"{limit['sgemm_gflops']:.1f} GFLOP/s ({args.sgemm_n}^3 float32 matmul); one {args.model} cell's layers "
        f"{limit['layers_gflops']:.1f} GFLOP/s (forward + backward at batch {args.layers_batch})"
    )
    ratios, transform_ratios, parts, competent_train = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            wall_c, mem_c, out = run_process(competent_cmd)
            competent = json.loads(out.strip().splitlines()[-1])
            competent_train.append(competent["train_s"])
            if args.transform_row:
                wall_p, mem_p, out = run_process(plain_cmd)
                plain = json.loads(out.strip().splitlines()[-1])
                t_plain = wall_p - plain["setup_s"]
            out_dir = Path(tmp) / f"out{r}"  # a fresh folder each run: the same spec in one folder would resume
            wall_f, mem_f, _ = run_process(fairrecon_cmd(args, str(out_dir)))
            summary = json.loads((out_dir / "summary.json").read_text())
            if summary["info"]["resumed_cells"]:
                raise RuntimeError(f"run {r + 1} resumed {summary['info']['resumed_cells']} cell(s): not a timing")
            part = breakdown(summary, wall_f)
            parts.append(part)
            ratios.append(wall_c / wall_f)
            print(
                f"run {r + 1}: competent plain loop {wall_c:.2f} s (images {competent['load_s']:.2f} s, train "
                f"{competent['train_s']:.2f} s, held-out errors {competent['eval_s']:.2f} s; "
                f"{competent['threads']} thread(s); peak {mem_c:.0f} MB) | fairrecon {wall_f:.2f} s (peak {mem_f:.0f} "
                f"MB; {summary['info']['threads']} thread(s)) | ratio {ratios[-1]:.2f}x"
            )
            if args.transform_row:
                transform_ratios.append(t_plain / wall_f)
                print(
                    f"  per-image-transform recipe: {t_plain:.2f} s (train {plain['train_s']:.2f} s of which waiting "
                    f"for data {plain['waited_s']:.2f} s, held-out errors {plain['eval_s']:.2f} s; peak {mem_p:.0f} "
                    f"MB) | ratio {transform_ratios[-1]:.2f}x"
                )
            print("  fairrecon breakdown: " + ", ".join(f"{k[:-2]} {v:.2f} s" for k, v in part.items()))
    median = {k: statistics.median(p[k] for p in parts) for k in PARTS}
    if args.transform_row:
        print(f"same data: max |plain image - fairrecon image| = {plain['data_diff']:.1e} (first 64 images)")
        print(f"cell-steps: plain {plain['cell_steps']}, fairrecon {plain['fairrecon_cell_steps']}")
    print("fairrecon median breakdown: " + ", ".join(f"{k[:-2]} {v:.2f} s" for k, v in median.items()))
    trained = median["train_s"]
    print(
        f"measurement (measure + curves) / training: {(median['measure_s'] + median['curves_s']) / trained:.2f}; "
        f"statistics + reports: {median['stats_s'] + median['report_s']:.2f} s"
    )
    for label, rs in (("competent plain loop", ratios), ("per-image-transform recipe", transform_ratios)):
        if rs:
            spread = f" (min {min(rs):.2f}x, max {max(rs):.2f}x, {len(rs)} runs)" if len(rs) > 1 else ""
            print(f"ratio {label} / fairrecon: {statistics.median(rs):.2f}x median{spread}")
    shape = tuple(competent["shape"])
    flops = training_flops(config, shape, args.losses, args.seeds, competent["train_images"])
    shares = {k[:-2]: v / sum(median.values()) for k, v in median.items()}  # the median parts, as parts of their sum
    achieved = {"fairrecon": flops / trained / 1e9, "competent": flops / statistics.median(competent_train) / 1e9}
    print(
        f"training FLOPs: {flops / 1e12:.4f} TFLOP (matmul-like layers: forward, weight and input gradients, no input "
        f"gradient for the first layer; not counted: biases, activations, losses, Adam)"
    )
    print(
        "training achieved (median): "
        + ", ".join(
            f"{side} {g:.1f} GFLOP/s = {g / limit['sgemm_gflops']:.0%} of sgemm" for side, g in achieved.items()
        )
    )
    print(
        "fairrecon shares of the whole process (median parts): "
        + ", ".join(f"{k} {v:.0%}" for k, v in shares.items())
        + f"; not training {1 - shares['train']:.0%}"
    )
    if args.json:
        record = {
            "grid": {k: getattr(args, k) for k in ("model", "limit", "test_limit", "epochs", "seeds", "losses")},
            "threads": args.threads,
            "limit": limit,
            "training_flops": flops,
            "achieved_gflops": achieved,
            "fairrecon_median_s": median,
            "fairrecon_shares": shares,
            "ratio_competent": ratios,
            "ratio_transform": transform_ratios,
        }
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


# ---------------------------------------------------------------- scaling

SIZES = {"28": (1, 28), "32x3": (3, 32), "64": (1, 64)}  # image size: channels, side


def scaling_point(args) -> None:
    """One point of the scaling table (train_cells alone), in its own process so peak memory is its own.

    Sizes other than 28x28: Fashion-MNIST images resized (bilinear) and, for 3 channels, repeated:
    real images at the size whose cost is measured.
    """
    spec = spec_for(args)
    config = TrainConfig.from_spec(spec)
    cells = [Cell(LOSSES[i % len(LOSSES)], i // len(LOSSES)) for i in range(args.point_cells)]
    data = make_groups(load_images(spec.dataset, spec.data_root), spec)
    x = data.train_x
    channels, side = SIZES[args.size]
    if side != 28:
        x = torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", align_corners=False).clamp(0, 1)
    x = x.repeat(1, channels, 1, 1).contiguous()
    rss = peak_mb(now=True)
    before = CELL_STEPS["n"]
    t = time.perf_counter()
    train_cells(x, data.train_g, cells, config, torch.device(args.device), max_cells=len(cells))
    seconds = time.perf_counter() - t
    est = len(cells) * cell_bytes(config, tuple(x.shape[1:])) / 2**20
    print(
        json.dumps(
            {
                "cells": len(cells),
                "images": len(x),
                "size": args.size,
                "seconds": seconds,
                "cell_steps": CELL_STEPS["n"] - before,
                "peak_mb": peak_mb(),
                "before_mb": rss,
                "estimate_mb": est,
            }
        )
    )


def scaling(args) -> None:
    if args.small:
        points = [(1, args.limit, "28"), (4, args.limit, "28")]
    else:
        points = (
            [(c, 5000, "28") for c in (1, 2, 4, 12, 24, 48)]
            + [(12, n, "28") for n in (1000, 20000, 60000)]
            + [(12, 5000, size) for size in ("32x3", "64")]
        )
    print(
        f"\nscaling (fairrecon's train_cells alone, model {args.model}, {args.epochs} epoch(s), batch {args.batch_size}, "
        f"{args.threads} thread(s), each point in a fresh process):"
    )
    print(
        f"{'cells':>5} {'images':>7} {'size':>5} {'seconds':>8} {'per cell-step':>13} {'peak MB':>8} {'+train MB':>9} {'estimate MB':>11}"
    )
    for c, n, size in points:
        cmd = [
            sys.executable,
            __file__,
            "--_point",
            str(c),
            "--limit",
            str(n),
            "--size",
            size,
            "--epochs",
            str(args.epochs),
            "--model",
            args.model,
            "--device",
            args.device,
            "--data-root",
            args.data_root,
            "--batch-size",
            str(args.batch_size),
            "--threads",
            str(args.threads),
            "--test-limit",
            "2",
        ]
        try:
            _, _, out = run_process(cmd)
        except RuntimeError as e:
            print(f"{c:>5} {n:>7} {size:>5} failed: {str(e).splitlines()[-1:]}")
            continue
        p = json.loads(out.strip().splitlines()[-1])
        print(
            f"{p['cells']:>5} {p['images']:>7} {size:>5} {p['seconds']:>8.2f} {p['seconds'] / p['cell_steps'] * 1e3:>11.2f}ms "
            f"{p['peak_mb']:>8.0f} {p['peak_mb'] - p['before_mb']:>9.0f} {p['estimate_mb']:>11.0f}"
        )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=5000, help="training images (default 5000; 60000 = all)")
    ap.add_argument("--test-limit", type=int, default=None, help="held-out images (default: all 10000)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--losses", type=lambda s: s.split(","), default=list(LOSSES))
    ap.add_argument("--model", choices=("mlp", "conv"), default="mlp")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--data-root", default=str(REPO.parent / "shared" / "datasets"))
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads on both sides (default: what `fairrecon audit` would choose now)",
    )
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument(
        "--transform-row",
        action="store_true",
        help="also the per-image-transform recipe (DataLoader, a brightness bisection per image) as a second row",
    )
    ap.add_argument("--scaling", action="store_true", help="also the scaling table")
    ap.add_argument("--scaling-only", action="store_true", help="only the scaling table")
    ap.add_argument(
        "--small", action="store_true", help="CI preset: 256 images, 64 held out, 1 epoch, 2 losses x 1 seed"
    )
    ap.add_argument(
        "--check-competent",
        action="store_true",
        help="check that the competent plain loop trains what fairrecon trains (weights, errors), then stop",
    )
    ap.add_argument("--json", default=None, help="also write the comparison's numbers to this JSON file")
    ap.add_argument("--sgemm-n", type=int, default=2048, help="the machine limit's square matmul size")
    ap.add_argument("--layers-batch", type=int, default=4096, help="batch of the one-cell layer throughput")
    ap.add_argument("--limit-repeats", type=int, default=5, help="timed calls per machine-limit figure (median)")
    ap.add_argument("--_plain", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_competent", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_point", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--size", choices=tuple(SIZES), default="28", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    register_optimizer_step_post_hook(_count_cell_steps)  # here, not on import (tests import)
    if args.small:
        args.limit, args.test_limit, args.epochs, args.seeds, args.losses = 256, 64, 1, 1, ["l2", "learned-sigma"]
        args.sgemm_n, args.layers_batch, args.limit_repeats = 512, 256, 3
    if args._competent:
        return competent_main(args)  # at torch's default threads
    args.threads = args.threads or default_threads()[0]
    torch.set_num_threads(args.threads)
    if args.check_competent:
        return check_competent(args)
    if args._plain:
        return plain_main(args)
    if args._point is not None:
        args.point_cells = args._point
        return scaling_point(args)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"torch {torch.__version__}, device {device} ({name}), {os.cpu_count()} CPUs, load average {load}")
    if not args.scaling_only:
        compare(args)
    if args.scaling or args.scaling_only:
        scaling(args)


if __name__ == "__main__":
    main()
