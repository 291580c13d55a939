"""Use a trained run: sample, reconstruct, interpolate, evaluate, and the bad inputs of each, for real."""
from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from src.checkpoint import CheckpointError, save_checkpoint
from src.runs import RunError, load_run
from src.train import train

from .conftest import compose_cfg, run_cli, tiny_overrides


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("use")
    train(compose_cfg([*tiny_overrides(root / "cache"), "logger=none", "trainer.max_steps=12"]), run_dir=root / "run")
    return root / "run"


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Three images of different sizes and modes, as a user's own files."""
    folder = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(folder / "b.jpg")
    Image.fromarray(rng.integers(0, 256, (64, 64, 4), dtype=np.uint8), "RGBA").save(folder / "c.webp")
    return folder


def test_load_run_rebuilds_the_model_in_eval_mode(run_dir):
    run = load_run(run_dir)
    assert not run.model.training and run.cfg.model.latent_dim == 4 and run.step == 12
    assert load_run(run_dir / "checkpoints" / "last.pt").run_dir == run_dir


def test_sample_is_deterministic_for_a_seed(run_dir, tmp_path):
    outs = [tmp_path / f"{i}.png" for i in range(3)]
    for out, seed in zip(outs, (3, 3, 4)):
        proc = run_cli([str(run_dir), "n=9", f"seed={seed}", f"out={out}", "individual=true"], module="src.sample")
        assert proc.returncode == 0, proc.stderr
    assert outs[0].read_bytes() == outs[1].read_bytes() != outs[2].read_bytes()
    assert Image.open(outs[0]).size == (3 * 18 + 2, 3 * 18 + 2)  # 3x3 grid of 16 px images, 2 px padding
    assert len(list((tmp_path / "0").glob("sample_*.png"))) == 9
    default = run_cli([str(run_dir), "n=4"], module="src.sample")
    assert default.returncode == 0 and (run_dir / "generated" / "samples_n4_t1_seed0.png").is_file()


def test_reconstruct_own_images_with_the_runs_preprocessing(run_dir, pictures, tmp_path):
    out = tmp_path / "rec.png"
    proc = run_cli([str(run_dir), str(pictures / "a.png"), str(pictures), f"out={out}"], module="src.reconstruct")
    assert proc.returncode == 0, proc.stderr
    # 4 images (a, then a b c from the folder), one row of inputs over one row of reconstructions
    assert Image.open(out).size == (4 * 18 + 2, 2 * 18 + 2)


def test_interpolate_writes_a_strip(run_dir, pictures, tmp_path):
    for method in ("slerp", "lerp"):
        out = tmp_path / f"{method}.png"
        proc = run_cli([str(run_dir), str(pictures / "a.png"), str(pictures / "b.jpg"), "steps=5", f"method={method}",
                        f"out={out}"], module="src.interpolate")
        assert proc.returncode == 0, proc.stderr
        assert Image.open(out).size == (5 * 18 + 2, 18 + 2)


def test_slerp_keeps_the_norm_and_ends():
    from src.interpolate import slerp

    a, b = torch.randn(32), torch.randn(32)
    b = b / b.norm() * a.norm()
    path = slerp(a, b, torch.linspace(0, 1, 7))
    torch.testing.assert_close(path[0], a)
    torch.testing.assert_close(path[-1], b)
    torch.testing.assert_close(path.norm(dim=1), a.norm().expand(7))  # lerp would dip inside the sphere


def test_evaluate_reproduces_the_summary_at_the_same_k(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    proc = run_cli([str(run_dir), "split=test", f"iwae_k={summary['test/iwae_k']}"], module="src.evaluate")
    assert proc.returncode == 0, proc.stderr
    again = json.loads((run_dir / "eval_test.json").read_text())
    for key in ("test/neg_elbo", "test/recon_nll", "test/kl", "test/iwae_nll", "test/active_units",
                "test/mutual_info", "test/sharpness_ratio", "test/mig", "test/mse"):
        assert again[key] == pytest.approx(summary[key], rel=1e-5), key
    assert "test/iwae_nll" in proc.stdout


def test_evaluate_with_more_samples_is_tighter(run_dir):
    proc = run_cli([str(run_dir), "split=val", "iwae_k=200"], module="src.evaluate")
    assert proc.returncode == 0, proc.stderr
    evaluated = json.loads((run_dir / "eval_val.json").read_text())
    assert evaluated["val/iwae_k"] == 200 and evaluated["val/iwae_nll"] < evaluated["val/neg_elbo"]


def _one_error_line(proc, *needles):
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and all(n in lines[0] for n in needles), proc.stderr


def test_not_a_run(tmp_path):
    _one_error_line(run_cli([str(tmp_path), "n=2"], module="src.sample"), "is not a run")


def test_run_without_checkpoint(run_dir, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(run_dir, bare)
    shutil.rmtree(bare / "checkpoints")
    _one_error_line(run_cli([str(bare)], module="src.evaluate"), "has no checkpoint", "rerun")


def test_unreadable_image(run_dir, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_text("not an image")
    _one_error_line(run_cli([str(run_dir), str(bad)], module="src.reconstruct"), "cannot read image", str(bad))


def test_checkpoint_whose_config_no_longer_composes(run_dir, tmp_path):
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    state["config"]["model"]["name"] = "transformer"
    save_checkpoint(state, tmp_path / "old.pt")
    _one_error_line(run_cli([str(tmp_path / "old.pt")], module="src.sample"), "no longer composes", "model.name")
    state["config"]["model"]["depth"] = 12  # a key this version does not know
    save_checkpoint(state, tmp_path / "older.pt")
    with pytest.raises(RunError, match="no longer composes"):
        load_run(tmp_path / "older.pt")


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_loading_refuses_a_crafted_pickle(tmp_path):
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"model": Evil(), "config": {}}, f)
    with pytest.raises(CheckpointError, match="refused"):
        load_run(tmp_path / "evil.pt")
