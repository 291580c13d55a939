"""Image grids that compare across runs: samples from a FIXED z and reconstructions of FIXED inputs."""
from __future__ import annotations

from pathlib import Path

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
    rows = []
    for i in range(0, len(x), per_row):
        rows += [x[i : i + per_row], recon[i : i + per_row]]
    save_grid(torch.cat(rows), path, nrow=per_row)


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, path, nrow=nrow, padding=2, pad_value=0.5)
