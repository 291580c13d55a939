"""Names of sweeps and their members, one rule for W&B and the report: a member is named by its swept keys and
their values ("beta=4 latent_dim=16"), a sweep by its folder ("2026-11-26/10-42-07-123456", "my_study")."""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .identity import result_overrides


def short_names(keys: List[str]) -> Dict[str, str]:
    """Dotted keys by their last part ("loss.beta" -> "beta"), unless two would share one."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def sweep_overrides(hydra_cfg: Any) -> Dict[str, Any]:
    """A multirun's sweep overrides by key (Hydra's Override objects): its sweeper params (a named study), then its
    command line's (`loss.beta=1,4`), which win for the same key, as in Hydra's basic sweeper."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    given = [f"{k}={v}" for k, v in (OmegaConf.select(hydra_cfg, "sweeper.params") or {}).items()]
    given += list(OmegaConf.select(hydra_cfg, "overrides.task") or [])
    return {o.key_or_group: o for o in OverridesParser.create().parse_overrides(given) if o.is_sweep_override()}


def sweep_size(hydra_cfg: Any) -> Optional[int]:
    """How many members Hydra's basic sweeper makes of these overrides (the product of each swept key's values);
    None for another sweeper, whose members this cannot count."""
    from omegaconf import OmegaConf

    if not str(OmegaConf.select(hydra_cfg, "sweeper._target_") or "").endswith("BasicSweeper"):
        return None
    return math.prod(len(list(o.sweep_string_iterator())) for o in sweep_overrides(hydra_cfg).values())


def swept_keys(sweep_dir: Path) -> List[str]:
    """The keys a Hydra multirun sweeps over, read from the multirun.yaml Hydra writes into the sweep folder."""
    from omegaconf import OmegaConf

    path = Path(sweep_dir) / "multirun.yaml"
    return list(sweep_overrides(OmegaConf.load(path).hydra)) if path.is_file() else []


def group_name(folder: Path) -> str:
    """A readable W&B group for a sweep (or lone run) folder: its name, with the date folder above it when the
    name is a time of day as in Hydra's default (outputs/sweeps/2026-11-26/10-42-07-123456 ->
    2026-11-26/10-42-07-123456; outputs/my_study -> my_study)."""
    folder = Path(folder)
    if re.fullmatch(r"\d\d-\d\d-\d\d(-\d+)?", folder.name):
        return f"{folder.parent.name}/{folder.name}"
    return folder.name


def is_multirun(hydra_cfg: Any) -> bool:
    """Whether a Hydra config (live, or read back from a run's .hydra/hydra.yaml, where the mode is its name) is
    a multirun member's."""
    from hydra.types import RunMode

    return hydra_cfg.mode in (RunMode.MULTIRUN, RunMode.MULTIRUN.name)


def run_identity(run_dir: Path, group: Optional[str] = None, hydra_cfg: Any = None) -> Tuple[str, str]:
    """(name, group) of a run on W&B: its swept keys and their values ("beta=4 latent_dim=16"), grouped under
    `logger.group` or the sweep folder's name; a lone run is named by its overrides and grouped by its folder.
    `hydra_cfg`: the run's Hydra config (its `hydra` node); without one (a run started from Python), the folder."""
    group = group or os.environ.get("WANDB_RUN_GROUP")
    if hydra_cfg is None:
        return run_dir.name, group or group_name(run_dir)
    hc = hydra_cfg
    given = {k: o.get_value_element_as_str() for k, o in result_overrides(hc.overrides.task).items()}
    multirun = is_multirun(hc)
    keys = [k for k in swept_keys(hc.sweep.dir) if k in given] if multirun else list(given)
    name = " ".join(f"{short}={given[k]}" for k, short in short_names(keys).items()) or "defaults"
    return name, group or group_name(Path(hc.sweep.dir if multirun else hc.run.dir))


TAG_KEYS = {"data.name": "data", "data.image_size": "image_size", "model.name": "model",
            "model.latent_dim": "latent_dim", "loss.likelihood": "likelihood", "loss.beta": "beta",
            "loss.kl_schedule": "kl_schedule"}  # the settings a W&B user filters runs by, and their tags' names


def run_tags(config: Dict[str, Any], hydra_cfg: Any = None) -> List[str]:
    """W&B tags of a training run: its main settings that its sweep does not vary ("data=shapes",
    "likelihood=bernoulli"), so runs of many sweeps can be filtered by what they share."""
    swept = []
    if hydra_cfg is not None and is_multirun(hydra_cfg):
        swept = swept_keys(hydra_cfg.sweep.dir)
    tags = []
    for key, tag in TAG_KEYS.items():
        section, _, name = key.partition(".")
        value = config[section].get(name) if isinstance(config.get(section), dict) else None
        if value is not None and key not in swept:
            tags.append(f"{tag}={value:g}"[:64] if isinstance(value, float) else f"{tag}={value}"[:64])  # W&B's limit
    return tags
