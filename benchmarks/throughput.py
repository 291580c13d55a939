"""Training throughput at the seed's setting, side by side in one process: a seed-style reference loop against
the product's own loop (`src.train.train`, reading its perf/train_images_per_s).

    python benchmarks/throughput.py                         # CPU, batch 64; plus CUDA (batch 64 and 512) if present
    python benchmarks/throughput.py --devices cuda --batches 64 512 --concurrent 4 --out results.json

The seed's setting: conv VAE 32-64-128-256-512, latent 128, 64x64x3 images, Adam lr 0.005, Gaussian decoder
(its pixel-mean MSE + 0.00025 KL). The seed-style loop, written from that description as a reference (not product
code): fp32, eager, float batches held on the host and copied to the device every step, `.item()` every step.
Both see random data already in memory and time the same number of steps after the same warm-up; each figure is
the median of --repeats runs, in images per second. With --concurrent N it also runs N product processes at
once on the device and reports their summed images/s against one process. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from src.likelihoods import build_likelihood  # noqa: E402
from src.losses import kl_divergence  # noqa: E402
from src.models import ConvVAE  # noqa: E402
from src.train import WARMUP_STEPS  # noqa: E402

SEED_MODEL = dict(channels=3, image_size=64, hidden=[32, 64, 128, 256, 512], latent_dim=128)


def seed_style_images_per_s(device: torch.device, batch: int, steps: int) -> float:
    """The reference: fp32 eager, float host data copied each step, a host sync (.item()) each step."""
    torch.manual_seed(0)
    model = ConvVAE(**SEED_MODEL, likelihood=build_likelihood("gaussian", 0.5**0.5)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.005)
    data = torch.rand(batch * 8, 3, 64, 64)  # float32 images on the host, as a DataLoader hands them over
    for i in range(WARMUP_STEPS + steps):
        if i == WARMUP_STEPS:
            _sync(device)
            start = time.perf_counter()
        idx = torch.randint(0, len(data), (batch,))
        x = data[idx].to(device)
        params, mu, logvar = model(x)
        recon = torch.sigmoid(params)
        loss = F.mse_loss(recon, x) + 0.00025 * kl_divergence(mu, logvar).sum(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item()  # the seed logs every step
    _sync(device)
    return batch * steps / (time.perf_counter() - start)


def product_overrides(device: str, batch: int, steps: int, cache: str) -> list:
    """The product at the seed's setting, on generated 64x64x3 data, eval kept out of the timed steps."""
    return [f"trainer.device={device}", f"data.batch_size={batch}", "data=shapes", "data.channels=3",
            "data.image_size=64", f"data.num_train={batch * (WARMUP_STEPS + steps + 1)}", "data.val_size=64",
            "data.test_size=64", f"data.cache_dir={cache}", "model=conv", "model.hidden_channels=[32,64,128,256,512]",
            "model.latent_dim=128", "loss.likelihood=gaussian", "loss.sigma=0.7071067811865476", "loss.beta=3.072",
            "optimizer.lr=0.005", f"trainer.max_steps={WARMUP_STEPS + steps}", f"trainer.eval_every={WARMUP_STEPS + steps}",
            f"trainer.log_every={WARMUP_STEPS + steps}", "trainer.progress=false", "logger=none", "eval.iwae_k_test=1",
            "eval.blur_samples=16", "eval.mi_images=64", "eval.traversal_dims=0", "trainer.num_samples=16"]


def product_images_per_s(device: str, batch: int, steps: int, cache: str, extra: list) -> tuple:
    """(images/s, peak GPU memory in GiB or None) of one product run, from its own summary."""
    from hydra import compose, initialize_config_dir

    from src.config import register_configs
    from src.train import train

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*product_overrides(device, batch, steps, cache), *extra])
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as run_dir:
        summary = train(cfg, run_dir=run_dir)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return summary["perf/train_images_per_s"], peak


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def concurrent(n: int, device: str, batch: int, steps: int, cache: str, extra: list) -> dict:
    """n product processes on the device at once: each one's images/s, summed."""
    cmd = [sys.executable, __file__, "--worker", "--devices", device, "--batches", str(batch), "--steps", str(steps),
           "--cache", cache, "--extra", *extra]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
             for _ in range(n)]
    rates = [json.loads(p.communicate()[0].strip().splitlines()[-1])["images_per_s"] for p in procs]
    return {"processes": n, "per_process_img_s": [round(r) for r in rates], "total_img_s": round(sum(rates))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    parser.add_argument("--batches", nargs="+", type=int, help="default: 64 on CPU; 64 and 512 on CUDA")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on CPU, 200 on CUDA)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrent", type=int, default=0, help="also run N product processes at once")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for the product run")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--cache", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    cache = args.cache or tempfile.mkdtemp(prefix="vae-bench-")
    if args.worker:
        rate, _ = product_images_per_s(args.devices[0], args.batches[0], args.steps, cache, args.extra)
        print(json.dumps({"images_per_s": rate}))
        return
    results = {}
    for device in args.devices:
        steps = args.steps or (20 if device == "cpu" else 200)
        for batch in args.batches or ([64] if device == "cpu" else [64, 512]):
            seed = [seed_style_images_per_s(torch.device(device), batch, steps) for _ in range(args.repeats)]
            runs = [product_images_per_s(device, batch, steps, cache, args.extra) for _ in range(args.repeats)]
            product = [r for r, _ in runs]
            row = {"seed_style_img_s": round(statistics.median(seed)), "product_img_s": round(statistics.median(product)),
                   "ratio": round(statistics.median(product) / statistics.median(seed), 3),
                   "seed_style_runs": [round(r) for r in seed], "product_runs": [round(r) for r in product],
                   "steps": steps}
            if device == "cuda":
                row["product_peak_gpu_memory_gib"] = round(max(p for _, p in runs), 3)
            if args.concurrent and batch == 64:
                row["concurrent"] = concurrent(args.concurrent, device, batch, steps, cache, args.extra)
                row["concurrent"]["vs_one_process"] = round(row["concurrent"]["total_img_s"] / row["product_img_s"], 2)
            results[f"{device}/batch{batch}"] = row
            print(json.dumps({f"{device}/batch{batch}": row}), file=sys.stderr)
    report = {"unit": "images/s, median of repeats", "setting": "seed: conv 32-64-128-256-512, latent 128, 64x64x3",
              "results": results, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
              "cpu_threads": torch.get_num_threads(),
              "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
