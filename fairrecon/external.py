"""Audit a user's already-trained autoencoder, without training: load it safely, reconstruct
the spec's test images, and build the same per-sample table an audit builds.

Three ways in, none of which unpickles arbitrary objects:
  * a state_dict file plus `--model-factory package.module:function` (a function or class,
    called with no arguments, returning the nn.Module): read with torch.load(weights_only=True),
    which refuses any pickle that would build objects other than tensors and containers;
  * a TorchScript file (torch.jit.save) or a torch.export file (torch.export.save): a graph
    and its weights, no Python pickles of user classes.
"""

from __future__ import annotations

import importlib
import os
import pickle
import sys
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from .errors import UserError
from .measure import sample_errors
from .results import AuditResult
from .spec import AuditSpec
from .train import Cell, resolve_device


def load_factory(target: str):
    """'package.module:function' -> the callable (the current folder is importable, as with python -m)."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise UserError(f"--model-factory '{target}' must look like package.module:function")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"--model-factory: cannot import '{module_name}' ({e})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise UserError(f"--model-factory: module '{module_name}' has no attribute '{attr}'") from None


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict (name -> tensor) read with weights_only=True; anything else is a one-line UserError."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: weights file not found") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, OSError) as e:
        raise UserError(f"{path}: refused to load (not a plain state_dict of tensors; "
                        f"torch.load weights_only=True says: {_brief(e)})") from None
    if not isinstance(state, Mapping) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise UserError(f"{path}: not a state_dict (expected a dict of parameter name -> tensor, "
                        f"got {type(state).__name__}); save with torch.save(model.state_dict(), FILE)")
    return dict(state)


def load_model(weights: str | Path, factory: str | None = None) -> nn.Module:
    """The user's model: factory + state_dict, or a TorchScript / torch.export file (factory None)."""
    weights = Path(weights)
    if not weights.is_file():
        raise UserError(f"{weights}: model file not found")
    if factory is not None:
        state = load_state_dict(weights)
        build = load_factory(factory)
        try:
            model = build()
        except Exception as e:  # the user's own code: report it in one line
            raise UserError(f"--model-factory {factory}: calling it failed ({type(e).__name__}: {e})") from None
        if not isinstance(model, nn.Module):
            raise UserError(f"--model-factory {factory} returned {type(model).__name__}, not a torch.nn.Module")
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise UserError(f"{weights}: does not fit the factory's model ({_brief(e)})") from None
        return model.eval()
    if not zipfile.is_zipfile(weights):
        raise UserError(f"{weights}: not a TorchScript or torch.export archive; for a state_dict "
                        "also pass --model-factory package.module:function")
    with zipfile.ZipFile(weights) as z:
        names = z.namelist()
    if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
        try:
            with warnings.catch_warnings():  # TorchScript is deprecated upstream, but users still hold such files
                warnings.filterwarnings("ignore", message=".*torch.jit.load.* deprecated", category=FutureWarning)
                return torch.jit.load(str(weights), map_location="cpu").eval()
        except RuntimeError as e:
            raise UserError(f"{weights}: not a loadable TorchScript file ({_brief(e)})") from None
    try:
        return torch.export.load(str(weights)).module()
    except Exception as e:  # torch.export raises assorted types for a foreign archive
        raise UserError(f"{weights}: neither TorchScript nor torch.export ({_brief(e)}); for a "
                        "state_dict also pass --model-factory package.module:function") from None


def _brief(e: BaseException, width: int = 160) -> str:
    """An exception as one short line: its first non-empty line that says something."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    informative = [line for line in lines if not line.lower().startswith(("weights only load failed", "error(s) in"))]
    return ((informative or lines or [type(e).__name__])[0])[:width]


class _OneModel:
    """Duck-types train.StackedCells for measure.sample_errors: one cell, the user's model."""

    def __init__(self, model: nn.Module, name: str):
        self.model, self.cells = model, [Cell(name, 0)]

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        parts = []
        for i in range(0, len(x), chunk):
            xb = x[i:i + chunk]
            out = self.model(xb)
            if not isinstance(out, torch.Tensor) or out.numel() != xb.numel():
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise UserError(f"the model maps images {tuple(xb.shape)} to {got}; an autoencoder must "
                                "return a tensor of the same shape")
            parts.append(out.reshape(xb.shape).float())
        return torch.cat(parts)[None]  # (1, N, ...)


def audit_model(model: nn.Module, spec: AuditSpec, name: str = "model", device: str = "cpu") -> AuditResult:
    """Score a trained autoencoder on the spec's grouped test images: an AuditResult with one cell."""
    from .data import load_images
    from .groups import make_groups

    dev = resolve_device(device)
    spec = spec.replace(losses=(name,), seeds=1)
    images = load_images(spec.dataset, spec.data_root, spec.download, spec.split_seed, skip_bad=spec.skip_bad_images)
    data = make_groups(images, spec)
    samples = sample_errors(_OneModel(model.to(dev), name), data, dev)
    cells = pd.DataFrame({"loss": [name], "seed": [0], "status": ["ok"]})
    history = pd.DataFrame(columns=["loss", "seed", "epoch", "train_nll", "train_mse"])
    info = {"external_model": name, "device": str(dev)}
    return AuditResult(spec, samples, cells, data.describe(), history, info)
