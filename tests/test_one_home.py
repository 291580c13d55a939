"""One home per fact: where prose or YAML restates the code, a test keeps the two equal."""
from __future__ import annotations

import re

import pytest
from omegaconf import OmegaConf

from src.identity import NOT_RESULTS, PACKABLE

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


def test_every_python_import_the_docs_show_exists():
    """A reader pastes the docs' Python: each `from src.<module> import <names>` there names a real module and real
    names (docs/tools.md once imported a module that did not exist)."""
    import importlib

    shown = [(path.name, m.group(1), m.group(2)) for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
             for m in re.finditer(r"^\s*from (src(?:\.\w+)+) import ([\w, ]+)$", path.read_text(), re.M)]
    assert shown, "the docs show no import: the pattern above no longer matches how they write one"
    for doc, module, names in shown:
        loaded = importlib.import_module(module)
        for name in (n.strip() for n in names.split(",")):
            assert hasattr(loaded, name), f"{doc}: {module} has no {name}"


def test_the_keys_that_cannot_change_results_in_the_docs_are_the_codes():
    text = (ROOT / "docs" / "runs.md").read_text()
    sentence = text[text.index("leaving out keys that cannot change results"):text.index("one list, in `src/identity.py`")]
    assert {k.replace("*", "") for k in re.findall(r"`([a-z_.*]+)`", sentence)} == set(NOT_RESULTS)
