"""Train one VAE: `python -m src.train [overrides]`, or `train(cfg)` from Python.

train() reads: setup -> data -> model -> (resume) -> loop (log, eval, checkpoint) -> final eval and summary.json.
"""
from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ContextManager, Dict, Optional, Tuple

import hydra
import numpy as np
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import Config, ConfigError, TrainerConfig, parse, register_configs
from .data import DataError, TrainBatches, load_data, mean_image, resolve_on_device
from .likelihoods import build_likelihood
from .loggers import RunLogger, record_failure, write_json
from .losses import kl_weight, terms_from_outputs
from .metrics import evaluate_split, kl_per_dim_ranking
from .models import build_model
from .visuals import fixed_latents, save_reconstructions, save_samples, save_traversals

log = logging.getLogger(__name__)

SCALAR_TERMS = ("loss", "recon_nll", "kl", "neg_elbo", "kl_penalised")
WARMUP_STEPS = 5  # steps left out of perf/train_images_per_s (allocator, cudnn autotune, compilation)
# sections whose change makes an old checkpoint a different experiment (the trainer's budget may grow)
RESUME_MUST_MATCH = ("model", "data", "loss", "optimizer")


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


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: bf16 on CUDA where the card has it (no scaler needed), fp32 elsewhere (CPU autocast is slower)."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def resolve_compile(mode: Any, device: torch.device, world_size: int) -> Any:
    """auto: CUDA graphs (reduce-overhead) on one CUDA device, where small VAEs are launch-bound; off elsewhere."""
    if mode == "auto":
        return "reduce-overhead" if device.type == "cuda" and world_size == 1 else False
    return "default" if mode is True else mode


def setup_backends(t: TrainerConfig, device: torch.device) -> None:
    """CUDA only: cudnn autotuning for the fixed batch shape, TF32 for fp32 matmuls and convs."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = t.cudnn_benchmark
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def init_distributed(t: TrainerConfig, device: torch.device) -> Tuple[int, int, torch.device]:
    """(rank, world_size, device) under `trainer.strategy=ddp` and torchrun: NCCL on CUDA, gloo on CPU."""
    if t.strategy != "ddp":
        return 0, 1, device
    if "RANK" not in os.environ:
        raise ConfigError("trainer.strategy='ddp' is not allowed outside torchrun; run "
                          "torchrun --nproc_per_node=N -m src.train trainer.strategy=ddp hydra.run.dir=<dir> ...")
    if HydraConfig.initialized() and not any(o.startswith("hydra.run.dir=") for o in HydraConfig.get().overrides.hydra):
        raise ConfigError("trainer.strategy='ddp' needs hydra.run.dir=<dir> on the command line, so every rank "
                          "shares one run dir")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


# ---------------------------------------------------------------------------------------------- state


def rng_state() -> Dict[str, Any]:
    """Every RNG that training draws from, as tensors and plain types (weights-only loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                      "cached": cached},
            "python": {"version": version, "state": list(py_state), "gauss": gauss}}


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def find_resume_checkpoint(resume: str, run_dir: Path) -> Optional[Path]:
    """The checkpoint `trainer.resume` points at: auto -> this run dir's last.pt if any; never -> None."""
    if resume == "never":
        return None
    if resume == "auto":
        path = run_dir / "checkpoints" / "last.pt"
        return path if path.is_file() else None
    path = Path(resume).expanduser()
    path = path / "checkpoints" / "last.pt" if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(f"trainer.resume={resume!r} is not allowed; no checkpoint at {path}: give a .pt file, a run "
                          "dir holding checkpoints/last.pt, auto or never")
    return path


def _check_same_experiment(saved: Dict[str, Any], cfg: Config, path: Path) -> None:
    current = OmegaConf.to_container(OmegaConf.structured(cfg))
    for section in RESUME_MUST_MATCH:
        for key, value in current[section].items():
            old = saved.get(section, {}).get(key, value)
            if old != value:
                raise ConfigError(f"{section}.{key}={value!r} is not allowed here: {path} was trained with "
                                  f"{old!r}; use a new hydra.run.dir, or trainer.resume=never to start over")


