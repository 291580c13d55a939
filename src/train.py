"""`python -m src.train [overrides]`: train a VAE, or with `-m` a sweep of them; `train(cfg)` from Python.

A run is a pack of one. `train_pack(cfgs, run_dirs)` reads: each member's lifecycle (its lock, stop signals,
summary.json on every exit: src/lifecycle.py) -> each member built (src/member.py: the rerun plan, data, model,
resume, run dir, logger) -> the one loop (src/loop.py) over the members, an engine taking their steps
(src/engines.py) -> each member's summary. How the command ends (exit codes, one-line errors, the sweep report) is
src/exits.py; `hydra/launcher=packed` runs a pack's job through `pack_main`.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import hydra
import hydra_plugins.vae_sweeps.config  # noqa: F401  the launcher schemas (packed_base, ...) in Hydra's store, also
# where Hydra's plugin scan cannot see them (an editable install run from outside the checkout)
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from . import exits
from .config import Config, ConfigError, register_configs
from .engines import check_engine_name
from .lifecycle import Interrupted, Requeued, RunLifecycle, StopSignals
from .loggers import MemberLogs, own_log_files
from .loop import fit
from .member import Member, Placement, SharedData, build_member
from .rundir import RunDir, RunDirRefused

log = logging.getLogger(__name__)

register_configs()
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")  # absolute: found however the module is run
Outcome = Tuple[Optional[Dict[str, Any]], Optional[BaseException]]  # a member's summary, and what ended it early


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    """Hydra's entry point: train the run `cfg` describes; returns val/neg_elbo (nats per image), the objective
    sweepers minimise. How it ends, on every path, is src/exits.py's `run_member`."""
    hydra_cfg = HydraConfig.get()
    own_log_files(Path(hydra_cfg.runtime.output_dir))
    return exits.run_member(lambda: train(cfg, hydra_cfg=hydra_cfg), hydra_cfg)


def train(cfg: DictConfig | Config, run_dir: Optional[str | Path] = None,
          hydra_cfg: Optional[DictConfig] = None) -> Dict[str, Any]:
    """Train per `cfg`, writing the run-dir contract into `run_dir` (default: Hydra's output dir).

    Returns the summary dict (also written to summary.json). A bad value raises ConfigError before any work;
    any failure still leaves summary.json with its status and error, then is raised. A rerun into the same run dir
    with the same settings skips a finished run and resumes an unfinished one (trainer.resume=auto), a larger
    budget continues it, and any other difference raises RunDirRefused before anything in the dir changes. One
    process at a time. `hydra_cfg`: the run's Hydra config (its `hydra` node), by default the current one if any.
    """
    if hydra_cfg is None and HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
    if run_dir is None:
        if hydra_cfg is None:
            raise ConfigError("train(cfg) outside a Hydra app needs run_dir=<folder> for the run's files")
        run_dir = hydra_cfg.runtime.output_dir
    [(summary, error)] = _train_members([cfg], [run_dir], "loop", [hydra_cfg], log_name=None)
    if error is not None:
        raise error
    return summary


def train_pack(cfgs: Sequence[Any], run_dirs: Sequence[str | Path], engine: str = "auto",
               hydra_cfgs: Optional[Sequence[Optional[DictConfig]]] = None,
               log_name: str = "train.log") -> List[Dict[str, Any]]:
    """Train the members `cfgs` (one run dir each) as one pack; returns each member's summary, in order.

    Each member keeps a solo run's contract, and its lines go to `<run dir>/<log_name>`. A member that cannot
    start (a bad value, a refused run dir, an unreadable checkpoint) ends with its own summary and line and the
    others go on; a finished one is skipped; one that diverges is recorded `diverged` and frozen. A signal stops
    every member at the same step boundary after each has written its checkpoint, and is raised (Interrupted, or
    Requeued on SLURM) once every member has recorded it. `engine`: auto | loop | vmap (src/engines.py).
    """
    check_engine_name(engine)
    return [summary for summary, _ in _train_members(cfgs, run_dirs, engine, hydra_cfgs, log_name)]


