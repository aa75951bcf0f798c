"""The benchmark script runs its CI preset end to end; it reports, so nothing here asserts timings."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from conftest import REPO

BENCH = REPO / "benchmarks" / "bench.py"


def run(*args: str, data_root) -> str:
    cmd = [sys.executable, str(BENCH), *args, "--data-root", str(data_root), "--threads", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_small_preset_compares_equal_work(shared_datasets):
    out = run("--small", data_root=shared_datasets)
    assert re.search(r"^ratio plain/fairrecon: \d+\.\d+x median", out, re.M), out
    plain, fair = map(int, re.search(r"^cell-steps: plain (\d+), fairrecon (\d+)$", out, re.M).groups())
    assert plain == fair == 2 * 1 * 2  # 2 losses x 1 seed, 256 images / batch 128 = 2 steps, 1 epoch
    # both sides made the same images and trained the same models (float32 rounding apart)
    data_diff = float(re.search(r"max \|plain image - fairrecon image\| = (\S+)", out).group(1))
    per_loss = re.search(r"max \|plain weight - fairrecon weight\| per loss: (.+)$", out, re.M).group(1)
    weight_diff = max(float(part.split()[1]) for part in per_loss.split(", "))  # "l1 1.2e-08, l2 ..."
    assert data_diff < 1e-5 and weight_diff < 1e-5  # 2 steps: too few for L1's sign(r) to amplify rounding


def test_scaling_point_reports_steps_and_memory(shared_datasets):
    out = run("--_point", "3", "--limit", "128", "--epochs", "1", data_root=shared_datasets)
    point = json.loads(out.strip().splitlines()[-1])
    assert point["cells"] == 3 and point["images"] == 128
    assert point["cell_steps"] == 3 * 1  # 128 images / batch 128 = 1 step per cell
    assert point["seconds"] > 0 and point["estimate_mb"] > 0
