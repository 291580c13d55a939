"""Estimators against closed forms and built-to-order encoders: a wrong estimator fails here."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch import distributions as D
from torchvision.transforms.v2 import functional as TF

from src.config import Config, DataConfig, LossConfig
from src.likelihoods import Bernoulli, Gaussian
from src.losses import Objective
from src.metrics import (BLUR_WINDOW, Evaluee, active_units, blur_effect, evaluate, iwae_log_weights,
                         laplacian_variance, mig, mutual_info, sharpness_ratio)
from src.models import VAE, MLPVAE
from src.sources import decode_shapes, read_idx

FASHION = Path("/usr/share/datasets/fashion-mnist")


class IdentityMeanGaussian(Gaussian):
    """N(x; params, sigma^2): a linear decoder's mean is not squashed."""

    def mean(self, params):
        return params


class PPCA(VAE):
    """x = W z + b + sigma * eps (Tipping & Bishop 1999), with a diagonal Gaussian encoder set by hand."""

    def __init__(self, W: torch.Tensor, b: torch.Tensor, sigma: float, A: torch.Tensor, logvar: torch.Tensor):
        super().__init__(IdentityMeanGaussian(sigma), W.shape[1])
        d, k = W.shape
        enc, dec = nn.Linear(d, 2 * k), nn.Linear(k, d)
        with torch.no_grad():
            enc.weight.copy_(torch.cat([A, torch.zeros(k, d)]))
            enc.bias.copy_(torch.cat([-A @ b, logvar]))
            dec.weight.copy_(W)
            dec.bias.copy_(b)
        self.encoder = nn.Sequential(nn.Flatten(), enc)
        self.decoder = nn.Sequential(dec, nn.Unflatten(1, (1, 1, d)))


@pytest.fixture(scope="module")
def ppca():
    torch.manual_seed(0)
    d, k, sigma = 6, 2, 0.5
    W, b = torch.randn(d, k), torch.randn(d)
    M = W.T @ W + sigma**2 * torch.eye(k)
    A = torch.linalg.solve(M, W.T)  # the exact posterior mean M^-1 W^T (x - b)
    # a diagonal q, and wider than the diagonal of the true posterior covariance sigma^2 M^-1: a loose bound
    logvar = torch.log(torch.diagonal(sigma**2 * torch.linalg.inv(M))) + 1.0
    model = PPCA(W, b, sigma, A, logvar)
    x = D.MultivariateNormal(b, W @ W.T + sigma**2 * torch.eye(d)).sample((64,))
    exact = D.MultivariateNormal(b, W @ W.T + sigma**2 * torch.eye(d)).log_prob(x)  # (64,)
    return model, x.view(64, 1, 1, d), exact


def _log_weights(model, x, k):
    torch.manual_seed(1)
    mu, logvar = model.encode(x)
    return iwae_log_weights(model, x, mu, logvar, k)


def test_elbo_is_below_the_exact_log_likelihood(ppca):
    model, x, exact = ppca
    elbo = _log_weights(model, x, 2000).mean(1)  # E_q[log w], per image
    assert (elbo < exact).all()
    assert (exact - elbo).mean() > 0.1  # the hand-set q is deliberately loose


def test_iwae_with_large_k_matches_the_exact_log_likelihood(ppca):
    model, x, exact = ppca
    k = 5000
    log_w = _log_weights(model, x, k)
    iwae = torch.logsumexp(log_w, 1) - math.log(k)
    assert (iwae - exact).abs().mean() < 0.03  # nats per image
    assert (exact - iwae).mean() < 0.1 * (exact - log_w.mean(1)).mean()  # closes > 90% of the ELBO's gap


def test_iwae_tightens_as_k_grows(ppca):
    model, x, exact = ppca
    gaps = []
    for k in (1, 10, 100, 1000):
        iwae = torch.logsumexp(_log_weights(model, x, k), 1) - math.log(k)
        gaps.append((exact - iwae).mean().item())
    assert gaps[0] > gaps[1] > gaps[2] > gaps[3] > -0.01, gaps


