"""Drawing a `Comparison` (comparison.py): the table a person reads, collapse.png, blur.png,
rate_distortion.png, kl_per_dim.png, the montages of every run's grids, and report.html, each figure with a line
on how to read it."""
from __future__ import annotations

import html
import json
import logging
import re
from pathlib import Path
from typing import Dict, List, Optional

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from .config import applies  # noqa: E402
from .comparison import KINDS, STILL_FALLING, Comparison, fmt, metric_rows  # noqa: E402
from .naming import short_names  # noqa: E402
from .rundir import RunDir  # noqa: E402
from . import study as studies  # noqa: E402

log = logging.getLogger(__name__)

# the report's columns: metric -> (short name with its unit, format)
COLUMNS = {"neg_elbo": ("-ELBO (nats)", "{:.1f}"), "recon_nll": ("recon (nats)", "{:.1f}"),
           "kl": ("KL (nats)", "{:.2f}"), "iwae_nll": ("IWAE NLL (nats)", "{:.1f}"),
           "bits_per_dim": ("bits/dim", "{:.3f}"), "active_units": ("active dims", "{:.0f}"),
           "kl_active_units": ("KL > 0.1 dims", "{:.0f}"), "mutual_info": ("MI (nats)", "{:.2f}"),
           "sample_blur": ("sample blur (0-1)", "{:.3f}"), "recon_blur": ("recon blur (0-1)", "{:.3f}"),
           "mig": ("MIG (0-1)", "{:.3f}"), "sigma": ("sigma (0-1 px)", "{:.3f}"),
           "marginal_kl": ("marginal KL (nats)", "{:.2f}"), "prior_hole_share": ("prior in holes (0-1)", "{:.3f}"),
           "judge_fd": ("judge FD (lower better)", "{:.2f}"),
           "judge_precision": ("precision (0-1)", "{:.3f}"), "judge_recall": ("recall (0-1)", "{:.3f}"),
           "gmm_judge_precision": ("mixture prior: precision", "{:.3f}"),
           "gmm_judge_recall": ("mixture prior: recall", "{:.3f}"),
           "recon_accuracy": ("recon class acc", "{:.3f}"), "mse": ("MSE (per px)", "{:.4f}")}
JUDGED = {"judge_fd", "judge_precision", "judge_recall", "gmm_judge_precision", "gmm_judge_recall",
          "recon_accuracy"}  # the judge's numbers: "at chance" where the judge could not tell the classes apart
HOW_TO_READ = {
    "collapse.png": "Left: latent dims still in use, out of latent_dim. The solid line counts dims whose mean KL "
                    "exceeds eval.collapse_nats (posterior collapse as Lucas et al. 2019 define it; the same count as "
                    "the KL heatmap's); the dotted one counts active units (Burda et al.: the dim's posterior mean "
                    "moves with the image, Cov > 0.01), which can stay high while a dim carries almost no KL. Middle: "
                    "the KL term split in two (ELBO surgery, Hoffman and Johnson 2016): the mutual information I(x; z) "
                    "the code carries about the image (solid), and the marginal KL(q(z) || p(z)) between the encoded "
                    "images' aggregate posterior and the prior (dashed), the nats spent on holes; a hollow point sits "
                    "at the MI estimator's ceiling log N: MI at least, marginal KL at most. Right: the share of prior "
                    "samples that land in a hole of q(z) (below the density of 99% of held-out images' codes; the "
                    "dotted line is what no holes give): the decoder never learnt what to draw there. With many "
                    "active dims and narrow posteriors this share sinks toward its floor even where the marginal KL "
                    "is large (held-out images' codes are then far from every encoded image too), so read the two "
                    "together. With seeds: the mean over seeds, error bars of one sample sd, each seed a small dot.",
    "blur.png": "Blur of prior samples and of reconstructions, 0 = sharp, 1 = flat, on the same fixed z and inputs "
                "for every run. The dashed line is the real test images' own blur: the closer to it, the sharper. "
                "It measures blur, not whether the content is right: judge that from the montages. With seeds: "
                "mean, one sd, each seed a dot.",
    "quality.png": "In the feature space of a small classifier of the data's own classes (the judge), each "
                   "setting's prior samples against the real test images. Left: fidelity against diversity "
                   "(Kynkäänniemi et al. 2019): precision, the share of samples that land on the data, and recall, "
                   "the share of the data the samples reach; blurry or incoherent samples lose precision, collapsed "
                   "or too-narrow ones lose recall; top right is best. The arrow leads to the same model sampled "
                   "from a mixture fitted to its encoded training images (the mixture prior): a long arrow means "
                   "the holes of its latent space cost it that much. Middle: the Fréchet distance under both "
                   "priors (lower is closer to the data, in content as well as sharpness). Right: the judge's "
                   "accuracy on reconstructions; the dotted line is its accuracy on the real images, the ceiling. "
                   "With seeds: mean, one sd, each seed a dot.",
    "rate_distortion.png": "One point per setting (with seeds: their mean, one sd either way, each seed a dot): "
                           "further right spends more nats on the code (rate), lower reconstructs better "
                           "(distortion). Along a dotted line -ELBO = KL + recon is constant: a point on a lower "
                           "line is a better bound. Runs at KL near 0 have collapsed entirely.",
    "kl_per_dim.png": "One row per run, its latent dims sorted by KL (nats per image) on a log colour scale, so 0.02 "
                      "and 0.2 nats look different; the white mark on the scale is eval.collapse_nats. The number "
                      "right of each row counts dims above it (the collapse plot's solid line).",
    "learning_curves.png": "Validation -ELBO, KL and IWAE NLL at every eval of every run, one colour per setting "
                           "(its seeds share it): did the runs converge, and did KL rise or fall on the way?",
    "kl_over_training.png": "Per-dim KL over training steps (log scale) for one run of each setting (the first "
                            "seed, named in its title with that run's own count), each dim coloured by its final KL "
                            "(the key on the right: warm = most); the dotted line is eval.collapse_nats. A dim that "
                            "falls below it and stays there has collapsed: read when it happened.",
    "samples_montage.png": "Prior samples of every run: runs with the same latent size decode the same z, pixel for "
                           "pixel (runs of different latent sizes draw different z); compare sharpness and variety "
                           "across the swept values. Where the runs fitted a mixture prior (eval.gmm_components), "
                           "each run shows N(0, I)'s samples on the left and the mixture's on the right: samples "
                           "from where its training images were encoded; what improves is what the holes cost.",
    "reconstructions_montage.png": "Each run's reconstructions of the same validation images: rows marked input "
                                   "and output, each output under its input. Where detail is lost, the code "
                                   "carries less.",
    "traversals_montage.png": "Each run walks one latent dim per row from -3 to +3 (columns), the others held at "
                              "the same image's posterior mean: the two rows with most KL, then the two with least, "
                              "each labelled with its dim and KL. A row that does not change is a collapsed dim.",
}
TITLES = {"collapse.png": "Posterior collapse and holes", "blur.png": "Blur", "quality.png": "Sample quality: fidelity, diversity and holes (the judge)",
          "rate_distortion.png": "Rate and distortion", "kl_per_dim.png": "KL per latent dim",
          "learning_curves.png": "Learning curves", "kl_over_training.png": "KL per dim over training",
          "samples_montage.png": "Samples", "reconstructions_montage.png": "Reconstructions",
          "traversals_montage.png": "Latent traversals"}
