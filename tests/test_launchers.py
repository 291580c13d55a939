"""Hydra's launchers run a sweep's members for real: joblib, submitit's local launcher and our keep-going
`parallel` launcher (its killed members: test_killed_members.py)."""
from __future__ import annotations

import json
import os

import pytest

from .conftest import run_cli, tiny_overrides

pytestmark = pytest.mark.slow  # real launchers' processes


@pytest.mark.parametrize("launcher", [["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
                                      ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"],
                                      ["hydra/launcher=parallel"]],
                         ids=["joblib", "submitit_local", "parallel"])
def test_launchers_finish_both_members(tmp_path, launcher):
    proc = run_cli(["-m", *launcher, *tiny_overrides(tmp_path / "cache"), "trainer.max_steps=2", "logger=none",
                    "loss.beta=0.5,2", f"hydra.sweep.dir={tmp_path / 'sweep'}"])  # each member its own process
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for member in ("0", "1"):
        summary = json.loads((tmp_path / "sweep" / member / "summary.json").read_text())
        assert summary["status"] == "finished"
        if launcher == ["hydra/launcher=parallel"]:  # two members side by side share the cores, not fight over them
            assert summary["perf/threads"] == max(1, len(os.sched_getaffinity(0)) // 2)


@pytest.mark.parametrize("launcher", ["packed", "slurm"])  # (all four schemas are stored by one import)
def test_a_launcher_composes_from_outside_the_checkout(tmp_path, launcher):
    """As the README installs it (`pip install -e .`), run from another folder: the launcher's schema is found
    (Hydra's plugin scan does not see an editable install's hydra_plugins; it said "Could not load
    'hydra/launcher/packed_base'")."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-m", "src.train", f"hydra/launcher={launcher}", "--cfg", "hydra"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "hydra_plugins.vae_sweeps.launchers." in proc.stdout
