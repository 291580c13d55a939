"""Kill and resume, atomic checkpoints, refused pickles, divergence, idempotent sweeps, DDP via torchrun."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from src.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from src.likelihoods import build_likelihood
from src.models import build_model
from src.train import train

from .conftest import ROOT, assert_same_as_uninterrupted, compose_cfg, metric_rows, run_cli, tiny_overrides
from .test_models import with_conv_biases



def _resume_overrides(cache):
    """Slow enough (about 40 steps at tens of ms) to be killed mid-run; checkpoints every 5 steps."""
    return [*tiny_overrides(cache), "data.image_size=32", "data.num_train=512", "model.hidden_channels=[32,64]",
            "trainer.max_steps=48", "trainer.eval_every=16", "trainer.checkpoint_every=5", "trainer.log_every=3",
            "data.hflip=true", "logger=none"]


@pytest.mark.slow  # real processes: kill -9, torchrun
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    overrides = _resume_overrides(tmp_path / "cache")
    whole = tmp_path / "whole"
    assert run_cli([*overrides, f"hydra.run.dir={whole}"]).returncode == 0

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "src.train", *overrides, f"hydra.run.dir={killed}"], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if last.is_file() and load_checkpoint(last)["step"] >= 10:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step_at_kill = load_checkpoint(last)["step"]
    assert 10 <= step_at_kill < 48
    assert not (killed / "summary.json").exists()  # SIGKILL: no finally ran, nothing claims to have finished

    resumed = run_cli([*overrides, f"hydra.run.dir={killed}"])  # the same command: trainer.resume=auto
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"Resuming from {last} at step {step_at_kill}" in resumed.stdout
    assert_same_as_uninterrupted(whole, killed)


# Run the real entrypoint, but SIGKILL the process right after it writes last.pt at one step: a kill that lands
# exactly at an epoch boundary or after a new-best eval, which a timed kill from outside cannot aim at.
KILL_AFTER_CHECKPOINT = """
import os, signal
from src.exits import run
from src.loop import WATCHERS
from src.train import main
target = int(os.environ["KILL_AFTER_CHECKPOINT_AT"])
def die(event, member, step):
    if event == "checkpointed" and step == target:
        os.kill(os.getpid(), signal.SIGKILL)