def _mlp_with_rows_zeroed(zero_mu_from: int, latent: int = 6) -> MLPVAE:
    """A tiny MLP VAE whose encoder ignores x for mu dims >= zero_mu_from and has fixed logvar = -4."""
    torch.manual_seed(0)
    model = MLPVAE(1, 8, [16], latent, Bernoulli())
    head = model.encoder[-1]
    with torch.no_grad():
        head.weight[zero_mu_from:latent] = 0
        head.weight[latent:] = 0
        head.bias[latent:] = -4.0
        head.weight[:zero_mu_from] *= 5  # the reading dims vary well above the 0.01 threshold
    return model


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (300, 1, 8, 8)).astype(np.uint8)


def _evaluate(model, images, factors=None):
    objective = Objective(LossConfig(), 1, likelihood=model.likelihood)
    cfg = Config()
    cfg.data.eval_batch_size, cfg.eval.blur_samples, cfg.trainer.progress = 64, 32, False
    [out] = evaluate([Evaluee(model, objective, cfg)], images, step=0, device=torch.device("cpu"),
                     mean_img=torch.full((1, 8, 8), 0.5), iwae_k=3, factors=factors)
    return out


def test_active_units_counts_an_encoder_that_ignores_some_dims(images):
    out = _evaluate(_mlp_with_rows_zeroed(3), images)
    assert out["active_units"] == 3 and out["collapsed_units"] == 3
    assert active_units(torch.zeros(10, 4)) == 0


def test_kl_active_units_counts_dims_that_cost_kl_even_when_their_mean_never_moves(images):
    # mu = 0 for every x and a fixed logvar c per dim: KL_d = (e^c - 1 - c) / 2 in closed form, I(x; z_d) = 0
    torch.manual_seed(0)
    model = MLPVAE(1, 8, [16], 4, Bernoulli())
    logvars = torch.tensor([-4.0, 0.0, -0.5, -1.0])  # KL 1.509, 0, 0.053, 0.184 nats
    with torch.no_grad():
        model.encoder[-1].weight.zero_()
        model.encoder[-1].bias.copy_(torch.cat([torch.zeros(4), logvars]))
    out = _evaluate(model, images)
    expected = 0.5 * (logvars.exp() - 1 - logvars)
    assert out["kl_per_dim"] == pytest.approx(expected.tolist(), abs=1e-5)
    assert out["kl_active_units"] == 2  # above 0.1 nats: the dims with logvar -4 and -1
    assert out["active_units"] == 0  # ... yet no mean varies with x: KL spent on a narrow posterior, no information


def test_mutual_info_is_zero_for_an_encoder_that_ignores_x(images):
    ignoring = _evaluate(_mlp_with_rows_zeroed(0), images)
    assert abs(ignoring["mutual_info"]) < 1e-3 and not ignoring["mutual_info_capped"]
    assert _evaluate(_mlp_with_rows_zeroed(3), images)["mutual_info"] > 1.0


def test_mutual_info_at_its_ceiling_log_n_is_flagged(images):
    model = _mlp_with_rows_zeroed(6)
    with torch.no_grad():  # every image gets its own narrow posterior: q(z) is N disjoint bumps, I = log N
        model.encoder[-1].weight[:6] *= 100
        model.encoder[-1].bias[6:] = -20.0
    out = _evaluate(model, images)
    assert out["mutual_info_max"] == pytest.approx(math.log(len(images)))  # 300 images, below mi_images
    assert out["mutual_info"] == pytest.approx(math.log(300), abs=0.05) and out["mutual_info_capped"]


@pytest.mark.parametrize("a", [0.5, 1.0, 2.0])
def test_mutual_info_matches_the_closed_form_of_a_linear_gaussian_encoder(a):
    # x ~ N(0, 1) and q(z|x) = N(a x, 1) per dim: q(z) = N(0, 1 + a^2), so I(x; z) = 0.5 log(1 + a^2) per dim
    x = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    estimate = mutual_info(a * x, torch.zeros_like(x))
    assert estimate == pytest.approx(2 * 0.5 * math.log(1 + a**2), abs=0.03)


def test_mutual_info_in_small_pieces_is_the_same_number():
    """The densities are computed a few rows at a time where N x D is large (a latent of 100,000 dims once asked for
    6.5 GB at once): rows one at a time give the same estimate as 256 at a time."""
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(300, 7, generator=g), torch.randn(300, 7, generator=g) * 0.3
    whole = mutual_info(mu, logvar, generator=torch.Generator().manual_seed(1))
    pieces = mutual_info(mu, logvar, generator=torch.Generator().manual_seed(1), max_elements=300 * 7)  # 1 row
    assert pieces == pytest.approx(whole, abs=1e-6)


