"""Training throughput, side by side in one process, as a ratio: a reference loop against the product's own
loop (`src.train.train`, reading its perf/train_images_per_s, which times training steps only).

    python benchmarks/throughput.py                         # CPU; plus CUDA (batch 64 and 512) if present
    python benchmarks/throughput.py --devices cuda --batches 64 512 --concurrent 4 --out results.json
    python benchmarks/throughput.py --packed 4 16 --devices cpu     # packed sweeps (docs/speed.md)
    python benchmarks/throughput.py --packed 4 16 --devices cuda --packed-models vanilla_vae64 small_conv16

Two settings:
- `vanilla_vae_celeba64`: AntixK/PyTorch-VAE's VanillaVAE (conv 32-64-128-256-512, latent 128, 64x64x3, Adam
  lr 0.005, its pixel-mean MSE + 0.00025 KL). The reference is that repository's loop written from this
  description (not product code): fp32, eager, float batches held on the host and copied to the device every
  step, `.item()` every step. Both see random images already in memory.
- `mlp_fashion_mnist28` (CPU): the canonical 784-400-20 Bernoulli MLP VAE on Fashion-MNIST 28x28, batch 128,
  against the plain loop of pytorch/examples' vae/main.py (fc1/fc21/fc22/fc3/fc4, BCE + KL summed,
  `loss.item()` every step) fed the same images as one float tensor in memory: no DataLoader cost is charged
  to it. Real Fashion-MNIST from /usr/share/datasets/fashion-mnist when present, random images otherwise.

Both sides time the same number of steps after the same warm-up; each figure is the median of --repeats runs,
in images per second. With --concurrent N it also runs N product processes at once on the device and reports
their summed images/s against one process. Prints one JSON object.
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
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from src.likelihoods import build_likelihood  # noqa: E402
from src.losses import kl_divergence  # noqa: E402
from src.models import ConvVAE  # noqa: E402
from src.loop import WARMUP_STEPS  # noqa: E402

VANILLA_VAE = dict(channels=3, image_size=64, hidden=[32, 64, 128, 256, 512], latent_dim=128)
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def vanilla_vae_reference_images_per_s(device: torch.device, batch: int, steps: int) -> float:
    """PyTorch-VAE's loop: fp32 eager, float host data copied each step, a host sync (.item()) each step."""
    torch.manual_seed(0)
    model = ConvVAE(**VANILLA_VAE, likelihood=build_likelihood("gaussian", 0.5**0.5)).to(device)
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
        loss.item()  # PyTorch-VAE logs every step
    _sync(device)
    return batch * steps / (time.perf_counter() - start)


def product_overrides(device: str, batch: int, steps: int, cache: str) -> list:
    """The product at the VanillaVAE setting, on generated 64x64x3 data, eval kept out of the timed steps."""
    return [f"trainer.device={device}", f"data.batch_size={batch}", "data=shapes", "data.channels=3",
            "data.image_size=64", f"data.num_train={batch * (WARMUP_STEPS + steps + 1)}", "data.val_size=64",
            "data.test_size=64", f"data.cache_dir={cache}", "model=conv", "model.hidden_channels=[32,64,128,256,512]",
            "model.latent_dim=128", "loss.likelihood=gaussian", "loss.sigma=0.7071067811865476", "loss.beta=3.072",
            "optimizer.lr=0.005", *_single_eval(steps)]


def _single_eval(steps: int) -> list:
    """Train `steps` timed steps after the warm-up, with one small eval at the very end (outside the timing)."""
    total = WARMUP_STEPS + steps
    return [f"trainer.max_steps={total}", f"trainer.eval_every={total}", f"trainer.log_every={total}",
            "trainer.progress=false", "logger=none", "eval.iwae_k_test=1", "eval.blur_samples=16", "eval.mi_images=64",
            "eval.traversal_dims=0", "trainer.num_samples=16"]


def product_images_per_s(overrides: list, device: str) -> tuple:
    """(images/s, peak GPU memory in GiB or None) of one product run, from its own summary."""
    from hydra import compose, initialize_config_dir

    from src.config import register_configs
    from src.train import train

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as run_dir:
        summary = train(cfg, run_dir=run_dir)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return summary["perf/train_images_per_s"], peak


