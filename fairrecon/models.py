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

And one head: ``scale_head=True`` gives the decoder a second output head beside its last layer
(same input, same shape) that predicts a raw per-pixel log-scale for the per-pixel likelihoods
(losses.py: gaussian-pixel, laplace-pixel). The output is then (B, 2C, H, W): the mean's C
channels (through the output map), then the C raw log-scale channels (`split_output`). The
head is made last and zero-initialised, so the rest of a seed's initial weights are the same
with or without it, and every pixel starts at log-scale 0 (scale 1, l2's sigma). Any decoder
can carry it: build its last layer as `self.decoder[-1]` and call `self.heads(h, fit)`.

VAEs (`vae`, `conv-vae`): the same encoders with twice the latent outputs, read as the mean and
log-variance of a Gaussian q(z|x), and the same decoders. `forward(x)` decodes the posterior mean
(so reconstructions, held-out errors and curves treat a VAE like an autoencoder);
`forward(x, eps)` decodes z = mu + sigma * eps and also returns each sample's
KL(q(z|x) || N(0, I)). eps comes from outside (noise.py, one generator per seed), so the model holds
no randomness of its own and a cell trained in a batch equals the cell trained alone.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from .errors import UserError

# The choices' one home is spec.py; the model families are re-exported here (`as`) for train.py.
from .spec import CONV_MODELS as CONV_MODELS
from .spec import INPUT_NORMS, MODELS, OUTPUTS
from .spec import VAE_MODELS as VAE_MODELS

STD_EPS = 1e-8  # a pixel whose training std is below this is "constant": scale 1 (as sklearn's StandardScaler)


class Autoencoder(nn.Module):
    """What both architectures share: the optional input standardisation and the output map."""

    def __init__(self, shape: tuple[int, int, int], output: str, input_norm: str):
        super().__init__()
        self.shape = tuple(shape)
        self.output = output
        self.input_norm = input_norm
        self.scale_head: nn.Module | None = None
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

    def add_scale_head(self, head: nn.Module) -> None:
        """A per-pixel log-scale head, a copy of the decoder's last layer in shape; call it last in __init__."""
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        self.scale_head = head

    def decoder_body(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder up to (not including) its last layer: the input both heads share."""
        for layer in itertools.islice(self.decoder, len(self.decoder) - 1):
            z = layer(z)
        return z

    def heads(self, h: torch.Tensor, fit) -> torch.Tensor:
        """The decoder's last hidden activation h -> the mean (through the output map), with the raw
        log-scale channels after it when there is a scale head. `fit` shapes a head's output to (B, C, H, W)."""
        mean = self.output_map(fit(self.decoder[-1](h)))
        if self.scale_head is None:
            return mean
        return torch.cat([mean, fit(self.scale_head(h))], dim=1)


class MLPAutoencoder(Autoencoder):
    def __init__(
        self,
        shape: tuple[int, int, int],
        latent: int = 16,
        hidden: int = 256,
        *,
        output: str = "linear",
        input_norm: str = "none",
        scale_head: bool = False,
    ):
        super().__init__(shape, output, input_norm)
        d = math.prod(shape)
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, d))
        if scale_head:
            self.add_scale_head(nn.Linear(hidden, d))

    def forward(
        self, x: torch.Tensor
    ) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W), or (B, 2C, H, W) with a scale head
        h = self.decoder_body(self.encoder(self.encoder_input(x)))
        return self.heads(h, lambda y: y.view(x.shape))


