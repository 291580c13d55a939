"""FID and KID of prior samples and of reconstructions against a split's real images (`eval.fid=true`).

An optional extra (`pip install -e ".[fid]"`): torchmetrics computes both from torch-fidelity's Inception-v3
(the 2048-d pool features of the original TF FID network), whose weights torch-fidelity fetches on first use
into torch's hub folder. Features of each image set are computed once and fed to both metrics.
FID (Heusel et al. 2017) is biased upwards at small N: compare FIDs only at the same `eval.fid_images`;
KID (Binkowski et al. 2018) is unbiased.
"""
from __future__ import annotations

import hashlib
import logging
import socket
import warnings
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn as nn

from .checkpoint import CheckpointError, UnsafePickle, load_weights_only
from .judge import MIN_FD_IMAGES
from .visuals import fixed_latents

log = logging.getLogger(__name__)

INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's file name
INCEPTION_SHA256_PREFIX = "6726825d"  # the published file's sha256 begins so (torch.hub's naming convention)
FETCH_TIMEOUT = 20.0  # seconds to reach the weights' server before giving up on FID for this run


class FidUnavailable(RuntimeError):
    """FID cannot be computed here; the message says how to provide what is missing."""


def missing_extra() -> Optional[str]:
    """One line naming eval.fid and the install command, or None when torchmetrics and torch-fidelity import."""
    try:
        import torch_fidelity  # noqa: F401
        import torchmetrics  # noqa: F401
    except ImportError as e:
        return f"eval.fid=true needs the optional extra ({e.name} is missing): pip install -e \".[fid]\""
    return None


class Features(nn.Module):
    """Images in [0, 1], (B, 1 or 3, H, W) -> (B, D) float64 features of `extractor` (grey images as RGB)."""

    def __init__(self, extractor: nn.Module, uint8: bool):
        super().__init__()
        self.extractor, self.uint8 = extractor, uint8

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().clamp(0, 1).expand(-1, 3, -1, -1)  # grey as RGB
        if self.uint8:  # the Inception network takes 0..255 bytes and resizes to 299 itself
            x = x.mul(255).round().to(torch.uint8)
        return self.extractor(x).flatten(1).double()


class Precomputed(nn.Module):
    """Features passed through as they are: each image set's features are computed once, for both metrics."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.double()


def inception(device: torch.device) -> Features:
    """torch-fidelity's Inception-v3 (pool3, 2048-d), fetching its weights once if they are not here yet;
    FidUnavailable, in one line, when they can be neither found nor fetched."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS
    if not path.is_file():
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

        path.parent.mkdir(parents=True, exist_ok=True)
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(FETCH_TIMEOUT)  # a node without internet must not hang here
        try:
            torch.hub.download_url_to_file(URL_INCEPTION_V3, str(path), progress=False)
        except Exception as e:
            raise FidUnavailable(
                f"eval.fid: the Inception weights are not at {path} and could not be fetched "
                f"({type(e).__name__}: {str(e).splitlines()[0][:100]}); copy {INCEPTION_WEIGHTS} there (or set "
                "TORCH_HOME to a folder holding checkpoints/ with it), or run once with internet. "
                "FID and KID are skipped; the run is not affected") from None
        finally:
            socket.setdefaulttimeout(previous)
    _check_weights(path)
    try:
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                 feature_extractor_weights_path=str(path))
    except (RuntimeError, KeyError, ValueError) as e:  # a state dict of another network
        raise FidUnavailable(f"eval.fid: {path} does not hold the Inception weights ({type(e).__name__}); "
                             f"replace it with torch-fidelity's {INCEPTION_WEIGHTS}. FID and KID are skipped; the "
                             "run is not affected") from None
    return Features(net, uint8=True).to(device).eval()


