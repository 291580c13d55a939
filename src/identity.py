"""What makes two runs "the same experiment", defined once: the rerun check (skip, resume, continue with a
larger budget, or refuse), the resume-from-a-checkpoint check, W&B names and `src.compare`'s labels all use it; and
what members must share to train as one pack (`PACKABLE`, `pack_signature`).

Two configs are the same experiment when they agree on every key that can change results. Keys that cannot
(NOT_RESULTS: where files live, progress bars, logging, how to resume) are ignored; a key missing from an older
record means that key's default, so runs of earlier versions still resume or are skipped.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config import Config, ConfigError, as_dict, budget_steps
from .rundir import RunDir, RunDirRefused, finished_summary, write_text

log = logging.getLogger(__name__)

# keys that cannot change a run's results: where files live, how data is held, progress bars, logging, resuming,
# how often a checkpoint is written (a resume from any of them is the uninterrupted run)
NOT_RESULTS = ("data.cache_dir", "data.download", "data.on_device", "trainer.progress", "trainer.resume",
               "trainer.checkpoint_every", "logger.")
BUDGET = ("trainer.max_steps", "trainer.max_epochs")  # may grow: the run continues from last.pt


def flatten(config: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{"loss": {"beta": 4}} -> {"loss.beta": 4}."""
    out: Dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changes_results(key: str) -> bool:
    return not key.startswith(NOT_RESULTS)


DEFAULTS = flatten(as_dict(Config()))


@dataclass
class Difference:
    key: str
    recorded: Any
    current: Any

    def __str__(self) -> str:
        return f"{self.key}={self.current!r} (recorded {self.key}={self.recorded!r})"


def compare(recorded: Dict[str, Any], current: Dict[str, Any],
            steps_per_epoch: Optional[int] = None) -> Tuple[str, Optional[Difference]]:
    """("same" | "larger_budget" | "different", the first difference that decided it, in the current config's
    order). A key the recorded config lacks has its default there (it was added since); a key the current schema
    no longer has cannot be set, so it is not compared. The budget is compared as the steps it allows where
    `steps_per_epoch` is known (a finished run's): max_epochs 5 -> 3 under a max_steps that binds both is the same
    run; otherwise key by key, where only growth continues."""
    old, new = flatten(recorded), flatten(current)
    budget = []
    for key, value in new.items():
        was = old.get(key, DEFAULTS.get(key))
        if not changes_results(key) or was == value:
            continue
        if key in BUDGET:
            budget.append(Difference(key, was, value))
            continue
        return "different", Difference(key, was, value)
    if not budget:
        return "same", None
    shrunk = next((d for d in budget if not _larger(d.current, d.recorded)), None)
    grown = next((d for d in budget if _larger(d.current, d.recorded)), None)
    if steps_per_epoch:
        before, after = (budget_steps(*(c.get(k, DEFAULTS[k]) for k in BUDGET), steps_per_epoch) for c in (old, new))
        if after == before:
            return "same", None
        return ("larger_budget", grown) if after > before else ("different", shrunk)
    return ("different", shrunk) if shrunk else ("larger_budget", grown)


def _larger(new: Optional[int], old: Optional[int]) -> bool:
    """A budget of None is unlimited (the other budget key decides)."""
    return new is None or (old is not None and new > old)


# ------------------------------------------------------------------------------------------- the record


class RecordError(RuntimeError):
    """A run dir's record that cannot be read; the message names the file and the fix."""


def recorded_config(run_dir: Path | RunDir) -> Optional[Dict[str, Any]]:
    """What the run in this dir was trained with: trained_with.yaml, or (runs of earlier versions) the config
    saved in checkpoints/last.pt; None for a dir that holds no experiment yet."""
    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    if rd.trained_with.is_file():
        try:
            record = OmegaConf.to_container(OmegaConf.load(rd.trained_with), resolve=False)
        except (OmegaConfBaseException, yaml.YAMLError, ValueError, TypeError, UnicodeDecodeError) as e:
            record = e
        if not isinstance(record, dict):
            raise RecordError(f"{rd.trained_with} is damaged (not a YAML mapping of config keys); remove it and "
                              "rerun with the settings the run was trained with, or use another hydra.run.dir")
        return record
    if rd.last.is_file():
        from .checkpoint import CheckpointError, load_checkpoint  # torch, for runs of earlier versions only

        try:
            return load_checkpoint(rd.last)["config"]
        except CheckpointError as e:
            raise RecordError(str(e)) from None
    return None


def record_config(run_dir: RunDir, current: Dict[str, Any]) -> None:
    """Write trained_with.yaml, atomically."""
    write_text(run_dir.trained_with, OmegaConf.to_yaml(OmegaConf.create(current)))


