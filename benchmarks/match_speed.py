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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fairrecon.data import load_images  # noqa: E402
from fairrecon.groups import MATCHED_QUANTILE, match_to  # noqa: E402


def bisection_match_to(x: torch.Tensor, t: torch.Tensor, quantile: float = MATCHED_QUANTILE) -> torch.Tensor:
    """The previous match_to (auto polarity): b by 50 bisection steps on every image."""
    flat, t = x.flatten(1).double(), t.double()
    mu, lo, hi = flat.mean(1), flat.min(1).values, flat.max(1).values

    def room(mu, lo, hi):
        below = torch.where(mu - lo > 1e-12, t / (mu - lo).clamp_min(1e-12), torch.full_like(mu, torch.inf))
        above = torch.where(hi - mu > 1e-12, (1 - t) / (hi - mu).clamp_min(1e-12), torch.full_like(mu, torch.inf))
        return torch.minimum(below, above)

    keep, flip = room(mu, lo, hi), room(1 - mu, 1 - hi, 1 - lo)
    z = torch.where((flip > keep)[:, None], 1 - flat, flat)
    room_best = torch.minimum(torch.maximum(keep, flip), torch.tensor(1e6, dtype=flat.dtype))
    c = min(torch.quantile(room_best[t == target], quantile).item() for target in torch.unique(t))
    centred = c * (z - z.mean(1, keepdim=True))
    lo_b, hi_b = -centred.max(1).values, 1 - centred.min(1).values
    for _ in range(50):
        mid = (lo_b + hi_b) / 2
        too_dark = (mid[:, None] + centred).clamp(0, 1).mean(1) < t
        lo_b, hi_b = torch.where(too_dark, mid, lo_b), torch.where(too_dark, hi_b, mid)
    return ((lo_b + hi_b)[:, None] / 2 + centred).clamp(0, 1).to(x.dtype).view_as(x)


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
    print(f"match_to, {len(x)} images, 1 thread: median {statistics.median(times):.2f} s "
          f"(min {min(times):.2f}, max {max(times):.2f}, {args.repeats} runs); "
          f"{int((matched.clipped > 0).sum())} images solved on their linear piece")
    if args.bisection:
        start = time.perf_counter()
        old = bisection_match_to(x, t)
        print(f"previous bisection: {time.perf_counter() - start:.1f} s; "
              f"largest |difference| of the outputs: {(old - matched.y).abs().max().item():.1e}")


if __name__ == "__main__":
    main()
