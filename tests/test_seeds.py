"""Seeds are replicates: `src.compare` pools runs that differ only in `seed` into one setting (mean, sample sd,
n), exports them for a paper, and leads its collapse count with KL (eval.collapse_nats), the count the KL heatmap
shows. The run dirs are written as training writes them (trained_with.yaml from the composed config, summary.json),
with chosen numbers, so every figure here is known in advance."""
from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from src.comparison import collect
from src.identity import record_config
from src.report import display_table, header_lines, render
from src.rundir import RunDir, write_json
from src.config_check import parse

from .conftest import compose_cfg, run_cli, tiny_overrides

NEG_ELBO = {(1.0, 0): 100.0, (1.0, 1): 104.0, (1.0, 2): 99.0, (4.0, 0): 120.0, (4.0, 1): 118.0, (4.0, 2): 125.0}


def write_run(folder, overrides, kl_per_dim, neg_elbo, active_units, split="test"):
    """A finished run dir as training leaves it: the record of the composed config and a summary."""
    config = OmegaConf.to_container(OmegaConf.structured(parse(compose_cfg([*tiny_overrides(folder), *overrides]))))
    rd = RunDir(folder)
    rd.root.mkdir(parents=True)
    record_config(rd, config)
    kl = float(sum(kl_per_dim))
    metrics = {"neg_elbo": neg_elbo, "kl": kl, "recon_nll": neg_elbo - kl, "iwae_nll": neg_elbo - 1,
               "bits_per_dim": neg_elbo / 256 / np.log(2), "kl_per_dim": kl_per_dim, "active_units": active_units,
               "kl_active_units": -1, "mutual_info": 1.0, "mutual_info_max": 4.0, "mutual_info_capped": False,
               "sample_blur": 0.2, "recon_blur": 0.15, "data_blur": 0.01}
    write_json(rd.summary, {"status": "finished", "step": 8, **{f"{split}/{k}": v for k, v in metrics.items()}})


@pytest.fixture
def seeded(tmp_path):
    """beta 1 and 4, three seeds each; every run's posterior mean moves in all 4 dims (active units 4), but at
    beta 4 only one dim carries more than 0.1 nats."""
    for i, ((beta, seed), neg_elbo) in enumerate(NEG_ELBO.items()):
        kl = [2.0, 1.0, 0.5, 0.2] if beta == 1 else [0.6, 0.08, 0.05, 0.02]
        write_run(tmp_path / "sweep" / str(i), [f"loss.beta={beta}", f"seed={seed}"], kl, neg_elbo, 4)
    return tmp_path / "sweep"


def test_runs_that_differ_only_in_seed_are_one_setting_with_mean_sd_and_n(seeded):
    c = collect([seeded])
    assert c.swept == ["loss.beta"] and c.seeds
    assert list(c.table["seed"]) == [0, 1, 2, 0, 1, 2]  # the per-run table keeps every seed
    table = display_table(c)
    assert list(table["beta"]) == ["1", "4"] and list(table["n"]) == [3, 3]
    for beta, row in zip((1.0, 4.0), table["-ELBO (nats)"]):
        values = [v for (b, _), v in NEG_ELBO.items() if b == beta]
        assert row == f"{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f}"


def test_the_paper_export_has_units_in_its_headers_and_mean_pm_sd_in_latex(seeded):
    c = collect([seeded])
    render(c, seeded / "compare", [seeded])
    settings = pd.read_csv(seeded / "compare" / "settings.csv")
    one = [v for (b, _), v in NEG_ELBO.items() if b == 1.0]
    assert settings.loc[0, "test/neg_elbo mean (nats)"] == pytest.approx(np.mean(one))
    assert settings.loc[0, "test/neg_elbo sd (nats)"] == pytest.approx(np.std(one, ddof=1))
    assert "test/bits_per_dim mean (bits/dim)" in settings and list(settings["n"]) == [3, 3]
    tex = (seeded / "compare" / "settings.tex").read_text()
    assert r"\toprule" in tex and rf"{np.mean(one):.1f} $\pm$ {np.std(one, ddof=1):.1f}" in tex
    assert len(pd.read_csv(seeded / "compare" / "table.csv")) == 6  # one row per seed
    report = (seeded / "compare" / "report.html").read_text()
    assert "n = 3 per setting" in report
    # the shared-settings fold lists what means something for these runs: shapes' sizes, not a Bernoulli's sigma
    assert "<td>data.test_size</td>" in report and "<td>loss.sigma</td>" not in report
    assert "<td>loss.warmup_steps</td>" not in report  # no linear KL schedule here


