"""The benchmark script runs its CI preset end to end; it reports, so nothing here asserts timings."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow  # the benchmarks on real Fashion-MNIST

BENCH = REPO / "benchmarks" / "bench.py"


def run(*args: str, data_root) -> str:
    cmd = [sys.executable, str(BENCH), *args, "--data-root", str(data_root), "--threads", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_small_preset_compares_equal_work_and_breaks_down_the_audit(shared_datasets):
    out = run("--small", "--repeats", "2", data_root=shared_datasets)
    assert re.search(r"^ratio plain/fairrecon: \d+\.\d+x median", out, re.M), out
    # every repeat trains its own audit (the same spec in one results folder would resume its cells)
    trained = [float(t) for t in re.findall(r"^  fairrecon breakdown: .*\btrain (\d+\.\d+) s", out, re.M)]
    assert len(trained) == 2 and all(t > 0 for t in trained), out
    plain, fair = map(int, re.search(r"^cell-steps: plain (\d+), fairrecon (\d+)$", out, re.M).groups())
    assert plain == fair == 2 * 1 * 2  # 2 losses x 1 seed, 256 images / batch 128 = 2 steps, 1 epoch
    # both sides made the same images: the plain per-image transform and fairrecon's batched one
    data_diff = float(re.search(r"max \|plain image - fairrecon image\| = (\S+)", out).group(1))
    assert data_diff < 1e-5  # float32 rounding of the same map; a wrong target or contrast factor is >= 1e-2
    assert re.search(r"^images: 256 train, 64 held out$", out, re.M)
    # the breakdown names every stage of the whole process, each a non-negative time
    parts = re.search(r"^fairrecon median breakdown: (.+)$", out, re.M).group(1)
    seconds = {name: float(value) for name, value in re.findall(r"(\w+) (-?\d+\.\d+) s", parts)}
    assert list(seconds) == ["load", "groups", "train", "curves", "measure", "stats", "report", "other"]
    assert all(v >= 0 for v in seconds.values()) and seconds["train"] > 0


def test_scaling_point_reports_steps_and_memory(shared_datasets):
    out = run("--_point", "3", "--limit", "128", "--test-limit", "2", "--epochs", "1", data_root=shared_datasets)
    point = json.loads(out.strip().splitlines()[-1])
    assert point["cells"] == 3 and point["images"] == 128
    assert point["cell_steps"] == 3 * 1  # 128 images / batch 128 = 1 step per cell
    assert point["seconds"] > 0 and point["estimate_mb"] > 0


def test_scaling_point_resizes_images(shared_datasets):
    out = run(
        "--_point",
        "1",
        "--limit",
        "128",
        "--test-limit",
        "2",
        "--size",
        "32x3",
        "--model",
        "conv",
        data_root=shared_datasets,
    )
    point = json.loads(out.strip().splitlines()[-1])
    assert point["size"] == "32x3" and point["cell_steps"] == 1


def test_stacking_benchmark_runs_both_ways_to_the_same_outputs():
    """benchmarks/stacking.py times vmap against the loop over cells (stacked.StackedCells.looped); the two ways
    must compute the same reconstructions (float32 rounding apart), or its timings compare different work."""
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "stacking.py"),
        "--models",
        "conv",
        "mlp",
        "--cells",
        "2",
        "--repeats",
        "1",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line.split()[:1] in (["conv"], ["mlp"])]
    assert [r[:2] for r in rows] == [["conv", "2"], ["mlp", "2"]]
    assert all(float(r[-1]) < 1e-5 for r in rows), out.stdout  # max |vmap output - loop output|
