"""VAE noise: one generator per seed and stream, on the CPU, so a cell's noise depends only on its seed.

Each use has its own stream, so no use replays another's noise: training's eps (EPS_STREAM, apart from the
seed's batch order), the held-out nll's one draw per test image (HELDOUT_EPS_STREAM, measure.py) and the
prior codes of generated images (PRIOR_STREAM, generate.py). A seed's generator for a stream is seeded with
seed * 2**16 + stream. Cells that share a seed share its noise, so a cell's result does not depend on which
cells it is trained or measured with.
"""

from __future__ import annotations

import torch

from .grid import Cell

EPS_STREAM = 0x5EED  # training's eps: one draw per step and seed
HELDOUT_EPS_STREAM = EPS_STREAM + 1  # the VAE noise of held-out nll: one draw per test image and seed, fixed
PRIOR_STREAM = HELDOUT_EPS_STREAM + 1  # the prior codes of generated images


def eps_generators(cells: list[Cell], stream: int = EPS_STREAM) -> dict[int, torch.Generator]:
    """Each seed's own noise generator (CPU) for `stream`."""
    return {s: torch.Generator().manual_seed(s * 2**16 + stream) for s in sorted({c.seed for c in cells})}


def draw_eps(
    generators: dict[int, torch.Generator], cells: list[Cell], batch: int, latent: int, device: torch.device
) -> torch.Tensor:
    """One draw of noise (C, batch, latent): one per seed, shared by that seed's cells."""
    eps = {s: torch.randn(batch, latent, generator=g) for s, g in generators.items()}
    return torch.stack([eps[c.seed] for c in cells]).to(device, non_blocking=True)