MONTAGE_ROWS, MONTAGE_COLS = 4, 7  # the part of each run's grid a montage shows (7: a whole traversal row)
MONTAGE_WIDTH = 300  # px: each run's part is enlarged by the smallest whole factor that makes it at least this wide



def display_table(c: Comparison) -> pd.DataFrame:
    """The table a person reads: one row per setting (its seeds pooled: mean ± sd and n when seeds differ), short
    column names with units, numbers rounded to what they can tell apart, an MI at its ceiling shown as '≥ x',
    and only the columns some run has."""
    if c.seeds:
        return _by_kind(c, _stats_table(c), [c.kinds()[idx[0]] for idx in c.settings()])
    table, swept = c.table, c.swept
    out = pd.DataFrame({"run": table["run"]})
    for k, short in short_names(swept).items():
        out[short] = table[k].map(fmt)
    out = _by_kind(c, out, c.kinds())
    if (table["status"] != "finished").any():
        out["status"] = table["status"]
    table = table.loc[out.index]
    for metric, (name, pattern) in columns(c).items():
        values = table[f"{c.split}/{metric}"]
        if values.isna().all() and not _judged_blind(c, table, metric).any():
            continue
        cells = [("-" if pd.isna(v) else pattern.format(v)) for v in values]
        cells = _marked(c, table, metric, cells)
        if f"{c.split}/{metric}_se" in table:  # an estimate with its standard error (MI, MIG): value ± se
            cells = [cell if pd.isna(se) or cell == "-" else f"{cell} ± {pattern.format(se)}"
                     for cell, se in zip(cells, table[f"{c.split}/{metric}_se"])]
        out[name] = cells
    return out


def _judged_blind(c: Comparison, rows: pd.DataFrame, metric: str) -> pd.Series:
    """Rows (runs, or settings pooled over seeds) where `metric` is one of the judge's and is missing because the
    judge was at chance (its accuracy recorded, its scores not)."""
    if metric not in JUDGED or f"{c.split}/judge_chance" not in rows:
        return pd.Series(False, index=rows.index)
    return rows[f"{c.split}/{metric}"].isna() & rows[f"{c.split}/judge_chance"].notna()


def _marked(c: Comparison, rows: pd.DataFrame, metric: str, cells: List[str]) -> List[str]:
    """Cells as a reader must take them: an MI at the estimator's ceiling is a lower bound ('≥'), so the marginal
    KL computed from it is an upper bound ('≤'); a judge at chance gave no number ('at chance')."""
    if metric in ("mutual_info", "marginal_kl"):
        capped = rows[f"{c.split}/mutual_info_capped"].fillna(0).astype(float) > 0  # (pooled: the share of seeds)
        mark = "≥" if metric == "mutual_info" else "≤"
        cells = [f"{mark} {cell}" if cap and cell != "-" else cell for cell, cap in zip(cells, capped)]
    return [("at chance" if blind else cell) for cell, blind in zip(cells, _judged_blind(c, rows, metric))]


def _by_kind(c: Comparison, out: pd.DataFrame, kinds: List[str]) -> pd.DataFrame:
    """Where likelihoods of two kinds meet (KINDS), a `kind` column and the rows grouped by kind, in KINDS' order:
    their NLLs are on different scales (a probability, >= 0 nats; a cross-entropy; a density, any sign) and compare
    only within a kind."""
    if len(set(c.kinds())) < 2:
        return out
    out.insert(1, "kind", kinds)
    return out.iloc[np.argsort([list(KINDS).index(k) for k in kinds], kind="stable")]


def columns(c: Comparison) -> Dict[str, tuple]:
    """COLUMNS, with the collapse count named by the comparison's own threshold."""
    out = dict(COLUMNS)
    out["kl_active_units"] = (f"KL > {c.collapse_nats:g} dims", "{:.0f}")
    done = c.table[c.table["status"].eq("finished")]
    if done[[f"{c.split}/iwae_k", f"{c.split}/iwae_images"]].drop_duplicates().dropna().shape[0] > 1:
        out.update(iwae_k=("IWAE k", "{:,.0f}"), iwae_images=("IWAE images", "{:,.0f}"))  # each number's own
    return out


COUNTS = {"active_units", "kl_active_units", "collapsed_units"}  # whole dims per run; their means over seeds are not


def _mean_sd(metric: str, pattern: str, mean: float, sd: float) -> str:
    """`mean ± sd` as the table prints it: a count's mean over seeds with two decimals (3.67 ± 0.58, as the
    figures draw it), unless every seed agrees (4 ± 0)."""
    if pd.isna(mean):
        return "-"
    if pd.isna(sd):
        return pattern.format(mean)
    if metric in COUNTS and not (sd == 0 and float(mean).is_integer()):
        pattern = "{:.2f}"
    return f"{pattern.format(mean)} ± {pattern.format(sd)}"


def _stats_table(c: Comparison) -> pd.DataFrame:
    """One row per setting: mean ± sd over its finished seeds, and n; an MI where some seed sits at the
    estimator's ceiling is a lower bound, shown as '≥' (and the marginal KL from it '≤')."""
    stats = c.stats()
    out = pd.DataFrame({short: stats[k].map(fmt) for k, short in short_names(c.swept).items()}) if c.swept else \
        pd.DataFrame({"setting": ["all runs"]})
    out["n"] = stats["n"]
    for metric, (name, pattern) in columns(c).items():
        mean, sd = stats[f"{c.split}/{metric}"], stats[f"{c.split}/{metric} sd"]
        if mean.isna().all() and not _judged_blind(c, stats, metric).any():
            continue
        out[name] = _marked(c, stats, metric, [_mean_sd(metric, pattern, m, d) for m, d in zip(mean, sd)])
    return out


UNITS = {"neg_elbo": "nats", "recon_nll": "nats", "kl": "nats", "iwae_nll": "nats", "bits_per_dim": "bits/dim",
         "active_units": "dims", "kl_active_units": "dims", "collapsed_units": "dims", "mutual_info": "nats",
         "mutual_info_max": "nats", "mig": "0-1", "sample_blur": "0-1", "recon_blur": "0-1", "data_blur": "0-1",
         "sharpness_ratio": "ratio", "mse": "per pixel", "mse_mean_image": "per pixel", "mutual_info_se": "nats",
         "mig_se": "0-1", "sigma": "pixel units 0-1", "judge_fd": "judge feature units",
         "recon_accuracy": "0-1", "judge_accuracy": "0-1", "judge_chance": "0-1", "judge_kid": "judge feature units",
         "judge_kid_sd": "judge feature units", "judge_precision": "0-1", "judge_recall": "0-1", "judge_density": "ratio",
         "judge_coverage": "0-1", "marginal_kl": "nats", "marginal_kl_se": "nats", "prior_hole_share": "0-1", "prior_hole_floor": "0-1",
         "gmm_judge_fd": "judge feature units", "gmm_judge_kid": "judge feature units", "gmm_judge_precision": "0-1",
         "gmm_judge_recall": "0-1", "gmm_judge_density": "ratio", "gmm_judge_coverage": "0-1", "gmm_components": "count"}


PAPER_COLUMNS = ["neg_elbo", "iwae_nll", "kl", "kl_active_units", "mutual_info", "marginal_kl", "judge_precision",
                 "judge_recall"]  # the collapse question's, the holes' and the samples' (scaled to the text width)