def test_the_mutual_info_standard_error_is_the_spread_of_repeated_estimates():
    """Estimates from other images and other z scatter by about the standard error the estimate reports (the
    linear-Gaussian encoder: 25 independent estimates of 400 images each), and it shrinks as 1/sqrt(N)."""
    from src.metrics import mutual_info_se, mutual_info_terms

    estimates, ses = [], []
    for seed in range(25):
        x = torch.randn(400, 2, generator=torch.Generator().manual_seed(seed))
        terms = mutual_info_terms(x, torch.zeros_like(x), generator=torch.Generator().manual_seed(100 + seed))
        estimates.append(float(terms.mean()))
        ses.append(mutual_info_se(terms))
    spread, se = float(np.std(estimates, ddof=1)), float(np.mean(ses))
    assert 0.5 < spread / se < 2.0, (spread, se)
    x = torch.randn(1600, 2, generator=torch.Generator().manual_seed(0))
    big = mutual_info_se(mutual_info_terms(x, torch.zeros_like(x), generator=torch.Generator().manual_seed(0)))
    assert big == pytest.approx(se / 2, rel=0.25)  # four times the images: half the error


def test_mutual_info_matches_closed_form_for_well_separated_posteriors():
    # N posteriors so far apart that q(z) is a mixture of disjoint parts: I(x; z) = log N exactly
    mu = torch.arange(50, dtype=torch.float32).view(50, 1) * 100
    assert mutual_info(mu, torch.zeros(50, 1)) == pytest.approx(math.log(50), abs=1e-4)


@pytest.fixture(scope="module")
def shapes():
    return decode_shapes(DataConfig(num_train=10, val_size=2000, test_size=10, image_size=32))


def test_sharpness_ratio_is_below_one_for_blurred_data_and_one_for_data(shapes):
    real = torch.from_numpy(shapes.images["val"][:256]).float() / 255
    other = torch.from_numpy(shapes.images["val"][256:512]).float() / 255
    blurred = TF.gaussian_blur(real, [7, 7], [1.5, 1.5])
    assert sharpness_ratio(real, real) == pytest.approx(1.0)
    assert sharpness_ratio(other, real) == pytest.approx(1.0, abs=0.15)
    assert sharpness_ratio(blurred, real) < 0.3


def test_blur_effect_of_a_step_edge_is_one_over_the_window_and_of_a_flat_image_one():
    step = torch.zeros(2, 1, 24, 24)
    step[0, :, :, 12:] = 1.0  # a vertical edge: the re-blurred ramp keeps 1/window of the one-pixel jump
    step[1] = step[0].transpose(-1, -2)  # the same edge, horizontal
    assert blur_effect(step).tolist() == pytest.approx([1 / BLUR_WINDOW] * 2, rel=1e-5)
    assert blur_effect(torch.full((1, 3, 16, 16), 0.4)).item() == 1.0  # nothing left to lose: as blurry as it gets


