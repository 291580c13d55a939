"""Adaptive sweeps (`hydra/sweeper=optuna_halving`): an Optuna study whose trials train in rungs of growing budget,
Optuna's pruner deciding who goes on, survivors continuing from their checkpoints; the study in SQLite, resumed by
the same command. Tests read the study back with Optuna's own API and count steps in the members' metrics.jsonl."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import optuna
import pytest

from tests.conftest import ROOT, metric_rows, run_cli, tiny_overrides

SEARCH = ["optimizer.lr=tag(log,interval(0.0003,0.03))", "loss.beta=interval(0.5,8)"]
RUNGS = ["hydra.sweeper.n_trials=9", "hydra.sweeper.min_budget=2", "hydra.sweeper.max_budget=18",
         "hydra.sweeper.reduction_factor=3", "hydra.sweeper.sampler.seed=0"]  # rungs of 2, 6 and 18 steps


def study_args(cache_dir: Path, sweep_dir: Path, *extra: str) -> List[str]:
    tiny = [o for o in tiny_overrides(cache_dir) if not o.startswith(("trainer.max_steps", "trainer.log_every",
                                                                       "trainer.eval_every"))]
    return ["-m", "hydra/sweeper=optuna_halving", *SEARCH, *RUNGS, *tiny, "trainer.log_every=1",
            "trainer.eval_every=2", "eval.final=none", f"hydra.sweep.dir={sweep_dir}", *extra]


def load(sweep_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name="study", storage=f"sqlite:///{sweep_dir / 'study.db'}")


def decisions(study: optuna.Study) -> Dict[int, tuple]:
    """Each trial's state, parameters and the values it reported at each rung."""
    return {t.number: (t.state.name, t.params, dict(t.intermediate_values)) for t in study.trials}


