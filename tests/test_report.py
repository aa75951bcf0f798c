"""Reports: intervals and verdicts against independent computations, examples.npz, report.html, `fairrecon report`."""

from __future__ import annotations

import base64
import dataclasses
import io
import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import FAST, REPO, SMALL_AUDIT
from PIL import Image

from fairrecon import run_audit
from fairrecon.data import load_images
from fairrecon.figures import HATCHES, audit_figures, group_styles
from fairrecon.grid import Cell, TrainConfig
from fairrecon.groups import make_groups
from fairrecon.html_report import _png, html_report
from fairrecon.measure import example_reconstructions
from fairrecon.progress import Progress
from fairrecon.report import error_table, frontier_sentence, frontier_table, markdown_report, verdict_table
from fairrecon.results import AuditResult
from fairrecon.spec import AuditSpec
from fairrecon.stats import analyse
from fairrecon.train import train_cells


@pytest.fixture(scope="module")
def saved(trained):
    """A small real audit (digits, 3 seeds so the t interval exists), saved to a folder (shared: read only)."""
    audit = trained(**SMALL_AUDIT)
    return audit.result, audit.folder


def test_examples_are_saved_small_and_round_trip(saved):
    result, out = saved
    path = out / "examples.npz"
    assert path.exists() and path.stat().st_size < 300_000
    loaded = AuditResult.load(out).examples
    assert set(loaded) == set(result.examples)
    for key, value in result.examples.items():
        np.testing.assert_array_equal(loaded[key], value)


@pytest.mark.slow
def test_a_resumed_audit_keeps_its_examples(saved, tmp_path):
    """Every cell is checkpointed in the folder: a rerun trains nothing and reads the examples back."""
    result, out = saved
    again = run_audit(**SMALL_AUDIT, out=str(shutil.copytree(out, tmp_path / "audit")))
    assert again.info["resumed_cells"] == len(again.cells)
    for key, value in result.examples.items():
        np.testing.assert_array_equal(again.examples[key], value)


@pytest.mark.slow
def test_example_reconstructions_match_an_ordinary_module():
    """uint8 originals and reconstructions equal each cell run as a plain nn.Module, to rounding."""
    spec = AuditSpec(dataset="digits", **FAST)
    data = make_groups(load_images("digits"), spec)
    cells = [Cell(loss, seed) for loss in ("l1", "l2") for seed in (0, 1)]
    trained = train_cells(data.train_x, data.train_g, cells, TrainConfig.from_spec(spec))
    ex = example_reconstructions(trained.stacked, data, per_group=3)
    assert list(ex["losses"]) == ["l1", "l2"] and int(ex["seed"]) == 0
    pos = {int(i): k for k, i in enumerate(data.test_index)}
    rows = [pos[int(i)] for i in ex["index"]]
    assert (data.test_g[rows].numpy() == ex["group"]).all()
    assert np.bincount(ex["group"]).tolist() == [3] * len(data.names)
    x = data.test_x[rows]
    assert np.abs(ex["images"].astype(int) - np.round(x.numpy() * 255)).max() <= 1
    with torch.no_grad():
        for k, c in enumerate([0, 2]):  # l1/seed0, l2/seed0
            want = trained.stacked.module(c)(x).clamp(0, 1).numpy() * 255
            assert np.abs(ex["recon"][k].astype(float) - want).max() <= 1.0
    # per-image brightness and contrast agree with the groups' measured means
    described = data.describe().query("split == 'test'")
    for code, name in enumerate(data.names):
        mine = ex["test_group"] == code
        row = described[described["group"] == name].iloc[0]
        assert ex["test_brightness"][mine].astype(float).mean() == pytest.approx(row["brightness"], abs=1e-3)
        assert ex["test_contrast"][mine].astype(float).mean() == pytest.approx(row["contrast"], abs=1e-3)