TEX_METRICS = {"neg_elbo": r"$-$ELBO", "recon_nll": "recon NLL", "kl": "KL", "iwae_nll": "IWAE NLL",
               "bits_per_dim": "bits/dim", "active_units": "active dims", "mutual_info": r"$I(x; z)$",
               "sample_blur": "sample blur", "recon_blur": "recon blur", "mig": "MIG", "sigma": r"$\sigma$",
               "judge_fd": "judge FD", "recon_accuracy": "recon acc.", "mse": "MSE", "iwae_k": "IWAE $k$",
               "marginal_kl": r"KL$(q(z) \| p(z))$", "prior_hole_share": "prior in holes", "judge_kid": "judge KID",
               "judge_precision": "precision", "judge_recall": "recall", "gmm_judge_precision": "GMM precision",
               "gmm_judge_recall": "GMM recall",
               "iwae_images": "IWAE images"}
TEX_UNITS = {"neg_elbo": "nats", "recon_nll": "nats", "kl": "nats", "iwae_nll": "nats", "mutual_info": "nats",
             "marginal_kl": "nats"}
TEX_KEYS = {"loss.beta": r"$\beta$", "model.latent_dim": r"latent dim", "loss.likelihood": "likelihood",
            "loss.free_bits": "free bits", "loss.kl_schedule": "KL schedule", "optimizer.lr": "lr"}


class ColumnError(ValueError):
    """A --columns name that is not a metric; the message names it and the choices."""


def paper_columns(c: Comparison, chosen: Optional[List[str]] = None) -> List[str]:
    """The metrics settings.tex shows: `chosen` (COLUMNS' names, in that order) or PAPER_COLUMNS, less those no
    run has."""
    unknown = [m for m in chosen or [] if m not in COLUMNS]
    if unknown:
        raise ColumnError(f"--columns {','.join(unknown)}: not a metric; choose from {', '.join(COLUMNS)}")
    return [m for m in (chosen or PAPER_COLUMNS) if c.stats()[f"{c.split}/{m}"].notna().any()]


def _tex(text: object) -> str:
    """Plain text as LaTeX: its special characters escaped."""
    out = str(text)
    for char, escaped in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"),
                          ("$", r"\$"), ("{", r"\{"), ("}", r"\}")):
        out = out.replace(char, escaped)
    return (out.replace(">=", r"$\geq$").replace("≥", r"$\geq$").replace("≤", r"$\leq$")
            .replace("±", r"$\pm$"))


def _tex_cell(cell: str) -> str:
    """A number cell as LaTeX: a leading minus as math, ± and ≥ as $\\pm$ and $\\geq$."""
    cell = _tex(cell)
    return "$-$" + cell[1:] if cell.startswith("-") and len(cell) > 1 else cell


def export_tables(c: Comparison, out: Path, chosen: Optional[List[str]] = None, label: str = "vae-sweep") -> None:
    """Paper-ready: settings.csv (one row per setting: n, and each metric's mean and sd with its unit in the
    header) and settings.tex (a booktabs table, one row per setting: the swept settings, the likelihood kind where
    kinds differ, n, and the `chosen` metrics (paper_columns) as mean ± sd; a caption and a label)."""
    stats = c.stats()
    csv = pd.DataFrame({k: stats[k] for k in c.swept})
    csv["n"] = stats["n"]
    for metric, unit in UNITS.items():
        if stats[f"{c.split}/{metric}"].notna().any():
            csv[f"{c.split}/{metric} mean ({unit})"] = stats[f"{c.split}/{metric}"]
            csv[f"{c.split}/{metric} sd ({unit})"] = stats[f"{c.split}/{metric} sd"]
    csv.to_csv(out / "settings.csv", index=False)
    (out / "settings.tex").write_text(settings_tex(c, paper_columns(c, chosen), label))


def settings_tex(c: Comparison, metrics: List[str], label: str) -> str:
    shown = display_table(c)  # the table a reader sees: pooled over seeds, grouped by kind
    names = columns(c)
    short = short_names(c.swept)
    keys = [(short[k], TEX_KEYS.get(k, _tex(short[k]))) for k in c.swept] or \
        [("setting", "setting") if "setting" in shown else ("run", "run")]
    keys += [("kind", "kind")] if "kind" in shown else []
    keys += [("n", "$n$")] if "n" in shown else []
    tex = {**TEX_METRICS, "kl_active_units": f"KL $>$ {c.collapse_nats:g} dims"}
    heads = [(names[m][0], tex.get(m, _tex(names[m][0])) + (f" ({TEX_UNITS[m]})" if m in TEX_UNITS else ""))
             for m in metrics if names[m][0] in shown]
    text = {n for n, _ in keys} - {"n"}
    body = [" & ".join(_tex(row[n]) if n in text else _tex_cell(str(row[n])) for n, _ in keys + heads) + r" \\"
            for _, row in shown.iterrows()]
    seeds = f"mean $\\pm$ sample sd over $n$ seeds" if c.seeds else "one run per setting"
    kinds = sorted(set(c.kinds()), key=list(KINDS).index)
    caption = (f"Final {c.split}-split metrics of each setting, {seeds}. NLLs and KL in nats per image. "
               + " ".join(f"{_tex(k.capitalize())}: {_tex(KINDS[k])}." for k in kinds if k != "density" or len(kinds) > 1)
               + (" NLLs compare only within a kind." if len(kinds) > 1 else "")
               + f" A dim counts as used when its KL exceeds {c.collapse_nats:g} nats."
               + (" KL$(q(z) \\| p(z))$: the marginal KL between the aggregate posterior and the prior (the holes; "
                  "$\\leq$ where $I(x; z)$ is at its estimator's ceiling)." if "marginal_kl" in metrics else "")
               + (" Precision and recall (0--1, higher is better): the share of prior samples on the data (fidelity) "
                  "and of the data the samples reach (diversity), in the features of a classifier of the data's "
                  "classes." if {"judge_precision", "judge_recall"} & set(metrics) else "")
               + (f" {_tex(iwae)}" if (iwae := _iwae_line(c)) is not None else ""))
    columns_spec = "".join("r" if n == "n" else "l" for n, _ in keys) + "r" * len(heads)
    # a table wider than the text (many columns, --columns) is scaled down to it, never up
    return ("% settings.tex from python -m src.compare; needs \\usepackage{booktabs} and \\usepackage{graphicx}\n"
            "\\begin{table}[t]\n\\centering\n\\small\n\\setlength{\\tabcolsep}{4pt}\n"
            f"\\caption{{{caption}}}\n\\label{{tab:{label}}}\n"
            "\\resizebox{\\ifdim\\width>\\linewidth\\linewidth\\else\\width\\fi}{!}{%\n"
            f"\\begin{{tabular}}{{{columns_spec}}}\n\\toprule\n"
            + " & ".join(h for _, h in keys + heads) + " \\\\\n\\midrule\n"
            + "\n".join(body) + "\n\\bottomrule\n\\end{tabular}}\n\\end{table}\n")


# ------------------------------------------------------------------------------------------- plots


