"""Hydra's submitit launchers, changed in one respect: a member that ends without a result (killed by the
out-of-memory killer, `scancel`, a lost node) no longer aborts the sweep. Every member is waited for; the lost one
returns NaN, and SweepReport names it, with SLURM's state for its job, when the sweep ends. Used by
`hydra/launcher=parallel` (local processes) and `hydra/launcher=slurm`. Hydra's joblib launcher cannot do this: a
killed loky worker aborts the whole batch.

On SLURM a job's end is learnt from the accounting database (`sacct`), or, on a cluster without accounting, from
the job leaving the queue (`squeue`); submitit alone would wait forever there. A requeued job (time limit,
preemption) is still the same job: it is waited for until it ends.

`hydra/launcher=packed` and `packed_slurm` (`Packing`) submit one job per pack of members instead of one per
member (src.train.pack_main); a pack's job that ends without a result names each of its members."""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from src import slurm
from src.config import ConfigError
from src.exits import SweepInterrupted, resume_sweep_command
from src.rundir import RunDir, SweepDir, read_summary

log = logging.getLogger(__name__)


def folder_of(overrides: Sequence[str], idx: int) -> str:
    """A member's folder in the sweep dir: its job number, or the subdir a sweeper chose for it (the Optuna sweeper
    names a trial's folder by its trial number: `hydra.sweep.subdir=<n>`)."""
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("hydra.sweep.subdir=")]
    return given[-1] if given else str(idx)


class Unit:
    """What one submitit job runs: one member the ordinary way (Hydra's run_job, as the submitit launchers do), or a
    pack of members (src.train.pack_main). Returns the members' JobReturns, in order."""

    def __init__(self, launcher: "KeepGoing", members: List[Tuple[List[str], int]], packed: bool,
                 configs: Optional[List[DictConfig]] = None):
        self.launcher, self.members, self.packed = launcher, members, packed
        self.configs = configs  # a pack's members composed once, by the planning (not again in the job)
        self.threads: Optional[int] = None  # torch threads in the job (KeepGoing.threads)
        self.singleton_state = Singleton.get_state()

    @property
    def indices(self) -> List[int]:
        return [idx for _, idx in self.members]

    @property
    def folders(self) -> List[str]:
        return [folder_of(overrides, idx) for overrides, idx in self.members]

    def __call__(self) -> List[JobReturn]:
        if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:  # inherited from a local job's controller, which
            signal.signal(signal.SIGINT, signal.default_int_handler)  # ignores Ctrl-C (KeepGoing.launch); not the job
        if self.threads:
            import torch

            os.environ["OMP_NUM_THREADS"] = str(self.threads)  # (and for any process the job starts)
            torch.set_num_threads(self.threads)
        if self.packed:
            return self.launcher.run_pack(self.configs, self.singleton_state)
        overrides, idx = self.members[0]
        return [self.launcher(overrides, "hydra.sweep.dir", idx, f"job_id_for_{idx}", self.singleton_state)]

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit requeues the job (time limit, preemption) with this same unit; each member resumes."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


@contextlib.contextmanager
def _ignoring_sigint():
    """SIGINT ignored while the processes started here inherit it (a disposition of SIG_IGN survives exec)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _children(pid: int) -> List[int]:
    """The processes `pid` started, from Linux's /proc (elsewhere: none): a local job controller's tasks. Not
    their own children (a W&B service, a decode pool): each task stops those itself."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
    return children


class _Stopped(KeyboardInterrupt):
    """SIGTERM to a sweep's driver, raised where it waits, as Ctrl-C is."""

    def __init__(self, signum: int):
        super().__init__()
        self.signum = signum


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stopped(signum)


