"""Losses against closed forms. r = x_hat - x, M pixels, each NLL summed over pixels."""

import math

import pytest
import torch
from scipy.optimize import minimize_scalar

from fairrecon.errors import UserError
from fairrecon.losses import LOSSES, Loss, get_loss, l1_nll, register

M = 50


@pytest.fixture(autouse=True)
def float64():
    """Closed forms are compared at float64 precision; restore the default afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, M, generator=g)
    x_hat = (x + 0.2 * torch.randn(4, M, generator=g)).requires_grad_()
    return x, x_hat


def grad_wrt_reconstruction(name, x, x_hat, log_sigma=torch.tensor(0.0)):
    nll = get_loss(name).nll(x, x_hat, log_sigma, 1e-3)
    (g,) = torch.autograd.grad(nll.sum(), x_hat)
    return nll, g


def test_l1_is_laplace_nll_with_sign_gradient(pair):
    x, x_hat = pair
    nll, g = grad_wrt_reconstruction("l1", x, x_hat)
    r = (x_hat - x).detach()
    torch.testing.assert_close(nll.detach(), r.abs().sum(1) + M * math.log(2.0))
    torch.testing.assert_close(g, torch.sign(r))


def test_l2_is_gaussian_nll_with_residual_gradient(pair):
    x, x_hat = pair
    nll, g = grad_wrt_reconstruction("l2", x, x_hat)
    r = (x_hat - x).detach()
    torch.testing.assert_close(nll.detach(), 0.5 * r.pow(2).sum(1) + 0.5 * M * math.log(2 * math.pi))
    torch.testing.assert_close(g, r)


def test_log_mse_single_sample_gradient_is_m_r_over_norm_squared(pair):
    x, x_hat = pair
    x, x_hat = x[:1], x_hat[:1].detach().requires_grad_()
    nll, g = grad_wrt_reconstruction("log-mse", x, x_hat)
    r = (x_hat - x).detach()
    torch.testing.assert_close(g, M * r / r.pow(2).sum())


def test_log_mse_batch_gradient_equals_log_of_mse_objective(pair):
    """Detaching the shared MSE inside each term gives the exact gradient of (B*M/2) log MSE (envelope theorem)."""
    x, x_hat = pair
    nll, g = grad_wrt_reconstruction("log-mse", x, x_hat)
    x_hat2 = x_hat.detach().clone().requires_grad_()
    objective = 0.5 * x.numel() * torch.log((x_hat2 - x).pow(2).mean())
    (g_ref,) = torch.autograd.grad(objective, x_hat2)
    torch.testing.assert_close(g, g_ref)
    mse = (x_hat - x).pow(2).mean().item()  # value: Gaussian NLL at sigma^2 = MSE
    torch.testing.assert_close(nll.sum().detach(), torch.tensor(0.5 * x.numel() * (1 + math.log(2 * math.pi * mse))))


def test_learned_sigma_nll_is_minimised_at_sigma_squared_equal_mse(pair):
    x, x_hat = pair
    x_hat = x_hat.detach()

    def total(log_sigma):
        return get_loss("learned-sigma").nll(x, x_hat, torch.tensor(log_sigma), 1e-6).sum().item()

    best = minimize_scalar(total, bounds=(-8, 2), method="bounded", options={"xatol": 1e-10})
    assert math.exp(2 * best.x) == pytest.approx((x_hat - x).pow(2).mean().item(), rel=1e-6)


def test_learned_sigma_gradient_is_residual_over_sigma_squared(pair):
    x, x_hat = pair
    log_sigma = torch.tensor(-1.3)
    _, g = grad_wrt_reconstruction("learned-sigma", x, x_hat, log_sigma)
    torch.testing.assert_close(g, (x_hat - x).detach() / math.exp(2 * -1.3))


def test_learned_sigma_floor_stops_the_nll_and_its_gradient(pair):
    x, x_hat = pair
    floor = 0.05
    below = torch.tensor(math.log(floor) - 3.0, requires_grad=True)
    nll_below = get_loss("learned-sigma").nll(x, x_hat.detach(), below, floor)
    nll_floor = get_loss("learned-sigma").nll(x, x_hat.detach(), torch.tensor(math.log(floor)), floor)
    torch.testing.assert_close(nll_below, nll_floor)
    (g,) = torch.autograd.grad(nll_below.sum(), below)
    assert g.item() == 0.0


def test_leading_cell_dimensions_are_independent(pair):
    """Losses accept (cells, B, M); each cell's values equal computing it alone (log-mse: its own MSE)."""
    x, x_hat = pair
    x_hat = x_hat.detach()
    stacked = get_loss("log-mse").nll(torch.stack([x, x]), torch.stack([x_hat, x]), torch.zeros(2), 1e-3)
    torch.testing.assert_close(stacked[0], get_loss("log-mse").nll(x, x_hat, torch.tensor(0.0), 1e-3))


def test_registry_rejects_unknown_names_and_accepts_new_losses():
    with pytest.raises(UserError, match="unknown loss 'l3'.*l1, l2"):
        get_loss("l3")
    custom = register(Loss("l1-copy", l1_nll, "Laplace NLL, b = 1"))
    try:
        assert get_loss("l1-copy") is custom
    finally:
        LOSSES.pop("l1-copy")
