"""Train one VAE: `python -m src.train [overrides]`, or `train(cfg)` from Python.

train() reads: setup -> data -> model -> loop (log, eval, checkpoint) -> final eval and summary.json.
"""
from __future__ import annotations

import logging
import math
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ContextManager, Dict, Optional

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from .checkpoint import save_checkpoint
from .config import Config, ConfigError, parse, register_configs
from .data import DataError, TrainBatches, load_data, mean_image, resolve_on_device
from .likelihoods import build_likelihood
from .loggers import RunLogger, write_json
from .losses import elbo_terms, kl_weight
from .metrics import evaluate
from .models import build_model
from .visuals import fixed_latents, save_reconstructions, save_samples

log = logging.getLogger(__name__)

WARMUP_STEPS = 5  # steps left out of perf/train_images_per_s (allocator, cudnn autotune, compilation)


class DivergedError(RuntimeError):
    """The loss went non-finite; the message names the step and the term."""


# ---------------------------------------------------------------------------------------------- device


def resolve_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_for(device: torch.device, precision: str) -> ContextManager:
    """The one precision switch: fp32 runs as is; bf16/fp16 under autocast (fp16 also needs a GradScaler)."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------- train


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    """max_steps and max_epochs, whichever ends first."""
    limits = [cfg.trainer.max_steps, None if cfg.trainer.max_epochs is None else cfg.trainer.max_epochs * steps_per_epoch]
    return min(s for s in limits if s is not None)


def build_optimizer(cfg: Config, model: torch.nn.Module):
    o = cfg.optimizer
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[o.name]
    optimizer = cls(model.parameters(), lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas))
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, o.gamma) if o.scheduler == "exponential" else None
    return optimizer, scheduler


def train(cfg: DictConfig | Config, run_dir: Optional[str | Path] = None) -> Dict[str, Any]:
    """Train per `cfg`, writing the run-dir contract into `run_dir` (default: Hydra's output dir).

    Returns the summary dict (also written to summary.json). Raises ConfigError on a bad value, before any work.
    """
    cfg = parse(cfg)
    run_dir = Path(run_dir if run_dir is not None else HydraConfig.get().runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.trainer.device)
    log.info("Run dir: %s (device %s)", run_dir, device)

    data = load_data(cfg.data)
    on_device = resolve_on_device(cfg.data.on_device, data.images["train"], device)
    channels_last = cfg.trainer.channels_last and cfg.model.name == "conv"
    batches = TrainBatches(data.images["train"], cfg.data.batch_size, device, cfg.data.hflip, cfg.seed, on_device,
                           channels_last)
    if len(batches) == 0:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is not allowed; the train split has only "
                          f"{len(data.images['train'])} images")

    model = build_model(cfg.model, cfg.data, build_likelihood(cfg.loss.likelihood, cfg.loss.sigma)).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer, scheduler = build_optimizer(cfg, model)
    log.info("Model: %s, %.2fM parameters; data: %s", cfg.model.name,
             sum(p.numel() for p in model.parameters()) / 1e6, data.sizes())

    logger = RunLogger(run_dir)
    summary: Dict[str, Any] = {"status": "failed", **data.sizes()}
    try:
        summary.update(_fit(cfg, model, optimizer, scheduler, batches, data, device, run_dir, logger))
        summary["status"] = "finished"
    except DivergedError as e:
        summary.update(status="diverged", error=str(e))
        raise
    except BaseException as e:
        summary["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        write_json(run_dir / "summary.json", summary)
        logger.finish(summary)
    log.info("Finished: val/neg_elbo %.2f nats/image (%.4f bits/dim), val/kl %.2f nats; outputs in %s",
             summary["val/neg_elbo"], summary["val/bits_per_dim"], summary["val/kl"], run_dir)
    return summary


def _fit(cfg, model, optimizer, scheduler, batches, data, device, run_dir, logger) -> Dict[str, Any]:
    """The training loop; returns the final metrics for summary.json."""
    t = cfg.trainer
    steps = total_steps(cfg, len(batches))
    eval_every = t.eval_every or len(batches)
    checkpoint_every = t.checkpoint_every or eval_every
    autocast = autocast_for(device, t.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
    mean_img = mean_image(data.images["train"])
    z_fixed = fixed_latents(t.num_samples, cfg.model.latent_dim).to(device)
    x_fixed = torch.from_numpy(np.array(data.images["val"][: t.num_samples])).float().div(255).to(device)

    def run_eval(split: str, step: int, beta: float, capacity: Optional[float]) -> Dict[str, Any]:
        metrics = evaluate(model, data.images[split], cfg.data.eval_batch_size, device, beta, capacity,
                           cfg.loss.free_bits, mean_img, autocast)
        return {f"{split}/{k}": v for k, v in metrics.items()}

    def save_grids(step: int) -> Dict[str, Path]:
        model.eval()
        paths = {"samples": run_dir / "samples" / f"step_{step:07d}.png",
                 "reconstructions": run_dir / "recons" / f"step_{step:07d}.png"}
        save_samples(model, z_fixed, paths["samples"])
        save_reconstructions(model, x_fixed, paths["reconstructions"])
        model.train()
        return paths

    def checkpoint(step: int, epoch: int) -> None:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch,
                 "scheduler": scheduler.state_dict() if scheduler else None, "scaler": scaler.state_dict(),
                 "config": OmegaConf.to_container(OmegaConf.structured(cfg))}
        save_checkpoint(state, run_dir / "checkpoints" / "last.pt")

    step, epoch = 0, 0
    sums = torch.zeros(4, device=device)  # running sums of loss, recon_nll, kl, neg_elbo since the last log
    n_sum = 0
    train_time, train_images, seg_start, seg_images = 0.0, 0, None, 0
    val: Dict[str, Any] = {}
    bar = tqdm(total=steps, disable=not t.progress, desc="train", unit="step", dynamic_ncols=True)
    model.train()
    while step < steps:
        for x in batches.epoch():
            if step == WARMUP_STEPS:
                _sync(device)
                seg_start, seg_images = time.perf_counter(), 0
            beta, capacity = kl_weight(cfg.loss, step, steps)
            with autocast:
                terms = elbo_terms(model, x, beta, capacity, cfg.loss.free_bits)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(terms["loss"]).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            seg_images += len(x)
            sums += torch.stack([terms[k].detach().float() for k in ("loss", "recon_nll", "kl", "neg_elbo")])
            n_sum += 1
            bar.update()

            if step % t.log_every == 0 or step == steps:
                means = (sums / n_sum).tolist()  # the one host sync per log interval
                names = ("train/loss", "train/recon_nll", "train/kl", "train/neg_elbo")
                row = dict(zip(names, means), **{"train/beta": beta, "train/lr": optimizer.param_groups[0]["lr"],
                                                 "epoch": epoch})
                if capacity is not None:
                    row["train/capacity"] = capacity
                _check_finite(row, step)
                logger.log(row, step)
                bar.set_postfix(loss=f"{means[0]:.1f}", kl=f"{means[2]:.1f}")
                log.info("step %d/%d | loss %.2f | recon_nll %.2f | kl %.2f nats/image | beta %.3g",
                         step, steps, means[0], means[1], means[2], beta)
                sums.zero_()
                n_sum = 0

            if step % eval_every == 0 or step == steps:
                if seg_start is not None:
                    _sync(device)
                    train_time += time.perf_counter() - seg_start
                    train_images += seg_images
                val = run_eval("val", step, beta, capacity)
                paths = save_grids(step)
                logger.log({k: v for k, v in val.items()}, step)
                logger.log_images(paths, step)
                log.info("eval step %d | val/neg_elbo %.2f nats/image | val/kl %.2f | val/mse %.5f (mean image %.5f)",
                         step, val["val/neg_elbo"], val["val/kl"], val["val/mse"], val["val/mse_mean_image"])
                if step >= WARMUP_STEPS:
                    seg_start, seg_images = time.perf_counter(), 0
            if step % checkpoint_every == 0 or step == steps:
                checkpoint(step, epoch)
            if step >= steps:
                break
        else:
            epoch += 1
            if scheduler is not None:
                scheduler.step()
    bar.close()

    beta, capacity = kl_weight(cfg.loss, step, steps)
    test = run_eval("test", step, beta, capacity)
    logger.log(test, step)
    model.eval()
    save_samples(model, z_fixed, run_dir / "samples.png")
    save_reconstructions(model, x_fixed, run_dir / "reconstructions.png")
    final = {"step": step, "epoch": epoch, **val, **test}
    if train_time > 0:
        final["perf/train_images_per_s"] = train_images / train_time
    return final


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_finite(row: Dict[str, float], step: int) -> None:
    bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise DivergedError(f"non-finite {', '.join(bad)} by step {step}")


# ---------------------------------------------------------------------------------------------- CLI

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Hydra entrypoint: returns val/neg_elbo (nats per image), the objective sweepers minimise."""
    try:
        summary = train(cfg)
    except ConfigError as e:
        log.error("Config error: %s", e)
        sys.exit(2)
    except DataError as e:
        log.error("Data error: %s", e)
        sys.exit(2)
    return summary["val/neg_elbo"]


if __name__ == "__main__":
    main()
