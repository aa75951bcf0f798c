"""VAEs against independent computations: the objective's per-group gradients against torch.func
per-sample gradients of independently written NLLs plus torch.distributions' KL, the effective KL
weight from those gradients, beta = 0 leaving the likelihood term alone, and the held-out nll, kl
and errors against the cell's own module."""

from __future__ import annotations

import pytest
import torch
from test_gradshare import SHAPE, START, independent_nll, make_batch
from torch.distributions import Normal, kl_divergence
from torch.func import grad, vmap

from fairrecon.data import load_images
from fairrecon.gradshare import GradShareRecorder, group_gradients
from fairrecon.grid import Cell, TrainConfig
from fairrecon.groups import make_groups
from fairrecon.hooks import Snapshot
from fairrecon.losses import get_loss
from fairrecon.measure import sample_errors
from fairrecon.noise import HELDOUT_EPS_STREAM
from fairrecon.spec import AuditSpec
from fairrecon.stacked import init_cells

LATENT = 3


def vae_cells(cells, beta: float, model: str = "vae"):
    config = TrainConfig.from_spec(AuditSpec(model=model, beta=beta, latent=LATENT, hidden=16, sigma_floor=1e-3))
    stacked = init_cells(cells, SHAPE, config, torch.device("cpu"))
    with torch.no_grad():
        for k, name in enumerate(stacked.loss_param_names):
            stacked.loss_params[:, k] = START[name]
    return stacked


def mlp_vae(p: dict[str, torch.Tensor], xi: torch.Tensor, ei: torch.Tensor):
    """The MLP VAE written out from its weights: (x_hat, mu, logvar) for one image xi and noise ei."""
    relu = torch.nn.functional.relu
    h = (
        relu(xi.flatten() @ p["encoder.1.weight"].T + p["encoder.1.bias"]) @ p["encoder.3.weight"].T
        + p["encoder.3.bias"]
    )
    mu, logvar = h[:LATENT], h[LATENT:]
    z = mu + torch.exp(0.5 * logvar) * ei
    x_hat = relu(z @ p["decoder.0.weight"].T + p["decoder.0.bias"]) @ p["decoder.2.weight"].T + p["decoder.2.bias"]
    return x_hat.view(xi.shape), mu, logvar


def per_sample_grads(stacked, c: int, x: torch.Tensor, eps: torch.Tensor, beta: float):
    """Cell c's per-sample gradients wrt its weights of its NLL term and of its beta * KL term: NLLs from
    test_gradshare's independently written likelihoods, the KL from torch.distributions."""
    cell = stacked.cells[c]
    params = {k: v.detach() for k, v in stacked.module(c).named_parameters()}
    logs = {n: stacked.loss_params[c, k].detach() for k, n in enumerate(stacked.loss_param_names)}
    with torch.no_grad():  # log-mse's batch MSE: a fixed weight, over the batch's sampled reconstructions
        batch_mse = torch.stack([(mlp_vae(params, xi, ei)[0] - xi).pow(2).mean() for xi, ei in zip(x, eps)]).mean()

    def nll_term(p, xi, ei):
        return independent_nll(cell.loss, (mlp_vae(p, xi, ei)[0] - xi).flatten(), logs, batch_mse)

    def kl_term(p, xi, ei):
        _, mu, logvar = mlp_vae(p, xi, ei)
        return beta * kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum()

    g_nll = vmap(grad(nll_term), in_dims=(None, 0, 0))(params, x, eps)
    g_kl = vmap(grad(kl_term), in_dims=(None, 0, 0))(params, x, eps)
    return g_nll, g_kl


