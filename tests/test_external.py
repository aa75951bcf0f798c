"""Auditing a user's trained model: safe loading, the same per-sample table, the gate on top."""

from __future__ import annotations

import builtins
import os
import pickle
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from conftest import REPO
from conftest import run_cli as _main
from torch import nn

from fairrecon import external
from fairrecon.data import load_images
from fairrecon.errors import UserError
from fairrecon.groups import make_groups
from fairrecon.spec import AuditSpec

FACTORY = textwrap.dedent("""
    import torch
    from torch import nn

    class Dim(nn.Module):
        '''Scales every pixel: error grows with brightness, so the 0.9 group fares worse.'''
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(1.0))

        def forward(self, x):
            return x * self.scale

    def build():
        return Dim()
""")


class Evil:
    """Unpickling this opens (creates) a file: what a malicious checkpoint would do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return builtins.open, (self.path, "w")


class Gray(nn.Module):
    def forward(self, x):
        return torch.full_like(x, 0.5)


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    (tmp_path / "usermodels.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("usermodels", None)
    return tmp_path


def test_state_dict_with_factory_gives_the_same_per_sample_errors(factory_module, tmp_path):
    weights = tmp_path / "dim.pt"
    torch.save({"scale": torch.tensor(0.8)}, weights)
    model = external.load_model(weights, "usermodels:build")
    spec = AuditSpec(dataset="digits")
    result = external.audit_model(model, spec, name="model")
    data = make_groups(load_images("digits", split_seed=spec.split_seed), spec)
    expected = ((0.8 * data.test_x - data.test_x) ** 2).flatten(1).mean(1)  # independent: 0.04 x^2
    torch.testing.assert_close(torch.tensor(result.samples["mse"].to_numpy()), expected, rtol=1e-5, atol=0)
    assert list(result.samples.columns) == [
        "loss",
        "seed",
        "group",
        "index",
        "mse",
        "mae",
        "psnr",
        "nmse",
        "ssim_error",
        "rel_mse",
        "pred_scale",
        "nll",
        "kl",
    ]
    assert result.samples["pred_scale"].isna().all()  # a user's model predicts no per-pixel scale
    assert result.samples[["nll", "kl"]].isna().all().all()  # a VAE's columns, empty here: samples.csv has one schema
    assert (result.samples["index"].to_numpy() == data.test_index.numpy()).all()


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "pwned"
    for name, save in (
        ("zip.pt", lambda obj, f: torch.save(obj, f)),
        ("legacy.pkl", lambda obj, f: f.write_bytes(pickle.dumps(obj))),
    ):
        path = tmp_path / name
        save({"weight": Evil(str(marker))}, path)
        with pytest.raises(UserError) as info:
            external.load_state_dict(path)
        assert "\n" not in str(info.value) and "refused" in str(info.value)
        assert not marker.exists()
        code, out, err = _main(
            capsys, "check", "--weights", path, "--model-factory", "usermodels:build", "--max-ratio", "2"
        )
        assert code == 2 and err.count("\n") == 1 and "refused" in err
        assert not marker.exists()
    # the check is real: plain unpickling of the same file does create it
    with open(tmp_path / "legacy.pkl", "rb") as f:
        pickle.load(f)["weight"].close()
    assert marker.exists()


@pytest.mark.parametrize("obj", [[1, 2, 3], torch.zeros(3), {"a": 1}, {}])
def test_not_a_state_dict(tmp_path, obj):
    path = tmp_path / "thing.pt"
    torch.save(obj, path)
    with pytest.raises(UserError, match="not a state_dict") as info:
        external.load_state_dict(path)
    assert "\n" not in str(info.value)


def test_factory_and_file_mistakes(factory_module, tmp_path):
    weights = tmp_path / "w.pt"
    torch.save({"other": torch.tensor(1.0)}, weights)
    with pytest.raises(UserError, match="does not fit"):
        external.load_model(weights, "usermodels:build")
    with pytest.raises(UserError, match="package.module:function"):
        external.load_model(weights, "usermodels")
    with pytest.raises(UserError, match="no attribute"):
        external.load_model(weights, "usermodels:nothing")
    with pytest.raises(UserError, match="cannot import"):
        external.load_model(weights, "no_such_module_here:build")
    with pytest.raises(UserError, match="also pass --model-factory"):
        external.load_model(tmp_path / "w.pt")  # a state_dict without a factory
    (tmp_path / "junk.bin").write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a TorchScript"):
        external.load_model(tmp_path / "junk.bin")


def test_torchscript_model_through_check(tmp_path, capsys):
    """A constant-gray model: error is (x - 0.5)^2, much larger for the 0.9 group: the gate fails."""
    path = tmp_path / "gray.ts"
    with warnings.catch_warnings():  # torch.jit.script is deprecated, but users still hold TorchScript files
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(Gray()), str(path))
    code, out, err = _main(capsys, "check", "--weights", path, "--dataset", "digits", "--max-ratio", "1.2")
    assert code == 1 and "group 0.9 vs 0.3" in out, out + err
    code, out, err = _main(capsys, "check", "--weights", path, "--max-ratio", "100")
    assert code == 0, out + err


def test_torch_export_model_loads_and_reconstructs(tmp_path):
    path = tmp_path / "gray.pt2"
    batch = torch.export.Dim("batch")
    program = torch.export.export(Gray(), (torch.rand(2, 1, 8, 8),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    model = external.load_model(path)
    x = torch.rand(5, 1, 8, 8)
    torch.testing.assert_close(model(x), torch.full_like(x, 0.5))


@pytest.mark.slow
def test_factory_through_the_real_cli(factory_module, tmp_path):
    weights = tmp_path / "dim.pt"
    torch.save({"scale": torch.tensor(0.5)}, weights)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(factory_module), str(REPO)])}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "fairrecon",
            "check",
            "--weights",
            str(weights),
            "--model-factory",
            "usermodels:build",
            "--max-gap",
            "0.001",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert "FAIL model: group 0.9 vs 0.3" in run.stdout


def test_an_external_models_result_saves_and_loads(tmp_path):
    """Saving an external model's result used to fail ("unknown loss 'model'"): it has no likelihood."""
    from fairrecon import AuditResult, save_results

    result = external.audit_model(Gray(), AuditSpec(dataset="digits"), name="model")
    save_results(result, tmp_path / "ext")
    again = AuditResult.load(tmp_path / "ext")
    assert list(again.cells["loss"]) == ["model"]
    assert "(external model)" in (tmp_path / "ext" / "report.md").read_text()


