"""Hydra's submitit launchers, changed in one respect: a member that ends without a result (killed by the
out-of-memory killer, a lost node) no longer aborts the sweep. Every member is waited for; the lost one returns
NaN, and SweepReport names it when the sweep ends. Used by `hydra/launcher=parallel` (local processes) and
`hydra/launcher=slurm`. Hydra's joblib launcher cannot do this: a killed loky worker aborts the whole batch."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, List, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher
from omegaconf import OmegaConf

from src.rundir import SweepDir

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
        jobs = executor.map_array(self, *zip(*params))
        return [self._result(job, idx, SweepDir(sweep_dir)) for idx, job in enumerate(jobs, start=initial_job_idx)]

    @staticmethod
    def _result(job, idx: int, sweep: SweepDir) -> JobReturn:
        import submitit

        try:
            return job.results()[0]
        except submitit.core.utils.UncompletedJobError:
            log.error("member %d (job %s) ended without a result: killed by the system (out of memory?); "
                      "the other members go on", idx, job.job_id)
            sweep.note(sweep.lost, member=idx, job=str(job.job_id))  # the sweep report names it at the end
            lost = JobReturn()
            lost.status, lost.return_value = JobStatus.COMPLETED, float("nan")
            return lost


class ParallelLauncher(KeepGoing, LocalLauncher):
    """Members as local processes, several at once: `hydra/launcher=parallel`."""


class KeepGoingSlurmLauncher(KeepGoing, SlurmLauncher):
    """Members as the jobs of a SLURM array: `hydra/launcher=slurm`."""
