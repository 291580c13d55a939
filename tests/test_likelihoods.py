"""Each likelihood's NLL is the true negative log-likelihood: it equals torch.distributions' log_prob."""
from __future__ import annotations

import math

import pytest
import torch
from torch import distributions as D

from src.likelihoods import ContinuousBernoulli, build_likelihood

torch.manual_seed(0)
B, C, H, W = 4, 3, 5, 6
PARAMS = torch.randn(B, C, H, W) * 3
X = torch.rand(B, C, H, W)
X_BIN = (torch.rand(B, C, H, W) > 0.5).float()


def _expected(dist: D.Distribution, x: torch.Tensor) -> torch.Tensor:
    return -dist.log_prob(x).flatten(1).sum(1)


def test_gaussian_fixed_sigma():
    nll = build_likelihood("gaussian", 0.3).nll(PARAMS, X)
    torch.testing.assert_close(nll, _expected(D.Normal(torch.sigmoid(PARAMS), 0.3), X))


def test_gaussian_learned_sigma_is_a_parameter_and_exact():
    lik = build_likelihood("gaussian_learned", 0.3)
    with torch.no_grad():
        lik.log_sigma.fill_(math.log(0.07))
    nll = lik.nll(PARAMS, X)
    torch.testing.assert_close(nll, _expected(D.Normal(torch.sigmoid(PARAMS), 0.07), X))
    nll.sum().backward()
    assert lik.log_sigma.grad is not None and lik.log_sigma.grad.abs() > 0
    assert [n for n, _ in lik.named_parameters()] == ["log_sigma"]


def test_gaussian_optimal_sigma_is_batch_rmse():
    mu = torch.sigmoid(PARAMS)
    rmse = ((X - mu) ** 2).mean().sqrt()
    nll = build_likelihood("gaussian_optimal", 1.0).nll(PARAMS, X)
    torch.testing.assert_close(nll, _expected(D.Normal(mu, rmse), X))
    # sigma = RMSE maximises the likelihood: any other shared sigma gives a higher NLL
    for other in (0.8 * rmse, 1.25 * rmse):
        assert _expected(D.Normal(mu, other), X).sum() > nll.sum()


def test_bernoulli_on_binary_pixels():
    nll = build_likelihood("bernoulli", 1.0).nll(PARAMS, X_BIN)
    torch.testing.assert_close(nll, _expected(D.Bernoulli(logits=PARAMS), X_BIN))


def test_continuous_bernoulli_includes_its_normaliser():
    # logits near 0 exercise the Taylor branch of log C; large ones the exact branch
    params = torch.cat([PARAMS, torch.full((1, C, H, W), 1e-4), torch.full((1, C, H, W), -12.0)])
    x = torch.cat([X, X[:2]])
    nll = ContinuousBernoulli().nll(params, x)
    expected = _expected(D.ContinuousBernoulli(logits=params.double()), x.double()).float()  # float64 reference
    torch.testing.assert_close(nll, expected, rtol=1e-5, atol=1e-4)
    # the normaliser makes it a density on [0, 1]: it integrates to 1 (trapezoid rule on a fine grid)
    grid = torch.linspace(0, 1, 20001)
    for logit in (-5.0, -0.3, 0.0, 2.0):
        density = torch.exp(-ContinuousBernoulli().nll(torch.full((len(grid), 1, 1, 1), logit), grid.view(-1, 1, 1, 1)))
        assert abs(torch.trapezoid(density, grid).item() - 1) < 1e-4, logit


def test_continuous_bernoulli_stays_exact_at_extreme_logits():
    # torch clamps probs at float eps there; the closed form is C = l / (1 - e^-l) for density e^(-l x) on [0, 1]
    logit = torch.tensor(-30.0)
    nll = ContinuousBernoulli().nll(logit.view(1, 1, 1, 1), torch.zeros(1, 1, 1, 1))
    assert nll.item() == pytest.approx(-math.log(30 / (1 - math.exp(-30))), rel=1e-6)


def test_laplace_fixed_scale():
    nll = build_likelihood("laplace", 0.2).nll(PARAMS, X)
    torch.testing.assert_close(nll, _expected(D.Laplace(torch.sigmoid(PARAMS), 0.2), X))


def test_means_are_images_in_unit_range():
    for name in ("gaussian", "gaussian_learned", "gaussian_optimal", "bernoulli", "continuous_bernoulli", "laplace"):
        mean = build_likelihood(name, 0.1).mean(PARAMS)
        assert mean.shape == X.shape and mean.min() >= 0 and mean.max() <= 1, name
    torch.testing.assert_close(ContinuousBernoulli().mean(PARAMS), D.ContinuousBernoulli(logits=PARAMS).mean)
