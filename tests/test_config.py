"""Every config and preset composes against the typed schema; bad values fail with one line naming the key."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from src.config import Config, ConfigError
from src.config_check import parse

from .conftest import CONF, compose_cfg, run_cli

GROUP_OPTIONS = [(p.parent.name, p.stem) for p in sorted(Path(CONF).glob("*/*.yaml"))]


@pytest.mark.parametrize("group,option", GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_config_option_composes_and_validates(group, option):
    cfg = parse(compose_cfg([f"{group}={option}", "data.root=/data/somewhere"]))
    if group in ("model", "data", "optimizer", "logger"):
        assert getattr(cfg, group).name == option


def _leaves(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("group,option", GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_group_files_state_only_what_differs_from_the_defaults(group, option):
    """Every default has one home, the dataclasses: a group file or preset restating one is a second home."""
    if group == "sweep":  # a named study sets hydra.sweeper.params only, each a real key with several values
        own = OmegaConf.to_container(OmegaConf.load(Path(CONF) / group / f"{option}.yaml"))
        params = own.pop("hydra").pop("sweeper").pop("params")
        assert not own and params, f"sweep/{option}.yaml sets more than hydra.sweeper.params"
        base = compose_cfg([])
        for key, values in params.items():
            assert OmegaConf.select(base, key) is not None or key in ("model", "data", "loss"), key
            assert len(str(values).split(",")) > 1, f"sweep/{option}.yaml sweeps {key} over one value"
        return
    own = OmegaConf.to_container(OmegaConf.load(Path(CONF) / group / f"{option}.yaml")) or {}
    if group == "experiment":  # a preset overlays the groups it picks; compare with those
        picks = [next(iter(d.items())) for d in own.pop("defaults", [])]
        base = OmegaConf.to_container(compose_cfg([f"{g.split(' ')[-1].lstrip('/')}={o}" for g, o in picks]))
    else:
        base = {group: OmegaConf.to_container(OmegaConf.structured(Config))[group]}
        own = {group: own}
    for key, value in _leaves(own):
        if key.endswith(".name") and group != "experiment":
            continue  # the option's own name picks it
        assert OmegaConf.select(OmegaConf.create(base), key) != value, f"{group}/{option}.yaml restates {key}={value!r}"


def test_the_default_run_is_the_dataclass_defaults():
    assert OmegaConf.to_container(compose_cfg([])) == OmegaConf.to_container(OmegaConf.structured(Config))


def test_presets_state_the_vanilla_vae_setting_in_honest_units():
    seed = parse(compose_cfg(["experiment=vanilla_vae_celeba64", "data.root=/data/celeba"]))
    # pixel-mean MSE + 0.00025 KL, times D = 12288, is Gaussian sigma^2 = 0.5 with beta = 3.072
    assert seed.loss.likelihood == "gaussian"
    assert seed.loss.sigma**2 == pytest.approx(0.5)
    assert seed.loss.beta == pytest.approx(0.00025 * 3 * 64 * 64)
    assert seed.model.hidden_channels == [32, 64, 128, 256, 512] and seed.model.latent_dim == 128
    assert (seed.optimizer.lr, seed.optimizer.scheduler, seed.optimizer.gamma) == (0.005, "exponential", 0.95)
    beta_vae = parse(compose_cfg(["experiment=dsprites_beta"]))
    assert (beta_vae.data.name, beta_vae.loss.beta, beta_vae.loss.likelihood) == ("shapes", 4.0, "bernoulli")


BAD = [
    ("model.latent_dim=0", "model.latent_dim"),
    ("loss.beta=-1", "loss.beta"),
    ("loss.likelihood=poisson", "loss.likelihood"),
    ("data.image_size=8", "data.image_size"),  # below 2**4 for the default 4-stage conv
    ("model.hidden_channels=[]", "model.hidden_channels"),
    ("optimizer.lr=0", "optimizer.lr"),
    ("data.batch_size=0", "data.batch_size"),
    ("loss.free_bits=-0.5", "loss.free_bits"),
    ("trainer.precision=fp8", "trainer.precision"),
    ("trainer.device=cuda", "trainer.device"),
    ("data=celeba", "data.root"),
    ("trainer.max_steps=0", "trainer.max_steps"),
    ("trainer.max_epochs=0", "trainer.max_epochs"),
    ("seed=4294967296", "seed"),
    ("seed=-1", "seed"),
    ("data.seed=4294967296", "data.seed"),
    ("optimizer.lr=inf", "optimizer.lr"),
    ("loss.beta=inf", "loss.beta"),
    ("loss.sigma=inf", "loss.sigma"),
    ("loss.beta=nan", "loss.beta"),
    ("eval.fid_images=1", "eval.fid_images"),  # a Fréchet distance of one image: once a traceback after training
]


@pytest.mark.parametrize("override,key", BAD, ids=[b[0] for b in BAD])
def test_bad_value_is_rejected_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse(compose_cfg([override]))


CLI_BAD = [b for b in BAD if b[0] in ("model.latent_dim=0", "data=celeba", "trainer.device=cuda", "optimizer.lr=inf",
                                      "seed=4294967296", "trainer.max_steps=0")]  # the rest as parse() shows


@pytest.mark.parametrize("override,key", CLI_BAD, ids=[b[0] for b in CLI_BAD])
def test_cli_bad_value_gives_one_line_and_no_traceback(tmp_path, override, key):
    proc = run_cli([override, f"hydra.run.dir={tmp_path / 'run'}"])
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Traceback" not in out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out
    assert key in lines[0] and "allowed" in lines[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # failed before any work


HYDRA_ERRORS = [
    ("model.latent_dim=abc", "model.latent_dim"),  # a string for an int
    ("model.latnet_dim=64", "did you mean model.latent_dim"),  # a typo in a typed section
    ("+model.latnet_dim=64", "did you mean model.latent_dim"),  # ... with the + that Hydra then suggests
    ("latent_dim=64", "latent_dim"),  # a key outside every section
    ("model=transformer", "model/transformer"),  # an unknown group option, with the ones there are
    ("loss.beta=[1", "loss.beta=[1"),  # the override grammar
]


@pytest.mark.parametrize("override,needle", HYDRA_ERRORS, ids=[h[0] for h in HYDRA_ERRORS])
def test_hydras_own_errors_end_in_one_line_and_exit_2(tmp_path, override, needle):
    proc = run_cli([override, "logger=none", f"hydra.run.dir={tmp_path / 'run'}"])
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) <= 2 and "Traceback" not in proc.stderr, lines
    assert needle in lines[-1], lines
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_hydra_flags_that_cannot_go_together_are_one_line(tmp_path):
    proc = run_cli(["-m", "--cfg", "job", "loss.beta=1,4", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, lines
    assert "--multirun" in lines[0] and "--cfg" in lines[0]


def test_a_named_sweep_without_multirun_is_refused(tmp_path):
    proc = run_cli(["sweep=beta", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"])
    [line] = [line for line in proc.stdout.splitlines() if "ERROR" in line]
    assert proc.returncode == 2 and "sweep=beta" in line and "-m" in line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_an_output_dir_that_cannot_be_written_is_one_line(tmp_path):
    proc = run_cli(["logger=none", "hydra.run.dir=/sys/vae-run"])  # sysfs: no one may create folders there
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "/sys/vae-run" in lines[0], lines


def test_an_existing_run_dir_on_a_read_only_mount_is_one_line(tmp_path, tiny):
    """Hydra's own log file cannot be opened there: one line naming it, exit 2 (was logging's traceback)."""
    source, mounted = tmp_path / "source", tmp_path / "mounted"
    assert run_cli([*tiny, "trainer.max_steps=2", f"hydra.run.dir={source / 'run'}"]).returncode == 0
    mounted.mkdir()
    if subprocess.run(["mount", "--bind", str(source), str(mounted)], capture_output=True).returncode != 0:
        pytest.skip("cannot bind-mount here (needs root); CI runs it")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(mounted)], check=True, capture_output=True)
        proc = run_cli([*tiny, "trainer.max_steps=2", f"hydra.run.dir={mounted / 'run'}"])
    finally:
        subprocess.run(["umount", str(mounted)], check=True)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, lines
    assert "train.log" in lines[0] and "Read-only file system" in lines[0]


def test_a_full_disk_is_one_line_naming_the_run_dir(tmp_path, tiny):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").symlink_to("/dev/full")  # every write to it fails with ENOSPC, as on a full disk
    proc = run_cli([*tiny, "logger=none", "trainer.log_every=1", f"hydra.run.dir={run}"])
    errors = [line for line in proc.stdout.splitlines() if "ERROR" in line]
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr
    assert len(errors) == 1 and "No space left on device" in errors[0] and str(run) in errors[0]


@pytest.mark.slow  # a real process with W&B's service
def test_a_bad_value_with_wandb_on_is_still_one_line(tmp_path):
    """The failure is recorded as a W&B run too, without W&B's banner around the one line."""
    run = tmp_path / "run"
    proc = run_cli(["model.latent_dim=0", "logger=wandb", f"hydra.run.dir={run}"], real_process=True)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "model.latent_dim" in lines[0], lines
    assert list((run / "wandb").glob("offline-run-*"))  # recorded all the same


