"""The command line: the README's main command, overrides, and one-line errors with exit status 2."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fairrecon.cli import cli

REPO = Path(__file__).resolve().parents[1]


def fairrecon(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "fairrecon", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_default_audit_runs_and_prints_a_table_per_loss_and_group(tmp_path):
    run = fairrecon("audit", "--out", str(tmp_path / "r"), "--quiet", "--epochs", "5")
    assert run.returncode == 0, run.stderr
    for loss in ("l1", "l2", "log-mse", "learned-sigma"):
        assert re.search(rf"^\s*{loss}\s+\d", run.stdout, re.M)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["spec"]["targets"] == [0.3, 0.9] and summary["spec"]["seeds"] >= 3
    assert {r["group"] for r in summary["groups"]} == {"0.3", "0.9"}
    assert summary["fairrecon_version"] and summary["info"]["timings"]["total_s"] > 0
    assert {"samples.csv", "cells.csv", "groups.csv", "history.csv", "summary.json", "report.md"} <= {
        p.name for p in (tmp_path / "r").iterdir()}


def test_flags_override_the_spec_file(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text('losses = ["l1", "l2"]\nseeds = 1\nepochs = 1\n')
    run = fairrecon("audit", str(spec), "--losses", "l2", "--out", str(tmp_path / "r"), "--quiet")
    assert run.returncode == 0, run.stderr
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["spec"]["losses"] == ["l2"] and summary["spec"]["seeds"] == 1


@pytest.mark.parametrize("args, message", [
    (["--losses", "l1,huber2"], "unknown loss 'huber2'"),
    (["--targets", "0.3,1.5"], "target 1.5 is outside (0, 1)"),
    (["--dataset", "mnist", "--data-root", "/nonexistent"], "looked for /nonexistent/MNIST/raw"),
    (["--proportions", "0.5,0.6"], "sum to 1.1, not 1"),
    (["--no-such-flag"], "No such option"),
])
def test_bad_arguments_give_one_line_and_exit_2(args, message):
    run = fairrecon("audit", *args, "--epochs", "1")
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and message in run.stderr and "Traceback" not in run.stderr


def test_every_command_has_help_and_is_in_the_readme():
    readme = (REPO / "README.md").read_text()
    for name, command in cli.commands.items():
        run = fairrecon(name, "--help")
        first_line = command.help.split("\n")[0].strip()
        assert run.returncode == 0 and first_line in " ".join(run.stdout.split())  # click wraps lines
        assert f"fairrecon {name}" in readme
