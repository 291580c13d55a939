"""Sweeps on a real one-node SLURM cluster (scripts/slurm_cluster.sh: munge, MariaDB, slurmdbd, slurmctld,
slurmd), with the project's own launcher (`hydra/launcher=slurm`) and tiny configs: time-limit signals, preemption,
scancel and kill -9 of members, a cluster without accounting, and sbatch refusals.

The cluster is started by the module fixture (and by .ci/run); where it cannot be (not root, no apt-get), these
tests are skipped with one line saying why. All of them are in this one file so that one worker runs them one
after another: the preemption test takes the whole node.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT, assert_same_as_uninterrupted, metric_steps, run_cli, tiny_overrides

pytestmark = pytest.mark.slow  # a real SLURM cluster's jobs (pytest -m 'not slow' leaves them out)

SCRIPT = ROOT / "scripts" / "slurm_cluster.sh"
SLURM = ["hydra/launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.gpus_per_node=0",
         "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=10"]
STEPS = 300


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("SLURM tests need root to start the one-node cluster (scripts/slurm_cluster.sh)")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("SLURM tests need slurm-wlm installed, or apt-get to install it")
    started = time.time()
    out = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    print(f"SLURM cluster ready in {time.time() - started:.1f} s")


@pytest.fixture(scope="module")
def member(tmp_path_factory):
    """The overrides of every member here (a final eval of a few seconds: IWAE with k = 1000), and the same run
    uninterrupted, in this process."""
    cache = tmp_path_factory.mktemp("slurm-cache")
    overrides = [*tiny_overrides(cache), f"trainer.max_steps={STEPS}", "trainer.max_epochs=null",
                 "trainer.eval_every=100", "trainer.log_every=10", "data.test_size=256", "eval.iwae_k_test=1000"]
    whole = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert run_cli([*overrides, f"hydra.run.dir={whole}"]).returncode == 0
    return overrides, whole


@pytest.fixture(autouse=True)
def no_leftovers():
    """A failed test leaves no sweep driver and no job behind for the next."""
    yield
    for proc in STARTED:
        if proc.poll() is None:
            proc.kill()
    STARTED.clear()
    if shutil.which("scancel"):
        subprocess.run(["scancel", "--me"], capture_output=True)


STARTED: list = []


def start_sweep(sweep: Path, *overrides: str) -> subprocess.Popen:
    STARTED.append(subprocess.Popen([sys.executable, "-m", "src.train", "-m", *SLURM, *overrides, f"hydra.sweep.dir={sweep}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}))
    return STARTED[-1]


def wait_until(condition, timeout: float = 120, what: str = "") -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def steps_done(run: Path, kind: str = "train") -> int:
    """The last step with a `kind` row in metrics.jsonl (0 before the first)."""
    try:
        return max((step for step, k in metric_steps(run) if k == kind), default=0)
    except (OSError, ValueError, KeyError, StopIteration):
        return 0


def job_of(run: Path) -> str:
    """The SLURM job id ("12_0") of the member that holds `run`'s lock, from its process environment."""
    pid = int((run / ".lock").read_text().split()[1])
    env = dict(v.split("=", 1) for v in (Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")) if "=" in v)
    if "SLURM_ARRAY_JOB_ID" in env:  # a sweep of several members is an array
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env["SLURM_JOB_ID"]


def locked_pid(run: Path) -> int:
    try:
        text = (run / ".lock").read_text()
        return int(text.split()[1]) if text.startswith("pid") else 0
    except (OSError, IndexError, ValueError):
        return 0


def training_member(sweep: Path, overrides) -> tuple:
    """A one-member sweep started, once it has trained 50 steps: (sweep process, its run dir, its SLURM job)."""
    proc = start_sweep(sweep, *overrides)
    run = sweep / "0"
    wait_until(lambda: steps_done(run) >= 50 and locked_pid(run), what="50 steps")
    return proc, run, job_of(run)


def ends_as_uninterrupted(proc: subprocess.Popen, whole: Path, run: Path, job: str, restarts: int) -> None:
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    assert_same_as_uninterrupted(whole, run)
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    assert f"Restarts={restarts}" in shown, shown


def status(run: Path):
    try:
        return json.loads((run / "summary.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def test_sigusr2_in_the_loop_and_in_the_final_eval_requeues_and_finishes_exactly(cluster, member, tmp_path):
    """submitit's time-limit signal (SIGUSR2, here sent by hand as SLURM sends it signal_delay_s before the limit):
    once while training (a checkpoint at the step reached, then submitit requeues) and once during the final test
    eval (requeued at once). The member records "requeued" meanwhile, resumes each time, and ends equal to the
    uninterrupted run, each step once."""
    overrides, whole = member
    proc, run, job = training_member(tmp_path / "sweep", overrides)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    wait_until(lambda: status(run) == "requeued", what="the requeued summary")
    first = json.loads((run / "summary.json").read_text())
    assert 50 <= first["step"] < STEPS and "requeues" in first["error"]
    # the requeued job resumes; when the last eval row is written, the final test eval is starting
    wait_until(lambda: steps_done(run, "val") == STEPS and locked_pid(run) and status(run) is None, timeout=180,
               what="the final eval of the requeued job")
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    wait_until(lambda: status(run) in ("requeued", "finished"), what="the second requeue")
    second = json.loads((run / "summary.json").read_text())
    assert (second["status"], second["step"]) == ("requeued", STEPS), second  # stopped in the final eval
    ends_as_uninterrupted(proc, whole, run, job, restarts=2)


def test_a_preempted_member_is_requeued_by_slurm_and_resumes_from_its_step(cluster, member, tmp_path):
    """A real preemption: a job in the `urgent` partition needs the node, SLURM sends SIGTERM, and requeues the job
    after the partition's GraceTime. The member checkpoints at once, records "requeued", stays alive until SLURM
    ends it, and the requeued job resumes from that step to the uninterrupted run's numbers."""
    overrides, whole = member
    proc, run, job = training_member(tmp_path / "sweep", overrides)
    urgent = subprocess.Popen(["srun", "-p", "urgent", "-c", "2", "-t", "1", "true"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    wait_until(lambda: status(run) == "requeued", what="the requeued summary")
    assert "preempted by SLURM" in json.loads((run / "summary.json").read_text())["error"]
    assert urgent.wait(timeout=120) == 0
    ends_as_uninterrupted(proc, whole, run, job, restarts=1)


def test_scancel_and_kill_9_of_members_are_named_with_slurm_state_and_a_rerun_resumes_them(cluster, member, tmp_path):
    """scancel one member (it checkpoints on SLURM's SIGTERM and records the step) and kill -9 the other: the sweep
    ends with exit 1 naming both and SLURM's state for each job; the same command again resumes both, and
    src.compare reads the finished sweep."""
    overrides, _ = member
    sweep = tmp_path / "sweep"
    args = [*overrides, "loss.beta=1,4"]
    proc = start_sweep(sweep, *args)
    runs = [sweep / "0", sweep / "1"]
    wait_until(lambda: all(steps_done(r) >= 30 and locked_pid(r) for r in runs), what="both members training")
    jobs = [job_of(r) for r in runs]
    subprocess.run(["scancel", jobs[0]], check=True)
    os.kill(locked_pid(runs[1]), signal.SIGKILL)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 1 and "Traceback" not in out, out[-3000:]
    assert f"member 0 interrupted (job {jobs[0]}, state CANCELLED): interrupted by SIGTERM at step" in out, out[-3000:]
    assert f"member 1 ended without a summary (job {jobs[1]}, state FAILED)" in out, out[-3000:]
    reached = json.loads((runs[0] / "summary.json").read_text())["step"]
    assert reached >= 30 and (runs[0] / "checkpoints" / "last.pt").is_file()

    rerun = start_sweep(sweep, *args)
    out, _ = rerun.communicate(timeout=240)
    assert rerun.returncode == 0, out[-3000:]
    assert all(status(r) == "finished" for r in runs)
    assert "Resuming from" in (runs[0] / "train.log").read_text()
    assert len(metric_steps(runs[0])) == len(set(metric_steps(runs[0])))  # each step once
    compared = run_cli([str(sweep)], module="src.compare")
    assert compared.returncode == 0, compared.stdout[-2000:]
    table = (sweep / "compare" / "table.csv").read_text()
    assert table.count("finished") == 2, table


def test_without_accounting_a_cancelled_member_still_ends_the_sweep(cluster, member, tmp_path):
    """slurmdbd down (as on clusters without accounting): sacct cannot say that a job ended, so the launcher asks
    squeue; a cancelled member that left the queue ends the sweep with exit 1 instead of a wait forever."""
    overrides, _ = member
    sweep = tmp_path / "sweep"
    dbd = int(Path("/run/slurmdbd.pid").read_text())
    os.kill(dbd, signal.SIGTERM)
    try:
        wait_until(lambda: subprocess.run(["sacct", "-n", "-X"], capture_output=True).returncode != 0,
                   what="sacct to fail without slurmdbd")
        proc = start_sweep(sweep, *overrides)
        run = sweep / "0"
        wait_until(lambda: steps_done(run) >= 20 and locked_pid(run), what="20 steps")
        subprocess.run(["scancel", job_of(run)], check=True)
        out, _ = proc.communicate(timeout=120)
    finally:
        subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, timeout=300)
    assert proc.returncode == 1, out[-3000:]
    assert "member 0 interrupted" in out and "gone from squeue" in out, out[-3000:]


@pytest.mark.parametrize("override, reason, fix", [
    ("hydra.launcher.partition=nowhere", "invalid partition", "hydra.launcher.partition="),
    ("hydra.launcher.gpus_per_node=1", "Invalid generic resource", "hydra.launcher.gpus_per_node=0"),
])
def test_an_sbatch_refusal_is_one_line_naming_the_fix(cluster, tmp_path, override, reason, fix):
    args = ["-m", *SLURM, override, *tiny_overrides(tmp_path / "cache"), f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    result = run_cli(args)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Launch error: sbatch refused") and reason.lower() in \
        lines[0].lower() and fix in lines[0], result.stderr


def test_a_pack_is_one_slurm_job_and_sigusr2_requeues_every_member_exactly(cluster, member, tmp_path):
    """hydra/launcher=packed_slurm: two members in one SLURM job; submitit's time-limit signal in the loop
    checkpoints both at the same step, the job is requeued as a whole, and each member ends equal to its
    uninterrupted solo run (the loop engine: bitwise a solo run)."""
    overrides, whole = member
    sweep = tmp_path / "sweep"
    packed = ["hydra/launcher=packed_slurm", *SLURM[1:], "hydra.launcher.engine=loop"]
    STARTED.append(subprocess.Popen([sys.executable, "-m", "src.train", "-m", *packed, *overrides, "loss.beta=1,4",
                                     f"hydra.sweep.dir={sweep}"], cwd=ROOT, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}))
    proc = STARTED[-1]
    runs = [sweep / "0", sweep / "1"]
    wait_until(lambda: all(steps_done(r) >= 50 and locked_pid(r) for r in runs), what="50 steps of the pack")
    assert locked_pid(runs[0]) == locked_pid(runs[1])  # one process holds both members
    job = job_of(runs[0])
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    wait_until(lambda: all(status(r) == "requeued" for r in runs), what="both members requeued")
    steps = {json.loads((r / "summary.json").read_text())["step"] for r in runs}
    assert len(steps) == 1 and 50 <= steps.pop() < STEPS  # the same step boundary
    ends_as_uninterrupted(proc, whole, runs[0], job, restarts=1)
    assert json.loads((runs[1] / "summary.json").read_text())["status"] == "finished"
    assert len(list((sweep / ".submitit").glob("[0-9]*"))) == 1  # one SLURM job for both members
