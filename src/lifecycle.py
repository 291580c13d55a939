"""A run as a process: what happens around training, whatever way it ends.

`RunLifecycle` is the one context manager around `train()`'s body (in the manner of lightning-hydra-template's
`task_wrapper`): it holds the run dir's lock, turns SIGTERM/SIGINT (and SIGUSR2 under submitit) into a clean stop,
writes summary.json on every exit with the status that exit means, records a failure that happened before the
logger started, finishes the logger, and tears down DDP.

On Ctrl-C or SIGTERM: inside the training loop the step in flight finishes, a checkpoint is written and the run
stops with `Interrupted` (exit 128 + signal number); outside the loop it stops at once. `Interrupted` derives from
BaseException, as KeyboardInterrupt does, so no `except Exception` on the way can swallow a stop request.

Inside a SLURM job two signals mean "you will be requeued" (`Requeued`, summary status "requeued" with the step):
- SIGUSR2 from submitit before the time limit: checkpoint (at the step boundary in the loop), then submitit's own
  handler requeues the job and the process exits; in set-up or the final eval it is handed to submitit at once.
- SIGTERM of a preemption (SLURM requeues the job itself, GraceTime seconds later, with SIGKILL): checkpoint, then
  wait for SLURM, because a job that exits on its own during the grace time ends FAILED and is never requeued.
  A SIGTERM of `scancel` (or of a time limit) is an ordinary interruption. Which one it is, SLURM says
  (`src.slurm.preempted`).
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Any, Dict, Optional

import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from .checkpoint import CheckpointError
from .config import Config, ConfigError
from .data import DataError
from .identity import RecordError, record_config, recorded_config
from .loggers import RunLogger, record_failure
from .rundir import RunDir, RunDirLock, RunDirRefused, remove_stale_temps, write_hydra_files, write_json
from . import slurm

log = logging.getLogger(__name__)


class DivergedError(RuntimeError):
    """The loss went non-finite; the message names the step and the term."""


class Interrupted(BaseException):
    """A signal stopped the run, at training step `step` (None: outside the loop)."""

    def __init__(self, signum: int, step: Optional[int] = None):
        self.signum, self.step = signum, step
        self.exit_code = 128 + signum  # 143 for SIGTERM, 130 for SIGINT, as a shell reports them
        super().__init__(f"interrupted by {signal.Signals(signum).name}" + (f" at step {step}" if step else ""))

    def at(self, step: Optional[int]) -> "Interrupted":
        """The same stop for a run at another step (a pack's member that waited its turn)."""
        return Interrupted(self.signum, step)


class Requeued(BaseException):
    """SLURM requeues this run's job; it stopped at training step `step` with a checkpoint and resumes from it.
    `wait`: the process must stay alive until SLURM ends it (a preemption), else it exits at once (submitit has
    requeued the job already)."""

    def __init__(self, step: Optional[int], how: str, wait: bool):
        self.step, self.how, self.wait = step, how, wait
        super().__init__(f"{how}" + (f" at step {step}" if step is not None else "") +
                         "; SLURM requeues the job and it resumes from its last checkpoint")

    def at(self, step: Optional[int]) -> "Requeued":
        return Requeued(step, self.how, self.wait)


def _after_the_stop(unraisable: sys.UnraisableHookArgs) -> None:
    """A stop raised outside the loop lands between any two bytecodes, e.g. inside tqdm's __init__ before it
    sets `pos`; the half-built object's __del__ then fails as the exception unwinds and Python would print that
    as a traceback under the one-line stop message. The run is ending and recorded, so it is a debug line."""
    log.debug("After the stop, ignored in %r: %s: %s", unraisable.object, unraisable.exc_type.__name__,
              unraisable.exc_value)


class StopSignals:
    """SIGTERM (a container stop, `scancel`, a SLURM preemption) and SIGINT (Ctrl-C) end a run cleanly. In the
    training loop (`defer`), the loop finishes its step, writes a checkpoint and then stops; elsewhere the run stops
    at once. SIGUSR2, which submitit sends before a SLURM time limit, is listened for when submitit listens for it,
    and submitit's own handler then requeues the job. `step` is the training step reached (the loop keeps it)."""

    def __init__(self):
        self.defer, self.received, self.step = False, None, None
        self.previous: Dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            signals = [signal.SIGINT, signal.SIGTERM]
            if callable(signal.getsignal(signal.SIGUSR2)):  # submitit's requeue handler
                signals.append(signal.SIGUSR2)
            for signum in signals:
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None and slurm.in_job():
            return  # SLURM repeats SIGTERM at the end of a preemption's grace time: the first one is in hand
        if not self.defer:
            sys.unraisablehook = _after_the_stop  # the stop is raised wherever the signal landed
            self.stop(self.step, signum)
        self.received = signum

    def stop(self, step: Optional[int], signum: Optional[int] = None) -> None:
        """After the checkpoint (or at once outside the loop): raise what the signal means."""
        signum = signum or self.received
        self.received = signum
        if signum == signal.SIGUSR2:
            try:
                self.previous[signum](signum, None)  # submitit: requeue this job, then sys.exit(-1)
            except SystemExit:
                raise Requeued(step, "submitit requeued the job (SIGUSR2: time limit or preemption)", wait=False) \
                    from None
            except Exception as e:  # submitit's UncompletedJobError: timed out too often, or not checkpointable
                log.warning("submitit did not requeue the job: %s", e)
        elif signum == signal.SIGTERM and slurm.in_job() and slurm.preempted(slurm.this_job()):
            raise Requeued(step, "preempted by SLURM (SIGTERM)", wait=True)
        raise Interrupted(signum, step)


# the errors that are the user's input (a value, a run dir, a file): one line with this label, no traceback
USER_ERRORS = {RunDirRefused: "Refused", ConfigError: "Config error", DataError: "Data error",
               CheckpointError: "Checkpoint error", RecordError: "Damaged run dir", DivergedError: "Diverged"}


class RunLifecycle:
    """`with RunLifecycle(run_dir, cfg) as run:` around a run's body. The body fills `run.summary`, calls
    `run.claim(config)` once the run dir is accepted (from then on summary.json is written on every exit) and sets
    `run.logger` once the logger starts. Exceptions pass through, recorded: status finished, failed, diverged,
    interrupted or requeued."""

    def __init__(self, run_dir: RunDir, raw_cfg: DictConfig | Config, stop: Optional[StopSignals] = None,
                 hydra_cfg: Optional[DictConfig] = None):
        self.dir, self.raw_cfg = run_dir, raw_cfg
        self.hydra_cfg = hydra_cfg  # the run's Hydra config (its `hydra` node), for .hydra/ and W&B; None from Python
        self.rank = int(os.environ.get("RANK", "0"))
        self.summary: Dict[str, Any] = {"status": "failed"}
        self.logger: Optional[RunLogger] = None
        self.writing = False  # summary.json is ours to write
        # a finished run continued with a larger budget: its summary.json and record stay until the continuation
        # finishes (then the new record, then the new summary); it is the new config to record then
        self.extending: Optional[Dict[str, Any]] = None
        self.stop = stop or StopSignals()  # a pack's members share the pack's, which the pack enters
        self.own_stop = stop is None
        self.lock: Optional[RunDirLock] = None

    def __enter__(self) -> "RunLifecycle":
        self.dir.root.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:  # DDP: rank 0 holds the dir
            self.lock = RunDirLock(self.dir)
        if self.own_stop:
            self.stop.__enter__()
        return self

    def claim(self, config: Dict[str, Any], extending: bool = False) -> None:
        """The rerun check passed: this process writes the run dir, and records `config` (trained_with.yaml).
        `extending`: a finished run continued with a larger budget, whose result (summary.json, under its record)
        survives until the continuation finishes; otherwise an earlier end's summary goes first, so no reader ever
        sees a status beside a record it does not belong to."""
        if self.rank != 0:
            return
        self.writing = True
        remove_stale_temps(self.dir)
        if extending:
            self.extending = config
            return
        self.dir.summary.unlink(missing_ok=True)
        record_config(self.dir, config)

    def __exit__(self, kind, e, tb) -> bool:
        try:
            if e is None:
                self.summary["status"] = "finished"
            elif isinstance(e, DivergedError):
                self.summary.update(status="diverged", error=str(e))
            elif isinstance(e, Interrupted):
                self.summary.update(status="interrupted", error=str(e), step=e.step)
            elif isinstance(e, Requeued):  # not a failure: the job runs again and resumes
                self.summary.update(status="requeued", error=str(e), step=e.step)
            else:
                self.summary["error"] = f"{kind.__name__}: {e}"
                self._record_early_failure(e)
            if self.writing and self.extending is not None and e is not None:
                log.warning("The finished result in %s is kept (summary.json, trained_with.yaml); the continuation "
                            "stopped at step %s, in checkpoints/last.pt: the same command continues it",
                            self.dir.root, self.summary.get("step", "?"))
            elif self.writing:
                if self.extending is not None:  # the continuation finished: its record, then its summary
                    self.dir.summary.unlink(missing_ok=True)
                    record_config(self.dir, self.extending)
                write_json(self.dir.summary, self.summary)
            if self.logger is not None:
                self.logger.finish(self.summary)
        finally:
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
            if self.own_stop:
                self.stop.__exit__()
            if self.lock is not None:
                self.lock.release()
        return False

    def _record_early_failure(self, e: BaseException) -> None:
        """A failure before the run dir was claimed (a bad value, unreadable data) is recorded there only when the
        dir holds no experiment yet (summary.json, .hydra/, a failed W&B run), so src.compare and the sweep report
        show the failed member and a corrected rerun starts fresh; a refused rerun, or a failure aimed at an
        existing run, leaves the dir exactly as it was."""
        if self.rank != 0 or isinstance(e, RunDirRefused):
            return
        as_given = self.raw_cfg if isinstance(self.raw_cfg, DictConfig) else OmegaConf.structured(self.raw_cfg)
        if not self.writing:
            try:
                fresh = recorded_config(self.dir) is None
            except RecordError:  # a damaged record: leave the dir as it is
                fresh = False
            if not fresh:
                return
            self.writing = True
            write_hydra_files(self.dir, as_given, self.hydra_cfg)
        if self.logger is None:
            record_failure(as_given, self.dir.root, self.summary, self.hydra_cfg)
