"""The fast paths are the same training: bf16 and compile against fp32 eager, device-side metric sums against
per-step reads. Speed itself is measured by benchmarks/throughput.py, not here."""
from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from src.device import resolve_compile, resolve_precision
from src.train import train

from .conftest import compose_cfg


def _train_losses(tmp_path, tiny, *extra):
    summary = train(compose_cfg([*tiny, "logger=none", "trainer.log_every=1", *extra]), run_dir=tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return summary, [r for r in rows if "train/loss" in r]


@pytest.fixture
def eager(tmp_path, tiny):
    return _train_losses(tmp_path / "eager", tiny, "trainer.precision=fp32", "trainer.compile=false")


def test_auto_picks_the_fast_path_on_cuda_and_fp32_eager_on_cpu(tmp_path, tiny):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", cpu) == "fp32" and resolve_precision("fp16", cpu) == "fp16"
    assert resolve_compile("auto", cpu, 1) is False and resolve_compile(True, cpu, 1) == "default"
    assert resolve_compile("auto", cuda, 1) == "reduce-overhead"
    assert resolve_compile("auto", cuda, 2) is False  # DDP: no CUDA graphs
    summary = train(compose_cfg([*tiny, "logger=none", "trainer.max_steps=1"]), run_dir=tmp_path)
    assert (summary["precision"], summary["compile"], summary["device"]) == ("fp32", "off", "cpu")


def test_bf16_losses_are_close_to_fp32(tmp_path, tiny, eager):
    summary, rows = _train_losses(tmp_path / "bf16", tiny, "trainer.precision=bf16", "trainer.compile=false")
    assert summary["precision"] == "bf16"
    for a, b in zip(eager[1], rows, strict=True):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=0.02), a["step"]
    # and bf16 did run: its 8-bit mantissa moves every step's loss off the fp32 one (an ignored precision would not)
    assert all(b["train/loss"] != a["train/loss"] for a, b in zip(eager[1], rows))


@pytest.mark.slow  # inductor compiles the model: about a minute
def test_compiled_run_is_close_to_eager_and_writes_the_contract(tmp_path, tiny, eager, caplog):
    with caplog.at_level(logging.WARNING, logger="src"):
        summary, rows = _train_losses(tmp_path / "compiled", tiny, "trainer.precision=fp32", "trainer.compile=default")
    assert summary["status"] == "finished"
    assert summary["compile"] == "default" and "failed on the first step" not in caplog.text  # compiled, no fallback
    for a, b in zip(eager[1], rows, strict=True):  # the same noise (drawn outside the model), fused kernels
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=0.01), a["step"]
    for name in ("summary.json", "metrics.jsonl", "checkpoints/last.pt", "samples.png", "reconstructions.png",
                 "traversals.png"):
        assert (tmp_path / "compiled" / name).is_file(), name
    assert summary["val/neg_elbo"] == pytest.approx(eager[0]["val/neg_elbo"], rel=0.01)


def test_device_accumulated_metrics_equal_the_per_step_ones(tmp_path, tiny, eager):
    _, every4 = _train_losses(tmp_path / "every4", tiny, "trainer.precision=fp32", "trainer.compile=false",
                              "trainer.log_every=4")
    assert [r["step"] for r in every4] == [4, 8]
    for row in every4:
        window = [r for r in eager[1] if row["step"] - 4 < r["step"] <= row["step"]]
        for key in ("train/loss", "train/recon_nll", "train/kl", "train/neg_elbo"):
            assert row[key] == pytest.approx(sum(r[key] for r in window) / 4, rel=1e-5), key
        per_dim = [sum(r["train/kl_per_dim"][d] for r in window) / 4 for d in range(4)]
        assert row["train/kl_per_dim"] == pytest.approx(per_dim, rel=1e-5, abs=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fast_path_defaults(tmp_path, tiny, caplog):
    tiny = [o for o in tiny if o != "trainer.device=cpu"]
    with caplog.at_level(logging.WARNING, logger="src"):
        summary, rows = _train_losses(tmp_path / "cuda", tiny, "trainer.device=cuda")
    assert summary["status"] == "finished" and all(math.isfinite(r["train/loss"]) for r in rows)
    assert summary["compile"] == "reduce-overhead" and "failed on the first step" not in caplog.text