class Relay:
    """A job's own log, told in the sweep's terminal: a submitit job writes to `<sweep>/.submitit/<job>/<job>_0_log.err`,
    which nobody watches. Its warnings, errors, engine choice, resumes, interruptions and finished members are
    passed on as they come, and its progress (the loop's `step N/M` lines) at most every PROGRESS_S seconds."""

    PROGRESS_S = 30.0
    TOLD = re.compile(r"\]\[(WARNING|ERROR)\]|engine|Resuming|Interrupted|Finished|diverged|froze", re.IGNORECASE)
    STEP = re.compile(r"\bstep (\d+)/(\d+)")

    def __init__(self, name: str, path: Path):
        self.name, self.path = name, path
        self.offset, self.step, self.told_at, self.started = 0, None, time.monotonic(), time.monotonic()

    def __call__(self, final: bool = False) -> None:
        """Pass on what the log gained since the last call (whole lines; at the end, the rest too)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:  # not written yet (a queued SLURM job), or on a file system this machine cannot see
            return
        whole = data if final else data[: data.rfind(b"\n") + 1]
        self.offset += len(whole)
        for line in whole.decode("utf-8", errors="replace").replace("\r", "\n").splitlines():
            if (step := self.STEP.search(line)) is not None:
                self.step = (int(step.group(1)), int(step.group(2)))
            elif self.TOLD.search(line):
                log.info("%s: %s", self.name, line.split("] - ", 1)[-1].strip())
        now = time.monotonic()
        if self.step is not None and (now - self.told_at >= self.PROGRESS_S or final):
            done, total = self.step
            log.info("%s: step %d/%d (%.0f%%, %.1f min in)", self.name, done, total, 100 * done / max(total, 1),
                     (now - self.started) / 60)
            self.told_at, self.step = now, None


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
                                      if k not in ("submitit_folder", "max_num_timeout", "threads")})
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
        units, done = self._units(job_overrides, initial_job_idx)
        jobs: List[Any] = []
        if units:
            threads = self.threads(len(units))
            log.info("Each job trains with %d torch thread%s", threads, "" if threads == 1 else "s")
            for unit in units:
                unit.threads = threads
            # submitit's local controller turns a Ctrl-C into a traceback and a SIGKILL of its job a second later,
            # mid-checkpoint: it is started ignoring SIGINT (inherited; its job restores it, Unit)
            quiet = _ignoring_sigint() if executor_name == "local" else contextlib.nullcontext()
            try:
                with contextlib.redirect_stderr(io.StringIO()), quiet:  # sbatch's own error lines: said once below
                    with executor.batch():
                        for unit in units:
                            jobs.append(executor.submit(unit))
            except submitit.core.utils.FailedJobError as e:  # sbatch refused the array
                raise slurm.SubmitRefused(self._refusal(str(e))) from None
        return self._collect(jobs, units, SweepDir(sweep_dir), done)

    def threads(self, jobs: int) -> int:
        """Torch threads per job: hydra.launcher.threads, else this machine's cores shared among the `jobs` that
        local processes start at once (each would otherwise take every core)."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return self.params.get("threads") or max(1, cores // jobs)

    def _units(self, job_overrides: Sequence[Sequence[str]], first: int) -> Tuple[List[Unit], Dict[int, JobReturn]]:
        """Each member one job (a packing launcher groups them); and the members with a result already."""
        return [Unit(self, [(list(o), idx)], packed=False) for idx, o in enumerate(job_overrides, start=first)], {}

    POLL_S = 2.0  # how often the scheduler is asked which jobs ended (those without a result: lost members)
    RESULT_POLL_S = 0.5  # how often the result files are looked for (a file check: a finished job is seen at once)
    RESULT_GRACE_S = 0.0  # how long a job that ended may take to show its result file

    def _collect(self, jobs: List[Any], units: List[Unit], sweep: SweepDir,
                 done: Dict[int, JobReturn]) -> List[JobReturn]:
        """Wait for every job, relaying its log (Relay); the members of a job that ended without a result are
        recorded as lost."""
        pending = dict(enumerate(jobs))
        returns: Dict[int, JobReturn] = dict(done)
        relays = {k: Relay(self._job_name(units[k], job), Path(job.paths.stderr)) for k, job in pending.items()}
        for relay in relays.values():
            log.info("%s: its log is %s", relay.name, relay.path)
        previous = signal.signal(signal.SIGTERM, _raise_stop) \
            if threading.current_thread() is threading.main_thread() else None
        try:
            self._wait(pending, units, sweep, returns, relays)
        except KeyboardInterrupt as e:
            self._stop(pending, relays, sweep, e)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        return [returns[idx] for idx in sorted(returns)]

    STOP_WAIT_S = 300.0  # how long stopped local jobs may take to write their checkpoints and end
    CTRL_C_GRACE_S = 3.0  # how long a Ctrl-C that reached the jobs too is left to them alone

    def _stop(self, pending: Dict[int, Any], relays: Dict[int, "Relay"], sweep: SweepDir, e: BaseException) -> None:
        """The driver was stopped (Ctrl-C, SIGTERM): local jobs are stopped too (the signal to each controller's
        task: each member writes its checkpoint) and waited for, their logs relayed; SLURM jobs go on. Ends with
        SweepInterrupted: one line, the command that resumes, exit 128 + the signal."""
        signum = getattr(e, "signum", signal.SIGINT)
        local = [job for job in pending.values() if getattr(job, "_process", None) is not None]
        # a terminal's Ctrl-C reached the jobs' processes too (one process group): a moment for them to take it,
        # then the signal goes to each job's task still running (its controller ignores SIGINT), which stops after
        # its checkpoint
        deadline = time.monotonic() + (self.CTRL_C_GRACE_S if signum == signal.SIGINT else 0.0)
        while any(not job.done() for job in local) and time.monotonic() < deadline:
            time.sleep(0.1)
        for job in local:
            for pid in _children(job._process.pid) if not job.done() else []:
                with contextlib.suppress(OSError):
                    os.kill(pid, signum)
        deadline = time.monotonic() + self.STOP_WAIT_S
        with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C: stop waiting
            while any(not job.done() for job in local) and time.monotonic() < deadline:
                for relay in relays.values():
                    relay()
                time.sleep(self.RESULT_POLL_S)
        for k, relay in relays.items():
            if k in pending:
                relay(final=True)
        running = [job.job_id for job in local if not job.done()]
        others = [job.job_id for job in pending.values() if job not in local]
        said = [f"Interrupted by {signal.Signals(signum).name}: "]
        said.append(f"the sweep's local jobs stopped, each member after its checkpoint" if not running else
                    f"jobs {', '.join(running)} had not stopped after {self.STOP_WAIT_S:.0f} s")
        if others:
            said.append(f"; its SLURM jobs {', '.join(others)} go on (scancel them to stop them)")
        said.append(f"; resume with: {resume_sweep_command(str(sweep.root))}")
        raise SweepInterrupted("".join(said), 128 + int(signum)) from None

    def _wait(self, pending: Dict[int, Any], units: List[Unit], sweep: SweepDir, returns: Dict[int, JobReturn],
              relays: Dict[int, "Relay"]) -> None:
        """Until every pending job has ended: its results into `returns` (removed from `pending` as they come)."""
        ended: Dict[str, str] = {}
        next_ask = time.monotonic()
        while pending:
            if time.monotonic() >= next_ask:
                ended, next_ask = self._ended(list(pending.values())), time.monotonic() + self.POLL_S
            for k, job in list(pending.items()):
                relays[k]()
                if job.paths.result_pickle.exists() or job.job_id in ended:
                    relays[k](final=True)
                    returns.update(zip(units[k].indices, self._results(job, units[k], sweep, ended.get(job.job_id))))
                    del pending[k]
            if pending:
                time.sleep(self.RESULT_POLL_S)

    @staticmethod
    def _job_name(unit: Unit, job: Any) -> str:
        members = unit.folders
        numbers = [int(m) for m in members if m.isdigit()]
        span = f"{members[0]}-{members[-1]}" if numbers == list(range(numbers[0], numbers[0] + len(members))) \
            else ", ".join(members)  # (a study's rung: its trials' folders)
        who = f"member {members[0]}" if len(members) == 1 else f"pack of members {span}"
        return f"{who} (job {job.job_id})"

    def _ended(self, jobs: List[Any]) -> Dict[str, str]:
        """The jobs among `jobs` that ended, with their state. Local jobs: their process, whose state submitit calls
        FINISHED however its task ended (its controller exits 0 after a kill -9 too): no state to tell, then."""
        return {job.job_id: "" if job.state == "FINISHED" else job.state for job in jobs if job.done()}

    def _refusal(self, error: str) -> str:
        return error.strip().splitlines()[-1]

    def _results(self, job, unit: Unit, sweep: SweepDir, state: Optional[str]) -> List[JobReturn]:
        import submitit

        deadline = time.time() + self.RESULT_GRACE_S  # a shared file system may show the result a moment late
        while not job.paths.result_pickle.exists() and time.time() < deadline:
            time.sleep(0.5)
        try:
            if not job.paths.result_pickle.exists():  # (job.results() would wait on submitit's own sacct watcher)
                raise submitit.core.utils.UncompletedJobError(f"job {job.job_id} ended without a result")
            # read at once (submitit moves the file into place whole): job.results() waits, in 1 s sleeps, for a local
            # job's process to exit, and its teardown (W&B's, the interpreter's) takes a second or two more
            outcome, value = submitit.core.utils.pickle_load(job.paths.result_pickle)
            return value if outcome == "success" else job.results()[0]  # (the latter raises the job's own error)
        except submitit.core.utils.UncompletedJobError:
            lost = []
            for idx, folder in zip(unit.indices, unit.folders):
                summary = read_summary(RunDir(sweep.root / folder))
                own = f"; its summary: {summary.get('status')}: {summary.get('error')}" if summary else ""
                state = "unknown" if state is None else state
                log.error("member %s (job %s%s) ended without a result%s; the other members go on",
                          folder, job.job_id, f", state {state}" if state else "", own)
                sweep.note(sweep.lost, member=folder, job=str(job.job_id), state=state)
                lost.append(job_return(None, float("nan")))
            return lost


