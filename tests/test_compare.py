"""A real sweep with a failing member, then `python -m src.compare` on it."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from .conftest import leet, run_cli, tiny_overrides


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    proc = run_cli(["-m", *tiny_overrides(root / "cache"), "trainer.max_steps=60", "trainer.eval_every=60", "loss.beta=0.5,4,-1",
                    f"hydra.sweep.dir={root / 'sweep'}"])
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


def test_compare_writes_table_plots_montages_and_report(sweep):
    folder, _ = sweep
    proc = run_cli([str(folder)], module="src.compare")
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
    assert "loss.beta" in (out / "table.md").read_text()
    report = (out / "report.html").read_text()
    for name in ("rate_distortion.png", "collapse_blur.png", "kl_per_dim.png", "samples_montage.png",
                 "reconstructions_montage.png"):
        assert (out / name).stat().st_size > 1000 and f'src="{name}"' in report, name


def test_compare_on_a_folder_without_runs_is_one_line(tmp_path):
    proc = run_cli([str(tmp_path)], module="src.compare")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "no runs under" in proc.stderr
