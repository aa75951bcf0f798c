"""Autoencoders keep the image shape, hold no BatchNorm, and treat samples independently."""

import pytest
import torch
from torch import nn

from fairrecon.errors import UserError
from fairrecon.models import build_model

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32), (1, 7, 9)]


@pytest.mark.parametrize("name", ["mlp", "conv"])
@pytest.mark.parametrize("shape", SHAPES)
def test_output_has_the_input_shape(name, shape):
    model = build_model(name, shape, latent=5, hidden=64)
    x = torch.rand(3, *shape)
    assert model(x).shape == x.shape


@pytest.mark.parametrize("name", ["mlp", "conv"])
def test_samples_do_not_interact(name):
    """No BatchNorm: a sample's reconstruction is the same alone or in a batch (needed for per-group gradients)."""
    model = build_model(name, (1, 28, 28), latent=5, hidden=64)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    x = torch.rand(6, 1, 28, 28)
    together = model(x)
    alone = torch.cat([model(x[i:i + 1]) for i in range(6)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)  # batched GEMM vs per-row: float32 rounding


def test_latent_size_is_the_bottleneck():
    model = build_model("mlp", (1, 8, 8), latent=7, hidden=32)
    assert model.encoder(torch.rand(2, 1, 8, 8)).shape == (2, 7)
    conv = build_model("conv", (1, 28, 28), latent=7, hidden=64)
    assert conv.encoder(torch.rand(2, 1, 28, 28)).shape == (2, 7)


def test_unknown_model_is_a_user_error():
    with pytest.raises(UserError, match="unknown model 'resnet'"):
        build_model("resnet", (1, 8, 8), 4)