def _train_members(cfgs: Sequence[Any], run_dirs: Sequence[str | Path], engine: str,
                   hydra_cfgs: Optional[Sequence[Optional[DictConfig]]], log_name: Optional[str]) -> List[Outcome]:
    """The members' outcomes. `log_name` None: a run alone, whose failure its command reports (src/exits.py);
    else each member's failure is reported in its own log, as a multirun's member's is."""
    n = len(cfgs)
    hydra_cfgs = list(hydra_cfgs) if hydra_cfgs is not None else [None] * n
    outcomes: List[Outcome] = [(None, None)] * n
    stop, shared = StopSignals(), SharedData()
    logs = MemberLogs(run_dirs, log_name) if log_name is not None else None
    runs: Dict[int, RunLifecycle] = {}  # the members' runs still open
    members: Dict[int, Member] = {}
    place: Optional[Placement] = None  # where the first member trains, and so the others

    def on(i: int):
        return logs.member(run_dirs[i]) if logs is not None else nullcontext()

    def end(i: int, e: Optional[BaseException]) -> None:
        """Close member i's run, recording how it ended."""
        run = runs.pop(i)
        members.pop(i, None)
        with on(i):
            run.__exit__(type(e) if e else None, e, e.__traceback__ if e else None)
            if isinstance(e, Exception) and logs is not None:
                exits.report_failure(e, run.dir.root, multirun=True)
            if isinstance(e, (Interrupted, Requeued)) and logs is not None:  # its train.log says why it stopped
                log.error("Stopped: %s; its checkpoint is at step %s; rerun the sweep to resume it", e,
                          run.summary.get("step"))
        outcomes[i] = (run.summary, e)

    with stop, (logs or nullcontext()):
        try:
            for i, (cfg, rd) in enumerate(zip(cfgs, run_dirs)):  # 1. each member built, or skipped, or refused
                with on(i):
                    run = RunLifecycle(RunDir(rd), cfg, stop=stop, hydra_cfg=hydra_cfgs[i])
                    try:
                        runs[i] = run.__enter__()
                    except RunDirRefused as e:  # another process holds its dir: left as it was
                        if logs is None:
                            raise
                        exits.report_failure(e, Path(rd), multirun=True)
                        logs.drop(rd)
                        outcomes[i] = ({"status": "failed", "error": f"{type(e).__name__}: {e}"}, e)
                        continue
                    try:
                        built = build_member(cfg, run, shared, place)
                    except Exception as e:
                        end(i, e)
                        continue
                if isinstance(built, dict):  # finished already: skipped
                    end(i, None)
                    outcomes[i] = (built, None)
                    continue
                members[i], place = built, place or built.place
            index = {id(m): i for i, m in members.items()}
            for group in by_resume_step(members):  # 2. the loop, over the members at one step
                fit(group, engine, stop, lambda m, e: end(index[id(m)], e), logs)
        except BaseException as e:  # a signal (or a failure of the pack itself): every member still open records it
            for i in list(runs):  # (a member that waited for its group's turn, at its own step)
                end(i, e.at(members[i].state.step) if isinstance(e, (Interrupted, Requeued)) and i in members else e)
            raise
    return outcomes


def by_resume_step(members: Dict[int, Member]) -> List[List[Member]]:
    """The members grouped by the step they resume from, earliest first; each group trains as a pack, one after
    another. One group, but for a pack stopped between two members' checkpoint writes (kill -9, a node failure)
    and then run again as it was (SLURM requeues the same job; a rerun of the sweep re-plans them instead)."""
    steps = sorted({m.state.step for m in members.values()})
    if len(steps) > 1:
        log.warning("The pack's members resume from different steps (%s); they train as %d packs, one after another",
                    ", ".join(f"member {m.run.dir.root.name} from {m.state.step}" for m in members.values()),
                    len(steps))
    return [[m for m in members.values() if m.state.step == s] for s in steps]


def pack_main(cfgs: List[DictConfig], engine: str) -> List[float]:
    """A pack's job (`hydra/launcher=packed`): its members, each a full Hydra config, trained as one program; each
    member's val/neg_elbo, or NaN (src/exits.py's `run_pack`: how the job ends)."""
    logging.basicConfig(level=logging.INFO, format=MemberLogs.FORMAT, force=True)  # the pack's own log (submitit's)
    tasks = []
    for cfg in cfgs:
        task = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
        with open_dict(task):
            del task["hydra"]
        tasks.append(task)
    run_dirs = [c.hydra.runtime.output_dir for c in cfgs]
    return exits.run_pack(lambda: train_pack(tasks, run_dirs, engine, [c.hydra for c in cfgs],
                                             log_name=f"{cfgs[0].hydra.job.name}.log"), len(cfgs))


if __name__ == "__main__":
    # the command, by its importable name: Hydra's launchers (joblib, submitit) pickle `main` by reference, and
    # `__main__.main` does not exist in the processes they start
    from src.train import main as importable_main

    exits.run(importable_main)
