"""Small autoencoders. No BatchNorm (it couples the samples of a batch and would spoil
per-sample and per-group gradient accounting).

Two switches, both ablations of mechanisms the audit measures (README "Models and training"):

* ``output``: ``linear`` (default) predicts unbounded values, so neither end of the [0, 1]
  pixel range is easier to reach than the other; ``sigmoid`` bounds predictions to (0, 1),
  as arguments about losses on pixels usually assume (there, reaching 0 or 1 needs an
  infinite pre-activation).
* ``input_norm``: ``none`` (default) feeds the encoder raw pixels, so bright images are large
  inputs (and large first-layer gradients); ``standardize`` subtracts each pixel's training
  mean and divides by its training std (buffers, not trained; as sklearn's StandardScaler, a
  pixel with no spread keeps scale 1). Only the encoder's input changes: the reconstruction
  target is still the raw image.

VAEs (`vae`, `conv-vae`): the same encoders with twice the latent outputs, read as the mean and
log-variance of a Gaussian q(z|x), and the same decoders. `forward(x)` decodes the posterior mean
(so reconstructions, held-out errors and curves treat a VAE like an autoencoder);
`forward(x, eps)` decodes z = mu + sigma * eps and also returns each sample's
KL(q(z|x) || N(0, I)). eps comes from outside (train.py draws it per seed), so the model holds
no randomness of its own and a cell trained in a batch equals the cell trained alone.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import UserError

MODELS = ("mlp", "conv", "vae", "conv-vae")
VAE_MODELS = ("vae", "conv-vae")
OUTPUTS = ("linear", "sigmoid")
INPUT_NORMS = ("none", "standardize")
STD_EPS = 1e-8  # a pixel whose training std is below this is "constant": scale 1 (as sklearn's StandardScaler)


class Autoencoder(nn.Module):
    """What both architectures share: the optional input standardisation and the output map."""

    def __init__(self, shape: tuple[int, int, int], output: str, input_norm: str):
        super().__init__()
        self.shape = tuple(shape)
        self.output = output
        self.input_norm = input_norm
        if input_norm == "standardize":  # filled by set_input_stats; part of the state_dict, never trained
            self.register_buffer("input_mean", torch.zeros(self.shape))
            self.register_buffer("input_std", torch.ones(self.shape))

    def set_input_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-pixel training mean and std (each of the image shape) for input_norm='standardize'."""
        if self.input_norm != "standardize":
            raise ValueError("set_input_stats needs input_norm='standardize'")
        with torch.no_grad():
            self.input_mean.copy_(mean)
            self.input_std.copy_(torch.where(std < STD_EPS, torch.ones_like(std), std))

    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.input_mean) / self.input_std if self.input_norm == "standardize" else x

    def output_map(self, y: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(y) if self.output == "sigmoid" else y


class MLPAutoencoder(Autoencoder):
    def __init__(self, shape: tuple[int, int, int], latent: int = 16, hidden: int = 256, *,
                 output: str = "linear", input_norm: str = "none"):
        super().__init__(shape, output, input_norm)
        d = math.prod(shape)
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        return self.output_map(self.decoder(self.encoder(self.encoder_input(x)))).view(x.shape)


class ConvAutoencoder(Autoencoder):
    """Two stride-2 convolutions down, a linear bottleneck, two transposed convolutions up."""

    def __init__(self, shape: tuple[int, int, int], latent: int = 16, hidden: int = 32, *,
                 output: str = "linear", input_norm: str = "none"):
        super().__init__(shape, output, input_norm)
        c, h, w = self.shape
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
        z = self.decoder_in(self.encoder(self.encoder_input(x))).view(x.shape[0], -1, self.h4, self.w4)
        return self.output_map(self.decoder(z)[..., : self.shape[1], : self.shape[2]])


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) summed over the last dim, in closed form: (..., K) -> (...)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


class VAEMixin:
    """A VAE on top of an autoencoder whose encoder outputs 2 * latent values: [mu, logvar]."""

    latent: int

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z|x): its mean and log-variance, each (B, latent)."""
        h = self.encoder(self.encoder_input(x))
        return h[:, : self.latent], h[:, self.latent:]

    def forward(self, x: torch.Tensor, eps: torch.Tensor | None = None, *, decode: bool = False):
        """Without eps: decode(mu), the posterior mean's reconstruction. With eps (B, latent):
        (decode(mu + sigma * eps), KL per sample (B,)). With decode=True, x is a batch of codes z
        (B, latent) and the result their decoded images (for generation under functional_call)."""
        if decode:
            return self.decode(x, (len(x), *self.shape))
        mu, logvar = self.posterior(x)
        if eps is None:
            return self.decode(mu, x.shape)
        return self.decode(mu + (0.5 * logvar).exp() * eps, x.shape), gaussian_kl(mu, logvar)


class VAE(VAEMixin, MLPAutoencoder):
    """The MLP autoencoder, its encoder's last layer widened to 2 * latent outputs; the same decoder."""

    def __init__(self, shape: tuple[int, int, int], latent: int = 16, hidden: int = 256, *,
                 output: str = "linear", input_norm: str = "none"):
        super().__init__(shape, latent, hidden, output=output, input_norm=input_norm)
        self.latent = latent
        self.encoder[-1] = nn.Linear(hidden, 2 * latent)

    def decode(self, z: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return self.output_map(self.decoder(z)).view(shape)


class ConvVAE(VAEMixin, ConvAutoencoder):
    """The conv autoencoder, its encoder's last layer widened to 2 * latent outputs; the same decoder."""

    def __init__(self, shape: tuple[int, int, int], latent: int = 16, hidden: int = 32, *,
                 output: str = "linear", input_norm: str = "none"):
        super().__init__(shape, latent, hidden, output=output, input_norm=input_norm)
        self.latent = latent
        self.encoder[-1] = nn.Linear(self.encoder[-1].in_features, 2 * latent)

    def decode(self, z: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        h = self.decoder_in(z).view(z.shape[0], -1, self.h4, self.w4)
        return self.output_map(self.decoder(h)[..., : self.shape[1], : self.shape[2]])


def build_model(name: str, shape: tuple[int, int, int], latent: int, hidden: int = 256, *,
                output: str = "linear", input_norm: str = "none") -> Autoencoder:
    """An autoencoder (or VAE) by name; `hidden` is the MLP width (the conv model uses hidden // 8 channels).

    With input_norm='standardize' the input statistics start as mean 0, std 1: set them with
    `set_input_stats` (train.init_cells does, from the training images).
    """
    if output not in OUTPUTS:
        raise UserError(f"unknown output '{output}'; allowed: {', '.join(OUTPUTS)}")
    if input_norm not in INPUT_NORMS:
        raise UserError(f"unknown input_norm '{input_norm}'; allowed: {', '.join(INPUT_NORMS)}")
    if name == "mlp":
        return MLPAutoencoder(shape, latent, hidden, output=output, input_norm=input_norm)
    if name == "conv":
        return ConvAutoencoder(shape, latent, max(8, hidden // 8), output=output, input_norm=input_norm)
    if name == "vae":
        return VAE(shape, latent, hidden, output=output, input_norm=input_norm)
    if name == "conv-vae":
        return ConvVAE(shape, latent, max(8, hidden // 8), output=output, input_norm=input_norm)
    raise UserError(f"unknown model '{name}'; allowed: {', '.join(MODELS)}")
