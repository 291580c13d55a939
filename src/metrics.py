"""Evaluation over a whole split: ELBO terms, per-dim KL, reconstruction MSE and its trivial baseline."""
from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager, Dict, Optional

import numpy as np
import torch

from .data import eval_batches
from .losses import bits_per_dim, elbo_terms
from .models import VAE

EVAL_SEED = 0  # the eps of the one-sample ELBO at eval; fixed, so eval does not depend on training's RNG


@torch.no_grad()
def evaluate(
    model: VAE,
    images: np.ndarray,
    batch_size: int,
    device: torch.device,
    beta: float,
    capacity: Optional[float],
    free_bits: float,
    mean_img: torch.Tensor,
    autocast: Optional[ContextManager] = None,
) -> Dict[str, object]:
    """Terms averaged over every image of the split (nats per image), `kl_per_dim` as a list, and
    `mse` (per pixel, decoder mean at the posterior mean) against `mse_mean_image` (predicting `mean_img`)."""
    was_training = model.training
    model.eval()
    sums: Dict[str, torch.Tensor] = {}
    n = 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(EVAL_SEED)
        for x in eval_batches(images, batch_size, device):
            with autocast or nullcontext():
                terms = elbo_terms(model, x, beta, capacity, free_bits)
                recon = model.reconstruct(x)
            terms["mse"] = ((recon.float() - x) ** 2).mean()
            terms["mse_mean_image"] = ((mean_img.to(device) - x) ** 2).mean()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0) + v.detach().float() * len(x)
            n += len(x)
    model.train(was_training)
    out: Dict[str, object] = {k: v.item() for k, v in sums.items() if v.ndim == 0}
    out = {k: v / n for k, v in out.items()}
    out["kl_per_dim"] = (sums["kl_per_dim"] / n).tolist()
    out["bits_per_dim"] = bits_per_dim(out["neg_elbo"], images[0].size)
    return out
