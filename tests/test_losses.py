"""KL against closed forms and Monte Carlo; KL schedules; free bits."""
from __future__ import annotations

import pytest
import torch
from torch import distributions as D

from src.config import LossConfig
from src.likelihoods import Bernoulli
from src.losses import Objective, bits_per_dim, kl_divergence, kl_weight
from src.models import ConvVAE


def test_kl_is_zero_at_the_standard_normal():
    assert kl_divergence(torch.zeros(3, 7), torch.zeros(3, 7)).abs().max() == 0


def test_kl_matches_monte_carlo_and_torch():
    torch.manual_seed(0)
    mu, logvar = torch.randn(2, 5), torch.randn(2, 5) * 0.5
    q, p = D.Normal(mu, (0.5 * logvar).exp()), D.Normal(0.0, 1.0)
    z = q.sample((400_000,))
    mc = (q.log_prob(z) - p.log_prob(z)).mean(0)
    torch.testing.assert_close(kl_divergence(mu, logvar), mc, atol=0.01, rtol=0.01)
    torch.testing.assert_close(kl_divergence(mu, logvar), D.kl_divergence(q, p))


def test_schedules():
    lin = LossConfig(beta=4.0, kl_schedule="linear", warmup_steps=100)
    assert [kl_weight(lin, s, 1000)[0] for s in (0, 50, 100, 500)] == [0.0, 2.0, 4.0, 4.0]
    cyc = LossConfig(beta=1.0, kl_schedule="cyclical", cycles=2, cycle_ratio=0.5)
    # 1000 steps, 2 cycles of 500: ramp over 250 steps, hold, then restart at 0
    assert [kl_weight(cyc, s, 1000)[0] for s in (0, 125, 250, 499, 500, 625)] == [0.0, 0.5, 1.0, 1.0, 0.0, 0.5]
    cap = LossConfig(beta=100.0, kl_schedule="capacity", capacity_max=20.0, capacity_steps=200)
    assert kl_weight(cap, 100, 1000) == (100.0, 10.0) and kl_weight(cap, 400, 1000) == (100.0, 20.0)
    assert kl_weight(LossConfig(beta=2.0), 7, 10) == (2.0, None)


def _tiny_model():
    torch.manual_seed(0)
    return ConvVAE(1, 8, [4], 6, Bernoulli())


def elbo_terms(model, x, beta, capacity=None, free_bits=0.0):
    """The objective's terms for one forward pass, with a constant beta (and capacity) in force."""
    schedule = dict(kl_schedule="capacity", capacity_max=capacity, capacity_steps=1) if capacity is not None else {}
    objective = Objective(LossConfig(beta=beta, free_bits=free_bits, **schedule), 10, likelihood=model.likelihood)
    params, mu, logvar = model(x)
    return objective(params, x, mu, logvar, step=5)


def test_terms_are_consistent_and_capacity_uses_abs():
    model, x = _tiny_model(), (torch.rand(5, 1, 8, 8) > 0.5).float()
    torch.manual_seed(1)
    t = elbo_terms(model, x, beta=3.0)
    torch.testing.assert_close(t["neg_elbo"], t["recon_nll"] + t["kl"])
    torch.testing.assert_close(t["loss"], t["recon_nll"] + 3.0 * t["kl"])
    torch.testing.assert_close(t["kl_per_dim"].sum(), t["kl"])
    torch.manual_seed(1)
    c = elbo_terms(model, x, beta=3.0, capacity=t["kl"].item() + 5.0)
    torch.testing.assert_close(c["loss"], c["recon_nll"] + 3.0 * 5.0)


def test_free_bits_stop_the_kl_gradient_of_dims_below_the_floor():
    model, x = _tiny_model(), (torch.rand(5, 1, 8, 8) > 0.5).float()
    torch.manual_seed(1)
    t = elbo_terms(model, x, beta=1.0, free_bits=1000.0)  # every dim is below a 1000-nat floor
    assert t["loss"].item() == pytest.approx(t["recon_nll"].item() + 1000.0 * 6, rel=1e-6)
    head = model.encoder[-1]
    t["loss"].backward()
    # with KL fully inside the floor, the logvar half of the encoder head only learns from reconstruction
    grad_fb = head.weight.grad[6:].clone()
    model.zero_grad()
    torch.manual_seed(1)
    elbo_terms(model, x, beta=0.0)["loss"].backward()
    torch.testing.assert_close(grad_fb, head.weight.grad[6:])


def test_bits_per_dim():
    assert bits_per_dim(12288 * 0.6931471805599453, 12288) == pytest.approx(1.0)