# ------------------------------------------------------------------------------------------- the MLP VAE


class ExamplesVAE(torch.nn.Module):
    """pytorch/examples vae/main.py's model, as written there: 784-400-20, ReLU, sigmoid output."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc21, self.fc22 = torch.nn.Linear(784, 400), torch.nn.Linear(400, 20), torch.nn.Linear(400, 20)
        self.fc3, self.fc4 = torch.nn.Linear(20, 400), torch.nn.Linear(400, 784)

    def forward(self, x):
        h = F.relu(self.fc1(x.view(-1, 784)))
        mu, logvar = self.fc21(h), self.fc22(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return torch.sigmoid(self.fc4(F.relu(self.fc3(z)))), mu, logvar


def mlp_overrides(batch: int, steps: int, cache: str) -> list:
    """The product's canonical MLP VAE on Fashion-MNIST at its native 28x28 (random images without the data)."""
    data = (["data=fashion_mnist", f"data.root={FASHION_MNIST}"] if FASHION_MNIST.is_dir() else
            ["data=shapes", "data.val_size=64", "data.test_size=64",
             f"data.num_train={batch * (WARMUP_STEPS + steps + 1)}"])
    return [*data, "data.image_size=28", f"data.batch_size={batch}", f"data.cache_dir={cache}", "model=mlp",
            "model.latent_dim=20", "model.hidden_channels=[400]", "loss.likelihood=bernoulli", "trainer.device=cpu",
            *_single_eval(steps)]


def mlp_plain_images_per_s(batch: int, steps: int, cache: str) -> float:
    """pytorch/examples' training loop over the same train images, held as one float tensor in memory."""
    from src.config import DataConfig
    from src.data import load_data

    if FASHION_MNIST.is_dir():
        images = load_data(DataConfig(name="fashion_mnist", root=str(FASHION_MNIST), image_size=28, batch_size=batch,
                                      val_size=5000, cache_dir=cache)).images["train"]
    else:
        images = load_data(DataConfig(image_size=28, num_train=batch * (WARMUP_STEPS + steps + 1), val_size=64,
                                      test_size=64, cache_dir=cache)).images["train"]
    data = torch.from_numpy(images[:]).float().div(255)  # (N, 1, 28, 28)
    torch.manual_seed(0)
    model = ExamplesVAE()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = torch.randperm(len(data))
    model.train()
    for i in range(WARMUP_STEPS + steps):
        if i == WARMUP_STEPS:
            start = time.perf_counter()
        x = data[order[(i * batch) % (len(data) - batch):][:batch]]
        optimizer.zero_grad()
        recon, mu, logvar = model(x)
        bce = F.binary_cross_entropy(recon, x.view(-1, 784), reduction="sum")
        kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        loss = bce + kld
        loss.backward()
        loss.item()  # pytorch/examples adds it to train_loss every step
        optimizer.step()
    return batch * steps / (time.perf_counter() - start)


# ------------------------------------------------------------------------------------------- runs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def concurrent(n: int, device: str, batch: int, steps: int, cache: str, extra: list) -> dict:
    """n product processes on the device at once: each one's images/s, summed."""
    cmd = [sys.executable, __file__, "--worker", "--devices", device, "--batches", str(batch), "--steps", str(steps),
           "--cache", cache, "--extra", *extra]
    # ROOT ahead of the path the caller set (on a lent GPU machine, the carried wheels' folder: benchmarks/gpu_wheels.sh)
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": path})
             for _ in range(n)]
    rates = [json.loads(p.communicate()[0].strip().splitlines()[-1])["images_per_s"] for p in procs]
    return {"processes": n, "per_process_img_s": [round(r) for r in rates], "total_img_s": round(sum(rates))}


def side_by_side(reference, product, repeats: int) -> dict:
    """Interleaved repeats of both sides (so drift in the machine hits both), after one untimed warm-up run of
    each (first-touch allocation and library start-up); medians and their ratio."""
    reference(), product()
    refs, prods = [], []
    for _ in range(repeats):
        refs.append(reference())
        prods.append(product())
    rates = [r for r, _ in prods]
    row = {"reference_img_s": round(statistics.median(refs)), "product_img_s": round(statistics.median(rates)),
           "ratio": round(statistics.median(rates) / statistics.median(refs), 3),
           "reference_runs": [round(r) for r in refs], "product_runs": [round(r) for r in rates]}
    if prods[0][1] is not None:
        row["product_peak_gpu_memory_gib"] = round(max(p for _, p in prods), 3)
    return row


