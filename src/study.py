"""An adaptive sweep's study (`hydra/sweeper=optuna_halving`): an Optuna study whose trials train in rungs of
growing budget, Optuna's pruner deciding after each rung who goes on. This module is the study's vocabulary, used by
the sweeper (hydra_plugins/vae_sweeps/halving.py) and by src.compare: the search space from Hydra's override syntax,
the rungs, the sampler and pruner by name, the study in its database, and a finished study read back as a table.

A trial is a member of the sweep: folder `<sweep dir>/<trial number>`, trained to each rung's budget in turn by
the budget-extension resume (a run given a larger budget continues from its checkpoint), so a trial that reaches
the full budget is the same run as one given that budget from the start.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .config import ConfigError

STUDY_FILE = "study.db"  # the study's SQLite database in the sweep dir (hydra.sweeper.storage: null)
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("successive_halving", "hyperband")
BUDGET_KEYS = ("trainer.max_steps", "trainer.max_epochs")
DIRECTIONS = ("minimize", "maximize")
# what a study must keep to be resumed: the same search, budgets and goal (hydra.sweeper.*), checked on reopening
SETTINGS = ("space", "fixed", "budget_key", "rungs", "metric", "direction", "pruner", "sampler", "reduction_factor")


def search_space(overrides: Sequence[Any]) -> Tuple[Dict[str, Any], List[str]]:
    """Hydra's parsed overrides -> (Optuna distributions by key, the fixed overrides as strings), in the Optuna
    sweeper's syntax: `interval(a,b)` (floats; ints if both are ints), `tag(log, interval(a,b))`, `choice(...)`
    and plain lists `a,b,c` (categorical), `range(a,b[,step])` (ints or stepped floats, b excluded as in Hydra)."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    space: Dict[str, Any] = {}
    fixed: List[str] = []
    for o in overrides:
        key = o.get_key_element()
        if not o.is_sweep_override():
            fixed.append(f"{key}={o.get_value_element_as_str()}")
            continue
        sweep, text = o.value(), o.input_line or key
        try:
            if isinstance(sweep, IntervalSweep):
                log = "log" in sweep.tags
                if isinstance(sweep.start, int) and isinstance(sweep.end, int) and "float" not in sweep.tags:
                    space[key] = IntDistribution(int(sweep.start), int(sweep.end), log=log)
                else:
                    space[key] = FloatDistribution(float(sweep.start), float(sweep.end), log=log)
            elif isinstance(sweep, RangeSweep):
                values = list(o.sweep_iterator())
                if not values:
                    raise ValueError("the range is empty")
                if all(isinstance(v, int) for v in values):
                    space[key] = IntDistribution(values[0], values[-1], step=int(sweep.step))
                else:
                    space[key] = FloatDistribution(float(values[0]), float(values[-1]), step=float(sweep.step))
            elif isinstance(sweep, ChoiceSweep):
                # Optuna keeps numbers, strings and booleans; a list or a dict choice travels as its override text
                choices = [v if v is None or isinstance(v, (bool, int, float, str)) else s
                           for v, s in zip(o.sweep_iterator(), o.sweep_string_iterator())]
                space[key] = CategoricalDistribution(choices)
            else:
                raise ValueError(f"{type(sweep).__name__} is not a search space the Optuna sweeper takes")
        except ValueError as e:  # Optuna's own checks (low > high, log of a value <= 0, ...) and ours
            raise ConfigError(f"{text}: {e}; write it as interval(low,high), tag(log,interval(low,high)), "
                              "choice(a,b,...) or range(start,stop,step)") from None
    return space, fixed


def value_text(value: Any) -> str:
    """A sampled value as an override's value (floats in full, so the run is the trial)."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return repr(value) if isinstance(value, float) else str(value)


def rungs(min_budget: int, max_budget: int, reduction_factor: int) -> List[int]:
    """The budgets trials train to in turn: min_budget * eta^r below max_budget, then max_budget."""
    if min_budget < 1 or max_budget < min_budget:
        raise ConfigError(f"hydra.sweeper.min_budget={min_budget} and max_budget={max_budget}: need "
                          "1 <= min_budget <= max_budget")
    if reduction_factor < 2:
        raise ConfigError(f"hydra.sweeper.reduction_factor={reduction_factor} must be >= 2 (each rung keeps about "
                          "1/reduction_factor of its trials)")
    out, budget = [], min_budget
    while budget < max_budget:
        out.append(budget)
        budget *= reduction_factor
    return out + [max_budget]


def sampler(name: str, seed: Optional[int], space: Dict[str, Any]) -> Any:
    """Optuna's sampler by name; `grid` walks every combination of a space of choices and ranges."""
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        grid = {}
        for key, d in space.items():
            if isinstance(d, optuna.distributions.CategoricalDistribution):
                grid[key] = list(d.choices)
            elif getattr(d, "step", None) is not None and not getattr(d, "log", False):
                grid[key] = [d.low + i * d.step for i in range(int(round((d.high - d.low) / d.step)) + 1)]
            else:
                raise ConfigError(f"hydra.sweeper.sampler.name=grid needs choices or ranges; {key} is an interval "
                                  "(use choice(...) or range(...), or sampler.name=tpe)")
        return optuna.samplers.GridSampler(grid, seed=seed)
    raise ConfigError(f"hydra.sweeper.sampler.name={name} is not one of {', '.join(SAMPLERS)}")


