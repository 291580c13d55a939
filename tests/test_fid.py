"""FID and KID (the optional extra): the Frechet distance against its closed form on Gaussians, the pipeline
through a small stand-in feature extractor, and a run on a machine that cannot fetch the Inception weights."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from src.fid import INCEPTION_WEIGHTS, Features, fid_kid, sample_and_recon_scores
from src.likelihoods import Bernoulli
from src.models import MLPVAE

from .conftest import run_cli, tiny_overrides


def _gaussian(mean, var, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.tensor(mean) + torch.randn(n, len(mean), generator=g, dtype=torch.float64) * torch.tensor(var).sqrt()


def test_frechet_distance_matches_the_closed_form_on_gaussians():
    # diagonal covariances: FID = |m1 - m2|^2 + sum (sqrt(a) - sqrt(b))^2
    m1, a = [0.0, 1.0, -1.0, 2.0], [1.0, 0.5, 2.0, 1.0]
    m2, b = [0.5, 1.0, 0.0, 2.0], [4.0, 0.5, 0.5, 1.0]
    closed = sum((x - y) ** 2 for x, y in zip(m1, m2)) + sum((x**0.5 - y**0.5) ** 2 for x, y in zip(a, b))
    real, fake, same = _gaussian(m1, a, 40000, 0), _gaussian(m2, b, 40000, 1), _gaussian(m1, a, 40000, 2)
    scores = fid_kid(real, {"other": fake, "same": same}, kid_subset=300)  # (1000: 14 s of float64 kernels, same verdict)
    assert closed == pytest.approx(2.75) and scores["fid_other"] == pytest.approx(closed, rel=0.03)
    assert scores["fid_same"] == pytest.approx(0.0, abs=0.01)
    assert abs(scores["kid_same"]) < 1e-3 * scores["kid_other"]  # KID is unbiased: about 0 for the same law


class TinyFeatures(nn.Module):
    """A fixed random conv net standing in for Inception: (B, 3, H, W) in [0, 1] -> (B, 16)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        return self.net(x)


def test_the_pipeline_scores_samples_and_reconstructions_against_the_real_images():
    rng = np.random.default_rng(0)
    images = (rng.random((300, 1, 8, 8)) > 0.5).astype(np.uint8) * 255
    torch.manual_seed(0)
    model = MLPVAE(1, 8, [16], 4, Bernoulli()).eval()
    extractor = Features(TinyFeatures(), uint8=False)
    scores = sample_and_recon_scores(model, images, 256, extractor, 64, torch.device("cpu"))
    assert scores["fid_images"] == 256
    assert scores["fid_samples"] > 0 and scores["fid_recon"] > 0 and scores["kid_samples"] > 0
    # the real images against themselves: exactly 0, through the same pipeline
    real = torch.from_numpy(images[:256]).float() / 255
    feats = torch.cat([extractor(real[i : i + 64]) for i in range(0, 256, 64)])
    assert fid_kid(feats, {"real": feats})["fid_real"] == pytest.approx(0.0, abs=1e-6)


def test_without_the_inception_weights_and_offline_the_run_finishes_and_says_how_to_provide_them(tmp_path):
    run = tmp_path / "run"
    # an empty torch hub folder, and every download refused at once by a proxy port nothing listens on
    env = {"TORCH_HOME": str(tmp_path / "torch"), "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": None}
    proc = run_cli([*tiny_overrides(tmp_path / "cache"), "logger=none", "eval.fid=true", f"hydra.run.dir={run}"],
                   env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "Inception weights" in line]
    assert len(lines) == 1 and "weights-inception-2015-12-05-6726825d.pth" in lines[0] and "TORCH_HOME" in lines[0]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and "test/fid_samples" not in summary and "test/iwae_nll" in summary


class _RunsCode:
    """Unpickling this creates a file: the proof that a weights file ran code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("kind", ["runs_code", "damaged", "another_file"])
def test_inception_weights_that_would_run_code_or_are_damaged_are_refused_and_the_run_finishes(tmp_path, kind):
    run, marker = tmp_path / "run", tmp_path / "code-ran"
    weights = tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_WEIGHTS
    weights.parent.mkdir(parents=True)
    if kind == "runs_code":
        torch.save({"conv.weight": torch.zeros(1), "payload": _RunsCode(str(marker))}, weights)
    elif kind == "damaged":
        weights.write_bytes(b"PK\x03\x04 not a whole zip")
    else:  # tensors only, but not the published file (its hash differs)
        torch.save({"conv.weight": torch.zeros(1)}, weights)
    env = {"TORCH_HOME": str(tmp_path / "torch"), "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": None}
    proc = run_cli([*tiny_overrides(tmp_path / "cache"), "eval.fid=true", f"hydra.run.dir={run}"], env=env)
    assert proc.returncode == 0, proc.stdout[-2000:]
    [line] = [line for line in proc.stdout.splitlines() if "eval.fid:" in line]
    expected = {"runs_code": "refused unloaded", "damaged": "is damaged", "another_file": "not the published"}
    assert expected[kind] in line and str(weights) in line
    assert not marker.exists()  # nothing ran
    assert json.loads((run / "summary.json").read_text())["status"] == "finished"
