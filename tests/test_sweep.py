"""`fairrecon sweep`: a grid of real (small) audits through one queue, each setting's verdict exactly its own
audit's, resumed by running it again, bad settings refused before anything runs, and the findings example."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, run_cli

from fairrecon import AuditSpec, load_spec, run_audit
from fairrecon.errors import TasksFailed, UserError
from fairrecon.executor import LocalExecutor
from fairrecon.results import AuditResult
from fairrecon.stats import analyse
from fairrecon.sweep import SWEEP_MARKER, load_sweep, run_sweep, summary_lines

pytestmark = pytest.mark.usefixtures("one_thread")

# digits, small: 2 x 2 settings of 2 losses x 2 seeds
SWEEP = """
[sweep]
out = "{out}"

[audit]
dataset = "digits"
losses = ["l1", "l2"]
seeds = 2
epochs = 3
batch_size = 64
latent = 8
hidden = 32
device = "cpu"

[grid]
proportions = [[0.5, 0.5], [0.8, 0.2]]
targets = [[0.3, 0.9], [0.2, 0.6]]
"""
NAMES = [
    "proportions-0.5+0.5_targets-0.3+0.9",
    "proportions-0.5+0.5_targets-0.2+0.6",
    "proportions-0.8+0.2_targets-0.3+0.9",
    "proportions-0.8+0.2_targets-0.2+0.6",
]


def write(folder: Path, text: str, name: str = "grid.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    path = write(folder, SWEEP.format(out=folder / "out"))
    lines: list[str] = []
    report = run_sweep(path, threads=1, log=lines.append)
    return path, folder / "out", report, lines


@pytest.mark.slow  # the sweep: 4 audits
def test_every_setting_is_an_audit_and_its_verdict_is_that_audit_s_own(swept):
    path, out, report, lines = swept
    assert [s.name for s in report.sweep.settings] == NAMES
    assert "4 settings, 8 tasks (one per seed to train) on this process (1 thread(s))" in lines
    table = report.table
    for name in NAMES:
        result = AuditResult.load(out / name)  # a complete results folder like any other
        own = analyse(result).disparities.set_index("loss")
        saved = pd.DataFrame(json.loads((out / name / "summary.json").read_text())["disparities"]).set_index("loss")
        rows = table[table["setting"] == name].set_index("loss")
        assert list(rows.index) == ["l1", "l2"]
        for column in ("worst", "reference", "ratio", "ratio_low", "ratio_high", "gap", "verdict"):
            assert rows[column].tolist() == own[column].tolist(), (name, column)
        for column in ("worst", "reference", "verdict"):  # and what its summary.json says
            assert rows[column].tolist() == saved[column].tolist(), (name, column)
        assert rows["ratio"].tolist() == pytest.approx(saved["ratio"].tolist(), rel=1e-9)  # JSON: 10 digits
    files = {p.name for p in out.iterdir()}
    assert {"sweep.md", "sweep.csv", "sweep.png", "sweep.json", SWEEP_MARKER, *NAMES} <= files
    assert json.loads((out / SWEEP_MARKER).read_text())["complete"] is True
    assert pd.read_csv(out / "sweep.csv")["setting"].unique().tolist() == NAMES


@pytest.mark.slow  # the sweep, and an audit
def test_one_queue_changes_no_number(swept, tmp_path):
    """A setting's audit through the sweep's queue equals the same spec run alone, file for file."""
    path, out, report, lines = swept
    setting = report.sweep.settings[3]
    run_audit(setting.spec.replace(out=str(tmp_path / "alone")), threads=1)
    for name in ("samples.csv", "cells.csv", "history.csv", "curves.csv", "grad_shares.csv", "groups.csv"):
        assert (tmp_path / "alone" / name).read_bytes() == (out / setting.name / name).read_bytes(), name


@pytest.mark.slow  # the sweep: 4 audits
def test_the_summary_line_counts_the_table(swept):
    path, out, report, lines = swept
    table = report.table
    for line, loss in zip(report.summary, ["l1", "l2"]):
        part = table[table["loss"] == loss]
        top = part["worse"].value_counts().idxmax()
        n, clear = (
            int((part["worse"] == top).sum()),
            int(((part["worse"] == top) & (part["verdict"] == "clear gap")).sum()),
        )
        assert line.startswith(f"{loss}: {top} worse in {n} of 4 settings, clear in {clear}")
    # the brightness words: with targets 0.2/0.6 the bright group is "0.6"
    bright = table[(table["setting"] == NAMES[1]) & (table["worst"] == "0.6")]
    assert (bright["worse"] == "bright group").all()


@pytest.mark.slow  # the sweep, twice
def test_running_it_again_resumes_and_trains_nothing(swept):
    path, out, report, lines = swept
    before = (out / "sweep.csv").read_bytes()
    again: list[str] = []
    run_sweep(path, threads=1, log=again.append)
    assert "4 settings, 0 tasks (one per seed to train) on this process (1 thread(s))" in again
    assert sum("resuming: 4 of 4 cells already done" in line for line in again) == 4
    assert (out / "sweep.csv").read_bytes() == before


def test_the_summary_words():
    """The sentence the issue asks for, from a table whose counts are known."""
    spec = AuditSpec(losses=("l2",))
    rows = [("bright group", "clear gap")] * 5 + [("bright group", "no clear gap")] * 2 + [("dark group", "clear gap")]
    table = pd.DataFrame(
        [{"setting": f"s{i}", "loss": "l2", "worse": w, "verdict": v} for i, (w, v) in enumerate(rows)]
    )
    sweep = type("S", (), {"settings": [type("X", (), {"spec": spec})() for _ in rows]})()
    assert summary_lines(sweep, table) == [
        "l2: bright group worse in 7 of 8 settings, clear in 5; dark group clearly worse in 1"
    ]


class FailingAfter(LocalExecutor):
    """Runs every task but those of one setting, then fails them as a Ray executor would (TasksFailed)."""

    def __init__(self, failing: str):
        super().__init__(threads=1)
        self.failing = failing

    def run(self, runs, log):
        super().run([run for run in runs if run.name != self.failing], log)
        if any(run.name == self.failing and run.todo for run in runs):
            raise TasksFailed(f"{self.failing}: its tasks failed", "details")


@pytest.mark.slow  # a sweep, twice
def test_failed_tasks_keep_the_finished_audits_and_the_next_run_finishes(tmp_path):
    path = write(tmp_path, SWEEP.format(out=tmp_path / "out"))
    with pytest.raises(TasksFailed):
        run_sweep(path, executor=FailingAfter(NAMES[2]))
    out = tmp_path / "out"
    complete = {n for n in NAMES if (out / n / "summary.json").is_file()}
    assert complete == set(NAMES) - {NAMES[2]} and not (out / "sweep.md").exists()
    lines: list[str] = []
    run_sweep(path, threads=1, log=lines.append)
    assert "4 settings, 2 tasks (one per seed to train) on this process (1 thread(s))" in lines
    assert (out / "sweep.md").is_file() and (out / NAMES[2] / "summary.json").is_file()


@pytest.mark.parametrize(
    "grid, common, message",
    [
        (
            "targets = [[0.3, 0.9], [0.2, 0.5, 0.8]]\nproportions = [[0.9, 0.1]]",
            "",
            "setting targets-0.2+0.5+0.8_proportions-0.9+0.1: proportions: 2 values for 3 targets",
        ),
        ("epochs = [1, 2]", "epochs = 3", "'epochs' is an axis of [grid] and also given in [audit]; keep one"),
        ("epoch = [1, 2]", "", "unknown spec field 'epoch'"),
        ("epochs = []", "", "[grid] epochs must be a non-empty list of values"),
        ("epochs = [1]\nout = ['a']", "", "'out' is the sweep's"),
        ("losses = [['l1'], ['no-such-loss']]", "", "setting losses-no-such-loss: unknown loss 'no-such-loss'"),
    ],
)
def test_a_bad_setting_is_refused_before_anything_runs(tmp_path, grid, common, message):
    out = tmp_path / "out"
    path = write(tmp_path, f'[sweep]\nout = "{out}"\n[audit]\ndataset = "digits"\n{common}\n[grid]\n{grid}\n')
    with pytest.raises(UserError, match=re.escape(message)):
        run_sweep(path, threads=1)
    assert not out.exists()


def test_a_set_value_may_not_be_an_axis_and_a_folder_not_a_sweep_s_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    path = write(tmp_path, SWEEP.format(out=out))
    code, stdout, err = run_cli(capsys, "sweep", path, "--set", "targets=0.1,0.5")
    assert code == 2 and "'targets' is an axis of [grid] and also given in --set; keep one" in err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine\n")
    code, stdout, err = run_cli(capsys, "sweep", path, "--out", mine)
    assert code == 2 and "was not written by fairrecon sweep" in err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_the_findings_example_is_the_readme_grid():
    """audits/sweeps/findings.toml: MNIST and Fashion-MNIST, balanced and minority (the four audits/*.toml),
    at 20 epochs and at auto capped at 100 (an axis of tables: max_epochs is refused beside a fixed number of
    epochs), each setting exactly its spec file with those changes."""
    sweep = load_sweep(REPO / "audits" / "sweeps" / "findings.toml")
    assert [s.name for s in sweep.settings] == [
        f"{data}-{mix}_{training}"
        for data in ("mnist", "fashion-mnist")
        for mix in ("balanced", "minority")
        for training in ("epochs-20", "epochs-auto_max_epochs-100")
    ]
    for s in sweep.settings:
        base = load_spec(REPO / "audits" / f"{s.name.split('_')[0]}.toml")
        changes = {"epochs": 20} if s.name.endswith("epochs-20") else {"epochs": "auto", "max_epochs": 100}
        assert s.values["training"] == changes
        assert s.spec == base.replace(**changes, out=f"results/findings/{s.name}")
        assert s.spec.losses == ("l1", "l2", "log-mse", "learned-sigma") and s.spec.seeds == 3


@pytest.mark.parametrize(
    "grid, common, message",
    [
        (
            'training = [{epochs = 2}, {epochs = "auto", max_epoch = 9}]',
            "",
            "unknown spec field 'max_epoch' in [grid] training",
        ),
        (
            'training = [{epochs = 2}, {epochs = "auto"}]',
            "epochs = 3",
            "'epochs' is set by [grid] training and also by [audit]",
        ),
        (
            "training = [{epochs = 2}]\nmore = [{epochs = 3}]",
            "",
            "'epochs' is set by [grid] more and also by [grid] training",
        ),
        (
            'training = [{epochs = 2}, {epochs = "auto", max_epochs = 9}]\nmax_epochs = [5]',
            "",
            "'max_epochs' is set by [grid] training and also by an axis of [grid]",
        ),
        ("training = [{epochs = 2}, 3]", "", "unknown spec field 'training'"),
    ],
)
def test_an_axis_of_tables_sets_its_fields_together_and_nowhere_else(tmp_path, grid, common, message):
    out = tmp_path / "out"
    path = write(tmp_path, f'[sweep]\nout = "{out}"\n[audit]\ndataset = "digits"\n{common}\n[grid]\n{grid}\n')
    with pytest.raises(UserError, match=re.escape(message)):
        load_sweep(path)


def test_without_an_axis_of_tables_max_epochs_beside_fixed_epochs_is_refused(tmp_path):
    """Why the findings grid needs one: a common max_epochs would not act in the 20-epoch settings (spec.py's
    APPLIES_ONLY refuses it there), so the grid is refused, naming the setting."""
    path = write(tmp_path, '[audit]\ndataset = "digits"\nmax_epochs = 100\n[grid]\nepochs = [20, "auto"]\n')
    with pytest.raises(UserError, match=re.escape("setting epochs-20: max_epochs 100 applies only to --epochs auto")):
        load_sweep(path)
