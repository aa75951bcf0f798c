"""Reconstruction losses written as negative log-likelihoods, per sample, summed over pixels.

Every loss maps x, x_hat of shape (..., B, M) (B samples of M pixels; leading dims are
cells trained together) to per-sample NLLs of shape (..., B). Reduction happens later,
so per-group statistics and gradient shares can use the unreduced values.

Gradients with respect to x_hat, with r = x_hat - x and M pixels per sample:
  l1             Laplace(x_hat, b=1)                 sign(r)
  l2             Normal(x_hat, sigma=1)              r
  log-mse        Normal(x_hat, sigma^2 = batch MSE)  r / MSE
  learned-sigma  Normal(x_hat, sigma learned)        r / sigma^2
For log-mse the batch MSE is a shared weight held fixed (detached) inside each sample's
term: by the envelope theorem this gives exactly the gradient of (B*M/2) log MSE, and it
makes the batch loss an exact sum of per-sample (hence per-group) parts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch.distributions import Laplace, Normal

from .errors import UserError

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


@dataclass(frozen=True)
class Loss:
    name: str
    nll: LossFn  # (x, x_hat, log_sigma (...,), sigma_floor) -> per-sample NLL (..., B)
    likelihood: str
    learns_sigma: bool = False


def l1_nll(x, x_hat, log_sigma, floor):
    return -Laplace(x_hat, 1.0, validate_args=False).log_prob(x).sum(-1)


def l2_nll(x, x_hat, log_sigma, floor):
    return -Normal(x_hat, 1.0, validate_args=False).log_prob(x).sum(-1)


def log_mse_nll(x, x_hat, log_sigma, floor):
    mse = (x_hat - x).pow(2).mean(dim=(-2, -1), keepdim=True).detach().clamp_min(floor**2)  # (..., 1, 1)
    return -Normal(x_hat, mse.sqrt(), validate_args=False).log_prob(x).sum(-1)


def learned_sigma_nll(x, x_hat, log_sigma, floor):
    sigma = effective_log_sigma(log_sigma, floor).exp()[..., None, None]  # (..., 1, 1)
    return -Normal(x_hat, sigma, validate_args=False).log_prob(x).sum(-1)


def effective_log_sigma(log_sigma: torch.Tensor, floor: float) -> torch.Tensor:
    """The learned log sigma, floored at log(floor) so the NLL cannot run to minus infinity."""
    return log_sigma.clamp_min(math.log(floor))


LOSSES: dict[str, Loss] = {
    loss.name: loss
    for loss in (
        Loss("l1", l1_nll, "Laplace NLL, b = 1"),
        Loss("l2", l2_nll, "Gaussian NLL, sigma = 1"),
        Loss("log-mse", log_mse_nll, "Gaussian NLL, shared sigma = sqrt(batch MSE)"),
        Loss("learned-sigma", learned_sigma_nll, "Gaussian NLL, learned scalar sigma (floored)", learns_sigma=True),
    )
}


def register(loss: Loss) -> Loss:
    """Add a loss to the registry (for users' own likelihoods)."""
    LOSSES[loss.name] = loss
    return loss


def get_loss(name: str) -> Loss:
    try:
        return LOSSES[name]
    except KeyError:
        raise UserError(f"unknown loss '{name}'; allowed: {', '.join(LOSSES)}") from None