def _x_axis(c: Comparison):
    """(x values, x label, series): the first swept key on x (a setting that is not a number: its position), one
    series per value of the other swept keys; a series holds every run of its settings, seeds included."""
    table, swept = c.table, c.swept
    if not swept:
        return np.zeros(len(table)), "run", [("", list(table.index))]
    key, others = swept[0], swept[1:]
    x = table[key].to_numpy(dtype=float) if pd.api.types.is_numeric_dtype(table[key]) else \
        pd.factorize(table[key].map(repr))[0].astype(float)
    if not others:
        return x, short_names(swept)[key], [("", list(table.index))]
    names = pd.Series(c.labels(others))
    series = [(name, list(idx)) for name, idx in names.groupby(names, sort=False).groups.items()]
    return x, short_names(swept)[key], series


def _ordered(c: Comparison) -> bool:
    """Whether the x axis (the first swept key) is a number, so lines between its values mean something."""
    return not c.swept or pd.api.types.is_numeric_dtype(c.table[c.swept[0]])


def _style_x(ax, c: Comparison, x) -> None:
    table = c.table
    key = c.swept[0] if c.swept else None
    if key is None:
        ax.set_xticks([0], ["all runs"])
    elif not pd.api.types.is_numeric_dtype(table[key]):
        names = list(dict.fromkeys(table[key].map(fmt)))
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    elif (x > 0).all() and x.max() / x.min() >= 10:  # beta ladders and latent sizes read best on a log axis
        ax.set_xscale("log")
        ax.set_xticks(sorted(set(x)), [fmt(v) for v in sorted(set(x))])
        ax.minorticks_off()
    ax.grid(alpha=0.3)


def _draw(ax, x, y, colour: str, style: str, label: str, hollow=None, alpha: float = 1.0, join: bool = True) -> None:
    """One series: the mean over seeds at each x (a line; error bars of one sample sd where n > 1) and, when
    there are seeds, each run as a small point. `hollow`: runs drawn as open markers (an MI at its ceiling).
    `join=False` (x is categorical: likelihood names) draws markers only: a line between categories means nothing."""
    style = style if join else style.rstrip("-:")
    df = pd.DataFrame({"x": np.asarray(x, dtype=float), "y": pd.to_numeric(pd.Series(list(y)), errors="coerce")})
    df["hollow"] = np.asarray(hollow, dtype=bool) if hollow is not None else False
    df = df.dropna(subset=["y"])
    if df.empty:
        return
    g = df.groupby("x", sort=True)["y"]
    mean, sd, n = g.mean(), g.std(ddof=1), g.count()
    replicated = bool((n > 1).any())
    ax.errorbar(mean.index, mean.values, yerr=sd.fillna(0).values if replicated else None, fmt=style, color=colour,
                alpha=alpha, capsize=3, ms=5, label=label or None)
    if replicated or hollow is not None:
        solid, opened = df[~df["hollow"]], df[df["hollow"]]
        if replicated:
            ax.scatter(solid["x"], solid["y"], s=12, color=colour, alpha=0.45, zorder=3, linewidths=0)
        ax.scatter(opened["x"], opened["y"], s=30, facecolors="white", edgecolors=colour, zorder=4)


def _save(fig, path: Path) -> None:
    """The figure as a PNG for the report and as a PDF (vector) beside it, for a paper."""
    fig.savefig(path, dpi=110)
    fig.savefig(path.with_suffix(".pdf"))
    plt.close(fig)


def _finished(c: Comparison, idx) -> List[int]:
    done = c.table["status"].eq("finished").to_numpy()
    return [j for j in idx if done[j]]


