"""Compare runs offline: `python -m src.compare [<sweep or run dir> ...] [--out DIR] [--wandb]`.

Without a folder it compares the newest sweep under outputs/sweeps/ (as `python -m src.train -m` left it).

Finds every run under the given folders and writes into `<first dir>/compare/`:
- table.csv (one row per run: every setting that differs, its seed, every final metric, full names) and
  table.md (one row per setting, short names, units; seeds pooled as mean ± sd with n);
- settings.csv and settings.tex: one row per setting, each metric's mean and sample sd over seeds (units in the
  CSV's headers; a booktabs LaTeX table with caption and label, its metric columns chosen with --columns);
- collapse.png, blur.png, rate_distortion.png, kl_per_dim.png: the two questions (where does the posterior
  collapse, how blurry do the samples get) against the swept keys, means over seeds with error bars;
- learning_curves.png, kl_over_training.png: every run's validation curves, and each setting's per-dim KL over
  training (when does each dim die?);
- samples_montage.png, reconstructions_montage.png, traversals_montage.png: every run's grids side by side
  (same z, same inputs), enlarged pixel for pixel and captioned with the swept values;
- report.html: what was compared (fixed settings, swept keys), the table and every figure, each with a line on
  how to read it.
A study of `hydra/sweeper=optuna_halving` (a sweep dir with study.db) is compared as its complete trials, with
study.csv (every trial: state, the budget it reached, its value there, its parameters) and, first in the report,
the best trial and its parameters, the pruned trials apart with their last rung's value, and Optuna's plots
(study_rungs.png, study_history.png, study_importance.png).
The collecting is comparison.py, the drawing report.py. With --wandb the same table, figures and montages go to W&B as one summary run in the sweep's group.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import List, Optional

from . import study as studies
from .comparison import Comparison, CompareError, collect, newest_sweep
from .report import COLUMNS, PAPER_COLUMNS, ColumnError, display_table, header_lines, how_to_read, render

log = logging.getLogger(__name__)

DEFAULT_SWEEPS = "outputs/sweeps"  # where Hydra puts multiruns by default (conf/config.yaml)

def compare(dirs: List[Path], out: Optional[Path] = None, wandb: bool = False,
            paper: Optional[List[str]] = None) -> Comparison:
    """Collect the runs under `dirs`, draw the table, plots, montages and report into `out` (default
    <first dir>/compare; `paper`: settings.tex's metric columns), and with `wandb` log them as one W&B run; returns
    the comparison."""
    path = studies.find_study(dirs[0])
    study = studies.load(path) if path is not None else None
    c = collect(dirs, studies.pruned_folders(study, dirs[0]) if study is not None else ())
    out = out or dirs[0] / "compare"
    figures = render_whole(c, out, dirs, paper, study)
    log.info("Compared %d runs (%d finished) -> %s", len(c.table), c.finished(), out)
    if wandb:
        log_to_wandb(c, figures, out, dirs[0])
    return c


def render_whole(c: Comparison, out: Path, dirs: List[Path], paper: Optional[List[str]] = None,
                 study: Optional[object] = None) -> List[str]:
    """render() into a folder beside `out`, then each file moved into `out` (os.replace: whole or not at all): a
    comparison stopped while drawing (Ctrl-C, a full disk) leaves the previous one as it was. Nothing else in
    `out` is touched (its wandb/, a user's own files)."""
    out.mkdir(parents=True, exist_ok=True)
    new = out.with_name(f".{out.name}.new-{os.getpid()}")
    try:
        figures = render(c, new, dirs, paper, study)
        for made in sorted(new.iterdir()):
            os.replace(made, out / made.name)
    finally:
        shutil.rmtree(new, ignore_errors=True)
    return figures


def log_to_wandb(c: Comparison, figures: List[str], out: Path, sweep: Path) -> None:
    """One W&B run (job type "compare") in the sweep's group: the per-run and per-setting tables (typed: numbers
    as numbers), every figure with its how-to-read caption, and the header as its notes. Online or offline like the training runs (same project and group)."""
    import wandb as wb

    from .config import LoggerConfig
    from .loggers import start_wandb
    from .naming import group_name

    logger = {k.split(".", 1)[1]: v for k, v in c.runs[0]["recorded"].items() if k.startswith("logger.")}
    cfg = LoggerConfig(project=logger.get("project") or "vae-sweeps", entity=logger.get("entity"),
                       mode=logger.get("mode") or "auto", init_timeout=float(logger.get("init_timeout") or 30))
    group = logger.get("group") or group_name(sweep)
    run = start_wandb(cfg, out, {"swept": c.swept, "runs": len(c.table), **c.fixed},
                      name=f"compare {group}", group=group, job_type="compare")
    if run is None:
        return
    run.notes = "\n".join(header_lines(c))
    run.log({"compare/runs": wb.Table(dataframe=_typed(c.table)), "compare/settings": wb.Table(dataframe=_typed(c.stats())),
             **{f"compare/{f.removesuffix('.png')}": wb.Image(str(out / f), caption=how_to_read(f)) for f in figures}})
    run.summary.update({"runs": len(c.table), "finished": c.finished()})
    run.finish()
    log.info("Logged the comparison to W&B group %r (%s)", group, out / "wandb")


def _typed(frame):
    """A table for W&B with its numbers as numbers: only text-like columns (lists, mixed) become strings."""
    frame = frame.copy()
    for column in frame.columns:
        if frame[column].dtype == object:
            frame[column] = frame[column].map(lambda v: v if isinstance(v, (int, float, bool)) else str(v))
    return frame


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="*", type=Path,
                        help="sweep or run folders, searched recursively (default: the newest sweep under "
                             f"{DEFAULT_SWEEPS}/)")
    parser.add_argument("--out", type=Path, help="output folder (default: <first dir>/compare)")
    parser.add_argument("--columns", type=lambda text: [m.strip() for m in text.split(",") if m.strip()],
                        help="settings.tex's metric columns, in order, e.g. neg_elbo,kl,kl_active_units,mutual_info "
                             f"(default: {','.join(PAPER_COLUMNS)}; choose from {', '.join(COLUMNS)})")
    parser.add_argument("--wandb", action="store_true",
                        help="also log the comparison to W&B as one run in the sweep's group (offline without a key)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if not args.dirs:
            args.dirs = [newest_sweep(Path(DEFAULT_SWEEPS))]
            log.info("Comparing the newest sweep, %s", args.dirs[0])
        c = compare(args.dirs, args.out, wandb=args.wandb, paper=args.columns)
    except (CompareError, ColumnError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("Interrupted: the comparison was not written (the previous one, if any, is as it was); run the same "
              "command again", file=sys.stderr)
        return 130
    path = studies.find_study(args.dirs[0])
    if path is not None:
        study = studies.load(path)
        print("\n".join(studies.summary_lines(study, study.user_attrs.get("settings", {}).get("metric", "value"))))
    print("\n".join(header_lines(c)))
    print(display_table(c).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
