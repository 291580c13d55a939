"""Collecting a comparison: find the runs under some folders, read what each was trained with (identity.py's
record) and its summary, and build a `Comparison`: one row per run with the settings that differ and the final
metrics, plus the runs, the swept keys and every setting all runs share. Drawing it is report.py's job.

Seeds are replicates, not settings: runs that differ only in `seed` are one setting, summarised by its mean,
standard deviation and n (`Comparison.stats()`); the per-run table keeps one row per seed."""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from .identity import DEFAULTS, RecordError, changes_results, flatten, recorded_config, result_overrides
from .naming import short_names, swept_keys
from .rundir import RunDir, read_summary

log = logging.getLogger(__name__)

SPLIT = "test"  # the final numbers, on the official test split
STILL_FALLING = 0.01  # a run whose val -ELBO fell by more than this share over its last quarter has not converged
SEED = "seed"  # the key whose values are replicates of one setting
COLLAPSE_NATS = DEFAULTS["eval.collapse_nats"]  # of a run recorded before the key existed: its default
# what a likelihood's NLL is, by kind; NLLs of two kinds do not compare. A Bernoulli NLL is the probability of an
# image only where the pixels are 0 or 1: binarised (data.binarize) or binary by construction (shapes' sprites)
KINDS = {
    "discrete": "bernoulli on binary pixels: the probability of the binary image, NLL >= 0 nats",
    "cross-entropy": "bernoulli on grey levels (data.binarize=none): a binary cross-entropy against pixel values in "
                     "[0, 1], the probability of no image, so not comparable with likelihoods on binarised data "
                     "(data.binarize=dynamic makes it one)",
    "density": "a density over pixel values in [0, 1]: its NLL can have either sign",
}
BINARY_SOURCES = {"shapes"}  # sources whose pixels are 0 or 255 as decoded
METRICS = ["neg_elbo", "recon_nll", "kl", "iwae_nll", "bits_per_dim", "active_units", "kl_active_units",
           "collapsed_units", "mutual_info", "mutual_info_max", "mutual_info_capped", "mig", "sample_blur",
           "recon_blur", "data_blur", "sharpness_ratio", "mse", "mse_mean_image", "sigma", "judge_fd", "recon_accuracy",
           "judge_accuracy", "iwae_k", "iwae_images", "mutual_info_se", "mig_se", "judge_kid", "judge_kid_sd",
           "judge_precision", "judge_recall", "judge_density", "judge_coverage", "judge_chance", "marginal_kl",
           "marginal_kl_se", "prior_hole_share", "prior_hole_floor", "gmm_components", "gmm_judge_fd", "gmm_judge_kid",
           "gmm_judge_precision", "gmm_judge_recall", "gmm_judge_density", "gmm_judge_coverage"]