def plot_collapse(c: Comparison, path: Path) -> None:
    """Dims in use, led by KL (dims whose mean KL exceeds collapse_nats, as the heatmap counts them) with active
    units beside it, and mutual information (its ceiling marked), per swept value: means over seeds with one sd."""
    table = c.table
    x, xlabel, series = _x_axis(c)
    fig, (a, b, h) = plt.subplots(1, 3, figsize=(16, 4.2))
    join = _ordered(c)  # categories (likelihood names) are not joined by lines
    for i, (name, idx) in enumerate(series):
        rows, colour = _finished(c, idx), f"C{i}"
        _draw(a, x[rows], table.loc[rows, f"{c.split}/kl_active_units"], colour, "o-",
              f"KL > {c.collapse_nats:g} nats {name}".strip(), join=join)
        _draw(a, x[rows], table.loc[rows, f"{c.split}/active_units"], colour, "s:", f"active units {name}".strip(),
              alpha=0.55, join=join)
        capped = table.loc[rows, f"{c.split}/mutual_info_capped"].fillna(False).astype(bool).to_numpy()
        _draw(b, x[rows], table.loc[rows, f"{c.split}/mutual_info"], colour, "o-", f"I(x; z) {name}".strip(),
              hollow=capped, join=join)
        _draw(b, x[rows], table.loc[rows, f"{c.split}/marginal_kl"], colour, "s--", f"KL(q(z) || p(z)) {name}".strip(),
              hollow=capped, alpha=0.7, join=join)
        _draw(h, x[rows], table.loc[rows, f"{c.split}/prior_hole_share"], colour, "o-", name, join=join)
    latent = table.get("model.latent_dim", pd.Series([c.fixed.get("model.latent_dim")]))
    top = max(float(pd.to_numeric(latent, errors="coerce").max() or 0), float(table[f"{c.split}/active_units"].max()))
    a.set_ylim(-0.3, top + 0.5)
    a.yaxis.set_major_locator(MaxNLocator(integer=True))
    a.set(xlabel=xlabel, ylabel="latent dims in use", title=f"Posterior collapse (KL > {c.collapse_nats:g} nats"
                                                            f"{', mean ± sd over seeds' if c.seeds else ''})")
    ceiling = table[f"{c.split}/mutual_info_max"].max()
    if pd.notna(ceiling):
        b.axhline(ceiling, color="grey", ls=":", lw=1)
        b.annotate(f"ceiling log N = {ceiling:.2f}", (0.01, ceiling), xycoords=("axes fraction", "data"),
                   xytext=(0, -11), textcoords="offset points", fontsize=8, color="grey")
    top_mi = max(float(table[f"{c.split}/mutual_info"].max()), float(ceiling) if pd.notna(ceiling) else 0.0,
                 float(table[f"{c.split}/marginal_kl"].max()) if table[f"{c.split}/marginal_kl"].notna().any() else 0.0)
    b.set_ylim(min(0.0, float(table[f"{c.split}/marginal_kl"].min()) if table[f"{c.split}/marginal_kl"].notna().any()
                   else 0.0), 1.08 * top_mi if top_mi > 0 else 1)  # room above the ceiling for its hollow points
    b.set(xlabel=xlabel, ylabel="nats per image", title="The KL term split: I(x; z) + KL(q(z) || p(z))")
    floor = table[f"{c.split}/prior_hole_floor"].median()  # the share where q(z) covers the prior
    if pd.notna(floor):
        h.axhline(floor, color="grey", ls=":", lw=1)
        h.annotate(f"no holes: {floor:g}", (0.01, floor), xycoords=("axes fraction", "data"), xytext=(0, 4),
                   textcoords="offset points", fontsize=8, color="grey")
    h.set(xlabel=xlabel, ylabel="share of prior samples (0-1)", title="Prior samples in holes of q(z)", ylim=(0, 1.02))
    for ax in (a, b, h):
        _style_x(ax, c, x)
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    if len(series) > 1:
        h.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def plot_blur(c: Comparison, path: Path) -> None:
    """Sample and reconstruction blur per swept value (means over seeds with one sd), over the real images' own."""
    table = c.table
    done = table["status"].eq("finished").to_numpy()
    x, xlabel, series = _x_axis(c)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    join = _ordered(c)  # categories (likelihood names) are not joined by lines
    for i, (name, idx) in enumerate(series):
        rows = _finished(c, idx)
        _draw(ax, x[rows], table.loc[rows, f"{c.split}/sample_blur"], f"C{i}", "o-", f"samples {name}".strip(),
              join=join)
        _draw(ax, x[rows], table.loc[rows, f"{c.split}/recon_blur"], f"C{i}", "s--", f"reconstructions {name}".strip(),
              alpha=0.7, join=join)
    data_blur = table[f"{c.split}/data_blur"].median()
    ax.axhline(data_blur, color="grey", ls=":", lw=1)
    ax.annotate(f"real images {data_blur:.3f}", (0.01, data_blur), xycoords=("axes fraction", "data"),
                xytext=(0, 4), textcoords="offset points", fontsize=8, color="grey")
    shown = pd.concat([table.loc[done, f"{c.split}/sample_blur"], table.loc[done, f"{c.split}/recon_blur"]])
    low, high = min(shown.min(), data_blur), max(shown.max(), data_blur)
    pad = max(0.02, 0.1 * (high - low))  # zoomed to the runs and the real images, so small steps show
    ax.set_ylim(max(0.0, low - pad), min(1.0, high + pad))
    ax.set(xlabel=xlabel, ylabel="blur (0 sharp, 1 flat)", title="Blur" + (" (mean ± sd over seeds)" if c.seeds else ""))
    _style_x(ax, c, x)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def plot_quality(c: Comparison, path: Path) -> bool:
    """Blur, collapse and holes told apart in the judge's features: each setting's fidelity (precision: the share
    of its prior samples that land on the data) against its diversity (recall: the share of the data its samples
    reach), mean ± sd over seeds both ways, with an arrow to the same model sampled from its mixture prior (what
    the holes cost it); the judge's FD per swept value under both priors; its accuracy on reconstructions under its
    ceiling. False when no run has the judge's numbers (no classes, eval.judge=false, or a judge at chance)."""
    table, stats = c.table, c.stats()
    if table[f"{c.split}/judge_precision"].isna().all() and table[f"{c.split}/judge_fd"].isna().all():
        return False
    x, xlabel, series = _x_axis(c)
    fig, (p, a, b) = plt.subplots(1, 3, figsize=(16, 4.6))
    labels = c.labels()
    for i, idx in enumerate(c.settings()):
        row, colour = stats.iloc[i], f"C{i % 10}"
        at = [row.get(f"{c.split}/judge_precision"), row.get(f"{c.split}/judge_recall")]
        if any(pd.isna(v) for v in at):
            continue
        err = [row.get(f"{c.split}/judge_precision sd"), row.get(f"{c.split}/judge_recall sd")]
        p.errorbar(*at, xerr=None if pd.isna(err[0]) else err[0], yerr=None if pd.isna(err[1]) else err[1], fmt="o",
                   color=colour, capsize=3, ms=6, label=labels[idx[0]])
        to = [row.get(f"{c.split}/gmm_judge_precision"), row.get(f"{c.split}/gmm_judge_recall")]
        if not any(pd.isna(v) for v in to):
            p.annotate("", xy=to, xytext=at, arrowprops=dict(arrowstyle="->", color=colour, lw=1.2, alpha=0.8))
            p.scatter(*to, s=36, facecolors="white", edgecolors=colour, zorder=4)
    p.set(xlabel="precision: samples on the data (fidelity)", ylabel="recall: data the samples reach (diversity)",
          title="Fidelity and diversity (o: N(0, I); arrow: mixture prior)", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    p.legend(fontsize=7, loc="best")
    join = _ordered(c)  # categories (likelihood names) are not joined by lines
    for i, (name, idx) in enumerate(series):
        rows = _finished(c, idx)
        _draw(a, x[rows], table.loc[rows, f"{c.split}/judge_fd"], f"C{i}", "o-", f"N(0, I) {name}".strip(), join=join)
        _draw(a, x[rows], table.loc[rows, f"{c.split}/gmm_judge_fd"], f"C{i}", "s--", f"mixture {name}".strip(),
              alpha=0.7, join=join)
        _draw(b, x[rows], table.loc[rows, f"{c.split}/recon_accuracy"], f"C{i}", "o-", name, join=join)
    ceiling = table[f"{c.split}/judge_accuracy"].median()
    if pd.notna(ceiling):
        b.axhline(ceiling, color="grey", ls=":", lw=1)
        b.annotate(f"real images {ceiling:.3f}", (0.01, ceiling), xycoords=("axes fraction", "data"),
                   xytext=(0, -11), textcoords="offset points", fontsize=8, color="grey")
    a.set(xlabel=xlabel, ylabel="Fréchet distance (judge features)", title="Samples against real images (lower better)")
    a.set_ylim(bottom=0)
    a.legend(fontsize=7)
    b.set(xlabel=xlabel, ylabel="accuracy (0-1)", title="Judge's accuracy on reconstructions", ylim=(0, 1.02))
    for ax in (a, b):
        _style_x(ax, c, x)
    if len(series) > 1:
        b.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    return True


def plot_rate_distortion(c: Comparison, path: Path) -> None:
    """Rate (KL) against distortion (recon NLL), one labelled point per setting (mean ± sd over seeds, each seed a
    small dot; Alemi et al. 2018), over dotted iso-ELBO lines (KL + recon = -ELBO, constant along each). Discrete
    and density likelihoods in panels of their own: their distortions are on different scales."""
    kinds = c.kinds()
    panels = [k for k in KINDS if k in kinds]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], panels):
        settings = [idx for idx in c.settings() if kinds[idx[0]] == kind]
        title = f"Rate-distortion ({c.split} split; dotted: equal -ELBO)"
        if len(panels) > 1:
            title = f"{PANEL_TITLES[kind]} ({c.split}; dotted: equal -ELBO)"
        _rate_distortion_panel(ax, c, settings, title)
    fig.tight_layout()
    _save(fig, path)


PANEL_TITLES = {"discrete": "Bernoulli, binary pixels", "cross-entropy": "Bernoulli on grey levels (cross-entropy)",
                "density": "Density likelihoods"}


def _rate_distortion_panel(ax, c: Comparison, settings: List[List[int]], title: str) -> None:
    table, labels = c.table, c.labels()
    kl, recon = table[f"{c.split}/kl"], table[f"{c.split}/recon_nll"]
    shown = []
    for i, idx in enumerate(settings):
        rows = [j for j in _finished(c, idx) if pd.notna(kl[j])]
        if not rows:
            continue
        shown += rows
        mx, my = kl[rows].mean(), recon[rows].mean()
        sx, sy = (kl[rows].std(ddof=1), recon[rows].std(ddof=1)) if len(rows) > 1 else (None, None)
        ax.errorbar(mx, my, xerr=sx, yerr=sy, fmt="o", color=f"C{i % 10}", capsize=3, ms=5)
        if len(rows) > 1:
            ax.scatter(kl[rows], recon[rows], s=12, color=f"C{i % 10}", alpha=0.45, linewidths=0)
        ax.annotate(labels[rows[0]], (mx, my), fontsize=7, xytext=(4, 4), textcoords="offset points")
    if shown:
        x0, x1 = ax.get_xlim()
        y0, y1 = ax.get_ylim()
        total = (kl[shown] + recon[shown]).to_numpy()
        for level in MaxNLocator(nbins=5).tick_values(total.min(), total.max()):
            ax.plot([x0, x1], [level - x0, level - x1], ":", color="grey", lw=0.8, zorder=0)
            if y0 <= level - x1 <= y1:
                ax.annotate(f"-ELBO {level:g}", (x1, level - x1), fontsize=6, color="grey", ha="right", va="bottom")
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
    ax.set(xlabel="rate: KL (nats per image)", ylabel="distortion: recon NLL (nats per image)", title=title)
    ax.grid(alpha=0.3)


