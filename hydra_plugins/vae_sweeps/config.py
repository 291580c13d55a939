"""The schemas of this project's launchers, `hydra/launcher=parallel|slurm|packed|packed_slurm`: Hydra's submitit
launcher configs with this project's values, and the packing knobs; and of its sweeper, `hydra/sweeper=optuna_halving`. Every value has its one home here; the YAMLs in
conf/hydra/launcher/ only pick a schema. (No `from __future__ import annotations` here: Hydra imports plugin modules
in a way that leaves string annotations of a dataclass unresolvable.)"""
from dataclasses import dataclass, field
from typing import Dict, Optional

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf


@dataclass
class ParallelConf(LocalQueueConf):
    _target_: str = "hydra_plugins.vae_sweeps.launchers.ParallelLauncher"
    timeout_min: int = 1440  # a day: a local member is not stopped for time
    # torch threads of each job (a member, or a pack); null: the machine's cores shared among the jobs started at
    # once, so they do not fight over the cores (each took all of them: 10x slower under load)
    threads: Optional[int] = None


@dataclass
class SlurmConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.vae_sweeps.launchers.KeepGoingSlurmLauncher"
    # a member that reaches timeout_min or is preempted gets SIGUSR2 signal_delay_s (120) before the end: it writes a
    # checkpoint, submitit requeues it (up to max_num_timeout times) and it resumes from that checkpoint
    max_num_timeout: int = 3
    partition: str = "gpu"
    gpus_per_node: int = 1  # per task; 0 on a partition without GPUs
    cpus_per_task: int = 8
    mem_gb: int = 32
    timeout_min: int = 120
    array_parallelism: int = 16  # members (or packs) running at once
    threads: Optional[int] = None  # torch threads of each job; null: cpus_per_task


@dataclass
class Packing:
    max_members: int = 16  # members in one pack at most; a larger group is split
    min_members: int = 2  # a smaller group runs the ordinary way, one process per member
    engine: str = "auto"  # auto (a rule by device and model size, never a timing) | vmap | loop (src/engines.py)


@dataclass
class PackedConf(Packing, ParallelConf):
    _target_: str = "hydra_plugins.vae_sweeps.launchers.PackedLauncher"


@dataclass
class PackedSlurmConf(Packing, SlurmConf):
    _target_: str = "hydra_plugins.vae_sweeps.launchers.PackedSlurmLauncher"


@dataclass
class SamplerConf:
    name: str = "tpe"  # tpe | random | grid (Optuna's samplers; grid: choices and ranges only)
    seed: Optional[int] = None  # a seed makes the study's trials the same on every run, and after a resume


@dataclass
class HalvingConf:
    """An Optuna search pruned by successive halving (hydra_plugins/vae_sweeps/halving.py, docs/sweeps.md)."""
    _target_: str = "hydra_plugins.vae_sweeps.halving.HalvingSweeper"
    n_trials: int = 27  # trials in the whole study, a resume included
    # rungs: min_budget, min_budget * reduction_factor, ... below max_budget, then max_budget; in budget_key's units
    min_budget: int = 100
    max_budget: int = 900
    reduction_factor: int = 3  # about 1 in reduction_factor trials of a rung goes on
    budget_key: str = "trainer.max_steps"  # or trainer.max_epochs; the sweeper sets it (the other one to null)
    metric: str = "val/neg_elbo"  # the summary key a rung reports (any key a run's summary.json holds)
    direction: str = "minimize"  # minimize | maximize
    pruner: str = "successive_halving"  # successive_halving | hyperband (Optuna's pruners)
    sampler: SamplerConf = field(default_factory=SamplerConf)
    storage: Optional[str] = None  # a SQLAlchemy URL (postgresql://...); null: sqlite:///<sweep dir>/study.db
    study_name: str = "study"
    batch_size: Optional[int] = None  # trials asked together (the sampler learns between batches); null: all at once
    params: Dict[str, str] = field(default_factory=dict)  # the search space of a preset: key -> interval(...), ...


# the schemas behind conf/hydra/launcher/*.yaml (src/train.py imports this module, and Hydra when it looks for
# plugins, before it composes the config)
for name, node in (("parallel_base", ParallelConf), ("slurm_base", SlurmConf), ("packed_base", PackedConf),
                   ("packed_slurm_base", PackedSlurmConf)):
    ConfigStore.instance().store(group="hydra/launcher", name=name, node=node, provider="vae_sweeps")
ConfigStore.instance().store(group="hydra/sweeper", name="optuna_halving_base", node=HalvingConf, provider="vae_sweeps")
