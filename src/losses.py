"""The objective: ELBO terms in nats per image, and the KL schedule that sets beta_t.

loss     = recon_nll + beta_t * sum_d max(KL_d, free_bits)            (none, linear, cyclical)
loss     = recon_nll + beta * |sum_d max(KL_d, free_bits) - C_t|      (capacity, Burgess et al. 2018)
neg_elbo = recon_nll + KL                                             (beta = 1: the true bound)
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch

from .config import LossConfig
from .likelihoods import Likelihood, build_likelihood


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, I)) per latent dim, (B, D), in nats (Kingma & Welling 2014, App. B)."""
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (mu**2 + logvar.exp() - 1.0 - logvar)


def _constant(cfg: LossConfig, step: int, total: int) -> Tuple[float, Optional[float]]:
    return cfg.beta, None


def _linear(cfg: LossConfig, step: int, total: int) -> Tuple[float, Optional[float]]:
    return cfg.beta * min(1.0, step / cfg.warmup_steps), None


def _cyclical(cfg: LossConfig, step: int, total: int) -> Tuple[float, Optional[float]]:
    """Fu et al. 2019: ramp for cycle_ratio of each of `cycles` periods, then hold."""
    period = max(1.0, total / cfg.cycles)
    return cfg.beta * min(1.0, (step % period) / period / cfg.cycle_ratio), None


def _capacity(cfg: LossConfig, step: int, total: int) -> Tuple[float, Optional[float]]:
    return cfg.beta, cfg.capacity_max * min(1.0, step / cfg.capacity_steps)


# loss.kl_schedule -> (cfg, step, total_steps) -> (beta_t, capacity_t in nats per image or None)
KL_SCHEDULES: Dict[str, Callable[[LossConfig, int, int], Tuple[float, Optional[float]]]] = {
    "none": _constant, "linear": _linear, "cyclical": _cyclical, "capacity": _capacity}


def kl_weight(cfg: LossConfig, step: int, total_steps: int) -> Tuple[float, Optional[float]]:
    """(beta_t, capacity_t) at `step`; capacity_t is None except for the capacity schedule (nats per image)."""
    return KL_SCHEDULES[cfg.kl_schedule](cfg, step, total_steps)


def elbo_terms(nll: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, beta: torch.Tensor,
               capacity_on: torch.Tensor, capacity: torch.Tensor, free_bits: torch.Tensor,
               in_use: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """Batch-mean terms in nats per image from the per-image NLL (B,) and the posterior (B, D).

    The KL settings are 0-d tensors (`Objective.settings`; under vmap, each member's): beta_t, whether the capacity
    form is on and its C_t, and free bits. `in_use` (D,) marks a packed member's own dims of a padded latent (the
    rest are zero). `kl_per_dim` (D,) is each latent dim's batch-mean KL before free bits; `kl_penalised` after them.
    """
    recon = nll.mean()
    kl_dims = kl_divergence(mu, logvar).mean(0)  # (D,)
    kl = kl_dims.sum()
    # free bits: dims below the floor get no gradient towards the prior (Kingma et al. 2016)
    floored = torch.where(free_bits > 0, kl_dims.clamp_min(free_bits), kl_dims)
    kl_penalised = (floored if in_use is None else torch.where(in_use, floored, 0.0)).sum()
    # capacity (Burgess et al. 2018): |KL - C_t| where on, the plain KL term elsewhere
    loss = recon + beta * torch.where(capacity_on, (kl_penalised - capacity).abs(), kl_penalised)
    return {"loss": loss, "recon_nll": recon, "kl": kl, "neg_elbo": recon + kl, "kl_per_dim": kl_dims,
            "kl_penalised": kl_penalised}


class Objective:
    """What training minimises and evaluation reports, built once from `cfg.loss`: the decoder likelihood,
    the KL schedule (beta_t, capacity_t) over `total_steps`, and free bits."""

    def __init__(self, cfg: LossConfig, total_steps: int, likelihood: Optional[Likelihood] = None):
        self.cfg = cfg
        self.total_steps = total_steps
        # the model decodes into this likelihood (build_model takes it); a trained model brings its own
        self.likelihood = likelihood if likelihood is not None else build_likelihood(cfg.likelihood, cfg.sigma)
        self._cached: Optional[tuple] = None

    def schedule_warning(self) -> Optional[str]:
        """A line saying so when the KL warm-up or capacity ramp is longer than the run, else None."""
        c, steps = self.cfg, self.total_steps
        ramp = {"linear": ("loss.warmup_steps", c.warmup_steps), "capacity": ("loss.capacity_steps", c.capacity_steps)}
        if c.kl_schedule not in ramp or ramp[c.kl_schedule][1] <= steps:
            return None
        key, length = ramp[c.kl_schedule]
        beta, capacity = self.weights(steps - 1)
        reached = (f"beta {beta:.4g} of {c.beta:.4g}" if capacity is None else
                   f"capacity {capacity:.4g} of {c.capacity_max:.4g} nats")
        return (f"{key}={length} is longer than the run ({steps} steps): it ends at {reached}; "
                f"summary.json records the beta in force at the end (train/beta)")

    def weights(self, step: int) -> Tuple[float, Optional[float]]:
        """(beta_t, capacity_t) in force at `step`."""
        return kl_weight(self.cfg, step, self.total_steps)

    def settings(self, step: int) -> Tuple[float, bool, float, float]:
        """(beta_t, capacity on, capacity_t, free bits) at `step`: what elbo_terms takes, as plain numbers."""
        beta, capacity = self.weights(step)
        return beta, capacity is not None, capacity or 0.0, self.cfg.free_bits

    def _settings_on(self, step: int, device: torch.device) -> Tuple[torch.Tensor, ...]:
        """`settings(step)` as 0-d tensors on `device`, made anew only when they change (a schedule moves them)."""
        values = self.settings(step)
        if self._cached is None or self._cached[0] != (values, device):
            beta, on, capacity, free_bits = values
            f32 = dict(dtype=torch.float32, device=device)
            self._cached = ((values, device), (torch.tensor(beta, **f32), torch.tensor(on, device=device),
                                               torch.tensor(capacity, **f32), torch.tensor(free_bits, **f32)))
        return self._cached[1]

    def __call__(self, params: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                 step: int) -> Dict[str, torch.Tensor]:
        """Terms for decoder output `params` on batch x (B, C, H, W) and posterior (mu, logvar) (B, D)."""
        return elbo_terms(self.likelihood.nll(params, x), mu, logvar, *self._settings_on(step, x.device))


def bits_per_dim(nats_per_image: float, num_dims: int) -> float:
    """Nats per image -> bits per dimension (pixel channel)."""
    return nats_per_image / (num_dims * math.log(2))