@dataclass
class Comparison:
    """Runs side by side. `table`: one row per run (run, status, the swept settings, `seed` when seeds differ,
    `test/<metric>` for every metric, error); `runs`: each run's path, settings, overrides and summary, in the
    table's order; `swept`: the keys whose values differ, seed aside (the sweep's own order); `fixed`: every
    setting all runs share; `seeds`: whether runs differ in seed; `collapse_nats`: the KL threshold of a collapsed
    dim, the one behind `test/kl_active_units` of every row and the KL heatmap's counts."""
    table: pd.DataFrame
    runs: List[Dict[str, object]]
    swept: List[str]
    fixed: Dict[str, object]
    seeds: bool = False
    collapse_nats: float = COLLAPSE_NATS
    split: str = SPLIT  # the final numbers' split: test, or val where no run has a test eval (eval.final=none)

    def labels(self, keys: Optional[List[str]] = None, seed: bool = False) -> List[str]:
        """Each run as `beta=4 latent_dim=16` over the swept keys (or `keys`), `seed=1` added when asked and seeds
        differ; the run's folder when there is nothing to say."""
        keys = self.swept if keys is None else keys
        short = short_names(self.swept)
        out = []
        for _, row in self.table.iterrows():
            parts = [f"{short[k]}={fmt(row[k])}" for k in keys] + ([f"seed={row[SEED]}"] if seed and self.seeds else [])
            out.append(" ".join(parts) or row["run"])
        return out

    def settings(self) -> List[List[int]]:
        """The runs of each setting (row indices; its seeds), in the table's order."""
        if not self.swept:
            return [list(self.table.index)]
        keys = self.table[self.swept].map(repr).apply(tuple, axis=1)  # one hashable key per run
        return [list(idx) for idx in keys.groupby(keys, sort=False).groups.values()]

    def stats(self) -> pd.DataFrame:
        """One row per setting over its finished runs: the swept settings, n (finished seeds), and for every metric
        its mean (`test/<metric>`) and sample standard deviation (`test/<metric> sd`, empty when n = 1)."""
        rows = []
        for idx in self.settings():
            group = self.table.loc[idx]
            done = group[group["status"].eq("finished")]
            row = {k: group[k].iloc[0] for k in self.swept}
            row["n"] = len(done)
            for m in METRICS:
                values = pd.to_numeric(done[f"{self.split}/{m}"], errors="coerce").dropna()
                row[f"{self.split}/{m}"] = values.mean() if len(values) else np.nan
                row[f"{self.split}/{m} sd"] = values.std(ddof=1) if len(values) > 1 else np.nan
            rows.append(row)
        return pd.DataFrame(rows)

    def setting(self, run: Dict[str, object], key: str) -> object:
        """`key` as `run` was trained with: its own setting, the one all runs share, or (a run of a release
        before the key) the key's default."""
        return run["settings"].get(key, self.fixed.get(key, DEFAULTS[key]))

    def kinds(self) -> List[str]:
        """Each run's kind of likelihood (a key of KINDS): "discrete" (bernoulli on binary pixels),
        "cross-entropy" (bernoulli on grey levels) or "density" (the others)."""
        return [likelihood_kind(*(str(self.setting(r, k)) for k in ("loss.likelihood", "data.binarize", "data.name")))
                for r in self.runs]

    def still_falling(self) -> List[int]:
        """The finished runs whose validation -ELBO still fell by more than STILL_FALLING of its final value over
        the last quarter of training: not converged, so their numbers are not final ones."""
        if "val/drop_last_quarter" not in self.table:
            return []
        drop, final = self.table["val/drop_last_quarter"], self.table["val/neg_elbo_final"]  # (set together)
        return [int(i) for i in self.table.index[drop > STILL_FALLING * final.abs().clip(lower=1.0).fillna(1.0)]]

    def finished(self) -> int:
        return int(self.table["status"].eq("finished").sum())


def likelihood_kind(likelihood: str, binarize: str = "none", data: str = "") -> str:
    if likelihood != "bernoulli":
        return "density"
    return "discrete" if binarize != "none" or data in BINARY_SOURCES else "cross-entropy"


def fmt(v) -> str:
    """A setting as text: floats in their shortest form."""
    return f"{v:g}" if isinstance(v, float) else str(v)


class CompareError(RuntimeError):
    """Nothing to compare; the message names the folder."""


def newest_sweep(root: Path) -> Path:
    """The most recently started multirun under `root` (Hydra writes multirun.yaml into each sweep folder)."""
    sweeps = list(root.glob("**/multirun.yaml")) if root.is_dir() else []
    if not sweeps:
        raise CompareError(f"no sweep under {root}/ (run from the folder you trained in, or name a sweep or run "
                           "folder: python -m src.compare outputs/sweeps/<date>/<time>)")
    return max(sweeps, key=lambda p: p.stat().st_mtime).parent


def find_runs(dirs: List[Path]) -> List[Path]:
    """Folders holding a Hydra run (.hydra/config.yaml) or a summary.json, in natural order."""
    found = set()
    for d in dirs:
        if not d.is_dir():
            raise CompareError(f"{d} is not a folder; give a sweep or run folder (e.g. outputs/sweeps/<date>/<time>)")
        for marker in [*d.glob("**/.hydra"), *d.rglob(RunDir(d).summary.name)]:
            run = marker.parent
            if "compare" not in run.relative_to(d).parts and "wandb" not in run.parts:
                found.add(run)
    return sorted(found, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))])


