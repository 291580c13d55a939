"""A run dir's files, spelled once; the one atomic write every record goes through; and the OS lock that lets one
process at a time hold a run dir. It imports only config.py (for ConfigError).

Layout (the design's run-dir contract):

    .hydra/  trained_with.yaml  .lock  train.log  metrics.jsonl  summary.json  wandb_run_id  wandb/
    checkpoints/last.pt  checkpoints/best.pt  samples/ recons/ traversals/ (+ their final .png)  generated/
    prior_gmm.npz  samples_gmm.png  (the final eval's mixture prior and its samples: src/prior.py)
"""
from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from omegaconf import OmegaConf

from .config import ConfigError

log = logging.getLogger(__name__)


class RunDir:
    """The paths of one run dir."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.hydra = self.root / ".hydra"
        self.trained_with = self.root / "trained_with.yaml"  # what the run was trained with (identity.py)
        self.lock = self.root / ".lock"
        self.log = self.root / "train.log"
        self.metrics = self.root / "metrics.jsonl"
        self.summary = self.root / "summary.json"
        self.wandb_run_id = self.root / "wandb_run_id"  # a rerun into the dir continues the same W&B run
        self.checkpoints = self.root / "checkpoints"
        self.last = self.checkpoints / "last.pt"
        self.best = self.checkpoints / "best.pt"
        self.generated = self.root / "generated"  # what src.sample, src.reconstruct ... write by default
        self.mixture = self.root / "prior_gmm.npz"  # the mixture prior fitted to the encoded train split
        self.mixture_samples = self.root / "samples_gmm.png"  # samples.png's grid, drawn from that mixture

    def checkpoint(self, which: str = "last") -> Path:
        return self.checkpoints / f"{which}.pt"

    def is_run(self) -> bool:
        """Whether the folder looks like a run of this tool (it may have stopped before any checkpoint)."""
        return self.hydra.is_dir() or self.summary.is_file() or self.trained_with.is_file()

    # what a finished or interrupted run leaves; `trainer.resume=never` sets these aside before starting over
    RESULT_NAMES = ("trained_with.yaml", ".hydra", "metrics.jsonl", "summary.json", "checkpoints", "samples",
                    "recons", "traversals", "samples.png", "reconstructions.png", "traversals.png", "wandb",
                    "wandb_run_id", "generated", "prior_gmm.npz", "samples_gmm.png")

    def set_aside(self) -> Optional[Path]:
        """Move an earlier run's files into <run dir>/replaced/<time>/; None if there were none."""
        present: List[Path] = [self.root / name for name in self.RESULT_NAMES if (self.root / name).exists()]
        if not present:
            return None
        dest = self.root / "replaced" / time.strftime("%Y-%m-%d_%H-%M-%S")
        dest.mkdir(parents=True, exist_ok=True)
        for path in present:
            shutil.move(str(path), str(dest / path.name))
        return dest


