"""What every executor shares, without Ray: the in-process executor's numbers, a task's identity check,
per-cell provenance and its warning, and the lock that keeps a second run out of a results folder."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pandas as pd
import pytest
import torch
from conftest import FAST, REPO, TINY_AUDIT, run_cli

from fairrecon import RESULTS_VERSION, AuditSpec, run_audit
from fairrecon.errors import UserError
from fairrecon.executor import Job, LocalExecutor, check_identity
from fairrecon.grid import TrainConfig
from fairrecon.provenance import mixed_warning
from fairrecon.resultsdir import LOCK, Identity

SPEC = dict(FAST, dataset="digits", losses=("l1", "l2"), limit=300, test_limit=120)
TABLES = ("samples", "cells", "history", "curves", "grad_shares")


@pytest.mark.slow  # two audits
def test_the_in_process_executor_gives_the_loop_s_numbers():
    """A task (executor.run_task) trains a seed exactly as run_audit's own loop does."""
    loop = run_audit(**SPEC, threads=1)
    tasks = run_audit(**SPEC, executor=LocalExecutor(threads=1))
    for name in TABLES:
        pd.testing.assert_frame_equal(getattr(loop, name), getattr(tasks, name), check_exact=True, obj=name)
    assert loop.examples.keys() == tasks.examples.keys()
    assert tasks.info["executor"] == loop.info["executor"] == {"name": "in-process", "threads": 1}
    assert [row["executor"] for row in tasks.info["provenance"]] == ["in-process"] * 4


def job(identity_device: str = "cpu", version: str | None = None) -> Job:
    spec = AuditSpec(**SPEC)
    made = Job("results/x", spec, Identity.of(spec, identity_device), TrainConfig.from_spec(spec), None, None)
    return made if version is None else dataclasses.replace(made, version=version)


def test_a_task_refuses_an_identity_that_differs_where_it_runs():
    check_identity(job(), torch.device("cpu"))  # the same: trains
    with pytest.raises(UserError, match=r"identity differs from the driver's \(device_type 'cuda' -> 'cpu'\)"):
        check_identity(job("cuda"), torch.device("cpu"))  # a GPU audit on a worker without one
    with pytest.raises(UserError, match="runs fairrecon .*, the driver 0.0.1; install the same version"):
        check_identity(job(version="0.0.1"), torch.device("cpu"))
    other = job()
    other = dataclasses.replace(other, identity=dataclasses.replace(other.identity, results_version=0))
    said = f"computes results version {RESULTS_VERSION}, the driver's audit 0; run the same fairrecon"
    with pytest.raises(UserError, match=said):
        check_identity(other, torch.device("cpu"))  # the same version number, edited code: other numbers


@pytest.mark.slow  # two audits
def test_cells_resumed_on_another_machine_give_a_warning(tmp_path):
    """Seed 0 'trained on a laptop' (its checkpointed provenance says so), seed 1 trained here: warned."""
    out = tmp_path / "out"
    first = run_audit(**SPEC, out=str(out), threads=1)
    assert not [w for w in first.info["warnings"] if "machines" in w]
    for path in (out / "cells").glob("*-seed0.provenance.csv"):
        table = pd.read_csv(path)
        table["host"] = "laptop"
        table.to_csv(path, index=False)
    for path in (out / "cells").glob("*-seed1.json"):
        path.unlink()  # seed 1 trains again, here
    again = run_audit(**SPEC, out=str(out), threads=1)
    assert again.info["resumed_cells"] == 2
    hosts = {row["host"] for row in again.info["provenance"]}
    assert len(hosts) == 2 and "laptop" in hosts
    warned = [w for w in again.info["warnings"] if "were trained on 2 machines" in w]
    assert len(warned) == 1 and "laptop" in warned[0]