WATCHERS.append(die)
run(main)
"""


def _epoch_overrides(cache):
    """3 epochs of 8 steps, evaluated and checkpointed at the default cadence (every epoch end), with an LR
    that halves every epoch, so a resume one epoch behind shows in train/lr."""
    return [*tiny_overrides(cache), "trainer.max_steps=null", "trainer.max_epochs=3", "trainer.eval_every=null",
            "trainer.checkpoint_every=null", "optimizer.scheduler=exponential", "optimizer.gamma=0.5",
            "data.hflip=true", "logger=none"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("epochs")
    run = root / "whole"
    proc = run_cli([*_epoch_overrides(root / "cache"), f"hydra.run.dir={run}"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return root, run


@pytest.mark.slow  # real processes: kill -9, torchrun
@pytest.mark.parametrize("kill_at", [8, 16], ids=["end_of_epoch_1", "end_of_epoch_2_new_best"])
def test_resume_at_an_epoch_boundary_matches_an_uninterrupted_run(uninterrupted, kill_at):
    root, whole = uninterrupted
    killed = root / f"killed_at_{kill_at}"
    script = root / "kill_after_checkpoint.py"
    script.write_text(KILL_AFTER_CHECKPOINT)
    overrides = [*_epoch_overrides(root / "cache"), f"hydra.run.dir={killed}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KILL_AFTER_CHECKPOINT_AT": str(kill_at)}
    proc = subprocess.run([sys.executable, str(script), *overrides], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-2000:]
    ckpt = load_checkpoint(killed / "checkpoints" / "last.pt")
    vals = {r["step"]: r["val/neg_elbo"] for r in metric_rows(whole) if "val/neg_elbo" in r}
    # the checkpoint holds the state the next step needs: the epoch ended, the LR moved, best counts this eval
    assert (ckpt["step"], ckpt["epoch"]) == (kill_at, kill_at // 8)
    assert ckpt["scheduler"]["last_epoch"] == kill_at // 8
    assert ckpt["best"] == pytest.approx(min(v for s, v in vals.items() if s <= kill_at), rel=1e-6)
    if kill_at == 16:
        assert vals[16] < vals[8], "the eval at step 16 should be a new best for this test to mean anything"
        assert load_checkpoint(killed / "checkpoints" / "best.pt")["step"] == 16

    resumed = run_cli(overrides)  # the same command: trainer.resume=auto
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert_same_as_uninterrupted(whole, killed)
    assert json.loads((whole / "summary.json").read_text())["best/val_neg_elbo"] == \
        pytest.approx(min(vals.values()), rel=1e-6)
    best_a, best_b = (load_checkpoint(d / "checkpoints" / "best.pt") for d in (whole, killed))
    assert best_b["step"] == best_a["step"] and best_b["best"] == pytest.approx(best_a["best"], rel=1e-4)


def test_finished_run_is_not_retrained(tmp_path, tiny):
    run = tmp_path / "run"
    assert run_cli([*tiny, "logger=none", f"hydra.run.dir={run}"]).returncode == 0
    before = (run / "metrics.jsonl").read_text(), (run / "summary.json").read_text()
    again = run_cli([*tiny, "logger=none", f"hydra.run.dir={run}"])
    assert again.returncode == 0 and "already finished" in again.stdout
    assert ((run / "metrics.jsonl").read_text(), (run / "summary.json").read_text()) == before


def test_sweep_rerun_skips_finished_members(tmp_path):
    args = ["-m", *tiny_overrides(tmp_path / "cache"), "trainer.max_steps=2", "logger=none", "loss.beta=1,2",
            f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    assert run_cli(args).returncode == 0
    again = run_cli(args)
    assert again.returncode == 0 and again.stdout.count("already finished") == 2


def test_interrupted_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    path = tmp_path / "last.pt"
    good = {"model": {"w": torch.ones(3)}, "optimizer": {}, "config": {}}
    save_checkpoint({**good, "step": 1}, path)
    with pytest.raises(Exception):  # pickling fails half-way through the write
        save_checkpoint({**good, "step": 2, "w": torch.zeros(10_000), "bad": lambda: None}, path)
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the crafted file's own protocol
@pytest.mark.parametrize("how", ["auto", "path"])
def test_crafted_pickle_checkpoint_is_refused_and_runs_nothing(tmp_path, tiny, how):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    evil = run / "checkpoints" / "last.pt" if how == "auto" else tmp_path / "evil.pt"
    evil.parent.mkdir(parents=True, exist_ok=True)
    with open(evil, "wb") as f:
        pickle.dump({"model": Evil(marker)}, f)
    resume = [] if how == "auto" else [f"trainer.resume={evil}"]
    proc = run_cli([*tiny, "logger=none", *resume, f"hydra.run.dir={run}"])
    errors = [line for line in proc.stdout.splitlines() if "ERROR" in line]
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr
    assert len(errors) == 1 and str(evil) in errors[0] and "refused" in errors[0]
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(evil)


def test_non_finite_loss_stops_with_status_diverged_and_keeps_the_good_checkpoint(tmp_path, tiny):
    run = tmp_path / "run"
    # Adam moves every weight by about lr per step: at 1e30 the second forward overflows
    proc = run_cli([*tiny, "logger=none", "optimizer.lr=1e30", "trainer.log_every=1", "trainer.checkpoint_every=1",
                    f"hydra.run.dir={run}"])
    assert proc.returncode == 3 and "Traceback" not in proc.stdout + proc.stderr
    error = next(line for line in proc.stdout.splitlines() if "ERROR" in line)
    assert "Diverged: non-finite" in error and "at step 2" in error and "loss" in error
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged" and "step 2" in summary["error"]
    good = load_checkpoint(run / "checkpoints" / "last.pt")
    assert good["step"] == 1 and all(torch.isfinite(v).all() for v in good["model"].values() if v.is_floating_point())


def test_resume_into_a_run_dir_of_another_experiment_is_refused(tmp_path, tiny):
    run = tmp_path / "run"
    assert run_cli([*tiny, "logger=none", "trainer.max_steps=4", "trainer.eval_every=100", "trainer.checkpoint_every=2",
                    f"hydra.run.dir={run}"]).returncode == 0
    (run / "summary.json").unlink()  # as if killed after its last checkpoint
    proc = run_cli([*tiny, "logger=none", "model.latent_dim=6", f"hydra.run.dir={run}"])
    assert proc.returncode == 2 and "model.latent_dim=6" in proc.stdout and "trainer.resume=never" in proc.stdout


@pytest.mark.slow  # real processes: kill -9, torchrun
def test_ddp_two_processes_with_gloo(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "src.train", *tiny_overrides(tmp_path / "cache"), "logger=none",
                           "trainer.strategy=ddp", f"hydra.run.dir={run}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["world_size"] == 2 and summary["step"] == 8
    assert proc.stdout.count("Finished: val/neg_elbo") == 1  # only rank 0 reports


@pytest.mark.slow  # real processes: kill -9, torchrun
def test_under_ddp_every_rank_stops_together_when_one_diverges(tmp_path):
    """Rank 0 finds the divergence at an eval (no log step in between): rank 1 stops with it, naming it, instead of
    waiting in the next all-reduce and dying on gloo's closed connection."""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "src.train", *tiny_overrides(tmp_path / "cache"), "optimizer.lr=1e30",
                           "trainer.log_every=50", "trainer.strategy=ddp", f"hydra.run.dir={run}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "gloo" not in out.lower() and "DistBackendError" not in out, out[-3000:]
    assert out.count("Diverged: non-finite") == 2, out[-3000:]  # each rank names it
    assert json.loads((run / "summary.json").read_text())["status"] == "diverged"


