"""Compare runs offline: `python -m src.compare <sweep or run dir> [...] [--out DIR] [--wandb]`.

Finds every run under the given folders, reads its overrides and summary into a pandas table (one row per
run, the swept keys, then the final metrics), and writes into `<first dir>/compare/`: table.csv, table.md,
a rate-distortion plot, active units and sharpness against the swept key, a per-dim KL heatmap, montages of
the runs' sample and reconstruction grids (same z, same inputs), and report.html showing all of it.
"""
from __future__ import annotations

import argparse
import html
import json
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
from omegaconf import OmegaConf  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from .rundir import IGNORED, TRAINED_WITH, flatten  # noqa: E402

log = logging.getLogger(__name__)

SPLIT = "test"  # the final numbers, on the official test split
METRICS = ["neg_elbo", "recon_nll", "kl", "iwae_nll", "bits_per_dim", "active_units", "kl_active_units",
           "collapsed_units", "mutual_info", "mutual_info_max", "mig", "sample_blur", "recon_blur", "data_blur",
           "sharpness_ratio", "mse"]
IGNORED_KEYS = ("hydra.", *IGNORED)  # keys that cannot change results


class CompareError(RuntimeError):
    """Nothing to compare; the message names the folder."""


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


def _overrides(run: Path) -> Dict[str, str]:
    path = run / ".hydra" / "overrides.yaml"
    items = OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else []
    pairs = (o.split("=", 1) for o in items if "=" in o)
    return {k.lstrip("+~"): v for k, v in pairs if not k.lstrip("+~").startswith(IGNORED_KEYS)}


def _settings(run: Path) -> Dict[str, object]:
    """The run's settings as flat keys: what it was trained with (trained_with.yaml, never a .hydra/ that a
    later launch may have rewritten); for a run that failed before training, the overrides it was given."""
    record = run / TRAINED_WITH
    if record.is_file():
        trained = flatten(OmegaConf.to_container(OmegaConf.load(record)))
        return {k: v for k, v in trained.items() if not k.startswith(IGNORED_KEYS)}
    return {k: _number(v) for k, v in _overrides(run).items()}


def read_run(run: Path) -> Dict[str, object]:
    """One run's settings, overrides, summary and grids; a run without summary.json is 'incomplete'."""
    summary_path = run / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {"status": "incomplete"}
    return {"path": run, "settings": _settings(run), "overrides": _overrides(run), "summary": summary}


def runs_table(runs: List[Dict[str, object]], root: Path) -> pd.DataFrame:
    """One row per run: run, status, the settings that differ across runs (a lone run: its overrides), then
    the final metrics."""
    if len(runs) > 1:
        keys = list(dict.fromkeys(k for r in runs for k in r["settings"]))
        swept = [k for k in keys if len({repr(r["settings"][k]) for r in runs if k in r["settings"]}) > 1]
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
    return table


def _cell(v):
    """A setting as a table cell: numbers as numbers, lists as their text."""
    return str(v) if isinstance(v, (list, tuple)) else _number(v)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root)) or "."
    except ValueError:
        return str(path)


def _number(v):
    if not isinstance(v, str):
        return v
    try:
        return float(v) if not v.isalpha() else v
    except ValueError:
        return v


def _labels(table: pd.DataFrame) -> List[str]:
    swept = table.attrs["swept"]
    return [", ".join(f"{k.split('.')[-1]}={_fmt(row[k])}" for k in swept) or row["run"] for _, row in table.iterrows()]


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


# ------------------------------------------------------------------------------------------- plots