def trained_steps(member: Path) -> List[int]:
    return [r["step"] for r in metric_rows(member) if any(k.startswith("train/") for k in r)]


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory, cache_dir) -> Path:
    """A 9-trial study, 3 rungs, reduction 3, sampler seed 0, run to its end with the basic launcher."""
    sweep_dir = tmp_path_factory.mktemp("study") / "s"
    proc = run_cli(study_args(cache_dir, sweep_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep_dir


def test_a_halving_study_trains_under_40_percent_and_its_best_trial_is_that_trial_run_alone(study_dir, cache_dir,
                                                                                          tmp_path):
    study = load(study_dir)
    states = [t.state for t in study.trials]
    assert len(states) == 9 and states.count(optuna.trial.TrialState.COMPLETE) == 1
    assert states.count(optuna.trial.TrialState.PRUNED) == 8
    steps = {t.number: trained_steps(study_dir / str(t.number)) for t in study.trials}
    for number, seen in steps.items():
        assert seen == list(range(1, len(seen) + 1)), number  # each step once, from the first
    # synchronous successive halving: 9 trials to 2 steps, 3 on to 6, 1 on to 18
    assert sorted(len(s) for s in steps.values()) == [2] * 6 + [6] * 2 + [18]
    assert sum(map(len, steps.values())) <= 0.4 * 9 * 18
    best = study.best_trial
    assert len(steps[best.number]) == 18 and best.intermediate_values[2] == min(
        t.intermediate_values[2] for t in study.trials)  # (here the best at the first rung stayed the best)
    # the same trial run alone at the full budget: the same run, bitwise (a solo run is the loop engine)
    tiny = [o for o in tiny_overrides(cache_dir) if not o.startswith(("trainer.max_steps", "trainer.log_every",
                                                                       "trainer.eval_every"))]
    alone = tmp_path / "alone"
    params = [f"{k}={v!r}" for k, v in best.params.items()]
    proc = run_cli([*tiny, *params, "trainer.log_every=1", "trainer.eval_every=2", "eval.final=none",
                    "trainer.max_steps=18", "trainer.max_epochs=null", f"hydra.run.dir={alone}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    solo = json.loads((alone / "summary.json").read_text())
    in_study = json.loads((study_dir / str(best.number) / "summary.json").read_text())
    assert in_study["val/neg_elbo"] == solo["val/neg_elbo"] == best.value
    # Optuna's dashboard reads the same storage: the study's record of its settings is there too
    assert study.user_attrs["settings"]["rungs"] == [2, 6, 18]


def test_the_same_command_on_a_finished_study_trains_nothing_more(study_dir, cache_dir):
    before = {p.name: (p / "metrics.jsonl").read_text() for p in study_dir.iterdir() if p.name.isdigit()}
    proc = run_cli(study_args(cache_dir, study_dir))
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = proc.stdout + proc.stderr
    assert "resuming with 9 trials begun" in said and "Rung" not in said
    assert {p.name: (p / "metrics.jsonl").read_text() for p in study_dir.iterdir() if p.name.isdigit()} == before
    assert len(load(study_dir).trials) == 9


@pytest.mark.slow
def test_a_study_killed_mid_rung_resumes_without_training_a_step_twice(study_dir, cache_dir, tmp_path):
    sweep_dir = tmp_path / "s"
    args = study_args(cache_dir, sweep_dir)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "src.train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # into the second rung (steps 3 to 6), a trial past its checkpoint
            if any(max(trained_steps(m), default=0) >= 4 for m in sweep_dir.glob("[0-9]*")
                   if (m / "metrics.jsonl").is_file()):
                break
            time.sleep(0.05)
        else:
            pytest.fail("the study never reached its second rung")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    assert len(load(sweep_dir).trials) == 9  # asked before the kill; none complete yet
    again = run_cli(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming with 9 trials begun" in again.stdout + again.stderr
    study = load(sweep_dir)
    assert decisions(study) == decisions(load(study_dir))  # the same trials, values and pruning decisions
    for t in study.trials:
        steps = trained_steps(sweep_dir / str(t.number))
        assert steps == list(range(1, max(t.intermediate_values) + 1)), t.number  # each step once in metrics.jsonl


@pytest.mark.slow
def test_a_packed_study_packs_each_rung_and_equals_the_unpacked_study(study_dir, cache_dir, tmp_path):
    sweep_dir = tmp_path / "s"
    # one torch thread, as the unpacked study in this process (a sum over 2 threads is added in another order)
    proc = run_cli(study_args(cache_dir, sweep_dir, "hydra/launcher=packed", "hydra.launcher.engine=loop",
                              "hydra.launcher.threads=1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = load(sweep_dir)
    assert decisions(study) == decisions(load(study_dir))  # bitwise: the loop engine is each member's solo step
    survivors = sorted(t.number for t in study.trials if 6 in t.intermediate_values)
    said = proc.stdout + proc.stderr
    assert "pack 0: members 0, 1, 2, 3, 4, 5, 6, 7, 8 (engine loop)" in said  # rung 0: one pack
    assert f"pack 0: members {', '.join(map(str, survivors))} (engine loop)" in said  # rung 1's survivors: one pack


def test_a_diverging_trial_is_failed_in_the_study_and_named_and_the_others_finish(cache_dir, tmp_path):
    sweep_dir = tmp_path / "s"
    tiny = [o for o in tiny_overrides(cache_dir) if not o.startswith(("trainer.max_steps", "trainer.eval_every"))]
    proc = run_cli(["-m", "hydra/sweeper=optuna_halving", "optimizer.lr=choice(0.001,1000.0)", "loss.beta=4",
                    "seed=3", "hydra.sweeper.sampler.name=grid", "hydra.sweeper.sampler.seed=0",
                    "hydra.sweeper.n_trials=2", "hydra.sweeper.min_budget=3", "hydra.sweeper.max_budget=6",
                    *tiny, "trainer.eval_every=3", "eval.final=none", f"hydra.sweep.dir={sweep_dir}"])
    study = load(sweep_dir)
    by_lr = {t.params["optimizer.lr"]: t for t in study.trials}
    assert by_lr[1000.0].state == optuna.trial.TrialState.FAIL and by_lr[1000.0].value is None  # never a NaN
    assert "non-finite" in by_lr[1000.0].user_attrs["error"]
    assert by_lr[0.001].state == optuna.trial.TrialState.COMPLETE and by_lr[0.001].value > 0
    assert proc.returncode == 1  # the sweep's report names the member that did not finish
    assert f"member {by_lr[1000.0].number} diverged" in proc.stdout + proc.stderr


@pytest.mark.parametrize("bad, key", [
    ("loss.beta=interval(8,0.5)", "loss.beta"),  # Optuna's own check: low > high
    ("optimizer.lr=tag(log,interval(0,0.1))", "optimizer.lr"),  # a log scale from 0
    ("model.latent_dim=choice(0,4)", "model.latent_dim"),  # a value the config refuses, at one end of the space
    ("trainer.max_steps=50", "trainer.max_steps"),  # the sweeper's budget
])
def test_a_bad_search_space_is_one_line_naming_the_key_before_any_training(cache_dir, tmp_path, bad, key):
    sweep_dir = tmp_path / "s"
    args = study_args(cache_dir, sweep_dir, bad)
    if bad.startswith("loss.beta"):
        args.remove("loss.beta=interval(0.5,8)")
    if bad.startswith("optimizer.lr"):
        args.remove("optimizer.lr=tag(log,interval(0.0003,0.03))")
    proc = run_cli(args)
    assert proc.returncode == 2
    [line] = [x for x in proc.stderr.splitlines() if x.strip()]
    assert line.startswith("Config error:") and key in line, line
    assert not any(p.name.isdigit() for p in sweep_dir.iterdir()) if sweep_dir.is_dir() else True


def test_a_study_resumed_with_another_search_space_is_refused_naming_what_changed(study_dir, cache_dir):
    args = [a for a in study_args(cache_dir, study_dir) if not a.startswith("loss.beta")] + ["loss.beta=interval(1,8)"]
    proc = run_cli(args)
    assert proc.returncode == 2
    [line] = [x for x in proc.stderr.splitlines() if x.strip()]
    assert "other space" in line and "loss.beta" in line and "hydra.sweeper.study_name" in line, line


@pytest.mark.slow  # W&B's service, a run per rung and per pruned trial
def test_each_trial_is_a_wandb_run_named_by_its_values_and_a_pruned_one_is_tagged_with_its_rung(cache_dir, tmp_path):
    from tests.conftest import leet

    sweep_dir = tmp_path / "s"
    args = [a for a in study_args(cache_dir, sweep_dir) if not a.startswith(("logger=", "hydra.sweeper.n_trials",
                                                                              "hydra.sweeper.max_budget"))]
    proc = run_cli([*args, "logger=wandb", "logger.mode=offline", "hydra.sweeper.n_trials=3",
                    "hydra.sweeper.max_budget=6"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = load(sweep_dir)
    for t in study.trials:
        shown = leet(sweep_dir / str(t.number) / "wandb", summary=True)
        pruned = t.state == optuna.trial.TrialState.PRUNED
        assert ("pruned" in shown["tags"]) == pruned and ("rung=0" in shown["tags"]) == pruned, (t.number, shown)
        if pruned:
            assert {"study/state": "pruned", "study/rung": 0, "study/max_steps": 2}.items() <= shown["summary"].items()
        assert shown["name"] == f"lr={t.params['optimizer.lr']!r} beta={t.params['loss.beta']!r}", shown  # as trained
        assert not any(tag.startswith(("beta=", "max_steps")) for tag in shown["tags"])  # swept: in the name
    assert [t.state for t in study.trials].count(optuna.trial.TrialState.PRUNED) == 2


@pytest.mark.slow  # a whole report with Optuna's plots
def test_compare_on_a_study_puts_the_best_trial_first_and_the_pruned_apart(study_dir, tmp_path):
    import pandas as pd

    out = tmp_path / "cmp"
    proc = run_cli([str(study_dir), "--out", str(out)], module="src.compare")
    assert proc.returncode == 0, proc.stderr[-2000:]
    study = load(study_dir)
    best = study.best_trial
    trials = pd.read_csv(out / "study.csv")
    assert list(trials["trial"])[0] == best.number and list(trials["state"]) == ["complete"] + ["pruned"] * 8
    pruned = trials[trials["state"] == "pruned"]
    assert list(pruned["budget"]) == sorted(pruned["budget"], reverse=True)  # the furthest first, then by value
    for _, row in pruned.iterrows():  # each with its last rung's value
        assert row["value"] == study.trials[row["trial"]].intermediate_values[row["budget"]]
    assert list(pd.read_csv(out / "table.csv", dtype={"run": str})["run"]) == [str(best.number)]  # the settings compared: complete trials
    page = (out / "report.html").read_text()
    assert page.index(f"Best trial {best.number}: val/neg_elbo = {best.value:.4g}") < page.index("Pruned trials")
    assert page.index("Pruned trials") < page.index("Final metrics")
    for figure in ("study_rungs", "study_history", "study_importance"):
        assert (out / f"{figure}.png").stat().st_size > 10_000 and (out / f"{figure}.pdf").is_file()
        assert f'src="{figure}.png"' in page
    assert proc.stdout.startswith("Study: 9 trials: 8 pruned, 1 complete")


def test_a_hyperband_study_prunes_within_its_brackets_and_trains_less_than_the_grid(cache_dir, tmp_path):
    sweep_dir = tmp_path / "s"
    proc = run_cli(study_args(cache_dir, sweep_dir, "hydra.sweeper.pruner=hyperband"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = load(sweep_dir)
    states = [t.state.name for t in study.trials]
    assert len(states) == 9 and set(states) == {"COMPLETE", "PRUNED"}
    for t in study.trials:  # a pruned trial lost to some trial that went on from the same rung
        if t.state.name == "PRUNED":
            rung = max(t.intermediate_values)
            went_on = [u.intermediate_values[rung] for u in study.trials if max(u.intermediate_values) > rung]
            assert went_on and min(went_on) < t.intermediate_values[rung], t.number
    steps = sum(len(trained_steps(sweep_dir / str(t.number))) for t in study.trials)
    assert steps == sum(max(t.intermediate_values) for t in study.trials) < 9 * 18
