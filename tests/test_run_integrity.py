"""A run dir holds one experiment: reruns skip, resume, continue or are refused without touching the dir; one
process at a time; each step once in metrics.jsonl on every path; signals stop a run cleanly and it resumes."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from PIL import Image

from src.rundir import RunDir, RunDirLock
from src.train import train

from .conftest import ROOT, assert_same_as_uninterrupted, compose_cfg, metric_steps, run_cli, tiny_overrides

def _snapshot(run: Path) -> dict:
    """Every file of a run dir but the lock and the human log, by content."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name not in (".lock", "train.log")}


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
    assert b["step"] == a["step"] == 16
    assert_same_as_uninterrupted(whole, grown)  # the first run's test row went with its end


@pytest.mark.slow  # real processes: a lock held, kill -9, a signal
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
from src.exits import run
from src.loop import WATCHERS
from src.train import main
target = int(os.environ["KILL_AT_LOG_STEP"])
def die(event, member, step):
    if event == "logged" and step == target:
        os.kill(os.getpid(), signal.SIGKILL)
WATCHERS.append(die)
run(main)
"""


@pytest.mark.slow  # real processes: a lock held, kill -9, a signal
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
    assert [s for s, _ in metric_steps(run)] == [1, 2, 3]
    assert train(compose_cfg(args), run_dir=run)["status"] == "finished"
    assert metric_steps(run) == metric_steps(whole)


def test_resume_never_starts_clean_and_says_where_the_old_files_went(tmp_path, base, caplog):
    run = tmp_path / "run"
    train(compose_cfg(base), run_dir=run)
    first = metric_steps(run)
    with caplog.at_level(logging.INFO, logger="src"):
        train(compose_cfg([*base, "trainer.resume=never", "loss.beta=2"]), run_dir=run)
    [moved] = list((run / "replaced").iterdir())
    assert f"now in {moved}" in caplog.text
    assert metric_steps(run) == first and metric_steps(moved) == first
    assert json.loads((run / "summary.json").read_text())["status"] == "finished"
    assert (run / "trained_with.yaml").read_text().count("beta: 2.0") == 1


def test_a_torn_last_line_and_a_deleted_summary_do_not_break_or_duplicate(tmp_path, base):
    run = tmp_path / "run"
    cfg = compose_cfg([*base, "trainer.max_steps=8", "trainer.eval_every=4"])
    train(cfg, run_dir=run)
    steps = metric_steps(run)
    (run / "summary.json").unlink()  # as if killed after the last checkpoint, before the summary
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "train/lo')  # and a line torn by the kill
    assert train(cfg, run_dir=run)["status"] == "finished"
    assert metric_steps(run) == steps


# --------------------------------------------------------------------------------------------- one definition


def test_keys_that_cannot_change_results_do_not_block_a_resume(tmp_path, base):
    """Another cache folder (a node-local $TMPDIR on a cluster), data held off the device or checkpoints more often:
    the same experiment, for the rerun check and the resume check alike."""
    run = tmp_path / "run"
    assert train(compose_cfg([*base, "trainer.max_steps=4"]), run_dir=run)["status"] == "finished"
    moved = [*base, "trainer.max_steps=8", f"data.cache_dir={tmp_path / 'node-local'}", "data.on_device=false",
             "trainer.checkpoint_every=2"]
    summary = train(compose_cfg(moved), run_dir=run)
    assert (summary["status"], summary["step"]) == ("finished", 8)


def test_a_run_that_failed_before_training_does_not_bind_its_folder(tmp_path, base):
    run, pictures = tmp_path / "run", tmp_path / "pictures"
    args = [*base, "data=folder", f"data.root={pictures}", "data.val_fraction=0.2", "data.test_fraction=0.2", "data.batch_size=8",
            f"hydra.run.dir={run}"]
    wrong = run_cli([*args[:-2], f"data.root={tmp_path / 'typo'}", args[-2], args[-1]])
    assert wrong.returncode == 2 and "typo" in wrong.stdout
    pictures.mkdir()
    for i in range(40):
        Image.fromarray(np.full((16, 16), i * 6, np.uint8)).save(pictures / f"{i}.png")
    right = run_cli(args)
    assert right.returncode == 0, right.stdout[-2000:]
    assert json.loads((run / "summary.json").read_text())["status"] == "finished"


def test_a_record_of_an_earlier_version_lacking_newer_keys_is_the_same_experiment(tmp_path, base):
    """A key added since a run was recorded means that key's default then: the run is skipped when finished and
    resumes when not, instead of being refused for `eval.fid=False ... trained with eval.fid=None`."""
    run = tmp_path / "run"
    args = [*base, "trainer.max_steps=4", "trainer.eval_every=2"]
    train(compose_cfg(args), run_dir=run)
    record = OmegaConf.load(run / "trained_with.yaml")
    del record.eval["fid"], record.eval["fid_images"], record.trainer["fused_adam"]
    OmegaConf.save(record, run / "trained_with.yaml")
    again = run_cli([*args, f"hydra.run.dir={run}"])
    assert again.returncode == 0 and "already finished" in again.stdout, again.stdout[-2000:]
    longer = train(compose_cfg([*base, "trainer.max_steps=6", "trainer.eval_every=2"]), run_dir=run)
    assert (longer["status"], longer["step"]) == ("finished", 6)


def test_a_finished_run_is_the_same_run_under_another_budget_that_allows_the_same_steps(tmp_path, base):
    """The previous release's max_epochs default was 5, this one's 3: a run it finished where max_steps bound is
    skipped by the same command, not refused as a smaller budget; a budget that allows fewer steps is refused."""
    from src.rundir import RunDirRefused

    run, args = tmp_path / "run", [*base, "trainer.max_steps=4", "trainer.eval_every=2"]
    done = train(compose_cfg([*args, "trainer.max_epochs=5"]), run_dir=run)
    assert done["status"] == "finished" and 3 * done["data/train_size"] // 32 > 4  # max_steps binds under 3 epochs
    before = _snapshot(run)
    assert train(compose_cfg(args), run_dir=run)["step"] == 4 and _snapshot(run) == before
    with pytest.raises(RunDirRefused, match="trainer.max_steps=2 "):
        train(compose_cfg([*base, "trainer.max_steps=2", "trainer.eval_every=2"]), run_dir=run)
    assert _snapshot(run) == before


@pytest.mark.slow  # real processes: a lock held, kill -9, a signal
def test_an_interrupted_budget_extension_is_never_reported_finished(tmp_path, base):
    """Train to 4 steps, continue to 8 and kill -9 at step 6: the 4-step result stays whole (its summary under
    its own record), and the rerun resumes to 8 (it once said 'already finished' and kept the 4-step summary
    under the 8-step record)."""
    run = tmp_path / "run"
    args = [*base, "trainer.eval_every=2", "trainer.log_every=1"]
    train(compose_cfg([*args, "trainer.max_steps=4"]), run_dir=run)
    script = tmp_path / "kill_at_log.py"
    script.write_text(KILL_AT_LOG)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KILL_AT_LOG_STEP": "6"}
    killed = subprocess.run([sys.executable, str(script), *args, "trainer.max_steps=8", f"hydra.run.dir={run}"],
                            cwd=ROOT, env=env, capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    kept = json.loads((run / "summary.json").read_text())
    assert (kept["status"], kept["step"]) == ("finished", 4)
    assert OmegaConf.load(run / "trained_with.yaml").trainer.max_steps == 4  # the record it belongs to
    rerun = run_cli([*args, "trainer.max_steps=8", f"hydra.run.dir={run}"])
    assert rerun.returncode == 0 and "already finished" not in rerun.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["status"], summary["step"]) == ("finished", 8)
    assert [s for s, kind in metric_steps(run) if kind == "train"] == list(range(1, 9))  # each step once


def test_a_stopped_budget_extension_keeps_the_finished_result_and_the_original_command(tmp_path, base):
    """A finished run continued with a larger budget and stopped during the continuation: its finished summary
    and record survive (they were replaced by 'interrupted' and the new budget, and the original command was
    refused); the original command skips it, and the continuation resumes to the step an uninterrupted one
    reaches, with the same numbers."""
    from src.lifecycle import Interrupted

    from .conftest import signal_when

    run, whole = tmp_path / "run", tmp_path / "whole"
    args = [*base, "trainer.eval_every=2", "trainer.log_every=1"]
    finished = train(compose_cfg([*args, "trainer.max_steps=4"]), run_dir=run)
    with signal_when("logged", run, step=6), pytest.raises(Interrupted):
        train(compose_cfg([*args, "trainer.max_steps=8"]), run_dir=run)
    assert json.loads((run / "summary.json").read_text()) == json.loads(json.dumps(finished))
    assert OmegaConf.load(run / "trained_with.yaml").trainer.max_steps == 4
    again = run_cli([*args, "trainer.max_steps=4", f"hydra.run.dir={run}"])
    assert again.returncode == 0 and "already finished" in again.stdout
    continued = train(compose_cfg([*args, "trainer.max_steps=8"]), run_dir=run)
    train(compose_cfg([*args, "trainer.max_steps=4"]), run_dir=whole)
    uninterrupted = train(compose_cfg([*args, "trainer.max_steps=8"]), run_dir=whole)
    assert (continued["status"], continued["step"]) == ("finished", 8)
    assert OmegaConf.load(run / "trained_with.yaml").trainer.max_steps == 8
    for key in ("val/neg_elbo", "test/neg_elbo", "test/kl"):
        assert continued[key] == pytest.approx(uninterrupted[key], rel=1e-6), key


def test_a_signal_during_the_last_steps_checkpoint_stops_before_the_final_eval_and_the_resume_is_exact(tmp_path, base):
    """A stop that arrives after the loop read the signal flag for its last step (here: as the last checkpoint is
    written; on SLURM, the time limit's SIGUSR2 at that moment) is acted on before the final eval, not dropped: the
    run records "interrupted" at its last step, and the resume runs only the final eval, to the uninterrupted
    run's numbers. (It was dropped: the run went on into the final eval that the time limit would cut short.)"""
    from src.lifecycle import Interrupted

    from .conftest import signal_when

    run, whole = tmp_path / "run", tmp_path / "whole"
    with signal_when("checkpointed", run, step=8) as sent, pytest.raises(Interrupted):
        train(compose_cfg(base), run_dir=run)
    assert sent == [8]
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["status"], summary["step"]) == ("interrupted", 8) and "test/neg_elbo" not in summary
    resumed = train(compose_cfg(base), run_dir=run)
    uninterrupted = train(compose_cfg(base), run_dir=whole)
    assert (resumed["status"], resumed["step"]) == ("finished", 8)
    assert_same_as_uninterrupted(whole, run)
    for key in ("test/neg_elbo", "test/kl"):
        assert resumed[key] == pytest.approx(uninterrupted[key], rel=1e-6), key


