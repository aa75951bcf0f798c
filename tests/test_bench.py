"""The benchmark script runs its CI preset end to end; it reports, so nothing here asserts timings."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from torch.utils.flop_counter import FlopCounterMode

from fairrecon.grid import TrainConfig
from fairrecon.losses import get_loss
from fairrecon.models import split_output
from fairrecon.spec import AuditSpec

BENCH = REPO / "benchmarks" / "bench.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(*args: str, data_root) -> str:
    cmd = [sys.executable, str(BENCH), *args, "--data-root", str(data_root), "--threads", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("model,loss", [("mlp", "l2"), ("mlp", "gaussian-pixel"), ("conv", "learned-sigma")])
def test_training_flops_match_torchs_flop_counter_on_one_step(model, loss):
    """bench.step_flops (from the layer shapes) against torch.utils.flop_counter.FlopCounterMode counting the aten
    matmuls and convolutions of one real training step (forward, the loss, backward). Counting the first layer's
    input gradient too (a plain 3x forward) or missing the scale head would be off by >= 10%."""
    bench = load_bench()
    config = TrainConfig.from_spec(AuditSpec(dataset="fashion-mnist", model=model))
    shape, batch = (1, 28, 28), 8
    likelihood = get_loss(loss)
    torch.manual_seed(0)
    net = config.build(shape, scale_head=likelihood.pixel_scale)
    learned = torch.zeros(len(likelihood.params), requires_grad=True)
    x = torch.rand(batch, *shape)
    with FlopCounterMode(display=False) as counter:
        x_hat, raw_scale = split_output(net(x), shape[0])
        raw = {p.name: learned[k, None, None] for k, p in enumerate(likelihood.params)}
        scale = raw_scale.flatten(1) if raw_scale is not None else None
        likelihood.per_sample(
            x.flatten(1), x_hat.flatten(1), raw, config.sigma_floor, raw_scale=scale
        ).mean().backward()
    assert counter.get_total_flops() == bench.step_flops(net, shape) * batch


@pytest.mark.slow  # the benchmarks on real Fashion-MNIST
def test_small_preset_compares_equal_work_and_breaks_down_the_audit(shared_datasets, tmp_path):
    out = run(
        "--small", "--repeats", "2", "--transform-row", "--json", str(tmp_path / "b.json"), data_root=shared_datasets
    )
    assert re.search(r"^ratio competent plain loop / fairrecon: \d+\.\d+x median", out, re.M), out
    # every repeat trains its own audit (the same spec in one results folder would resume its cells)
    trained = [float(t) for t in re.findall(r"^  fairrecon breakdown: .*\btrain (\d+\.\d+) s", out, re.M)]
    assert len(trained) == 2 and all(t > 0 for t in trained), out
    plain, fair = map(int, re.search(r"^cell-steps: plain (\d+), fairrecon (\d+)$", out, re.M).groups())
    assert plain == fair == 2 * 1 * 2  # 2 losses x 1 seed, 256 images / batch 128 = 2 steps, 1 epoch
    # both sides made the same images: the plain per-image transform and fairrecon's batched one
    data_diff = float(re.search(r"max \|plain image - fairrecon image\| = (\S+)", out).group(1))
    assert data_diff < 1e-5  # float32 rounding of the same map; a wrong target or contrast factor is >= 1e-2
    # the breakdown names every stage of the whole process, each a non-negative time
    parts = re.search(r"^fairrecon median breakdown: (.+)$", out, re.M).group(1)
    seconds = {name: float(value) for name, value in re.findall(r"(\w+) (-?\d+\.\d+) s", parts)}
    assert list(seconds) == ["load", "groups", "train", "curves", "measure", "stats", "report", "other"]
    assert all(v >= 0 for v in seconds.values()) and seconds["train"] > 0
    # the machine's limit and training's share of it, in the same run
    record = json.loads((tmp_path / "b.json").read_text())
    assert record["limit"]["threads"] == 1 and record["limit"]["sgemm_gflops"] > 0
    # 2 cells (l2, learned-sigma: no scale head) x 256 images x (3 x 409,600 - 200,704 MACs) x 2 FLOPs per MAC
    assert record["training_flops"] == 2 * 256 * (3 * 409_600 - 200_704) * 2
    assert abs(sum(record["fairrecon_shares"].values()) - 1) < 1e-9
    assert re.search(r"^training achieved \(median\): fairrecon \d+\.\d GFLOP/s = \d+% of sgemm", out, re.M)


@pytest.mark.slow
def test_scaling_point_reports_steps_and_memory(shared_datasets):
    out = run("--_point", "3", "--limit", "128", "--test-limit", "2", "--epochs", "1", data_root=shared_datasets)
    point = json.loads(out.strip().splitlines()[-1])
    assert point["cells"] == 3 and point["images"] == 128
    assert point["cell_steps"] == 3 * 1  # 128 images / batch 128 = 1 step per cell
    assert point["seconds"] > 0 and point["estimate_mb"] > 0


@pytest.mark.slow
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


@pytest.mark.slow
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
