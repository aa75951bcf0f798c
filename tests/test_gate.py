"""The gate: exit codes, its false-positive rate on simulated null data, and `fairrecon check` end to end."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import FAST, REPO
from conftest import run_cli as _main
from test_stats import simulate, synthetic_result

from fairrecon import gate, run_audit, save_results, stats
from fairrecon.errors import ExitCode, UserError
from fairrecon.results import AuditResult


def _result(means=(0.010, 0.010), seeds=5, n=(80, 60), rng_seed=0, **kwargs):
    values, codes = simulate(np.random.default_rng(rng_seed), seeds=seeds, n=n, means=means)
    return synthetic_result({"l1": values, "l2": values * 1.01}, codes, **kwargs)


def test_fail_names_the_loss_groups_and_numbers():
    outcome = gate.check(_result(means=(0.010, 0.016)), max_ratio=1.2)
    assert outcome.code == ExitCode.FAIL
    head, *lines = outcome.message.splitlines()
    assert "l1" in head and "l2" in head
    fail_line = next(line for line in lines if line.startswith("FAIL l1"))
    row = outcome.table.set_index("loss").loc["l1"]
    assert "group b vs a" in fail_line and f"{row.ratio_lcb:.4g} > max-ratio 1.2" in fail_line
    assert row.ratio_lcb > 1.2
    assert "Bonferroni over 2 loss(es) x 1 group pair(s)" in outcome.message  # the policy is stated


def test_the_lower_end_of_the_reported_interval_decides():
    result = _result(means=(0.010, 0.016))
    table = gate.check(result, max_gap=1.0).table
    lcb = table["gap_lcb"].max()
    assert gate.check(result, max_gap=1.0).code == ExitCode.PASS
    assert gate.check(result, max_gap=lcb * 0.999).code == ExitCode.FAIL
    assert gate.check(result, max_gap=lcb * 1.001).code == ExitCode.PASS
    # the point estimate alone exceeds this threshold, but not with confidence
    assert gate.check(result, max_gap=table["gap"].max() * 0.99).code == ExitCode.PASS
    # with two groups the decisive lower end is the reported interval's own
    np.testing.assert_array_equal(table["gap_lcb"], table["gap_low"])
    np.testing.assert_array_equal(table["ratio_lcb"], table["ratio_low"])
    ratio = table["ratio_lcb"].max()
    assert gate.check(result, max_ratio=ratio * 0.999).code == ExitCode.FAIL
    assert gate.check(result, max_ratio=ratio * 1.001).code == ExitCode.PASS


def test_the_gate_and_the_analysis_decide_alike():
    """An Analysis passed in is used as it is; one made with another policy is refused, not re-decided."""
    result = _result(means=(0.010, 0.0115), seeds=3)
    for alpha in (0.2, 0.05, 0.01):
        analysis = stats.analyse(result, policy=stats.Policy(alpha=alpha))
        from_result = gate.check(result, max_ratio=1.0, alpha=alpha)
        from_analysis = gate.check(analysis, max_ratio=1.0, alpha=alpha)
        assert from_result.code == from_analysis.code
        pd.testing.assert_frame_equal(from_result.table, analysis.disparities)
        clear = (analysis.disparities["verdict"] == stats.CLEAR).any()
        assert (from_result.code == ExitCode.FAIL) == clear
    with pytest.raises(UserError, match="made differently: policy"):
        gate.check(stats.analyse(result), max_ratio=1.0, alpha=0.01)
    with pytest.raises(UserError, match="made differently: metric"):
        gate.check(stats.analyse(result), max_ratio=1.0, metric="mae")
    with pytest.raises(UserError, match="disagrees"):
        gate.check(result, max_ratio=1.0, alpha=0.1, policy=stats.Policy(alpha=0.05))


def test_insufficient_data():
    failed = _result(status={("l2", 1): "failed: non-finite loss in epoch 2"})
    outcome = gate.check(failed, max_ratio=2.0)
    assert outcome.code == ExitCode.INSUFFICIENT and "l2/seed1" in outcome.message
    tiny = gate.check(_result(n=(80, 10)), max_ratio=2.0)
    assert tiny.code == ExitCode.INSUFFICIENT and "b (n=10)" in tiny.message
    # restricting the gate to the losses that trained is allowed
    assert gate.check(failed, max_ratio=2.0, losses=["l1"]).code == ExitCode.PASS
    # a clear gap in a loss with sufficient data fails the gate even when another loss is insufficient
    mixed = _result(means=(0.010, 0.016), status={("l2", 1): "failed: non-finite loss in epoch 2"})
    assert gate.check(mixed, max_ratio=1.0).code == ExitCode.FAIL


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(), "give a threshold"),
        (dict(max_ratio=1.1, metric="psnr"), "not defined for psnr"),
        (dict(max_ratio=1.1, adjusted=True), "use --max-gap"),
        (dict(max_ratio=0.5), "must be >= 1"),
        (dict(max_gap=-1.0), ">= 0"),
        (dict(max_gap=0.1, alpha=0.0), "alpha"),
        (dict(max_gap=0.1, metric="rmse"), "unknown metric"),
    ],
)
def test_usage_errors_raise(kwargs, match):
    with pytest.raises(UserError, match=match):
        gate.check(_result(), **kwargs)


def test_assert_fair_uses_the_same_policy(tmp_path):
    unfair = _result(means=(0.010, 0.016))
    with pytest.raises(AssertionError, match="FAIL l1"):
        gate.assert_fair(unfair, max_ratio=1.2)
    save_results(unfair, tmp_path / "unfair")
    with pytest.raises(AssertionError, match="FAIL l1"):
        gate.assert_fair(tmp_path / "unfair", max_ratio=1.2)
    assert gate.assert_fair(_result(), max_ratio=1.5).passed
    with pytest.raises(AssertionError, match="insufficient"):
        gate.assert_fair(_result(n=(80, 10)), max_ratio=2.0)


@pytest.mark.slow
def test_false_positive_rate_on_simulated_null_audits():
    """Equal groups, strictest threshold (max-gap 0): the gate fails at most ~alpha of the time."""
    alpha, reps = 0.1, 150
    fails = sum(
        gate.check(_result(seeds=3, rng_seed=r), max_gap=0.0, alpha=alpha).code == ExitCode.FAIL for r in range(reps)
    )
    slack = 3 * np.sqrt(alpha * (1 - alpha) / reps)
    assert fails / reps <= alpha + slack
    # ...and it flags a real gap (40%, about 5 standard errors here) nearly always; power on real audits
    # at 5-20% gaps is measured by benchmarks/power.py
    hits = sum(
        gate.check(_result(means=(0.010, 0.014), seeds=5, rng_seed=r), max_gap=0.0, alpha=alpha).code == ExitCode.FAIL
        for r in range(20)
    )
    assert hits >= 18


# ------------------------------------------------------------------ through the CLI


def _fairrecon(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fairrecon", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def audits(tmp_path_factory):
    """A default-groups (0.3 vs 0.9) audit and a null (0.5 vs 0.5) one, FAST settings, two losses each.
    The default one has 4 seeds and trains until its answer has settled (40 epochs at lr 3e-3: the
    worst/best ratio moved under 1% over the last quarter; after FAST's 3 epochs it still moved 25-39%,
    which the policy calls insufficient data)."""
    tmp = tmp_path_factory.mktemp("audits")
    settled = dict(seeds=4, epochs=40, lr=3e-3)
    for name, targets, settings in (("default", None, settled), ("null", (0.5, 0.5), {})):
        # one thread: tiny models gain nothing from more, and the assertions below are about these exact runs
        run_audit(**{**FAST, **settings}, losses=("l1", "l2"), targets=targets, out=str(tmp / name), threads=1)
    return {name: tmp / name for name in ("default", "null")}


@pytest.mark.slow
def test_check_fails_the_default_audit_under_a_tight_threshold(audits):
    run = _fairrecon("check", audits["default"], "--metric", "mse", "--max-ratio", "1.0")
    assert run.returncode == 1, run.stdout + run.stderr
    assert (
        run.stdout.startswith("fail:") and "l1: group 0.9 vs 0.3" in run.stdout
    )  # the bright group is worse once settled
    summary = json.loads((audits["default"] / "summary.json").read_text())
    assert [d["loss"] for d in summary["disparities"]] == ["l1", "l2"]


@pytest.mark.slow
def test_check_passes_a_null_audit_under_a_loose_threshold(audits, capsys):
    code, out, err = _main(capsys, "check", audits["null"], "--max-ratio", "1.5", "--alpha", "0.05")
    assert code == 0 and out.startswith("pass:"), out + err
    code, out, err = _main(capsys, "check", audits["null"], "--max-gap", "0.01", "--adjusted")
    assert code == 0 and "in excess of per-group PCA" in out, out + err


@pytest.mark.slow
def test_check_exit_codes_for_usage_and_insufficient_data(audits, tmp_path, capsys):
    code, out, err = _main(capsys, "check", audits["null"])
    assert code == 2 and err.count("\n") == 1 and "give a threshold" in err
    code, out, err = _main(capsys, "check", audits["null"], "--max-gap", "1", "--targets", "0.2,0.8")
    assert code == 2 and "only with --weights" in err
    broken = tmp_path / "broken"
    shutil.copytree(audits["null"], broken)
    cells = pd.read_csv(broken / "cells.csv")
    cells.loc[0, "status"] = "failed: non-finite loss in epoch 3"
    cells.to_csv(broken / "cells.csv", index=False)
    code, out, err = _main(capsys, "check", broken, "--max-ratio", "1.5")
    assert code == 3 and "insufficient data" in out


def _planted(folder, out, factor: float):
    """A copy of a results folder whose second group's per-image errors are scaled by `factor` (an exact gap)."""
    result = AuditResult.load(folder)
    second = result.samples["group"] == result.samples["group"].cat.categories[1]
    result.samples.loc[second, ["mse", "mae"]] *= factor
    save_results(result, out)
    return out