def plot_rate_distortion(table: pd.DataFrame, path: Path) -> None:
    """Rate (KL) against distortion (recon NLL), one labelled point per run (Alemi et al. 2018)."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ok = table[f"{SPLIT}/kl"].notna()
    ax.scatter(table.loc[ok, f"{SPLIT}/kl"], table.loc[ok, f"{SPLIT}/recon_nll"])
    for label, (_, row) in zip(np.array(_labels(table))[ok.values], table[ok].iterrows()):
        ax.annotate(label, (row[f"{SPLIT}/kl"], row[f"{SPLIT}/recon_nll"]), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")
    ax.set(xlabel="rate: KL (nats per image)", ylabel="distortion: recon NLL (nats per image)",
           title=f"Rate-distortion ({SPLIT} split)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_collapse_and_blur(table: pd.DataFrame, path: Path) -> None:
    """Active units and sharpness ratios against the first swept key (or the run, if none); finished runs."""
    done = table[table[f"{SPLIT}/kl"].notna()]
    key = table.attrs["swept"][0] if table.attrs["swept"] else "run"
    numeric = pd.api.types.is_numeric_dtype(done[key])
    x = done[key].to_numpy() if numeric else np.arange(len(done))
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(x, done[f"{SPLIT}/active_units"], "o-")
    a.set(xlabel=key, ylabel="active units (of latent_dim)", title="Posterior collapse")
    b.plot(x, done[f"{SPLIT}/sample_blur"], "o-", label="samples")
    b.plot(x, done[f"{SPLIT}/recon_blur"], "s--", label="reconstructions")
    b.axhline(done[f"{SPLIT}/data_blur"].mean(), color="grey", lw=0.8)
    b.set(xlabel=key, ylabel="blur (0 sharp, 1 flat)", title="Blur")
    b.legend(fontsize=8)
    labels = np.array(_labels(table))[table[f"{SPLIT}/kl"].notna().to_numpy()]
    for ax in (a, b):
        if not numeric:
            ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=7)
        elif (x > 0).all() and x.max() / x.min() >= 10:  # beta ladders and latent sizes read best on a log axis
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_kl_heatmap(runs: List[Dict[str, object]], labels: List[str], path: Path) -> None:
    """Per-dim KL (nats) of each run, dims sorted by KL within the run; blank where a run has fewer dims."""
    kls = [sorted(r["summary"].get(f"{SPLIT}/kl_per_dim") or [], reverse=True) for r in runs]
    width = max([len(k) for k in kls] + [1])
    grid = np.full((len(kls), width), np.nan)
    for i, k in enumerate(kls):
        grid[i, : len(k)] = k
    fig, ax = plt.subplots(figsize=(min(14, 2 + 0.25 * width), 1 + 0.4 * len(kls)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set(xlabel="latent dim (sorted by KL)", title=f"KL per latent dim ({SPLIT}, nats per image)")
    fig.colorbar(im, ax=ax, label="nats")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def montage(runs: List[Dict[str, object]], labels: List[str], name: str, path: Path, per_row: int = 4,
            width: int = 320) -> bool:
    """The runs' `name` grids side by side at one width (aspect kept), each captioned by its settings and
    status; False if no run has one."""
    if not any((r["path"] / name).is_file() for r in runs):
        return False
    tiles = []
    for r, label in zip(runs, labels):
        grid = r["path"] / name
        img = Image.open(grid).convert("RGB") if grid.is_file() else Image.new("RGB", (width, width), "lightgrey")
        img = img.resize((width, max(1, round(img.height * width / img.width))))
        status = r["summary"].get("status", "incomplete")
        canvas = Image.new("RGB", (width, img.height + 18), "white")
        canvas.paste(img, (0, 18))
        ImageDraw.Draw(canvas).text((3, 3), label if status == "finished" else f"{label} [{status}]", fill="black")
        tiles.append(canvas)
    cell_h = max(t.height for t in tiles) + 6
    rows = (len(tiles) + per_row - 1) // per_row
    sheet = Image.new("RGB", (min(per_row, len(tiles)) * (width + 6), rows * cell_h), "white")
    for i, t in enumerate(tiles):
        sheet.paste(t, ((i % per_row) * (width + 6), (i // per_row) * cell_h))
    sheet.save(path)
    return True


# ------------------------------------------------------------------------------------------- report


def write_report(table: pd.DataFrame, figures: List[str], out: Path, sources: List[Path]) -> None:
    """report.html: the table and every figure, with relative links, readable offline."""
    body = table.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-", border=0)
    figs = "\n".join(f'<figure><img src="{html.escape(f)}"><figcaption>{html.escape(f)}</figcaption></figure>'
                     for f in figures)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>VAE sweep comparison</title><style>
body {{ font-family: sans-serif; margin: 2em; }} table {{ border-collapse: collapse; font-size: 13px; }}
td, th {{ padding: 3px 8px; border-bottom: 1px solid #ddd; text-align: right; }} img {{ max-width: 100%; }}
figure {{ display: inline-block; margin: 1em; vertical-align: top; }}</style></head><body>
<h1>VAE sweep comparison</h1>
<p>{len(table)} runs from {html.escape(", ".join(map(str, sources)))}. Metrics are final, on the {SPLIT} split:
NLLs and KL in nats per image; bits_per_dim = neg_elbo / (D ln 2); active units: Cov_x E[z_d] &gt; 0.01;
sharpness ratios: variance of the Laplacian against real images (1 = as sharp as data).</p>
{body}
{figs}
</body></html>"""
    (out / "report.html").write_text(page)


def compare(dirs: List[Path], out: Optional[Path] = None) -> pd.DataFrame:
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
    (out / "table.md").write_text(table.to_markdown(index=False, floatfmt=".4g") + "\n")
    figures = []
    if table[f"{SPLIT}/kl"].notna().any():
        plot_rate_distortion(table, out / "rate_distortion.png")
        plot_collapse_and_blur(table, out / "collapse_blur.png")
        plot_kl_heatmap(runs, labels, out / "kl_per_dim.png")
        figures += ["rate_distortion.png", "collapse_blur.png", "kl_per_dim.png"]
    for grid, name in (("samples.png", "samples_montage.png"), ("reconstructions.png", "reconstructions_montage.png")):
        if montage(runs, labels, grid, out / name):
            figures.append(name)
    write_report(table, figures, out, dirs)
    log.info("Compared %d runs (%d finished) -> %s", len(table), int((table["status"] == "finished").sum()), out)
    return table


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", type=Path, help="sweep or run folders (searched recursively)")
    parser.add_argument("--out", type=Path, help="output folder (default: <first dir>/compare)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        table = compare(args.dirs, args.out)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table.drop(columns=[c for c in ("error",) if c in table]).to_string(index=False, float_format="%.4g"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
