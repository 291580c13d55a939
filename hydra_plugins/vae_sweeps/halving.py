"""`hydra/sweeper=optuna_halving`: an Optuna search that prunes by successive halving, through any launcher.

Trials are asked from Optuna's sampler over a search space in the Optuna sweeper's syntax, then trained in rungs
of growing budget (`hydra.sweeper.budget_key`, trainer.max_steps by default): every trial of a rung is one batch for
the configured launcher (so `hydra/launcher=packed` packs a rung), each reports the rung's value (a summary key,
val/neg_elbo by default) with `trial.report`, and Optuna's pruner decides who goes on. A survivor continues from its
checkpoint into the next rung (the budget-extension resume), never from scratch. The study lives in Optuna's RDB
storage (SQLite in the sweep dir by default): the same command again resumes it. src/study.py holds the vocabulary.

Optuna's pruners are asynchronous (ASHA): a trial goes on when it is in the best 1/reduction_factor of the trials that
reached the rung before it, because Optuna cannot pause a trial. Ours pause at every rung, so the pruner judges each
trial against the whole rung (`_judge`): synchronous successive halving, decided by Optuna's own pruner.
"""
from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from src import study as studies
from src.config import ConfigError
from src.exits import SweepInterrupted, resume_sweep_command
from src.rundir import RunDir, read_summary

log = logging.getLogger(__name__)


