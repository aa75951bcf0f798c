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
    return subprocess.run(
        [sys.executable, "-m", "fairrecon", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


@pytest.mark.slow
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
        p.name for p in (tmp_path / "r").iterdir()
    }


@pytest.mark.slow
def test_flags_override_the_spec_file(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text('losses = ["l1", "l2"]\nseeds = 1\nepochs = 1\n')
    run = fairrecon("audit", str(spec), "--losses", "l2", "--out", str(tmp_path / "r"))
    assert run.returncode == 0, run.stderr
    assert "\r" not in run.stderr and "[fairrecon] " in run.stderr and "epoch 1/1" in run.stderr  # plain lines, no bars
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["spec"]["losses"] == ["l2"] and summary["spec"]["seeds"] == 1


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["--losses", "l1,huber2"], "unknown loss 'huber2'"),
        (["--targets", "0.3,1.5"], "target 1.5 is outside (0, 1)"),
        (["--dataset", "mnist", "--data-root", "/nonexistent"], "looked for /nonexistent/MNIST/raw"),
        (["--proportions", "0.5,0.6"], "sum to 1.1, not 1"),
        (["--no-such-flag"], "No such option"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(args, message):
    run = fairrecon("audit", *args, "--epochs", "1")
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and message in run.stderr and "Traceback" not in run.stderr


@pytest.mark.slow
def test_every_command_has_help_and_is_in_the_user_guide():
    """Each command answers --help and is shown in the user guide's list of commands (docs/guide/running.md);
    its full reference is generated from the command itself (tests/test_docs.py checks it)."""
    guide = (REPO / "docs" / "guide" / "running.md").read_text()
    for name, command in cli.commands.items():
        run = fairrecon(name, "--help")
        first_line = command.help.split("\n")[0].strip()
        assert run.returncode == 0 and first_line in " ".join(run.stdout.split())  # click wraps lines
        assert f"fairrecon {name}" in guide


# --- issue 10: exit codes, --json, listing commands, help conventions ---------------------------

from click.testing import CliRunner  # noqa: E402
from conftest import TINY_AUDIT, TINY_AUDIT_FLAGS  # noqa: E402
from conftest import run_cli as run_main  # noqa: E402

from fairrecon.cli import ERROR_LOG  # noqa: E402

TINY = TINY_AUDIT_FLAGS  # 64 digits, 1 seed, l2 and l1


@pytest.fixture(scope="module")
def results(trained, tmp_path_factory):
    """A finished tiny audit's folder: a copy of the shared one, since these tests write reports and logs into it."""
    return trained(**TINY_AUDIT).copy_to(tmp_path_factory.mktemp("cli") / "results")


def _boom(*args, **kwargs):
    raise RuntimeError("a bug planted by the test")


class _BrokenRegistry(dict):
    def values(self):
        raise RuntimeError("a bug planted by the test")


INTERNAL = {  # command -> (where the bug is planted, the arguments)
    "audit": ("fairrecon.stats.analyse", lambda r, t: ["audit", *TINY, "--quiet", "--out", t / "a"]),
    "report": ("fairrecon.stats.analyse", lambda r, t: ["report", r]),
    "check": ("fairrecon.gate.check", lambda r, t: ["check", r, "--max-ratio", "2"]),
    "split": ("fairrecon.groups.split_table", lambda r, t: ["split", "--dataset", "digits"]),
    "losses": ("fairrecon.losses.LOSSES", lambda r, t: ["losses"]),
    "metrics": ("fairrecon.metrics.METRICS", lambda r, t: ["metrics"]),
    "datasets": ("fairrecon.data.where_files_are", lambda r, t: ["datasets"]),
    "sweep": ("fairrecon.sweep.analyse", lambda r, t: ["sweep", _sweep_file(t), "--quiet"]),
}


def _sweep_file(folder: Path) -> Path:
    """A one-setting sweep of the TINY audit."""
    path = folder / "tiny-sweep.toml"
    path.write_text(
        f'[sweep]\nout = "{folder / "sweep"}"\n[audit]\nseeds = 2\nepochs = 1\nlatent = 4\nhidden = 16\n'
        'device = "cpu"\nlimit = 200\n[grid]\nlosses = [["l1", "l2"]]\n'
    )
    return path


def test_every_command_is_covered_by_the_internal_error_test():
    assert set(INTERNAL) == set(cli.commands)


@pytest.mark.parametrize("command", list(INTERNAL))
def test_an_internal_error_is_exit_4_with_one_line_and_the_traceback_in_a_log(
    command, results, tmp_path, monkeypatch, capsys
):
    where, args = INTERNAL[command]
    monkeypatch.setattr(where, _BrokenRegistry() if where.endswith(("LOSSES", "METRICS")) else _boom)
    code, out, err = run_main(capsys, *args(results, tmp_path))
    assert code == 4, err
    assert err.count("\n") == 1 and err.startswith("fairrecon: internal error (RuntimeError)"), err
    log = Path(err.split("traceback saved to ")[1].split(";")[0])
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "a bug planted by the test" in text
    if command in ("report", "check"):
        assert log == results / ERROR_LOG  # in the results folder when there is one
        log.unlink()
    elif command == "audit":
        assert log == tmp_path / "a" / ERROR_LOG
    elif command == "sweep":
        assert log == tmp_path / "sweep" / ERROR_LOG  # in the sweep folder
    else:  # no results folder: a temporary file (never the folder of an earlier command in this process)
        import tempfile

        assert log.parent == Path(tempfile.gettempdir()) and log.name.startswith("fairrecon-error-")
        log.unlink()


def test_json_output_is_the_verdict_on_stdout_and_notes_on_stderr(results, capsys):
    from fairrecon import AuditResult, analyse

    expected = analyse(AuditResult.load(results)).disparities
    code, out, err = run_main(capsys, "report", results, "--json")
    payload = json.loads(out)  # stdout is only JSON
    assert code == 0 and "wrote" in err
    assert [r["loss"] for r in payload["disparities"]] == list(expected["loss"])
    assert [r["worst"] for r in payload["disparities"]] == list(expected["worst"])
    code, out, err = run_main(capsys, "check", results, "--max-ratio", "1.0", "--json")
    payload = json.loads(out)
    assert payload["exit_code"] == code and code in (0, 1, 3) and payload["passed"] == (code == 0)
    assert {r["loss"] for r in payload["disparities"]} == {"l1", "l2"}
    code, out, err = run_main(capsys, "audit", *TINY, "--json")
    payload = json.loads(out)
    assert code == 0 and {r["loss"] for r in payload["disparities"]} == {"l1", "l2"} and "total" in err


def test_losses_and_datasets_list_what_is_registered(shared_datasets):
    from fairrecon.losses import FAMILIES, LOSSES, get_loss
    from fairrecon.spec import DATASETS

    runner = CliRunner()
    listed = json.loads(runner.invoke(cli, ["losses", "--json"]).output)["losses"]
    plain = [(loss.name, loss.likelihood) for loss in LOSSES.values()]
    assert [(r["name"], r["likelihood"]) for r in listed[: len(plain)]] == plain
    families = [r["name"] for r in listed[len(plain) :]]
    assert (
        families
        == [f.pattern for f in FAMILIES.values()]
        == ["mix:A", "huber:DELTA", "barron:ALPHA", "gaussian-pixel:BETA"]
    )
    for family in FAMILIES.values():  # each listed pattern names a family that get_loss builds members of
        assert get_loss(f"{family.name}:1").name == f"{family.name}:1"
    text = runner.invoke(cli, ["losses"]).output
    assert all(name in text for name in LOSSES) and "mix:A" in text
    found = json.loads(runner.invoke(cli, ["datasets", "--data-root", str(shared_datasets), "--json"]).output)
    status = {r["name"]: r["found"] for r in found["datasets"]}
    assert list(status) == list(DATASETS)
    assert status["digits"] and status["mnist"] and status["fashion-mnist"] and not status["kmnist"]


def test_every_command_has_examples_and_shows_its_defaults():
    from fairrecon import metrics

    runner = CliRunner()
    for name in cli.commands:
        text = runner.invoke(cli, [name, "--help"], terminal_width=200).output
        assert "Examples:" in text and f"fairrecon {name}" in text.split("Examples:")[1], name
    check_help = " ".join(runner.invoke(cli, ["check", "--help"], terminal_width=200).output.split())
    choices = "--metric [" + "|".join(metrics.VERDICT_METRICS) + "]"  # the registry's, not a copy
    assert choices in check_help and "[default: mse]" in check_help and "[default: 0.05" in check_help


def test_contradictory_group_flags_are_one_line_and_exit_2(tmp_path, capsys):
    code, _, err = run_main(
        capsys,
        "audit",
        "--dataset",
        "folder",
        "--data-root",
        tmp_path,
        "--group-method",
        "transform",
        "--labels",
        tmp_path / "groups.csv",
    )
    assert code == 2 and err.count("\n") == 1 and "contradicts group method 'transform'" in err


@pytest.mark.slow
def test_check_losses_takes_family_shorthand(tmp_path):
    """`check --losses mix:0,1` means mix:0 and mix:1, as `audit --losses` does (it used to read '1' as a loss)."""
    from fairrecon import run_audit

    run_audit(
        dataset="digits",
        limit=200,
        test_limit=80,
        losses="mix:0,1,l2",
        seeds=2,
        epochs=1,
        latent=4,
        hidden=16,
        device="cpu",
        out=str(tmp_path / "r"),
    )
    runner = CliRunner()
    both = runner.invoke(cli, ["check", str(tmp_path / "r"), "--max-ratio", "100", "--losses", "mix:0,1", "--json"])
    assert both.exit_code == 0, both.output
    assert {r["loss"] for r in json.loads(both.output)["disparities"]} == {"mix:0", "mix:1"}
