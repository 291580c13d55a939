"""The schemas of `hydra/launcher=packed` and `packed_slurm`: Hydra's submitit launcher configs plus the packing
knobs. (No `from __future__ import annotations` here: Hydra imports plugin modules in a way that leaves string
annotations of a dataclass unresolvable.)"""
from dataclasses import dataclass

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf


@dataclass
class PackedConf(LocalQueueConf):
    _target_: str = "hydra_plugins.vae_sweeps.launchers.PackedLauncher"
    timeout_min: int = 1440
    max_members: int = 16  # members in one pack at most; a larger group is split
    min_members: int = 2  # a smaller group runs the ordinary way
    engine: str = "auto"  # auto (a short timing of both at start) | vmap | loop (src/packed.py)


@dataclass
class PackedSlurmConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.vae_sweeps.launchers.PackedSlurmLauncher"
    max_members: int = 16
    min_members: int = 2
    engine: str = "auto"


# the schemas behind conf/hydra/launcher/packed.yaml and packed_slurm.yaml (Hydra imports this module when it looks
# for plugins, before it composes the config)
ConfigStore.instance().store(group="hydra/launcher", name="packed_base", node=PackedConf, provider="vae_sweeps")
ConfigStore.instance().store(group="hydra/launcher", name="packed_slurm_base", node=PackedSlurmConf,
                             provider="vae_sweeps")