class HalvingSweeper(Sweeper):
    def __init__(self, n_trials: int, min_budget: int, max_budget: int, reduction_factor: int, budget_key: str,
                 metric: str, direction: str, pruner: str, sampler: DictConfig, storage: Optional[str],
                 study_name: str, batch_size: Optional[int], params: Optional[Dict[str, str]] = None):
        super().__init__()
        if n_trials < 1:
            raise ConfigError(f"hydra.sweeper.n_trials={n_trials} must be >= 1")
        if budget_key not in studies.BUDGET_KEYS:
            raise ConfigError(f"hydra.sweeper.budget_key={budget_key} is not one of {', '.join(studies.BUDGET_KEYS)}")
        if direction not in studies.DIRECTIONS:
            raise ConfigError(f"hydra.sweeper.direction={direction} is not one of {', '.join(studies.DIRECTIONS)}")
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"hydra.sweeper.batch_size={batch_size} must be >= 1 (or null: every trial at once)")
        self.n_trials, self.budget_key, self.metric, self.direction = n_trials, budget_key, metric, direction
        self.budgets = studies.rungs(min_budget, max_budget, reduction_factor)
        self.reduction_factor, self.pruner_name = reduction_factor, pruner
        self.sampler_name, self.seed = sampler.name, sampler.seed
        self.storage, self.study_name, self.batch_size = storage, study_name, batch_size or n_trials
        self.params = dict(params or {})
        studies.pruner(pruner, self.budgets, reduction_factor)  # a bad name: one line now, not after the first rung
        self.jobs = 0  # job numbers handed to the launcher so far (a member's folder is its trial's number)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    # ------------------------------------------------------------------------------------------ the search

    def sweep(self, arguments: List[str]) -> Any:
        given = [f"{k}={v}" for k, v in self.params.items()] + list(arguments)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        space, fixed = studies.search_space(parser.parse_overrides(given))
        if not space:
            raise ConfigError("hydra/sweeper=optuna_halving needs a search space, e.g. "
                              "'optimizer.lr=tag(log,interval(0.0003,0.03))' 'loss.beta=interval(0.5,8)'")
        for o in fixed:
            if o.split("=", 1)[0].lstrip("+~") in studies.BUDGET_KEYS:
                raise ConfigError(f"{o}: the sweeper sets each rung's budget; give it as hydra.sweeper.min_budget and "
                                  f"max_budget ({self.budget_key}, in {self.budget_key.rsplit('_', 1)[1]})")
        self.fixed = fixed
        self._check_values(space)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        url = studies.storage_url(self.storage, sweep_dir)
        settings = {"space": {k: repr(d) for k, d in space.items()}, "fixed": fixed, "budget_key": self.budget_key,
                    "rungs": self.budgets, "metric": self.metric, "direction": self.direction,
                    "pruner": self.pruner_name, "sampler": f"{self.sampler_name} seed={self.seed}",
                    "reduction_factor": self.reduction_factor}
        study = studies.open_study(url, self.study_name, self.direction, settings,
                                   studies.sampler(self.sampler_name, self.seed, space),
                                   studies.pruner(self.pruner_name, self.budgets, self.reduction_factor))
        done = len(study.get_trials(deepcopy=False))
        log.info("Study %r in %s: %d trials, rungs %s of %s (%s)%s", self.study_name, url, self.n_trials,
                 ", ".join(map(str, self.budgets)), self.budget_key, self.pruner_name,
                 f"; resuming with {done} trials begun" if done else "")
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")  # the sweep's record, as Hydra's basic sweeper's
        try:
            while self._step(study, space):
                pass
        except KeyboardInterrupt:  # Ctrl-C between rungs (asking, judging): what is told is kept, as always
            raise SweepInterrupted(f"Interrupted by SIGINT: the study keeps every trial told so far; resume it with: "
                                   f"{resume_sweep_command(str(sweep_dir))}", 130) from None
        self._tell_the_end(study)

    def _step(self, study: Any, space: Dict[str, Any]) -> bool:
        """One move of the study: judge a rung that reported but was not judged (a kill in between), or train the
        trials due at the smallest next budget as one launch, or ask a new batch of trials. False when done."""
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        running = [t for t in trials if t.state == TrialState.RUNNING]
        unjudged = [t for t in running if t.intermediate_values and
                    t.user_attrs.get("judged") != max(t.intermediate_values)]
        if unjudged:
            at = max(unjudged[0].intermediate_values)
            self._judge(study, [t for t in unjudged if max(t.intermediate_values) == at], at)
            return True
        if not running:
            if len(trials) >= self.n_trials:
                return False
            # a sampler seeded by the study's size: trials asked after a resume are those an unbroken study asks
            seed = None if self.seed is None else self.seed + len(trials)
            study.sampler = studies.sampler(self.sampler_name, seed, space)
            for _ in range(min(self.batch_size, self.n_trials - len(trials))):
                study.ask(fixed_distributions=space)
            return True
        due = {t.number: self._next_budget(t) for t in running}
        budget = min(due.values())
        self._run_rung(study, sorted((t for t in running if due[t.number] == budget), key=lambda t: t.number), budget)
        return True

    def _next_budget(self, trial: Any) -> int:
        reached = max(trial.intermediate_values, default=0)
        return next(b for b in self.budgets if b > reached)

    def _member_overrides(self, values: Dict[str, Any], budget: int) -> List[str]:
        """A member's overrides: the fixed ones, its values of the searched keys, and the budget (the other budget
        key null, so it cannot bind first)."""
        other = next(k for k in studies.BUDGET_KEYS if k != self.budget_key)
        return [*self.fixed, *(f"{k}={studies.value_text(v)}" for k, v in values.items()),
                f"{self.budget_key}={budget}", f"{other}=null"]

    def _overrides(self, trial: Any, budget: int) -> List[str]:
        return [*self._member_overrides(trial.params, budget), f"hydra.sweep.subdir={studies.trial_folder(trial)}"]

    def _run_rung(self, study: Any, trials: List[Any], budget: int) -> None:
        """Train `trials` to `budget` as one launch; a trial that did not finish is failed in the study, the others
        report their value there and are judged."""
        import optuna

        rung = self.budgets.index(budget)
        log.info("Rung %d (%s=%d): trials %s", rung, self.budget_key, budget, ", ".join(str(t.number) for t in trials))
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        try:
            self.launcher.launch([self._overrides(t, budget) for t in trials], initial_job_idx=self.jobs)
        except SystemExit as e:  # a member stopped by a signal (the basic launcher runs it in this process)
            if isinstance(e.code, int) and e.code > 128:
                log.error("Interrupted: the study's trials keep their checkpoints; resume the study with: %s",
                          resume_sweep_command(str(sweep_dir)))
            raise
        self.jobs += len(trials)
        reported = []
        for frozen in trials:
            trial = optuna.trial.Trial(study, frozen._trial_id)
            summary = read_summary(RunDir(sweep_dir / studies.trial_folder(frozen))) or {}
            status, value = summary.get("status"), summary.get(self.metric)
            if status in ("interrupted", "requeued"):
                raise SweepInterrupted(f"trial {frozen.number} was {status} at step {summary.get('step')}; resume "
                                       f"the study with: {resume_sweep_command(str(sweep_dir))}", 130)
            if status != "finished" or not isinstance(value, (int, float)) or not math.isfinite(value):
                why = summary.get("error") or (f"{self.metric} is {value}" if status == "finished" else
                                               f"it ended {status or 'without a summary'}")
                trial.set_user_attr("error", str(why)[:500])
                _tell(study, trial, state=optuna.trial.TrialState.FAIL)
                log.warning("Trial %d failed at rung %d: %s", frozen.number, rung, why)
                continue
            # what the pruner had recorded of this trial before this rung (see _judge)
            trial.set_user_attr(f"attrs_before_{budget}", sorted(frozen.system_attrs))
            trial.report(float(value), budget)
            reported.append(frozen)
        self._judge(study, reported, budget)

    def _judge(self, study: Any, trials: List[Any], budget: int) -> None:
        """Optuna's pruner decides who of a rung goes on, each trial judged against every trial of the rung.

        Optuna's pruners are asynchronous: `should_prune` compares a trial with the trials that reached the rung
        before it (the first ones always go on), because Optuna cannot pause a trial. Ours pause at every rung, so
        first each trial's `should_prune` records its rung value in the study, as Optuna's pruner does; then the
        pruner judges each trial once more, as it stood before the rung, now that the whole rung is recorded: the
        best 1/reduction_factor of the rung go on, as in synchronous successive halving (Hyperband: of its bracket).
        The decision is kept in the trial (COMPLETE, PRUNED, or `judged`), so a kill in between is judged again on
        resume."""
        import optuna

        live = [optuna.trial.Trial(study, t._trial_id) for t in trials]
        if budget == self.budgets[-1]:
            for frozen, trial in zip(trials, live):
                value = study._storage.get_trial(frozen._trial_id).intermediate_values[budget]
                _tell(study, trial, value)
                log.info("Trial %d complete: %s=%.4g", frozen.number, self.metric, value)
            return
        for trial in live:  # each records its rung value in the study (its own verdict here is not the one kept)
            trial.should_prune()
        rung = self.budgets.index(budget)
        for trial in live:
            now = study._storage.get_trial(trial._trial_id)
            before = copy.deepcopy(now)
            kept = set(now.user_attrs.get(f"attrs_before_{budget}", now.system_attrs))
            before.system_attrs = {k: v for k, v in now.system_attrs.items() if k in kept}
            value = now.intermediate_values[budget]
            if study.pruner.prune(study, before):
                _tell(study, trial, state=optuna.trial.TrialState.PRUNED)
                log.info("Trial %d pruned at rung %d: %s=%.4g", trial.number, rung, self.metric, value)
                self._tag_pruned(trial, rung, budget)
            else:
                trial.set_user_attr("judged", budget)
                log.info("Trial %d goes on from rung %d: %s=%.4g", trial.number, rung, self.metric, value)

    def _tag_pruned(self, trial: Any, rung: int, budget: int) -> None:
        """A pruned trial's W&B run tagged `pruned` and `rung=<r>` (the rung it reached), with study/* summary keys:
        it never trains again, so its run is resumed for a moment to say so."""
        from src.identity import RecordError, recorded_config
        from src.loggers import tag_ended_run

        member = Path(str(self.config.hydra.sweep.dir)) / studies.trial_folder(trial)
        try:
            config = recorded_config(member)
        except RecordError:
            return
        hydra_file = member / ".hydra" / "hydra.yaml"
        if config is None or not hydra_file.is_file():
            return
        tag_ended_run(member, config, OmegaConf.load(hydra_file).hydra, ["pruned", f"rung={rung}"],
                      {"study/state": "pruned", "study/rung": rung, f"study/{self.budget_key.split('.')[1]}": budget})

    def _tell_the_end(self, study: Any) -> None:
        table = studies.trials_table(study)
        counts = table["state"].value_counts().to_dict()
        trained = float(table["budget"].fillna(0).sum())
        full = len(table) * self.budgets[-1]
        log.info("Study %r: %d trials (%s); trained %d of the %d %s a full-budget grid of them would (%.0f%%)",
                 self.study_name, len(table), ", ".join(f"{n} {s}" for s, n in counts.items()), trained, full,
                 self.budget_key.split(".")[1].removeprefix("max_"), 100 * trained / full)
        complete = table[table["state"] == "complete"]
        if len(complete):
            best = complete.iloc[0]
            params = " ".join(f"{k}={best[k]}" for k in table.columns[4:])
            log.info("Best trial %d (folder %d): %s=%.4g; %s", best["trial"], best["trial"], self.metric,
                     best["value"], params)

    # ------------------------------------------------------------------------------------------ checks

    def _check_values(self, space: Dict[str, Any]) -> None:
        """Every end of the search space composed and checked as a member's config is, before any training: a bad
        value is one line naming the key (a member would fail with it only when a trial drew it)."""
        from src.config_check import parse

        from .launchers import task_config

        def ends(d: Any) -> List[Any]:
            return list(d.choices) if hasattr(d, "choices") else [d.low, d.high]

        first = {k: ends(d)[0] for k, d in space.items()}
        for key, d in space.items():
            for value in ends(d):
                overrides = self._member_overrides({**first, key: value}, self.budgets[-1])
                cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
                try:
                    parse(task_config(cfg))
                except ConfigError as e:
                    raise ConfigError(f"the search space of {key} reaches {studies.value_text(value)}, where: {e}") \
                        from None



def _tell(study: Any, trial: Any, value: Optional[float] = None, state: Any = None) -> None:
    """Optuna's `study.tell`. The grid sampler, its grid used up, asks the study to stop from inside tell, which
    Optuna allows only inside `study.optimize` (the trial's state is stored all the same): here n_trials ends the
    study, so that request is moot."""
    try:
        study.tell(trial, value, state=state)
    except RuntimeError as e:
        if "Study.stop" not in str(e):
            raise
