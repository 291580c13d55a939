"""The run dir holds one experiment: who holds it (an OS file lock), what it was trained with (trained_with.yaml,
written by this project, never by Hydra), and what a rerun into it may do: skip, resume, continue with a larger
budget, or be refused before anything in it changes."""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import OmegaConf

from .checkpoint import load_checkpoint
from .config import ConfigError

log = logging.getLogger(__name__)

TRAINED_WITH = "trained_with.yaml"  # the resolved config the run was trained with
LOCK = ".lock"
# keys that cannot change a run's results: where files live, progress bars, logging, how to resume
IGNORED = ("data.cache_dir", "data.download", "data.on_device", "trainer.progress", "trainer.resume", "logger.")
BUDGET = ("trainer.max_steps", "trainer.max_epochs")  # may grow: the run continues from last.pt
# what a finished or interrupted run leaves; `trainer.resume=never` sets these aside before starting over
RUN_FILES = (TRAINED_WITH, ".hydra", "metrics.jsonl", "summary.json", "checkpoints", "samples", "recons",
             "traversals", "samples.png", "reconstructions.png", "traversals.png", "wandb", "wandb_run_id", "generated")


class RunDirRefused(ConfigError):
    """A rerun that would mix two experiments, or a second process, in one run dir; nothing was written."""


class RunDirLock:
    """An exclusive OS lock on <run dir>/.lock for the life of the process (a kill -9 leaves no stale lock).
    A second process is refused with one line naming the holder."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise RunDirRefused(f"run dir {run_dir} is in use by {holder}; wait for it to end, or use another "
                                "hydra.run.dir") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self.file.flush()

    def release(self) -> None:
        if not self.file.closed:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()


def flatten(config: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{"loss": {"beta": 4}} -> {"loss.beta": 4}."""
    out: Dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def result_overrides(overrides: List[str]) -> Dict[str, Any]:
    """The command-line overrides that can change a run's results, by key, as Hydra parses them (Override
    objects: `+`/`~` gone, `.value()` typed): not hydra.*, not the IGNORED keys, not the logger choice."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return {o.key_or_group: o for o in parsed
            if not o.key_or_group.startswith(("hydra.", *IGNORED)) and o.key_or_group != "logger"}


def recorded_config(run_dir: Path) -> Optional[Dict[str, Any]]:
    """What the run in this dir was trained with: trained_with.yaml, or (runs of earlier versions) the config
    saved in checkpoints/last.pt; None for a dir that holds no experiment yet."""
    path = run_dir / TRAINED_WITH
    if path.is_file():
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    last = run_dir / "checkpoints" / "last.pt"
    if last.is_file():
        return load_checkpoint(last)["config"]
    return None


def compare_configs(recorded: Dict[str, Any], current: Dict[str, Any]) -> Tuple[str, Optional[Tuple[str, Any, Any]]]:
    """("same" | "larger_budget" | "different", (first differing key, recorded value, current value) or None)."""
    old, new = flatten(recorded), flatten(current)
    grown = None
    for key in dict.fromkeys([*new, *old]):  # the current config's order first: the user's reading order
        if key.startswith(IGNORED) or old.get(key) == new.get(key):
            continue
        if key in BUDGET and _larger(new.get(key), old.get(key)):
            grown = grown or (key, old.get(key), new.get(key))
            continue
        return "different", (key, old.get(key), new.get(key))
    return ("larger_budget", grown) if grown else ("same", None)


def _larger(new: Optional[int], old: Optional[int]) -> bool:
    """A budget of None is unlimited (the other budget key decides)."""
    return new is None or (old is not None and new > old)


def check_rerun(run_dir: Path, current: Dict[str, Any]) -> str:
    """What a rerun into `run_dir` with config `current` does: "new", "same" or "larger_budget". Any other
    difference raises RunDirRefused naming the first differing key and both values."""
    recorded = recorded_config(run_dir)
    if recorded is None:
        return "new"
    verdict, diff = compare_configs(recorded, current)
    if verdict == "different":
        key, old, new = diff
        raise RunDirRefused(f"{key}={new!r} differs from the run in {run_dir}, which was trained with {key}={old!r}; "
                            "use a new hydra.run.dir (or hydra.sweep.dir), or trainer.resume=never to set the old "
                            "run aside and start over")
    if verdict == "larger_budget":
        key, old, new = diff
        log.info("Continuing the run in %s with a larger budget: %s %s -> %s", run_dir, key, old, new)
    return verdict


def record_config(run_dir: Path, current: Dict[str, Any]) -> None:
    """Write trained_with.yaml (temp file, then rename)."""
    tmp = run_dir / f".{TRAINED_WITH}.tmp"
    OmegaConf.save(OmegaConf.create(current), tmp)
    tmp.replace(run_dir / TRAINED_WITH)


def set_aside(run_dir: Path) -> Optional[Path]:
    """Move an earlier run's files into <run dir>/replaced/<time>/ (trainer.resume=never); None if there were none."""
    present: List[Path] = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
    if not present:
        return None
    dest = run_dir / "replaced" / time.strftime("%Y-%m-%d_%H-%M-%S")
    dest.mkdir(parents=True, exist_ok=True)
    for path in present:
        shutil.move(str(path), str(dest / path.name))
    return dest


def write_hydra_files(run_dir: Path, task_cfg: Any) -> None:
    """`.hydra/` (config.yaml, hydra.yaml, overrides.yaml) as Hydra would write it, but only once the rerun check
    has passed: Hydra itself is told not to (hydra.output_subdir: null), so a refused rerun changes nothing."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    folder = run_dir / ".hydra"
    folder.mkdir(exist_ok=True)
    OmegaConf.save(task_cfg, folder / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": OmegaConf.to_container(hydra_cfg)}), folder / "hydra.yaml")
    OmegaConf.save(hydra_cfg.overrides.task, folder / "overrides.yaml")


def note_refused_member(run_dir: Path, message: str) -> None:
    """In a multirun, a refused member leaves its own dir untouched; the sweep dir keeps one line for it, which
    the sweep report reads at the end."""
    with open(run_dir.parent / "refused_members.jsonl", "a") as f:
        f.write(json.dumps({"member": run_dir.name, "error": message}) + "\n")
