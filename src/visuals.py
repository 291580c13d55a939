"""Image grids that compare across runs: samples from a FIXED z and reconstructions of FIXED inputs."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torchvision.utils import save_image

TOOL_TILE_PX = 64  # the trained-model tools' grids: a 28 px Fashion-MNIST tile is shown at 84 px
FIXED_Z_SEED = 20140101  # independent of the run's seed: every run with the same latent_dim decodes the same z


def fixed_latents(n: int, latent_dim: int) -> torch.Tensor:
    """(n, latent_dim) standard-normal latents, identical in every run and eval with this latent_dim."""
    return torch.randn(n, latent_dim, generator=torch.Generator().manual_seed(FIXED_Z_SEED))


def save_samples(model, z: torch.Tensor, path: Path) -> None:
    """Decoder means at z, as a square-ish grid PNG."""
    images = model.sample(z).float().clamp(0, 1).cpu()
    save_grid(images, path)


def save_reconstructions(model, x: torch.Tensor, path: Path, per_row: int = 8, min_tile: int = 0) -> None:
    """Rows alternate inputs and their reconstructions, `per_row` images each, so pairs sit one above the other."""
    recon = model.reconstruct(x).float().clamp(0, 1).cpu()
    x = x.cpu()
    per_row = min(per_row, len(x))  # fewer images than a row: each input row must still sit over its outputs
    rows = []
    for i in range(0, len(x), per_row):
        rows += [x[i : i + per_row], recon[i : i + per_row]]
    save_grid(torch.cat(rows), path, nrow=per_row, min_tile=min_tile)


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8, min_tile: int = 0) -> None:
    """A grid PNG of images (N, C, H, W) in [0, 1]; tiles smaller than `min_tile` px are enlarged by a whole
    factor, each pixel a block (nearest: no detail invented)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if min_tile and images.shape[-2] < min_tile:
        images = torch.nn.functional.interpolate(images, scale_factor=-(-min_tile // images.shape[-2]), mode="nearest")
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


def traversal_dims(kl_per_dim: Sequence[float], n: int) -> List[int]:
    """The dims a traversal walks, one row each: the most KL first, and (from 4 rows on) its last quarter the
    dims with the least KL, so a collapsed dim is shown too; fewer dims than rows: all of them, by KL."""
    by_kl = sorted(range(len(kl_per_dim)), key=lambda d: -kl_per_dim[d])
    if n >= len(by_kl):
        return by_kl
    least = n // 4
    return by_kl[: n - least] + by_kl[len(by_kl) - least:]


class FixedGrids:
    """The sample, reconstruction and traversal grids of a run, drawn from the same z and the same inputs at
    every eval and in every run, so they compare across evals and across runs."""

    def __init__(self, z: torch.Tensor, x: torch.Tensor, traversal_dims: int, traversal_steps: int):
        self.z, self.x = z, x  # (n, latent_dim), (n, C, H, W) on the model's device
        self.traversal_dims, self.traversal_steps = traversal_dims, traversal_steps
        self.dims: List[int] = []  # the dims the last traversal grid walks, row by row

    @torch.no_grad()
    def save(self, model, run_dir: Path, step: Optional[int], kl_per_dim: Sequence[float]) -> Dict[str, Path]:
        """Per-eval grids under samples/ recons/ traversals/ (step_0001234.png), or the final ones in the run
        dir (step None); traversals show the dims with most KL and a few with least (traversal_dims). Returns
        {name: path}."""
        name = f"step_{step:07d}.png" if step is not None else None
        paths = {"samples": run_dir / (f"samples/{name}" if name else "samples.png"),
                 "reconstructions": run_dir / (f"recons/{name}" if name else "reconstructions.png"),
                 "traversals": run_dir / (f"traversals/{name}" if name else "traversals.png")}
        was_training = model.training
        model.eval()
        save_samples(model, self.z, paths["samples"])
        save_reconstructions(model, self.x, paths["reconstructions"])
        dims = self.dims = traversal_dims(kl_per_dim, self.traversal_dims)  # (the summary keeps the final ones)
        if dims:
            save_traversals(model, self.x[:1], dims, paths["traversals"], self.traversal_steps)
        else:
            del paths["traversals"]
        model.train(was_training)
        return paths
