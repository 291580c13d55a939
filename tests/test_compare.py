"""A real sweep with a failing member, then `python -m src.compare` on it."""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from src.report import HOW_TO_READ, MONTAGE_COLS, MONTAGE_ROWS, MONTAGE_WIDTH, PAIR_GAP

from .conftest import ROOT, leet, run_cli, tiny_overrides


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    proc = run_cli(["-m", *tiny_overrides(root / "cache"), "trainer.max_steps=60", "trainer.eval_every=60", "loss.beta=0.5,4,-1",
                    "data.num_train=2048", "data.test_size=256",  # a judge that sees the classes (256 images: chance)
                    "logger=wandb", f"hydra.sweep.dir={root / 'sweep'}"])
    return root / "sweep", proc


def test_a_failing_member_does_not_stop_the_others(sweep):
    folder, proc = sweep
    assert proc.returncode != 0  # the sweep says it was not all well
    for member in ("0", "1"):
        assert json.loads((folder / member / "summary.json").read_text())["status"] == "finished"
    failed = json.loads((folder / "2" / "summary.json").read_text())
    assert failed["status"] == "failed" and "loss.beta" in failed["error"]
    # ... and in W&B: a run that exited 1 with the error in its summary
    records = leet(folder / "2" / "wandb")
    assert next(r["exit"]["exit_code"] for r in records if r["type"] == "exit") == 1
    assert "loss.beta" in json.dumps(leet(folder / "2" / "wandb", summary=True))
    tail = proc.stdout.strip().splitlines()[-2:]  # the log (stdout) ends by naming the failure
    assert "member 2 failed" in tail[0] and "loss.beta" in tail[0] and "1 member(s)" in tail[1]


@pytest.fixture(scope="module")
def compared(sweep):
    """`python -m src.compare <sweep>` once for the module (a real process: the smoke test of the command)."""
    folder, _ = sweep
    return folder, run_cli([str(folder)], module="src.compare", real_process=True)


def test_compare_writes_table_plots_montages_and_report(compared):
    folder, proc = compared
    assert proc.returncode == 0, proc.stderr
    out = folder / "compare"
    table = pd.read_csv(out / "table.csv")
    assert list(table["loss.beta"]) == [0.5, 4.0, -1.0]
    assert list(table["status"]) == ["finished", "finished", "failed"]
    assert table["test/kl"].notna().tolist() == [True, True, False]
    for i, member in enumerate(("0", "1")):  # each row carries its own run's numbers
        summary = json.loads((folder / member / "summary.json").read_text())
        for key in ("test/active_units", "test/kl", "test/neg_elbo"):
            assert table.loc[i, key] == pytest.approx(summary[key]), (member, key)
    # higher beta, lower rate: the table carries the rate-distortion trade-off
    assert table.loc[1, "test/kl"] < table.loc[0, "test/kl"]
    md = (out / "table.md").read_text()
    header_row = next(line for line in md.splitlines() if line.startswith("|"))
    assert "Swept: loss.beta = 0.5, 4, -1." in md and " beta |" in header_row and "KL (nats)" in header_row
    report = (out / "report.html").read_text()
    assert "Swept: loss.beta = 0.5, 4, -1." in report and "data: shapes, 16x16x1" in report
    assert "model: conv [8, 16], latent_dim 4" in report and "likelihood: bernoulli" in report
    assert "max_epochs 3, max_steps 60, batch 32, trained 60 steps" in report  # 60 steps end before 3 epochs of 64
    for column in ("marginal KL (nats)", "prior in holes (0-1)", "precision (0-1)", "recall (0-1)",
                   "mixture prior: precision"):  # holes, fidelity and diversity, and what the mixture prior gains
        assert column in header_row, column
    for name, how in HOW_TO_READ.items():
        assert (out / name).stat().st_size > 1000 and f'src="{name}"' in report, name
        assert html.escape(how) in report, name