def _overrides(run: Path) -> Dict[str, object]:
    """The overrides the run was launched with that can change results, typed as the config holds them."""
    path = RunDir(run).hydra / "overrides.yaml"
    items = OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else []
    return {k: o.value() for k, o in result_overrides(items).items()}


def _trained_with(run: Path) -> Dict[str, object]:
    try:
        return flatten(recorded_config(run) or {})
    except RecordError as e:  # one damaged member must not stop the comparison
        log.warning("%s", e)
        return {}


def _settings(run: Path, recorded: Dict[str, object]) -> Dict[str, object]:
    """The run's settings that can change results, as flat keys: what it was trained with (its record, never a
    .hydra/ that a later launch may have rewritten); for a run that failed before training, its overrides."""
    if recorded:
        return {k: v for k, v in recorded.items() if not k.startswith("hydra.") and changes_results(k)}
    return _overrides(run)


def metric_rows(run: Path, prefix: str) -> pd.DataFrame:
    """The run's metrics.jsonl rows that have `prefix/...` keys, as a frame (empty when there are none)."""
    path = run / "metrics.jsonl"
    rows = []
    if path.is_file():
        text = path.read_bytes().decode("utf-8", errors="replace")  # a damaged file: its readable rows still count
        if "\ufffd" in text:
            log.warning("%s is not all UTF-8: its damaged lines are left out", path)
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and any(k.startswith(prefix + "/") for k in row):
                rows.append(row)
    return pd.DataFrame(rows)


def last_quarter_drop(run: Path, step: object) -> float:
    """How far validation -ELBO fell (nats per image) over the last quarter of a run's steps: from the eval at or
    before 3/4 of its final step to its last; NaN where fewer than two evals tell."""
    frame = metric_rows(run, "val")
    if frame.empty or "val/neg_elbo" not in frame or not isinstance(step, int):
        return np.nan
    evals = frame.dropna(subset=["val/neg_elbo"]).sort_values("step")
    before = evals[evals["step"] <= 0.75 * step]
    if before.empty or len(evals) < 2:
        return np.nan
    return float(before["val/neg_elbo"].iloc[-1] - evals["val/neg_elbo"].iloc[-1])


def careful_eval(run: Path, summary: Dict[str, object]) -> Optional[Tuple[Path, Dict[str, object]]]:
    """The run's careful test numbers: the `src.evaluate` file (eval_test_k<k>.json) of the largest k whose IWAE
    covered the whole split, else of the largest k, made from the checkpoint the run ended on (its step is the
    summary's: an evaluation of an earlier checkpoint or of best.pt is not this run's final result); None where
    there is none; else (its path, its numbers)."""
    found = []
    for path in run.glob("eval_test_k*.json"):
        try:
            ev = json.loads(path.read_text())
        except (OSError, ValueError) as e:  # one damaged file must not stop the comparison
            log.warning("%s is unreadable (%s); its numbers are left out", path, str(e).splitlines()[0][:100])
            continue
        if not isinstance(ev, dict) or ev.get("step") != summary.get("step") or "test/neg_elbo" not in ev:
            log.info("%s is not of the run's final checkpoint (step %s, the run's %s); left out", path,
                     ev.get("step") if isinstance(ev, dict) else "?", summary.get("step"))
            continue
        whole = ev.get("test/iwae_images") == ev.get("data/test_size")
        found.append(((whole, ev.get("test/iwae_k") or 0), path, ev))
    return max(found, key=lambda f: f[0])[1:] if found else None