def plot_kl_heatmap(c: Comparison, path: Path) -> None:
    """Per-dim KL (nats) of each run on a log colour scale, dims sorted by KL within the run; blank where a run has
    fewer dims; right of each row, its dims above collapse_nats (the count the collapse plot leads with)."""
    runs, labels = c.runs, c.labels(seed=True)
    kls = [sorted(r["summary"].get(f"{c.split}/kl_per_dim") or [], reverse=True) for r in runs]
    width = max([len(k) for k in kls] + [1])
    grid = np.full((len(kls), width), np.nan)
    for i, k in enumerate(kls):
        grid[i, : len(k)] = k
    floor = min(c.collapse_nats / 100, np.nanmin(grid[grid > 0]) if (grid > 0).any() else c.collapse_nats / 100)
    top = max(np.nanmax(grid) if np.isfinite(grid).any() else 1.0, c.collapse_nats * 10)
    fig, ax = plt.subplots(figsize=(min(12, 3.5 + 0.25 * width), 1.2 + 0.35 * len(kls)))
    im = ax.imshow(np.clip(grid, floor, None), aspect="auto", cmap="viridis", interpolation="nearest",
                   norm=LogNorm(vmin=floor, vmax=top))
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.annotate(f"> {c.collapse_nats:g}", (1.01, 0), xycoords="axes fraction", va="top", fontsize=7,
                xytext=(0, -3), textcoords="offset points")  # the counts' header, under their column
    for i, k in enumerate(kls):
        ax.annotate(str(sum(v > c.collapse_nats for v in k)), (1.01, i), xycoords=("axes fraction", "data"),
                    va="center", fontsize=8)
    ax.set(xlabel="latent dim, sorted by KL (0 = most)", title=f"KL per latent dim ({c.split}, nats per image)")
    bar = fig.colorbar(im, ax=ax, label="nats (log scale)", pad=0.08)
    bar.ax.axhline(c.collapse_nats, color="white", lw=1.5)  # the collapse threshold on the scale
    fig.tight_layout()
    _save(fig, path)


def plot_learning_curves(c: Comparison, path: Path) -> bool:
    """Validation -ELBO, KL and IWAE NLL over training steps, every run overlaid, a marker at every eval (so a run
    with one eval shows); one colour per setting (its seeds share it); a row of panels per likelihood kind, whose
    NLLs do not share a scale. False when no run logged a validation row."""
    frames = [metric_rows(r["path"], "val") for r in c.runs]
    if all(f.empty or "val/neg_elbo" not in f for f in frames):
        return False
    colour = {}
    for i, idx in enumerate(c.settings()):
        colour.update({j: f"C{i % 10}" for j in idx})
    labels, kinds = c.labels(), c.kinds()
    rows = [k for k in KINDS if k in kinds]
    fig, axes = plt.subplots(len(rows), 3, figsize=(13, 3.8 * len(rows)), squeeze=False)
    named = set()
    for j, f in enumerate(frames):
        if f.empty or "val/neg_elbo" not in f:
            continue
        label = labels[j] if labels[j] not in named else None
        named.add(labels[j])
        for ax, key in zip(axes[rows.index(kinds[j])], ("val/neg_elbo", "val/kl", "val/iwae_nll")):
            if key in f:
                points = f.dropna(subset=[key])
                ax.plot(points["step"], points[key], "o-", ms=3, color=colour[j], lw=1.2, alpha=0.85, label=label)
    for kind, panels in zip(rows, axes):
        for ax, title in zip(panels, ("-ELBO (nats per image)", "KL (nats per image)", "IWAE NLL (nats per image)")):
            ax.set(xlabel="training step", title=f"validation {title}" + (f", {kind}" if len(rows) > 1 else ""))
            ax.grid(alpha=0.3)
        if panels[0].get_legend_handles_labels()[0]:
            panels[0].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    return True


KL_PANELS = 16  # at most this many settings in kl_over_training.png (one run each: the first seed)


