"""A sweep member killed by the system (the out-of-memory killer, a lost node), while it trains or before it has a
folder: `hydra/launcher=parallel` lets the others finish and ends the sweep naming it, with exit 1. Real processes,
real kill -9."""
from __future__ import annotations

import pytest

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from .conftest import ROOT, run_cli, tiny_overrides

pytestmark = pytest.mark.slow  # real launchers' processes, killed


def test_a_member_killed_by_the_system_is_named_and_the_others_finish(tmp_path):
    """hydra/launcher=parallel (the README's choice for members at once): kill -9 one member, as the
    out-of-memory killer does; the other finishes and the sweep ends by naming the killed one."""
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=parallel", *tiny_overrides(tmp_path / "cache"), "logger=none",
            "trainer.max_steps=60", "trainer.max_epochs=null", "trainer.eval_every=60", "loss.beta=1,2",
            f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen([sys.executable, "-m", "src.train", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lock = sweep / "0" / ".lock"
    deadline = time.time() + 120
    while time.time() < deadline and not (lock.is_file() and lock.read_text().startswith("pid")):
        time.sleep(0.01)  # the lock is the member's first act: it is killed long before its 60 steps end
    os.kill(int(lock.read_text().split()[1]), signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "Traceback" not in out, out[-3000:]
    assert "member 0 ended without a summary" in out and "1 member(s)" in out
    assert json.loads((sweep / "1" / "summary.json").read_text())["status"] == "finished"


def _submitit_jobs(folder: Path) -> list:
    """pids of the submitit job processes whose command line names `folder`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if proc.name.isdigit() and "submitit" in cmdline and str(folder) in cmdline:
            pids.append(int(proc.name))
    return pids


def test_a_member_killed_before_it_makes_its_folder_is_named(tmp_path):
    """The job is killed while it starts (before Hydra makes the member's folder): the sweep still ends with
    exit 1 naming that member, not 'every member finished' one member short."""
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=parallel", *tiny_overrides(tmp_path / "cache"), "logger=none",
            "trainer.max_steps=2", "loss.beta=1,2", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen([sys.executable, "-m", "src.train", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 120
    while time.time() < deadline and not (jobs := _submitit_jobs(sweep / ".submitit")):
        time.sleep(0.005)
    os.kill(jobs[0], signal.SIGKILL)  # seconds before the job has imported what it runs
    out, _ = proc.communicate(timeout=300)
    lost = [line for line in out.splitlines() if "ended without a result (job" in line]
    assert proc.returncode == 1 and "Traceback" not in out and "every member" not in out, out[-3000:]
    assert lost and "1 member(s)" in out, out[-3000:]
    member = re.search(r"member (\d) ended without a result \(job", out).group(1)
    assert not (sweep / member / "summary.json").exists()
    assert json.loads((sweep / str(1 - int(member)) / "summary.json").read_text())["status"] == "finished"


def test_a_killed_pack_names_each_of_its_members_and_a_rerun_resumes_them(tmp_path):
    """hydra/launcher=packed: the out-of-memory killer ends the pack's one process; the sweep ends with exit 1
    naming each of its members, and the same command again resumes them from their checkpoints to the end."""
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=packed", "hydra.launcher.engine=loop", *tiny_overrides(tmp_path / "cache"),
            "logger=none", "trainer.max_steps=120", "trainer.max_epochs=null", "trainer.eval_every=120",
            "trainer.checkpoint_every=10", "trainer.log_every=10", "loss.beta=1,2,4", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen([sys.executable, "-m", "src.train", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    last = sweep / "2" / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline and not last.is_file():
        time.sleep(0.01)  # every member has checkpointed (at step 10) and the pack trains on
    os.kill(int((sweep / "0" / ".lock").read_text().split()[1]), signal.SIGKILL)  # one process holds all three
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "Traceback" not in out, out[-3000:]
    job = re.search(r"member 0 ended without a summary \(job (\d+)\)", out)
    assert job, out[-3000:]  # (no "state FINISHED": submitit says that of a killed local job too)
    for member in range(3):  # one job, every member of it named
        assert f"member {member} ended without a summary (job {job.group(1)}): killed by the system" in out
    assert "3 member(s)" in out, out[-3000:]

    again = run_cli(args)  # the driver in this process, the pack again its own
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    for member in range(3):
        rd = sweep / str(member)
        assert json.loads((rd / "summary.json").read_text())["status"] == "finished"
        assert "Resuming from" in (rd / "train.log").read_text()
