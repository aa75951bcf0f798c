"""Small autoencoders. No BatchNorm (it couples the samples of a batch and would spoil
per-sample and per-group gradient accounting), and a linear output (no sigmoid), so
that neither end of the [0, 1] pixel range is easier to reach than the other.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import UserError


class MLPAutoencoder(nn.Module):
    def __init__(self, shape: tuple[int, int, int], latent: int = 16, hidden: int = 256):
        super().__init__()
        self.shape = tuple(shape)
        d = math.prod(shape)
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        return self.decoder(self.encoder(x)).view(x.shape)


class ConvAutoencoder(nn.Module):
    """Two stride-2 convolutions down, a linear bottleneck, two transposed convolutions up."""

    def __init__(self, shape: tuple[int, int, int], latent: int = 16, hidden: int = 32):
        super().__init__()
        c, h, w = self.shape = tuple(shape)
        self.h4, self.w4 = -(-h // 4), -(-w // 4)  # spatial size after two stride-2 convs (ceil)
        width = 2 * hidden * self.h4 * self.w4
        self.encoder = nn.Sequential(
            nn.Conv2d(c, hidden, 3, stride=2, padding=1), nn.ReLU(),  # (B, hidden, H/2, W/2)
            nn.Conv2d(hidden, 2 * hidden, 3, stride=2, padding=1), nn.ReLU(),  # (B, 2 hidden, H/4, W/4)
            nn.Flatten(), nn.Linear(width, latent),
        )
        self.decoder_in = nn.Sequential(nn.Linear(latent, width), nn.ReLU())
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(2 * hidden, hidden, 4, stride=2, padding=1), nn.ReLU(),  # (B, hidden, H/2, W/2)
            nn.ConvTranspose2d(hidden, c, 4, stride=2, padding=1),  # (B, C, 4*h4, 4*w4) >= (H, W)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.decoder_in(self.encoder(x)).view(x.shape[0], -1, self.h4, self.w4)
        return self.decoder(z)[..., : self.shape[1], : self.shape[2]]


def build_model(name: str, shape: tuple[int, int, int], latent: int, hidden: int = 256) -> nn.Module:
    """An autoencoder by name; `hidden` is the MLP width (the conv model uses hidden // 8 channels)."""
    if name == "mlp":
        return MLPAutoencoder(shape, latent, hidden)
    if name == "conv":
        return ConvAutoencoder(shape, latent, max(8, hidden // 8))
    raise UserError(f"unknown model '{name}'; allowed: mlp, conv")
