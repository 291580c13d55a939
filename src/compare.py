"""Compare runs offline: `python -m src.compare [<sweep or run dir> ...] [--out DIR] [--wandb]`.

Without a folder it compares the newest sweep under outputs/sweeps/ (as `python -m src.train -m` left it).

Finds every run under the given folders and writes into `<first dir>/compare/`:
- table.csv (every setting that differs, every final metric, full names) and table.md (short names, units);
- collapse.png, blur.png, rate_distortion.png, kl_per_dim.png: the two questions (where does the posterior
  collapse, how blurry do the samples get) against the swept keys;
- samples_montage.png, reconstructions_montage.png, traversals_montage.png: every run's grids side by side
  (same z, same inputs), enlarged pixel for pixel and captioned with the swept values;
- report.html: what was compared (fixed settings, swept keys), the table and every figure, each with a line on
  how to read it.
With --wandb the same table, figures and montages go to W&B as one summary run in the sweep's group.
"""
from __future__ import annotations

import argparse
import html
import logging
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from .naming import short_names, swept_keys  # noqa: E402
from .rundir import RunDir, read_summary  # noqa: E402
from .identity import RecordError, changes_results, flatten, recorded_config, result_overrides  # noqa: E402

log = logging.getLogger(__name__)

SPLIT = "test"  # the final numbers, on the official test split
METRICS = ["neg_elbo", "recon_nll", "kl", "iwae_nll", "bits_per_dim", "active_units", "kl_active_units",
           "collapsed_units", "mutual_info", "mutual_info_max", "mutual_info_capped", "mig", "sample_blur",
           "recon_blur", "data_blur", "sharpness_ratio", "mse"]
# the report's columns: metric -> (short name with its unit, format)
COLUMNS = {"neg_elbo": ("-ELBO (nats)", "{:.1f}"), "recon_nll": ("recon (nats)", "{:.1f}"),
           "kl": ("KL (nats)", "{:.2f}"), "iwae_nll": ("IWAE NLL (nats)", "{:.1f}"),
           "bits_per_dim": ("bits/dim", "{:.3f}"), "active_units": ("active dims", "{:.0f}"),
           "kl_active_units": ("KL > 0.1 dims", "{:.0f}"), "mutual_info": ("MI (nats)", "{:.2f}"),
           "sample_blur": ("sample blur (0-1)", "{:.3f}"), "recon_blur": ("recon blur (0-1)", "{:.3f}"),
           "mig": ("MIG (0-1)", "{:.3f}")}
HOW_TO_READ = {
    "collapse.png": "Left: latent dims still in use, out of latent_dim. 'active' counts dims whose posterior mean moves "
                    "with the image; 'KL > 0.1' counts dims that cost more than 0.1 nats. Where the lines fall, the "
                    "posterior collapses; they differ when a dim costs KL with a mean that never moves. Right: mutual "
                    "information I(x; z); a hollow point sits at the estimator's ceiling log N and means 'at least'.",
    "blur.png": "Blur of prior samples and of reconstructions, 0 = sharp, 1 = flat, on the same fixed z and inputs "
                "for every run. The dashed line is the real test images' own blur: the closer to it, the sharper. "
                "It measures blur, not whether the content is right: judge that from the montages.",
    "rate_distortion.png": "One point per run: further right spends more nats on the code (rate), lower "
                           "reconstructs better (distortion). Runs at KL near 0 have collapsed entirely.",
    "kl_per_dim.png": "One row per run, its latent dims sorted by KL (nats per image); dark cells carry no KL "
                      "(collapsed dims). The number right of each row counts dims above 0.1 nats.",
    "samples_montage.png": "Prior samples of every run from the same z, pixel for pixel: compare sharpness and "
                           "variety across the swept values.",
    "reconstructions_montage.png": "Each run's reconstructions of the same test images (input rows above "
                                   "reconstruction rows): where detail is lost, the code carries less.",
    "traversals_montage.png": "Each run walks its highest-KL dims one at a time (rows) from -3 to +3 (columns): "
                              "a row that does not change is a collapsed dim.",
}
DEFAULT_SWEEPS = "outputs/sweeps"  # where Hydra puts multiruns by default (conf/config.yaml)
MONTAGE_ROWS, MONTAGE_COLS = 4, 7  # the part of each run's grid a montage shows (7: a whole traversal row)
MONTAGE_WIDTH = 300  # px: each run's part is enlarged by the smallest whole factor that makes it at least this wide


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
        for marker in [*d.rglob(".hydra/config.yaml"), *d.rglob("summary.json")]:
            run = marker.parent.parent if marker.name == "config.yaml" else marker.parent
            if "compare" not in run.relative_to(d).parts and "wandb" not in run.parts:
                found.add(run)
    return sorted(found, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))])


