"""A run dir holds one experiment: reruns skip, resume, continue or are refused without touching the dir; one
process at a time; each step once in metrics.jsonl on every path; signals stop a run cleanly and it resumes."""
from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from src.checkpoint import load_checkpoint
from src.rundir import RunDir, RunDirLock
from src.train import train

from .conftest import ROOT, compose_cfg, run_cli, tiny_overrides

COMPARED = ("val/neg_elbo", "val/kl", "val/iwae_nll", "test/neg_elbo", "test/kl", "test/iwae_nll", "best/val_neg_elbo")


def _snapshot(run: Path) -> dict:
    """Every file of a run dir but the lock and the human log, by content."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name not in (".lock", "train.log")}


def _steps(run: Path) -> list:
    """(step, kind) for every metrics.jsonl row: kind is train, val or test."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], next(k.split("/")[0] for k in r if "/" in k)) for r in rows]


def _error_lines(proc) -> list:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if "ERROR" in line or "error:" in line]


@pytest.fixture
def base(cache_dir):
    return [*tiny_overrides(cache_dir), "logger=none"]


# --------------------------------------------------------------------------------------------- run identity


def test_a_rerun_with_other_values_is_refused_and_changes_nothing(tmp_path, base):
    run = tmp_path / "run"
    assert run_cli([*base, "loss.beta=1", f"hydra.run.dir={run}"]).returncode == 0
    before = _snapshot(run)
    proc = run_cli([*base, "loss.beta=8", f"hydra.run.dir={run}"])
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr
    [line] = _error_lines(proc)
    assert "loss.beta=8.0" in line and "loss.beta=1.0" in line and str(run) in line
    assert _snapshot(run) == before  # not summary.json, not .hydra/, not metrics.jsonl
    again = run_cli([*base, "loss.beta=1", f"hydra.run.dir={run}"])  # the same settings: skipped
    assert again.returncode == 0 and "already finished" in again.stdout and _snapshot(run) == before


