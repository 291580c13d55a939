"""The CUDA path (bf16 autocast, CUDA graphs through compile reduce-overhead, fused Adam, data on the device) is
the same training as the CPU path: it finishes, it resumes at an epoch boundary like an uninterrupted run, and the
trained-model tools give the CPU's numbers. Skipped where there is no CUDA device (CI has none); run on a GPU
with `python -m pytest tests/test_cuda.py tests/test_fast_paths.py`."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from src.checkpoint import load_checkpoint
from src.train import train

from .conftest import ROOT, compose_cfg, run_cli, tiny_overrides
from .test_checkpoints_and_resume import KILL_AFTER_CHECKPOINT

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cuda_epochs(cache):
    """3 epochs of 8 steps on the default CUDA fast path (auto precision and compile), an LR halving each epoch."""
    return [*[o for o in tiny_overrides(cache) if o != "trainer.device=cpu"], "trainer.device=cuda",
            "trainer.max_steps=null", "trainer.max_epochs=3", "trainer.eval_every=null", "trainer.checkpoint_every=null",
            "optimizer.scheduler=exponential", "optimizer.gamma=0.5", "logger=none", "trainer.log_every=1"]


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_cuda_resume_at_an_epoch_boundary_matches_an_uninterrupted_run(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    proc = run_cli([*_cuda_epochs(tmp_path / "cache"), f"hydra.run.dir={whole}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ran = json.loads((whole / "summary.json").read_text())
    assert (ran["precision"], ran["compile"]) == ("bf16", "reduce-overhead")
    script = tmp_path / "kill_after_checkpoint.py"
    script.write_text(KILL_AFTER_CHECKPOINT)
    overrides = [*_cuda_epochs(tmp_path / "cache"), f"hydra.run.dir={killed}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KILL_AFTER_CHECKPOINT_AT": "8"}
    proc = subprocess.run([sys.executable, str(script), *overrides], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (load_checkpoint(killed / "checkpoints" / "last.pt")["epoch"]) == 1
    resumed = run_cli(overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows_a, rows_b = _rows(whole), _rows(killed)
    assert [r["step"] for r in rows_b] == [r["step"] for r in rows_a]  # each step once
    for ra, rb in zip(rows_a, rows_b):
        if "train/loss" in ra:  # bf16 and cudnn's autotuned kernels: close, not bit-equal across processes
            assert rb["train/lr"] == ra["train/lr"] and rb["epoch"] == ra["epoch"], ra["step"]
            assert rb["train/loss"] == pytest.approx(ra["train/loss"], rel=0.02), ra["step"]
    a, b = (json.loads((d / "summary.json").read_text()) for d in (whole, killed))
    assert b["val/neg_elbo"] == pytest.approx(a["val/neg_elbo"], rel=0.02)


def test_cuda_bf16_graphs_are_close_to_fp32_eager(tmp_path, tiny):
    tiny = [o for o in tiny if o != "trainer.device=cpu"] + ["trainer.device=cuda", "logger=none", "trainer.log_every=1"]
    runs = {}
    for name, extra in {"fast": [], "fp32": ["trainer.precision=fp32", "trainer.compile=false"]}.items():
        summary = train(compose_cfg([*tiny, *extra]), run_dir=tmp_path / name)
        assert summary["status"] == "finished" and summary["perf/train_images_per_s"] > 0
        runs[name] = [r["train/loss"] for r in _rows(tmp_path / name) if "train/loss" in r]
    assert len(runs["fast"]) == len(runs["fp32"]) == 8
    assert runs["fast"] == pytest.approx(runs["fp32"], rel=0.03)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cpu-run")
    train(compose_cfg([*tiny_overrides(root / "cache"), "logger=none", "trainer.max_steps=12"]), run_dir=root / "run")
    return root / "run"


def test_tools_on_cuda_give_the_cpu_numbers(cpu_run, tmp_path):
    numbers = {}
    for device in ("cpu", "cuda"):
        proc = run_cli([str(cpu_run), "split=val", "iwae_k=50", f"device={device}"], module="src.evaluate")
        assert proc.returncode == 0, proc.stderr[-3000:]
        numbers[device] = json.loads((cpu_run / "eval_val_k50.json").read_text())
    for key in ("val/kl", "val/mse", "val/active_units"):  # functions of the posterior means: the same numbers
        assert numbers["cuda"][key] == pytest.approx(numbers["cpu"][key], rel=1e-4), key
    for key in ("val/neg_elbo", "val/recon_nll", "val/iwae_nll"):  # Monte Carlo: CUDA draws its own z
        assert numbers["cuda"][key] == pytest.approx(numbers["cpu"][key], rel=0.02), key
    out = tmp_path / "samples.png"
    proc = run_cli([str(cpu_run), "n=4", "device=cuda", f"out={out}"], module="src.sample")
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-3000:]
