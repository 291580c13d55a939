"""Real tiny runs: the run-dir contract, the CLI, Hydra's run/sweep dirs, fixed-z grids, every likelihood."""
from __future__ import annotations

import json
import math

import pytest
import torch

from src.checkpoint import load_checkpoint
from src.likelihoods import LIKELIHOODS
from src.train import train
from src.visuals import fixed_latents

from .conftest import compose_cfg, run_cli

TERMS = ("loss", "recon_nll", "kl", "neg_elbo", "bits_per_dim", "mse", "mse_mean_image")


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_run_writes_the_run_dir_contract(tmp_path, tiny):
    run = tmp_path / "run"
    proc = run_cli([*tiny, f"hydra.run.dir={run}"], real_process=True)  # the smoke test of the command
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert str(run) in proc.stdout  # it says where its outputs are
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", "train.log", "metrics.jsonl", "summary.json",
                 "checkpoints/last.pt", "samples.png", "reconstructions.png"):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["step_0000004.png", "step_0000008.png"]
    assert sorted(p.name for p in (run / "recons").glob("*.png")) == ["step_0000004.png", "step_0000008.png"]
    assert "val/neg_elbo" in (run / "train.log").read_text()

    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == 8
    assert (summary["data/train_size"], summary["data/val_size"], summary["data/test_size"]) == (256, 64, 64)
    for split in ("val", "test"):
        for term in TERMS:
            assert math.isfinite(summary[f"{split}/{term}"]), f"{split}/{term}"
        assert summary[f"{split}/neg_elbo"] == pytest.approx(summary[f"{split}/recon_nll"] + summary[f"{split}/kl"])
        assert summary[f"{split}/bits_per_dim"] == pytest.approx(summary[f"{split}/neg_elbo"] / (256 * math.log(2)))
        assert len(summary[f"{split}/kl_per_dim"]) == 4
        assert sum(summary[f"{split}/kl_per_dim"]) == pytest.approx(summary[f"{split}/kl"], rel=1e-4)
    assert summary["perf/train_images_per_s"] > 0
    assert (summary["device"], summary["precision"]) == ("cpu", "fp32")  # what trainer.device/precision resolved to
    kl = summary["val/kl_per_dim"]  # traversals.png walks all 4 dims, most KL first
    assert summary["grid/traversal_dims"] == sorted(range(4), key=lambda d: -kl[d])

    rows = _read_jsonl(run / "metrics.jsonl")
    train_steps = [r["step"] for r in rows if "train/loss" in r]
    assert train_steps == [2, 4, 6, 8]
    assert [r["step"] for r in rows if "val/neg_elbo" in r] == [4, 8]
    assert all(r["train/beta"] == 1.0 for r in rows if "train/beta" in r)

    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["step"] == 8 and state["config"]["model"]["latent_dim"] == 4


def test_multirun_honours_sweep_dir(tmp_path, tiny):
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", *tiny, "trainer.max_steps=2", "trainer.eval_every=2", "loss.beta=0.5,2",
                    f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    betas = {}
    for member in ("0", "1"):
        summary = json.loads((sweep / member / "summary.json").read_text())
        assert summary["status"] == "finished"
        betas[member] = _read_jsonl(sweep / member / "metrics.jsonl")[0]["train/beta"]
    assert betas == {"0": 0.5, "1": 2.0}


def test_fixed_z_is_independent_of_the_run_seed():
    torch.manual_seed(1)
    a = fixed_latents(8, 5)
    torch.manual_seed(2)
    assert torch.equal(a, fixed_latents(8, 5))


