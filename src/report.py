"""Drawing a `Comparison` (comparison.py): the table a person reads, collapse.png, blur.png,
rate_distortion.png, kl_per_dim.png, the montages of every run's grids, and report.html, each figure with a line
on how to read it."""
from __future__ import annotations

import html
from pathlib import Path
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from .comparison import SPLIT, Comparison, fmt  # noqa: E402
from .naming import short_names  # noqa: E402

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
MONTAGE_ROWS, MONTAGE_COLS = 4, 7  # the part of each run's grid a montage shows (7: a whole traversal row)
MONTAGE_WIDTH = 300  # px: each run's part is enlarged by the smallest whole factor that makes it at least this wide



def display_table(c: Comparison) -> pd.DataFrame:
    """The table a person reads: short column names with units, numbers rounded to what they can tell apart,
    an MI at its ceiling shown as '>= x', and only the columns some run has."""
    table, swept = c.table, c.swept
    out = pd.DataFrame({"run": table["run"]})
    for k, short in short_names(swept).items():
        out[short] = table[k].map(fmt)
    if (table["status"] != "finished").any():
        out["status"] = table["status"]
    for metric, (name, pattern) in COLUMNS.items():
        values = table[f"{SPLIT}/{metric}"]
        if values.isna().all():
            continue
        cells = [("-" if pd.isna(v) else pattern.format(v)) for v in values]
        if metric == "mutual_info":
            capped = table[f"{SPLIT}/mutual_info_capped"].fillna(False).astype(bool)
            cells = [f">= {cell}" if cap else cell for cell, cap in zip(cells, capped)]
        out[name] = cells
    return out


# ------------------------------------------------------------------------------------------- plots


def _x_axis(c: Comparison):
    """(x values, x label, series): the first swept key on x, one series per value of the other swept keys."""
    table, swept = c.table, c.swept
    if not swept:
        return np.arange(len(table)), "run", [("", table.index)]
    key, others = swept[0], swept[1:]
    x = table[key].to_numpy() if pd.api.types.is_numeric_dtype(table[key]) else np.arange(len(table))
    if not others:
        return x, short_names(swept)[key], [("", table.index)]
    names = pd.Series(c.labels(others))
    series = [(name, list(idx)) for name, idx in names.groupby(names, sort=False).groups.items()]
    return x, short_names(swept)[key], series


def _style_x(ax, c: Comparison, x) -> None:
    table = c.table
    key = c.swept[0] if c.swept else None
    if key is None or not pd.api.types.is_numeric_dtype(table[key]):
        labels = table[key].map(fmt) if key else table["run"]
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    elif (x > 0).all() and x.max() / x.min() >= 10:  # beta ladders and latent sizes read best on a log axis
        ax.set_xscale("log")
        ax.set_xticks(sorted(set(x)), [fmt(v) for v in sorted(set(x))])
        ax.minorticks_off()
    ax.grid(alpha=0.3)


