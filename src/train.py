"""Train one VAE: `python -m src.train [overrides]`, or `train(cfg)` from Python.

train() reads: setup -> data -> model -> loop (log, eval, checkpoint) -> final eval and summary.json.
"""
from __future__ import annotations

import json
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
from hydra.types import RunMode
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from .checkpoint import save_checkpoint
from .config import Config, ConfigError, parse, register_configs
from .data import DataError, TrainBatches, load_data, mean_image, resolve_on_device
from .likelihoods import build_likelihood
from .loggers import RunLogger, write_json
from .losses import elbo_terms, kl_weight
from .metrics import evaluate, kl_per_dim_ranking
from .models import build_model
from .visuals import fixed_latents, save_reconstructions, save_samples, save_traversals

log = logging.getLogger(__name__)

TRAIN_TERMS = ("loss", "recon_nll", "kl", "neg_elbo", "kl_penalised", "kl_per_dim")
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

    Returns the summary dict (also written to summary.json). A bad value raises ConfigError before any work;
    any failure still leaves summary.json with its status and error.
    """
    run_dir = Path(run_dir if run_dir is not None else HydraConfig.get().runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    summary: Dict[str, Any] = {"status": "failed"}
    logger = None
    try:
        cfg = parse(cfg)
        seed_everything(cfg.seed)
        device = resolve_device(cfg.trainer.device)
        log.info("Run dir: %s (device %s)", run_dir, device)

        data = load_data(cfg.data)
        summary.update(data.sizes())
        on_device = resolve_on_device(cfg.data.on_device, data.images["train"], device)
        channels_last = cfg.trainer.channels_last and cfg.model.name == "conv"
        batches = TrainBatches(data.images["train"], cfg.data.batch_size, device, cfg.data.hflip, cfg.seed,
                               on_device, channels_last)
        if len(batches) == 0:
            raise ConfigError(f"data.batch_size={cfg.data.batch_size} is not allowed; the train split has only "
                              f"{len(data.images['train'])} images")

        model = build_model(cfg.model, cfg.data, build_likelihood(cfg.loss.likelihood, cfg.loss.sigma)).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer, scheduler = build_optimizer(cfg, model)
        log.info("Model: %s, %.2fM parameters; data: %s", cfg.model.name,
                 sum(p.numel() for p in model.parameters()) / 1e6, data.sizes())

        logger = RunLogger(run_dir, cfg.logger, OmegaConf.to_container(OmegaConf.structured(cfg)))
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
        if logger is not None:
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
    # the same z and the same inputs at every eval and in every run: grids and blur ratios compare across runs
    z_fixed = fixed_latents(max(t.num_samples, cfg.eval.blur_samples), cfg.model.latent_dim).to(device)
    x_fixed = torch.from_numpy(np.array(data.images["val"][: t.num_samples])).float().div(255).to(device)

    def run_eval(split: str, step: int, iwae_k: int) -> Dict[str, Any]:
        beta, capacity = kl_weight(cfg.loss, step, steps)
        metrics = evaluate(model, data.images[split], device=device, batch_size=cfg.data.eval_batch_size,
                           weights=(beta, capacity, cfg.loss.free_bits), mean_img=mean_img, iwae_k=iwae_k,
                           z_samples=z_fixed[: cfg.eval.blur_samples], factors=data.factors.get(split),
                           mi_images=cfg.eval.mi_images, autocast=autocast)
        return {f"{split}/{k}": v for k, v in metrics.items()}

    def save_grids(step: Optional[int], kl_per_dim) -> Dict[str, Path]:
        """Per-eval grids under samples/ recons/ traversals/, or the final ones in the run dir (step None)."""
        name = f"step_{step:07d}.png" if step is not None else None
        paths = {"samples": run_dir / ("samples/" + name if name else "samples.png"),
                 "reconstructions": run_dir / ("recons/" + name if name else "reconstructions.png"),
                 "traversals": run_dir / ("traversals/" + name if name else "traversals.png")}
        model.eval()
        with torch.no_grad():
            save_samples(model, z_fixed[: t.num_samples], paths["samples"])
            save_reconstructions(model, x_fixed, paths["reconstructions"])
            dims = kl_per_dim_ranking(kl_per_dim)[: cfg.eval.traversal_dims]
            if dims:
                save_traversals(model, x_fixed[:1], dims, paths["traversals"], cfg.eval.traversal_steps)
            else:
                del paths["traversals"]
        model.train()
        return paths

    def checkpoint(step: int, epoch: int) -> None:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch,
                 "scheduler": scheduler.state_dict() if scheduler else None, "scaler": scaler.state_dict(),
                 "config": OmegaConf.to_container(OmegaConf.structured(cfg))}
        save_checkpoint(state, run_dir / "checkpoints" / "last.pt")

    step, epoch = 0, 0
    acc: Dict[str, torch.Tensor] = {}  # sums of detached terms on the device since the last log: no per-step sync
    n_acc = 0
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
            for k in TRAIN_TERMS:
                acc[k] = acc.get(k, 0) + terms[k].detach().float()
            n_acc += 1
            bar.update()

            if step % t.log_every == 0 or step == steps:
                row = {f"train/{k}": (v / n_acc).tolist() for k, v in acc.items()}  # the host syncs, once per log
                row.update({"train/beta": beta, "train/lr": optimizer.param_groups[0]["lr"], "epoch": epoch})
                if capacity is not None:
                    row["train/capacity"] = capacity
                _check_finite(row, step)
                logger.log(row, step)
                bar.set_postfix(loss=f"{row['train/loss']:.1f}", kl=f"{row['train/kl']:.1f}")
                log.info("step %d/%d | loss %.2f | recon_nll %.2f | kl %.2f nats/image | beta %.3g",
                         step, steps, row["train/loss"], row["train/recon_nll"], row["train/kl"], beta)
                acc, n_acc = {}, 0

            if step % eval_every == 0 or step == steps:
                if seg_start is not None:
                    _sync(device)
                    train_time += time.perf_counter() - seg_start
                    train_images += seg_images
                val = run_eval("val", step, cfg.eval.iwae_k)
                logger.log(val, step)
                logger.log_images(save_grids(step, val["val/kl_per_dim"]), step)
                log.info("eval step %d | val/neg_elbo %.2f nats/image | val/iwae_nll %.2f (k=%d) | val/kl %.2f | "
                         "active units %d/%d | val/mse %.5f (mean image %.5f) | sharpness %.2f",
                         step, val["val/neg_elbo"], val["val/iwae_nll"], cfg.eval.iwae_k, val["val/kl"],
                         val["val/active_units"], cfg.model.latent_dim, val["val/mse"], val["val/mse_mean_image"],
                         val["val/sharpness_ratio"])
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

    test = run_eval("test", step, cfg.eval.iwae_k_test)
    logger.log(test, step)
    save_grids(None, val["val/kl_per_dim"])  # the final grids; W&B has them from the last eval
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


CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")  # absolute: found however the module is run


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    """Hydra entrypoint: returns val/neg_elbo (nats per image), the objective sweepers minimise.

    A single run that fails on bad input exits non-zero with one line. In a multirun a failing member is
    recorded (its summary.json, its train.log) and returns NaN, so the other members go on; SweepReport
    names the failures and sets the exit status when the sweep ends.
    """
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        return train(cfg)["val/neg_elbo"]
    except (ConfigError, DataError, DivergedError) as e:
        kind = {ConfigError: "Config error", DataError: "Data error"}.get(type(e), "Diverged")
        log.error("%s: %s", kind, e)
        if not multirun:
            sys.exit(2 if kind != "Diverged" else 3)
    except Exception:
        if not multirun:
            raise
        log.exception("Member failed")  # the traceback goes to this member's train.log
    return float("nan")


class SweepReport(Callback):
    """At the end of a multirun: one line per failed member, and a non-zero exit status if any failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        failed = []
        for summary_path in sorted(sweep.glob("*/summary.json"), key=lambda p: int(p.parent.name)
                                   if p.parent.name.isdigit() else 0):
            summary = json.loads(summary_path.read_text())
            if summary.get("status") != "finished":
                failed.append(f"member {summary_path.parent.name} {summary.get('status')}: {summary.get('error')}")
        if failed:
            for line in failed:
                log.error(line)
            log.error("%d member(s) of the sweep in %s did not finish", len(failed), sweep)
            sys.exit(1)
        log.info("Sweep finished: every member in %s", sweep)


if __name__ == "__main__":
    # run the copy imported as `src.train`, not `__main__`: launchers (joblib, submitit) then pickle `main`
    # by reference instead of by value
    from src.train import main as entrypoint

    entrypoint()