def test_resume_never_with_a_bad_data_root_leaves_the_old_run_in_place(tmp_path, base):
    run = tmp_path / "run"
    train(compose_cfg(base), run_dir=run)
    before = _snapshot(run)
    proc = run_cli([*base, "trainer.resume=never", "data=folder", f"data.root={tmp_path / 'typo'}",
                    f"hydra.run.dir={run}"])
    assert proc.returncode == 2 and "typo" in proc.stdout
    assert not (run / "replaced").exists() and _snapshot(run) == before


# --------------------------------------------------------------------------------------------- damaged files


@pytest.mark.parametrize("content", ["{not yaml: [", "- a\n- list\n"], ids=["not_yaml", "a_list"])
def test_a_damaged_record_is_one_line_and_compare_still_reads_the_sweep(tmp_path, base, content):
    sweep = tmp_path / "sweep"
    assert run_cli(["-m", *base, "trainer.max_steps=2", "loss.beta=1,2", f"hydra.sweep.dir={sweep}"]).returncode == 0
    (sweep / "0" / "trained_with.yaml").write_text(content)
    proc = run_cli([*base, "trainer.max_steps=2", "loss.beta=1", f"hydra.run.dir={sweep / '0'}"])
    [line] = _error_lines(proc)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr
    assert "trained_with.yaml is damaged" in line and "remove it" in line
    table = run_cli([str(sweep)], module="src.compare")
    assert table.returncode == 0 and "trained_with.yaml is damaged" in table.stderr