class SweepDir:
    """A multirun's folder: its members (0/, 1/, ...) and the launch's notes on members that left no run dir."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.refused = self.root / "refused_members.jsonl"  # members whose rerun was refused (their dir untouched)
        self.lost = self.root / "lost_members.jsonl"  # members whose job ended without a result (the launcher's note)

    def members(self) -> List[Path]:
        return sorted((p for p in self.root.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))

    def note(self, path: Path, **fields: Any) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(fields) + "\n")

    def notes(self, path: Path) -> List[Dict[str, Any]]:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


# ------------------------------------------------------------------------------------------- writing


@contextmanager
def atomic_write(path: Path, fsync: bool = False) -> Iterator[Path]:
    """Yield a temp path beside `path`; when the block ends it is renamed over `path`, so a reader (or a kill)
    never sees half a file. The rename replaces a symlink at `path` rather than writing through it, and the temp
    file is made fresh (O_EXCL), so a run dir prepared by someone else cannot redirect a write."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)  # left by a kill of an earlier process with the same pid
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644))
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def plain(v: Any) -> Any:
    """JSON-safe: non-finite floats become null rather than invalid JSON."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    return v


def write_json(path: Path, obj: Dict[str, Any]) -> None:
    """A flat JSON record (summary.json and the like), written atomically."""
    write_text(path, json.dumps({k: plain(v) for k, v in obj.items()}, indent=2) + "\n")


def remove_stale_temps(run_dir: RunDir) -> None:
    """Temp files of writes that a kill interrupted (`.last.pt.tmp<pid>`): never read, only in the way."""
    for folder in (run_dir.root, run_dir.checkpoints):
        if folder.is_dir():
            for tmp in folder.glob(".*.tmp*"):
                tmp.unlink(missing_ok=True)


def write_hydra_files(run_dir: RunDir, task_cfg: Any, hydra_cfg: Any) -> None:
    """`.hydra/` (config.yaml, hydra.yaml, overrides.yaml) as Hydra would write it, but only once the rerun check
    has passed: Hydra itself is told not to (hydra.output_subdir: null), so a refused rerun changes nothing.
    `hydra_cfg`: the run's Hydra config (its `hydra` node); None for a run started from Python, which has none."""
    if hydra_cfg is None:
        return
    run_dir.hydra.mkdir(exist_ok=True)
    OmegaConf.save(task_cfg, run_dir.hydra / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": OmegaConf.to_container(hydra_cfg)}), run_dir.hydra / "hydra.yaml")
    OmegaConf.save(hydra_cfg.overrides.task, run_dir.hydra / "overrides.yaml")


def read_summary(run_dir: RunDir) -> Optional[Dict[str, Any]]:
    """The run dir's summary.json, or None if there is none or it is damaged (a damaged one is rewritten when the
    run next ends, so it costs nothing but a warning)."""
    if not run_dir.summary.is_file():
        return None
    try:
        summary = json.loads(run_dir.summary.read_text())
    except (ValueError, UnicodeDecodeError):
        summary = None
    if not isinstance(summary, dict):
        log.warning("%s is damaged (not a JSON object); it is rewritten when this run ends", run_dir.summary)
        return None
    return summary


def finished_summary(run_dir: RunDir) -> Optional[Dict[str, Any]]:
    """The run dir's summary.json when it says the run finished, else None."""
    summary = read_summary(run_dir)
    return summary if summary is not None and summary.get("status") == "finished" else None


# ------------------------------------------------------------------------------------------- the lock


class RunDirRefused(ConfigError):
    """A rerun that would mix two experiments, or a second process, in one run dir; nothing was written."""


class RunDirLock:
    """An exclusive OS lock on <run dir>/.lock for the life of the process (a kill -9 leaves no stale lock). The
    descriptor is not inherited by child processes (close-on-exec, and fork-safe users close it), and a `.lock`
    that is a symlink is refused rather than followed."""

    def __init__(self, run_dir: RunDir):
        self.path = run_dir.lock
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if self.path.is_symlink():
                raise RunDirRefused(f"{self.path} is a symlink, not a lock file of this tool; remove it") from None
            raise e
        self.file = os.fdopen(fd, "r+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise RunDirRefused(f"run dir {run_dir.root} is in use by {holder}; wait for it to end, or use another "
                             "hydra.run.dir") from None
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self.file.flush()

    def release(self) -> None:
        if not self.file.closed:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()


def note_refused_member(run_dir: Path, message: str, how: str = "refused") -> None:
    """In a multirun, a refused member (or one that failed without touching its dir, as a budget extension that
    cannot read its checkpoint: `how` "failed") leaves its own dir untouched; the sweep dir keeps one line for
    it, which the sweep report reads at the end."""
    sweep = SweepDir(run_dir.parent)
    sweep.note(sweep.refused, member=run_dir.name, error=message, how=how)