def _fashion_mnist(n: int) -> torch.Tensor:
    if not FASHION.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{FASHION} is missing: .ci/run installs Debian's dataset-fashion-mnist")
        pytest.skip("Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
    return torch.from_numpy(read_idx(FASHION / "t10k-images-idx3-ubyte.gz")[:n].copy()).float().div(255)[:, None]


LADDER = (0.0, 0.5, 1.0, 1.5, 2.0)  # Gaussian sigma in pixels


@pytest.mark.parametrize("images", ["shapes, grey, 32 px", "shapes, colour, 64 px", "Fashion-MNIST, 28 px"])
def test_blur_effect_rises_strictly_along_a_gaussian_blur_ladder(images):
    if images.startswith("shapes"):
        colour = "colour" in images
        data = decode_shapes(DataConfig(num_train=10, val_size=128, test_size=10, channels=3 if colour else 1,
                                        image_size=64 if colour else 32))
        x = torch.from_numpy(data.images["val"]).float() / 255
    else:
        x = _fashion_mnist(128)
    rungs = [x if s == 0 else TF.gaussian_blur(x, [2 * math.ceil(4 * s) + 1] * 2, [s, s]) for s in LADDER]
    per_image = torch.stack([blur_effect(r) for r in rungs], 1)  # (N, 5)
    means = per_image.mean(0)
    assert (means.diff() > 0.02).all(), means.tolist()  # the mean of the split, rung by rung
    assert (per_image.diff(dim=1) > 0).all()  # and every single image


def test_blur_effect_ignores_contrast_where_the_laplacian_counts_it(shapes):
    real = torch.from_numpy(shapes.images["val"][:256]).float() / 255
    faded = 0.25 + 0.5 * real  # the same shapes at half the contrast: no blurrier
    torch.testing.assert_close(blur_effect(faded), blur_effect(real), rtol=1e-4, atol=1e-5)
    assert laplacian_variance(faded) == pytest.approx(laplacian_variance(real) / 4, rel=1e-4)


def test_mig_is_high_for_an_encoder_reading_the_factors_and_zero_for_noise(shapes):
    factors = shapes.factors["val"]
    rng = np.random.default_rng(0)
    reading = np.concatenate([factors / factors.max(0), rng.normal(size=(len(factors), 5))], 1)
    assert mig(reading + 1e-3 * rng.normal(size=reading.shape), factors) > 0.7
    assert mig(rng.normal(size=(len(factors), 10)), factors) < 0.05
    # its bootstrap standard error is the spread of MIG over other images: 8 disjoint sets of 250
    from src.metrics import mig_se

    noisy = reading + 0.3 * rng.normal(size=reading.shape)
    parts = [slice(i, i + 250) for i in range(0, 2000, 250)]
    spread = float(np.std([mig(noisy[p], factors[p]) for p in parts], ddof=1))
    se = float(np.mean([mig_se(noisy[p], factors[p]) for p in parts[:3]]))
    assert 0.4 < spread / se < 2.5, (spread, se)


# ------------------------------------------------------------------------------ holes of the latent space


def _aggregate_gaussian(n: int, d: int, m: float, s: float, sigma: float, seed: int = 0):
    """Posteriors N(mu_n, sigma^2 I) with mu_n ~ N(m, s^2 - sigma^2): their aggregate posterior is N(m, s^2 I)."""
    g = torch.Generator().manual_seed(seed)
    mu = m + math.sqrt(s**2 - sigma**2) * torch.randn(n, d, generator=g)
    return mu, torch.full((n, d), 2 * math.log(sigma))


@pytest.mark.parametrize("m,s", [(0.0, 1.0), (1.0, 0.5), (-0.5, 1.5)])
def test_the_marginal_kl_is_the_closed_form_of_a_gaussian_aggregate_posterior(m, s):
    """KL(N(m, s^2 I) || N(0, I)) = d/2 (s^2 + m^2 - 1 - log s^2): 0 where the aggregate posterior is the prior."""
    from src.metrics import marginal_kl_terms, mutual_info_se, mutual_info_terms

    d = 2
    mu, logvar = _aggregate_gaussian(4000, d, m, s, sigma=0.3 * s)
    terms = marginal_kl_terms(mu, logvar, mutual_info_terms(mu, logvar, generator=torch.Generator().manual_seed(1)))
    exact = d / 2 * (s**2 + m**2 - 1 - math.log(s**2))
    assert float(terms.mean()) == pytest.approx(exact, abs=max(0.03, 4 * mutual_info_se(terms))), exact


def test_the_hole_share_is_its_floor_where_q_covers_the_prior_and_half_where_it_covers_half():
    """A prior sample is in a hole where the aggregate posterior is below the density of 99% of held-out codes:
    1% of the prior where q(z) is the prior itself; 0.5 where q covers the half z_0 > 0 (here 2 active dims of 8,
    the other 6 collapsed to the prior, which neither hides nor makes a hole)."""
    from src.metrics import prior_hole_share
    from src.visuals import fixed_latents

    prior = fixed_latents(1000, 8)
    covered = prior_hole_share(*_aggregate_gaussian(2000, 8, 0.0, 1.0, sigma=0.5), prior,
                               generator=torch.Generator().manual_seed(1))
    assert covered < 0.04, covered
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.zeros(2000, 8), torch.zeros(2000, 8)
    mu[:, :2] = torch.randn(2000, 2, generator=g)
    mu[:, 0] = mu[:, 0].abs()
    logvar[:, :2] = 2 * math.log(0.02)
    half = prior_hole_share(mu, logvar, prior, generator=torch.Generator().manual_seed(1))
    assert 0.4 < half < 0.6, half