PDFLATEX = shutil.which("pdflatex")


def test_settings_tex_is_a_paper_table_with_kinds_math_and_a_label(tmp_path):
    """Mixed likelihoods with seeds: settings.tex keeps each row's kind, says $\beta$ and $-$ELBO in math, has a
    caption and a label, shows the columns asked for, and counts' means keep their decimals; an unknown column is
    one line naming it."""
    sweep = tmp_path / "beta-study"
    kl = {1: [2.0, 1.0, 0.5, 0.2], 2: [2.0, 1.0, 0.05, 0.2]}  # seed 2 uses one dim fewer: 3.67 dims over 3 seeds
    for i, (likelihood, seed) in enumerate([(lk, sd) for lk in ("bernoulli", "gaussian") for sd in (0, 1, 2)]):
        write_run(sweep / str(i), [f"loss.likelihood={likelihood}", f"seed={seed}", "loss.beta=2"],
                  kl[2 if seed == 2 else 1], 250.0 + seed if likelihood == "bernoulli" else -1729.5 - seed, 4)
    c = collect([sweep])
    render(c, sweep / "compare", [sweep], paper=["neg_elbo", "kl", "kl_active_units"])
    tex = (sweep / "compare" / "settings.tex").read_text()
    assert r"\label{tab:beta-study}" in tex and r"\caption{" in tex and r"$-$ELBO (nats)" in tex
    assert r"kind & $n$ & $-$ELBO (nats) & KL (nats) & KL $>$ 0.1 dims \\" in tex
    assert r"bernoulli & discrete & 3 & 251.0 $\pm$ 1.0" in tex and r"gaussian & density & 3 & $-$1730.5 $\pm$ 1.0" in tex
    assert r"3.67 $\pm$ 0.58" in tex and "IWAE" not in tex.split(r"\midrule")[0].split(r"\label")[1]
    assert display_table(c)["KL > 0.1 dims"].tolist() == ["3.67 ± 0.58"] * 2
    with pytest.raises(ValueError, match="--columns nelbo: not a metric; choose from neg_elbo"):
        render(c, tmp_path / "other", [sweep], paper=["nelbo"])
    if PDFLATEX is None:  # CI installs texlive (.ci/run); a machine without it checks the text above only
        return
    doc = tmp_path / "paper.tex"
    doc.write_text("\\documentclass{article}\n\\usepackage{booktabs,graphicx}\n\\begin{document}\n"
                   f"\\input{{{sweep / 'compare' / 'settings.tex'}}}\n\\end{{document}}\n")
    made = subprocess.run([PDFLATEX, "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0 and (tmp_path / "paper.pdf").is_file(), made.stdout[-3000:]
    assert "Overfull \\hbox" not in (tmp_path / "paper.log").read_text()  # it fits the text width


def test_the_collapse_count_is_the_kl_count_whatever_active_units_say(seeded):
    """Active units read 4/4 in every run; the headline count is the dims above eval.collapse_nats: 4 at beta 1,
    1 at beta 4, the numbers the heatmap prints beside its rows."""
    c = collect([seeded])
    assert c.collapse_nats == 0.1
    assert list(c.table["test/kl_active_units"]) == [4, 4, 4, 1, 1, 1]
    assert list(c.table["test/active_units"]) == [4] * 6
    assert "KL > 0.1 dims" in display_table(c)


def test_eval_collapse_nats_moves_the_threshold_everywhere(tmp_path):
    for i, seed in enumerate((0, 1)):
        write_run(tmp_path / "sweep" / str(i), [f"seed={seed}", "eval.collapse_nats=0.03"], [0.6, 0.08, 0.05, 0.02],
                  110.0, 4)
    c = collect([tmp_path / "sweep"])
    assert c.collapse_nats == 0.03 and list(c.table["test/kl_active_units"]) == [3, 3]
    assert "KL > 0.03 dims" in display_table(c)


def test_a_bad_collapse_threshold_is_one_line_naming_the_key(tmp_path):
    result = run_cli([*tiny_overrides(tmp_path), "eval.collapse_nats=0", f"hydra.run.dir={tmp_path / 'run'}"])
    out = result.stdout + result.stderr
    assert result.returncode == 2 and "eval.collapse_nats=0.0 is not allowed" in out and "Traceback" not in out


def test_a_real_seed_sweep_pools_its_members(tmp_path):
    """`seed=range(2)` on the command line adds seeds to any study; compare pools them (real runs, in process)."""
    sweep = tmp_path / "sweep"
    result = run_cli(["-m", *tiny_overrides(tmp_path / "cache"), "trainer.max_steps=2", "loss.beta=1,4",
                      "seed=range(2)", f"hydra.sweep.dir={sweep}"])
    assert result.returncode == 0, result.stderr[-2000:]
    summaries = [json.loads((sweep / str(i) / "summary.json").read_text()) for i in range(4)]
    c = collect([sweep])
    assert c.swept == ["loss.beta"] and c.seeds and list(c.stats()["n"]) == [2, 2]
    beta1 = [s["test/neg_elbo"] for s, beta in zip(summaries, c.table["loss.beta"]) if beta == 1.0]
    assert c.stats().loc[0, "test/neg_elbo"] == pytest.approx(np.mean(beta1))


def test_a_bernoulli_nll_of_grey_levels_is_called_a_cross_entropy_not_the_probability_of_an_image(tmp_path):
    """On grey-level data a Bernoulli NLL is a binary cross-entropy against pixel values in [0, 1]; only on binarised
    pixels is it the probability of an image. The header says which, and the two are kept apart like two kinds."""
    grey = ["data.name=mnist", "data.root=/data/mnist", "loss.likelihood=bernoulli"]
    write_run(tmp_path / "grey" / "0", grey, [1.0, 0.5, 0.2, 0.01], 250.0, 4)
    c = collect([tmp_path / "grey"])
    assert c.kinds() == ["cross-entropy"]
    [line] = [line for line in header_lines(c) if line.startswith("NLL:")]
    assert "binary cross-entropy" in line and "probability of no image" in line and "8-bit" not in line
    for i, binarize in enumerate(("none", "dynamic")):
        write_run(tmp_path / "both" / str(i), [*grey, f"data.binarize={binarize}"], [1.0, 0.5, 0.2, 0.01], 250.0, 4)
    summary = json.loads((tmp_path / "both" / "1" / "summary.json").read_text())  # the binarised run, judged
    write_json(tmp_path / "both" / "1" / "summary.json", {**summary, "test/judge_accuracy": 0.5})
    c = collect([tmp_path / "both"])
    assert c.kinds() == ["cross-entropy", "discrete"] and list(display_table(c)["kind"]) == ["discrete", "cross-entropy"]
    assert any(line.startswith("judge under data.binarize") and "no ceiling" in line for line in header_lines(c))
    assert any("probability of the binary image" in line and "2 kinds" in line for line in header_lines(c))


def test_discrete_and_density_likelihoods_are_kept_apart(tmp_path):
    """A Bernoulli NLL (a probability, >= 0 nats) beside Gaussian densities (negative here): the table marks each
    row's kind with the discrete rows first, and the header says the NLLs compare only within a kind."""
    for i, (likelihood, neg_elbo) in enumerate((("gaussian", -1900.0), ("bernoulli", 255.0), ("laplace", -450.0))):
        write_run(tmp_path / "sweep" / str(i), [f"loss.likelihood={likelihood}"], [1.0, 0.5, 0.2, 0.01], neg_elbo, 4)
    c = collect([tmp_path / "sweep"])
    assert c.kinds() == ["density", "discrete", "density"]
    table = display_table(c)
    assert list(table["kind"]) == ["discrete", "density", "density"]
    assert list(table["likelihood"]) == ["bernoulli", "gaussian", "laplace"]
    assert list(table["-ELBO (nats)"]) == ["255.0", "-1900.0", "-450.0"]  # each row's numbers moved with it
    figures = render(c, tmp_path / "out", [tmp_path / "sweep"])
    assert "rate_distortion.png" in figures
    assert "compare only within a kind" in (tmp_path / "out" / "report.html").read_text()


def test_runs_without_a_test_eval_are_compared_on_val(tmp_path):
    """eval.final=none (a cheap sweep): the comparison reads the last val eval and says so."""
    for i, beta in enumerate((1.0, 4.0)):
        write_run(tmp_path / "sweep" / str(i), [f"loss.beta={beta}", "eval.final=none"], [1.0, 0.5, 0.2, 0.01],
                  100.0 + i, 4, split="val")
    c = collect([tmp_path / "sweep"])
    assert c.split == "val" and list(c.table["val/neg_elbo"]) == [100.0, 101.0]
    render(c, tmp_path / "out", [tmp_path / "sweep"])
    assert "on the val split" in (tmp_path / "out" / "report.html").read_text()


def test_the_cheap_sweep_path_puts_src_evaluate_numbers_in_the_comparison(tmp_path):
    """eval.final=none, then src.evaluate: the comparison has test numbers (the judge's too), says they are
    src.evaluate's and at which k over how many images; a larger k's file wins, and an evaluation of an earlier
    checkpoint is not this run's result."""
    from src.train import train

    run = tmp_path / "sweep" / "0"
    train(compose_cfg([*tiny_overrides(tmp_path / "cache"), "eval.final=none"]), run_dir=run)
    for k in ("4", "8"):
        assert run_cli([str(run), f"iwae_k={k}"], module="src.evaluate").returncode == 0
    stale = json.loads((run / "eval_test_k8.json").read_text())
    (run / "eval_test_k50.json").write_text(json.dumps({**stale, "step": 4, "test/iwae_k": 50}))  # an earlier one
    c = collect([tmp_path / "sweep"])
    careful = json.loads((run / "eval_test_k8.json").read_text())
    assert c.split == "test" and c.table.loc[0, "test/neg_elbo"] == careful["test/neg_elbo"]
    # src.evaluate computes the judge's numbers (here a judge at chance on 256 train images: its accuracies)
    assert c.table.loc[0, "test/judge_accuracy"] == careful["test/judge_accuracy"]
    assert c.table.loc[0, "test/judge_chance"] == careful["test/judge_chance"]
    assert c.table.loc[0, "numbers"] == "src.evaluate (eval_test_k8.json)" and c.table.loc[0, "test/iwae_k"] == 8
    lines = header_lines(c)
    assert "IWAE NLL: k = 8 importance samples per image over 64 images." in lines
    assert any(line.startswith("numbers: 1 of 1 finished runs' test numbers are src.evaluate's") for line in lines)
    assert any("always predicting the mean training image gives" in line for line in lines)
    assert c.table.loc[0, "test/mutual_info_se"] > 0 and any(line.startswith("uncertainty of one run's") for line in lines)
    mi = display_table(c)["MI (nats)"][0]  # the estimate with its standard error
    assert mi == f"{careful['test/mutual_info']:.2f} ± {careful['test/mutual_info_se']:.2f}"


def test_a_run_still_improving_at_its_end_is_called_not_converged(tmp_path):
    """Validation -ELBO still falling 170 nats per 20 steps at the end: the header says the numbers are not final
    and names the run; a flat run is not named."""
    for i, (beta, curve) in enumerate(((1.0, [900, 700, 530, 360]), (4.0, [300, 251, 250.5, 250.4]))):
        folder = tmp_path / "sweep" / str(i)
        write_run(folder, [f"loss.beta={beta}", "trainer.max_steps=80"], [1.0, 0.5, 0.2, 0.01], curve[-1], 4)
        summary = json.loads((folder / "summary.json").read_text())
        write_json(folder / "summary.json", {**summary, "step": 80, "val/neg_elbo": curve[-1]})
        (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": 20 * (j + 1), "val/neg_elbo": v}) + "\n"
                                                      for j, v in enumerate(curve)))
    c = collect([tmp_path / "sweep"])
    assert c.still_falling() == [0]
    [line] = [line for line in header_lines(c) if line.startswith("NOT CONVERGED")]
    assert "1 of 2 finished runs" in line and "beta=1: 170.0 nats" in line and "beta=4" not in line


def test_figures_of_a_likelihood_study_keep_kinds_apart_and_draw_single_points(tmp_path):
    """Likelihood names on x are categories: markers, no lines between them; one eval per run still draws (a
    marker); discrete and density NLLs get a row of curves each; every plot has a PDF beside its PNG; titles are
    written, not derived from file names."""
    import matplotlib.pyplot as plt
    from PIL import Image

    from src.report import _draw

    for i, (likelihood, neg_elbo) in enumerate((("bernoulli", 250.0), ("gaussian", -1900.0))):
        folder = tmp_path / "sweep" / str(i)
        write_run(folder, [f"loss.likelihood={likelihood}"], [1.0, 0.5, 0.2, 0.01], neg_elbo, 4)
        (folder / "metrics.jsonl").write_text(json.dumps({"step": 8, "val/neg_elbo": neg_elbo, "val/kl": 1.7}) + "\n")
    c = collect([tmp_path / "sweep"])
    figures = render(c, tmp_path / "out", [tmp_path / "sweep"])
    for name in ("collapse", "blur", "rate_distortion", "kl_per_dim", "learning_curves"):
        assert f"{name}.png" in figures and (tmp_path / "out" / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"
    with Image.open(tmp_path / "out" / "learning_curves.png") as img:
        assert img.height > 1.5 * 3.8 * 110  # two rows of panels: discrete, density
    report = (tmp_path / "out" / "report.html").read_text()
    assert "<h2>KL per latent dim</h2>" in report and "Kl per dim" not in report and 'href="collapse.pdf"' in report
    fig, ax = plt.subplots()
    _draw(ax, [0.0, 1.0], [2.0, 3.0], "C0", "o-", "categories", join=False)
    assert all(line.get_linestyle() == "None" and line.get_marker() == "o" for line in ax.lines)
    plt.close(fig)


def test_traversals_walk_the_most_and_the_least_active_dims():
    from src.visuals import traversal_dims

    kl = [0.5, 3.0, 0.01, 2.0, 0.02, 1.0, 0.3, 0.2, 0.001, 0.1]
    assert traversal_dims(kl, 8) == [1, 3, 5, 0, 6, 7, 2, 8]  # six with most KL, then the two with least
    assert traversal_dims(kl[:3], 8) == [1, 0, 2]  # fewer dims than rows: all, by KL
    assert traversal_dims(kl, 3) == [1, 3, 5]


def test_a_judge_at_chance_reads_at_chance_and_a_capped_mi_makes_the_marginal_kl_at_most(tmp_path):
    """Beta 1's judge could not tell the classes apart (its accuracy, no scores): its precision cells read
    'at chance' and a header line says why; beta 4's has numbers. Where MI sits at its ceiling (a lower bound), the
    marginal KL computed from it is an upper bound: '≤'."""
    for i, beta in enumerate((1, 4)):
        folder = tmp_path / "sweep" / str(i)
        write_run(folder, [f"loss.beta={beta}"], [1.0, 0.5, 0.2, 0.01], 100.0 + i, 4)
        summary = json.loads((folder / "summary.json").read_text())
        judged = {"test/judge_accuracy": 0.3, "test/judge_chance": 0.35} if beta == 1 else \
            {"test/judge_accuracy": 0.9, "test/judge_chance": 0.35, "test/judge_fd": 2.0, "test/judge_precision": 0.7,
             "test/judge_recall": 0.4}
        write_json(folder / "summary.json", {**summary, **judged, "test/marginal_kl": 1.5 - i,
                                             "test/mutual_info_capped": beta == 1})
    c = collect([tmp_path / "sweep"])
    table = display_table(c)
    assert list(table["precision (0-1)"]) == ["at chance", "0.700"]
    assert list(table["judge FD (lower better)"]) == ["at chance", "2.00"]
    assert list(table["marginal KL (nats)"]) == ["≤ 1.50", "0.50"]
    [line] = [line for line in header_lines(c) if line.startswith("judge at chance")]
    assert "1 of 2 finished runs" in line and "0.300 against 0.350" in line
    render(c, tmp_path / "compare", [tmp_path / "sweep"])  # the paper table's default columns carry them too
    tex = (tmp_path / "compare" / "settings.tex").read_text()
    assert r"KL$(q(z) \| p(z))$ (nats) & precision & recall \\" in tex
    assert r"$\leq$ 1.50 & at chance & at chance \\" in tex and r"0.50 & 0.700 & 0.400 \\" in tex
    assert "Precision and recall (0--1, higher is better)" in tex
