"""Decoder likelihoods p(x|z): each gives a true negative log-likelihood in nats per image.

The decoder emits `num_params` maps per channel, shape (B, num_params * C, H, W); pixels x are in [0, 1].
Every `nll` keeps its normalising constants, so values are comparable across likelihoods and runs.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class Likelihood(nn.Module):
    """Base: `nll(params, x)` -> (B,) nats per image; `mean(params)` -> (B, C, H, W) in data space."""

    num_params = 1

    def nll(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(params.float())

    def scale(self) -> Optional[float]:
        """The sigma (Laplace: the scale b) in force, in data units; None where the likelihood has none or sets it
        per batch."""
        return None

    @property
    def learned(self) -> bool:
        """Whether training moves its scale (a learned sigma, sigma-VAE)."""
        return any(p.requires_grad for p in self.parameters())


def _sum_pixels(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).sum(1)


def gaussian_nll(mu: torch.Tensor, log_sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log N(x; mu, sigma^2) per pixel; log_sigma broadcasts."""
    return 0.5 * ((x - mu) * torch.exp(-log_sigma)) ** 2 + log_sigma + HALF_LOG_2PI


class Gaussian(Likelihood):
    """N(x; sigmoid(params), sigma^2) with a fixed sigma."""

    def __init__(self, sigma: float):
        super().__init__()
        self.register_buffer("log_sigma", torch.tensor(math.log(sigma)))

    def nll(self, params, x):
        return _sum_pixels(gaussian_nll(self.mean(params), self.log_sigma, x))

    def scale(self) -> Optional[float]:
        return float(self.log_sigma.detach().exp())


class GaussianLearned(Gaussian):
    """One learned sigma shared by all pixels (sigma-VAE, Rybkin et al. 2021); starts at `sigma`."""

    def __init__(self, sigma: float):
        super().__init__(sigma)
        del self.log_sigma
        self.log_sigma = nn.Parameter(torch.tensor(math.log(sigma)))


class GaussianOptimal(Likelihood):
    """sigma set to the batch's RMSE, its maximum-likelihood value (optimal sigma-VAE, Rybkin et al. 2021).

    The gradient through sigma is zero at its optimum, so sigma is detached. It is floored at e^-6.
    """

    def nll(self, params, x):
        mu = self.mean(params)
        log_sigma = ((x - mu) ** 2).mean().sqrt().clamp_min(math.exp(-6)).log().detach()
        return _sum_pixels(gaussian_nll(mu, log_sigma, x))


class Bernoulli(Likelihood):
    """Bernoulli(sigmoid(logits)); for x in [0, 1] this is binary cross-entropy (unnormalised off {0, 1})."""

    def nll(self, params, x):
        return _sum_pixels(F.binary_cross_entropy_with_logits(params.float(), x, reduction="none"))


def continuous_bernoulli_log_norm(logits: torch.Tensor) -> torch.Tensor:
    """log C(lambda) for lambda = sigmoid(logits) (Loaiza-Ganem & Cunningham 2019, eq. 7).

    With lambda = sigmoid(l), 2 atanh(1 - 2 lambda) / (1 - 2 lambda) = l / tanh(l / 2), which is 2 + l^2/6 + O(l^4)
    near l = 0; the Taylor branch avoids 0/0 there.
    """
    small = logits.abs() < 1e-2
    safe = torch.where(small, torch.ones_like(logits), logits)
    exact = torch.log(safe.abs()) - torch.log(torch.tanh(safe.abs() / 2))
    taylor = torch.log(2 + logits**2 / 6)
    return torch.where(small, taylor, exact)


class ContinuousBernoulli(Likelihood):
    """The continuous Bernoulli: Bernoulli's cross-entropy minus its normalising constant log C(lambda)."""

    def nll(self, params, x):
        logits = params.float()
        bce = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
        return _sum_pixels(bce - continuous_bernoulli_log_norm(logits))

    def mean(self, params):
        return torch.distributions.ContinuousBernoulli(logits=params.float()).mean


class Laplace(Likelihood):
    """Laplace(x; sigmoid(params), b) with a fixed scale b = loss.sigma."""

    def __init__(self, scale: float):
        super().__init__()
        self.register_buffer("log_scale", torch.tensor(math.log(scale)))

    def nll(self, params, x):
        nll = (x - self.mean(params)).abs() * torch.exp(-self.log_scale) + self.log_scale + math.log(2)
        return _sum_pixels(nll)

    def scale(self) -> Optional[float]:
        return float(self.log_scale.exp())


# loss.likelihood -> constructor from loss.sigma (the std, or the Laplace scale, where the likelihood has one)
LIKELIHOODS = {
    "gaussian": Gaussian,
    "gaussian_learned": GaussianLearned,
    "gaussian_optimal": lambda sigma: GaussianOptimal(),
    "bernoulli": lambda sigma: Bernoulli(),
    "continuous_bernoulli": lambda sigma: ContinuousBernoulli(),
    "laplace": Laplace,
}


def build_likelihood(name: str, sigma: float) -> Likelihood:
    """Name -> likelihood, for `loss.likelihood`."""
    return LIKELIHOODS[name](sigma)
