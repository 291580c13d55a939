"""Checkpoints and resume: plain dicts of tensors and plain types, written atomically, loaded weights-only;
the RNG state, the choice of checkpoint to resume from, and the records a rerun reads (summary, metrics)."""
from __future__ import annotations

import json
import logging
import pickle
import random
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from .config import ConfigError
from .rundir import RunDir, atomic_write

log = logging.getLogger(__name__)

CHECKPOINT_KEYS = {"model", "optimizer", "step", "config"}  # what every checkpoint of this tool holds


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def save_checkpoint(state: Dict[str, Any], path: Path) -> None:
    """Atomically, fsynced: a crash mid-write leaves the old file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, fsync=True) as tmp:
        torch.save(state, tmp)


class UnsafePickle(CheckpointError):
    """A file that holds more than tensors and plain types: unpickling it could run code."""


def load_weights_only(path: Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """`torch.load(weights_only=True)`, the one way this project unpickles a file it did not just write: anything
    but tensors and plain types raises UnsafePickle, never executed; a damaged file raises CheckpointError."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and _zip_format(path))
    except pickle.UnpicklingError:
        raise UnsafePickle(f"{path} holds more than tensors and plain types (unpickling it could run code) and "
                           "was refused unloaded") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is damaged or truncated ({type(e).__name__})") from None


def _zip_format(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"  # torch's zip format (torch.save's since 1.6), which can be memory-mapped


def load_checkpoint(path: Path, map_location: Any = "cpu", mmap: bool = False) -> Dict[str, Any]:
    """Load with `weights_only=True`: anything but tensors and plain types is refused, never executed; a file
    that is not a checkpoint of this tool (a bare state_dict, an image, text) is named as such. `mmap`: tensors are
    read from the file only when touched."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch's zip format, or a bare pickle
        raise CheckpointError(f"{path} is not a torch checkpoint; give a checkpoints/last.pt or best.pt written by "
                              "python -m src.train, or the run dir holding it")
    try:
        state = load_weights_only(path, map_location, mmap)
    except UnsafePickle as e:
        raise CheckpointError(f"checkpoint {e}; use a checkpoint written by python -m src.train") from None
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint {e}; use another checkpoint, e.g. checkpoints/best.pt, or retrain") \
            from None
    if not isinstance(state, dict) or not CHECKPOINT_KEYS <= state.keys():
        held = f"a dict of {len(state)} keys such as {next(iter(state), '')!r}" if isinstance(state, dict) else \
            f"a {type(state).__name__}"
        raise CheckpointError(f"{path} is not a checkpoint written by this tool (it holds {held}, not the model, "
                              "optimizer, step and config of a run); give a checkpoints/last.pt or best.pt written "
                              "by python -m src.train")
    return state


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint was written at, without reading its tensors (the file is memory-mapped)."""
    return int(load_checkpoint(path, mmap=True)["step"])


def saved_config(state: Dict[str, Any]) -> Dict[str, Any]:
    """A checkpoint's config with every `${...}` made literal: a file must never make OmegaConf read the
    environment or call resolvers (`${oc.env:...}`) when it is loaded."""

    def literal(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: literal(v) for k, v in value.items()}
        if isinstance(value, list):
            return [literal(v) for v in value]
        return value.replace("${", "\\${") if isinstance(value, str) else value

    return literal(state["config"])


# ------------------------------------------------------------------------------------------- resume


def rng_state() -> Dict[str, Any]:
    """Every RNG that training draws from, as tensors and plain types (weights-only loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                      "cached": cached},
            "python": {"version": version, "state": list(py_state), "gauss": gauss}}


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def find_resume_checkpoint(resume: str, run_dir: RunDir) -> Optional[Path]:
    """The checkpoint `trainer.resume` points at: auto -> this run dir's last.pt if any; never -> None."""
    if resume == "never":
        return None
    if resume == "auto":
        return run_dir.last if run_dir.last.is_file() else None
    path = Path(resume).expanduser()
    path = RunDir(path).last if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(f"trainer.resume={resume!r} is not allowed; no checkpoint at {path}: give a .pt file, a run "
                          "dir holding checkpoints/last.pt, auto or never")
    return path


def truncate_metrics(run_dir: RunDir, step: int) -> None:
    """Keep metrics.jsonl rows up to the checkpoint at `step`, so each step appears once after a resume: rows
    written after it, the final test row (written after the last checkpoint) and a line torn by a kill go."""
    if not run_dir.metrics.is_file():
        return
    kept = []
    for line in run_dir.metrics.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # torn by a kill mid-write: it is rewritten by the resumed run
        if row["step"] < step or (row["step"] == step and not any(k.startswith("test/") for k in row)):
            kept.append(line)
    with atomic_write(run_dir.metrics) as tmp:
        tmp.write_text("".join(r + "\n" for r in kept))
