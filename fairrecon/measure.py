"""Per-sample reconstruction errors on held-out images, as a long DataFrame.

One row per (loss, seed, test image): the unit every later statistic resamples.
"""

from __future__ import annotations

import pandas as pd
import torch

from .groups import GroupedData
from .train import StackedCells

PSNR_FLOOR_MSE = 1e-10  # a perfect reconstruction reads as 100 dB rather than infinity


@torch.no_grad()
def sample_errors(stacked: StackedCells, data: GroupedData, device: torch.device | str = "cpu") -> pd.DataFrame:
    """MSE, MAE (per pixel) and PSNR (data range 1) of every test image under every cell."""
    x = data.test_x.to(device)
    residual = (stacked.reconstruct(x) - x).flatten(2)  # (C, N, M)
    mse = residual.pow(2).mean(2).cpu()
    mae = residual.abs().mean(2).cpu()
    psnr = -10.0 * torch.log10(mse.clamp_min(PSNR_FLOOR_MSE))
    names = pd.Categorical.from_codes(data.test_g.cpu().numpy(), categories=list(data.names))
    frames = [
        pd.DataFrame({"loss": cell.loss, "seed": cell.seed, "group": names, "index": data.test_index.numpy(),
                      "mse": mse[c].numpy(), "mae": mae[c].numpy(), "psnr": psnr[c].numpy()})
        for c, cell in enumerate(stacked.cells)
    ]
    return pd.concat(frames, ignore_index=True)


@torch.no_grad()
def train_mse(stacked: StackedCells, x: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """Each cell's MSE per pixel over the whole training set (C,), to set beside its learned sigma^2."""
    x = x.to(device)
    return (stacked.reconstruct(x) - x).pow(2).flatten(2).mean(dim=(1, 2)).cpu()
