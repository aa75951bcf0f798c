"""Generation shares: a planted case (a VAE trained on one group only generates that group), the group
assignment against a brute-force nearest target, the labelled-group classifier's reported accuracy against
an independent count, and the shares reaching summary.json and both reports the same."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

from fairrecon.audit import run_audit
from fairrecon.data import load_images
from fairrecon.generate import Assigner, GroupClassifier, generated_shares, nearest_target
from fairrecon.grid import Cell, TrainConfig
from fairrecon.groups import make_groups
from fairrecon.report import vae_terminal
from fairrecon.spec import AuditSpec
from fairrecon.train import train_cells

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one intra-op thread


def test_nearest_target_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    brightness = torch.rand(3, 500, generator=gen) * 1.4 - 0.2  # also outside [0, 1]: linear decoders go there
    targets = (0.3, 0.9, 0.5, 0.1)
    got = nearest_target(brightness, targets)
    want = [[min(range(len(targets)), key=lambda k: abs(b - targets[k])) for b in row] for row in brightness.tolist()]
    assert got.tolist() == want


@pytest.mark.slow
@pytest.mark.parametrize("labelled", [False, True], ids=["nearest-target", "classifier"])
@pytest.mark.parametrize("only", [0, 1])
def test_a_vae_trained_on_one_group_only_generates_that_group(only, labelled):
    """Planted: train a VAE on the digits images of one brightness group only; decoded prior samples are then
    (nearly) all of that group. Trained long enough to fit the brightness: at 15 epochs l1's reconstructions still
    averaged 0.79 for 0.9 images and 9.5% of its decodes fell nearer 0.3; at 40 its decodes' 1st percentile of
    brightness was 0.87. The bound 0.95 leaves room for a few odd decodes and fails if the assignment or the
    decoding were wrong (a swapped group gives ~0)."""
    spec = AuditSpec(model="vae", latent=8, hidden=64, epochs=40, batch_size=64, grad_points=0)
    data = make_groups(load_images("digits"), spec)
    if labelled:  # the same groups without their targets: assigned by the classifier, as labelled groups are
        data = dataclasses.replace(data, targets=None)
    x = data.train_x[data.train_g == only]
    trained = train_cells(
        x, torch.zeros(len(x), dtype=torch.long), [Cell("l1", 0), Cell("l2", 0)], TrainConfig.from_spec(spec)
    )
    assign = Assigner.for_data(data)
    assert (assign.classifier is not None) == labelled
    shares = generated_shares(trained.stacked, assign, 1000)
    mine = shares[shares["group"] == data.names[only]]
    assert (mine["generated_share"] > 0.95).all(), shares
    if (
        not labelled
    ):  # and they look like the group: their mean pixel near its target (l1 decodes: 0.87 at the 1st percentile)
        assert ((mine["brightness"] - spec.targets[only]).abs() < 0.05).all(), shares
    assert (shares.groupby(["loss", "seed"])["n"].sum() == 1000).all()


def test_group_classifier_accuracy_is_an_independent_count():
    """Labelled groups: the classifier's reported held-out accuracy equals a plain count of its correct
    predictions on the test images, and its chance level is the largest group's test share."""
    data = make_groups(load_images("digits"), AuditSpec())
    clf = GroupClassifier.fit(data)
    pred = clf.predict(data.test_x[None])[0]
    assert clf.accuracy == pytest.approx((pred == data.test_g).double().mean().item(), abs=1e-12)
    assert clf.chance == pytest.approx(max((data.test_g == g).double().mean().item() for g in range(2)), abs=1e-12)
    assert clf.accuracy > 0.95 and not clf.near_chance  # brightness groups are easy to tell apart
    # groups drawn at random say nothing about the image: the classifier is near chance, and the audit warns
    shuffled = torch.randperm(len(data.train_g), generator=torch.Generator().manual_seed(0))
    noise = dataclasses.replace(data, targets=None, train_g=data.train_g[shuffled])
    assign = Assigner.for_data(noise)
    assert assign.classifier.near_chance and "not reliable" in assign.warning()
    assert assign.record()["near_chance"] and "PCA components" in assign.record()["method"]


def test_audit_reports_generated_share_and_kl_everywhere(tmp_path):
    """summary.json, report.md and report.html say the same per-group KL and generated_share; autoencoders
    have empty nll/kl columns and no VAE section."""
    result = run_audit(
        dataset="digits",
        model="vae",
        limit=300,
        test_limit=100,
        seeds=2,
        epochs=2,
        losses=("l1",),
        generate=200,
        grad_points=4,
        out=str(tmp_path),
    )
    summary = json.loads((tmp_path / "summary.json").read_text())["vae"]
    assert summary["generation"]["n"] == 200 and summary["beta"] == 1.0
    by_group = result.vae_by_group()
    gen = result.generated
    assert len(gen) == 2 * 2 and (gen.groupby("seed")["n"].sum() == 200).all()
    for row, saved in zip(by_group.to_dict("records"), summary["by_group"]):
        assert saved["generated_share"] == pytest.approx(row["generated_share"])
        assert saved["kl"] == pytest.approx(row["kl"])
        want = result.samples[result.samples["group"] == row["group"]].groupby("seed")["kl"].mean().mean()
        assert row["kl"] == pytest.approx(want)  # mean over seeds of per-seed group means, recomputed
    md = (tmp_path / "report.md").read_text()
    html = (tmp_path / "report.html").read_text()
    for row in by_group.to_dict("records"):
        shown = f"{round(row['generated_share'], 4):g}"
        assert re.search(rf"\| l1 \| {re.escape(row['group'])} \|.*\| {re.escape(shown)} \|", md)
        assert f"<td>{shown}</td>" in html or f">{shown}<" in html
    assert summary["kl_weight"] and all(r["kl_weight_first"] > 0 for r in summary["kl_weight"])
    text = vae_terminal(result).splitlines()  # the terminal prints the same table, parsed back here
    header = text[1].split()
    rows = [dict(zip(header, line.split())) for line in text[2 : 2 + len(by_group)]]
    for row, printed in zip(by_group.to_dict("records"), rows):
        assert [printed["loss"], printed["group"]] == ["l1", row["group"]]
        for column in ("kl", "generated_share", "generated_brightness"):  # printed to 4 decimals
            assert float(printed[column]) == pytest.approx(row[column], abs=5e-5)
    ae = run_audit(dataset="digits", limit=300, test_limit=100, seeds=1, epochs=1, losses=("l1",), grad_points=0)
    assert ae.samples[["nll", "kl"]].isna().all().all() and ae.vae_by_group() is None and ae.generated is None
