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
from src.trained import RunError, load_run
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
    assert Image.open(outs[0]).size == (3 * 66 + 2, 3 * 66 + 2)  # 3x3 grid of 16 px images shown at 64 px, 2 px padding
    singles = sorted((tmp_path / "0").glob("sample_*.png"))
    assert len(singles) == 9 and Image.open(singles[0]).size == (16, 16)  # each image at its own size
    default = run_cli([str(run_dir), "n=4"], module="src.sample")
    assert default.returncode == 0 and (run_dir / "generated" / "samples_n4_t1_seed0.png").is_file()


def test_reconstruct_own_images_with_the_runs_preprocessing(run_dir, pictures, tmp_path):
    out = tmp_path / "rec.png"
    proc = run_cli([str(run_dir), str(pictures / "a.png"), str(pictures), f"out={out}"], module="src.reconstruct")
    assert proc.returncode == 0, proc.stderr
    # 4 images (a, then a b c from the folder), one row of inputs over one row of reconstructions
    assert Image.open(out).size == (4 * 66 + 2, 2 * 66 + 2)


def test_interpolate_writes_a_strip(run_dir, pictures, tmp_path):
    for method in ("slerp", "lerp"):
        out = tmp_path / f"{method}.png"
        proc = run_cli([str(run_dir), str(pictures / "a.png"), str(pictures / "b.jpg"), "steps=5", f"method={method}",
                        f"out={out}"], module="src.interpolate")
        assert proc.returncode == 0, proc.stderr
        assert Image.open(out).size == (5 * 66 + 2, 66 + 2)


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
    # on the device it was trained on: another device draws other Monte-Carlo samples (tests/test_cuda.py)
    proc = run_cli([str(run_dir), "split=test", f"iwae_k={summary['test/iwae_k']}", "device=cpu",
                    f"iwae_images={summary['test/iwae_images']}"], module="src.evaluate")
    assert proc.returncode == 0, proc.stderr
    again = json.loads((run_dir / f"eval_test_k{summary['test/iwae_k']}.json").read_text())
    for key in ("test/neg_elbo", "test/recon_nll", "test/kl", "test/iwae_nll", "test/active_units",
                "test/mutual_info", "test/sample_blur", "test/recon_blur", "test/mig", "test/mse"):
        assert again[key] == pytest.approx(summary[key], rel=1e-5), key
    assert "test/iwae_nll" in proc.stdout


def test_evaluate_with_more_samples_is_tighter(run_dir):
    proc = run_cli([str(run_dir), "split=val", "iwae_k=200"], module="src.evaluate")
    assert proc.returncode == 0, proc.stderr
    evaluated = json.loads((run_dir / "eval_val_k200.json").read_text())
    assert evaluated["val/iwae_k"] == 200 and evaluated["val/iwae_nll"] < evaluated["val/neg_elbo"]
    proc = run_cli([str(run_dir), "split=val", "iwae_k=2"], module="src.evaluate")  # another k: its own file
    assert proc.returncode == 0 and json.loads((run_dir / "eval_val_k200.json").read_text()) == evaluated
    assert json.loads((run_dir / "eval_val_k2.json").read_text())["val/iwae_k"] == 2


@pytest.mark.slow  # four real processes
def test_each_tool_runs_as_a_real_process(run_dir, pictures, tmp_path):
    """The smoke test of each command as a user types it (the tests above run them in this process)."""
    commands = {"src.sample": [str(run_dir), "n=4", f"out={tmp_path / 's.png'}"],
                "src.reconstruct": [str(run_dir), str(pictures), f"out={tmp_path / 'r.png'}"],
                "src.interpolate": [str(run_dir), str(pictures / "a.png"), str(pictures / "b.jpg"), "steps=3",
                                    f"out={tmp_path / 'i.png'}"],
                "src.evaluate": [str(run_dir), "split=val", "iwae_k=3"]}
    for module, args in commands.items():
        proc = run_cli(args, module=module, real_process=True)
        assert proc.returncode == 0, (module, proc.stderr[-2000:])
    for made in ("s.png", "r.png", "i.png"):
        assert Image.open(tmp_path / made).size[0] > 0, made
    assert json.loads((run_dir / "eval_val_k3.json").read_text())["val/iwae_k"] == 3


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