def test_grids_are_identical_across_two_runs(tmp_path, tiny):
    cfg = compose_cfg(tiny)
    train(cfg, run_dir=tmp_path / "a")
    train(cfg, run_dir=tmp_path / "b")
    for name in ("samples.png", "reconstructions.png", "samples/step_0000004.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    other = train(compose_cfg([*tiny, "seed=1"]), run_dir=tmp_path / "c")
    assert other["status"] == "finished"
    assert (tmp_path / "a" / "samples.png").read_bytes() != (tmp_path / "c" / "samples.png").read_bytes()


def test_every_likelihood_trains_and_is_the_one_asked_for(tmp_path, tiny):
    recon = {}
    for likelihood in LIKELIHOODS:
        summary = train(compose_cfg([*tiny, f"loss.likelihood={likelihood}", "trainer.max_steps=4", "logger=none"]),
                        run_dir=tmp_path / likelihood)
        assert summary["status"] == "finished" and math.isfinite(summary["val/neg_elbo"]), likelihood
        recon[likelihood] = summary["val/recon_nll"]
    # the same images and model scored under six densities: six different numbers, none silently the default
    assert len({round(v, 3) for v in recon.values()}) == len(LIKELIHOODS), recon
    # the sigma each one used is recorded: a learned one in every train row and the summary, as the checkpoint
    # holds it; the optimal one as its value on the split (the RMSE at the posterior mean); none for Bernoulli
    learned = load_checkpoint(tmp_path / "gaussian_learned" / "checkpoints" / "last.pt")["model"]
    sigma = math.exp(next(v for k, v in learned.items() if k.endswith("log_sigma")).item())
    rows = [json.loads(line) for line in (tmp_path / "gaussian_learned" / "metrics.jsonl").read_text().splitlines()]
    summaries = {k: json.loads((tmp_path / k / "summary.json").read_text()) for k in LIKELIHOODS}
    assert summaries["gaussian_learned"]["test/sigma"] == pytest.approx(sigma) and sigma != pytest.approx(0.1)
    assert rows[-1]["step"] == 4 and [r["train/sigma"] for r in rows if "train/loss" in r][-1] == pytest.approx(sigma)
    optimal = summaries["gaussian_optimal"]
    assert optimal["test/sigma"] == pytest.approx(math.sqrt(optimal["test/mse"]))
    assert summaries["gaussian"]["val/sigma"] == pytest.approx(0.1) and "test/sigma" not in summaries["bernoulli"]


@pytest.mark.parametrize("extra", [["model=mlp", "model.hidden_channels=[32]"],
                                   ["loss.kl_schedule=linear", "loss.warmup_steps=4"],
                                   ["loss.kl_schedule=capacity", "loss.capacity_steps=4", "loss.free_bits=0.1"],
                                   ["optimizer=adamw", "optimizer.scheduler=exponential", "trainer.max_epochs=2",
                                    "trainer.max_steps=null"],
                                   ["data.channels=3", "trainer.precision=bf16"]])
def test_variants_train(tmp_path, tiny, extra):
    summary = train(compose_cfg([*tiny, *extra]), run_dir=tmp_path)
    assert summary["status"] == "finished" and math.isfinite(summary["test/neg_elbo"])
    rows = _read_jsonl(tmp_path / "metrics.jsonl")
    if "loss.kl_schedule=linear" in extra:
        assert [r["train/beta"] for r in rows if "train/beta" in r] == [0.25, 0.75, 1.0, 1.0]
    if "optimizer.scheduler=exponential" in extra:  # 256 // 32 = 8 steps an epoch, lr decays once per epoch
        lrs = {r["epoch"]: r["train/lr"] for r in rows if "train/lr" in r}
        assert lrs[1] == pytest.approx(lrs[0] * 0.95)


@pytest.mark.parametrize("schedule,key,expected", [
    (["loss.kl_schedule=linear", "loss.warmup_steps=1000", "loss.beta=2"], "loss.warmup_steps=1000", 2 * 7 / 1000),
    (["loss.kl_schedule=capacity", "loss.capacity_steps=1000", "loss.capacity_max=50"], "loss.capacity_steps=1000",
     1.0),
])
def test_a_kl_schedule_longer_than_the_run_warns_once_and_the_summary_keeps_the_final_beta(tmp_path, tiny, schedule,
                                                                                          key, expected):
    proc = run_cli([*tiny, "logger=none", *schedule, f"hydra.run.dir={tmp_path / 'run'}"])  # 8 steps
    assert proc.returncode == 0, proc.stdout[-2000:]
    warnings = [line for line in proc.stdout.splitlines() if "WARNING" in line and key in line]
    assert len(warnings) == 1 and "longer than the run (8 steps)" in warnings[0]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["train/beta"] == pytest.approx(expected)  # the beta of the last step (step index 7)
    if "capacity" in key:
        assert summary["train/capacity"] == pytest.approx(50 * 7 / 1000)


def test_a_cheap_final_eval_and_iwae_over_a_subset(tmp_path, tiny):
    """eval.iwae_images takes IWAE over the first N images (counted in the summary); eval.final=none skips the
    test split (a sweep's cheap pass), leaving every val metric; a bad value is one line naming the key."""
    summary = train(compose_cfg([*tiny, "eval.iwae_images=40"]), run_dir=tmp_path / "subset")
    assert (summary["val/iwae_images"], summary["test/iwae_images"]) == (40, 40)
    assert math.isfinite(summary["test/iwae_nll"]) and summary["data/test_size"] == 64
    whole = train(compose_cfg([*tiny, "eval.iwae_images=null"]), run_dir=tmp_path / "whole")
    assert whole["test/iwae_images"] == 64
    skipped = train(compose_cfg([*tiny, "eval.final=none"]), run_dir=tmp_path / "none")
    assert skipped["status"] == "finished" and not any(k.startswith("test/") for k in skipped)
    rows = _read_jsonl(tmp_path / "none" / "metrics.jsonl")
    assert all(any("/" in k for k in r) for r in rows)  # no empty test row
    assert math.isfinite(skipped["val/iwae_nll"])
    bad = run_cli([*tiny, "eval.final=val", f"hydra.run.dir={tmp_path / 'bad'}"])
    assert bad.returncode == 2 and "eval.final='val' is not allowed; choose one of test|none" in bad.stdout + bad.stderr