def test_verdict_names_the_lowest_and_highest_error_group(saved):
    result, _ = saved
    bg = result.by_group()
    table = verdict_table(analyse(result)).set_index("loss")
    for loss, part in bg.groupby("loss"):
        assert table.loc[loss, "favours"] == str(part.loc[part["mse"].idxmin(), "group"])
        assert table.loc[loss, "worse group"] == str(part.loc[part["mse"].idxmax(), "group"])
    md = markdown_report(result, analyse(result))
    assert all(f"| {loss} |" in md for loss in result.spec.losses)


def _images(page: str) -> list[Image.Image]:
    return [
        Image.open(io.BytesIO(base64.b64decode(b64)))
        for b64 in re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    ]


def test_html_is_self_contained_with_every_figure(saved):
    result, _ = saved
    shares = pd.DataFrame(
        [
            {
                "loss": loss,
                "seed": s,
                "step": step,
                "epoch": 1,
                "group": g,
                "sample_share": 0.5,
                "projection_share": 0.5 + (0.1 if g == "0.3" else -0.1),
                "norm_share": 0.5,
                "output_share": 0.5,
            }
            for loss in result.spec.losses
            for s in range(2)
            for step in (0, 5, 10)
            for g in ("0.3", "0.9")
        ]
    )
    planted = dataclasses.replace(result, grad_shares=shares)
    page = html_report(planted, analyse(planted))
    assert not re.search(r"<script|<link|@import|url\(|https?:", page, re.I)
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    anchors = set(re.findall(r'id="([^"]*)"', page))  # links inside the page (each figure's full size) are fine
    assert sources and all(s.startswith("data:image/png;base64,") or s[1:] in anchors for s in sources)
    images = _images(page)
    assert (
        len(images) == 7
    )  # group error, frontier, over training, gradient shares, distributions, reconstructions, brightness/contrast
    assert all(im.format == "PNG" and 1000 <= im.width <= 1400 for im in images)
    assert page.index('id="answer"') < page.index("<table") < page.index('id="fig-group_error"')


@pytest.mark.slow
def test_figures_render_the_same_pixels_with_their_layout_solved_once(saved):
    """html_report's _png solves each figure's constrained layout once and fixes it (speed): the same PNG
    bytes as matplotlib's own savefig, which solves it twice."""
    result, _ = saved
    analysis = analyse(result)
    fast = {name: _png(fig) for name, fig in audit_figures(result, analysis).items()}
    for name, fig in audit_figures(result, analysis).items():
        assert fig.get_layout_engine() is not None
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=fig.dpi, metadata={"Software": None})
        assert base64.b64decode(fast[name]) == buf.getvalue(), name


@pytest.mark.slow
def test_frontier_is_one_answer_in_every_surface(saved):
    """The frontier's ratio and its interval are the verdict table's numbers, in report.md, report.html and
    summary.json alike; its overall error is the mean of samples.csv over seeds and images."""
    import json

    result, out = saved
    analysis = analyse(result)
    f, d = analysis.frontier.set_index("loss"), analysis.disparities.set_index("loss")
    assert list(f.index) == list(result.spec.losses) and f["pareto"].any()
    for col in ("ratio", "ratio_low", "ratio_high", "verdict"):
        assert list(f[col]) == list(d[col])
    means = result.ok_samples.groupby("loss", observed=True)["mse"].mean()
    np.testing.assert_allclose(f["overall"], means[f.index], rtol=1e-12)  # one mean of the same numbers
    summary = json.loads((out / "summary.json").read_text())
    assert [r["loss"] for r in summary["frontier"]] == list(f.index)
    listed = {r["loss"]: r for r in summary["disparities"]}
    for r in summary["frontier"]:  # the same numbers as summary.json's own verdict rows, and as the Analysis
        assert all(r[k] == listed[r["loss"]][k] for k in ("ratio", "ratio_low", "ratio_high", "verdict"))
        assert r["ratio"] == pytest.approx(d.loc[r["loss"], "ratio"], rel=1e-9)  # JSON keeps 10 significant digits
        assert r["pareto"] == bool(f.loc[r["loss"], "pareto"])
    md, page = markdown_report(result, analysis), html_report(result, analysis)
    section = md.split("## Fairness-accuracy frontier")[1].split("\n## ")[0]
    errors = error_table(analysis).set_index("loss")
    for row in frontier_table(analysis).itertuples(index=False):
        line = next(s for s in section.splitlines() if s.startswith(f"| {row.loss} |"))
        assert f"| {errors.loc[row.loss, 'worst/best']} |" in line  # the error table's worst/best, the same string
        assert f"| {row[4]} |" in line and line.endswith(f"| {row[6]} |")
    assert "<h2 id='frontier'>Fairness-accuracy frontier</h2>" in page and 'id="fig-frontier"' in page
    assert frontier_sentence(analysis) in md