def test_help_names_every_group_with_its_options_and_the_main_keys():
    result = run_cli(["--help"])
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for line in ("data: celeba, cifar10, fashion_mnist, folder, mnist, shapes", "model: conv, mlp",
                 "sweep: beta, beta_latent, latent, likelihood", "logger: none, wandb"):
        assert line in out, line
    for key in ("loss.beta=", "model.latent_dim=", "loss.likelihood=", "eval.collapse_nats=", "seed=", "-m"):
        assert key in out, key


def test_the_dashboard_config_leaves_out_the_keys_that_mean_nothing_for_the_run():
    """A Fashion-MNIST run's W&B config has no data.num_train or data.test_size (the built-in shapes' keys) and a
    Bernoulli run no loss.sigma; the built-in data keeps its own."""
    from src.config import applying

    fashion = applying({"data": {"name": "fashion_mnist", "root": "/d", "num_train": 20000, "test_size": 1000,
                                 "val_size": 5000}, "loss": {"likelihood": "bernoulli", "sigma": 0.1}, "seed": 0})
    assert fashion == {"data": {"name": "fashion_mnist", "root": "/d", "val_size": 5000},
                       "loss": {"likelihood": "bernoulli"}, "seed": 0}
    shapes = applying({"data": {"name": "shapes", "root": None, "num_train": 20000}})
    assert shapes == {"data": {"name": "shapes", "num_train": 20000}}