def test_montage_tiles_are_the_runs_pixels_enlarged_whole(compared):
    folder, _ = compared
    sheet = np.asarray(Image.open(folder / "compare" / "samples_montage.png").convert("RGB"))
    top = 22  # below the caption
    for name, left in (("samples.png", 0), ("samples_gmm.png", 1)):  # N(0, I) | the mixture prior, side by side
        grid = np.asarray(Image.open(folder / "0" / name).convert("RGB"))  # 16 px images, 8 a row
        rows, cols = min(grid.shape[0], 2 + MONTAGE_ROWS * 18), 2 + MONTAGE_COLS * 18  # the part a montage shows
        scale = -(-MONTAGE_WIDTH // (2 * cols + PAIR_GAP))  # the pair, 262 px wide: 2x
        x = left * (cols + PAIR_GAP) * scale
        enlarged = grid[:rows, :cols].repeat(scale, 0).repeat(scale, 1)
        assert scale == 2 and np.array_equal(sheet[top: top + rows * scale, x: x + cols * scale], enlarged), name


def test_wandb_names_a_member_by_its_swept_keys_and_groups_it_by_the_sweep_folder(sweep):
    folder, _ = sweep
    for member, beta in (("0", "0.5"), ("1", "4")):
        run = next(r["run"] for r in leet(folder / member / "wandb") if r["type"] == "run")
        assert (run["display_name"], run["run_group"]) == (f"beta={beta}", "sweep")
    history = [r["history"]["item"] for r in leet(folder / "0" / "wandb") if r["type"] == "history"]
    evals = [h for h in history if "val/kl_per_dim/0" in h]  # per-dim KL as scalars: runs overlay dim by dim
    assert evals and all(f"val/kl_per_dim/{d}" in evals[-1] for d in range(4))


@pytest.mark.slow  # real processes with W&B
def test_logger_group_names_the_group_and_a_lone_run_is_named_by_its_overrides(tmp_path):
    run = tmp_path / "2026-11-26" / "10-42-07-123456"  # the layout of Hydra's default folders here
    proc = run_cli([*tiny_overrides(tmp_path / "cache"), "trainer.max_steps=2", "loss.beta=2", "logger=wandb",
                    f"hydra.run.dir={run}"], real_process=True)  # as a W&B agent's command line gives them
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = next(r["run"] for r in leet(run / "wandb") if r["type"] == "run")
    assert record["run_group"] == "2026-11-26/10-42-07-123456"  # a time-of-day folder keeps its date
    name = record["display_name"]
    assert "beta=2" in name and "cache_dir" not in name and "logger" not in name and "hydra" not in name
    grouped = tmp_path / "grouped"
    proc = run_cli([*tiny_overrides(tmp_path / "cache"), "trainer.max_steps=2", "logger=wandb", "logger.group=my_study",
                    f"hydra.run.dir={grouped}"], real_process=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert next(r["run"] for r in leet(grouped / "wandb") if r["type"] == "run")["run_group"] == "my_study"
    config = leet(grouped / "wandb", summary=True)["config"]  # only keys that mean something for this run
    assert config["data"]["num_train"] == 256 and "sigma" not in config["loss"] and "gamma" not in config["optimizer"]
    assert config["loss"]["likelihood"] == "bernoulli"


@pytest.mark.slow  # real processes with W&B
def test_compare_wandb_logs_one_summary_run_into_the_sweeps_group(sweep):
    folder, _ = sweep
    proc = run_cli([str(folder), "--wandb"], module="src.compare", real_process=True)
    assert proc.returncode == 0, proc.stderr
    records = leet(folder / "compare" / "wandb")
    run = next(r["run"] for r in records if r["type"] == "run")
    assert (run["display_name"], run["run_group"], run["job_type"]) == ("compare sweep", "sweep", "compare")
    logged = {k for r in records if r["type"] == "history" for k in r["history"]["item"]}
    for name in ("runs", "settings", "collapse", "blur", "learning_curves", "samples_montage", "traversals_montage"):
        assert any(k.startswith(f"compare/{name}") for k in logged), name
    table = json.loads(next((folder / "compare" / "wandb").glob("offline-run-*/files/media/table/compare/settings*"
                                                                 ".table.json")).read_text())
    column = table["columns"].index("test/neg_elbo")
    assert all(isinstance(row[column], float) for row in table["data"]), table["data"]  # numbers, not text


def test_compare_without_a_folder_takes_the_newest_sweep(sweep, tmp_path):
    folder, _ = sweep
    sweeps = tmp_path / "outputs" / "sweeps"
    older = sweeps / "2026-11-25" / "09-00-00-000000"
    shutil.copytree(folder, older, ignore=shutil.ignore_patterns("compare", "wandb"))
    newest = sweeps / "2026-11-26" / "10-00-00-000000"
    shutil.copytree(folder, newest, ignore=shutil.ignore_patterns("compare", "wandb"))
    os.utime(older / "multirun.yaml", (1, 1))  # started long ago
    proc = run_cli([], cwd=tmp_path, module="src.compare")
    assert proc.returncode == 0, proc.stderr
    assert (newest / "compare" / "report.html").is_file() and not (older / "compare").exists()
    assert "newest sweep, outputs/sweeps/2026-11-26/10-00-00-000000" in proc.stderr
    empty = run_cli([], cwd=tmp_path / "outputs", module="src.compare")
    assert empty.returncode == 2 and empty.stderr.count("\n") == 1 and "no sweep under outputs/sweeps/" in empty.stderr


def test_compare_on_a_folder_without_runs_is_one_line(tmp_path):
    proc = run_cli([str(tmp_path)], module="src.compare")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "no runs under" in proc.stderr


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# run in the page once everything has loaded: what a person at a 1280-px window would see
PROBE = """<script>window.addEventListener("load", () => {
  const b = document.body, imgs = [...document.images];
  b.dataset.pageWidth = document.documentElement.scrollWidth;
  b.dataset.tableRight = Math.ceil(document.querySelector("table").getBoundingClientRect().right);
  b.dataset.images = imgs.length;
  b.dataset.broken = imgs.filter(i => !i.complete || i.naturalWidth === 0).length;
});</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium)")
def test_report_fits_a_1280_px_window_in_a_real_browser(compared):
    folder, proc = compared
    assert proc.returncode == 0
    out = folder / "compare"
    probe = out / "probe.html"  # beside report.html, so its relative image links resolve the same way
    probe.write_text((out / "report.html").read_text().replace("</body>", PROBE + "</body>"))
    try:
        dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,900",
                              "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                             capture_output=True, text=True, timeout=120).stdout
    finally:
        probe.unlink()
    seen = dict(re.findall(r'data-([a-z-]+)="(\d+)"', dom))
    assert int(seen["page-width"]) <= 1280 and int(seen["table-right"]) <= 1280, seen  # nothing hides off the right
    assert int(seen["images"]) == len(HOW_TO_READ) and seen["broken"] == "0", seen  # every figure shows


def test_a_damaged_metrics_file_or_grid_leaves_only_that_out(sweep, tmp_path):
    """A member's metrics.jsonl that is not UTF-8, another's samples.png that is not an image: one line each, and
    the comparison is written (it once ended with a traceback and no report)."""
    folder = tmp_path / "sweep"
    shutil.copytree(sweep[0], folder, ignore=shutil.ignore_patterns("compare", "wandb"))
    metrics = folder / "0" / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes() + b'{"val/neg_elbo": \xff\xfe}\n')
    (folder / "1" / "samples.png").write_bytes(b"not a png")
    proc = run_cli([str(folder)], module="src.compare")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{metrics} is not all UTF-8: its damaged lines are left out" in proc.stderr
    assert f"{folder / '1' / 'samples.png'} is not a readable image" in proc.stderr
    assert (folder / "compare" / "report.html").is_file() and (folder / "compare" / "learning_curves.png").is_file()


@pytest.mark.slow  # a real process and a real SIGINT
def test_ctrl_c_during_compare_leaves_the_previous_comparison_whole(sweep, tmp_path):
    import signal
    import sys
    import time

    folder = tmp_path / "sweep"
    shutil.copytree(sweep[0], folder, ignore=shutil.ignore_patterns("compare", "wandb"))
    assert run_cli([str(folder)], module="src.compare").returncode == 0
    before = {p.name: p.read_bytes() for p in (folder / "compare").iterdir()}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "src.compare", str(folder)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(folder.glob(".compare.new-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)  # while the new comparison is being drawn
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("Interrupted: the comparison was not")
    assert {p.name: p.read_bytes() for p in (folder / "compare").iterdir()} == before
    assert not list(folder.glob(".compare.*"))  # the half-drawn one is gone