@pytest.mark.parametrize("beta", [1.0, 0.3, 0.0])
def test_vae_group_gradients_and_kl_weight_match_autograd(beta):
    """Per group: the objective's gradient = sum over its samples of (grad NLL_i + beta grad KL_i) / B, and
    kl_weight = ||sum beta grad KL_i|| / ||sum grad NLL_i||; beta = 0 leaves the likelihood's gradient alone
    (kl_weight exactly 0). Tolerances: float32 sums over 24 samples in another order; rtol 1e-4 is ~100x
    the rounding and far below any wrong term (a missing KL changes gradients by O(1) relative)."""
    cells = [Cell("l1", 0), Cell("log-mse", 1), Cell("learned-sigma", 2)]
    stacked = vae_cells(cells, beta)
    x, group = make_batch(len(cells))
    n_groups, b = 3, x.shape[1]
    eps = torch.randn(len(cells), b, LATENT, generator=torch.Generator().manual_seed(5))
    got = group_gradients(stacked, x, group, n_groups, eps)
    assert got.kl_weight is not None and got.kl_weight.shape == (len(cells), n_groups)
    for c in range(len(cells)):
        g_nll, g_kl = per_sample_grads(stacked, c, x[c], eps[c], beta)
        for g in range(n_groups):
            member = (group[c] == g).float()
            nll_norm = kl_norm = 0.0
            for name in g_nll:
                want_nll = torch.einsum("b,b...->...", member, g_nll[name]) / b
                want_kl = torch.einsum("b,b...->...", member, g_kl[name]) / b
                torch.testing.assert_close(got.params[name][c, g], want_nll + want_kl, rtol=1e-4, atol=1e-6)
                nll_norm += want_nll.pow(2).sum()
                kl_norm += want_kl.pow(2).sum()
                if name.startswith("decoder."):
                    assert want_kl.abs().max() == 0  # the KL does not reach the decoder
            torch.testing.assert_close(got.kl_weight[c, g], (kl_norm / nll_norm).sqrt(), rtol=1e-4, atol=1e-7)
    if beta == 0.0:
        assert torch.all(got.kl_weight == 0)
    else:
        assert torch.all(got.kl_weight > 0)


def test_kl_weight_is_nan_for_autoencoders_and_recorded_for_vaes():
    """grad_shares.csv keeps one schema: kl_weight is NaN for an autoencoder's snapshots."""
    x, group = make_batch(2)
    for model, finite in (("mlp", False), ("vae", True)):
        config = TrainConfig.from_spec(AuditSpec(model=model, latent=LATENT, hidden=16))
        stacked = init_cells([Cell("l1", 0), Cell("l2", 0)], SHAPE, config, torch.device("cpu"))
        eps = torch.randn(2, x.shape[1], LATENT) if finite else None
        recorder = GradShareRecorder(["a", "b", "c"])
        recorder(Snapshot(0, 0, stacked, x, group, eps))
        frame = recorder.frame()
        assert frame["kl_weight"].notna().all() if finite else frame["kl_weight"].isna().all()


def test_heldout_nll_kl_and_errors_of_a_vae_match_its_module():
    """samples.csv's kl is torch.distributions' KL of each test image's q(z|x); its nll the loss at one draw
    z = mu + sigma * eps (eps from the documented held-out stream of the cell's seed); mse scores decode(mu).
    Tolerance: float32, batched (vmap) vs one module; sums over 64 pixels (rtol 1e-4, atol 1e-4 nats)."""
    data = make_groups(load_images("digits"), AuditSpec())
    config = TrainConfig.from_spec(AuditSpec(model="vae", latent=LATENT, hidden=16))
    cells = [Cell("l1", 0), Cell("log-mse", 1)]
    stacked = init_cells(cells, tuple(data.train_x.shape[1:]), config, torch.device("cpu"))
    samples = sample_errors(stacked, data)
    x = data.test_x
    for c, cell in enumerate(cells):
        own = samples[samples["loss"] == cell.loss]
        module = stacked.module(c)
        with torch.no_grad():
            mu, logvar = module.posterior(x)
            eps = torch.randn(
                len(x), LATENT, generator=torch.Generator().manual_seed(cell.seed * 2**16 + HELDOUT_EPS_STREAM)
            )
            x_hat = module.decode(mu + torch.exp(0.5 * logvar) * eps, x.shape)
            nll = get_loss(cell.loss).per_sample(x.flatten(1), x_hat.flatten(1), {}, config.sigma_floor)
            kl = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(1)
            mse = (module.decode(mu, x.shape) - x).pow(2).flatten(1).mean(1)
        torch.testing.assert_close(torch.tensor(own["nll"].to_numpy()).double(), nll.double(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(torch.tensor(own["kl"].to_numpy()).double(), kl.double(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(torch.tensor(own["mse"].to_numpy()).double(), mse.double(), rtol=1e-4, atol=1e-7)