@pytest.mark.parametrize("module,args,needles", [
    ("src.sample", ["n=0"], ["n=0", ">= 1"]),
    ("src.sample", ["n=-3"], ["n=-3", ">= 1"]),
    ("src.sample", ["n=1000000000"], ["n=1000000000", "at most 10,000"]),  # was 16 GB asked of the allocator
    ("src.sample", ["n=abc"], ["n='abc'", "expected int"]),
    ("src.sample", ["nn=4"], ["unknown option 'nn'"]),
    ("src.evaluate", ["batch_size=0"], ["batch_size=0", ">= 1"]),
    ("src.evaluate", ["batch_size=-1"], ["batch_size=-1", ">= 1"]),
    pytest.param("src.sample", ["device=cuda"], ["device='cuda'", "no CUDA device"],
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")),
], ids=lambda v: v if isinstance(v, str) else None)
def test_tool_options_that_cannot_work_are_one_line(run_dir, module, args, needles):
    _one_error_line(run_cli([str(run_dir), *args], module=module), *needles)


def test_reconstruct_per_row_zero_is_one_line(run_dir, pictures):
    _one_error_line(run_cli([str(run_dir), str(pictures / "a.png"), "per_row=0"], module="src.reconstruct"),
                    "per_row=0", ">= 1")


@pytest.mark.parametrize("out", ["folder", "nested/new folder", "grid.png"])
def test_sample_out_is_a_folder_or_a_png_as_the_readme_says(run_dir, tmp_path, out):
    proc = run_cli([str(run_dir), "n=4", f"out={tmp_path / out}"], module="src.sample")
    assert proc.returncode == 0, proc.stderr
    written = tmp_path / out if out.endswith(".png") else tmp_path / out / "samples_n4_t1_seed0.png"
    assert Image.open(written).size[0] > 0 and f"wrote {written}" in proc.stdout


def test_sample_out_under_a_file_is_one_line(run_dir, tmp_path):
    """out= whose folder cannot exist (a file stands where the folder would be)."""
    (tmp_path / "a_file").write_text("")
    _one_error_line(run_cli([str(run_dir), "n=4", f"out={tmp_path / 'a_file' / 'x.png'}"], module="src.sample"),
                    "cannot write", "out=")


def test_evaluate_finds_relative_data_roots_from_another_directory(tmp_path):
    """A run trained with data.root=<relative path> is evaluated from elsewhere: the root was stored resolved."""
    from .test_data import make_folder

    make_folder(tmp_path / "pics", n_good=60)
    run = tmp_path / "run"
    proc = run_cli([*tiny_overrides(tmp_path / "cache"), "logger=none", "data=folder", "data.root=pics",
                    "data.channels=1", "trainer.max_steps=2", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    again = run_cli([str(run), "iwae_k=2"], module="src.evaluate")  # from the repository root
    assert again.returncode == 0, again.stderr
    shutil.rmtree(tmp_path / "pics")
    shutil.rmtree(tmp_path / "cache")
    gone = run_cli([str(run), "iwae_k=2"], module="src.evaluate")
    assert gone.returncode == 2 and "Traceback" not in gone.stderr
    [line] = [line for line in gone.stderr.splitlines() if line.startswith("error:")]
    assert f"data.root={tmp_path / 'pics'} does not exist" in line


@pytest.mark.parametrize("kind", ["state_dict", "list", "text", "png"])
def test_resuming_from_a_file_that_is_not_this_tools_checkpoint_says_so(run_dir, tmp_path, tiny, kind):
    path = tmp_path / f"{kind}.pt"
    if kind == "state_dict":
        torch.save(load_run(run_dir).model.state_dict(), path)
    elif kind == "list":
        torch.save([torch.zeros(3), 1], path)
    elif kind == "text":
        path.write_text("step: 12\n")
    else:
        Image.new("RGB", (4, 4)).save(path, format="PNG")
    proc = run_cli([*tiny, "logger=none", f"trainer.resume={path}", f"hydra.run.dir={tmp_path / 'run'}"])
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr
    [line] = [line for line in proc.stdout.splitlines() if "ERROR" in line]
    assert str(path) in line and ("not a checkpoint written by this tool" in line or "not a torch checkpoint" in line)
    assert "weights_only" not in proc.stdout + proc.stderr


def test_a_checkpoints_config_is_never_resolved(run_dir, tmp_path, monkeypatch):
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    state["config"]["data"]["root"] = "${oc.env:VAE_SECRET_PATH}"
    save_checkpoint(state, tmp_path / "crafted.pt")
    monkeypatch.setenv("VAE_SECRET_PATH", "/secret/place")
    run = load_run(tmp_path / "crafted.pt")
    assert "${oc.env:VAE_SECRET_PATH}" in run.cfg.data.root and "/secret/place" not in run.cfg.data.root


def test_reconstruct_shows_a_16_bit_png_as_it_looks(run_dir, tmp_path):
    dim = np.full((24, 24), 12000, np.uint16)  # 12000 / 65535 of full scale: a dark grey, not white
    Image.fromarray(dim).save(tmp_path / "deep.png")
    out = tmp_path / "recon.png"
    proc = run_cli([str(run_dir), str(tmp_path / "deep.png"), f"out={out}"], module="src.reconstruct")
    assert proc.returncode == 0, proc.stderr
    tile = np.asarray(Image.open(out).convert("L"))[2:66, 2:66]  # the input tile: 16x16 at 64 px, in 2 px of padding
    assert abs(tile.mean() - 12000 / 257) < 2
