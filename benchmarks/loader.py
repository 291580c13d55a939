"""Loader throughput from the decode-once cache: images/s of TrainBatches at 64x64x3, batch 64 and 512.

    python benchmarks/loader.py [--images 20000]

Prints one JSON object: images/s per device and batch size (median of 5 timed epochs-worth of batches), with
torch threads pinned to 1 on CPU so the figure is per core. Indexing a memory-resident uint8 tensor, not decoding.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from src.config import DataConfig  # noqa: E402
from src.data import TrainBatches, load_data  # noqa: E402


def images_per_s(images: np.ndarray, batch: int, device: torch.device, hflip: bool, reps: int = 5) -> float:
    batches = TrainBatches(images, batch, device, hflip=hflip, seed=0, on_device=True)
    rates = []
    for _ in range(reps + 1):  # the first pass warms up allocators and caches
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, n = time.perf_counter(), 0
        for x in batches.epoch():
            n += len(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20000, help="train images in the cached set")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as cache:
        cfg = DataConfig(name="shapes", channels=3, image_size=64, num_train=args.images, val_size=64, test_size=64,
                         cache_dir=cache)
        load_data(cfg)  # decode once
        t0 = time.perf_counter()
        images = load_data(cfg).images["train"]  # from cache: memory-mapped
        cached_load_s = time.perf_counter() - t0
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
        results = {f"{d.type}/batch{b}{'/hflip' if f else ''}": round(images_per_s(images, b, d, f))
                   for d in devices for b in (64, 512) for f in (False, True)}
    print(json.dumps({"unit": "images/s (median of 5 passes)", "shape": [3, 64, 64], "images": args.images,
                      "cpu_threads": 1, "cached_load_s": round(cached_load_s, 4), "results": results,
                      "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
                      "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}, indent=2))


if __name__ == "__main__":
    main()
