"""Sweeps for real: W&B offline read back with W&B's own CLI, the named sweeps, W&B sweep specs, the joblib
and submitit launchers, and W&B falling back to offline when it cannot be reached."""
from __future__ import annotations

import json

import pytest
import yaml
from hydra import compose, initialize_config_dir

from src.config import parse

from .conftest import CONF, ROOT, compose_cfg, leet, run_cli, tiny_overrides


@pytest.fixture(scope="module")
def beta_sweep(tmp_path_factory):
    """The named beta sweep (4 members), tiny, with W&B on (offline)."""
    root = tmp_path_factory.mktemp("beta")
    proc = run_cli(["-m", "sweep=beta", "logger=wandb", *tiny_overrides(root / "cache"), "trainer.max_steps=4",
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
    assert len(groups) == 1 and str(beta_sweep) in groups.pop()
    for name, b in zip(names, ("0.25", "1", "4", "16")):  # the member's override string
        assert f"loss.beta={b}," in name and "cache_dir" not in name


def test_wandb_sweep_specs_compose_as_hydra_overrides():
    specs = sorted((ROOT / "sweeps").glob("*.yaml"))
    assert {p.stem for p in specs} >= {"beta", "latent", "likelihood", "beta_latent"}
    for path in specs:
        spec = yaml.safe_load(path.read_text())
        assert spec["program"] == "src.train" and spec["metric"]["name"] == "val/neg_elbo"
        command = spec["command"]
        assert command[:3] == ["python", "-m", "${program}"] and command[-1] == "${args_no_hyphens}"
        fixed = command[3:-1]
        for key, values in spec["parameters"].items():
            for value in values["values"]:
                cfg = parse(compose_cfg([*fixed, f"{key}={value}"]))  # as the agent passes it: key=value
                group, name = key.split(".")
                assert getattr(getattr(cfg, group), name) == value, (path.name, key, value)


def test_slurm_preset_composes():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.array_parallelism) == ("gpu", 1, 16)


@pytest.mark.parametrize("launcher", [["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
                                      ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"]],
                         ids=["joblib", "submitit_local"])
def test_launchers_finish_both_members(tmp_path, launcher):
    proc = run_cli(["-m", *launcher, *tiny_overrides(tmp_path / "cache"), "trainer.max_steps=2", "logger=none",
                    "loss.beta=0.5,2", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for member in ("0", "1"):
        assert json.loads((tmp_path / "sweep" / member / "summary.json").read_text())["status"] == "finished"


def test_unreachable_wandb_goes_on_offline_and_leaks_no_key(tmp_path, tiny):
    secret = "f00dfeed" * 5  # a 40-character API key that must never be written anywhere
    run = tmp_path / "run"
    proc = run_cli([*tiny, "logger=wandb", "logger.mode=online", "logger.init_timeout=2", f"hydra.run.dir={run}"],
                   env={"WANDB_MODE": "", "WANDB_API_KEY": secret, "WANDB_BASE_URL": "http://127.0.0.1:9"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sum("W&B unreachable" in line for line in proc.stdout.splitlines()) == 1
    assert json.loads((run / "summary.json").read_text())["status"] == "finished"
    assert any((run / "wandb").glob("offline-run-*"))
    for path in run.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