def _overrides(run: Path) -> Dict[str, object]:
    """The overrides the run was launched with that can change results, typed as the config holds them."""
    path = run / ".hydra" / "overrides.yaml"
    items = OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else []
    return {k: o.value() for k, o in result_overrides(items).items()}


def _trained_with(run: Path) -> Dict[str, object]:
    try:
        return flatten(recorded_config(run) or {})
    except RecordError as e:  # one damaged member must not stop the comparison
        log.warning("%s", e)
        return {}


def _settings(run: Path) -> Dict[str, object]:
    """The run's settings as flat keys: what it was trained with (trained_with.yaml, never a .hydra/ that a
    later launch may have rewritten); for a run that failed before training, the overrides it was given."""
    trained = _trained_with(run)
    if trained:
        return {k: v for k, v in trained.items() if not k.startswith("hydra.") and changes_results(k)}
    return _overrides(run)


def read_run(run: Path) -> Dict[str, object]:
    """One run's settings, overrides, summary and grids; a run without summary.json is 'incomplete'."""
    summary = read_summary(RunDir(run)) or {"status": "incomplete"}
    return {"path": run, "settings": _settings(run), "overrides": _overrides(run), "summary": summary}


def runs_table(runs: List[Dict[str, object]], root: Path) -> pd.DataFrame:
    """One row per run: run, status, the settings that differ across runs (a lone run: its overrides), then
    the final metrics. attrs: "swept" (those keys) and "fixed" (every setting all runs share)."""
    keys = list(dict.fromkeys(k for r in runs for k in r["settings"]))
    if len(runs) > 1:
        # a run that failed before training has only its overrides: the keys it lacks are not swept by it
        swept = [k for k in keys if len({repr(r["settings"][k]) for r in runs if k in r["settings"]}) > 1]
        order = swept_keys(root)  # the sweep's own order (its first key goes on the plots' x axis)
        swept.sort(key=lambda k: order.index(k) if k in order else len(order))
    else:
        swept = sorted(runs[0]["overrides"])
    rows = []
    for r in runs:
        s = r["summary"]
        row = {"run": _relative(r["path"], root), "status": s.get("status", "incomplete")}
        row.update({k: _cell(r["settings"].get(k, r["overrides"].get(k))) for k in swept})
        row.update({f"{SPLIT}/{m}": s.get(f"{SPLIT}/{m}", np.nan) for m in METRICS})
        if "error" in s:
            row["error"] = s["error"]
        rows.append(row)
    table = pd.DataFrame(rows)
    table.attrs["swept"] = swept
    table.attrs["fixed"] = {k: next(r["settings"][k] for r in runs if k in r["settings"]) for k in keys if k not in swept}
    return table


def _cell(v):
    """A setting as a table cell: numbers as numbers, lists as their text."""
    return str(v) if isinstance(v, (list, tuple)) else v


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root)) or "."
    except ValueError:
        return str(path)