def test_the_provenance_warning_names_what_differs():
    row = {"loss": "l2", "seed": 0, "host": "a", "device": "cpu", "device_name": "x86_64", "torch": "2.14"}
    same = pd.DataFrame([row, {**row, "seed": 1}])
    assert mixed_warning(same) is None and mixed_warning(same.iloc[:0]) is None
    gpus = pd.DataFrame([row, {**row, "seed": 1, "device": "cuda:0", "device_name": "NVIDIA H100"}])
    said = mixed_warning(gpus)
    assert "trained on 2 devices (cpu (x86_64), cuda:0 (NVIDIA H100)): " in said
    versions = pd.DataFrame([row, {**row, "seed": 1, "host": "b", "torch": "2.15"}])
    assert "2 machines (a, b); 2 torch versions (2.14, 2.15)" in mixed_warning(versions)


HOLD = """
import sys
from fairrecon.resultsdir import writing
with writing(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


@pytest.mark.slow  # a second Python process that imports torch
def test_a_second_run_on_one_results_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={"PYTHONPATH": str(REPO), "PATH": ""},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        code, stdout, err = run_cli(capsys, "audit", "--seeds", "1", "--epochs", "1", "--out", out)
        assert code == 2 and err.strip().splitlines() == [
            f"fairrecon: error: {out} is being written by another fairrecon run (it holds {out / LOCK}); "
            "wait for that run to finish, or pass another --out"
        ]
    finally:
        holder.communicate("")
    assert holder.returncode == 0
    assert not out.exists()  # the holder wrote nothing: no lock file, no folder left behind


def test_a_refused_folder_keeps_no_lock_file(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's own file\n")
    code, stdout, err = run_cli(capsys, "audit", "--seeds", "1", "--epochs", "1", "--out", mine)
    assert code == 2 and "was not written by fairrecon" in err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_a_run_inside_its_image_folder_leaves_nothing_there(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    labels = tmp_path / "groups.csv"
    labels.write_text("file,group\n")
    inside = images / "results"
    code, stdout, err = run_cli(
        capsys, "audit", "--dataset", "folder", "--data-root", images, "--labels", labels, "--out", inside
    )
    assert code == 2 and "inside the image folder" in err
    assert list(images.iterdir()) == []


def test_a_finished_folder_keeps_its_lock_file_and_reads_as_before(trained, tmp_path):
    out = trained(**TINY_AUDIT).copy_to(tmp_path / "out")  # a folder run_audit wrote
    assert (out / LOCK).is_file()  # free again: the next run takes it
    again = run_audit(**TINY_AUDIT, out=str(out), threads=1, save=False)  # the lock file is no foreign file
    assert again.info["resumed_cells"] == 2


@pytest.mark.slow  # an audit in a fresh Python process
def test_an_audit_in_process_never_imports_ray():
    code = (
        "import sys\n"
        "from fairrecon import run_audit\n"
        "run_audit(dataset='digits', seeds=1, epochs=1, losses=('l1',), latent=4, hidden=16, limit=200, threads=1)\n"
        "import fairrecon.executor, fairrecon.sweep\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
    )
    env = {"PYTHONPATH": str(REPO), "PATH": ""}
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, text=True, capture_output=True)
    assert run.returncode == 0, run.stderr


def test_the_help_of_the_ray_options_states_the_executor_s_defaults():
    """--cpus-per-task, --gpus-per-task and --task-retries are unset unless given (so that without --executor
    ray they can be refused): the default their help states is RayExecutor's own."""
    import inspect
    import re

    from fairrecon.cli import cli
    from fairrecon.executor import RayExecutor

    defaults = inspect.signature(RayExecutor.__init__).parameters
    for command in ("audit", "sweep"):
        options = {p.name: p for p in cli.commands[command].params}
        for option, parameter in (("cpus_per_task", "cpus_per_task"), ("gpus_per_task", "gpus_per_task")) + (
            ("task_retries", "retries"),
        ):
            said = re.search(r"\[default: ([0-9.]+)\]", options[option].help).group(1)
            assert float(said) == defaults[parameter].default, (command, option)