@pytest.mark.slow
def test_cli_report_rerenders_from_saved_results(saved, tmp_path):
    _, out = saved
    proc = subprocess.run(
        [sys.executable, "-m", "fairrecon", "report", str(out), "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    page = (tmp_path / "report.html").read_text()
    assert len(_images(page)) == 7 and "worse group" in page  # the same seven figures, gradient shares included
    assert (tmp_path / "report.md").read_text().startswith("# fairrecon audit")
    assert "worst group" in proc.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "fairrecon", "report", str(tmp_path / "nothing")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "nothing: no such folder" in bad.stderr


def test_groups_separate_without_colour():
    styles = group_styles(["a", "b", "c", "d"])
    for attr in ("color", "marker", "hatch"):
        assert len({getattr(s, attr) for s in styles.values()}) == 4
    assert len({str(s.linestyle) for s in styles.values()}) == 4
    assert {s.hatch for s in styles.values()} <= set(HATCHES)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_plain_lines_when_not_a_terminal():
    stream = io.StringIO()
    with Progress(stream=stream) as p:
        for seed in (1, 2, 3):
            for e in range(1, 41):
                p.on_epoch(e, 40, seed, 3)
    lines = stream.getvalue().splitlines()
    assert 10 <= len(lines) <= 11 and all("ETA" in line for line in lines) and "\r" not in stream.getvalue()
    assert lines[-1].startswith("[fairrecon] seed 3/3, epoch 40/40 (100% of training)")


def test_progress_bars_on_a_terminal_and_nothing_when_quiet():
    tty = _Tty()
    with Progress(stream=tty) as p:
        for seed in (1, 2):
            for e in range(1, 6):
                p.on_epoch(e, 5, seed, 2)
    text = tty.getvalue()
    assert "\r" in text and "overall" in text and "10/10" in text and "seed 2/2" in text
    quiet = _Tty()
    with Progress(stream=quiet, quiet=True) as p:
        p.log("hello")
        p.on_epoch(1, 1)
    assert quiet.getvalue() == ""


def test_terminal_prints_the_headline_the_table_and_the_warnings():
    """Small data never looks sure: the terminal says "insufficient data" and why, not just a table."""
    from test_stats import simulate, synthetic_result

    from fairrecon.report import headline, terminal_summary

    values, codes = simulate(np.random.default_rng(0), seeds=3, n=(50, 12), means=(0.010, 0.030))
    analysis = analyse(synthetic_result({"l1": values, "l2": values * 1.01}, codes))
    text = terminal_summary(analysis)
    assert text.startswith(headline(analysis)) and "Insufficient data, no verdict: l1, l2" in text
    assert "Clear gap" not in text and "  clear gap" not in text  # a 3x gap, but 12 test images: not "clear"
    assert text.count("warning: l1: ") == text.count("warning: l2: ") == 1 and "warning: l1 vs l2: " in text
    assert "b (n=12): fewer than 30 test images" in text
    assert analysis.method in text
