"""Time contrast-matched groups (`groups.match_to`) on all 70,000 Fashion-MNIST images, one thread.

    python benchmarks/match_speed.py --data-root ../shared/datasets [--repeats 7] [--bisection]

--bisection also times the previous implementation (50 bisection steps over every pixel of every
image, float64) in the same process and prints the largest difference of the two outputs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from test_groups import bisection_match_to  # noqa: E402  (the reference the tests hold the exact solver to)

from fairrecon.data import load_images  # noqa: E402
from fairrecon.groups import match_to  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default="datasets")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--bisection", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    images = load_images("fashion-mnist", args.data_root)
    x = torch.cat([images.train, images.test])
    t = torch.where(torch.arange(len(x)) % 2 == 0, 0.3, 0.9)  # half the images to 0.3, half to 0.9
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        matched = match_to(x, t)
        times.append(time.perf_counter() - start)
    print(
        f"match_to, {len(x)} images, 1 thread: median {statistics.median(times):.2f} s "
        f"(min {min(times):.2f}, max {max(times):.2f}, {args.repeats} runs); "
        f"{int((matched.clipped > 0).sum())} images solved on their linear piece"
    )
    if args.bisection:
        start = time.perf_counter()
        old, _ = bisection_match_to(x, t)
        print(
            f"previous bisection: {time.perf_counter() - start:.1f} s; "
            f"largest |difference| of the outputs: {(old - matched.y).abs().max().item():.1e}"
        )


if __name__ == "__main__":
    main()
