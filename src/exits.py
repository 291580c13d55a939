"""How a command ends: exit codes, the one line a user's error gets (Hydra's own errors too), the report at the end
of a multirun, and the wait for SLURM after a preemption. `python -m src.train` (src/train.py) and a pack's job hand
their bodies to `run_member` and `run_pack`; this module imports no trainer.

Exit codes: 0 finished (or already finished); 2 bad input (a config value, a refused rerun, unreadable data or
checkpoint, an unwritable output dir); 3 diverged; 128 + N stopped by signal N (130 Ctrl-C, 143 SIGTERM);
255 requeued by SLURM (it runs again and resumes); a multirun exits 1 when any member did not finish.
"""
from __future__ import annotations

import errno
import logging
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, NoReturn, Optional

from hydra.errors import HydraException, OverrideParseException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from .checkpoint import CheckpointError, checkpoint_step
from .config import Config, ConfigError
from .config_check import did_you_mean
from .lifecycle import USER_ERRORS, DivergedError, Interrupted, Requeued
from .naming import sweep_size
from .rundir import RunDir, RunDirRefused, SweepDir, note_refused_member, read_summary, write_text
from .slurm import SubmitRefused

log = logging.getLogger(__name__)

REQUEUED_EXIT = 255  # as submitit's own requeue handler exits (sys.exit(-1))
PREEMPTION_WAIT_S = 600  # at most this long for SLURM to end a preempted job (GraceTime, then KillWait)
OUTPUT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)  # a full or read-only disk
NOT_A_FOLDER = (errno.EEXIST, errno.ENOTDIR)  # mkdir of a path that is a file, or runs through one
NAN = float("nan")


def failure_line(e: BaseException, run_dir: Optional[Path] = None) -> Optional[str]:
    """The one line an error that is the user's input gets (a value, a run dir, a file, a full disk), or None for
    one that is not (a bug: its traceback is the report)."""
    label = next((text for cls, text in USER_ERRORS.items() if isinstance(e, cls)), None)
    if label is not None:
        return f"{label}: {e}"
    if isinstance(e, OSError) and e.errno in OUTPUT_ERRNOS:
        return (f"Output error: cannot write {e.filename or run_dir} ({e.strerror}); free space or choose a writable "
                "hydra.run.dir")
    return None


def report_failure(e: BaseException, run_dir: Path, multirun: bool) -> None:
    """A run that could not start or go on: its one line (or, for a bug, its traceback), in its own train.log; in a
    multirun a refused member, whose dir is left untouched, is noted in the sweep dir for the sweep report."""
    line = failure_line(e, run_dir)
    if line is None:
        log.error("Member failed: %s: %s", type(e).__name__, e, exc_info=e)
        return
    log.error(line)
    if multirun and isinstance(e, RunDirRefused):
        note_refused_member(run_dir, str(e))
    elif multirun and (read_summary(RunDir(run_dir)) or {}).get("status") in (None, "finished"):
        # it failed before its dir was claimed and left the dir as it was (a finished result kept): only the
        # sweep dir can tell the sweep report
        note_refused_member(run_dir, line, how="failed")


def end_requeued(e: Requeued, what: str = "") -> NoReturn:
    log.warning("Requeued: %s%s", e, what)
    if e.wait:  # a preempted job that exits on its own ends FAILED and is not requeued: SLURM ends it
        wait_for_slurm()
    sys.exit(REQUEUED_EXIT)