def read_run(run: Path) -> Dict[str, object]:
    """One run's record (flat keys), settings, overrides and summary; a run without summary.json is
    'incomplete'. The test numbers of a finished run's careful evaluation (careful_eval) replace its summary's;
    `evaluated` names that file."""
    summary = read_summary(RunDir(run)) or {"status": "incomplete"}
    recorded = _trained_with(run)
    careful = careful_eval(run, summary) if summary.get("status") == "finished" else None
    if careful is not None:
        summary = {**summary, **{k: v for k, v in careful[1].items() if k.startswith(f"{SPLIT}/")}}
    return {"path": run, "recorded": recorded, "settings": _settings(run, recorded), "overrides": _overrides(run),
            "summary": summary, "evaluated": careful[0].name if careful else None}


def collect(dirs: List[Path], leave_out: Sequence[Path] = ()) -> Comparison:
    """The runs under `dirs` (sweep or run folders, searched recursively), but those in `leave_out` (a study's
    pruned trials), compared; the first folder is the root their names are relative to and whose multirun.yaml
    orders the swept keys."""
    gone = {Path(p).resolve() for p in leave_out}
    paths = [p for p in find_runs(dirs) if p.resolve() not in gone]
    if not paths:
        raise CompareError(f"no runs under {', '.join(map(str, dirs))}: a run folder holds .hydra/config.yaml "
                           "or summary.json (point at outputs/sweeps/<date>/<time> or a run folder)")
    runs, root = [read_run(p) for p in paths], dirs[0]
    keys = list(dict.fromkeys(k for r in runs for k in r["settings"]))
    if len(runs) > 1:
        # a run that failed before training has only its overrides: the keys it lacks are not swept by it
        swept = [k for k in keys if len({repr(r["settings"][k]) for r in runs if k in r["settings"]}) > 1]
        order = swept_keys(root)  # the sweep's own order (its first key goes on the plots' x axis)
        swept.sort(key=lambda k: order.index(k) if k in order else len(order))
    else:
        swept = sorted(runs[0]["overrides"])
    seeds = SEED in swept
    swept = [k for k in swept if k != SEED]
    split = SPLIT if any(f"{SPLIT}/neg_elbo" in r["summary"] for r in runs) else "val"
    nats = collapse_threshold(runs)
    rows = []
    for r in runs:
        s = r["summary"]
        row = {"run": _relative(r["path"], root), "status": s.get("status", "incomplete")}
        row.update({k: _cell(r["settings"].get(k, r["overrides"].get(k))) for k in swept + [SEED] * seeds})
        row.update({f"{split}/{m}": s.get(f"{split}/{m}", np.nan) for m in METRICS})
        if s.get(f"{split}/kl_per_dim"):  # one threshold for every run: the count the heatmap shows
            row[f"{split}/kl_active_units"] = int(sum(kl > nats for kl in s[f"{split}/kl_per_dim"]))
        if row["status"] == "finished":
            row["val/drop_last_quarter"] = last_quarter_drop(r["path"], s.get("step"))
            row["val/neg_elbo_final"] = s.get("val/neg_elbo", np.nan)
        row["numbers"] = f"src.evaluate ({r['evaluated']})" if r["evaluated"] else "training's final eval"
        if "error" in s:
            row["error"] = s["error"]
        rows.append(row)
    fixed = {k: next(r["settings"][k] for r in runs if k in r["settings"]) for k in keys
             if k not in swept and k != SEED}
    return Comparison(pd.DataFrame(rows), runs, swept, fixed, seeds, nats, split)


def collapse_threshold(runs: List[Dict[str, object]]) -> float:
    """The runs' eval.collapse_nats (a run recorded before the key: 0.1); where runs differ, the first one's, said."""
    values = list(dict.fromkeys(float(r["recorded"].get("eval.collapse_nats", COLLAPSE_NATS)) for r in runs
                                if r["recorded"]))
    if len(values) > 1:
        log.warning("runs differ in eval.collapse_nats (%s); every count here uses %g nats", values, values[0])
    return values[0] if values else COLLAPSE_NATS


def _cell(v):
    """A setting as a table cell: numbers as numbers, lists as their text."""
    return str(v) if isinstance(v, (list, tuple)) else v


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root)) or "."
    except ValueError:
        return str(path)
