"""One home per fact: where prose or YAML restates the code, a test keeps the two equal."""
from __future__ import annotations

import re

import pytest
from omegaconf import OmegaConf

from src.identity import PACKABLE

from .conftest import ROOT


def test_the_packable_keys_in_the_docs_are_the_codes():
    text = (ROOT / "docs" / "sweeps.md").read_text()
    paragraph = text[text.index("**Which keys pack**"):text.index("Every other key splits packs")]
    assert set(re.findall(r"`([a-z_]+(?:\.[a-z_]+)?)`", paragraph)) - {"PACKABLE"} == set(PACKABLE)


@pytest.mark.parametrize("name", ["parallel", "slurm", "packed", "packed_slurm"])
def test_a_launcher_preset_only_picks_its_schema(name):
    """The values live in the schema (hydra_plugins/vae_sweeps/config.py): a preset that restated one would be a
    second home, and the two would drift."""
    from hydra_plugins.vae_sweeps import config

    preset = OmegaConf.load(ROOT / "conf" / "hydra" / "launcher" / f"{name}.yaml")
    assert list(preset.keys()) == ["defaults"], f"{name}.yaml states values; they belong in its schema"
    [base] = preset.defaults
    assert base == f"{name}_base"
    schema = {"parallel": config.ParallelConf, "slurm": config.SlurmConf, "packed": config.PackedConf,
              "packed_slurm": config.PackedSlurmConf}[name]
    assert schema.__dataclass_fields__["_target_"].default.endswith(
        {"parallel": "ParallelLauncher", "slurm": "KeepGoingSlurmLauncher", "packed": "PackedLauncher",
         "packed_slurm": "PackedSlurmLauncher"}[name])
