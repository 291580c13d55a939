"""A sample-quality number that works offline: a small classifier (the judge) trained once per data set on its own
train split, whose features give a Fréchet distance between a model's prior samples and the real test images (as
FID does with Inception's, Heusel et al. 2017), and whose accuracy on reconstructions says whether the content
survived the code.

Blur measures blur; a Gaussian decoder's incoherent blends of two classes can be sharp and still wrong. The judge
knows the classes, so blends sit far from the real images in its feature space. It is trained in seconds to a
minute on a CPU, cached beside the decoded data (keyed like the data), and loaded weights-only. Data sets without
classes (a plain image folder) skip these metrics with one line.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import CheckpointError, load_weights_only
from .rundir import atomic_write
from .visuals import fixed_latents

log = logging.getLogger(__name__)

JUDGE_VERSION = 1  # bump when the network or its training changes: cached judges are then trained again
FEATURES = 128
TRAIN_STEPS = 1500  # at most (two epochs of a small train split are fewer)
BATCH = 128
MIN_FD_IMAGES = 2  # a Fréchet distance compares covariances: one image has none


class Judge(nn.Module):
    """Three strided convs and a global average: (B, C, H, W) in [0, 1] -> (B, 128) features -> class logits."""

    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(64, FEATURES, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(FEATURES, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_judge(images: np.ndarray, labels: np.ndarray, device: torch.device, seed: int = 0) -> Judge:
    """A judge for uint8 images (N, C, H, W) and their classes (N,): Adam, two epochs or TRAIN_STEPS at most."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        judge = Judge(images.shape[1], int(labels.max()) + 1).to(device)
    optimizer = torch.optim.Adam(judge.parameters(), 1e-3)
    steps = min(TRAIN_STEPS, max(1, 2 * len(images) // BATCH))
    y_all = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    judge.train()
    for _ in range(steps):
        idx = torch.randint(len(images), (min(BATCH, len(images)),), generator=generator)
        x = torch.from_numpy(np.asarray(images[idx.numpy()])).float().div(255).to(device)
        loss = F.cross_entropy(judge(x), y_all[idx].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return judge.eval()


def load_or_train(folder: Path, images: np.ndarray, labels: np.ndarray, device: torch.device) -> Judge:
    """The judge cached in `folder` (the data's cache folder), or one trained now and cached there."""
    path = folder / f"judge-v{JUDGE_VERSION}.pt"
    classes = int(labels.max()) + 1
    if path.is_file():
        try:
            saved = load_weights_only(path)
            judge = Judge(images.shape[1], classes)
            judge.load_state_dict(saved["state_dict"])
            return judge.to(device).eval()
        except (CheckpointError, KeyError, RuntimeError, TypeError) as e:
            log.warning("The judge classifier in %s is damaged (%s); training it again", path, str(e)[:120])
    log.info("Training the judge classifier for sample quality (once per data set; cached in %s)", folder)
    judge = train_judge(images, labels, device)
    state = {"state_dict": {k: v.cpu() for k, v in judge.state_dict().items()}, "classes": classes}
    try:
        with atomic_write(path) as tmp:
            torch.save(state, tmp)
    except OSError as e:  # a read-only cache: the next run trains its own
        log.warning("Could not cache the judge classifier in %s (%s)", folder, e.strerror)
    return judge


@torch.no_grad()
def features(judge: Judge, images: torch.Tensor, batch: int = 512) -> np.ndarray:
    """(N, 128) float64 features of float images (N, C, H, W) in [0, 1]."""
    device = next(judge.parameters()).device
    return torch.cat([judge.features(images[i: i + batch].to(device).float()).double().cpu()
                      for i in range(0, len(images), batch)]).numpy()


@torch.no_grad()
def accuracy(judge: Judge, images: torch.Tensor, labels: np.ndarray, batch: int = 512) -> float:
    device = next(judge.parameters()).device
    predicted = torch.cat([judge(images[i: i + batch].to(device).float()).argmax(1).cpu()
                           for i in range(0, len(images), batch)])
    return float((predicted.numpy() == np.asarray(labels)).mean())


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two feature sets (N, D): 0 for identical sets."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr (S_a S_b)^(1/2) = Tr (S_a^(1/2) S_b S_a^(1/2))^(1/2): symmetric matrices only, so no complex rounding
    # and no failure when fewer images than features leave a covariance singular
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0, None)).sum()
    return float(max(0.0, ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross))


@dataclass
class JudgedReal:
    """The judge and what it makes of the first n real test images: the same for every run on the data, so a pack
    computes it once for its members."""
    judge: Judge
    x: torch.Tensor  # (n, C, H, W) float in [0, 1]
    labels: np.ndarray  # (n,)
    features: np.ndarray  # (n, 128)
    accuracy: float  # the judge's own accuracy on them: the ceiling of recon_accuracy


def judged_split(data, folder: Path, device: torch.device, split: str, n: int) -> Optional[JudgedReal]:
    """The data set's judge and its view of the first `n` real images of `split`; None where the data has no
    classes."""
    judge = judge_for(data, folder, device)
    return None if judge is None else judge_real(judge, data.images[split], data.labels[split], n)


def judge_real(judge: Judge, images: np.ndarray, labels: np.ndarray, n: int) -> JudgedReal:
    x = torch.from_numpy(np.array(images[:n])).float().div(255)  # a copy: the cache is a read-only memory map
    return JudgedReal(judge, x, np.asarray(labels[:n]), features(judge, x), accuracy(judge, x, labels[:n]))


@torch.no_grad()
def content_metrics(model, real: JudgedReal, z: torch.Tensor, device: torch.device) -> Dict[str, float]:
    """judge_fd: Fréchet distance (judge features) between decoded prior samples z and the real images (lower is
    better; real images against other real images of the data sit near 0); recon_accuracy: the judge's accuracy
    on the reconstructions (posterior means) of those images; judge_accuracy: on the images themselves, the
    ceiling recon_accuracy can reach."""
    was_training = model.training
    model.eval()
    n = min(len(real.x), len(z))
    samples = torch.cat([model.likelihood.mean(model.decode(z[i: i + 512].to(device))).float().cpu()
                         for i in range(0, n, 512)])
    recons = torch.cat([model.likelihood.mean(model.decode(model.encode(real.x[i: i + 512].to(device))[0])).float()
                        .cpu() for i in range(0, n, 512)])
    model.train(was_training)
    out = {"recon_accuracy": accuracy(real.judge, recons, real.labels[:n]), "judge_accuracy": real.accuracy}
    if n < MIN_FD_IMAGES:  # a covariance of one image does not exist: no distance, rather than a failed run
        log.warning("judge_fd skipped: a Fréchet distance needs at least %d images; the test split or eval.fid_images "
                    "gives %d", MIN_FD_IMAGES, n)
        return out
    return {"judge_fd": frechet_distance(features(real.judge, samples), real.features[:n]), **out}


def sample_quality(model, real: JudgedReal, images: int, device: torch.device, split: str = "test") -> Dict[str, float]:
    """content_metrics on the fixed prior latents every run draws (eval.fid_images of them), named for `split`:
    the one definition the final eval and src.evaluate share."""
    z = fixed_latents(images, model.latent_dim).to(device)
    return {f"{split}/{k}": v for k, v in content_metrics(model, real, z, device).items()}


def judge_for(data, folder: Path, device: torch.device) -> Optional[Judge]:
    """The data set's judge, or None (with one line) where the data has no classes."""
    if "train" not in data.labels:
        log.info("Sample quality by classifier (judge_fd, recon_accuracy) skipped: this data set has no classes")
        return None
    return load_or_train(folder, data.images["train"], data.labels["train"], device)