def job_return(cfg: Optional[DictConfig], value: float) -> JobReturn:
    """A member's JobReturn, as Hydra's run_job makes one, for a member that did not go through run_job."""
    ret = JobReturn()
    if cfg is not None:
        ret.cfg, ret.hydra_cfg = task_config(cfg), OmegaConf.create({"hydra": OmegaConf.to_container(cfg.hydra)})
        ret.overrides, ret.task_name = list(cfg.hydra.overrides.task), cfg.hydra.job.name
        ret.working_dir = os.getcwd()
    ret.status, ret.return_value = JobStatus.COMPLETED, value
    return ret


def task_config(cfg: DictConfig) -> DictConfig:
    """The member's config without its `hydra` node: what the task function receives."""
    task = copy.deepcopy(cfg)
    with read_write(task), open_dict(task):
        del task["hydra"]
    return task


class Packing:
    """`hydra/launcher=packed` (local) and `packed_slurm`: the members of a batch that share a pack signature
    (src.identity.pack_signature: the resolved config less the packable keys, and the resume step) train as one
    job, at most `max_members` to a pack; groups under `min_members`, and members that cannot pack (a bad value,
    a refused run dir, DDP) run the ordinary way, where they fail exactly as in any other sweep; a finished member
    is skipped. Each member keeps the solo contract (src/train.py)."""

    def __init__(self, max_members: int, min_members: int, engine: str, **params: Any):
        from src.engines import check_engine_name

        check_engine_name(engine)
        if max_members < 1 or min_members < 1:
            raise ConfigError(f"hydra.launcher.max_members={max_members} and min_members={min_members} must be >= 1")
        if min_members > max_members:  # no pack could form: every member would run on its own, silently
            raise ConfigError(f"hydra.launcher.min_members={min_members} is more than max_members={max_members}; "
                              f"no pack could form: lower min_members or raise max_members")
        self.max_members, self.min_members, self.engine = max_members, min_members, engine
        super().__init__(**params)

    def _member_config(self, overrides: Sequence[str], idx: int) -> DictConfig:
        """The member's full config, composed as Hydra's submitit launcher and run_job compose it."""
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(cfg.hydra.job):
            cfg.hydra.job.id = f"job_id_for_{idx}"
            cfg.hydra.job.num = idx
        out = os.path.join(str(cfg.hydra.sweep.dir), str(OmegaConf.select(cfg, "hydra.sweep.subdir")))
        with read_write(cfg.hydra.runtime), open_dict(cfg.hydra.runtime):
            cfg.hydra.runtime.output_dir = os.path.abspath(out)
        return cfg

    def _plan(self, cfg: DictConfig) -> Tuple[str, Any]:
        """("pack", signature), ("done", its JobReturn) for a finished member, or ("solo", why): the rerun plan a
        member's own set-up makes (src.identity.plan_rerun), reading only its checkpoint's step."""
        from src.config import as_dict
        from src.config_check import parse
        from src.identity import pack_signature, plan_rerun

        try:
            parsed = parse(task_config(cfg))
            config = as_dict(parsed)
            if parsed.trainer.strategy != "none":
                return "solo", f"trainer.strategy={parsed.trainer.strategy}"
            plan = plan_rerun(RunDir(cfg.hydra.runtime.output_dir), config, parsed.trainer.resume)
            if plan.kind == "finished":
                return "done", job_return(cfg, plan.summary.get("val/neg_elbo", float("nan")))
            return "pack", pack_signature(config, plan.step)  # (the step: a damaged checkpoint raises here)
        except Exception as e:  # it runs the ordinary way, where it fails with its one line as in any sweep
            return "solo", str(e).splitlines()[0] if str(e) else type(e).__name__

    def _units(self, job_overrides: Sequence[Sequence[str]], first: int) -> Tuple[List[Unit], Dict[int, JobReturn]]:
        overrides = {idx: list(o) for idx, o in enumerate(job_overrides, start=first)}
        groups: Dict[str, List[int]] = {}
        solo: List[int] = []
        done: Dict[int, JobReturn] = {}
        configs = {idx: self._member_config(o, idx) for idx, o in overrides.items()}
        for idx, o in overrides.items():
            kind, what = self._plan(configs[idx])
            if kind == "done":
                log.info("member %s finished already; skipped", folder_of(o, idx))
                done[idx] = what
            elif kind == "solo":
                log.info("member %s runs on its own: %s", folder_of(o, idx), what)
                solo.append(idx)
            else:
                groups.setdefault(what, []).append(idx)
        units = []
        for members in groups.values():
            for at in range(0, len(members), self.max_members):
                chunk = members[at:at + self.max_members]
                if len(chunk) < self.min_members:
                    solo += chunk
                    continue
                log.info("pack %d: members %s (engine %s)", len(units),
                         ", ".join(folder_of(overrides[i], i) for i in chunk), self.engine)
                units.append(Unit(self, [(overrides[i], i) for i in chunk], packed=True,
                                  configs=[configs[i] for i in chunk]))
        return units + [Unit(self, [(overrides[i], i)], packed=False) for i in sorted(solo)], done

    def run_pack(self, cfgs: List[DictConfig], singleton_state: Dict[Any, Any]) -> List[JobReturn]:
        """In the pack's job: the members' configs, as the planning composed them, with this job's id; then
        train them as one."""
        import submitit
        from hydra.core.utils import setup_globals

        from src.train import pack_main

        Singleton.set_state(singleton_state)
        setup_globals()
        job_id = submitit.JobEnvironment().job_id
        for cfg in cfgs:
            with open_dict(cfg.hydra.job):
                cfg.hydra.job.id = job_id
        values = pack_main(cfgs, self.engine)
        return [job_return(cfg, value) for cfg, value in zip(cfgs, values)]


class ParallelLauncher(KeepGoing, LocalLauncher):
    """Members as local processes, several at once: `hydra/launcher=parallel`."""


class PackedLauncher(Packing, KeepGoing, LocalLauncher):
    """Packs (and the members that do not pack) as local processes: `hydra/launcher=packed`."""


class KeepGoingSlurmLauncher(KeepGoing, SlurmLauncher):
    """Members as the jobs of a SLURM array: `hydra/launcher=slurm`."""

    POLL_S = 5.0  # one sacct (or squeue) call per poll for the whole array
    RESULT_GRACE_S = 5.0  # the result file is on a shared file system

    def threads(self, jobs: int) -> int:
        """Torch threads per job: hydra.launcher.threads, else the job's cpus_per_task."""
        return self.params.get("threads") or int(self.params.get("cpus_per_task") or 1)

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


class PackedSlurmLauncher(Packing, KeepGoingSlurmLauncher):
    """Each pack one job of a SLURM array: `hydra/launcher=packed_slurm`."""
