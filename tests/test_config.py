"""Every config and preset composes against the typed schema; bad values fail with one line naming the key."""
from __future__ import annotations

from pathlib import Path

import pytest

from src.config import Config, ConfigError, parse

from .conftest import CONF, compose_cfg, run_cli

GROUP_OPTIONS = [(p.parent.name, p.stem) for p in sorted(Path(CONF).glob("*/*.yaml"))]


@pytest.mark.parametrize("group,option", GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_config_option_composes_and_validates(group, option):
    overrides = [f"{group}={option}", "data.root=/data/somewhere"]
    cfg = parse(compose_cfg(overrides))
    assert isinstance(cfg, Config)
    if group in ("model", "data", "optimizer", "logger"):
        assert getattr(cfg, group).name == option


def test_presets_state_the_seed_setting_in_honest_units():
    seed = parse(compose_cfg(["experiment=celeba64_seed", "data.root=/data/celeba"]))
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
    ("data.image_size=60", "data.image_size"),
    ("model.hidden_channels=[]", "model.hidden_channels"),
    ("optimizer.lr=0", "optimizer.lr"),
    ("data.batch_size=0", "data.batch_size"),
    ("loss.free_bits=-0.5", "loss.free_bits"),
    ("trainer.precision=fp8", "trainer.precision"),
    ("trainer.device=cuda", "trainer.device"),
    ("data=celeba", "data.root"),
]


@pytest.mark.parametrize("override,key", BAD, ids=[b[0] for b in BAD])
def test_bad_value_is_rejected_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse(compose_cfg([override]))


@pytest.mark.parametrize("override,key", BAD, ids=[b[0] for b in BAD])
def test_cli_bad_value_gives_one_line_and_no_traceback(tmp_path, override, key):
    proc = run_cli([override, f"hydra.run.dir={tmp_path / 'run'}"])
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Traceback" not in out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out
    assert key in lines[0] and "allowed" in lines[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # failed before any work
