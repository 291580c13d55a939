"""What SLURM says about a job: the one place the project asks `scontrol`, `sacct` and `squeue`.

Two readers: the run (`src.lifecycle`), which asks on SIGTERM whether its own job is being preempted (SLURM will
requeue it) or cancelled; and the sweep's launcher, which learns from `sacct` (or, on a cluster without
accounting, from `squeue`) that a member's job ended without a result, and with which state.
"""
from __future__ import annotations

import os
import subprocess
import time
from typing import Dict, Iterable, Optional, Set

QUERY_TIMEOUT_S = 20  # a slurmctld that does not answer in this time is treated as "unknown"
# job states after which a job never runs again (REQUEUED, PREEMPTED and the rest are passing states)
ENDED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "TIMEOUT"}


def _run(*command: str) -> Optional[str]:
    """stdout of a SLURM command, or None when it is missing, fails or hangs."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=QUERY_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def in_job() -> bool:
    return "SLURM_JOB_ID" in os.environ


def this_job() -> Dict[str, str]:
    """`scontrol show job` of the job this process runs in, as a dict ({} outside SLURM or when it fails)."""
    if not in_job():
        return {}
    job = os.environ["SLURM_JOB_ID"]
    if "SLURM_ARRAY_JOB_ID" in os.environ:  # an array task: its own id, as scontrol names it
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    out = _run("scontrol", "show", "job", "-o", job)
    return dict(f.split("=", 1) for f in (out or "").split() if "=" in f)


def preempted(job: Dict[str, str]) -> bool:
    """Whether a SIGTERM just received means "preempted, SLURM requeues this job": the job is still RUNNING, may be
    requeued, and SLURM moved its end to now + the partition's GraceTime. A cancelled job is COMPLETING by then, and
    a job at its time limit has no time left."""
    if job.get("JobState") != "RUNNING" or job.get("Requeue") != "1":
        return False
    try:
        end = time.mktime(time.strptime(job.get("EndTime", ""), "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return False
    try:
        limit = time.mktime(time.strptime(job.get("StartTime", ""), "%Y-%m-%dT%H:%M:%S"))
        limit += _seconds(job.get("TimeLimit", ""))
    except ValueError:
        limit = float("inf")
    return time.time() < end < limit - 1  # preemption brought the end forward, and it is still ahead


def _seconds(limit: str) -> float:
    """SLURM's [days-]hours:minutes:seconds as seconds ("UNLIMITED" as infinity)."""
    if limit in ("UNLIMITED", "Partition_Limit", ""):
        return float("inf")
    days, _, clock = limit.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    return int(days or 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]


def accounting_states(job_ids: Iterable[str]) -> Optional[Dict[str, str]]:
    """Each job's state from the accounting database ({"12_3": "CANCELLED", ...}; jobs it does not know yet are
    absent), or None when there is no accounting (sacct fails, or prints "accounting storage is disabled")."""
    arrays = sorted({j.split("_")[0] for j in job_ids})
    if not arrays:
        return {}
    out = _run("sacct", "-n", "-X", "-P", "-o", "JobID,State", *[a for j in arrays for a in ("-j", j)])
    if out is None or "disabled" in out:
        return None
    states = {}
    for line in out.splitlines():
        job, _, state = line.partition("|")
        if job and state:
            states[job] = state.split()[0]  # "CANCELLED by 0" -> "CANCELLED"
    return states


def queued(job_ids: Iterable[str]) -> Optional[Set[str]]:
    """The jobs among `job_ids` that SLURM still holds (pending, running, requeued), from `squeue`; None when squeue
    does not answer."""
    arrays = sorted({j.split("_")[0] for j in job_ids})
    if not arrays:
        return set()
    out = _run("squeue", "-h", "-r", "-o", "%i", "--me")  # (squeue -j fails once a listed job has left)
    if out is None:
        return None
    return {j for j in out.split() if j.split("_")[0] in arrays}


class SubmitRefused(Exception):
    """sbatch refused the sweep's jobs; the message is SLURM's reason and the fix."""