def test_a_garbage_summary_is_rewritten_by_the_rerun(tmp_path, base):
    run = tmp_path / "run"
    train(compose_cfg(base), run_dir=run)
    (run / "summary.json").write_text("\x00garbage")
    assert train(compose_cfg(base), run_dir=run)["status"] == "finished"
    assert json.loads((run / "summary.json").read_text())["status"] == "finished"


def test_a_lock_that_is_a_symlink_is_refused_and_its_target_untouched(tmp_path, base):
    run, target = tmp_path / "run", tmp_path / "precious.txt"
    run.mkdir()
    target.write_text("keep me\n")
    (run / ".lock").symlink_to(target)
    proc = run_cli([*base, f"hydra.run.dir={run}"])
    assert proc.returncode == 2 and "symlink" in " ".join(_error_lines(proc))
    assert target.read_text() == "keep me\n"


def test_a_symlinked_record_is_replaced_not_written_through(tmp_path, base):
    run, target = tmp_path / "run", tmp_path / "precious.txt"
    run.mkdir()
    target.write_text("keep me\n")
    (run / "summary.json").symlink_to(target)
    assert train(compose_cfg(base), run_dir=run)["status"] == "finished"
    assert target.read_text() == "keep me\n" and not (run / "summary.json").is_symlink()


