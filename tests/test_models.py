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


def _conv_stages(model):
    """The (conv, BatchNorm, activation) stages of a conv VAE, by name."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Sequential) and len(m) == 3 and isinstance(m[1], torch.nn.BatchNorm2d)]


def with_conv_biases(model, seed: int = 0, same_eval: bool = False):
    """The model as an earlier version built it: a bias on every conv in front of BatchNorm (random), and running
    means of its own (random; `same_eval`: shifted by the bias, so it evaluates as `model` did)."""
    g = torch.Generator().manual_seed(seed)
    for _, stage in _conv_stages(model):
        conv = stage[0]
        biased = type(conv)(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                            **({"output_padding": conv.output_padding} if hasattr(conv, "output_padding") and
                               isinstance(conv, torch.nn.ConvTranspose2d) else {}), bias=True)
        with torch.no_grad():
            biased.weight.copy_(conv.weight)
            biased.bias.copy_(torch.randn(conv.out_channels, generator=g))
            if same_eval:
                stage[1].running_mean.add_(biased.bias)
            else:
                stage[1].running_mean.copy_(torch.randn(conv.out_channels, generator=g))
        stage[0] = biased
    return model


@pytest.mark.parametrize("kind", ["conv", "mlp"])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian_learned"])
def test_no_parameter_has_a_zero_true_gradient(kind, likelihood):
    """In float64, every parameter's gradient of the ELBO is far from zero. A conv bias in front of BatchNorm has a
    true gradient of exactly zero (about 1e-17 here), which Adam turns into full-size steps of rounding noise."""
    torch.manual_seed(0)
    cls = ConvVAE if kind == "conv" else MLPVAE
    model = cls(1, 16, [8, 16], 4, build_likelihood(likelihood, 0.1)).double().train()
    x = torch.rand(16, 1, 16, 16, dtype=torch.float64)
    params, mu, logvar = model(x)
    loss = model.likelihood.nll(params, x).mean() + 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(1).mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad.abs().max() > 1e-8, f"{name} has a zero true gradient"
    if kind == "conv":  # the check can fail: the earlier layout's biases
        old = with_conv_biases(ConvVAE(1, 16, [8, 16], 4, build_likelihood(likelihood, 0.1))).double().train()
        params, mu, logvar = old(x)
        old.likelihood.nll(params, x).mean().backward()
        for _, stage in _conv_stages(old):  # rounding only: 1e-16 to 1e-12 against weight gradients of 0.3 to 80
            assert stage[0].bias.grad.abs().max() < 1e-10 * stage[0].weight.grad.abs().max()


def test_a_state_dict_of_an_earlier_version_loads_and_evaluates_the_same():
    torch.manual_seed(0)
    old = with_conv_biases(ConvVAE(3, 16, [8, 16], 4, build_likelihood("bernoulli", 0.1))).eval()
    new = ConvVAE(3, 16, [8, 16], 4, build_likelihood("bernoulli", 0.1)).eval()
    new.load_state_dict(old.state_dict())  # strict: every key accounted for
    x = torch.rand(8, 3, 16, 16)
    for a, b in zip(old.encode(x), new.encode(x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    z = torch.randn(8, 4)
    torch.testing.assert_close(old.decode(z), new.decode(z), rtol=1e-5, atol=1e-5)