def plot_kl_over_training(c: Comparison, path: Path) -> bool:
    """Per-dim KL over training steps (train/kl_per_dim, log scale) for one run of each setting: when does each
    dim die? The dotted line is collapse_nats. False when no run logged it."""
    chosen = [idx[0] for idx in c.settings()][:KL_PANELS]
    frames = {j: metric_rows(c.runs[j]["path"], "train") for j in chosen}
    frames = {j: f for j, f in frames.items() if not f.empty and "train/kl_per_dim" in f}
    if not frames:
        return False
    cols = min(4, len(frames))
    rows = -(-len(frames) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows), squeeze=False, sharey=True)
    labels = c.labels(seed=True)  # the run drawn is one seed: its title says which, and its count is that run's
    for ax, (j, f) in zip(axes.flat, frames.items()):
        f = f.dropna(subset=["train/kl_per_dim"])
        kl = np.array(f["train/kl_per_dim"].tolist(), dtype=float)  # (log steps, latent dims)
        order = np.argsort(-kl[-1])  # dims by their final KL: colours run from warm (most) to cold (least)
        marker = "o" if len(kl) <= 5 else None  # a run with few log rows still shows its points
        for rank, d in enumerate(order):
            ax.plot(f["step"], np.clip(kl[:, d], 1e-4, None), lw=0.9, marker=marker, ms=3,
                    color=plt.cm.viridis(1 - rank / max(1, len(order) - 1)))
        ax.axhline(c.collapse_nats, color="black", ls=":", lw=0.8)
        ax.set_yscale("log")
        used = c.table.loc[j, f"{c.split}/kl_active_units"]  # on the test split, as the heatmap counts
        used = f"{used:.0f}/{kl.shape[1]} dims in use on {c.split}" if pd.notna(used) else f"{kl.shape[1]} dims"
        ax.set_title(f"{labels[j]}\n{used}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(frames):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("KL per dim (nats)", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("training step", fontsize=8)
    fig.tight_layout()
    key = fig.colorbar(plt.cm.ScalarMappable(cmap="viridis_r"), ax=axes, fraction=0.025, pad=0.02, ticks=[0, 1])
    key.ax.set_yticklabels(["most KL", "least KL"], fontsize=7)  # each dim's colour: its rank by final KL
    key.set_label("dim, by final KL", fontsize=8)
    _save(fig, path)
    return True


def _grid_rows(name: str, run: Dict[str, object], rows: int) -> tuple:
    """Which rows of a run's `name` grid a montage shows, and a label for each: reconstructions' rows alternate
    input and output; a traversal's rows are its dims (the two with most KL, the two with least), each labelled
    with its index and KL; samples' rows are unlabelled."""
    if name == "reconstructions.png":
        return list(range(rows)), ["input" if r % 2 == 0 else "output" for r in range(rows)]
    if name == "traversals.png":
        kl = run["summary"].get("val/kl_per_dim") or []
        dims = run["summary"].get("grid/traversal_dims")
        if dims is None:  # a run of an earlier release: its rows were the dims with most KL
            dims = sorted(range(len(kl)), key=lambda d: -kl[d])[: int(run["recorded"].get("eval.traversal_dims", 8))]
        picked = list(range(len(dims))) if len(dims) <= rows else [0, 1, len(dims) - 2, len(dims) - 1]
        return picked, [f"z{dims[r]} {kl[dims[r]]:.2f} nats" for r in picked]
    return list(range(rows)), [""] * rows


def _image(path: Path) -> Optional[Image.Image]:
    """The grid PNG at `path` as RGB; None (with one line) where there is none or it is not an image."""
    if not path.is_file():
        return None
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
        log.warning("%s is not a readable image (%s); left out of the montage", path, str(e).splitlines()[0][:100])
        return None


MIXTURE_GRID = RunDir("").mixture_samples.name  # src/prior.py's grid: the samples montage pairs it with samples.png
PAIR_GAP = 6  # px between a run's N(0, I) samples and its mixture prior's


def _cropped(run: Dict[str, object], name: str) -> tuple:
    """The part of a run's `name` grid a montage shows (MONTAGE_ROWS rows, see _grid_rows, of MONTAGE_COLS
    images) and a label for each row; (None, []) where there is no readable grid."""
    img = _image(run["path"] / name)
    size = int(run["settings"].get("data.image_size") or 0)
    if img is None or not size:
        return img, []
    available = (img.height - 2) // (size + 2)  # torchvision's grid: 2 px padding around (size)-px images
    picked, texts = _grid_rows(name, run, min(MONTAGE_ROWS, available))
    width = min(img.width, 2 + MONTAGE_COLS * (size + 2))
    strips = [img.crop((0, 2 + row * (size + 2) - 2, width, 2 + (row + 1) * (size + 2))) for row in picked
              if row < available]
    out = Image.new("RGB", (width, 2 + len(strips) * (size + 2)), "white")
    for i, strip in enumerate(strips):
        out.paste(strip, (0, i * (size + 2)))
    return out, texts


def montage(c: Comparison, name: str, path: Path, per_row: int = 3) -> bool:
    """The runs' `name` grids side by side: MONTAGE_ROWS rows (see _grid_rows) of MONTAGE_COLS images of each,
    enlarged by one whole factor (nearest neighbour, so pixels stay pixels), each row labelled where a row means
    something (input/output, a dim and its KL), captioned with the run's swept values and any non-finished
    status; False if no run has one."""
    runs, labels = c.runs, c.labels(seed=True)
    if not any((r["path"] / name).is_file() for r in runs):
        return False
    grids, row_labels = [], []
    paired = name == "samples.png" and any((r["path"] / MIXTURE_GRID).is_file() for r in runs)
    for r in runs:
        img, texts = _cropped(r, name)
        if paired and img is not None:  # N(0, I) | the mixture prior, side by side, the same rows of each
            mixture = _cropped(r, MIXTURE_GRID)[0] or Image.new("RGB", img.size, "lightgrey")
            both = Image.new("RGB", (img.width + PAIR_GAP + mixture.width, max(img.height, mixture.height)), "white")
            both.paste(img, (0, 0))
            both.paste(mixture, (img.width + PAIR_GAP, 0))
            img = both
        grids.append(img)
        row_labels.append(texts)
    if all(g is None for g in grids):  # (every one there was damaged)
        return False
    widest = max(g.width for g in grids if g is not None)
    scale = -(-MONTAGE_WIDTH // widest)  # ceil: 28-px images twice their size, 16-px ones three times
    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=11)
    margin = 92 if any(any(t) for t in row_labels) else 0  # room for the row labels
    tiles = []
    for g, r, label, texts in zip(grids, runs, labels, row_labels):
        g = g.resize((g.width * scale, g.height * scale), Image.NEAREST) if g is not None else \
            Image.new("RGB", (widest * scale, widest * scale // 2), "lightgrey")
        status = r["summary"].get("status", "incomplete")
        caption = label if status == "finished" else f"{label} [{status}]"
        caption += "   N(0, I) | mixture" if paired else ""
        tile = Image.new("RGB", (g.width + margin, g.height + 22), "white")
        tile.paste(g, (margin, 22))
        draw = ImageDraw.Draw(tile)
        draw.text((2, 3), caption, fill="black", font=font)
        row_h = g.height / max(1, len(texts))
        for i, text in enumerate(texts):
            draw.text((2, 22 + (i + 0.5) * row_h), text, fill="black", font=small, anchor="lm")
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
        binarised = fixed.get("data.binarize", "none")
        lines.append(f"data: {fixed['data.name']}, {size}x{size}x{fixed['data.channels']}"
                     + (f", train/val/test {sizes} images" if sizes else "")
                     + (f", pixels binarised ({binarised})" if binarised != "none" else ""))
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
    if c.seeds:
        seeds = sorted(set(table["seed"].dropna()), key=lambda v: (str(type(v)), v))
        n = c.stats()["n"]
        lines.append(f"seeds: {', '.join(map(fmt, seeds))}; each setting is the mean ± sample sd over its finished "
                     f"seeds (n = {n.min()}" + (f" to {n.max()}" if n.max() != n.min() else "") + " per setting).")
    kinds = [k for k in KINDS if k in c.kinds()]
    if len(kinds) > 1:
        lines.append(f"likelihoods of {len(kinds)} kinds: " + "; ".join(f"{k} ({KINDS[k]})" for k in kinds)
                     + ". NLLs and bits/dim compare only within a kind, so the table's `kind` column and the "
                       "rate-distortion plot keep them apart.")
    elif kinds != ["density"]:
        lines.append(f"NLL: {KINDS[kinds[0]]}.")
    lines += _fixed_lines(c.fixed, c.runs)
    lines += _provenance_lines(c)
    blur, mi_max = table[f"{c.split}/data_blur"].median(), table[f"{c.split}/mutual_info_max"].max()
    if pd.notna(blur):
        lines.append(f"metrics: final, on the {c.split} split; NLLs and KL in nats per image; blur 0 (sharp) to 1 "
                     f"(flat), the real {c.split} images' own is {blur:.3f}; MI cannot exceed log N = {mi_max:.2f}; "
                     f"a dim with mean KL at or below {c.collapse_nats:g} nats counts as collapsed.")
    return lines


def _iwae_line(c: Comparison) -> Optional[str]:
    """At which k and over how many images the finished runs' IWAE NLLs were computed (header and caption)."""
    done = c.table[c.table["status"].eq("finished")][[f"{c.split}/iwae_k", f"{c.split}/iwae_images"]].dropna()
    pairs = sorted({(int(k), int(n)) for k, n in done.itertuples(index=False)})
    if not pairs:
        return None
    text = "; ".join(f"k = {k:,} importance samples per image over {n:,} images" for k, n in pairs)
    return f"IWAE NLL: {text}" + (" (it differs between runs: see the IWAE k and IWAE images columns)"
                                  if len(pairs) > 1 else "") + "."


def _provenance_lines(c: Comparison) -> List[str]:
    """Where the numbers come from and what they can be trusted for: which runs' test numbers are src.evaluate's,
    each IWAE's k and images, the mean-image MSE baseline, and the runs that had not converged."""
    table, lines = c.table, []
    done = table[table["status"].eq("finished")]
    careful = done["numbers"].str.startswith("src.evaluate") if "numbers" in done else pd.Series(False, index=done.index)
    missing = done[f"{c.split}/neg_elbo"].isna()
    if careful.any():
        rest = int((~careful & ~missing).sum())
        lines.append(f"numbers: {int(careful.sum())} of {len(done)} finished runs' {c.split} numbers are "
                     "src.evaluate's (the table.csv column `numbers` names each file)"
                     + (f"; {rest} come from training's final eval" if rest else "") + ".")
    if missing.any():
        lines.append(f"{int(missing.sum())} of {len(done)} finished runs have no {c.split} numbers (eval.final=none): "
                     "python -m src.evaluate <run dir> adds them; a setting's row averages the runs that have them.")
    if (iwae := _iwae_line(c)) is not None:
        lines.append(iwae)
    se = {m: done[f"{c.split}/{m}_se"].dropna() for m in ("mutual_info", "mig")}
    if len(se["mutual_info"]):
        lines.append(f"uncertainty of one run's estimates: MI ± its standard error over images and z (at most "
                     f"{se['mutual_info'].max():.3f} nats here)" + (f", MIG ± its bootstrap standard error (at most "
                     f"{se['mig'].max():.3f})" if len(se["mig"]) else "") + ("; the table pools seeds, so its ± is the sd over "
                     "seeds, which includes this noise (table.csv has each run's *_se)." if c.seeds else "."))
    binarised = any(c.setting(r, "data.binarize") != "none" for r in c.runs)
    if binarised and done[f"{c.split}/judge_accuracy"].notna().any():
        lines.append("judge under data.binarize: it learnt the grey-level train images, and reads binarised real "
                     "test images but grey-level samples and reconstructions (Bernoulli means), so its accuracy on "
                     "the real images is no ceiling here and its FD mixes the two kinds of image; compare its "
                     "numbers only between these runs.")
    blind = done[done[f"{c.split}/judge_chance"].notna() & done[f"{c.split}/judge_fd"].isna()]
    if len(blind):
        lines.append(f"judge at chance: for {len(blind)} of {len(done)} finished runs the judge classifier could not "
                     f"tell the classes of the real {c.split} images apart (accuracy "
                     f"{blind[f'{c.split}/judge_accuracy'].median():.3f} against {blind[f'{c.split}/judge_chance'].median():.3f}"
                     " for always guessing the commonest class), so its sample scores would rate noise like data: "
                     "they read 'at chance'. More training images per class make a judge that sees.")
    baseline = done[f"{c.split}/mse_mean_image"].dropna()
    if len(baseline):
        lines.append(f"MSE per pixel (0-1 pixel values): always predicting the mean training image gives "
                     f"{baseline.median():.4f}, the trivial baseline a reconstruction must beat.")
    falling = c.still_falling()
    if falling:
        labels = c.labels(seed=True)
        lines.append(f"NOT CONVERGED: {len(falling)} of {len(done)} finished runs' validation -ELBO still fell by more "
                     f"than {STILL_FALLING:.0%} over the last quarter of training ("
                     + ", ".join(f"{labels[i]}: {table.loc[i, 'val/drop_last_quarter']:.1f} nats" for i in falling[:6])
                     + (", ..." if len(falling) > 6 else "") + "); their numbers are not final: train longer "
                     "(a larger trainer.max_steps or max_epochs continues them).")
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
{study}
<div class="what">{what}</div>
<h2>Final metrics</h2>
{table}
{figures}
<h2>Every setting the runs share</h2>
<details><summary>{n_fixed} settings</summary>{fixed}</details>
</body></html>
"""


def how_to_read(figure: str) -> str:
    """A figure's line on how to read it: a comparison's (HOW_TO_READ) or a study's (src/study.py)."""
    return HOW_TO_READ[figure] if figure in HOW_TO_READ else studies.STUDY_FIGURES[figure][1]


def title(figure: str) -> str:
    return TITLES[figure] if figure in TITLES else studies.STUDY_FIGURES[figure][0]


def _vector_link(figure: str) -> str:
    """A plot's PDF beside its PNG, for a paper (montages are pixels: PNG only)."""
    if "montage" in figure:
        return ""
    pdf = html.escape(figure.replace(".png", ".pdf"))
    return f' Vector: <a href="{pdf}">{pdf}</a>.'


def write_report(c: Comparison, figures: List[str], out: Path, sources: List[Path], study: str = "") -> None:
    """report.html: the header, the short table, every figure with its how-to-read line; readable offline.
    `study`: the section of an Optuna study (src/study.py), first."""
    what = "".join(f"<p>{html.escape(line)}</p>" for line in header_lines(c))
    what += f"<p>Runs from {html.escape(', '.join(map(str, sources)))}.</p>"
    figs = "\n".join(
        f'<h2>{html.escape(title(f))}</h2><figure>'
        f'<img src="{html.escape(f)}"{" class=pixels" if "montage" in f else ""} alt="{html.escape(f)}">'
        f"<figcaption>{html.escape(how_to_read(f))}{_vector_link(f)}</figcaption></figure>" for f in figures)
    shown = {k: v for k, v in c.fixed.items() if applies(k, c.fixed)}  # not loss.sigma of a Bernoulli decoder
    fixed = pd.DataFrame({"setting": list(shown), "value": [fmt(v) for v in shown.values()]})
    if study:
        study = "<h2>The study</h2>" + study
    (out / "report.html").write_text(PAGE.format(
        title="VAE sweep comparison", what=what, study=study, table=display_table(c).to_html(index=False, border=0),
        figures=figs, n_fixed=len(fixed), fixed=fixed.to_html(index=False, border=0)))




def render(c: Comparison, out: Path, sources: List[Path], paper: Optional[List[str]] = None,
           study: Optional[object] = None) -> List[str]:
    """Write table.csv (one row per run), table.md, settings.csv and settings.tex (one row per setting, mean and
    sd over seeds), the plots (when some run finished), the montages and report.html into `out`; an Optuna
    `study` adds study.csv, its plots and its section; returns the figures' file names."""
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    if study is not None:
        studies.trials_table(study).to_csv(out / "study.csv", index=False)
        figures += studies.draw(study, out)
    c.table.to_csv(out / "table.csv", index=False)
    (out / "table.md").write_text("\n\n".join(header_lines(c)) + "\n\n" + display_table(c).to_markdown(index=False)
                                  + "\n")
    export_tables(c, out, paper, label=re.sub(r"[^A-Za-z0-9]+", "-", sources[0].resolve().name).strip("-") or "vae")
    if c.finished():
        for name, plot in (("collapse.png", plot_collapse), ("blur.png", plot_blur),
                           ("rate_distortion.png", plot_rate_distortion), ("kl_per_dim.png", plot_kl_heatmap)):
            plot(c, out / name)
            figures.append(name)
    for name, plot in (("quality.png", plot_quality), ("learning_curves.png", plot_learning_curves),
                       ("kl_over_training.png", plot_kl_over_training)):
        if plot(c, out / name):
            figures.append(name)
    for grid in ("samples", "reconstructions", "traversals"):
        if montage(c, f"{grid}.png", out / f"{grid}_montage.png"):
            figures.append(f"{grid}_montage.png")
    metric = study.user_attrs.get("settings", {}).get("metric", "value") if study is not None else ""
    write_report(c, figures, out, sources, studies.section(study, metric) if study is not None else "")
    return figures
