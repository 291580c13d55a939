"""Samples from where the data is: a Gaussian mixture fitted to the encoded training images (an ex-post density
estimate of the aggregate posterior, Ghosh et al. 2020, "From variational to deterministic autoencoders").

A VAE's prior N(0, I) puts samples wherever the aggregate posterior q(z) leaves holes, and the decoder never learnt
what to draw there. The final test eval (eval.gmm_components > 0) fits k diagonal Gaussians with scikit-learn to
the posterior means of the first eval.gmm_images training images, saves them in the run dir (prior_gmm.npz: plain
arrays, loaded without unpickling), and scores the mixture's samples with the judge beside the standard-normal
prior's (test/gmm_judge_*), so a sweep shows how much sample quality the holes cost each setting.
`python -m src.sample <run> prior=gmm` draws from it.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from .data import eval_batches
from .judge import JudgedReal, prior_scores
from .rundir import RunDir, atomic_write
from .visuals import save_samples

log = logging.getLogger(__name__)

GMM_FILE = RunDir("").mixture.name  # prior_gmm.npz
GMM_SEED = 0  # the mixture's k-means start and its samples: the same in every run and eval
GMM_GRID = RunDir("").mixture_samples.name  # samples_gmm.png, beside samples.png: its samples, from the mixture


class PriorError(ValueError):
    """A saved mixture that is missing or damaged; the message names the file and the fix."""


@dataclass
class MixturePrior:
    """p(z) = sum_k weights_k N(z; means_k, diag variances_k): weights (K,), means and variances (K, D); `step`:
    the training step of the checkpoint whose encoder it was fitted to."""
    weights: np.ndarray
    means: np.ndarray
    variances: np.ndarray
    step: int = -1

    def sample(self, n: int, generator: torch.Generator, temperature: float = 1.0) -> torch.Tensor:
        """(n, D) float32 latents: a component by its weight, then its mean plus temperature x its sd x N(0, I)."""
        which = torch.multinomial(torch.from_numpy(self.weights), n, replacement=True, generator=generator)
        means, sds = torch.from_numpy(self.means)[which], torch.from_numpy(np.sqrt(self.variances))[which]
        return (means + temperature * sds * torch.randn(means.shape, generator=generator, dtype=means.dtype)).float()

    def save(self, path: Path) -> None:
        with atomic_write(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, weights=self.weights, means=self.means, variances=self.variances, step=np.int64(self.step))

    @classmethod
    def load(cls, path: Path) -> "MixturePrior":
        try:
            with np.load(path, allow_pickle=False) as saved:  # arrays only: a file that holds objects is refused
                prior = cls(saved["weights"].astype(np.float64), saved["means"].astype(np.float64),
                            saved["variances"].astype(np.float64), int(saved["step"]))
        except FileNotFoundError:
            raise PriorError(f"{path} not found: the final test eval writes it where eval.gmm_components > 0, and so "
                             "does `python -m src.evaluate <run dir>`") from None
        except (OSError, ValueError, KeyError) as e:
            raise PriorError(f"{path} is not a saved mixture ({type(e).__name__}: {str(e)[:80]}); delete it and "
                             "run the final eval again") from None
        if prior.means.ndim != 2 or prior.variances.shape != prior.means.shape or len(prior.weights) != len(prior.means):
            raise PriorError(f"{path} holds arrays of inconsistent shapes; delete it and run the final eval again")
        if not (np.isfinite(prior.means).all() and np.isfinite(prior.variances).all() and (prior.variances >= 0).all()
                and np.isfinite(prior.weights).all() and (prior.weights >= 0).all() and prior.weights.sum() > 0):
            raise PriorError(f"{path} holds weights or variances that are not a mixture (negative or not finite); "
                             "delete it and run the final eval again")
        return prior


def fit_mixture(codes: np.ndarray, components: int, step: int = -1, seed: int = GMM_SEED) -> MixturePrior:
    """k diagonal Gaussians fitted by EM (scikit-learn) to codes (N, D); at most one component per code. Codes
    that all sit at a few points (a collapsed encoder) give components on those points, with one line instead of
    scikit-learn's warning."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    k = max(1, min(components, len(codes)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        gmm = GaussianMixture(k, covariance_type="diag", random_state=seed, reg_covar=1e-6).fit(codes.astype(np.float64))
    for w in caught:  # (any other warning goes on as it came)
        if not issubclass(w.category, ConvergenceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        log.info("Mixture prior: %d components on %d codes that are not %d distinct clusters (a collapsed encoder "
                 "puts its codes at few points); the mixture keeps them", k, len(codes), k)
    return MixturePrior(gmm.weights_ / gmm.weights_.sum(), gmm.means_, gmm.covariances_, step)


@torch.no_grad()
def encoded_means(model, images: np.ndarray, n: int, batch: int, device: torch.device) -> np.ndarray:
    """(min(n, N), D) posterior means of the first n of uint8 images (N, C, H, W), in eval mode."""
    was_training = model.training
    model.eval()
    means = [model.encode(x)[0].float().cpu() for x in eval_batches(images[:n], batch, device)]
    model.train(was_training)
    return torch.cat(means).numpy()


def mixture_quality(model, train_images: np.ndarray, real: Optional[JudgedReal], cfg, device: torch.device,
                    run_dir: Path, step: int, split: str = "test", grid: bool = True) -> Dict[str, float]:
    """The mixture prior of the checkpoint at `step`: fitted to the posterior means of the first eval.gmm_images
    train images, saved as run_dir/prior_gmm.npz, its samples drawn as samples_gmm.png; with a judge that beats
    chance, its eval.fid_images samples scored against the real images of `split` as the standard prior's are:
    <split>/gmm_judge_*. The one definition the final eval and src.evaluate share. `grid` False: no samples_gmm.png
    (another checkpoint than the run's last: the grid stays beside samples.png, of the same checkpoint)."""
    codes = encoded_means(model, train_images, cfg.eval.gmm_images, cfg.data.eval_batch_size, device)
    codes = codes[np.isfinite(codes).all(1)]  # an image the encoder maps to inf has no place in a density
    if len(codes) == 0:
        log.warning("Mixture prior skipped: the encoder gave no finite posterior mean for the train images")
        return {}
    prior = fit_mixture(codes, cfg.eval.gmm_components, step)
    prior.save(run_dir / GMM_FILE)
    z = prior.sample(max(cfg.eval.fid_images, cfg.trainer.num_samples), torch.Generator().manual_seed(GMM_SEED))
    if grid:
        was_training = model.training
        model.eval()
        with torch.no_grad():  # the grid samples.png is, from this prior
            save_samples(model, z[: cfg.trainer.num_samples].to(device), run_dir / GMM_GRID)
        model.train(was_training)
    log.info("Mixture prior: %d components fitted to %d encoded train images (%s, %s)", len(prior.weights),
             len(codes), GMM_FILE, GMM_GRID)
    out = {f"{split}/gmm_components": len(prior.weights)}
    if real is None or real.at_chance():  # (sample_quality said why, once)
        return out
    scores = prior_scores(model, real, z[: min(cfg.eval.fid_images, len(real.x))], device)
    return {**out, **{f"{split}/gmm_{k}": v for k, v in scores.items()}}