# --- issue 10, item 8: exports with a fixed batch, quiet loading, one line on failure, seen test images ---


class Shrink(nn.Module):
    """A linear autoencoder on 8x8 images whose output depends on each image alone."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc, self.dec = nn.Linear(64, 6), nn.Linear(6, 64)

    def forward(self, x):
        return self.dec(self.enc(x.reshape(x.shape[0], 64))).reshape(x.shape)


def test_an_export_with_a_fixed_batch_of_2_is_run_at_that_batch(tmp_path, capsys):
    """The issue's failure: a torch.export file saved with a fixed batch of 2 gave a traceback and exit 1."""
    eager = Shrink().eval()
    path = tmp_path / "fixed.pt2"
    torch.export.save(torch.export.export(eager, (torch.rand(2, 1, 8, 8),)), str(path))
    model = external.load_model(path)
    assert isinstance(model, external.FixedBatch) and model.batch == 2
    spec = AuditSpec(dataset="digits")
    result = external.audit_model(model, spec)
    data = make_groups(load_images("digits"), spec)
    assert len(data.test_x) % 2 == 1  # the last batch is padded
    with torch.no_grad():
        expected = ((eager(data.test_x) - data.test_x) ** 2).flatten(1).mean(1)  # independent: the eager model
    torch.testing.assert_close(
        torch.tensor(result.samples["mse"].to_numpy()), expected, rtol=1e-5, atol=1e-9
    )  # float32 kernels may differ between export and eager
    code, out, err = _main(capsys, "check", "--weights", path, "--max-ratio", "100")
    assert code == 0 and out.startswith("pass:") and err == "", err


