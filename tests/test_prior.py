"""The mixture prior (src/prior.py): fitted to known codes it recovers their law and its samples reach the data that
N(0, I)'s miss; saved as plain arrays and refused when the file would unpickle objects; the final eval writes it and
scores its samples; src.sample draws from it, and a missing or stale one is one line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from src.judge import sample_scores
from src.prior import GMM_FILE, GMM_GRID, MixturePrior, PriorError, fit_mixture
from src.train import train

from .conftest import compose_cfg, run_cli, tiny_overrides

WEIGHTS, MEANS, SDS = np.array([0.3, 0.7]), np.array([[-3.0, 0.0], [3.0, 1.0]]), np.array([[0.5, 0.5], [0.2, 0.3]])


def _two_modes(n: int, seed: int) -> np.ndarray:
    g = np.random.default_rng(seed)
    which = (g.random(n) < WEIGHTS[1]).astype(int)
    return MEANS[which] + SDS[which] * g.standard_normal((n, 2))


def test_a_mixture_fitted_to_two_known_modes_recovers_them_and_its_samples_reach_the_data():
    prior = fit_mixture(_two_modes(4000, 0), components=2)
    order = np.argsort(prior.means[:, 0])
    np.testing.assert_allclose(prior.weights[order], WEIGHTS, atol=0.03)
    np.testing.assert_allclose(prior.means[order], MEANS, atol=0.05)
    np.testing.assert_allclose(np.sqrt(prior.variances[order]), SDS, atol=0.03)
    data = _two_modes(2000, 1)
    mixture = prior.sample(2000, torch.Generator().manual_seed(0)).double().numpy()
    standard = np.random.default_rng(2).standard_normal((2000, 2))
    from_mixture, from_standard = sample_scores(mixture, data), sample_scores(standard, data)
    # N(0, I) draws most samples between the modes (precision 0.10): a hole of the codes' law. Its k-NN recall is
    # still high (0.89: its sparse samples in the tails have wide balls), coverage, which is robust to them, is not
    assert from_mixture["judge_recall"] > from_standard["judge_recall"] and from_mixture["judge_recall"] > 0.95
    assert from_mixture["judge_coverage"] > 0.9 > from_standard["judge_coverage"] + 0.5
    assert from_mixture["judge_precision"] > 0.9 > from_standard["judge_precision"] + 0.5


def test_the_mixture_is_saved_as_plain_arrays_and_a_file_that_would_unpickle_is_refused(tmp_path):
    prior = fit_mixture(_two_modes(500, 0), components=2, step=7)
    prior.save(tmp_path / GMM_FILE)
    again = MixturePrior.load(tmp_path / GMM_FILE)
    assert again.step == 7
    for name in ("weights", "means", "variances"):
        np.testing.assert_array_equal(getattr(again, name), getattr(prior, name))
    hostile = tmp_path / "hostile.npz"
    np.savez(hostile, weights=np.array([object()], dtype=object), means=prior.means, variances=prior.variances, step=1)
    with pytest.raises(PriorError, match="not a saved mixture"):
        MixturePrior.load(hostile)
    with pytest.raises(PriorError, match="not found"):
        MixturePrior.load(tmp_path / "missing.npz")
    negative = tmp_path / "negative.npz"
    np.savez(negative, weights=-prior.weights, means=prior.means, variances=prior.variances, step=1)
    with pytest.raises(PriorError, match="not a mixture"):
        MixturePrior.load(negative)


def test_the_final_eval_fits_the_mixture_scores_its_samples_and_src_sample_draws_from_it(tmp_path, cache_dir):
    run = tmp_path / "run"
    overrides = [*tiny_overrides(cache_dir), "data.num_train=2048", "data.test_size=256", "eval.gmm_components=3",
                 "eval.fid_images=256"]  # a judge trained on 2,048 images sees the classes (256 leave it at chance)
    summary = train(compose_cfg(overrides), run_dir=run)
    assert summary["test/gmm_components"] == 3 and (run / GMM_GRID).is_file()
    prior = MixturePrior.load(run / GMM_FILE)
    assert prior.means.shape == (3, 4) and prior.step == summary["step"]
    assert summary["test/judge_accuracy"] >= summary["test/judge_chance"] + 0.1
    assert {"test/gmm_judge_fd", "test/gmm_judge_precision", "test/gmm_judge_recall"} <= set(summary)
    out = run_cli([str(run), "prior=gmm", "n=9"], module="src.sample")
    assert out.returncode == 0 and "samples_n9_t1_seed0_gmm.png" in out.stdout, out.stdout + out.stderr
    (run / GMM_FILE).unlink()
    out = run_cli([str(run), "prior=gmm"], module="src.sample")
    assert out.returncode == 2 and "prior_gmm.npz not found" in out.stderr and "Traceback" not in out.stderr
    again = run_cli([str(run), "iwae_k=2"], module="src.evaluate")  # src.evaluate fits it again
    assert again.returncode == 0 and (run / GMM_FILE).is_file(), again.stdout + again.stderr
    saved = json.loads((run / "eval_test_k2.json").read_text())
    assert saved["test/gmm_components"] == 3


def test_eval_gmm_components_below_zero_is_one_line_naming_the_key(cache_dir):
    out = run_cli([*tiny_overrides(cache_dir), "eval.gmm_components=-1"])
    assert out.returncode == 2 and "eval.gmm_components" in out.stdout and "Traceback" not in out.stdout + out.stderr


def test_codes_at_one_point_fit_without_scikit_learns_warning_and_sample_that_point(caplog):
    """A collapsed encoder puts every posterior mean at 0: the mixture sits there (one line, no ConvergenceWarning
    on stderr), and its samples are that point."""
    import logging
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scikit-learn's warning would fail here
        with caplog.at_level(logging.INFO, logger="src.prior"):
            prior = fit_mixture(np.zeros((200, 4)), components=10)
    assert "not 10 distinct clusters" in caplog.text
    z = prior.sample(50, torch.Generator().manual_seed(0))
    assert z.abs().max() < 0.01
