"""Autoencoders keep the image shape, hold no BatchNorm, and treat samples independently."""

import pytest
import torch
from torch import nn
from torch.distributions import Normal, kl_divergence

from fairrecon.errors import UserError
from fairrecon.models import build_model, gaussian_kl, split_output

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32), (1, 7, 9)]


@pytest.mark.parametrize("name", ["mlp", "conv", "vae", "conv-vae"])
@pytest.mark.parametrize("shape", SHAPES)
def test_output_has_the_input_shape(name, shape):
    model = build_model(name, shape, latent=5, hidden=64)
    x = torch.rand(3, *shape)
    assert model(x).shape == x.shape


@pytest.mark.parametrize("name", ["mlp", "conv", "vae", "conv-vae"])
def test_samples_do_not_interact(name):
    """No BatchNorm: a sample's reconstruction is the same alone or in a batch (needed for per-group gradients)."""
    model = build_model(name, (1, 28, 28), latent=5, hidden=64)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    x = torch.rand(6, 1, 28, 28)
    together = model(x)
    alone = torch.cat([model(x[i : i + 1]) for i in range(6)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)  # batched GEMM vs per-row: float32 rounding


def test_latent_size_is_the_bottleneck():
    model = build_model("mlp", (1, 8, 8), latent=7, hidden=32)
    assert model.encoder(torch.rand(2, 1, 8, 8)).shape == (2, 7)
    conv = build_model("conv", (1, 28, 28), latent=7, hidden=64)
    assert conv.encoder(torch.rand(2, 1, 28, 28)).shape == (2, 7)


def test_unknown_model_is_a_user_error():
    with pytest.raises(UserError, match="unknown model 'resnet'"):
        build_model("resnet", (1, 8, 8), 4)


@pytest.mark.parametrize("name", ["mlp", "conv"])
def test_sigmoid_output_is_the_linear_models_output_through_a_sigmoid(name):
    torch.manual_seed(0)
    linear = build_model(name, (1, 28, 28), latent=5, hidden=64)
    torch.manual_seed(0)
    bounded = build_model(name, (1, 28, 28), latent=5, hidden=64, output="sigmoid")
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(bounded(x), torch.sigmoid(linear(x)), rtol=0, atol=0)  # same weights, same ops
        assert ((bounded(10 * x) > 0) & (bounded(10 * x) < 1)).all()


@pytest.mark.parametrize("name", ["mlp", "conv"])
def test_standardized_input_is_the_plain_model_on_standardized_pixels(name):
    torch.manual_seed(0)
    plain = build_model(name, (1, 8, 8), latent=3, hidden=64)
    torch.manual_seed(0)
    model = build_model(name, (1, 8, 8), latent=3, hidden=64, input_norm="standardize")
    train = torch.rand(50, 1, 8, 8)
    train[:, :, 0, 0] = 0.25  # a constant pixel: scale 1, as sklearn's StandardScaler does
    mean, std = train.mean(0), train.std(0, correction=0)
    model.set_input_stats(mean, std)
    scale = torch.where(std < 1e-8, torch.ones_like(std), std)
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():  # same weights: the standardized model is the plain one applied to standardized pixels
        torch.testing.assert_close(model(x), plain((x - mean) / scale), rtol=0, atol=0)
    # the statistics are buffers: saved with the model, never handed to an optimizer
    assert {"input_mean", "input_std"} <= set(model.state_dict())
    assert all(p is not model.input_mean and p is not model.input_std for p in model.parameters())
    assert model.input_std[0, 0, 0].item() == 1.0


def test_unknown_output_or_input_norm_is_a_user_error():
    with pytest.raises(UserError, match="unknown output 'tanh'"):
        build_model("mlp", (1, 8, 8), 4, output="tanh")
    with pytest.raises(UserError, match="unknown input_norm 'whiten'"):
        build_model("mlp", (1, 8, 8), 4, input_norm="whiten")


@pytest.mark.parametrize("name", ["mlp", "conv"])
def test_scale_head_adds_log_scale_channels_and_leaves_the_rest_as_it_was(name):
    """With scale_head the output has twice the channels: the mean is the plain model's (same seed: the head
    is made last and starts at zero, so every other initial weight is the same), the log-scale starts at 0."""
    shape = (1, 28, 28)
    torch.manual_seed(3)
    plain = build_model(name, shape, latent=8)
    torch.manual_seed(3)
    headed = build_model(name, shape, latent=8, scale_head=True)
    state = headed.state_dict()
    for key, value in plain.state_dict().items():
        assert torch.equal(state[key], value)
    assert {k for k in state if k not in plain.state_dict()} == {"scale_head.weight", "scale_head.bias"}
    x = torch.rand(5, *shape)
    with torch.no_grad():
        out = headed(x)
        assert out.shape == (5, 2, 28, 28)
        mean, log_scale = split_output(out, 1)
        assert torch.equal(mean, plain(x)) and torch.equal(log_scale, torch.zeros_like(log_scale))
        assert split_output(plain(x), 1)[1] is None


def test_gaussian_kl_matches_torch_distributions():
    """The closed-form KL(N(mu, sigma^2) || N(0, 1)), summed over latent dims, against torch.distributions'
    own kl_divergence. Tolerance: float32 rounding of two formulas of the same quantity (rtol 1e-5)."""
    gen = torch.Generator().manual_seed(0)
    mu = 3 * torch.randn(50, 6, generator=gen)
    logvar = 4 * torch.randn(50, 6, generator=gen)
    want = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(gaussian_kl(mu, logvar), want, rtol=1e-5, atol=1e-5)
    assert torch.all(gaussian_kl(torch.zeros(2, 6), torch.zeros(2, 6)) == 0)  # q = prior: KL 0


@pytest.mark.parametrize("name, plain", [("vae", "mlp"), ("conv-vae", "conv")])
def test_vae_is_its_autoencoder_with_a_gaussian_encoder(name, plain):
    """Same decoder layers as the autoencoder; the encoder gives 2 * latent values (mu, logvar); forward(x) is
    decode(mu), forward(x, eps) decodes mu + sigma * eps and returns the KL of q(z|x), per sample."""
    torch.manual_seed(0)
    vae = build_model(name, (1, 28, 28), latent=5, hidden=64)
    ae = build_model(plain, (1, 28, 28), latent=5, hidden=64)
    assert [p.shape for p in vae.decoder.parameters()] == [p.shape for p in ae.decoder.parameters()]
    x = torch.rand(4, 1, 28, 28)
    mu, logvar = vae.posterior(x)
    assert mu.shape == logvar.shape == (4, 5)
    with torch.no_grad():
        torch.testing.assert_close(vae(x), vae.decode(mu, x.shape))
        eps = torch.randn(4, 5)
        x_hat, kl = vae(x, eps)
        torch.testing.assert_close(x_hat, vae.decode(mu + torch.exp(0.5 * logvar) * eps, x.shape))
        torch.testing.assert_close(kl, gaussian_kl(mu, logvar))
        assert not torch.allclose(x_hat, vae(x))  # the noise reaches the reconstruction