def test_loading_is_quiet_and_a_failure_names_each_format_tried(tmp_path):
    path = tmp_path / "gray.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(Gray()), str(path))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        external.load_model(path)
    assert seen == []
    import zipfile

    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("archive/notes.txt", "not a model")
    with pytest.raises(UserError) as info:
        external.load_model(tmp_path / "other.zip")
    message = str(info.value)
    assert "\n" not in message and "TorchScript: " in message and "; torch.export: " in message


def test_a_model_that_does_not_fit_the_images_is_one_line(tmp_path, capsys):
    path = tmp_path / "fixed.pt2"
    torch.export.save(torch.export.export(Shrink(), (torch.rand(2, 1, 8, 8),)), str(path))
    code, out, err = _main(
        capsys, "check", "--weights", path, "--dataset", "mnist", "--data-root", str(tmp_path), "--max-ratio", "2"
    )
    assert code == 2 and err.count("\n") == 1  # no MNIST here: the data error comes first, as one line


def faces(root, n=300):
    """n small grey images, half dark and half bright, and a labels CSV of the two groups."""
    import numpy as np
    from PIL import Image

    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = ["file,group"]
    for i in range(n):
        base = 60 if i < n // 2 else 190
        Image.fromarray(np.clip(base + rng.normal(0, 20, (8, 8)), 0, 255).astype(np.uint8)).save(
            root / "images" / f"face_{i:03d}.png"
        )
        rows.append(f"face_{i:03d}.png,{'darker' if i < n // 2 else 'brighter'}")
    (root / "groups.csv").write_text("\n".join(rows) + "\n")
    return root


def test_check_with_labels_uses_them_and_warns_about_seen_test_images(tmp_path, capsys):
    """The issue's failure: `check --weights ... --labels` ignored the labels and built brightness groups."""
    path = tmp_path / "gray.pt2"
    torch.export.save(torch.export.export(Gray(), (torch.rand(2, 1, 8, 8),)), str(path))
    data = ["--dataset", "folder", "--data-root", tmp_path / "images", "--labels", tmp_path / "groups.csv"]
    faces(tmp_path)  # 300 images: 20% held out is 30 per group, the gate's minimum
    code, out, err = _main(capsys, "check", "--weights", path, *data, "--max-gap", "1")
    assert "group darker vs brighter" in out or "group brighter vs darker" in out, out + err
    assert "0.9" not in out and "note: the model is scored on 60 held-out images" in err
    code, out, err = _main(capsys, "split", *data)
    (tmp_path / "split.csv").write_text(out)
    test_files = [line.split(",")[0] for line in out.splitlines() if line.endswith(",test")]
    assert len(test_files) == 60 and "240 train, 60 test, 0 unused" in err
    code, out, err = _main(
        capsys, "check", "--weights", path, *data, "--max-gap", "1", "--trained-on", tmp_path / "split.csv"
    )
    assert "warning" not in err  # trained on the train rows only: nothing seen
    (tmp_path / "mine.csv").write_text("file\n" + "\n".join(test_files[:3]) + "\n")
    for trained_on, seen in ((tmp_path / "mine.csv", 3), ("all", 60)):
        args = ["check", "--weights", path, *data, "--max-gap", "1", "--trained-on", trained_on]
        code, out, err = _main(capsys, *args)  # the gate refuses to judge on images the model trained on
        assert code == 2 and f"trained on {seen} of the test images" in err and "--allow-trained-on-test" in err
        code, out, err = _main(capsys, *args, "--allow-trained-on-test")
        assert f"warning: the model was trained on {seen} of the 60 test images it is scored on" in err
