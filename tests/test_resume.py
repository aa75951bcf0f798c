"""Resume and failed cells: an interrupted audit, run again, ends exactly as an uninterrupted one.

Cells are checkpointed per seed (all its losses) in OUT/cells; these tests interrupt
audits for real (kill -9 on a subprocess, an exception inside the run), resume them, and
compare every table with an uninterrupted run of the same spec, bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fairrecon import AuditSpec, UserError, run_audit
from fairrecon.cli import main
from fairrecon.fileio import atomic_write
from fairrecon.resultsdir import Identity, check_out
from fairrecon.resume import CellStore, result_fields

REPO = Path(__file__).resolve().parents[1]

# Three seeds of two cells; big enough that a seed takes a moment, small enough for CI.
SPEC = dict(
    dataset="digits",
    limit=320,
    test_limit=120,
    losses=("l2", "learned-sigma"),
    seeds=3,
    epochs=2,
    batch_size=64,
    latent=8,
    hidden=32,
    device="cpu",
)
FLAGS = [
    "--dataset",
    "digits",
    "--limit",
    "320",
    "--test-limit",
    "120",
    "--losses",
    "l2,learned-sigma",
    "--seeds",
    "3",
    "--epochs",
    "2",
    "--batch-size",
    "64",
    "--latent",
    "8",
    "--device",
    "cpu",
]  # hidden: set in a spec file
TABLES = ("samples", "cells", "history", "groups", "curves")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted audit, saved to a folder."""
    out = tmp_path_factory.mktemp("reference")
    return run_audit(**SPEC, out=str(out)), out


def assert_same_results(folder: Path, reference_folder: Path) -> None:
    """Every table file is byte-identical, and summary.json agrees on everything but timings."""
    for name in TABLES:
        assert (folder / f"{name}.csv").read_bytes() == (reference_folder / f"{name}.csv").read_bytes(), name
    a, b = (json.loads((f / "summary.json").read_text()) for f in (folder, reference_folder))
    for summary in (a, b):
        summary["spec"].pop("out")
        summary.pop("info")
    assert a == b


def markers(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "cells").glob("*-seed*.json")) if (out / "cells").is_dir() else []


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_gives_identical_results(reference, tmp_path):
    ref, ref_out = reference
    out = tmp_path / "killed"
    spec_file = tmp_path / "spec.toml"
    spec_file.write_text("hidden = 32\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fairrecon", "audit", str(spec_file), *FLAGS, "--out", str(out), "--quiet"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    first_seed = ["l2-seed0.json", "learned-sigma-seed0.json"]
    deadline = time.monotonic() + 120
    while not set(first_seed) <= set(markers(out)):
        assert proc.poll() is None, f"audit ended before it could be killed: {proc.stderr.read().decode()}"
        assert time.monotonic() < deadline, "first seed never finished"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    done_at_kill = markers(out)
    assert len(done_at_kill) < 6, "the audit finished before the kill; nothing was interrupted"
    assert not (out / "summary.json").exists()

    messages: list[str] = []
    result = run_audit(**SPEC, out=str(out), log=messages.append)
    assert result.info["resumed_cells"] == len(done_at_kill)
    assert any(m.startswith(f"resuming: {len(done_at_kill)} of 6 cells") for m in messages)
    assert_same_results(out, ref_out)
    for name in ("samples", "cells", "history"):
        pd.testing.assert_frame_equal(getattr(result, name), getattr(ref, name), check_exact=True)


@pytest.mark.slow
def test_exception_mid_run_then_resume_trains_only_the_rest(reference, tmp_path):
    _, ref_out = reference
    out = tmp_path / "interrupted"

    def ctrl_c_after_first_seed(message: str) -> None:
        if message.startswith("done:"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_audit(**SPEC, out=str(out), log=ctrl_c_after_first_seed)
    assert markers(out) == ["l2-seed0.json", "learned-sigma-seed0.json"]

    trained: list[str] = []
    result = run_audit(**SPEC, out=str(out), log=lambda m: trained.append(m) if m.startswith("done:") else None)
    assert trained == ["done: l2/seed1, learned-sigma/seed1", "done: l2/seed2, learned-sigma/seed2"]
    assert result.info["resumed_cells"] == 2
    assert_same_results(out, ref_out)


@pytest.mark.slow
def test_complete_folder_reruns_without_training(reference, tmp_path):
    _, ref_out = reference
    out = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(ref_out), str(out)], check=True)
    (out / "samples.csv").unlink()  # a lost result table is rebuilt from the checkpoints
    result = run_audit(**SPEC, out=str(out))
    assert result.info["resumed_cells"] == 6 and result.info["timings"]["train_s"] == 0.0
    assert_same_results(out, ref_out)


@pytest.mark.slow
def test_half_written_cell_is_trained_again(reference, tmp_path):
    """A cell whose tables exist but whose marker does not (killed between writes) is not trusted."""
    _, ref_out = reference
    out = tmp_path / "partial"
    subprocess.run(["cp", "-r", str(ref_out), str(out)], check=True)
    (out / "cells" / "learned-sigma-seed2.json").unlink()
    (out / "cells" / "learned-sigma-seed2.samples.csv").write_text("loss,seed\nl2,0\n")  # garbage left behind
    (out / "cells" / ".l2-seed2.samples.csv.abc123.tmp").write_text("half a fi")  # a write cut short
    messages: list[str] = []
    run_audit(**SPEC, out=str(out), log=messages.append)
    assert "done: l2/seed2, learned-sigma/seed2" in messages  # the whole seed trained again
    assert not list((out / "cells").glob(".*.tmp"))
    assert_same_results(out, ref_out)


