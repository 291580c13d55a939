"""Hydra's submitit launchers, changed in one respect: a member that ends without a result (killed by the
out-of-memory killer, `scancel`, a lost node) no longer aborts the sweep. Every member is waited for; the lost one
returns NaN, and SweepReport names it, with SLURM's state for its job, when the sweep ends. Used by
`hydra/launcher=parallel` (local processes) and `hydra/launcher=slurm`. Hydra's joblib launcher cannot do this: a
killed loky worker aborts the whole batch.

On SLURM a job's end is learnt from the accounting database (`sacct`), or, on a cluster without accounting, from
the job leaving the queue (`squeue`); submitit alone would wait forever there. A requeued job (time limit,
preemption) is still the same job: it is waited for until it ends."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher
from omegaconf import OmegaConf

from src import slurm
from src.rundir import RunDir, SweepDir, read_summary

log = logging.getLogger(__name__)


class KeepGoing:
    """The launch of Hydra's BaseSubmititLauncher (hydra-submitit-launcher 1.2), collecting results member by
    member instead of failing on the first member without one."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        executor_name = self._EXECUTOR
        init = {"folder": self.params["submitit_folder"]}
        if "max_num_timeout" in self.params:  # SLURM: requeues after a time-out or a preemption
            init[f"{executor_name}_max_num_timeout"] = self.params["max_num_timeout"]
        executor = submitit.AutoExecutor(cluster=executor_name, **init)
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"{executor_name}_{k}": v for k, v in self.params.items()
                                      if k not in ("submitit_folder", "max_num_timeout")})
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        params: List[Any] = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # sbatch's own error lines: the refusal says it once
                jobs = executor.map_array(self, *zip(*params))
        except submitit.core.utils.FailedJobError as e:  # sbatch refused the array
            raise slurm.SubmitRefused(self._refusal(str(e))) from None
        return self._collect(jobs, initial_job_idx, SweepDir(sweep_dir))

    POLL_S = 2.0
    RESULT_GRACE_S = 0.0  # how long a job that ended may take to show its result file

    def _collect(self, jobs: List[Any], first: int, sweep: SweepDir) -> List[JobReturn]:
        """Wait for every member; a member whose job ended without a result is recorded as lost."""
        pending = dict(enumerate(jobs, start=first))
        returns: Dict[int, JobReturn] = {}
        while pending:
            ended = self._ended(list(pending.values()))
            for idx, job in list(pending.items()):
                if job.paths.result_pickle.exists() or job.job_id in ended:
                    returns[idx] = self._result(job, idx, sweep, ended.get(job.job_id))
                    del pending[idx]
            if pending:
                time.sleep(self.POLL_S)
        return [returns[idx] for idx in sorted(returns)]

    def _ended(self, jobs: List[Any]) -> Dict[str, str]:
        """The jobs among `jobs` that ended, with their state. Local jobs: their process."""
        return {job.job_id: job.state for job in jobs if job.done()}

    def _refusal(self, error: str) -> str:
        return error.strip().splitlines()[-1]

    def _result(self, job, idx: int, sweep: SweepDir, state: Optional[str]) -> JobReturn:
        import submitit

        deadline = time.time() + self.RESULT_GRACE_S  # a shared file system may show the result a moment late
        while not job.paths.result_pickle.exists() and time.time() < deadline:
            time.sleep(0.5)
        try:
            if not job.paths.result_pickle.exists():  # (job.results() would wait on submitit's own sacct watcher)
                raise submitit.core.utils.UncompletedJobError(f"job {job.job_id} ended without a result")
            return job.results()[0]
        except submitit.core.utils.UncompletedJobError:
            summary = read_summary(RunDir(sweep.root / str(idx)))
            own = f"; its summary: {summary.get('status')}: {summary.get('error')}" if summary else ""
            log.error("member %d (job %s, state %s) ended without a result%s; the other members go on",
                      idx, job.job_id, state or "unknown", own)
            sweep.note(sweep.lost, member=idx, job=str(job.job_id), state=state or "unknown")
            lost = JobReturn()
            lost.status, lost.return_value = JobStatus.COMPLETED, float("nan")
            return lost


class ParallelLauncher(KeepGoing, LocalLauncher):
    """Members as local processes, several at once: `hydra/launcher=parallel`."""


class KeepGoingSlurmLauncher(KeepGoing, SlurmLauncher):
    """Members as the jobs of a SLURM array: `hydra/launcher=slurm`."""

    POLL_S = 5.0  # one sacct (or squeue) call per poll for the whole array
    RESULT_GRACE_S = 5.0  # the result file is on a shared file system

    def _ended(self, jobs: List[Any]) -> Dict[str, str]:
        ids = [job.job_id for job in jobs]
        states = slurm.accounting_states(ids)
        if states is not None:
            return {j: states[j] for j in ids if states.get(j) in slurm.ENDED}
        queued = slurm.queued(ids)  # no accounting: a job that left the queue is over
        if queued is None:
            return {}
        return {j: "ended (gone from squeue; no accounting to say how)" for j in ids if j not in queued}

    def _refusal(self, error: str) -> str:
        reason = next((line.split("error:", 1)[1].strip() for line in error.splitlines() if "sbatch: error:" in line),
                      error.strip().splitlines()[-1])
        fix = {"generic resource": "on a partition without GPUs set hydra.launcher.gpus_per_node=0",
               "partition": "name one that `sinfo` lists with hydra.launcher.partition=<name>",
               "memory": "lower hydra.launcher.mem_gb",
               "time limit": "lower hydra.launcher.timeout_min"}
        hint = next((f"; {text}" for key, text in fix.items() if key in reason.lower()), "")
        return f"sbatch refused the sweep's jobs: {reason}{hint}"