def test_divergence_before_any_checkpoint_does_not_claim_one_is_kept(tmp_path, tiny):
    run = tmp_path / "run"
    proc = run_cli([*tiny, "logger=none", "optimizer.lr=1e30", "trainer.log_every=1", "trainer.checkpoint_every=100",
                    f"hydra.run.dir={run}"])
    error = next(line for line in proc.stdout.splitlines() if "ERROR" in line)
    assert proc.returncode == 3 and "at step 2" in error
    assert "no checkpoint was written" in error and "kept" not in error
    assert not (run / "checkpoints" / "last.pt").exists()


def test_a_run_of_an_earlier_version_with_conv_biases_resumes_as_the_same_run(tmp_path, tiny):
    """A checkpoint written while the convs in front of BatchNorm had a bias (and Adam moments for it): the bias is
    folded into the running mean and its moments dropped, every other parameter's moments renumbered, so a larger
    budget continues it exactly as it continues the same run written by this version."""
    steps = [*tiny, "trainer.max_steps=4", "trainer.eval_every=4", "trainer.log_every=1"]
    train(compose_cfg(steps), tmp_path / "new")
    shutil.copytree(tmp_path / "new", tmp_path / "old")
    ckpt = load_checkpoint(tmp_path / "new" / "checkpoints" / "last.pt")
    cfg = compose_cfg(steps)
    model = build_model(cfg.model, cfg.data, build_likelihood(cfg.loss.likelihood, cfg.loss.sigma))
    model.load_state_dict(ckpt["model"])
    names = [n for n, _ in model.named_parameters()]
    old = with_conv_biases(model, same_eval=True)  # the same model, in the earlier layout
    old_names = [n for n, _ in old.named_parameters()]
    moments = {names[i]: st for i, st in ckpt["optimizer"]["state"].items()}
    old_state = {i: moments.get(n, {**moments["encoder.0.0.weight"], "exp_avg": torch.rand(p.shape),
                                    "exp_avg_sq": torch.rand(p.shape)}) for i, (n, p) in
                 enumerate(old.named_parameters())}
    assert len(old_names) > len(names)  # the biases, with moments of their own
    groups = [{**ckpt["optimizer"]["param_groups"][0], "params": list(range(len(old_names)))}]
    save_checkpoint({**ckpt, "model": old.state_dict(), "optimizer": {"state": old_state, "param_groups": groups}},
                    tmp_path / "old" / "checkpoints" / "last.pt")
    longer = [*steps, "trainer.max_steps=8"]
    for run in ("new", "old"):
        assert train(compose_cfg(longer), tmp_path / run)["status"] == "finished"
    rows = {run: [r for r in metric_rows(tmp_path / run) if r["step"] > 4] for run in ("new", "old")}
    assert [r["step"] for r in rows["old"]] == [r["step"] for r in rows["new"]]
    for a, b in zip(rows["new"], rows["old"]):  # (y + b) - its batch mean: y's, up to rounding
        for key in ("train/loss", "val/neg_elbo", "test/neg_elbo"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