@pytest.mark.slow
def test_different_spec_is_refused_in_one_line_unless_forced(reference, tmp_path, capsys):
    _, ref_out = reference
    out = tmp_path / "other"
    subprocess.run(["cp", "-r", str(ref_out), str(out)], check=True)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as exit_:
        main(["audit", *FLAGS, "--epochs", "1", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1
    assert "different spec" in err and "epochs 2 -> 1" in err and "--force" in err
    assert before == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "audit",
                "--dataset",
                "digits",
                "--test-limit",
                "120",
                "--losses",
                "l1",
                "--seeds",
                "1",
                "--epochs",
                "1",
                "--latent",
                "4",
                "--device",
                "cpu",
                "--out",
                str(out),
                "--quiet",
                "--force",
            ]
        )
    assert exit_.value.code == 0
    assert markers(out) == ["l1-seed0.json"]  # the other spec's checkpoints are gone
    summary = json.loads((out / "summary.json").read_text())
    assert summary["spec"]["losses"] == ["l1"] and summary["spec"]["epochs"] == 1


def test_spec_hash_ignores_where_results_go_but_not_what_changes_them(tmp_path):
    spec = AuditSpec(**SPEC)
    fields = result_fields(spec, "cpu")
    assert fields == result_fields(spec.replace(device="auto", out="elsewhere"), "cpu")
    mnist = spec.replace(dataset="mnist")  # download applies only to the datasets torchvision fetches
    assert result_fields(mnist, "cpu") == result_fields(mnist.replace(download=True), "cpu")
    assert fields != result_fields(spec, "cuda")
    CellStore(tmp_path, Identity.of(spec, "cpu")).open()
    check_out(tmp_path, Identity.of(spec.replace(device="auto"), "cpu"))  # same audit: accepted
    with pytest.raises(UserError, match=r"different spec \(lr 0.001 -> 0.002\)"):
        check_out(tmp_path, Identity.of(spec.replace(lr=2e-3), "cpu"))


def test_atomic_write_keeps_the_old_file_when_a_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "table.csv"
    target.write_text("old,complete\n")

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        atomic_write(target, "new,but,never,finished\n")
    assert target.read_text() == "old,complete\n"
    assert list(tmp_path.iterdir()) == [target]  # no temp file left behind


# --- failed cells: a diverging cell is marked failed with its reason, and the audit carries on ---

TINY = dict(
    dataset="digits", limit=256, test_limit=64, seeds=1, epochs=1, batch_size=64, latent=8, hidden=32, device="cpu"
)


@pytest.mark.slow
def test_non_finite_loss_fails_that_cell_only(tmp_path):
    """At lr=5e3, l2's and log-mse's losses overflow in the first epoch; l1 (bounded gradients) trains on."""
    with_bad = run_audit(**TINY, losses=("l1", "l2", "log-mse"), lr=5e3, out=str(tmp_path))
    alone = run_audit(**TINY, losses=("l1",), lr=5e3)
    status = dict(zip(with_bad.cells["loss"], with_bad.cells["status"]))
    assert status["l1"] == "ok"
    for loss in ("l2", "log-mse"):
        assert status[loss] == "failed: non-finite loss in epoch 1"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {c["loss"]: c["status"] for c in summary["cells"]} == status
    assert {r["loss"] for r in summary["by_group"]} == {"l1"}  # failed cells leave the statistics
    a = with_bad.samples.loc[with_bad.samples["loss"] == "l1", "mse"].to_numpy()
    b = alone.samples.loc[alone.samples["loss"] == "l1", "mse"].to_numpy()
    assert np.isfinite(a).all()
    np.testing.assert_allclose(a, b, rtol=1e-5)  # trained beside diverging cells or alone: the same


@pytest.mark.slow
def test_sigma_collapse_fails_that_cell_and_resumes_as_failed(tmp_path):
    """A floor above the best sigma (0.5 vs ~0.1) with a fast sigma learning rate pins sigma to the floor."""
    collapsed = run_audit(**TINY, losses=("l1", "learned-sigma"), sigma_floor=0.5, sigma_lr=1.0, out=str(tmp_path))
    normal = run_audit(**TINY, losses=("l1", "learned-sigma"))
    status = dict(zip(collapsed.cells["loss"], collapsed.cells["status"]))
    assert status == {"l1": "ok", "learned-sigma": "failed: learned sigma collapsed to its floor 0.5"}
    assert dict(zip(normal.cells["loss"], normal.cells["status"])) == {"l1": "ok", "learned-sigma": "ok"}
    l1 = [r.samples.loc[r.samples["loss"] == "l1"].reset_index(drop=True) for r in (collapsed, normal)]
    pd.testing.assert_frame_equal(l1[0], l1[1], check_exact=True)  # l1 ignores sigma: not touched at all
    again = run_audit(**TINY, losses=("l1", "learned-sigma"), sigma_floor=0.5, sigma_lr=1.0, out=str(tmp_path))
    assert again.info["resumed_cells"] == 2  # a failed cell is a finished cell
    pd.testing.assert_frame_equal(again.cells, collapsed.cells, check_exact=True)