def test_a_sweep_rerun_with_other_values_refuses_each_member_and_compare_keeps_the_true_labels(tmp_path, base):
    sweep = tmp_path / "sweep"
    first = run_cli(["-m", *base, "trainer.max_steps=2", "loss.beta=1,2", f"hydra.sweep.dir={sweep}"])
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    before = {m: _snapshot(sweep / m) for m in "01"}
    proc = run_cli(["-m", *base, "trainer.max_steps=2", "loss.beta=8,16", f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr
    assert proc.stdout.count("member 0 refused") == 1 and proc.stdout.count("member 1 refused") == 1
    assert {m: _snapshot(sweep / m) for m in "01"} == before
    table = run_cli([str(sweep)], module="src.compare")
    assert table.returncode == 0, table.stderr
    assert list(pd.read_csv(sweep / "compare" / "table.csv")["loss.beta"]) == [1.0, 2.0]


def test_a_larger_budget_continues_from_last_and_equals_one_longer_run(tmp_path, base, caplog):
    whole, grown = tmp_path / "whole", tmp_path / "grown"
    a = train(compose_cfg([*base, "trainer.max_steps=16", "trainer.eval_every=4"]), run_dir=whole)
    train(compose_cfg([*base, "trainer.max_steps=8", "trainer.eval_every=4"]), run_dir=grown)
    with caplog.at_level(logging.INFO, logger="src"):
        b = train(compose_cfg([*base, "trainer.max_steps=16", "trainer.eval_every=4"]), run_dir=grown)
    assert "larger budget: trainer.max_steps 8 -> 16" in caplog.text and "at step 8" in caplog.text
    for key in (*COMPARED, "step"):
        assert b[key] == pytest.approx(a[key], rel=1e-4), key
    assert _steps(grown) == _steps(whole)  # the first run's test row went with its end


def test_a_second_process_into_the_same_run_dir_is_refused_naming_the_holder(tmp_path, base):
    run = tmp_path / "run"
    slow = [*base, "trainer.max_steps=100000", "trainer.max_epochs=null", "trainer.eval_every=100000",
            f"hydra.run.dir={run}"]  # killed below, long before its end
    first = subprocess.Popen([sys.executable, "-m", "src.train", *slow], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.time() + 120
        while not (run / "metrics.jsonl").is_file() and time.time() < deadline:
            time.sleep(0.05)
        second = run_cli(slow)
        assert second.returncode == 2 and "Traceback" not in second.stdout + second.stderr
        [line] = _error_lines(second)
        assert f"pid {first.pid}" in line and "in use" in line
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    RunDirLock(RunDir(run)).release()  # the lock died with its process (kill -9): no stale lock is left


# --------------------------------------------------------------------------------------------- each step once

KILL_AT_LOG = """
import os, signal
import src.train as trainer
target = int(os.environ["KILL_AT_LOG_STEP"])
log = trainer.RunLogger.log
def log_then_die(self, metrics, step):
    log(self, metrics, step)
    if step == target:
        os.kill(os.getpid(), signal.SIGKILL)
trainer.RunLogger.log = log_then_die
import src.cli
src.cli.main()
"""


def test_a_kill_before_the_first_checkpoint_leaves_each_step_once(tmp_path, base):
    run, whole = tmp_path / "run", tmp_path / "whole"
    args = [*base, "trainer.max_steps=8", "trainer.eval_every=8", "trainer.log_every=1"]
    train(compose_cfg(args), run_dir=whole)
    script = tmp_path / "kill_at_log.py"
    script.write_text(KILL_AT_LOG)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KILL_AT_LOG_STEP": "3"}
    killed = subprocess.run([sys.executable, str(script), *args, f"hydra.run.dir={run}"], cwd=ROOT, env=env,
                            capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL and not (run / "checkpoints" / "last.pt").exists()
    assert [s for s, _ in _steps(run)] == [1, 2, 3]
    assert train(compose_cfg(args), run_dir=run)["status"] == "finished"
    assert _steps(run) == _steps(whole)


def test_resume_never_starts_clean_and_says_where_the_old_files_went(tmp_path, base, caplog):
    run = tmp_path / "run"
    train(compose_cfg(base), run_dir=run)
    first = _steps(run)
    with caplog.at_level(logging.INFO, logger="src"):
        train(compose_cfg([*base, "trainer.resume=never", "loss.beta=2"]), run_dir=run)
    [moved] = list((run / "replaced").iterdir())
    assert f"now in {moved}" in caplog.text
    assert _steps(run) == first and _steps(moved) == first
    assert json.loads((run / "summary.json").read_text())["status"] == "finished"
    assert (run / "trained_with.yaml").read_text().count("beta: 2.0") == 1


def test_a_torn_last_line_and_a_deleted_summary_do_not_break_or_duplicate(tmp_path, base):
    run = tmp_path / "run"
    cfg = compose_cfg([*base, "trainer.max_steps=8", "trainer.eval_every=4"])
    train(cfg, run_dir=run)
    steps = _steps(run)
    (run / "summary.json").unlink()  # as if killed after the last checkpoint, before the summary
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "train/lo')  # and a line torn by the kill
    assert train(cfg, run_dir=run)["status"] == "finished"
    assert _steps(run) == steps


# --------------------------------------------------------------------------------------------- signals


def _signal_args(cache_dir):
    """Slow enough (tens of ms a step) for a signal to land mid-run; scheduled checkpoints only at 40."""
    return [*tiny_overrides(cache_dir), "data.image_size=32", "data.num_train=512", "model.hidden_channels=[32,64]",
            "trainer.max_steps=48", "trainer.eval_every=16", "trainer.checkpoint_every=40", "trainer.log_every=1",
            "data.hflip=true", "logger=none"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir):
    whole = tmp_path_factory.mktemp("signals") / "whole"
    train(compose_cfg(_signal_args(cache_dir)), run_dir=whole)
    return whole


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_checkpoints_says_how_to_resume_and_the_resume_is_exact(tmp_path, cache_dir, uninterrupted, signum,
                                                                         code):
    args, whole, run = _signal_args(cache_dir), uninterrupted, tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "src.train", *args, f"hydra.run.dir={run}"], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) >= 5:
            break
        time.sleep(0.02)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code and "Traceback" not in out + err, out[-2000:] + err[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    step = load_checkpoint(run / "checkpoints" / "last.pt")["step"]
    assert 5 <= step < 48 and summary["step"] == step  # the checkpoint is at the step where it stopped
    [line] = [line for line in out.splitlines() if "Interrupted" in line]
    assert f"(step {step})" in line and "resume with: python -m src.train" in line
    command = shlex.split(line.split("resume with: ")[1])  # as a user would paste it
    resumed = run_cli(command[3:])
    assert resumed.returncode == 0 and f"at step {step}" in resumed.stdout
    a, b = (json.loads((d / "summary.json").read_text()) for d in (whole, run))
    for key in COMPARED:
        assert b[key] == pytest.approx(a[key], rel=1e-4), key
    assert _steps(run) == _steps(whole)
