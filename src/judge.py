"""A sample-quality judge that works offline: a small classifier trained once per data set on its own train split,
in whose features a model's prior samples are compared with the real test images (as FID does with Inception's,
Heusel et al. 2017), and whose accuracy on reconstructions says whether the content survived the code.

In those features torch-fidelity computes the Fréchet distance, KID (Bińkowski et al. 2018: unbiased at the 2,000
samples a member can afford, where FD is not) and precision and recall (Kynkäänniemi et al. 2019: fidelity, the
share of samples that land on the data, and diversity, the share of the data the samples reach); density and
coverage (Naeem et al. 2020, the same two questions, robust to outliers) are a few lines here on the same features.

Blur measures blur; a Gaussian decoder's incoherent blends of two classes can be sharp and still wrong. The judge
knows the classes, so blends sit far from the real images in its feature space. It is trained in seconds to a
minute on a CPU, cached beside the decoded data (keyed like the data), and loaded weights-only. Data sets without
classes (a plain image folder) skip these metrics with one line, and so does a judge that cannot tell the classes
apart (its accuracy on the real images near chance): its features would score noise as well as data.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

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
PRC_NEIGHBOURS = 3  # k of precision and recall's k-NN balls (Kynkäänniemi et al.; torch-fidelity's default)
DC_NEIGHBOURS = 5  # k of density and coverage (Naeem et al.'s choice)
KID_SUBSETS, KID_SUBSET = 10, 1000  # KID's mean and sd over 10 random subsets of min(1000, N/2) images (torch-fidelity's
# default of 100 subsets cost 11 s a member on a 2-core CPU, more than the rest of a small model's final eval)
CHANCE_LEAD = 0.1  # the judge must beat always guessing the commonest class by this much (and by 3 standard errors)


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


def judge_file(folder: Path) -> Path:
    """Where the judge of the data cached in `folder` (src.data.cache_folder) is kept."""
    return folder / f"judge-v{JUDGE_VERSION}.pt"


def load_or_train(folder: Path, images: np.ndarray, labels: np.ndarray, device: torch.device) -> Judge:
    """The judge cached in `folder` (the data's cache folder), or one trained now and cached there."""
    path = judge_file(folder)
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


def sample_scores(fake: np.ndarray, real: np.ndarray,
                  real_radius: Optional[Callable[[int], torch.Tensor]] = None) -> Dict[str, float]:
    """Samples' features against real images' ((N, D) each, N >= 2): judge_fd (Fréchet distance), judge_kid and
    judge_kid_sd (KID, mean and sd over subsets), judge_precision and judge_recall (k = PRC_NEIGHBOURS), and
    judge_density and judge_coverage (k = DC_NEIGHBOURS), each where N allows its k. FD and KID by torch-fidelity's
    own functions on these features; precision and recall as its prc_features_to_metric computes them (the same
    numbers: tests/test_judge.py), here so that what depends on the real images alone, each one's distance to its
    k-th neighbour, is `real_radius(k)` (JudgedReal.radius: once for a pack's members and a run's two priors), and
    one distance matrix serves them and density and coverage."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric

    a, b = torch.from_numpy(fake).double(), torch.from_numpy(real).double()
    radius = real_radius or partial(knn_radius, b)
    stats = [fid_features_to_statistics(t) for t in (a, b)]
    out = {"judge_fd": max(0.0, fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"])}
    subset = min(KID_SUBSET, max(2, min(len(a), len(b)) // 2))
    kid = kid_features_to_metric(a, b, kid_subsets=KID_SUBSETS, kid_subset_size=subset, kid_kernel="poly",
                                 kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1,
                                 rng_seed=2020, verbose=False)
    out["judge_kid"], out["judge_kid_sd"] = kid["kernel_inception_distance_mean"], kid["kernel_inception_distance_std"]
    prc, dc = min(len(a), len(b)) > PRC_NEIGHBOURS, len(b) > DC_NEIGHBOURS  # where N allows their k
    d = torch.cdist(b, a) if prc or dc else None  # (N, M): real image i to sample j
    if prc:
        out.update(precision_recall(d, radius(PRC_NEIGHBOURS), knn_radius(a, PRC_NEIGHBOURS)))
    if dc:
        out.update(density_coverage(d, radius(DC_NEIGHBOURS), DC_NEIGHBOURS))
    return out


def knn_radius(x: torch.Tensor, k: int) -> torch.Tensor:
    """(N,) each point's distance to its k-th nearest neighbour in x (N, D), past itself."""
    return torch.cdist(x, x).kthvalue(k + 1, dim=1).values


def precision_recall(d: torch.Tensor, real_radius: torch.Tensor, fake_radius: torch.Tensor) -> Dict[str, float]:
    """Kynkäänniemi et al. 2019 from the distances d (N real, M samples) and each point's k-NN radius in its own
    set: judge_precision, the share of samples inside some real image's ball (fidelity); judge_recall, the share of
    real images inside some sample's ball (diversity)."""
    return {"judge_precision": (d <= real_radius[:, None]).any(dim=0).float().mean().item(),
            "judge_recall": (d <= fake_radius).any(dim=1).float().mean().item()}


def density_coverage(d: torch.Tensor, real_radius: torch.Tensor, k: int) -> Dict[str, float]:
    """Naeem et al. 2020 from the distances d (N real, M samples), each real image's ball reaching its k-th nearest
    real neighbour (`real_radius`, (N,)). judge_density: the mean number of balls a sample falls in, over k (about
    1 where samples follow the data, above 1 where they crowd its dense parts); judge_coverage: the share of real
    images whose ball holds a sample (0 to 1: how much of the data the samples reach)."""
    inside = d <= real_radius[:, None]  # (N, M)
    return {"judge_density": int(inside.sum()) / (k * d.shape[1]), "judge_coverage": int(inside.any(1).sum()) / len(d)}


@dataclass
class JudgedReal:
    """The judge and what it makes of the first n real test images: the same for every run on the data, so a pack
    computes it once for its members."""
    judge: Judge
    x: torch.Tensor  # (n, C, H, W) float in [0, 1]
    labels: np.ndarray  # (n,)
    features: np.ndarray  # (n, 128)
    accuracy: float  # the judge's own accuracy on them: the ceiling of recon_accuracy
    chance: float  # the accuracy of always guessing their commonest class
    radii: Dict[Tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False)  # radius()'s, once each

    def radius(self, n: int, k: int) -> torch.Tensor:
        """(n,) each of the first n images' distance to its k-th nearest neighbour among them, in features."""
        if (n, k) not in self.radii:
            self.radii[n, k] = knn_radius(torch.from_numpy(self.features[:n]).double(), k)
        return self.radii[n, k]

    def at_chance(self) -> bool:
        """The judge cannot tell these images' classes apart: its accuracy is within CHANCE_LEAD, or 3 standard
        errors, of always guessing the commonest class."""
        se = float(np.sqrt(self.chance * (1 - self.chance) / max(1, len(self.labels))))
        return self.accuracy < self.chance + max(CHANCE_LEAD, 3 * se)


def judged_split(data, folder: Path, device: torch.device, split: str, n: int) -> Optional[JudgedReal]:
    """The data set's judge and its view of the first `n` real images of `split`; None where the data has no
    classes."""
    judge = judge_for(data, folder, device)
    return None if judge is None else judge_real(judge, data.images[split], data.labels[split], n)


def judge_real(judge: Judge, images: np.ndarray, labels: np.ndarray, n: int) -> JudgedReal:
    x = torch.from_numpy(np.array(images[:n])).float().div(255)  # a copy: the cache is a read-only memory map
    labels = np.asarray(labels[:n])
    chance = float(np.bincount(labels).max() / len(labels))
    return JudgedReal(judge, x, labels, features(judge, x), accuracy(judge, x, labels), chance)


@torch.no_grad()
def content_metrics(model, real: JudgedReal, z: torch.Tensor, device: torch.device) -> Dict[str, float]:
    """The judge's view of decoded prior samples z against the real images: prior_scores' judge_* (lower FD and
    KID, higher precision, recall and coverage, density near 1 are better), recon_accuracy (the judge's accuracy on
    the reconstructions, posterior means, of those images) and judge_accuracy (on the images themselves: the
    ceiling recon_accuracy can reach) with judge_chance (always guessing the commonest class). A judge at chance
    gives only the last two, and one line saying why (so does a split of one image, whose classes cannot be told
    apart; eval.fid_images is at least MIN_FD_IMAGES, so the scores always have the two images a covariance needs)."""
    out = {"judge_accuracy": real.accuracy, "judge_chance": real.chance}
    if real.at_chance():
        log.warning("Judge metrics skipped: the judge classifier is at chance on the real images (accuracy %.3f, "
                    "commonest class %.3f over %d images), so its features would score noise as well as data; "
                    "more train images per class, or eval.judge=false", real.accuracy, real.chance, len(real.labels))
        return out
    n = min(len(real.x), len(z))
    was_training = model.training
    model.eval()
    recons = torch.cat([model.likelihood.mean(model.decode(model.encode(real.x[i: i + 512].to(device))[0])).float()
                        .cpu() for i in range(0, n, 512)])
    model.train(was_training)
    out["recon_accuracy"] = accuracy(real.judge, recons, real.labels[:n])
    return {**prior_scores(model, real, z[:n], device), **out}


@torch.no_grad()
def prior_scores(model, real: JudgedReal, z: torch.Tensor, device: torch.device) -> Dict[str, float]:
    """sample_scores of the decoder means at latents z (any prior's samples) against as many of the real images."""
    was_training = model.training
    model.eval()
    samples = torch.cat([model.likelihood.mean(model.decode(z[i: i + 512].to(device))).float().cpu()
                         for i in range(0, len(z), 512)])
    model.train(was_training)
    return sample_scores(features(real.judge, samples), real.features[: len(z)], partial(real.radius, len(z)))


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