def _clear_losses(headline: str) -> set[str]:
    """The losses a headline calls "clear gap" (its 'Clear gap: a (...); b (...).' sentence)."""
    if "Clear gap: " not in headline:
        return set()
    listed = headline.split("Clear gap: ", 1)[1].split(").", 1)[0]
    return {part.split(" (", 1)[0].strip() for part in listed.split("); ")}


@pytest.mark.slow
def test_every_verdict_surface_agrees(audits, tmp_path, capsys):
    """Null audits, planted gaps and insufficient data: the terminal, report.md, report.html, summary.json
    and `fairrecon check --max-ratio 1` (exit 1 iff some loss is "clear gap") say the same thing."""
    broken = tmp_path / "broken"
    shutil.copytree(audits["null"], broken)
    cells = pd.read_csv(broken / "cells.csv")
    cells.loc[0, "status"] = "failed: non-finite loss in epoch 3"
    cells.to_csv(broken / "cells.csv", index=False)
    save_results(AuditResult.load(broken), broken)  # summary.json and the reports from the edited cells
    folders = {
        "null": audits["null"],
        "default": audits["default"],
        "broken": broken,
        **{f"planted {f}": _planted(audits["null"], tmp_path / f"planted{f}", 1 + f) for f in (0.1, 0.5)},
    }
    seen = set()
    for name, folder in folders.items():
        code, terminal, err = _main(capsys, "report", folder, "--out", tmp_path / "reports" / name)
        assert code == 0, err
        summary = json.loads((folder / "summary.json").read_text())
        headline = summary["verdict"]
        md = (tmp_path / "reports" / name / "report.md").read_text()
        page = (tmp_path / "reports" / name / "report.html").read_text()
        caveat = summary["metric_caveat"]  # when the metrics name different worse groups, it comes first
        assert terminal.startswith(f"{caveat}\n\n{headline}" if caveat else headline) and f"\n{headline}\n" in md
        assert f'<p class="headline">{html.escape(headline)}</p>' in page
        verdicts = {d["loss"]: d["verdict"] for d in summary["disparities"]}
        clear = {loss for loss, v in verdicts.items() if v == stats.CLEAR}
        assert _clear_losses(headline) == clear, name
        for loss, v in verdicts.items():  # each loss's row in the verdict table of report.md
            assert re.search(rf"^\| {re.escape(loss)} \|.*\| {v} \|$", md, re.M), (name, loss)
        code, out, err = _main(capsys, "check", folder, "--max-ratio", "1")
        expected = (
            ExitCode.FAIL
            if clear
            else ExitCode.INSUFFICIENT
            if stats.INSUFFICIENT in verdicts.values()
            else ExitCode.PASS
        )
        assert code == expected, (name, out, err)
        seen.update(verdicts.values())
    assert seen == {stats.CLEAR, stats.NO_CLEAR, stats.INSUFFICIENT}  # every verdict was exercised