# ------------------------------------------------------------------------------------------- packed sweeps

PACKED_MODELS = {  # name -> overrides: the main job's conv (the default config), a small one, and (for a GPU) the
    # VanillaVAE of the headline sweep at its batch 64
    "main_conv64": ["model.hidden_channels=[16,32,64,128]", "data.image_size=64", "data.batch_size=64"],
    "small_conv16": ["model.hidden_channels=[8,16]", "data.image_size=16", "data.batch_size=32", "model.latent_dim=4"],
    # sizes in between, where the CPU's crossover between the engines lies (src/engines.py CPU_VMAP_MAX_FLOPS)
    "conv32": ["model.hidden_channels=[16,32]", "data.image_size=32", "data.batch_size=32"],
    "mlp28": ["model=mlp", "model.hidden_channels=[400]", "data.image_size=28", "data.batch_size=32"],
    "vanilla_vae64": ["model.hidden_channels=[32,64,128,256,512]", "model.latent_dim=128", "data.channels=3",
                      "data.image_size=64", "data.batch_size=64", "loss.likelihood=gaussian",
                      "loss.sigma=0.7071067811865476", "optimizer.lr=0.005"],
}


def packed_overrides(model: str, device: str, steps: int, cache: str) -> list:
    batch = int(next(o for o in PACKED_MODELS[model] if o.startswith("data.batch_size=")).split("=")[1])
    return [f"trainer.device={device}", f"data.num_train={batch * (WARMUP_STEPS + steps + 1)}", "data.val_size=64",
            "data.test_size=64", f"data.cache_dir={cache}", "eval.final=none", *PACKED_MODELS[model],
            *_single_eval(steps)]