def _finished_summary(run_dir: Path) -> Optional[Dict[str, Any]]:
    path = run_dir / "summary.json"
    if path.is_file():
        summary = json.loads(path.read_text())
        if summary.get("status") == "finished":
            return summary
    return None


def _truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metrics.jsonl rows written after the checkpoint, so each step appears once after a resume."""
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        tmp = path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(r + "\n" for r in rows))
        tmp.replace(path)


# ---------------------------------------------------------------------------------------------- train


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    """max_steps and max_epochs, whichever ends first."""
    limits = [cfg.trainer.max_steps, None if cfg.trainer.max_epochs is None else cfg.trainer.max_epochs * steps_per_epoch]
    return min(s for s in limits if s is not None)


def build_optimizer(cfg: Config, model: torch.nn.Module, device: torch.device = torch.device("cpu")):
    """Adam or AdamW (fused kernels on CUDA with trainer.fused_adam), and the per-epoch LR schedule."""
    o = cfg.optimizer
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[o.name]
    fused = {"fused": True} if device.type == "cuda" and cfg.trainer.fused_adam else {}
    optimizer = cls(model.parameters(), lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas), **fused)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, o.gamma) if o.scheduler == "exponential" else None
    return optimizer, scheduler


def train(cfg: DictConfig | Config, run_dir: Optional[str | Path] = None) -> Dict[str, Any]:
    """Train per `cfg`, writing the run-dir contract into `run_dir` (default: Hydra's output dir).

    Returns the summary dict (also written to summary.json). A bad value raises ConfigError before any work;
    any failure still leaves summary.json with its status and error. With trainer.resume=auto a rerun into
    the same run dir continues from checkpoints/last.pt, and a finished run is returned, not retrained.
    """
    run_dir = Path(run_dir if run_dir is not None else HydraConfig.get().runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    raw_cfg = cfg
    summary: Dict[str, Any] = {"status": "failed"}
    logger, rank = None, 0
    try:
        cfg = parse(cfg)
        finished = _finished_summary(run_dir) if cfg.trainer.resume == "auto" else None
        if finished is not None:
            log.info("Run in %s already finished; not retraining it (trainer.resume=never trains again)", run_dir)
            summary = finished
            return summary
        resume_from = find_resume_checkpoint(cfg.trainer.resume, run_dir)
        rank, world_size, device = init_distributed(cfg.trainer, resolve_device(cfg.trainer.device))
        if rank != 0:  # only rank 0 talks: its log, its run dir, its W&B run
            logging.getLogger("src").setLevel(logging.WARNING)
        if cfg.data.batch_size % world_size:
            raise ConfigError(f"data.batch_size={cfg.data.batch_size} is not allowed; with {world_size} ranks it must "
                              f"divide evenly (it is the global batch)")
        seed_everything(cfg.seed)
        setup_backends(cfg.trainer, device)
        log.info("Run dir: %s (device %s%s)", run_dir, device, f", {world_size} ranks" if world_size > 1 else "")

        data = load_data(cfg.data)
        summary.update(data.sizes(), world_size=world_size)
        on_device = resolve_on_device(cfg.data.on_device, data.images["train"], device)
        channels_last = cfg.trainer.channels_last and cfg.model.name == "conv"
        batches = TrainBatches(data.images["train"], cfg.data.batch_size, device, cfg.data.hflip, cfg.seed,
                               on_device, channels_last)
        batches.shard(rank, world_size)
        if len(batches) == 0:
            raise ConfigError(f"data.batch_size={cfg.data.batch_size} is not allowed; the train split has only "
                              f"{len(data.images['train'])} images")

        model = build_model(cfg.model, cfg.data, build_likelihood(cfg.loss.likelihood, cfg.loss.sigma)).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer, scheduler = build_optimizer(cfg, model, device)
        log.info("Model: %s, %.2fM parameters; data: %s", cfg.model.name,
                 sum(p.numel() for p in model.parameters()) / 1e6, data.sizes())

        state = None
        if resume_from is not None:
            state = load_checkpoint(resume_from, map_location=device)
            _check_same_experiment(state["config"], cfg, resume_from)
            log.info("Resuming from %s at step %d", resume_from, state["step"])
        if rank == 0:
            if state is not None:
                _truncate_metrics(run_dir, state["step"])
            logger = RunLogger(run_dir, cfg.logger, OmegaConf.to_container(OmegaConf.structured(cfg)))
        summary.update(_fit(cfg, model, optimizer, scheduler, batches, data, device, run_dir, logger, state,
                            rank, world_size))
        summary["status"] = "finished"
    except DivergedError as e:
        summary.update(status="diverged", error=str(e))
        raise
    except BaseException as e:
        summary["error"] = f"{type(e).__name__}: {e}"
        if logger is None and rank == 0 and isinstance(e, (ConfigError, DataError, CheckpointError)):
            record_failure(raw_cfg if isinstance(raw_cfg, DictConfig) else OmegaConf.structured(raw_cfg), run_dir,
                           summary)
        raise
    finally:
        if rank == 0:
            write_json(run_dir / "summary.json", summary)
        if logger is not None:
            logger.finish(summary)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        log.info("Finished: val/neg_elbo %.2f nats/image (%.4f bits/dim), val/kl %.2f nats; outputs in %s",
                 summary["val/neg_elbo"], summary["val/bits_per_dim"], summary["val/kl"], run_dir)
    return summary


def train_step(net, likelihood, optimizer, scaler, autocast, x: torch.Tensor, beta: float,
               capacity: Optional[float], free_bits: float, cudagraphs: bool = False) -> Dict[str, torch.Tensor]:
    """One optimisation step on batch x (B, C, H, W); returns the terms, still on the device (no sync)."""
    if cudagraphs:  # each step's graph outputs are consumed before the next replay overwrites them
        torch.compiler.cudagraph_mark_step_begin()
    with autocast:
        params, mu, logvar = net(x)
        terms = terms_from_outputs(likelihood.nll(params, x), mu, logvar, beta, capacity, free_bits)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(terms["loss"]).backward()
    scaler.step(optimizer)
    scaler.update()
    return terms


def _fit(cfg, model, optimizer, scheduler, batches, data, device, run_dir, logger, state, rank, world_size):
    """The training loop, from `state` when resuming; returns the final metrics for summary.json."""
    t = cfg.trainer
    steps = total_steps(cfg, len(batches))
    eval_every = t.eval_every or len(batches)
    checkpoint_every = t.checkpoint_every or eval_every
    precision = resolve_precision(t.precision, device)
    autocast = autocast_for(device, precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    eager = torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 else model  # what training calls
    compile_mode = resolve_compile(t.compile, device, world_size)
    net = torch.compile(eager, mode=compile_mode) if compile_mode else eager
    log.info("Training: precision %s, compile %s, channels_last %s", precision, compile_mode or "off",
             batches.memory_format == torch.channels_last)
    mean_img = mean_image(data.images["train"])
    # the same z and the same inputs at every eval and in every run: the grids compare across runs
    z_fixed = fixed_latents(t.num_samples, cfg.model.latent_dim).to(device)
    x_fixed = torch.from_numpy(np.array(data.images["val"][: t.num_samples])).float().div(255).to(device)

    step, epoch, n_acc, best, val = 0, 0, 0, float("inf"), {}
    # sums since the last log, on the device (no per-step sync): the SCALAR_TERMS stacked, and KL per dim
    acc = {"scalars": torch.zeros(len(SCALAR_TERMS), device=device),
           "kl_per_dim": torch.zeros(cfg.model.latent_dim, device=device)}
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        batches.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        step, epoch, n_acc, best, val = state["step"], state["epoch"], state["n_acc"], state["best"], state["val"]
        acc = {k: v.to(device) for k, v in state["acc"].items()}
    # first non-finite step and which terms, kept on the device: divergence is named exactly, without a sync
    bad_step = torch.full((), -1, dtype=torch.long, device=device)
    bad_terms = torch.zeros(len(SCALAR_TERMS), dtype=torch.bool, device=device)

    def check_finite() -> None:
        if bad_step.item() >= 0:
            names = [n for n, bad in zip(SCALAR_TERMS, bad_terms.tolist()) if bad]
            raise DivergedError(f"non-finite {', '.join(names)} at step {bad_step.item()}; the last good checkpoint "
                                f"is kept in {run_dir / 'checkpoints'}")

    def run_eval(split: str, iwae_k: int) -> Dict[str, Any]:
        return evaluate_split(model, cfg, data, split, device=device, step=step, total_steps=steps, iwae_k=iwae_k,
                              mean_img=mean_img, autocast=autocast)

    def save_grids(at_step: Optional[int], kl_per_dim) -> Dict[str, Path]:
        """Per-eval grids under samples/ recons/ traversals/, or the final ones in the run dir (step None)."""
        name = f"step_{at_step:07d}.png" if at_step is not None else None
        paths = {"samples": run_dir / ("samples/" + name if name else "samples.png"),
                 "reconstructions": run_dir / ("recons/" + name if name else "reconstructions.png"),
                 "traversals": run_dir / ("traversals/" + name if name else "traversals.png")}
        model.eval()
        with torch.no_grad():
            save_samples(model, z_fixed, paths["samples"])
            save_reconstructions(model, x_fixed, paths["reconstructions"])
            dims = kl_per_dim_ranking(kl_per_dim)[: cfg.eval.traversal_dims]
            if dims:
                save_traversals(model, x_fixed[:1], dims, paths["traversals"], cfg.eval.traversal_steps)
            else:
                del paths["traversals"]
        model.train()
        return paths

    def checkpoint_state() -> Dict[str, Any]:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch,
                "scheduler": scheduler.state_dict() if scheduler else None, "scaler": scaler.state_dict(),
                "data": batches.state_dict(step % len(batches)), "rng": rng_state(),
                "acc": {k: v.detach().cpu() for k, v in acc.items()}, "n_acc": n_acc, "best": best, "val": val,
                "wandb_run_id": logger.run_id if logger else None,
                "config": OmegaConf.to_container(OmegaConf.structured(cfg))}

    train_time, train_images, seg_start, seg_images, first_step = 0.0, 0, None, 0, step
    bar = tqdm(total=steps, initial=step, disable=not t.progress or rank != 0, desc="train", unit="step",
               dynamic_ncols=True)
    model.train()
    while step < steps:
        for x in batches.epoch(start=step % len(batches)):
            if seg_start is None and step >= WARMUP_STEPS:
                _sync(device)
                seg_start, seg_images = time.perf_counter(), 0
            beta, capacity = kl_weight(cfg.loss, step, steps)
            try:
                terms = train_step(net, model.likelihood, optimizer, scaler, autocast, x, beta, capacity,
                                   cfg.loss.free_bits, cudagraphs=compile_mode == "reduce-overhead")
            except Exception as e:  # a compiler that fails on this machine must not cost the run
                if net is eager or step != first_step:
                    raise
                log.warning("trainer.compile=%s failed on the first step (%s); training eagerly",
                            compile_mode, str(e).splitlines()[0][:200])
                net, compile_mode = eager, False
                terms = train_step(net, model.likelihood, optimizer, scaler, autocast, x, beta, capacity,
                                   cfg.loss.free_bits)
            step += 1
            seg_images += len(x) * world_size
            scalars = torch.stack([terms[k].detach().float() for k in SCALAR_TERMS])
            nonfinite = ~torch.isfinite(scalars)
            first_bad = (bad_step < 0) & nonfinite.any()
            bad_terms = torch.where(first_bad, nonfinite, bad_terms)
            bad_step = torch.where(first_bad, step, bad_step)
            acc["scalars"] += scalars
            acc["kl_per_dim"] += terms["kl_per_dim"].detach().float()
            n_acc += 1
            bar.update()

            if step % t.log_every == 0 or step == steps:
                check_finite()  # the host syncs here, once per log interval
                row = {f"train/{k}": v for k, v in zip(SCALAR_TERMS, (acc["scalars"] / n_acc).tolist())}
                row["train/kl_per_dim"] = (acc["kl_per_dim"] / n_acc).tolist()
                row.update({"train/beta": beta, "train/lr": optimizer.param_groups[0]["lr"], "epoch": epoch})
                if capacity is not None:
                    row["train/capacity"] = capacity
                if logger:
                    logger.log(row, step)
                bar.set_postfix(loss=f"{row['train/loss']:.1f}", kl=f"{row['train/kl']:.1f}")
                log.info("step %d/%d | loss %.2f | recon_nll %.2f | kl %.2f nats/image | beta %.3g",
                         step, steps, row["train/loss"], row["train/recon_nll"], row["train/kl"], beta)
                acc["scalars"].zero_()
                acc["kl_per_dim"].zero_()
                n_acc = 0

            is_eval = step % eval_every == 0 or step == steps
            if is_eval and rank == 0:
                check_finite()
                if seg_start is not None:
                    _sync(device)
                    train_time += time.perf_counter() - seg_start
                    train_images += seg_images
                    seg_start = None
                val = run_eval("val", cfg.eval.iwae_k)
                logger.log(val, step)
                logger.log_images(save_grids(step, val["val/kl_per_dim"]), step)
                log.info("eval step %d | val/neg_elbo %.2f nats/image | val/iwae_nll %.2f (k=%d) | val/kl %.2f | "
                         "active units %d/%d | val/mse %.5f (mean image %.5f) | sharpness %.2f",
                         step, val["val/neg_elbo"], val["val/iwae_nll"], cfg.eval.iwae_k, val["val/kl"],
                         val["val/active_units"], cfg.model.latent_dim, val["val/mse"], val["val/mse_mean_image"],
                         val["val/sharpness_ratio"])
            if (is_eval or step % checkpoint_every == 0) and rank == 0:
                check_finite()  # never overwrite a good checkpoint with a diverged model
                ckpt = checkpoint_state()
                save_checkpoint(ckpt, run_dir / "checkpoints" / "last.pt")
                if is_eval and val["val/neg_elbo"] < best:
                    best = ckpt["best"] = val["val/neg_elbo"]
                    save_checkpoint(ckpt, run_dir / "checkpoints" / "best.pt")
            if step >= steps:
                break
        else:
            epoch += 1
            if scheduler is not None:
                scheduler.step()
    bar.close()
    if rank != 0:
        return {}

    test = run_eval("test", cfg.eval.iwae_k_test)
    logger.log(test, step)
    save_grids(None, val["val/kl_per_dim"])  # the final grids; W&B has them from the last eval
    final = {"step": step, "epoch": epoch, **val, **test, "best/val_neg_elbo": best}
    if train_time > 0:
        final["perf/train_images_per_s"] = train_images / train_time
    return final


# ---------------------------------------------------------------------------------------------- CLI

register_configs()
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")  # absolute: found however the module is run
USER_ERRORS = {ConfigError: "Config error", DataError: "Data error", CheckpointError: "Checkpoint error",
               DivergedError: "Diverged"}


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    """Hydra entrypoint: returns val/neg_elbo (nats per image), the objective sweepers minimise.

    A single run that fails on bad input or diverges exits non-zero with one line, no traceback. In a multirun
    a failing member is recorded (its summary.json, its train.log) and returns NaN, so the other members go
    on; SweepReport names the failures and sets the exit status when the sweep ends.
    """
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        return train(cfg).get("val/neg_elbo", float("nan"))
    except tuple(USER_ERRORS) as e:
        log.error("%s: %s", USER_ERRORS[type(e)], e)
        if not multirun:
            sys.exit(3 if isinstance(e, DivergedError) else 2)
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
