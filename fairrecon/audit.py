"""Run an audit: data -> groups -> train every (loss, seed) cell -> per-sample errors.

`run_audit` is the one call behind `fairrecon audit`; notebooks use it directly:

    >>> from fairrecon import run_audit
    >>> result = run_audit(dataset="digits", seeds=3)
    >>> result.by_group()          # one row per (loss, group)
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from . import __version__
from .data import load_images
from .errors import UserError
from .gradshare import GradShareRecorder
from .groups import make_groups
from .losses import get_loss
from .measure import sample_errors, train_mse
from .results import AuditResult
from .spec import AuditSpec, load_spec
from .train import Cell, TrainConfig, train_cells


def resolve_device(name: str) -> torch.device:
    """'auto' takes CUDA when present; asking for CUDA without it is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but no CUDA GPU is available (torch.cuda.is_available() is False); "
                        "use --device cpu or auto")
    return torch.device(name)


def train_config(spec: AuditSpec) -> TrainConfig:
    fields = TrainConfig.__dataclass_fields__
    return TrainConfig(**{k: v for k, v in spec.to_dict().items() if k in fields})


def run_audit(spec: AuditSpec | str | Path | None = None, *, log: Callable[[str], None] | None = None,
              **overrides: Any) -> AuditResult:
    """Run the audit a spec (object or TOML path) describes, with keyword overrides."""
    if spec is None:
        spec = AuditSpec().replace(**overrides)
    elif isinstance(spec, (str, Path)):
        spec = load_spec(spec, **overrides)
    else:
        spec = spec.replace(**overrides)
    for name in spec.losses:
        get_loss(name)  # unknown names fail here, before any work
    device = resolve_device(spec.device)
    log = log or (lambda message: None)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    images = load_images(spec.dataset, spec.data_root, spec.download, spec.split_seed)
    timings["load_s"] = time.perf_counter() - t0
    data = make_groups(images, spec)
    timings["groups_s"] = time.perf_counter() - t0 - timings["load_s"]
    described = data.describe()
    log(f"{spec.dataset}: {len(data.train_x)} train / {len(data.test_x)} test images, groups {', '.join(data.names)}")

    cells = [Cell(loss, seed) for loss in spec.losses for seed in range(spec.seeds)]
    config = train_config(spec)
    log(f"training {len(cells)} cells ({len(spec.losses)} losses x {spec.seeds} seeds) on {device}")
    recorder = GradShareRecorder(data.names) if spec.grad_points > 0 else None
    trained = train_cells(data.train_x, data.train_g, cells, config, device, on_snapshot=recorder,
                          on_epoch=lambda e, n: log(f"epoch {e}/{n}"))
    timings["train_s"] = trained.seconds

    t1 = time.perf_counter()
    samples = sample_errors(trained.stacked, data, device)
    sigma = trained.stacked.sigma().cpu()
    fit_mse = train_mse(trained.stacked, data.train_x, device)
    last = trained.history.groupby(["loss", "seed"], sort=False).last().reset_index()
    cell_table = pd.DataFrame({
        "loss": [c.loss for c in cells], "seed": [c.seed for c in cells], "status": trained.status,
        "sigma": sigma.numpy(), "sigma_squared": (sigma**2).numpy(), "train_mse": fit_mse.numpy(),
        "train_nll": last["train_nll"].to_numpy(),
    })
    timings["measure_s"] = time.perf_counter() - t1
    timings["total_s"] = time.perf_counter() - t0
    info = {
        "fairrecon_version": __version__, "torch_version": torch.__version__, "python": platform.python_version(),
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "contrast_factor": data.contrast_factor,
        "train_config": asdict(config), "timings": timings,
    }
    result = AuditResult(spec, samples, cell_table, described, trained.history, info,
                         grad_shares=recorder.frame() if recorder else None)
    if spec.out:
        result.save(spec.out)
    return result