def _labels(table: pd.DataFrame, keys: Optional[List[str]] = None) -> List[str]:
    """Each run as `beta=4 latent_dim=16` over the swept keys (or `keys`); the run's folder when none."""
    keys = table.attrs["swept"] if keys is None else keys
    short = short_names(table.attrs["swept"])
    return [" ".join(f"{short[k]}={_fmt(row[k])}" for k in keys) or row["run"] for _, row in table.iterrows()]


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """The table a person reads: short column names with units, numbers rounded to what they can tell apart,
    an MI at its ceiling shown as '>= x', and only the columns some run has."""
    swept = table.attrs["swept"]
    out = pd.DataFrame({"run": table["run"]})
    for k, short in short_names(swept).items():
        out[short] = table[k].map(_fmt)
    if (table["status"] != "finished").any():
        out["status"] = table["status"]
    for metric, (name, fmt) in COLUMNS.items():
        values = table[f"{SPLIT}/{metric}"]
        if values.isna().all():
            continue
        cells = [("-" if pd.isna(v) else fmt.format(v)) for v in values]
        if metric == "mutual_info":
            capped = table[f"{SPLIT}/mutual_info_capped"].fillna(False).astype(bool)
            cells = [f">= {c}" if cap else c for c, cap in zip(cells, capped)]
        out[name] = cells
    return out


# ------------------------------------------------------------------------------------------- plots


def _x_axis(table: pd.DataFrame):
    """(x values, x label, series): the first swept key on x, one series per value of the other swept keys."""
    swept = table.attrs["swept"]
    if not swept:
        return np.arange(len(table)), "run", [("", table.index)]
    key, others = swept[0], swept[1:]
    x = table[key].to_numpy() if pd.api.types.is_numeric_dtype(table[key]) else np.arange(len(table))
    if not others:
        return x, short_names(swept)[key], [("", table.index)]
    names = pd.Series(_labels(table, others))
    series = [(name, list(idx)) for name, idx in names.groupby(names, sort=False).groups.items()]
    return x, short_names(swept)[key], series


def _style_x(ax, table: pd.DataFrame, x) -> None:
    key = table.attrs["swept"][0] if table.attrs["swept"] else None
    if key is None or not pd.api.types.is_numeric_dtype(table[key]):
        labels = table[key].map(_fmt) if key else table["run"]
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    elif (x > 0).all() and x.max() / x.min() >= 10:  # beta ladders and latent sizes read best on a log axis
        ax.set_xscale("log")
        ax.set_xticks(sorted(set(x)), [_fmt(v) for v in sorted(set(x))])
        ax.minorticks_off()
    ax.grid(alpha=0.3)


