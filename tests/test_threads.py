"""--threads: the audit runs at the thread count asked for (or every usable CPU), records it, puts
torch's setting back, and gets the same bits at any count (CPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import REPO

from fairrecon import audit as audit_module
from fairrecon import run_audit
from fairrecon.errors import UserError

# Fashion-MNIST at the default width: matrices large enough that torch splits them across threads
# (digits at 8x8 would pass this test without ever running a second thread). Conv models run their cells
# on oneDNN's ordinary kernels, at 2 threads a cell per worker thread (stacked.StackedCells.looped,
# runners.LoopedRunner), forward and backward: the test covers their gradients too.
SMALL = dict(
    dataset="fashion-mnist",
    limit=256,
    test_limit=128,
    epochs=1,
    seeds=1,
    losses=("l1", "learned-sigma"),
    device="cpu",
    grad_points=2,
)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mlp", "conv", "conv-vae"])
def test_thread_count_changes_no_bit(shared_datasets, model):
    before = torch.get_num_threads()
    runs = []
    for threads in (1, 2):
        seen: list[int] = []
        result = run_audit(
            **SMALL,
            model=model,
            data_root=str(shared_datasets),
            threads=threads,
            on_epoch=lambda *a: seen.append(torch.get_num_threads()),
        )
        assert seen == [threads] and result.info["threads"] == threads and result.info["threads_chosen"] == "given"
        assert torch.get_num_threads() == before  # put back
        runs.append(result)
    for name in ("samples", "cells", "history", "curves", "grad_shares"):
        pd.testing.assert_frame_equal(getattr(runs[0], name), getattr(runs[1], name), check_exact=True)


def test_default_threads_take_every_usable_cpu_whatever_the_load(monkeypatch):
    """The load average lags (it still counts work that just finished), so it no longer decides."""
    cores = len(audit_module.os.sched_getaffinity(0))
    monkeypatch.setattr(audit_module, "CGROUP_CPU_MAX", Path("/nonexistent/cpu.max"))
    monkeypatch.setattr(audit_module.os, "getloadavg", lambda: (float(cores) + 0.7, 0.0, 0.0))
    n, why = audit_module.default_threads()
    assert n == cores and f"{cores} CPUs" in why


@pytest.mark.parametrize(
    "text, expected",
    [("max 100000", None), ("50000 100000", 1), ("150000 100000", 1), ("10000000 100000", None), ("garbage", None)],
)
def test_a_cgroup_quota_caps_the_cpus(tmp_path, text, expected):
    cores = len(audit_module.os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text(text + "\n")
    n, why = audit_module.usable_cpus(cpu_max)
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