def _check_weights(path: Path) -> None:
    """torch-fidelity unpickles the weights file without restriction, and offline users put that file in place by
    hand: it is first loaded here weights-only (tensors and plain types), so a file that would run code when
    unpickled is refused unloaded, and a damaged one is one line instead of a failed run."""
    try:
        load_weights_only(path)
    except UnsafePickle as e:
        raise FidUnavailable(f"eval.fid: {e}; replace it with torch-fidelity's {INCEPTION_WEIGHTS}. FID and KID "
                             "are skipped; the run is not affected") from None
    except CheckpointError as e:
        raise FidUnavailable(f"eval.fid: {e}; delete it (it is fetched again with internet) or replace it with "
                             f"{INCEPTION_WEIGHTS}. FID and KID are skipped; the run is not affected") from None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if not digest.hexdigest().startswith(INCEPTION_SHA256_PREFIX):
        raise FidUnavailable(f"eval.fid: {path} is not the published Inception weights (its sha256 starts "
                             f"{digest.hexdigest()[:8]}, the published file's {INCEPTION_SHA256_PREFIX}); replace it "
                             f"with torch-fidelity's {INCEPTION_WEIGHTS}. FID and KID are skipped; the run is not "
                             "affected")


def features_of(images: torch.Tensor, extractor: nn.Module, batch_size: int, device: torch.device) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] -> (N, D) float64 features, batch by batch."""
    return torch.cat([extractor(images[i : i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)])


def fid_kid(real: torch.Tensor, fakes: Dict[str, torch.Tensor], kid_subset: int = 1000) -> Dict[str, float]:
    """FID and KID of each feature set in `fakes` against the `real` features ((N, D) each), by torchmetrics;
    keys fid_<name>, kid_<name>."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    identity = Precomputed(real.shape[1])
    fid = FrechetInceptionDistance(feature=identity, reset_real_features=False)
    fid.update(real, real=True)
    out = {}
    for name, fake in fakes.items():
        fid.update(fake, real=False)
        out[f"fid_{name}"] = float(fid.compute())
        fid.reset()
        with warnings.catch_warnings():  # "saves all features in a buffer": that is the point, at these N
            warnings.simplefilter("ignore", UserWarning)
            kid = KernelInceptionDistance(feature=identity, subset_size=min(kid_subset, len(real), len(fake)))
        kid.update(real, real=True)
        kid.update(fake, real=False)
        with torch.random.fork_rng():  # KID averages over random subsets: the same ones every time
            torch.manual_seed(0)
            out[f"kid_{name}"] = float(kid.compute()[0])
    return out


@torch.no_grad()
def sample_and_recon_scores(model, images: np.ndarray, n: int, extractor: nn.Module, batch_size: int,
                            device: torch.device) -> Dict[str, float]:
    """FID and KID of n prior samples (fixed z) and of the reconstructions of n real images, both against those
    n real images of the split: fid_samples, kid_samples, fid_recon, kid_recon, fid_images."""
    real = torch.from_numpy(np.array(images[:n])).float().div(255)
    z = fixed_latents(len(real), model.latent_dim)
    samples = torch.cat([model.sample(z[i : i + batch_size].to(device)).float().cpu()
                         for i in range(0, len(z), batch_size)])
    recon = torch.cat([model.reconstruct(real[i : i + batch_size].to(device)).float().cpu()
                       for i in range(0, len(real), batch_size)])
    feats = {k: features_of(v, extractor, batch_size, device) for k, v in
             (("real", real), ("samples", samples), ("recon", recon))}
    scores = fid_kid(feats.pop("real"), feats)
    scores["fid_images"] = len(real)
    return scores


def evaluate_fid(model, images: np.ndarray, cfg, device: torch.device, split: str) -> Dict[str, float]:
    """`split/`-prefixed FID and KID with the Inception network, or nothing (and one warning) without it."""
    try:
        extractor = inception(device)
    except FidUnavailable as e:
        log.warning("%s", e)
        return {}
    n = min(cfg.eval.fid_images, len(images))
    if n < MIN_FD_IMAGES:  # (eval.fid_images is checked at start; the split's size is the data's)
        log.warning("FID and KID skipped: they need at least %d %s images, the split has %d", MIN_FD_IMAGES, split, n)
        return {}
    log.info("FID and KID on %d %s images, samples and reconstructions", n, split)
    scores = sample_and_recon_scores(model, images, cfg.eval.fid_images, extractor, cfg.data.eval_batch_size, device)
    return {f"{split}/{k}": v for k, v in scores.items()}