def plot_collapse(table: pd.DataFrame, path: Path) -> None:
    """Dims in use (two counts, integer axis from 0) and mutual information (its ceiling marked), per swept value."""
    done = table["status"].eq("finished").to_numpy()
    x, xlabel, series = _x_axis(table)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (name, idx) in enumerate(series):
        rows = [j for j in idx if done[j]]
        colour = f"C{i}"
        a.plot(x[rows], table.loc[rows, f"{SPLIT}/active_units"], "o-", color=colour,
               label=f"active {name}".strip())
        a.plot(x[rows], table.loc[rows, f"{SPLIT}/kl_active_units"], "s--", color=colour, alpha=0.7,
               label=f"KL > 0.1 {name}".strip())
        mi = table.loc[rows, f"{SPLIT}/mutual_info"]
        capped = table.loc[rows, f"{SPLIT}/mutual_info_capped"].fillna(False).astype(bool).to_numpy()
        b.plot(x[rows], mi, "-", color=colour, label=name or None)
        b.scatter(x[rows][~capped], mi[~capped], color=colour)
        b.scatter(x[rows][capped], mi[capped], facecolors="white", edgecolors=colour, zorder=3)
    latent = table.get("model.latent_dim", pd.Series([table.attrs["fixed"].get("model.latent_dim")]))
    top = max(float(pd.to_numeric(latent, errors="coerce").max() or 0), float(table[f"{SPLIT}/active_units"].max()))
    a.set_ylim(-0.3, top + 0.5)
    a.yaxis.set_major_locator(MaxNLocator(integer=True))
    a.set(xlabel=xlabel, ylabel="latent dims in use", title="Posterior collapse")
    ceiling = table[f"{SPLIT}/mutual_info_max"].max()
    if pd.notna(ceiling):
        b.axhline(ceiling, color="grey", ls=":", lw=1)
        b.annotate(f"ceiling log N = {ceiling:.2f}", (0.01, ceiling), xycoords=("axes fraction", "data"),
                   xytext=(0, -11), textcoords="offset points", fontsize=8, color="grey")
    top_mi = max(float(table[f"{SPLIT}/mutual_info"].max()), float(ceiling) if pd.notna(ceiling) else 0.0)
    b.set_ylim(0, 1.08 * top_mi if top_mi > 0 else 1)  # room above the ceiling for its hollow points
    b.set(xlabel=xlabel, ylabel="I(x; z) (nats)", title="Mutual information")
    for ax in (a, b):
        _style_x(ax, table, x)
    a.legend(fontsize=7)
    if len(series) > 1:
        b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_blur(table: pd.DataFrame, path: Path) -> None:
    """Sample and reconstruction blur per swept value, over the real images' own blur."""
    done = table["status"].eq("finished").to_numpy()
    x, xlabel, series = _x_axis(table)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, (name, idx) in enumerate(series):
        rows = [j for j in idx if done[j]]
        ax.plot(x[rows], table.loc[rows, f"{SPLIT}/sample_blur"], "o-", color=f"C{i}", label=f"samples {name}".strip())
        ax.plot(x[rows], table.loc[rows, f"{SPLIT}/recon_blur"], "s--", color=f"C{i}", alpha=0.7,
                label=f"reconstructions {name}".strip())
    data_blur = table[f"{SPLIT}/data_blur"].median()
    ax.axhline(data_blur, color="grey", ls=":", lw=1)
    ax.annotate(f"real images {data_blur:.3f}", (0.01, data_blur), xycoords=("axes fraction", "data"),
                xytext=(0, 4), textcoords="offset points", fontsize=8, color="grey")
    shown = pd.concat([table.loc[done, f"{SPLIT}/sample_blur"], table.loc[done, f"{SPLIT}/recon_blur"]])
    low, high = min(shown.min(), data_blur), max(shown.max(), data_blur)
    pad = max(0.02, 0.1 * (high - low))  # zoomed to the runs and the real images, so small steps show
    ax.set_ylim(max(0.0, low - pad), min(1.0, high + pad))
    ax.set(xlabel=xlabel, ylabel="blur (0 sharp, 1 flat)", title="Blur")
    _style_x(ax, table, x)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rate_distortion(table: pd.DataFrame, path: Path) -> None:
    """Rate (KL) against distortion (recon NLL), one labelled point per run (Alemi et al. 2018)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ok = table[f"{SPLIT}/kl"].notna()
    ax.scatter(table.loc[ok, f"{SPLIT}/kl"], table.loc[ok, f"{SPLIT}/recon_nll"])
    for label, (_, row) in zip(np.array(_labels(table))[ok.values], table[ok].iterrows()):
        ax.annotate(label, (row[f"{SPLIT}/kl"], row[f"{SPLIT}/recon_nll"]), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    ax.set(xlabel="rate: KL (nats per image)", ylabel="distortion: recon NLL (nats per image)",
           title=f"Rate-distortion ({SPLIT} split)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_kl_heatmap(runs: List[Dict[str, object]], labels: List[str], path: Path) -> None:
    """Per-dim KL (nats) of each run, dims sorted by KL within the run; blank where a run has fewer dims."""
    kls = [sorted(r["summary"].get(f"{SPLIT}/kl_per_dim") or [], reverse=True) for r in runs]
    width = max([len(k) for k in kls] + [1])
    grid = np.full((len(kls), width), np.nan)
    for i, k in enumerate(kls):
        grid[i, : len(k)] = k
    fig, ax = plt.subplots(figsize=(min(12, 3.5 + 0.25 * width), 1.2 + 0.35 * len(kls)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.annotate("> 0.1", (1.01, 1.01), xycoords="axes fraction", va="bottom", fontsize=7)  # the counts' header
    for i, k in enumerate(kls):
        ax.annotate(str(sum(v > 0.1 for v in k)), (1.01, i), xycoords=("axes fraction", "data"), va="center",
                    fontsize=8)
    ax.set(xlabel="latent dim, sorted by KL (0 = most)", title=f"KL per latent dim ({SPLIT}, nats per image)")
    fig.colorbar(im, ax=ax, label="nats", pad=0.06)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def montage(runs: List[Dict[str, object]], labels: List[str], name: str, path: Path, per_row: int = 3) -> bool:
    """The runs' `name` grids side by side: the first MONTAGE_ROWS x MONTAGE_COLS images of each, enlarged by
    one whole factor (nearest neighbour, so pixels stay pixels) and captioned with the run's swept values and
    any non-finished status; False if no run has one."""
    if not any((r["path"] / name).is_file() for r in runs):
        return False
    grids = []
    for r in runs:
        path_r = r["path"] / name
        img = Image.open(path_r).convert("RGB") if path_r.is_file() else None
        size = int(r["settings"].get("data.image_size") or 0)
        if img is not None and size:  # torchvision's grid: 2 px padding around (size)-px images
            img = img.crop((0, 0, min(img.width, 2 + MONTAGE_COLS * (size + 2)),
                            min(img.height, 2 + MONTAGE_ROWS * (size + 2))))
        grids.append(img)
    widest = max(g.width for g in grids if g is not None)
    scale = -(-MONTAGE_WIDTH // widest)  # ceil: 28-px images twice their size, 16-px ones three times
    font = ImageFont.load_default(size=14)
    tiles = []
    for g, r, label in zip(grids, runs, labels):
        g = g.resize((g.width * scale, g.height * scale), Image.NEAREST) if g is not None else \
            Image.new("RGB", (widest * scale, widest * scale // 2), "lightgrey")
        status = r["summary"].get("status", "incomplete")
        caption = label if status == "finished" else f"{label} [{status}]"
        tile = Image.new("RGB", (g.width, g.height + 22), "white")
        tile.paste(g, (0, 22))
        ImageDraw.Draw(tile).text((2, 3), caption, fill="black", font=font)
        tiles.append(tile)
    cell_w, cell_h = max(t.width for t in tiles) + 10, max(t.height for t in tiles) + 10
    cols = min(per_row, len(tiles))
    sheet = Image.new("RGB", (cols * cell_w, -(-len(tiles) // cols) * cell_h), "white")
    for i, t in enumerate(tiles):
        sheet.paste(t, ((i % cols) * cell_w, (i // cols) * cell_h))
    sheet.save(path)
    return True


# ------------------------------------------------------------------------------------------- report


def _fixed_lines(fixed: Dict[str, object], runs: List[Dict[str, object]]) -> List[str]:
    """The settings every run shares that a reader needs to know what was compared, one line per part."""
    def has(*keys):
        return all(k in fixed for k in keys)

    summary = next((r["summary"] for r in runs if r["summary"].get("status") == "finished"), {})
    lines = []
    if has("data.name", "data.image_size", "data.channels"):
        size = fixed["data.image_size"]
        sizes = "/".join(f"{summary[f'data/{s}_size']:,}" for s in ("train", "val", "test") if f"data/{s}_size" in summary)
        lines.append(f"data: {fixed['data.name']}, {size}x{size}x{fixed['data.channels']}"
                     + (f", train/val/test {sizes} images" if sizes else ""))
    if has("model.name"):
        latent = f", latent_dim {fixed['model.latent_dim']}" if has("model.latent_dim") else ""
        widths = f" {_fmt(fixed['model.hidden_channels'])}" if has("model.hidden_channels") else ""
        lines.append(f"model: {fixed['model.name']}{widths}{latent}")
    if has("loss.likelihood"):
        like = fixed["loss.likelihood"]
        sigma = f" (sigma {fixed['loss.sigma']:g})" if like == "gaussian" and has("loss.sigma") else ""
        lines.append(f"likelihood: {like}{sigma}")
    objective = [f"{name} {_fmt(fixed[k])}" for k, name in (("loss.beta", "beta"), ("loss.kl_schedule", "KL schedule"),
                                                            ("loss.free_bits", "free bits")) if k in fixed]
    if objective:
        lines.append("objective: " + ", ".join(objective))
    budget = [f"{name} {_fmt(fixed[k])}" for k, name in (("trainer.max_epochs", "max_epochs"), ("trainer.max_steps",
              "max_steps"), ("data.batch_size", "batch")) if fixed.get(k) is not None]
    steps = sorted({r["summary"]["step"] for r in runs if r["summary"].get("status") == "finished"})
    if steps:
        budget.append(f"trained {steps[0]:,} steps" if len(steps) == 1 else f"trained {steps[0]:,} to {steps[-1]:,} steps")
    if budget:
        lines.append("budget: " + ", ".join(budget))
    if has("optimizer.name", "optimizer.lr"):
        scheduler = fixed.get("optimizer.scheduler")
        lines.append(f"optimizer: {fixed['optimizer.name']} lr {fixed['optimizer.lr']:g}"
                     + (f", {scheduler} schedule" if scheduler not in (None, "none") else ""))
    if has("seed"):
        lines.append(f"seed: {fixed['seed']}")
    return lines


def header_lines(table: pd.DataFrame, runs: List[Dict[str, object]]) -> List[str]:
    """What was compared, in plain lines: the swept keys and their values, then the fixed settings that
    matter (data, model, likelihood, objective, budget, optimizer, seed) and the metrics' units."""
    swept = table.attrs["swept"]
    finished = int(table["status"].eq("finished").sum())
    lines = [f"{len(table)} runs ({finished} finished). Swept: " + ("; ".join(
        f"{k} = {', '.join(dict.fromkeys(table[k].map(_fmt)))}" for k in swept) or "nothing (one run)") + "."]
    lines += _fixed_lines(table.attrs["fixed"], runs)
    blur, mi_max = table[f"{SPLIT}/data_blur"].median(), table[f"{SPLIT}/mutual_info_max"].max()
    if pd.notna(blur):
        lines.append(f"metrics: final, on the {SPLIT} split; NLLs and KL in nats per image; blur 0 (sharp) to 1 "
                     f"(flat), the real {SPLIT} images' own is {blur:.3f}; MI cannot exceed log N = {mi_max:.2f}.")
    return lines


PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title><style>
body {{ font-family: sans-serif; margin: 16px 24px; max-width: 1232px; color: #222; }}
h1 {{ font-size: 22px; margin: 0 0 8px; }} h2 {{ font-size: 17px; margin: 22px 0 6px; }}
.what p {{ margin: 2px 0; font-size: 14px; }}
table {{ border-collapse: collapse; font-size: 12.5px; }}
th {{ font-weight: 600; vertical-align: bottom; max-width: 78px; white-space: normal; }}
td, th {{ padding: 3px 6px; border-bottom: 1px solid #ddd; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
figure {{ margin: 14px 0; }} figure img {{ max-width: 100%; }} img.pixels {{ image-rendering: pixelated; }}
figcaption {{ font-size: 13px; color: #444; max-width: 900px; }} details {{ font-size: 13px; }}
</style></head><body>
<h1>{title}</h1>
<div class="what">{what}</div>
<h2>Final metrics</h2>
{table}
{figures}
<h2>Every setting the runs share</h2>
<details><summary>{n_fixed} settings</summary>{fixed}</details>
</body></html>
"""


def write_report(table: pd.DataFrame, runs: List[Dict[str, object]], figures: List[str], out: Path,
                 sources: List[Path]) -> None:
    """report.html: the header, the short table, every figure with its how-to-read line; readable offline."""
    what = "".join(f"<p>{html.escape(line)}</p>" for line in table.attrs["header"])
    what += f"<p>Runs from {html.escape(', '.join(map(str, sources)))}.</p>"
    figs = "\n".join(
        f'<h2>{html.escape(f.removesuffix(".png").replace("_", " ").capitalize())}</h2><figure>'
        f'<img src="{html.escape(f)}"{" class=pixels" if "montage" in f else ""} alt="{html.escape(f)}">'
        f"<figcaption>{html.escape(HOW_TO_READ[f])}</figcaption></figure>" for f in figures)
    fixed = pd.DataFrame({"setting": list(table.attrs["fixed"]), "value": [_fmt(v) for v in table.attrs["fixed"].values()]})
    (out / "report.html").write_text(PAGE.format(
        title="VAE sweep comparison", what=what, table=display_table(table).to_html(index=False, border=0),
        figures=figs, n_fixed=len(fixed), fixed=fixed.to_html(index=False, border=0)))


def compare(dirs: List[Path], out: Optional[Path] = None, wandb: bool = False) -> pd.DataFrame:
    """Build the table, plots, montages and report for the runs under `dirs`; returns the table."""
    paths = find_runs(dirs)
    if not paths:
        raise CompareError(f"no runs under {', '.join(map(str, dirs))}: a run folder holds .hydra/config.yaml "
                           "or summary.json (point at outputs/sweeps/<date>/<time> or a run folder)")
    out = out or dirs[0] / "compare"
    out.mkdir(parents=True, exist_ok=True)
    runs = [read_run(p) for p in paths]
    table = runs_table(runs, dirs[0])
    labels = _labels(table)
    table.to_csv(out / "table.csv", index=False)
    shown = display_table(table)
    table.attrs["header"] = header_lines(table, runs)
    (out / "table.md").write_text("\n\n".join(table.attrs["header"]) + "\n\n" + shown.to_markdown(index=False) + "\n")
    figures = []
    if table["status"].eq("finished").any():
        plot_collapse(table, out / "collapse.png")
        plot_blur(table, out / "blur.png")
        plot_rate_distortion(table, out / "rate_distortion.png")
        plot_kl_heatmap(runs, labels, out / "kl_per_dim.png")
        figures += ["collapse.png", "blur.png", "rate_distortion.png", "kl_per_dim.png"]
    for grid in ("samples", "reconstructions", "traversals"):
        if montage(runs, labels, f"{grid}.png", out / f"{grid}_montage.png"):
            figures.append(f"{grid}_montage.png")
    write_report(table, runs, figures, out, dirs)
    log.info("Compared %d runs (%d finished) -> %s", len(table), int((table["status"] == "finished").sum()), out)
    if wandb:
        log_to_wandb(table, runs, figures, out, dirs[0])
    return table


def log_to_wandb(table: pd.DataFrame, runs: List[Dict[str, object]], figures: List[str], out: Path,
                 sweep: Path) -> None:
    """One W&B run (job type "compare") in the sweep's group: the table, every figure with its how-to-read
    caption, and the header as its notes. Online or offline like the training runs (same project and group)."""
    import wandb as wb

    from .config import LoggerConfig
    from .loggers import start_wandb
    from .naming import group_name

    logger = {k.split(".", 1)[1]: v for k, v in _trained_with(runs[0]["path"]).items() if k.startswith("logger.")}
    cfg = LoggerConfig(project=logger.get("project") or "vae-sweeps", entity=logger.get("entity"),
                       mode=logger.get("mode") or "auto", init_timeout=float(logger.get("init_timeout") or 30))
    group = logger.get("group") or group_name(sweep)
    run = start_wandb(cfg, out, {"swept": table.attrs["swept"], "runs": len(table), **table.attrs["fixed"]},
                      name=f"compare {group}", group=group, job_type="compare")
    if run is None:
        return
    run.notes = "\n".join(table.attrs["header"])
    run.log({"compare/table": wb.Table(dataframe=display_table(table).astype(str)),
             **{f"compare/{f.removesuffix('.png')}": wb.Image(str(out / f), caption=HOW_TO_READ[f]) for f in figures}})
    run.summary.update({"runs": len(table), "finished": int(table["status"].eq("finished").sum())})
    run.finish()
    log.info("Logged the comparison to W&B group %r (%s)", group, out / "wandb")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="*", type=Path,
                        help="sweep or run folders, searched recursively (default: the newest sweep under "
                             f"{DEFAULT_SWEEPS}/)")
    parser.add_argument("--out", type=Path, help="output folder (default: <first dir>/compare)")
    parser.add_argument("--wandb", action="store_true",
                        help="also log the comparison to W&B as one run in the sweep's group (offline without a key)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if not args.dirs:
            args.dirs = [newest_sweep(Path(DEFAULT_SWEEPS))]
            log.info("Comparing the newest sweep, %s", args.dirs[0])
        table = compare(args.dirs, args.out, wandb=args.wandb)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(table.attrs["header"]))
    print(display_table(table).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