def plot_collapse(c: Comparison, path: Path) -> None:
    """Dims in use (two counts, integer axis from 0) and mutual information (its ceiling marked), per swept value."""
    table = c.table
    done = table["status"].eq("finished").to_numpy()
    x, xlabel, series = _x_axis(c)
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
    latent = table.get("model.latent_dim", pd.Series([c.fixed.get("model.latent_dim")]))
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
        _style_x(ax, c, x)
    a.legend(fontsize=7)
    if len(series) > 1:
        b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_blur(c: Comparison, path: Path) -> None:
    """Sample and reconstruction blur per swept value, over the real images' own blur."""
    table = c.table
    done = table["status"].eq("finished").to_numpy()
    x, xlabel, series = _x_axis(c)
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
    _style_x(ax, c, x)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rate_distortion(c: Comparison, path: Path) -> None:
    """Rate (KL) against distortion (recon NLL), one labelled point per run (Alemi et al. 2018)."""
    table = c.table
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ok = table[f"{SPLIT}/kl"].notna()
    ax.scatter(table.loc[ok, f"{SPLIT}/kl"], table.loc[ok, f"{SPLIT}/recon_nll"])
    for label, (_, row) in zip(np.array(c.labels())[ok.values], table[ok].iterrows()):
        ax.annotate(label, (row[f"{SPLIT}/kl"], row[f"{SPLIT}/recon_nll"]), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    ax.set(xlabel="rate: KL (nats per image)", ylabel="distortion: recon NLL (nats per image)",
           title=f"Rate-distortion ({SPLIT} split)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_kl_heatmap(c: Comparison, path: Path) -> None:
    """Per-dim KL (nats) of each run, dims sorted by KL within the run; blank where a run has fewer dims."""
    runs, labels = c.runs, c.labels()
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


def montage(c: Comparison, name: str, path: Path, per_row: int = 3) -> bool:
    """The runs' `name` grids side by side: the first MONTAGE_ROWS x MONTAGE_COLS images of each, enlarged by
    one whole factor (nearest neighbour, so pixels stay pixels) and captioned with the run's swept values and
    any non-finished status; False if no run has one."""
    runs, labels = c.runs, c.labels()
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
        widths = f" {fmt(fixed['model.hidden_channels'])}" if has("model.hidden_channels") else ""
        lines.append(f"model: {fixed['model.name']}{widths}{latent}")
    if has("loss.likelihood"):
        like = fixed["loss.likelihood"]
        sigma = f" (sigma {fixed['loss.sigma']:g})" if like == "gaussian" and has("loss.sigma") else ""
        lines.append(f"likelihood: {like}{sigma}")
    objective = [f"{name} {fmt(fixed[k])}" for k, name in (("loss.beta", "beta"), ("loss.kl_schedule", "KL schedule"),
                                                            ("loss.free_bits", "free bits")) if k in fixed]
    if objective:
        lines.append("objective: " + ", ".join(objective))
    budget = [f"{name} {fmt(fixed[k])}" for k, name in (("trainer.max_epochs", "max_epochs"), ("trainer.max_steps",
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


def header_lines(c: Comparison) -> List[str]:
    """What was compared, in plain lines: the swept keys and their values, then the fixed settings that
    matter (data, model, likelihood, objective, budget, optimizer, seed) and the metrics' units."""
    table, swept, finished = c.table, c.swept, c.finished()
    lines = [f"{len(table)} runs ({finished} finished). Swept: " + ("; ".join(
        f"{k} = {', '.join(dict.fromkeys(table[k].map(fmt)))}" for k in swept) or "nothing (one run)") + "."]
    lines += _fixed_lines(c.fixed, c.runs)
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


def write_report(c: Comparison, figures: List[str], out: Path, sources: List[Path]) -> None:
    """report.html: the header, the short table, every figure with its how-to-read line; readable offline."""
    what = "".join(f"<p>{html.escape(line)}</p>" for line in header_lines(c))
    what += f"<p>Runs from {html.escape(', '.join(map(str, sources)))}.</p>"
    figs = "\n".join(
        f'<h2>{html.escape(f.removesuffix(".png").replace("_", " ").capitalize())}</h2><figure>'
        f'<img src="{html.escape(f)}"{" class=pixels" if "montage" in f else ""} alt="{html.escape(f)}">'
        f"<figcaption>{html.escape(HOW_TO_READ[f])}</figcaption></figure>" for f in figures)
    fixed = pd.DataFrame({"setting": list(c.fixed), "value": [fmt(v) for v in c.fixed.values()]})
    (out / "report.html").write_text(PAGE.format(
        title="VAE sweep comparison", what=what, table=display_table(c).to_html(index=False, border=0),
        figures=figs, n_fixed=len(fixed), fixed=fixed.to_html(index=False, border=0)))




def render(c: Comparison, out: Path, sources: List[Path]) -> List[str]:
    """Write table.csv, table.md, the plots (when some run finished), the montages and report.html into `out`;
    returns the figures' file names."""
    out.mkdir(parents=True, exist_ok=True)
    c.table.to_csv(out / "table.csv", index=False)
    (out / "table.md").write_text("\n\n".join(header_lines(c)) + "\n\n" + display_table(c).to_markdown(index=False)
                                  + "\n")
    figures = []
    if c.finished():
        for name, plot in (("collapse.png", plot_collapse), ("blur.png", plot_blur),
                           ("rate_distortion.png", plot_rate_distortion), ("kl_per_dim.png", plot_kl_heatmap)):
            plot(c, out / name)
            figures.append(name)
    for grid in ("samples", "reconstructions", "traversals"):
        if montage(c, f"{grid}.png", out / f"{grid}_montage.png"):
            figures.append(f"{grid}_montage.png")
    write_report(c, figures, out, sources)
    return figures
