"""Shared test helpers: compose the real conf/ with Hydra's compose API, shrunk to a tiny CPU run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest
from hydra import compose, initialize_config_dir

from src.config import register_configs

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")

register_configs()


def tiny_overrides(cache_dir: Path) -> List[str]:
    """A run that takes a few seconds on a 2-core CPU: 16x16 shapes, a 2-stage conv, 8 steps."""
    return [
        "data.image_size=16", "data.num_train=256", "data.val_size=64", "data.test_size=64", "data.batch_size=32",
        "data.eval_batch_size=64", f"data.cache_dir={cache_dir}",
        "model.hidden_channels=[8,16]", "model.latent_dim=4",
        "trainer.max_steps=8", "trainer.eval_every=4", "trainer.log_every=2", "trainer.progress=false",
        "trainer.device=cpu", "trainer.num_samples=16", "logger=none",  # W&B only where W&B is under test
    ]


def compose_cfg(overrides: List[str]):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


# W&B runs for real in the tests, offline: never upload from a test, whatever credentials the machine has
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")


def run_cli(args: List[str], cwd: Path = ROOT, timeout: int = 300, module: str = "src.train",
            env: Optional[Dict[str, Optional[str]]] = None) -> subprocess.CompletedProcess:
    """Run an entrypoint in a fresh interpreter, as a user would."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    env = {k: v for k, v in env.items() if v is not None}  # None removes a variable, e.g. WANDB_MODE
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def leet(path: Path, summary: bool = False):
    """W&B's own reader of an offline run: records (one JSON per line), or the summary object."""
    args = ["wandb", "leet", "inspect", "--json", *(["--summary"] if summary else []), str(path)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60, check=True).stdout
    return json.loads(out) if summary else [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One data cache for the whole session: each tiny data set is generated once."""
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture
def tiny(cache_dir) -> List[str]:
    return tiny_overrides(cache_dir)