def pruner(name: str, budgets: List[int], reduction_factor: int) -> Any:
    """Optuna's pruner by name, its rungs at our budgets: successive halving (asynchronous, as Optuna's is) or
    Hyperband (several brackets of successive halving)."""
    import optuna

    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=budgets[0], reduction_factor=reduction_factor)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=budgets[0], max_resource=budgets[-1],
                                              reduction_factor=reduction_factor)
    raise ConfigError(f"hydra.sweeper.pruner={name} is not one of {', '.join(PRUNERS)}")


def storage_url(storage: Optional[str], sweep_dir: Path) -> str:
    """The study's database: a SQLAlchemy URL, by default SQLite in the sweep dir."""
    return storage or f"sqlite:///{Path(sweep_dir).resolve() / STUDY_FILE}"


def open_study(url: str, name: str, direction: str, settings: Dict[str, Any], sampler_: Any, pruner_: Any) -> Any:
    """Create the study, or reopen it to resume; a study begun with other settings (search space, budgets, goal) is
    refused in one line instead of being mixed with them."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its per-trial INFO lines: the sweeper says what happens
    try:
        storage = optuna.storages.RDBStorage(url, heartbeat_interval=None)
    except Exception as e:  # a URL SQLAlchemy cannot open (driver, host, path)
        raise ConfigError(f"hydra.sweeper.storage={url} cannot be opened: {str(e).splitlines()[0]}") from None
    study = optuna.create_study(storage=storage, study_name=name, direction=direction, sampler=sampler_,
                                pruner=pruner_, load_if_exists=True)
    recorded = study.user_attrs.get("settings")
    if recorded is None:
        study.set_user_attr("settings", settings)
    elif recorded != settings:
        changed = [k for k in SETTINGS if recorded.get(k) != settings.get(k)]
        raise ConfigError(f"the study {name!r} in {url} was begun with other {', '.join(changed)} "
                          f"({', '.join(f'{k}: {recorded.get(k)} -> {settings.get(k)}' for k in changed)}); resume it "
                          "with its own command, or start another with hydra.sweep.dir or hydra.sweeper.study_name")
    return study


def trial_folder(trial: Any) -> str:
    """The member folder of a trial (in the sweep dir): its number."""
    return str(trial.number)


# ------------------------------------------------------------------------------- a finished study, read back


def pruned_folders(study: Any, sweep_dir: Path) -> List[Path]:
    """The member folders of the trials that did not reach the full budget (pruned, failed), when some did: the
    comparison's settings are those of the complete trials, the others a table of their own."""
    if not any(t.state.name == "COMPLETE" for t in study.trials):
        return []
    return [Path(sweep_dir) / trial_folder(t) for t in study.trials if t.state.name in ("PRUNED", "FAIL")]


def find_study(sweep_dir: Path) -> Optional[Path]:
    """The study database of a sweep dir made by the Optuna sweeper, if any."""
    path = Path(sweep_dir) / STUDY_FILE
    return path if path.is_file() else None


def load(path: Path) -> Any:
    """The study in a sweep's database (its only one), opened read-only in spirit: nothing is written."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{Path(path).resolve()}"
    names = optuna.get_all_study_names(url)
    if not names:
        raise ConfigError(f"{path} holds no Optuna study")
    return optuna.load_study(study_name=names[0], storage=url)


def trials_table(study: Any) -> Any:
    """One row per trial: number, state, the budget it reached, its value there (the final value of a complete
    trial, the last rung's of a pruned one), its parameters; the best first, then the pruned, then the failed."""
    import pandas as pd
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False):
        budget = max(t.intermediate_values, default=None)
        value = t.value if t.state == TrialState.COMPLETE else t.intermediate_values.get(budget, math.nan) \
            if budget is not None else math.nan
        rows.append({"trial": t.number, "state": t.state.name.lower(), "budget": budget, "value": value,
                     **{k: t.params[k] for k in sorted(t.params)}})
    order = {"complete": 0, "pruned": 1, "running": 2, "waiting": 2, "fail": 3}
    sign = 1 if study.direction.name == "MINIMIZE" else -1
    rows.sort(key=lambda r: (order[r["state"]], -(r["budget"] or 0),
                             sign * r["value"] if math.isfinite(r["value"]) else math.inf, r["trial"]))
    return pd.DataFrame(rows)


