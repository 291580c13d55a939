"""ELBO terms in nats per image, and the KL schedules that set beta_t.

loss     = recon_nll + beta_t * max(KL_d, free_bits) summed over d    (none, linear, cyclical)
loss     = recon_nll + beta * |sum_d max(KL_d, free_bits) - C_t|      (capacity, Burgess et al. 2018)
neg_elbo = recon_nll + KL                                             (beta = 1: the true bound)
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

from .config import LossConfig
from .models import VAE


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, I)) per latent dim, (B, D), in nats (Kingma & Welling 2014, App. B)."""
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (mu**2 + logvar.exp() - 1.0 - logvar)


def kl_weight(cfg: LossConfig, step: int, total_steps: int) -> Tuple[float, Optional[float]]:
    """(beta_t, capacity_t) at `step`; capacity_t is None except for the capacity schedule (nats per image)."""
    if cfg.kl_schedule == "linear":
        return cfg.beta * min(1.0, step / cfg.warmup_steps), None
    if cfg.kl_schedule == "cyclical":  # Fu et al. 2019: ramp for cycle_ratio of each cycle, then hold
        period = max(1.0, total_steps / cfg.cycles)
        tau = (step % period) / period
        return cfg.beta * min(1.0, tau / cfg.cycle_ratio), None
    if cfg.kl_schedule == "capacity":
        return cfg.beta, cfg.capacity_max * min(1.0, step / cfg.capacity_steps)
    return cfg.beta, None


def elbo_terms(
    model: VAE, x: torch.Tensor, beta: float, capacity: Optional[float] = None, free_bits: float = 0.0
) -> Dict[str, torch.Tensor]:
    """One-sample ELBO terms for a batch x (B, C, H, W), each a batch mean in nats per image.

    Also returns `kl_per_dim` (D,), the batch mean KL of each latent dim, before free bits.
    """
    params, mu, logvar = model(x)
    return terms_from_outputs(model.likelihood.nll(params, x), mu, logvar, beta, capacity, free_bits)


def terms_from_outputs(
    nll: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, beta: float, capacity: Optional[float], free_bits: float
) -> Dict[str, torch.Tensor]:
    """The terms of `elbo_terms` from per-image NLL (B,) and the posterior (B, D)."""
    recon = nll.mean()
    kl_dims = kl_divergence(mu, logvar).mean(0)  # (D,)
    kl = kl_dims.sum()
    # free bits: dims below the floor get no gradient towards the prior (Kingma et al. 2016)
    kl_penalised = kl_dims.clamp_min(free_bits).sum() if free_bits > 0 else kl
    if capacity is not None:
        loss = recon + beta * (kl_penalised - capacity).abs()
    else:
        loss = recon + beta * kl_penalised
    return {"loss": loss, "recon_nll": recon, "kl": kl, "neg_elbo": recon + kl, "kl_per_dim": kl_dims,
            "kl_penalised": kl_penalised}


def bits_per_dim(nats_per_image: float, num_dims: int) -> float:
    """Nats per image -> bits per dimension (pixel channel)."""
    return nats_per_image / (num_dims * math.log(2))
