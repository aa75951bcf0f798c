"""--threads: the audit runs at the thread count asked for (or every usable CPU), records it, puts torch's
setting back, and gets the same bits at any count (CPU), each cell the same bits beside other cells or alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO

from fairrecon import run_audit
from fairrecon import threads as threads_module
from fairrecon.data import load_images
from fairrecon.errors import UserError
from fairrecon.grid import Cell, TrainConfig
from fairrecon.groups import make_groups
from fairrecon.spec import AuditSpec
from fairrecon.train import train_cells

# Fashion-MNIST at the default width: matrices large enough that torch splits them across threads (digits at 8x8
# would pass without ever running a second thread). Each way torch's kernels round differently at another thread
# count (threads.py) is reached: log-mse's batch MSE and learned-sigma's gradient are sums to one number per cell;
# gaussian-pixel trains in a chunk of its own (its scale head), one cell per seed, whose matrix products MKL
# splits between threads, and its softplus has scalar tails; every group's mean brightness (groups.csv) is one sum.
# 3 threads on a 2-core machine cut tensors where 1 and 2 never do. 512 images: 4 steps an epoch, 2 epochs.
SMALL = dict(
    dataset="fashion-mnist",
    limit=512,
    test_limit=128,
    epochs=2,
    seeds=1,
    losses=("l1", "log-mse", "learned-sigma", "gaussian-pixel"),
    device="cpu",
    grad_points=2,
)
TABLES = ("samples", "cells", "history", "curves", "grad_shares", "groups", "generated")


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mlp", "conv", "conv-vae"])
def test_thread_count_changes_no_bit(shared_datasets, model):
    before = torch.get_num_threads()
    runs = []
    for threads in (1, 2, 3):
        seen: list[int] = []
        result = run_audit(
            **SMALL,
            model=model,
            **({"generate": 64} if model == "conv-vae" else {}),
            data_root=str(shared_datasets),
            threads=threads,
            on_epoch=lambda *a: seen.append(torch.get_num_threads()),
        )
        assert set(seen) == {threads} and result.info["threads"] == threads and result.info["threads_chosen"] == "given"
        assert torch.get_num_threads() == before  # put back
        runs.append(result)
    assert runs[0].curves is not None and runs[0].grad_shares is not None
    assert (runs[0].generated is not None) == (model == "conv-vae")
    for run in runs[1:]:
        for name in TABLES:
            if getattr(runs[0], name) is not None:
                pd.testing.assert_frame_equal(getattr(runs[0], name), getattr(run, name), check_exact=True)
        for key, value in runs[0].examples.items():
            assert np.array_equal(value, run.examples[key]), key


@pytest.mark.parametrize("model", ["mlp", "conv"])
def test_a_cell_beside_others_is_the_cell_alone_at_any_thread_count(shared_datasets, model):
    """Each cell's arithmetic runs on one thread (runners.LoopedRunner), so a cell trained in a chunk with others
    at 2 threads has exactly the weights and learned parameters of the same cell trained alone at 3 or at 1."""
    spec = AuditSpec(dataset="fashion-mnist", data_root=str(shared_datasets), limit=384, test_limit=64, model=model)
    data = make_groups(load_images(spec.dataset, spec.data_root), spec)
    config = TrainConfig.from_spec(spec, epochs=1, grad_points=0)
    cells = [Cell("log-mse", 0), Cell("learned-sigma", 1), Cell("l1", 1)]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        together = train_cells(data.train_x, data.train_g, cells, config)
        for c, cell in enumerate(cells):
            for threads in (3, 1):
                torch.set_num_threads(threads)
                alone = train_cells(data.train_x, data.train_g, [cell], config)
                for name, p in alone.stacked.params.items():
                    assert torch.equal(together.stacked.params[name][c], p[0]), (cell, threads, name)
                for name, value in alone.stacked.learned().items():  # learned-sigma's sigma
                    assert torch.equal(together.stacked.learned()[name][c], value[0]), (cell, threads, name)
    finally:
        torch.set_num_threads(before)


def test_default_threads_take_every_usable_cpu_whatever_the_load(monkeypatch):
    """The load average lags (it still counts work that just finished), so it no longer decides."""
    cores = len(threads_module.os.sched_getaffinity(0))
    monkeypatch.setattr(threads_module, "CGROUP_CPU_MAX", Path("/nonexistent/cpu.max"))
    monkeypatch.setattr(threads_module.os, "getloadavg", lambda: (float(cores) + 0.7, 0.0, 0.0))
    n, why = threads_module.default_threads()
    assert n == cores and f"{cores} CPUs" in why


@pytest.mark.parametrize(
    "text, expected",
    [("max 100000", None), ("50000 100000", 1), ("150000 100000", 1), ("10000000 100000", None), ("garbage", None)],
)
def test_a_cgroup_quota_caps_the_cpus(tmp_path, text, expected):
    cores = len(threads_module.os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text(text + "\n")
    n, why = threads_module.usable_cpus(cpu_max)
    want = cores if expected is None else min(expected, cores)
    assert n == want and (("cgroup quota" in why) == (want < cores))


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_bad_thread_count_is_refused(bad):
    with pytest.raises(UserError, match="threads must be a whole number >= 1"):
        run_audit(dataset="digits", threads=bad)


@pytest.mark.slow
def test_cli_threads_flag_is_checked():
    out = subprocess.run(
        [sys.executable, "-m", "fairrecon", "audit", "--threads", "0"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 2 and "--threads" in out.stderr and "Traceback" not in out.stderr