STUDY_FIGURES = {  # file -> (the report's title, how to read it)
    "study_rungs.png": ("The study: each trial's value at each rung",
                        "Each trial's value at each rung it reached (Optuna's intermediate values): every trial "
                        "trains to the first rung, and only the best 1/reduction_factor of a rung goes on; a line "
                        "that stops early is a pruned trial."),
    "study_history.png": ("The study: optimisation history",
                          "The value of each trial that reached the full budget, in the order trials were asked, "
                          "and the best so far (Optuna's optimisation history). Pruned trials have no final value."),
    "study_importance.png": ("The study: parameter importances (first rung)",
                             "How much of the spread of the first rung's values each searched key explains "
                             "(Optuna's fANOVA parameter importances over every trial's first-rung value, the one "
                             "value all trials have): which keys the search should care about."),
}


def first_rung_study(study: Any) -> Any:
    """An in-memory copy of the study whose trials are complete at their first rung's value: the one value every
    trial that trained has, so parameter importances see the pruned trials too (Optuna's see complete ones only)."""
    import optuna

    copy = optuna.create_study(directions=study.directions)
    first = min((min(t.intermediate_values) for t in study.trials if t.intermediate_values), default=None)
    if first is not None:
        copy.add_trials([optuna.trial.create_trial(params=t.params, distributions=t.distributions,
                                                   value=t.intermediate_values[first])
                         for t in study.trials if first in t.intermediate_values])
    return copy


def draw(study: Any, out: Path) -> List[str]:
    """The study's figures (Optuna's own matplotlib plots, axes named in our units) into `out`, PNG and PDF;
    returns their file names."""
    import warnings

    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ov

    made = []
    settings = study.user_attrs.get("settings", {})
    metric, budget = settings.get("metric", "value"), settings.get("budget_key", "budget")
    labels = {"study_rungs.png": (budget, metric), "study_history.png": ("trial (in the order asked)", metric),
              "study_importance.png": (f"importance for the first rung's {metric}", None)}
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    by_rung = first_rung_study(study)
    plots = (("study_rungs.png", lambda: ov.plot_intermediate_values(study), any(t.intermediate_values
                                                                                for t in study.trials)),
             ("study_history.png", lambda: ov.plot_optimization_history(study), bool(complete)),
             ("study_importance.png", lambda: ov.plot_param_importances(by_rung), len(by_rung.trials) >= 2))
    for name, plot, drawable in plots:
        if not drawable:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
            ax = plot()
        fig = ax.figure
        x, y = labels[name]
        ax.set_xlabel(x)
        if y:
            ax.set_ylabel(y)
        legend = ax.get_legend()
        if legend is not None and (name == "study_importance.png" or len(study.trials) > 12):
            legend.remove()  # one entry per trial: beyond a dozen it hides the plot (study.csv names them)
        fig.set_size_inches(7.5, 4.2)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        fig.savefig((out / name).with_suffix(".pdf"))
        plt.close(fig)
        made.append(name)
    return made


def summary_lines(study: Any, metric: str) -> List[str]:
    """What the study did, and its best trial with its parameters."""
    table = trials_table(study)
    params = [c for c in table.columns if c not in ("trial", "state", "budget", "value")]
    counts = table["state"].value_counts()
    settings = study.user_attrs.get("settings", {})
    lines = [f"Study: {len(table)} trials: " + ", ".join(f"{n} {s}" for s, n in counts.items())
             + f"; rungs {', '.join(map(str, settings.get('rungs', [])))} of {settings.get('budget_key', 'the budget')}; "
             f"the value is {metric} ({study.direction.name.lower()}d); a trial's member folder is its number."]
    complete = table[table["state"] == "complete"]
    if len(complete):
        best = complete.iloc[0]
        lines.append(f"Best trial {best['trial']}: {metric} = {best['value']:.4g} at {best['budget']}; "
                     + ", ".join(f"{k} = {best[k]:.4g}" if isinstance(best[k], float) else f"{k} = {best[k]}"
                                 for k in params) + ".")
    return lines


def section(study: Any, metric: str) -> str:
    """The report's study section (HTML): the best trial and its parameters first, then every trial that reached
    the full budget, then the pruned ones with their last rung's value, then the failed ones with why."""
    import html

    table = trials_table(study)
    text = "".join(f"<p>{html.escape(line)}</p>" for line in summary_lines(study, metric))
    shown = table.rename(columns={"value": metric})
    for state, title in (("complete", "Trials that reached the full budget (best first)"),
                         ("pruned", "Pruned trials, with their last rung's value (best first)"),
                         ("fail", "Failed trials")):
        part = shown[shown["state"] == state].drop(columns="state")
        if state == "fail":
            part = part.assign(error=[next((t.user_attrs.get("error", "") for t in study.trials
                                            if t.number == n), "") for n in part["trial"]])
        if len(part):
            text += f"<h3>{html.escape(title)}</h3>" + part.to_html(index=False, border=0, float_format="{:.4g}".format)
    return text