@pytest.mark.parametrize("packed", [False, pytest.param(True, marks=pytest.mark.slow)])  # (a pack's process)
def test_a_symlinked_train_log_is_replaced_not_written_through(tmp_path, base, packed):
    """Hydra opens train.log before the run begins; a link someone left there is not followed, solo or packed."""
    run, target = tmp_path / ("sweep" if packed else "run"), tmp_path / "precious.txt"
    log_dir = run / "0" if packed else run
    log_dir.mkdir(parents=True)
    target.write_text("keep me\n")
    (log_dir / "train.log").symlink_to(target)
    if packed:
        proc = run_cli(["-m", "hydra/launcher=packed", *base, "loss.beta=1,2", f"hydra.sweep.dir={run}"])
    else:
        proc = run_cli([*base, f"hydra.run.dir={run}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert target.read_text() == "keep me\n" and not (log_dir / "train.log").is_symlink()
    assert "Finished" in (log_dir / "train.log").read_text()


def test_a_run_dir_that_names_a_file_is_one_line(tmp_path, base):
    (tmp_path / "taken").write_text("a file\n")
    for run_dir in (tmp_path / "taken", tmp_path / "taken" / "run"):
        proc = run_cli([*base, f"hydra.run.dir={run_dir}"])
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines() == [f"Output error: {tmp_path / 'taken'} is a file, not a folder; "
                                                    "choose another hydra.run.dir (or hydra.sweep.dir)"]
    assert (tmp_path / "taken").read_text() == "a file\n"


def test_temp_files_of_a_write_killed_mid_way_are_cleared_by_the_rerun(tmp_path, base):
    run = tmp_path / "run"
    args = [*base, "trainer.max_steps=4"]
    train(compose_cfg(args), run_dir=run)
    for stale in (run / "checkpoints" / ".last.pt.tmp99999", run / ".summary.json.tmp99999"):
        stale.write_bytes(b"half a file")
    train(compose_cfg([*base, "trainer.max_steps=6"]), run_dir=run)  # continues: the dir is claimed again
    assert not list(run.glob(".*.tmp*")) and not list((run / "checkpoints").glob(".*.tmp*"))


def test_a_refused_rerun_of_a_sweep_leaves_its_multirun_yaml_as_it_was(tmp_path):
    """Every member refused (another latent size into the same sweep dir): the sweep dir still says what it holds."""
    sweep = tmp_path / "sweep"
    args = ["-m", *tiny_overrides(tmp_path / "cache"), "trainer.max_steps=2", "loss.beta=1,4", f"hydra.sweep.dir={sweep}"]
    assert run_cli(args).returncode == 0
    record = (sweep / "multirun.yaml").read_bytes()
    refused = run_cli([*args, "model.latent_dim=8"])
    assert refused.returncode == 1 and "refused" in refused.stdout + refused.stderr
    assert (sweep / "multirun.yaml").read_bytes() == record
