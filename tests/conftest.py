"""Shared test helpers: compose the real conf/ with Hydra's compose API, shrunk to a tiny CPU run."""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch
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


# 2 cores, several xdist workers: one thread each (and in the processes they start), not 2 threads fighting per core
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

# W&B runs for real in the tests, offline: never upload from a test, whatever credentials the machine has
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")


def run_cli(args: List[str], cwd: Path = ROOT, timeout: int = 300, module: str = "src.train",
            env: Optional[Dict[str, Optional[str]]] = None, real_process: bool = False) -> subprocess.CompletedProcess:
    """Run an entrypoint as a user would: its command-line handling, output and exit status. In this process
    (about 4 s faster a call: no fresh interpreter importing torch and Hydra) unless `real_process`, which the
    tests of signals, kill -9, locks, launchers, W&B's service and each command's smoke test ask for."""
    if not real_process:
        return run_in_process(args, cwd, module, env)
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    env = {k: v for k, v in env.items() if v is not None}  # None removes a variable, e.g. WANDB_MODE
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def run_in_process(args: List[str], cwd: Path = ROOT, module: str = "src.train",
                   env: Optional[Dict[str, Optional[str]]] = None) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` in this interpreter: sys.argv, stdout, stderr, the working directory and the
    environment are swapped in and restored, as are the logging handlers Hydra installs and its global state."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_argv, saved_env, saved_cwd = sys.argv, dict(os.environ), os.getcwd()
    code = 0
    try:
        sys.argv = [module, *args]
        os.environ.pop("HYDRA_FULL_ERROR", None)
        for key, value in (env or {}).items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
        os.chdir(cwd)
        if module != "src.train":  # the tools log to stderr (logging.basicConfig, a no-op under pytest's handlers)
            tool_log = logging.StreamHandler(err)
            tool_log.setFormatter(logging.Formatter("%(message)s"))
            root.addHandler(tool_log)
            root.setLevel(logging.INFO)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                if module == "src.train":
                    from src.exits import run
                    from src.train import main
                    run(main)
                elif module == "src.compare":
                    from src.compare import main
                    sys.exit(main())
                else:
                    from src.tool_args import run_cli as run_tool
                    run_tool(importlib.import_module(module).main)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:  # what the interpreter would print before exiting 1
                traceback.print_exc()
                code = 1
    finally:
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None
        for handler in root.handlers:
            if handler not in saved_handlers:
                handler.close()
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
    return subprocess.CompletedProcess([module, *args], code, out.getvalue(), err.getvalue())


# ------------------------------------------------------------------------------------------- the resume harness

RESULTS = ("val/neg_elbo", "val/recon_nll", "val/kl", "val/iwae_nll", "val/mse", "test/neg_elbo", "test/kl",
           "test/iwae_nll", "test/mutual_info", "best/val_neg_elbo", "step", "epoch")


def metric_rows(run: Path) -> List[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def metric_steps(run: Path) -> List[tuple]:
    """(step, kind) for every metrics.jsonl row: kind is train, val or test."""
    return [(r["step"], next(k.split("/")[0] for k in r if "/" in k)) for r in metric_rows(run)]


def assert_same_as_uninterrupted(whole: Path, resumed: Path) -> None:
    """The one check behind every resume test (kill -9, a signal, an epoch boundary, a larger budget): the resumed
    run's summary equals the uninterrupted run's on every result, and its metrics.jsonl holds the same rows, each
    step once, with the same numbers."""
    a, b = (json.loads((d / "summary.json").read_text()) for d in (whole, resumed))
    assert b["status"] == a["status"] == "finished"
    for key in RESULTS:
        assert b[key] == pytest.approx(a[key], rel=1e-4), key
    assert metric_steps(resumed) == metric_steps(whole)  # each step once
    for ra, rb in zip(metric_rows(whole), metric_rows(resumed), strict=True):
        for key, value in ra.items():
            if isinstance(value, (int, float)):
                assert rb[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (ra["step"], key)


@contextlib.contextmanager
def signal_when(event: str, run_dir: Path, step: Optional[int] = None, signum: int = signal.SIGTERM):
    """Within the block, `signum` is sent to this process once, right after the training loop tells `event`
    ("logged", "evaluated", "checkpointed", "finished"; src.loop.WATCHERS) for the run in `run_dir` (at `step`)."""
    from src.loop import WATCHERS

    sent = []

    def watcher(seen: str, member, at: int) -> None:
        if not sent and seen == event and member.run.dir.root == Path(run_dir) and step in (None, at):
            sent.append(at)
            os.kill(os.getpid(), signum)

    WATCHERS.append(watcher)
    try:
        yield sent
    finally:
        WATCHERS.remove(watcher)


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


def pytest_collection_modifyitems(items):
    """The SLURM tests (one file, one worker, about three minutes of jobs) are handed out first, so the other
    files spread over the remaining workers beside them instead of after them."""
    items.sort(key=lambda item: "test_slurm.py" not in item.nodeid)
