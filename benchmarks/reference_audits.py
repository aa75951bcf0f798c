"""Small real audits to compare two versions of the code exactly (with benchmarks/compare_results.py).

    python benchmarks/reference_audits.py /work/ref-split              # every audit, at threads 2 and 1
    python benchmarks/reference_audits.py OUT --only mlp conv --threads 1

Each audit writes a results folder OUT/NAME-tTHREADS through the python API (`run_audit(threads=...)`):
Fashion-MNIST MLP (1,200 training and 600 held-out images, 3 epochs, 2 seeds, the default losses plus
mix:0.5 and gaussian-pixel), the same as conv (2 epochs) and as conv-VAE (2 epochs, 200 generated images
per cell), and an epochs="auto" MLP on digits (max_epochs 20). Run it on the old code into one folder and
on the new into another, then `python benchmarks/compare_results.py OLD NEW`. Results are exact only on
the same machine (oneDNN picks kernels by CPU), so nothing here is a committed test.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fairrecon import run_audit  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"
LOSSES = ("l1", "l2", "log-mse", "learned-sigma", "mix:0.5", "gaussian-pixel")
FASHION = dict(dataset="fashion-mnist", limit=1200, test_limit=600, seeds=2, losses=LOSSES)
AUDITS = {
    "mlp": dict(FASHION, model="mlp", epochs=3),
    "conv": dict(FASHION, model="conv", epochs=2),
    "conv-vae": dict(FASHION, model="conv-vae", epochs=2, generate=200),
    "auto": dict(dataset="digits", model="mlp", epochs="auto", max_epochs=20, seeds=2, losses=LOSSES),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for the results folders (NAME-tTHREADS each)")
    parser.add_argument("--only", nargs="+", choices=list(AUDITS), default=list(AUDITS))
    parser.add_argument("--threads", nargs="+", type=int, default=[2, 1])
    parser.add_argument("--data-root", default=str(DATA))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.only:
        for threads in args.threads:
            folder = args.out / f"{name}-t{threads}"
            start = time.perf_counter()
            files = {} if AUDITS[name]["dataset"] == "digits" else {"data_root": args.data_root}  # digits: bundled
            run_audit(out=str(folder), threads=threads, device="cpu", **files, **AUDITS[name])
            print(f"{folder}: {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