def forward_flops_of(cfg) -> float:
    """FLOPs of one image's forward through the model `cfg` builds, as the auto rule counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    from src.config_check import parse
    from src.likelihoods import build_likelihood
    from src.models import build_model

    c = parse(cfg)
    model = build_model(c.model, c.data, build_likelihood(c.loss.likelihood, c.loss.sigma)).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.rand(1, c.data.channels, c.data.image_size, c.data.image_size))
    return float(counter.get_total_flops())


def packed_row(model: str, members: int, device: str, steps: int, cache: str, repeats: int,
               solo_runs: int = 0) -> dict:
    """Aggregate training images/s of `members` members (seeds 0.., beta 1 and 4 alternating): packed (vmap and
    loop engines, and the engine `auto` picks; each the median of `repeats` packs), one after another (each member
    a solo run, as the basic launcher runs them), and one member (the median of those solo runs). `solo_runs`: time
    only that many of the solo runs (each member's rate is then their median), where M solo runs take too long."""
    from hydra import compose, initialize_config_dir

    from src.config import register_configs
    from src.train import train, train_pack

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfgs = [compose("config", overrides=packed_overrides(model, device, steps, cache) +
                        [f"seed={i}", f"loss.beta={(1, 4)[i % 2]}"]) for i in range(members)]
    row = {"members": members, "steps": steps, "batch_per_member": cfgs[0].data.batch_size}
    seconds = 0.0
    with tempfile.TemporaryDirectory() as root:
        train(cfgs[0], run_dir=Path(root) / "warm-up")  # oneDNN builds its kernels for these shapes once per process
        rates = [train(cfg, run_dir=Path(root) / f"solo{i}")["perf/train_images_per_s"]
                 for i, cfg in enumerate(cfgs[:solo_runs or members])]
        rates = rates if len(rates) == members else [statistics.median(rates)] * members
        images = steps * cfgs[0].data.batch_size  # per member, timed
        seconds = sum(images / r for r in rates)
        row["one_member_img_s"] = round(statistics.median(rates), 1)
        row["one_after_another_img_s"] = round(members * images / seconds, 1)
        for engine in ("vmap", "loop", "auto"):
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            packs = [train_pack(cfgs, [Path(root) / f"{engine}{r}-{i}" for i in range(members)], engine=engine)[0]
                     for r in range(repeats)]
            row[f"packed_{engine}_img_s"] = round(statistics.median(s["perf/pack_images_per_s"] for s in packs), 1)
            if device == "cuda":
                row[f"packed_{engine}_peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            if engine == "auto":
                row["auto_chose"] = sorted({s["perf/pack_engine"] for s in packs})
                row["mflop_per_image"] = round(forward_flops_of(cfgs[0]) / 1e6, 2)
    for engine in ("vmap", "loop", "auto"):
        row[f"packed_{engine}_vs_one_after_another"] = round(row[f"packed_{engine}_img_s"] /
                                                             row["one_after_another_img_s"], 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    parser.add_argument("--batches", nargs="+", type=int,
                        help="VanillaVAE batches (default: 64 on CPU; 64, 512 on CUDA)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on CPU, 200 on CUDA)")
    parser.add_argument("--mlp-steps", type=int, default=300, help="timed steps of the MLP VAE (CPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--settings", nargs="+", default=["vanilla_vae_celeba64", "mlp_fashion_mnist28"])
    parser.add_argument("--concurrent", type=int, default=0, help="also run N product processes at once")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for the VanillaVAE product run")
    parser.add_argument("--packed", nargs="*", type=int, default=None,
                        help="pack sizes M: M packed members against M one after another and one (then nothing else)")
    parser.add_argument("--packed-models", nargs="+", default=["main_conv64", "small_conv16"],
                        choices=list(PACKED_MODELS))
    parser.add_argument("--solo-runs", type=int, default=0, help="with --packed: time this many solo runs (default M)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--cache", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    cache = args.cache or tempfile.mkdtemp(prefix="vae-bench-")
    if args.worker:
        overrides = [*product_overrides(args.devices[0], args.batches[0], args.steps, cache), *args.extra]
        print(json.dumps({"images_per_s": product_images_per_s(overrides, args.devices[0])[0]}))
        return
    results = {}
    if args.packed:
        for device in args.devices:
            for model in args.packed_models:
                for members in args.packed:
                    key = f"packed/{model}/{device}/M{members}"
                    results[key] = packed_row(model, members, device, args.steps or (20 if device == "cpu" else 200),
                                              cache, args.repeats, args.solo_runs)
                    print(json.dumps({key: results[key]}), file=sys.stderr)
        args.settings = []
    if "vanilla_vae_celeba64" in args.settings:
        for device in args.devices:
            steps = args.steps or (20 if device == "cpu" else 200)
            for batch in args.batches or ([64] if device == "cpu" else [64, 512]):
                overrides = [*product_overrides(device, batch, steps, cache), *args.extra]
                row = side_by_side(partial(vanilla_vae_reference_images_per_s, torch.device(device), batch, steps),
                                   partial(product_images_per_s, overrides, device), args.repeats)
                row["steps"] = steps
                if args.concurrent and batch == 64:
                    row["concurrent"] = concurrent(args.concurrent, device, batch, steps, cache, args.extra)
                    row["concurrent"]["vs_one_process"] = round(row["concurrent"]["total_img_s"] / row["product_img_s"], 2)
                results[f"vanilla_vae_celeba64/{device}/batch{batch}"] = row
                print(json.dumps({f"vanilla_vae_celeba64/{device}/batch{batch}": row}), file=sys.stderr)
    if "mlp_fashion_mnist28" in args.settings:
        overrides = mlp_overrides(128, args.mlp_steps, cache)
        row = side_by_side(partial(mlp_plain_images_per_s, 128, args.mlp_steps, cache),
                           partial(product_images_per_s, overrides, "cpu"), args.repeats)
        row.update(steps=args.mlp_steps, data="Fashion-MNIST" if FASHION_MNIST.is_dir() else "random 28x28")
        results["mlp_fashion_mnist28/cpu/batch128"] = row
        print(json.dumps({"mlp_fashion_mnist28/cpu/batch128": row}), file=sys.stderr)
    report = {"unit": "images/s, median of repeats", "results": results, "torch": torch.__version__,
              "cpu": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads(),
              "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