class SweepInterrupted(Exception):
    """The driver of a submitit sweep stopped by a signal, after its local jobs stopped: the message is the one
    line the command ends with (what stopped, how to resume), `exit_code` 128 + the signal."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def resume_sweep_command(sweep_dir: str) -> str:
    """The command that resumes this sweep: the one that was typed, with its sweep dir named."""
    args = sys.argv[1:]
    if not any(a.startswith("hydra.sweep.dir=") for a in args):
        args.append(f"hydra.sweep.dir={sweep_dir}")
    return " ".join(["python -m src.train", *map(shlex.quote, args)])


def run_member(train: Callable[[], Dict[str, Any]], hydra_cfg: DictConfig) -> float:
    """A member of `python -m src.train` (a single run or a multirun's member): `train()`'s val/neg_elbo (nats per
    image), the objective sweepers minimise, or how it ended. A single run that fails on bad input or diverges exits
    non-zero with one line, no traceback. In a multirun a failing member is recorded (its summary.json and train.log,
    or for a refused member a line in the sweep dir) and returns NaN, so the other members go on; SweepReport names
    the failures when the sweep ends. A signal stops the whole process, multirun or not, with 128 + its number."""
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        study = hydra_cfg.runtime.choices.get("sweep")
        if study and not multirun:  # a named study is a multirun; without -m it would train one default run
            raise ConfigError(f"sweep={study} is not allowed without -m; run python -m src.train -m sweep={study}")
        return train().get("val/neg_elbo", NAN)
    except Requeued as e:
        end_requeued(e)
    except Interrupted as e:
        last = RunDir(run_dir).last
        try:
            saved = f"checkpoint {last} (step {checkpoint_step(last)})" if last.is_file() else "no checkpoint yet"
        except CheckpointError as damaged:
            saved = str(damaged)
        # the member alone: a named study's `sweep=...` only chose the sweep's values (a single run refuses it)
        task = [o for o in hydra_cfg.overrides.task if not o.startswith("sweep=")]
        command = " ".join(["python -m src.train", *map(shlex.quote, task), f"hydra.run.dir={shlex.quote(str(run_dir))}"])
        log.error("Interrupted: %s; %s; resume with: %s", e, saved, command)
        sys.exit(e.exit_code)
    except Exception as e:
        if not multirun and failure_line(e, run_dir) is None:
            raise
        report_failure(e, run_dir, multirun)
        if not multirun:
            sys.exit(3 if isinstance(e, DivergedError) else 2)
    return NAN


def run_pack(train: Callable[[], List[Optional[Dict[str, Any]]]], members: int) -> List[float]:
    """A pack's job (`hydra/launcher=packed`), its members trained as one program, with a multirun member's endings:
    a signal stops every member after its checkpoint and the job exits 128 + N (255 when SLURM requeues it); a member
    that fails alone was recorded in its run dir and returns NaN; the others return val/neg_elbo (nats per image)."""
    try:
        summaries = train()
    except Requeued as e:
        end_requeued(e, " (every member of the pack)")
    except Interrupted as e:
        log.error("Interrupted: %s; every member of the pack wrote its checkpoint; rerun the sweep to resume them", e)
        sys.exit(e.exit_code)
    except Exception:
        log.exception("The pack failed; its members' summaries say where")
        return [NAN] * members
    return [s.get("val/neg_elbo", NAN) if s and s.get("status") == "finished" else NAN for s in summaries]


class SweepReport(Callback):
    """At the end of a multirun: one line per failed or refused member of this launch, and exit status 1 if any.
    This launch's members are folders 0 .. N-1 of the N its sweep makes; folders that an earlier launch of a
    larger sweep left in the same sweep dir are not this launch's."""

    previous_record: Optional[str] = None  # the sweep's multirun.yaml before Hydra rewrote it for this launch

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = SweepDir(config.hydra.sweep.dir)
        for notes in (sweep.refused, sweep.lost):  # from an earlier launch
            notes.unlink(missing_ok=True)
        # Hydra rewrites multirun.yaml next; a launch whose every member is refused must not change what the
        # sweep dir says it holds (src.compare reads its swept keys there)
        record = sweep.root / "multirun.yaml"
        self.previous_record = record.read_text() if record.is_file() else None

    def _keep_record_of_a_refused_launch(self, sweep: SweepDir, size: Optional[int]) -> None:
        refused = {str(note["member"]) for note in sweep.notes(sweep.refused)}
        if self.previous_record is not None and size and len(refused) == size:
            write_text(sweep.root / "multirun.yaml", self.previous_record)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = SweepDir(config.hydra.sweep.dir)
        size = sweep_size(config.hydra)
        self._keep_record_of_a_refused_launch(sweep, size)
        failed, named = [], set()
        lost = {str(note["member"]): note for note in sweep.notes(sweep.lost)}  # jobs that ended without a result

        def job(member: str) -> str:
            note = lost.get(member)
            if note is None:
                return ""
            state = note.get("state", "unknown")  # "": a local job, whose state says nothing
            return f" (job {note['job']}" + (f", state {state})" if state else ")")

        for member in sweep.members():
            if size is not None and int(member.name) >= size:
                continue  # left by an earlier launch of a larger sweep
            rd = RunDir(member)
            summary = read_summary(rd)
            if summary is not None and summary.get("status") != "finished":
                failed.append(f"member {member.name} {summary.get('status')}{job(member.name)}: {summary.get('error')}")
            elif summary is None and rd.lock.is_file():  # started, never ended
                failed.append(f"member {member.name} ended without a summary{job(member.name)}: killed by the system "
                              "(out of memory?), by kill -9 or by its scheduler; rerun the sweep to resume it")
            else:
                continue
            named.add(member.name)
        for note in sweep.notes(sweep.refused):
            failed.append(f"member {note['member']} {note.get('how', 'refused')}: {note['error']}")
        for member, note in lost.items():  # its job ended before the member could leave a summary, or a folder
            if member not in named and read_summary(RunDir(sweep.root / member)) is None:
                failed.append(f"member {member} ended without a result{job(member)}: killed by the system (out of "
                              "memory?), by kill -9 or by its scheduler before it started; rerun the sweep to run it")
        if failed:
            for line in failed:
                log.error(line)
            log.error("%d member(s) of the sweep in %s did not finish", len(failed), sweep.root)
            sys.exit(1)
        log.info("Sweep finished: every member in %s", sweep.root)


def wait_for_slurm() -> None:
    """Stay alive, ignoring SLURM's repeated SIGTERM, until SLURM kills the preempted job (and requeues it)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    deadline = time.monotonic() + PREEMPTION_WAIT_S
    while time.monotonic() < deadline:
        time.sleep(1)
    log.error("SLURM did not end the preempted job within %d s; exiting", PREEMPTION_WAIT_S)


def hydra_error_line(e: BaseException) -> str:
    """Hydra's composition and override errors as one line (it prints them over several, plus a hint)."""
    if isinstance(e, OverrideParseException):
        return f"cannot parse the override {e.override!r}: {str(e).splitlines()[0]} (Hydra's override grammar)"
    chain = [e]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    for cause in chain:  # a key that is not in the schema: name it and the nearest known key
        key = getattr(cause, "full_key", None)
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and key:
            section, _, name = key.rpartition(".")
            schema = OmegaConf.structured(Config)
            known = schema.get(section) if section else schema
            if isinstance(known, DictConfig):
                where = f"a key of {section}" if section else "a config key"
                return f"{key} is not {where}{did_you_mean(name, list(known.keys()), section + '.' if section else '')}"
    ours = next((cause for cause in chain if isinstance(cause, ConfigError)), None)
    if ours is not None:  # our launcher's own check (hydra.launcher.engine=...), raised inside Hydra's instantiate
        return str(ours)
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    lines = lines[: next((i for i, line in enumerate(lines) if line.startswith("Config search path")), len(lines))]
    if len(chain) > 1 and isinstance(chain[1], OmegaConfBaseException):
        lines.append(str(chain[1]).splitlines()[0])
    text = lines[0]
    for line in lines[1:]:
        text += (" " if text.endswith(":") else "; ") + line
    return text


def _the_file_in(path: str) -> Path:
    """The existing file on `path` (itself, or the folder above it that is a file) that kept a folder from being
    made there."""
    at = Path(path)
    while not at.exists() and at != at.parent:
        at = at.parent
    return at


def _one_line_hydra_errors(run_and_report: Callable) -> Callable:
    """Wrap Hydra's error reporter: a bad override or config group (the user's input), or an output dir that
    cannot be written, ends with one line and exit status 2; anything else is reported by Hydra as before.
    HYDRA_FULL_ERROR=1 still shows everything."""

    def report(func: Callable) -> Any:
        def guarded() -> Any:
            try:
                return func()
            except SubmitRefused as e:  # sbatch said no: SLURM's reason and the key to change
                print(f"Launch error: {e}", file=sys.stderr)
                sys.exit(2)
            except SweepInterrupted as e:  # a submitit sweep's driver stopped, its local jobs with it
                log.error("%s", e)
                sys.exit(e.exit_code)
            except ConfigError as e:  # a sweeper's own check (the Optuna sweeper's search space, its study)
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                print(f"Config error: {e}", file=sys.stderr)
                sys.exit(2)
            except (HydraException, OmegaConfBaseException) as e:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                print(f"Config error: {hydra_error_line(e)}", file=sys.stderr)
                sys.exit(2)
            except (OSError, ValueError) as e:  # Hydra could not create the run dir, or its log there (logging
                # reports an unwritable train.log as "Unable to configure handler 'file'", the OSError as its cause)
                cause = e if isinstance(e, OSError) else e.__cause__
                if not isinstance(cause, OSError) or cause.errno not in (*OUTPUT_ERRNOS, *NOT_A_FOLDER, errno.ENOENT) \
                        or os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                if cause.errno in NOT_A_FOLDER:  # the run dir, or a folder above it, names an existing file
                    print(f"Output error: {_the_file_in(cause.filename)} is a file, not a folder; choose another "
                          "hydra.run.dir (or hydra.sweep.dir)", file=sys.stderr)
                else:
                    print(f"Output error: cannot write {cause.filename} ({cause.strerror}); choose a writable "
                          "hydra.run.dir", file=sys.stderr)
                sys.exit(2)

        return run_and_report(guarded)

    report.one_line = True
    return report


def run(main: Callable[[], Any]) -> None:
    """A `@hydra.main` function run as its command: Hydra's errors in one line."""
    import hydra._internal.utils as hydra_utils

    if not getattr(hydra_utils.run_and_report, "one_line", False):
        hydra_utils.run_and_report = _one_line_hydra_errors(hydra_utils.run_and_report)
    try:
        main()
    except ValueError as e:  # Hydra's own check of its flags, raised before its error reporter
        if not str(e).startswith("Only one of") or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"Command-line error: {e} (e.g. `-m ... --cfg job` cannot be combined)", file=sys.stderr)
        sys.exit(2)
