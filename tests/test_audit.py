"""End-to-end audits on real data, checked against independent recomputations."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import FAST

from fairrecon import AuditResult, run_audit
from fairrecon.data import load_images
from fairrecon.groups import make_groups

pytestmark = pytest.mark.slow  # Fashion-MNIST audits, and a default-length digits audit


@pytest.fixture(scope="module")
def fashion(shared_datasets, tmp_path_factory):
    out = tmp_path_factory.mktemp("fashion")
    # one thread: a cell trained with others equals the cell trained alone to the bit only at one thread (at two,
    # the stacked matmuls split their sums by the number of cells: 1.6% per-image MSE apart after 3 epochs)
    result = run_audit(
        dataset="fashion-mnist",
        data_root=str(shared_datasets),
        limit=1200,
        test_limit=600,
        out=str(out),
        threads=1,
        **FAST,
    )
    return result, out


def test_per_group_means_agree_with_a_recomputation_from_the_saved_samples(fashion):
    result, out = fashion
    samples = pd.read_csv(out / "samples.csv")
    assert {"loss", "seed", "group", "index", "mse", "mae", "psnr"} <= set(samples.columns)
    summary = json.loads((out / "summary.json").read_text())
    for row in summary["by_group"]:
        per_seed = [
            samples[
                (samples["loss"] == row["loss"])
                & (samples["seed"] == s)
                & (samples["group"].astype(str) == row["group"])
            ]["mse"]
            .to_numpy()
            .mean()
            for s in range(FAST["seeds"])
        ]
        assert row["mse"] == pytest.approx(np.mean(per_seed), rel=1e-6)
        assert row["mse_seed_std"] == pytest.approx(np.std(per_seed, ddof=1), rel=1e-5)


def test_per_sample_errors_match_the_cell_model_run_by_hand(fashion, shared_datasets):
    """Rebuild the groups from the saved spec and run one saved cell model as a plain nn.Module."""
    result, _ = fashion
    data = make_groups(load_images("fashion-mnist", shared_datasets), result.spec)
    assert data.test_index.tolist() == result.samples.query("loss == 'l1' and seed == 0")["index"].tolist()
    rerun = run_audit(result.spec.replace(out=None, losses=("l2",), seeds=1), threads=1)
    assert np.array_equal(
        rerun.samples["mse"].to_numpy(), result.samples.query("loss == 'l2' and seed == 0")["mse"].to_numpy()
    )  # bit-identical on CPU
    from fairrecon.grid import Cell, TrainConfig
    from fairrecon.runners import one_thread
    from fairrecon.train import train_cells

    with one_thread():
        trained = train_cells(data.train_x, data.train_g, [Cell("l2", 0)], TrainConfig.from_spec(result.spec))
    model = trained.stacked.module(0)
    with torch.no_grad():
        residual = (model(data.test_x) - data.test_x).flatten(1)
    mse = residual.pow(2).mean(1).numpy()
    np.testing.assert_allclose(result.samples.query("loss == 'l2' and seed == 0")["mse"], mse, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(
        result.samples.query("loss == 'l2' and seed == 0")["psnr"], -10 * np.log10(mse), rtol=1e-4
    )


def test_every_cell_is_measured_on_the_same_test_images(fashion):
    result, _ = fashion
    by_cell = result.samples.groupby(["loss", "seed"])["index"].apply(tuple)
    assert by_cell.nunique() == 1 and len(by_cell) == 4 * FAST["seeds"]


def test_results_folder_round_trips(fashion):
    result, out = fashion
    again = AuditResult.load(out)
    assert again.spec == result.spec
    pd.testing.assert_frame_equal(again.by_group(), result.by_group(), check_dtype=False, check_categorical=False)


def test_learned_sigma_squared_tracks_the_training_mse():
    """The learned-sigma NLL is minimised at sigma^2 = MSE; after training the two should be close."""
    result = run_audit(losses=("learned-sigma",), seeds=1, device="cpu")  # default digits, default epochs
    cell = result.cells.iloc[0]
    assert cell["status"] == "ok"
    assert cell["sigma_squared"] == pytest.approx(cell["train_mse"], rel=0.15)
