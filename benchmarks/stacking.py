"""How to run stacked cells on the CPU: under vmap, or each cell on its own (stacked.StackedCells.looped).

    python benchmarks/stacking.py                       # conv and mlp, 1, 4 and 12 cells, 1 thread
    python benchmarks/stacking.py --models conv --cells 12 48 --threads 2

For each model and cell count, on the same stacked weights: milliseconds per training step (forward,
backward of every cell's loss on its own batch of 128 Fashion-MNIST-sized images; the loop shares the
cells out between --threads worker threads, each at one intra-op thread, as training does) and per
1,024 held-out images through every cell, for both ways, and the largest difference between their
outputs. It reports; it never asserts timings.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fairrecon.grid import Cell, TrainConfig  # noqa: E402
from fairrecon.spec import AuditSpec  # noqa: E402
from fairrecon.stacked import StackedCells, init_cells  # noqa: E402

LOSSES = ("l1", "l2", "log-mse", "learned-sigma")


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median milliseconds of `repeats` calls after one warm-up, and the last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3, out


def measure(model: str, n_cells: int, looped: bool, repeats: int) -> tuple[float, float, torch.Tensor]:
    """(ms per training step, ms per 1,024 images through every cell, the held-out outputs) one way."""
    config = TrainConfig.from_spec(AuditSpec(model=model))
    cells = [Cell(LOSSES[i % len(LOSSES)], i // len(LOSSES)) for i in range(n_cells)]
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(n_cells, config.batch_size, 1, 28, 28, generator=generator)
    held_out = torch.rand(1024, 1, 28, 28, generator=generator)
    with mock.patch.object(StackedCells, "looped", property(lambda self: looped)):
        stacked = init_cells(cells, (1, 28, 28), config, torch.device("cpu"))

        def step():
            objective = stacked.objective(x)
            stacked.backward(objective.value.mean(1).sum(), objective.graph)

        step_ms, _ = timed(step, repeats)
        infer_ms, out = timed(lambda: stacked.reconstruct(held_out), repeats)
    return step_ms, infer_ms, out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["conv", "mlp"])
    ap.add_argument("--cells", nargs="+", type=int, default=[1, 4, 12])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats} after a warm-up")
    print(
        f"{'model':>5} {'cells':>5} {'step vmap':>10} {'step loop':>10} {'loop/vmap':>9} "
        f"{'1024 vmap':>10} {'1024 loop':>10} {'loop/vmap':>9} {'max |diff|':>10}"
    )
    for model in args.models:
        for n in args.cells:
            sv, iv, ov = measure(model, n, False, args.repeats)
            sl, il, ol = measure(model, n, True, args.repeats)
            print(
                f"{model:>5} {n:>5} {sv:>8.1f}ms {sl:>8.1f}ms {sl / sv:>9.2f} {iv:>8.1f}ms {il:>8.1f}ms {il / iv:>9.2f} "
                f"{(ov - ol).abs().max().item():>10.1e}"
            )


if __name__ == "__main__":
    main()
