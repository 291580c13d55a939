"""Sweeps for real: W&B offline read back with W&B's own CLI, the named sweeps, W&B sweep specs, the joblib
and submitit launchers, and W&B falling back to offline when it cannot be reached."""
from __future__ import annotations

import json

import pytest
import yaml
from hydra import compose, initialize_config_dir

from .conftest import CONF, ROOT, leet, run_cli, tiny_overrides


@pytest.fixture(scope="module")
def beta_sweep(tmp_path_factory):
    """The named beta sweep (4 members), tiny, with W&B on (offline)."""
    root = tmp_path_factory.mktemp("beta")
    proc = run_cli(["-m", "sweep=beta", *tiny_overrides(root / "cache"), "logger=wandb", "trainer.max_steps=4",
                    f"hydra.sweep.dir={root / 'sweep'}"])
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
        assert run["run_id"] == (beta_sweep / member / "wandb_run_id").read_text().split()[0]
        history = {}
        for r in records:
            if r["type"] == "history":
                history.update(r["history"]["item"])
        for key in ("train/loss", "train/recon_nll", "train/kl", "train/beta", "val/neg_elbo", "val/recon_nll",
                    "val/kl", "val/active_units", "step"):
            assert key in history, key
        for image in ("val/samples", "val/reconstructions", "test/samples", "test/reconstructions"):
            assert history[f"{image}._type"] == "image-file", image
        assert {f"train/kl_per_dim/{d}" for d in range(4)} <= history.keys()  # per dim, as val/kl_per_dim/...
        # the settings the sweep does not vary are the run's tags; the swept beta is not one
        assert {"data=shapes", "model=conv", "likelihood=bernoulli", "latent_dim=4"} <= set(run["tags"]), run["tags"]
        assert not any(t.startswith("beta=") for t in run["tags"])
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


@pytest.mark.slow  # a real `wandb agent` process
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


def test_the_sweep_report_counts_only_this_launchs_members(tmp_path, tiny):
    """A sweep dir that held a larger sweep with a failed member, relaunched with fewer members that all finish:
    the failed member of the earlier launch is not this launch's failure."""
    sweep = tmp_path / "sweep"
    first = run_cli(["-m", *tiny, "trainer.max_steps=2", "loss.beta=1,-1", f"hydra.sweep.dir={sweep}"])
    assert first.returncode == 1 and "member 1 failed" in first.stdout
    again = run_cli(["-m", *tiny, "trainer.max_steps=2", "loss.beta=1", f"hydra.sweep.dir={sweep}"])
    assert again.returncode == 0 and "Sweep finished: every member" in again.stdout, again.stdout[-2000:]
