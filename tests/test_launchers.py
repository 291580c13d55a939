"""Hydra's launchers run a sweep's members for real: joblib, submitit's local launcher and our keep-going
`parallel` launcher (its killed members: test_killed_members.py)."""
from __future__ import annotations

import json

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
        assert json.loads((tmp_path / "sweep" / member / "summary.json").read_text())["status"] == "finished"
