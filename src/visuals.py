"""Image grids that compare across runs: samples from a FIXED z and reconstructions of FIXED inputs."""
from __future__ import annotations

from pathlib import Path
from typing import List

import torch
from torchvision.utils import save_image

FIXED_Z_SEED = 20140101  # independent of the run's seed: every run with the same latent_dim decodes the same z


def fixed_latents(n: int, latent_dim: int) -> torch.Tensor:
    """(n, latent_dim) standard-normal latents, identical in every run and eval with this latent_dim."""
    return torch.randn(n, latent_dim, generator=torch.Generator().manual_seed(FIXED_Z_SEED))


def save_samples(model, z: torch.Tensor, path: Path) -> None:
    """Decoder means at z, as a square-ish grid PNG."""
    images = model.sample(z).float().clamp(0, 1).cpu()
    save_grid(images, path)


def save_reconstructions(model, x: torch.Tensor, path: Path, per_row: int = 8) -> None:
    """Rows alternate inputs and their reconstructions, `per_row` images each, so pairs sit one above the other."""
    recon = model.reconstruct(x).float().clamp(0, 1).cpu()
    x = x.cpu()
    per_row = min(per_row, len(x))  # fewer images than a row: each input row must still sit over its outputs
    rows = []
    for i in range(0, len(x), per_row):
        rows += [x[i : i + per_row], recon[i : i + per_row]]
    save_grid(torch.cat(rows), path, nrow=per_row)


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, path, nrow=nrow, padding=2, pad_value=0.5)


def save_traversals(model, x: torch.Tensor, dims: List[int], path: Path, steps: int = 7, span: float = 3.0) -> None:
    """One row per latent dim in `dims`: decode the posterior mean of x (1, C, H, W) with that dim set to
    each of `steps` values in [-span, span], the others held (Higgins et al. 2017)."""
    mu, _ = model.encode(x)
    values = torch.linspace(-span, span, steps, device=mu.device)
    z = mu.repeat(len(dims) * steps, 1)  # (len(dims) * steps, D)
    for row, d in enumerate(dims):
        z[row * steps : (row + 1) * steps, d] = values
    save_grid(model.sample(z).float().clamp(0, 1).cpu(), path, nrow=steps)