class ConvAutoencoder(Autoencoder):
    """Two stride-2 convolutions down, a linear bottleneck, two transposed convolutions up."""

    def __init__(
        self,
        shape: tuple[int, int, int],
        latent: int = 16,
        hidden: int = 32,
        *,
        output: str = "linear",
        input_norm: str = "none",
        scale_head: bool = False,
    ):
        super().__init__(shape, output, input_norm)
        c, h, w = self.shape
        self.h4, self.w4 = -(-h // 4), -(-w // 4)  # spatial size after two stride-2 convs (ceil)
        width = 2 * hidden * self.h4 * self.w4
        self.encoder = nn.Sequential(
            nn.Conv2d(c, hidden, 3, stride=2, padding=1),
            nn.ReLU(),  # (B, hidden, H/2, W/2)
            nn.Conv2d(hidden, 2 * hidden, 3, stride=2, padding=1),
            nn.ReLU(),  # (B, 2 hidden, H/4, W/4)
            nn.Flatten(),
            nn.Linear(width, latent),
        )
        self.decoder_in = nn.Sequential(nn.Linear(latent, width), nn.ReLU())
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(2 * hidden, hidden, 4, stride=2, padding=1),
            nn.ReLU(),  # (B, hidden, H/2, W/2)
            nn.ConvTranspose2d(hidden, c, 4, stride=2, padding=1),  # (B, C, 4*h4, 4*w4) >= (H, W)
        )
        if scale_head:
            self.add_scale_head(nn.ConvTranspose2d(hidden, c, 4, stride=2, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.decoder_in(self.encoder(self.encoder_input(x))).view(x.shape[0], -1, self.h4, self.w4)
        return self.heads(self.decoder_body(z), lambda y: y[..., : self.shape[1], : self.shape[2]])


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) summed over the last dim, in closed form: (..., K) -> (...)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


class VAEMixin:
    """A VAE on top of an autoencoder whose encoder outputs 2 * latent values: [mu, logvar]."""

    latent: int

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z|x): its mean and log-variance, each (B, latent)."""
        h = self.encoder(self.encoder_input(x))
        return h[:, : self.latent], h[:, self.latent :]

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

    def __init__(
        self,
        shape: tuple[int, int, int],
        latent: int = 16,
        hidden: int = 256,
        *,
        output: str = "linear",
        input_norm: str = "none",
        scale_head: bool = False,
    ):
        super().__init__(shape, latent, hidden, output=output, input_norm=input_norm, scale_head=scale_head)
        self.latent = latent
        self.encoder[-1] = nn.Linear(hidden, 2 * latent)

    def decode(self, z: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Codes z (B, latent) -> images (B, C, H, W), with the log-scale channels after them under a scale head."""
        return self.heads(self.decoder_body(z), lambda y: y.view(len(z), *self.shape))


class ConvVAE(VAEMixin, ConvAutoencoder):
    """The conv autoencoder, its encoder's last layer widened to 2 * latent outputs; the same decoder."""

    def __init__(
        self,
        shape: tuple[int, int, int],
        latent: int = 16,
        hidden: int = 32,
        *,
        output: str = "linear",
        input_norm: str = "none",
        scale_head: bool = False,
    ):
        super().__init__(shape, latent, hidden, output=output, input_norm=input_norm, scale_head=scale_head)
        self.latent = latent
        self.encoder[-1] = nn.Linear(self.encoder[-1].in_features, 2 * latent)

    def decode(self, z: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Codes z (B, latent) -> images (B, C, H, W), with the log-scale channels after them under a scale head."""
        h = self.decoder_in(z).view(z.shape[0], -1, self.h4, self.w4)
        return self.heads(self.decoder_body(h), lambda y: y[..., : self.shape[1], : self.shape[2]])


def build_model(
    name: str,
    shape: tuple[int, int, int],
    latent: int,
    hidden: int = 256,
    *,
    output: str = "linear",
    input_norm: str = "none",
    scale_head: bool = False,
) -> Autoencoder:
    """An autoencoder (or VAE) by name; `hidden` is the MLP width (the conv model uses hidden // 8 channels).
    `scale_head`: a second decoder head predicting a per-pixel log-scale (output (B, 2C, H, W)).

    With input_norm='standardize' the input statistics start as mean 0, std 1: set them with
    `set_input_stats` (stacked.init_cells does, from the training images).
    """
    if output not in OUTPUTS:
        raise UserError(f"unknown output '{output}'; allowed: {', '.join(OUTPUTS)}")
    if input_norm not in INPUT_NORMS:
        raise UserError(f"unknown input_norm '{input_norm}'; allowed: {', '.join(INPUT_NORMS)}")
    if name == "mlp":
        return MLPAutoencoder(shape, latent, hidden, output=output, input_norm=input_norm, scale_head=scale_head)
    if name == "conv":
        return ConvAutoencoder(
            shape, latent, max(8, hidden // 8), output=output, input_norm=input_norm, scale_head=scale_head
        )
    if name == "vae":
        return VAE(shape, latent, hidden, output=output, input_norm=input_norm, scale_head=scale_head)
    if name == "conv-vae":
        return ConvVAE(shape, latent, max(8, hidden // 8), output=output, input_norm=input_norm, scale_head=scale_head)
    raise UserError(f"unknown model '{name}'; allowed: {', '.join(MODELS)}")


def split_output(y: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A model's output (..., k*C, H, W) -> (mean, raw log-scale or None), C = `channels` image channels."""
    if y.shape[-3] == channels:
        return y, None
    return y[..., :channels, :, :], y[..., channels:, :, :]
