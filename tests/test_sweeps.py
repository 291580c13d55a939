"""Sweeps for real: W&B offline read back with W&B's own CLI, the named sweeps, W&B sweep specs, the joblib
and submitit launchers, and W&B falling back to offline when it cannot be reached."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from .conftest import CONF, ROOT, leet, run_cli, tiny_overrides


@pytest.fixture(scope="module")
def beta_sweep(tmp_path_factory):
    """The named beta sweep (4 members), tiny, with W&B on (offline)."""
    root = tmp_path_factory.mktemp("beta")
    proc = run_cli(["-m", "sweep=beta", *tiny_overrides(root / "cache"), "logger=wandb", "trainer.max_steps=4",
                    f"hydra.sweep.dir={root / 'sweep'}"], real_process=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "sweep"


def test_named_sweep_runs_every_member(beta_sweep):
    betas = [json.loads((beta_sweep / m / "metrics.jsonl").read_text().splitlines()[0])["train/beta"]
             for m in "0123"]
    assert betas == [0.25, 1.0, 4.0, 16.0]


def test_wandb_runs_carry_terms_grids_config_and_one_group(beta_sweep):
    groups, names = set(), []
    for member, beta in zip("0123", (0.25, 1.0, 4.0, 16.0)):
        records = leet(beta_sweep / member / "wandb")
        run = next(r["run"] for r in records if r["type"] == "run")
        groups.add(run["run_group"])
        names.append(run["display_name"])
        assert run["job_type"] == "train"
        assert run["config"]["update"]["loss"]["beta"] == beta and run["config"]["update"]["model"]["latent_dim"] == 4
        # the run id kept in the run dir is the W&B run's id: a rerun continues it
        assert run["run_id"] == (beta_sweep / member / "wandb_run_id").read_text().strip()
        history = {}
        for r in records:
            if r["type"] == "history":
                history.update(r["history"]["item"])
        for key in ("train/loss", "train/recon_nll", "train/kl", "train/beta", "val/neg_elbo", "val/recon_nll",
                    "val/kl", "val/active_units", "step"):
            assert key in history, key
        for image in ("val/samples", "val/reconstructions"):
            assert history[f"{image}._type"] == "image-file", image
        assert history["val/kl_per_dim_table._type"] == "table-file"
        assert next(r["exit"]["exit_code"] for r in records if r["type"] == "exit") == 0
        summary = leet(beta_sweep / member / "wandb", summary=True)
        assert "finished" in json.dumps(summary) and "test/neg_elbo" in json.dumps(summary)
    # named by the swept key alone (from the named sweep's params), grouped by the sweep folder's name
    assert names == ["beta=0.25", "beta=1", "beta=4", "beta=16"] and groups == {beta_sweep.name}


@pytest.mark.parametrize("name", ["beta", "latent", "likelihood", "beta_latent"])
def test_wandb_sweep_spec_and_hydra_named_sweep_are_the_same_study(name):
    """sweeps/<name>.yaml (W&B agents) and conf/sweep/<name>.yaml (Hydra -m) must not drift apart."""
    spec = yaml.safe_load((ROOT / "sweeps" / f"{name}.yaml").read_text())
    named = yaml.safe_load((ROOT / "conf" / "sweep" / f"{name}.yaml").read_text())["hydra"]["sweeper"]["params"]
    assert spec["metric"]["name"] == "val/neg_elbo"  # what main() returns to sweepers
    assert {k: [str(v) for v in p["values"]] for k, p in spec["parameters"].items()} == \
        {k: str(v).split(",") for k, v in named.items()}


def test_a_wandb_agent_command_trains_the_member_it_names(tmp_path, tiny):
    """The command an agent runs for one member of sweeps/beta.yaml, as W&B expands it, trains that member."""
    spec = yaml.safe_load((ROOT / "sweeps" / "beta.yaml").read_text())
    command = spec["command"]
    assert command[:3] == ["python", "-m", "${program}"] and command[-1] == "${args_no_hyphens}"
    member = [f"{key}={p['values'][-1]}" for key, p in spec["parameters"].items()]  # loss.beta=16
    run = tmp_path / "run"
    proc = run_cli([*tiny, *command[3:-1], *member, "trainer.max_steps=2", f"hydra.run.dir={run}"],
                   module=spec["program"], real_process=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["train/beta"] == 16.0 and (run / "wandb").is_dir()


def test_slurm_preset_targets_the_installed_submitit_launcher():
    from hydra.utils import get_class

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert "SlurmLauncher" in [c.__name__ for c in get_class(cfg.hydra.launcher._target_).__mro__]
    assert cfg.hydra.launcher.max_num_timeout > 0  # a timed-out or preempted member is requeued and resumes


@pytest.mark.parametrize("launcher", [["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
                                      ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"],
                                      ["hydra/launcher=parallel"]],
                         ids=["joblib", "submitit_local", "parallel"])
def test_launchers_finish_both_members(tmp_path, launcher):
    proc = run_cli(["-m", *launcher, *tiny_overrides(tmp_path / "cache"), "trainer.max_steps=2", "logger=none",
                    "loss.beta=0.5,2", f"hydra.sweep.dir={tmp_path / 'sweep'}"], real_process=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for member in ("0", "1"):
        assert json.loads((tmp_path / "sweep" / member / "summary.json").read_text())["status"] == "finished"


def test_a_member_killed_by_the_system_is_named_and_the_others_finish(tmp_path):
    """hydra/launcher=parallel (the README's choice for members at once): kill -9 one member, as the
    out-of-memory killer does; the other finishes and the sweep ends by naming the killed one."""
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=parallel", *tiny_overrides(tmp_path / "cache"), "logger=none",
            "trainer.max_steps=300", "trainer.max_epochs=null", "trainer.eval_every=300", "loss.beta=1,2",
            f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen([sys.executable, "-m", "src.train", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lock = sweep / "0" / ".lock"
    deadline = time.time() + 120
    while time.time() < deadline and not (lock.is_file() and lock.read_text().startswith("pid")):
        time.sleep(0.01)  # the lock is the member's first act: it is killed long before its 300 steps end
    os.kill(int(lock.read_text().split()[1]), signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "Traceback" not in out, out[-3000:]
    assert "member 0 ended without a summary" in out and "1 member(s)" in out
    assert json.loads((sweep / "1" / "summary.json").read_text())["status"] == "finished"


def _submitit_jobs(folder: Path) -> list:
    """pids of the submitit job processes whose command line names `folder`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if proc.name.isdigit() and "submitit" in cmdline and str(folder) in cmdline:
            pids.append(int(proc.name))
    return pids


def test_a_member_killed_before_it_makes_its_folder_is_named(tmp_path):
    """The job is killed while it starts (before Hydra makes the member's folder): the sweep still ends with
    exit 1 naming that member, not 'every member finished' one member short."""
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=parallel", *tiny_overrides(tmp_path / "cache"), "logger=none",
            "trainer.max_steps=2", "loss.beta=1,2", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen([sys.executable, "-m", "src.train", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 120
    while time.time() < deadline and not (jobs := _submitit_jobs(sweep / ".submitit")):
        time.sleep(0.005)
    os.kill(jobs[0], signal.SIGKILL)  # seconds before the job has imported what it runs
    out, _ = proc.communicate(timeout=300)
    lost = [line for line in out.splitlines() if "ended without a result (job" in line]
    assert proc.returncode == 1 and "Traceback" not in out and "every member" not in out, out[-3000:]
    assert lost and "1 member(s)" in out, out[-3000:]
    member = re.search(r"member (\d) ended without a result \(job", out).group(1)
    assert not (sweep / member / "summary.json").exists()
    assert json.loads((sweep / str(1 - int(member)) / "summary.json").read_text())["status"] == "finished"
