"""Run logging: metrics.jsonl for machines (one flat JSON object per log or eval step, with "step")."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict


def _plain(v: Any) -> Any:
    """JSON-safe: non-finite floats become null rather than invalid JSON."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


class RunLogger:
    """Appends one flat JSON line per call to `<run_dir>/metrics.jsonl`; W&B comes from the logger config."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.file = open(self.path, "a", buffering=1)

    def log(self, metrics: Dict[str, Any], step: int) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(row) + "\n")

    def log_images(self, images: Dict[str, Path], step: int) -> None:
        """Grids are already PNG files in the run dir; only W&B needs them pushed."""

    def finish(self, summary: Dict[str, Any]) -> None:
        self.file.close()


def write_json(path: Path, obj: Dict[str, Any]) -> None:
    """Write JSON atomically (temp + rename), so a reader never sees half a summary."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({k: _plain(v) for k, v in obj.items()}, indent=2) + "\n")
    tmp.replace(path)
