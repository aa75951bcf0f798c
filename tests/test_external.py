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
from torch import nn

from conftest import REPO
from fairrecon import external
from fairrecon.cli import main
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


def _main(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_state_dict_with_factory_gives_the_same_per_sample_errors(factory_module, tmp_path):
    weights = tmp_path / "dim.pt"
    torch.save({"scale": torch.tensor(0.8)}, weights)
    model = external.load_model(weights, "usermodels:build")
    spec = AuditSpec(dataset="digits")
    result = external.audit_model(model, spec, name="model")
    data = make_groups(load_images("digits", split_seed=spec.split_seed), spec)
    expected = ((0.8 * data.test_x - data.test_x) ** 2).flatten(1).mean(1)  # independent: 0.04 x^2
    torch.testing.assert_close(torch.tensor(result.samples["mse"].to_numpy()), expected, rtol=1e-5, atol=0)
    assert list(result.samples.columns) == ["loss", "seed", "group", "index", "mse", "mae", "psnr", "nmse"]
    assert (result.samples["index"].to_numpy() == data.test_index.numpy()).all()


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "pwned"
    for name, save in (("zip.pt", lambda obj, f: torch.save(obj, f)),
                       ("legacy.pkl", lambda obj, f: f.write_bytes(pickle.dumps(obj)))):
        path = tmp_path / name
        save({"weight": Evil(str(marker))}, path)
        with pytest.raises(UserError) as info:
            external.load_state_dict(path)
        assert "\n" not in str(info.value) and "refused" in str(info.value)
        assert not marker.exists()
        code, out, err = _main(capsys, "check", "--weights", path, "--model-factory", "usermodels:build",
                               "--max-ratio", "2")
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


def test_factory_through_the_real_cli(factory_module, tmp_path):
    weights = tmp_path / "dim.pt"
    torch.save({"scale": torch.tensor(0.5)}, weights)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(factory_module), str(REPO)])}
    run = subprocess.run([sys.executable, "-m", "fairrecon", "check", "--weights", str(weights), "--model-factory",
                          "usermodels:build", "--max-gap", "0.001"], cwd=REPO, capture_output=True, text=True,
                         env=env, timeout=300)
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
