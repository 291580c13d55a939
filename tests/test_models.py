"""Model shapes for several depths and sizes; no hard-coded image size."""
from __future__ import annotations

import pytest
import torch

from src.likelihoods import build_likelihood
from src.models import ConvVAE, MLPVAE


@pytest.mark.parametrize("hidden,size,channels", [([8], 8, 1), ([8, 16], 16, 3), ([4, 8, 8, 16], 64, 3),
                                                   ([4, 4, 8, 8, 16], 32, 1), ([4, 8, 8, 16, 16], 64, 3),
                                                   ([4, 8, 8, 16], 28, 1), ([4, 8], 30, 3), ([4, 8, 8], 17, 1)])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian_learned"])
def test_conv_vae_shapes(hidden, size, channels, likelihood):
    model = ConvVAE(channels, size, hidden, 7, build_likelihood(likelihood, 0.1))
    x = torch.rand(3, channels, size, size)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (3, 7)
    params = model.decode(model.reparameterize(mu, logvar))
    assert params.shape == (3, channels, size, size)
    assert model.sample(torch.randn(5, 7)).shape == (5, channels, size, size)
    assert model.likelihood.nll(params, x).shape == (3,)


def test_conv_depth_follows_hidden_channels():
    model = ConvVAE(3, 64, [32, 64, 128, 256, 512], 128, build_likelihood("gaussian", 0.7))
    convs = [m for m in model.encoder if isinstance(m, torch.nn.Sequential)]
    assert [c[0].out_channels for c in convs] == [32, 64, 128, 256, 512]
    assert model.encoder[-1].in_features == 512 * 2 * 2  # 64 / 2**5 = 2


def test_mnist_like_data_default_to_their_native_28_px_with_the_default_conv():
    from .conftest import compose_cfg

    for data in ("mnist", "fashion_mnist"):
        cfg = compose_cfg([f"data={data}"])
        assert cfg.data.image_size == 28 and cfg.model.name == "conv"
    model = ConvVAE(1, 28, list(cfg.model.hidden_channels), 10, build_likelihood("bernoulli", 0.1))
    assert model.encoder[-1].in_features == cfg.model.hidden_channels[-1] * 2 * 2  # 28 -> 14 -> 7 -> 4 -> 2
    assert model.decode(torch.randn(2, 10)).shape == (2, 1, 28, 28)


def test_mlp_is_the_canonical_784_400_20_vae():
    model = MLPVAE(1, 28, [400], 20, build_likelihood("bernoulli", 0.1))
    widths = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [(784, 400), (400, 40), (20, 400), (400, 784)]
    params, mu, _ = model(torch.rand(2, 1, 28, 28))
    assert params.shape == (2, 1, 28, 28) and mu.shape == (2, 20)
