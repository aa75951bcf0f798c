"""What training hands its measurement hooks (train.train_cells' `on_snapshot` and `on_eval`), so that the
hooks (gradshare.py, measure.py) need nothing from training itself."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .stacked import StackedCells


@dataclass
class Snapshot:
    """One training batch handed to a measurement hook (e.g. gradient shares) before the update."""

    step: int
    epoch: int
    stacked: StackedCells
    x: torch.Tensor  # (C, B, ...)
    group: torch.Tensor  # (C, B) group code of each sample
    eps: torch.Tensor | None = None  # VAEs: (C, B, latent), the noise this step's update uses
    weights: torch.Tensor | None = None  # (C, B): each sample's weight in its cell's objective (None: all erm)


@dataclass
class EvalPoint:
    """The cells at a curve point, handed to `on_eval` right after the update that ends `step`."""

    step: int  # updates done so far
    epoch: float  # step / steps per epoch
    stacked: StackedCells
    active: torch.Tensor  # (C,) bool: cells this point belongs to (with epochs="auto", stopped cells do not)
    train_mse: torch.Tensor  # (C, G): each group's mean per-sample training MSE over the batches since the last point
    val_mse: torch.Tensor | None = None  # (C, G): each group's validation MSE (epochs="auto"), else None
    weights: torch.Tensor | None = None  # (C, G): each group's weight in the cell's objective (GroupWeights)
