"""The judge: a small classifier of the data's own classes whose features give a Fréchet distance between samples
and real images (an offline FID) and whose accuracy on reconstructions says whether content survives. Trained here
for real on generated shapes (the class is the shape), in about a second."""
from __future__ import annotations

import logging
import pickle

import numpy as np
import pytest
import torch
from torchvision.transforms.functional import gaussian_blur

from src.data import cache_folder, load_data
from src.judge import JUDGE_VERSION, features, frechet_distance, judge_for, load_or_train
from src.sources import ImageData
from src.config_check import parse

from .conftest import compose_cfg


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    cfg = parse(compose_cfg(["data.image_size=16", "data.num_train=4096", "data.test_size=1024", "data.val_size=64",
                             f"data.cache_dir={tmp_path_factory.mktemp('judge-cache')}"]))
    data = load_data(cfg.data)
    judge = judge_for(data, cache_folder(cfg.data), torch.device("cpu"))
    test = torch.from_numpy(np.array(data.images["test"])).float() / 255
    return cfg, data, judge, test[:512], test[512:], data.labels["test"][512:]


def test_the_same_law_is_near_zero_and_blur_and_noise_raise_it_strictly(shapes):
    _, _, judge, a, b, _ = shapes
    fa = features(judge, a)
    assert frechet_distance(fa, fa) == pytest.approx(0, abs=1e-6)
    same_law = frechet_distance(fa, features(judge, b))  # other real images of the same data
    blurred = [frechet_distance(fa, features(judge, gaussian_blur(b, 5, s))) for s in (0.5, 1.0, 2.0)]
    generator = torch.Generator().manual_seed(0)
    noisy = [frechet_distance(fa, features(judge, (b + s * torch.randn(b.shape, generator=generator)).clamp(0, 1)))
             for s in (0.05, 0.1, 0.2)]
    assert same_law < blurred[0] < blurred[1] < blurred[2], (same_law, blurred)
    assert same_law < noisy[0] < noisy[1] < noisy[2], (same_law, noisy)


def test_blends_of_two_classes_rank_worse_than_real_images(shapes):
    """A generator of sharp blends of two classes (a Gaussian decoder's failure) is far from the data; one that
    outputs real images is not."""
    _, _, judge, a, b, labels = shapes
    other = np.array([np.flatnonzero(labels != label)[0] for label in labels])
    blends = (b + b[other]) / 2
    fa = features(judge, a)
    assert frechet_distance(fa, features(judge, blends)) > 5 * frechet_distance(fa, features(judge, b))


def test_the_judge_is_cached_loaded_weights_only_and_a_damaged_one_is_retrained(shapes, caplog):
    cfg, data, judge, a, _, _ = shapes
    path = cache_folder(cfg.data) / f"judge-v{JUDGE_VERSION}.pt"
    again = load_or_train(path.parent, data.images["train"], data.labels["train"], torch.device("cpu"))
    np.testing.assert_array_equal(features(again, a), features(judge, a))  # the cached one, not a new one

    class Runs:  # a pickle that would run code when loaded without weights_only
        def __reduce__(self):
            return (exec, ("raise SystemExit('ran')",))

    path.write_bytes(pickle.dumps({"state_dict": Runs()}))
    with caplog.at_level(logging.WARNING, logger="src.judge"):
        retrained = load_or_train(path.parent, data.images["train"], data.labels["train"], torch.device("cpu"))
    assert "damaged" in caplog.text and retrained is not None
    assert load_or_train(path.parent, data.images["train"], data.labels["train"], torch.device("cpu")) is not None


def test_data_without_classes_skips_the_judge_with_one_line(tmp_path, caplog):
    data = ImageData({s: np.zeros((4, 1, 8, 8), np.uint8) for s in ("train", "val", "test")})
    with caplog.at_level(logging.INFO, logger="src.judge"):
        assert judge_for(data, tmp_path, torch.device("cpu")) is None
    assert "skipped: this data set has no classes" in caplog.text


def test_a_test_split_of_one_image_finishes_without_a_frechet_distance(cache_dir, tmp_path, caplog):
    """A covariance of one image does not exist: the run finishes with the judge's accuracies and one line saying
    why judge_fd is missing (it once failed after training with LinAlgError, and every rerun again)."""
    from src.train import train

    from .conftest import tiny_overrides

    cfg = compose_cfg([*tiny_overrides(cache_dir), "data.test_size=1"])
    with caplog.at_level(logging.WARNING):
        summary = train(cfg, run_dir=tmp_path / "run")
    assert summary["status"] == "finished" and "test/recon_accuracy" in summary and "test/judge_fd" not in summary
    assert "judge_fd skipped: a Fréchet distance needs at least 2 images" in caplog.text