def check_rerun(run_dir: RunDir, current: Dict[str, Any]) -> str:
    """What a rerun into `run_dir` with config `current` does: "new", "same" or "larger_budget". Any other
    difference raises RunDirRefused naming the first differing key and both values."""
    recorded = recorded_config(run_dir)
    if recorded is None:
        return "new"
    verdict, diff = compare(recorded, current, _steps_per_epoch(run_dir, current))
    if verdict == "different":
        raise RunDirRefused(f"{diff.key}={diff.current!r} differs from the run in {run_dir.root}, which was trained "
                            f"with {diff.key}={diff.recorded!r}; use a new hydra.run.dir (or hydra.sweep.dir), or "
                            "trainer.resume=never to set the old run aside and start over")
    if verdict == "larger_budget":
        log.info("Continuing the run in %s with a larger budget: %s %s -> %s", run_dir.root, diff.key, diff.recorded,
                 diff.current)
    return verdict


def _steps_per_epoch(run_dir: RunDir, current: Dict[str, Any]) -> Optional[int]:
    """A finished run's steps per epoch (its train split over the batch size, the ragged tail dropped); None for an
    unfinished one, whose budget is compared key by key."""
    finished = finished_summary(run_dir)
    images, batch = (finished or {}).get("data/train_size"), flatten(current).get("data.batch_size")
    return images // batch if isinstance(images, int) and isinstance(batch, int) and batch > 0 else None


@dataclass
class RerunPlan:
    """What a run into a run dir does: "finished" (skipped; its summary), "resume" from `checkpoint`, or "fresh".
    Another experiment's dir is refused (RunDirRefused) before a plan is made."""
    kind: str
    checkpoint: Optional[Path] = None
    summary: Optional[Dict[str, Any]] = None

    @property
    def step(self) -> int:
        """The step it resumes from: read from the checkpoint alone (memory-mapped: not its tensors) when asked."""
        from .checkpoint import checkpoint_step  # torch: not for src.compare's readers

        return checkpoint_step(self.checkpoint) if self.checkpoint is not None else 0


def plan_rerun(run_dir: RunDir, current: Dict[str, Any], resume: str) -> RerunPlan:
    """The one rerun decision, for a run's set-up and for the packed launcher's plan: skip a finished run (unless
    trainer.resume=never), resume or continue an unfinished one from the checkpoint `resume` names, refuse another
    experiment, or start fresh."""
    from .checkpoint import find_resume_checkpoint

    verdict = "new" if resume == "never" else check_rerun(run_dir, current)
    if verdict == "same" and (finished := finished_summary(run_dir)) is not None:
        return RerunPlan("finished", summary=finished)
    checkpoint = find_resume_checkpoint(resume, run_dir)
    return RerunPlan("fresh") if checkpoint is None else RerunPlan("resume", checkpoint)


def check_checkpoint(saved: Dict[str, Any], current: Dict[str, Any], path: Path) -> None:
    """A checkpoint named by trainer.resume=<path> must be of the same experiment; its budget may differ."""
    as_saved = {**current, "trainer": {**current["trainer"], **{k.split(".")[1]: flatten(saved).get(k, DEFAULTS[k])
                                                               for k in BUDGET}}}
    verdict, diff = compare(saved, as_saved)
    if verdict == "different":
        raise ConfigError(f"{diff.key}={diff.current!r} is not allowed here: {path} was trained with "
                              f"{diff.recorded!r}; use a checkpoint of this experiment, or drop trainer.resume")


def result_overrides(overrides: List[str]) -> Dict[str, Any]:
    """The command-line overrides that can change a run's results, by key, as Hydra parses them (Override
    objects: `+`/`~` gone, `.value()` typed): not hydra.*, not the NOT_RESULTS keys, not the logger choice."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return {o.key_or_group: o for o in parsed
            if not o.key_or_group.startswith("hydra.") and changes_results(o.key_or_group)
            and o.key_or_group != "logger"}


# ------------------------------------------------------------------------------------------- packs

# the keys whose values may differ inside a pack (docs/sweeps.md lists them, and a test keeps the two equal); any
# other difference (architecture, data, batch size, likelihood kind, precision, budget, ...) splits packs
PACKABLE = ("loss.beta", "loss.kl_schedule", "loss.warmup_steps", "loss.cycles", "loss.cycle_ratio",
            "loss.capacity_max", "loss.capacity_steps", "loss.free_bits", "loss.sigma", "optimizer.lr",
            "optimizer.weight_decay", "optimizer.gamma", "seed", "model.latent_dim")


def _shared_keys(config: Dict[str, Any]) -> Dict[str, Any]:
    """The resolved config less the packable keys and the logger (each member keeps its own)."""
    return {k: v for k, v in flatten(config).items() if k not in PACKABLE and not k.startswith("logger.")}


def pack_signature(config: Dict[str, Any], resume_step: int) -> str:
    """What members must share to train as one pack: `_shared_keys`, and the step they resume from."""
    return repr(sorted(_shared_keys(config).items())) + f" step={resume_step}"


def refuse_unpackable(configs: List[Dict[str, Any]]) -> None:
    """ConfigError naming the first key outside PACKABLE on which two members differ."""
    first = _shared_keys(configs[0])
    for config in configs[1:]:
        for key, value in _shared_keys(config).items():
            if first.get(key) != value:
                raise ConfigError(f"{key} differs between the members of a pack ({first.get(key)!r} and {value!r}); "
                                  f"only {', '.join(PACKABLE)} may (hydra/launcher=packed groups members by it)")
