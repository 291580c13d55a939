"""Checkpoints: plain dicts of tensors and plain types, written atomically, loaded weights-only."""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Dict

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def save_checkpoint(state: Dict[str, Any], path: Path) -> None:
    """Write to a temp file, fsync, then rename over `path`: a crash mid-write leaves the old file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: Path, map_location: Any = "cpu") -> Dict[str, Any]:
    """Load with `weights_only=True`: anything but tensors and plain types is refused, never executed."""
    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} holds more than tensors and plain types and was refused "
                              f"unloaded ({first}); use a checkpoint written by this tool") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"checkpoint {path} is not a readable torch checkpoint ({e})") from None
