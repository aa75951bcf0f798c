"""Per-sample reconstruction errors on held-out images, as a long DataFrame.

One row per (loss, seed, test image): the unit every later statistic resamples.
"""

from __future__ import annotations

import numpy as np
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


EXAMPLES_PER_GROUP = 8  # test images per group kept, with their reconstructions, for the report's grids


@torch.no_grad()
def example_reconstructions(stacked: StackedCells, data: GroupedData, per_group: int = EXAMPLES_PER_GROUP,
                            device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
    """A few test images per group and each loss's reconstruction of them (lowest seed), for a results folder.

    Images are stored as uint8 (display only: the errors live in samples.csv), so a results folder stays
    small; each held-out image's brightness and contrast (float16) come along for the report's histograms.
    """
    pick = torch.cat([torch.nonzero(data.test_g == g).flatten()[:per_group] for g in range(len(data.names))])
    seed = min(c.seed for c in stacked.cells)
    chosen = [i for i, c in enumerate(stacked.cells) if c.seed == seed]  # one cell per loss
    recon = stacked.reconstruct(data.test_x[pick].to(device))[chosen].clamp(0, 1).cpu()
    flat = data.test_x.flatten(1)

    def to_uint8(x: torch.Tensor) -> np.ndarray:
        return (x * 255).round().to(torch.uint8).numpy()

    return {
        "images": to_uint8(data.test_x[pick]), "group": data.test_g[pick].numpy(), "index": data.test_index[pick].numpy(),
        "recon": to_uint8(recon), "losses": np.array([stacked.cells[i].loss for i in chosen]), "seed": np.array(seed),
        "group_names": np.array([str(n) for n in data.names]),
        "test_group": data.test_g.numpy().astype(np.int16),
        "test_brightness": flat.mean(1).numpy().astype(np.float16),
        "test_contrast": flat.std(1).numpy().astype(np.float16),
    }
