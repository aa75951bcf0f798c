"""The metric registry, the per-image metrics against independent computations, and the metric caveat."""

from __future__ import annotations

import ast
import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import FAST, REPO, run_cli
from skimage.metrics import structural_similarity
from torch import nn
from torchmetrics.functional.image import structural_similarity_index_measure

from fairrecon import metrics, run_audit, stats
from fairrecon.bymetric import by_metric
from fairrecon.cli import cli
from fairrecon.data import load_images
from fairrecon.errors import UserError
from fairrecon.external import audit_model
from fairrecon.groups import make_groups
from fairrecon.html_report import html_report
from fairrecon.measure import ssim_per_image
from fairrecon.outputs import save_results, summary_json
from fairrecon.report import headline, markdown_report, metric_caveat, terminal_summary
from fairrecon.results import AuditResult
from fairrecon.spec import AuditSpec

PACKAGE = REPO / "fairrecon"

# ---------------------------------------------------------------- the registry is the only list


def metric_offences(source: str) -> list[str]:
    """Where a module names metrics by itself instead of asking the registry: a literal collection of names
    bound to a METRIC* name (a second list or label table), or a metric compared with a literal name (a
    property decided by name, e.g. `metric != "psnr"` for "has no ratio"). Also every literal metric name
    passed as `metric=` or given as a `metric` default, which must be a registry name."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            named = [t.id for t in targets if isinstance(t, ast.Name) and "METRIC" in t.id.upper()]
            if named and isinstance(node.value, (ast.Tuple, ast.List, ast.Set, ast.Dict)):
                found.append(f"line {node.lineno}: {named[0]} is a literal list of its own")
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            about = any("metric" in (getattr(s, "id", None) or getattr(s, "attr", None) or "") for s in sides)
            literal = any(isinstance(s, ast.Constant) and isinstance(s.value, str) for s in sides) or any(
                isinstance(s, (ast.Tuple, ast.List, ast.Set)) for s in sides
            )
            if about and literal:
                found.append(f"line {node.lineno}: a metric compared with a literal name")
        elif isinstance(node, ast.keyword) and node.arg == "metric" and isinstance(node.value, ast.Constant):
            if node.value.value not in metrics.METRICS:
                found.append(f"line {node.lineno}: metric={node.value.value!r} is not a registry name")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args.args + node.args.kwonlyargs
            defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults
            defaults += node.args.kw_defaults
            for arg, default in zip(args, defaults):
                if arg.arg == "metric" and isinstance(default, ast.Constant) and default.value not in metrics.METRICS:
                    found.append(f"line {node.lineno}: default metric {default.value!r} is not a registry name")
    return found


def test_every_module_asks_the_registry_for_its_metrics():
    offences = {
        path.name: found
        for path in sorted(PACKAGE.glob("*.py"))
        if path.name != "metrics.py" and (found := metric_offences(path.read_text()))
    }
    assert not offences, offences
    # the checker is not vacuous: it finds each kind of second home the package had before the registry
    old = 'METRICS = ("mse", "mae")\nLABELS = 1\nif metric != "psnr": pass\ndef f(metric="ssim"): pass\n'
    assert len(metric_offences(old)) == 3
    # ... and the modules that name metrics get them from the registry, the same objects
    assert stats.METRICS is metrics.VERDICT_METRICS
    for command in ("audit", "report", "check"):
        option = next(p for p in cli.commands[command].params if p.name == "metric")
        assert tuple(option.type.choices) == metrics.VERDICT_METRICS, command


def test_the_registry_imports_no_torch_and_describes_every_metric():
    """metrics.py sits beneath everything (the CLI's --help lists its names without torch): it imports only
    the standard library and errors.py."""
    tree = ast.parse((PACKAGE / "metrics.py").read_text())
    imported = {
        (node.module or "") if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert imported == {"__future__", "dataclasses", "errors"}
    assert metrics.DEFAULT in metrics.VERDICT_METRICS
    for m in metrics.METRICS.values():
        assert m.label and m.definition and (m.verdicts or m.why_not)
        assert not (m.ratio and not m.higher_is_worse)  # a ratio of errors: worst / best, both >= 0
    assert metrics.get("psnr").direction == "higher is better" and not metrics.get("psnr").ratio
    with pytest.raises(UserError, match="unknown metric 'ssim'; allowed: mse, mae, psnr, nmse, ssim_error, rel_mse"):
        metrics.get("ssim")
    with pytest.raises(UserError, match="'nll' cannot carry a verdict: each loss is its own likelihood"):
        metrics.for_verdicts("nll")
    with pytest.raises(UserError, match="no PCA baseline for 'rel_mse'"):
        metrics.for_verdicts("rel_mse", adjusted=True)
    # `pca` says which metrics the PCA baseline scores: exactly those stats.pca_errors computes
    spec = AuditSpec(dataset="digits")
    baseline = stats.pca_errors(make_groups(load_images("digits"), spec), k=4)
    assert [m for m in baseline if m in metrics.METRICS] == [n for n, m in metrics.METRICS.items() if m.pca]


def test_the_docs_table_is_the_registry():
    """docs/metrics.md's table of metrics says what the registry says, row for row."""
    page = (REPO / "docs" / "metrics.md").read_text()
    rows = [line for line in page.splitlines() if line.startswith("| `")]
    expected = [
        f"| `{m.name}` | {m.label} | {m.direction} | {'yes' if m.ratio else 'no'} | "
        + ("yes (default)" if m.name == metrics.DEFAULT else "yes" if m.verdicts else "no")
        + " |"
        for m in metrics.METRICS.values()
    ]
    assert rows == expected


# ---------------------------------------------------------------- the per-image metrics


def skimage_ssim(x_hat: np.ndarray, x: np.ndarray) -> float:
    """scikit-image's SSIM of one (ch, H, W) pair, float64, with the image mirrored by 5 pixels first (numpy
    'reflect', torch's too): its windows over the mirrored image, cropped back to the image, are every pixel's
    window. Gaussian sigma 1.5 (11 taps), population covariances, data range 1: Wang et al.'s constants."""
    pad = ((0, 0), (5, 5), (5, 5))
    return structural_similarity(
        np.pad(x_hat, pad, mode="reflect"),
        np.pad(x, pad, mode="reflect"),
        data_range=1.0,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        channel_axis=0,
    )


def pca_reconstructions(train: torch.Tensor, x: torch.Tensor, k: int) -> torch.Tensor:
    """Rank-k PCA reconstructions of x (real, imperfect reconstructions; stats.pca_reconstruct)."""
    flat = stats.pca_reconstruct(train.flatten(1).double().numpy(), x.flatten(1).double().numpy(), k)
    return torch.from_numpy(flat).float().view(x.shape)


def test_ssim_matches_scikit_image_on_real_images(shared_datasets):
    digits = load_images("digits")
    fashion = load_images("fashion-mnist", shared_datasets)
    rgb = digits.test[:60].view(20, 3, 8, 8)  # three real digits as the channels of one colour image
    for name, train, x in (
        ("digits 8x8", digits.train, digits.test[:40]),
        ("fashion-mnist 28x28", fashion.train[:2000], fashion.test[:40]),
        ("colour 8x8", digits.train[:600].view(200, 3, 8, 8), rgb),
    ):
        x_hat = pca_reconstructions(train, x, k=4)
        ours = ssim_per_image(x_hat, x)
        # the images as channels of one (for speed) give torchmetrics' own per-image values, to the bit
        plain = structural_similarity_index_measure(x_hat, x, sigma=1.5, data_range=1.0, reduction="none")
        assert torch.equal(ours, plain), name
        ours = ours.double().numpy()
        theirs = np.array([skimage_ssim(a, b) for a, b in zip(x_hat.double().numpy(), x.double().numpy())])
        assert ours.shape == (len(x),) and ours.std() > 0.01, name  # imperfect, varied reconstructions
        np.testing.assert_allclose(ours, theirs, atol=3e-5, rtol=0, err_msg=name)  # float32 vs float64
        # the check tells SSIM definitions apart: scikit-image's own crop (windows inside the image only)
        # differs, on the images large enough to have one
        if x.shape[-1] >= 11:
            valid = [
                structural_similarity(
                    a, b, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, channel_axis=0
                )
                for a, b in zip(x_hat.double().numpy(), x.double().numpy())
            ]
            assert np.abs(ours - np.array(valid)).max() > 1e-3
    same = digits.test[:5]
    assert torch.allclose(ssim_per_image(same, same), torch.ones(5))  # a perfect reconstruction
    assert ssim_per_image(torch.rand(3, 1, 5, 5), torch.rand(3, 1, 5, 5)).isnan().all()  # no window fits


class Dim(nn.Module):
    """x_hat = 0.8 x: MSE = 0.04 mean(x^2), so rel_mse is 0.04 on every image (a closed form)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.8 * x


class PCA(nn.Module):
    """A rank-k linear autoencoder: the affine PCA of the training images."""

    def __init__(self, train: torch.Tensor, k: int):
        super().__init__()
        flat = train.flatten(1).double()
        self.register_buffer("mean", flat.mean(0).float())
        self.register_buffer("v", torch.linalg.svd(flat - flat.mean(0), full_matrices=False)[2][:k].float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x.flatten(1) - self.mean) @ self.v.T
        return (self.mean + z @ self.v).view(x.shape)


def test_relative_error_and_ssim_columns_by_hand():
    """samples.csv's rel_mse is MSE / the image's mean squared pixel and ssim_error is 1 - SSIM, each against
    a computation of its own (numpy in float64; scikit-image), for a user's model scored by audit_model."""
    spec = AuditSpec(dataset="digits")
    data = make_groups(load_images("digits", split_seed=spec.split_seed), spec)
    x = data.test_x.double().numpy()
    energy = (x.reshape(len(x), -1) ** 2).mean(1)
    assert energy.min() > metrics.QUANTISATION_VAR  # no floor in play: the closed forms hold exactly
    dim = audit_model(Dim(), spec).samples
    np.testing.assert_allclose(dim["rel_mse"], 0.04, rtol=1e-5)
    assert np.ptp(dim["mse"]) > 0.01  # while the absolute error varies with the image's brightness
    pca = PCA(data.train_x, k=6)
    samples = audit_model(pca, spec).samples
    with torch.no_grad():
        x_hat = pca(data.test_x).double().numpy()
    mse = ((x_hat - x) ** 2).reshape(len(x), -1).mean(1)
    np.testing.assert_allclose(samples["rel_mse"], mse / energy, rtol=1e-5)
    ssim = np.array([skimage_ssim(a, b) for a, b in zip(x_hat[:50], x[:50])])
    np.testing.assert_allclose(samples["ssim_error"][:50], 1 - ssim, atol=3e-5, rtol=0)
    # against the other reading of "relative": MSE / brightness^2 is a different number on these images
    assert np.abs(samples["rel_mse"] / (mse / x.reshape(len(x), -1).mean(1) ** 2) - 1).max() > 0.1


# ---------------------------------------------------------------- every metric side by side, and the caveat


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """A small real audit (digits, 3 seeds), saved to a folder."""
    out = tmp_path_factory.mktemp("audit")
    return run_audit(dataset="digits", **{**FAST, "seeds": 3}, out=str(out)), out


def planted(result: AuditResult, *, flip: bool) -> AuditResult:
    """`result` with every metric planted from one MSE per (cell, image): the bright group's 1.5x the dark
    group's. Each image's energy (mean squared pixel) is taken as 0.09 in the dark group and 0.81 in the bright
    one when `flip` (then rel_mse = mse / energy makes the dark group 6x worse), else 0.5 in both (all agree).
    Its curves are dropped: they belong to the real errors, and would judge whether the planted answer moved."""
    s = result.samples.copy()
    dark, bright = list(s["group"].cat.categories)
    rng = np.random.default_rng(0)
    per_image = pd.Series(rng.lognormal(np.log(0.003), 0.3, s["index"].nunique()), index=s["index"].unique())
    seed_effect = 1 + 0.02 * rng.standard_normal(len(s))
    mse = per_image.reindex(s["index"]).to_numpy() * seed_effect * np.where(s["group"] == bright, 1.5, 1.0)
    energy = np.where(s["group"] == bright, 0.81, 0.09) if flip else 0.5
    s = s.assign(
        mse=mse,
        mae=np.sqrt(mse),
        psnr=-10 * np.log10(mse),
        nmse=mse / 0.02,
        ssim_error=10 * mse,
        rel_mse=mse / energy,
    )
    return dataclasses.replace(result, samples=s, curves=None)  # planted: no curves say the answer still moved


def test_the_caveat_comes_first_on_every_surface_when_the_metrics_disagree(audited):
    result = planted(audited[0], flip=True)
    dark, bright = (str(g) for g in result.samples["group"].cat.categories)
    analysis = stats.analyse(result)
    compared = by_metric(result, analysis)
    losses = " and ".join([", ".join(analysis.losses[:-1]), analysis.losses[-1]])
    caveat = metric_caveat(compared)
    assert caveat == (
        f"Which group is worse depends on the metric: for {losses}, group {bright} is worse by mse, mae, psnr, "
        f"nmse and ssim_error but group {dark} by rel_mse (a clear gap each way for {losses}); the verdicts here "
        "are by mse (MSE per pixel)."
    )
    # the numbers behind it: rel_mse's ratio is the planted 1.5 x 0.81 / 0.09 = 6 ... up to the images drawn
    rows = compared.table.set_index(["metric", "loss"])
    means = result.samples.groupby(["loss", "group"], observed=True)["rel_mse"].mean()
    for loss in analysis.losses:
        assert rows.loc[("rel_mse", loss), "worse"] == dark and rows.loc[("mse", loss), "worse"] == bright
        assert rows.loc[("rel_mse", loss), "ratio"] == pytest.approx(means[loss, dark] / means[loss, bright])
        assert 5 < rows.loc[("rel_mse", loss), "ratio"] < 7.2
    terminal = terminal_summary(analysis, compared)
    assert terminal.splitlines()[0] == caveat
    md = markdown_report(result, analysis, compared)
    assert md.index(caveat) < md.index("Clear gap") < md.index("| loss |")
    page = html_report(result, analysis, compared)
    assert page.index('id="metric-caveat"') < page.index('class="headline"')
    assert page.index(caveat.replace("'", "&#x27;")) < page.index('class="headline"')
    record = json.loads(json.dumps(summary_json(result, analysis, compared), default=float))
    assert record["metric_caveat"] == caveat and list(record).index("metric_caveat") < list(record).index("verdict")
    section = record["metrics"]
    assert section["verdicts_by"] == "mse" and section["caveat"] == caveat and section["missing"] == []
    assert section["compared"] == list(metrics.VERDICT_METRICS)
    assert {(r["metric"], r["loss"]) for r in section["by_metric"]} == {
        (m, loss) for m in metrics.VERDICT_METRICS for loss in analysis.losses
    }
    # with the verdicts by rel_mse, its side comes first and the sentence ends with it
    by_rel = metric_caveat(by_metric(result, stats.analyse(result, metric="rel_mse")))
    assert by_rel.startswith(
        f"Which group is worse depends on the metric: for {losses}, group {dark} is worse by rel_mse but group "
        f"{bright} by mse, mae, psnr, nmse and ssim_error"
    ) and by_rel.endswith("the verdicts here are by rel_mse (MSE over the image's mean squared pixel).")
    # each metric's row is the verdict `--metric M` gives
    for m in metrics.VERDICT_METRICS:
        own = stats.analyse(result, metric=m).disparities.set_index("loss")
        for r in (r for r in section["by_metric"] if r["metric"] == m):
            assert r["verdict"] == own.loc[r["loss"], "verdict"] and r["worst"] == own.loc[r["loss"], "worst"]


def test_no_caveat_when_the_metrics_agree(audited):
    result = planted(audited[0], flip=False)
    analysis = stats.analyse(result, metric="rel_mse")  # the verdicts' metric is the user's choice
    compared = by_metric(result, analysis)
    assert compared.splits() == {} and metric_caveat(compared) is None
    first = terminal_summary(analysis, compared).splitlines()[0]  # no caveat: the headline is first
    assert first == headline(analysis) and "Clear gap" in first
    assert first.split(". ")[0].startswith(f"{analysis.contrasts['loss'].iloc[0]} is ")  # each loss against l2,
    assert f" than {analysis.reference_loss} by rel_mse: its worst/best rel_mse ratio is " in first  # in its metric
    assert "depends on the metric" not in markdown_report(result, analysis, compared)
    assert "metric-caveat" not in html_report(result, analysis, compared)
    record = summary_json(result, analysis, compared)
    assert record["metric_caveat"] is None and record["metrics"]["verdicts_by"] == "rel_mse"
    assert "Decided by rel_mse (MSE over the image's mean squared pixel)" in record["verdict"]


def test_old_results_folders_load_and_say_which_metrics_they_lack(audited, tmp_path, capsys):
    """A folder written before ssim_error and rel_mse existed (samples.csv without them, summary.json without
    the metrics section) still loads, reports and gates on the metrics it has; asking for a new one is a
    one-line error naming the file."""
    _, out = audited
    old = tmp_path / "old"
    old.mkdir()
    for path in out.iterdir():
        if path.is_file():
            (old / path.name).write_bytes(path.read_bytes())
    samples = pd.read_csv(old / "samples.csv")
    samples.drop(columns=["ssim_error", "rel_mse"]).to_csv(old / "samples.csv", index=False)
    record = json.loads((old / "summary.json").read_text())
    del record["metrics"], record["metric_caveat"]
    (old / "summary.json").write_text(json.dumps(record))
    result = AuditResult.load(old)
    assert result.metrics == ["mse", "mae", "psnr", "nmse"]
    compared = by_metric(result, stats.analyse(result))
    assert compared.compared == ("mse", "mae", "psnr", "nmse") and compared.missing == ("ssim_error", "rel_mse")
    code, stdout, _ = run_cli(capsys, "report", old, "--out", tmp_path / "reports")
    assert code == 0 and "Decided by mse" in stdout
    for argv in (("report", old, "--metric", "ssim_error"), ("check", old, "--metric", "rel_mse", "--max-ratio", "2")):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert (
            f"{old / 'samples.csv'} has no '{argv[3]}' column" in err and "metrics it has: mse, mae, psnr, nmse" in err
        )


def test_report_rerenders_with_the_metric_the_audit_chose(audited, tmp_path, capsys):
    """`audit --metric M --out DIR` then `report DIR` keeps the verdicts by M (summary.json says which);
    `report --metric` picks another."""
    result, _ = audited
    out = tmp_path / "by-ssim"
    save_results(result, out, stats.analyse(result, metric="ssim_error"))
    assert json.loads((out / "summary.json").read_text())["metrics"]["verdicts_by"] == "ssim_error"
    code, stdout, _ = run_cli(capsys, "report", out)
    assert code == 0 and "Decided by ssim_error (structural error 1 - SSIM)" in stdout
    assert "Per-group structural error 1 - SSIM" in (out / "report.md").read_text()
    code, stdout, _ = run_cli(capsys, "report", out, "--metric", "mae", "--json")
    assert code == 0 and {r["metric"] for r in json.loads(stdout)["disparities"]} == {"mae"}
