"""Train one VAE: `python -m src.train [overrides]`, or `train(cfg)` from Python.

train() reads: setup -> data -> model and objective -> (resume) -> fit() -> final eval and summary.json.
fit() is the loop: take a step, advance the TrainState, then do what is due (log, eval, checkpoint).
"""
from __future__ import annotations

import errno
import json
import logging
import math
import os
import random
import shlex
import signal
import sys
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import hydra
import numpy as np
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, OverrideParseException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException
from tqdm import tqdm

from .checkpoint import (CheckpointError, check_same_experiment, find_resume_checkpoint, finished_summary,
                         load_checkpoint, rng_state, save_checkpoint, set_rng_state, truncate_metrics)
from .config import Config, ConfigError, TrainerConfig, did_you_mean, parse, register_configs, total_steps
from .data import DataError, TrainBatches, load_data, mean_image, resolve_on_device
from .device import autocast_for, resolve_compile, resolve_device, resolve_precision, setup_backends, synchronize
from .fid import evaluate_fid
from .loggers import RunLogger, record_failure, write_json
from .losses import Objective
from .metrics import evaluate_split
from .models import build_model
from .optim import build_optimizer
from .rundir import (RunDirLock, RunDirRefused, check_rerun, note_refused_member, record_config, recorded_config,
                     set_aside, write_hydra_files)
from .visuals import FixedGrids, fixed_latents

log = logging.getLogger(__name__)

WARMUP_STEPS = 5  # steps left out of perf/train_images_per_s (allocator, cudnn autotune, compilation)


class DivergedError(RuntimeError):
    """The loss went non-finite; the message names the step and the term."""


class Interrupted(Exception):
    """A signal stopped the run, at training step `step` (None: outside the loop)."""

    def __init__(self, signum: int, step: Optional[int] = None):
        self.signum, self.step = signum, step
        self.exit_code = 128 + signum  # 143 for SIGTERM, 130 for SIGINT, as a shell reports them
        super().__init__(f"interrupted by {signal.Signals(signum).name}" + (f" at step {step}" if step else ""))


class StopSignals:
    """SIGTERM (SLURM preemption, a container stop) and SIGINT (Ctrl-C) end a run cleanly. In the training loop
    (`defer`), the loop finishes its step, writes a checkpoint and then stops; elsewhere the run stops at once.
    SIGUSR2, which submitit sends before a SLURM time limit, is handled the same way when submitit listens for it,
    and submitit's own handler then requeues the job (it resumes from the checkpoint)."""

    def __init__(self):
        self.defer, self.received = False, None
        self.previous: Dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            signals = [signal.SIGINT, signal.SIGTERM]
            if callable(signal.getsignal(signal.SIGUSR2)):  # submitit's requeue handler
                signals.append(signal.SIGUSR2)
            for signum in signals:
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        if not self.defer:
            raise Interrupted(signum)
        self.received = signum

    def stop(self, step: int) -> None:
        """After the checkpoint: hand SIGUSR2 to submitit (it requeues and exits), else raise Interrupted."""
        if self.received == signal.SIGUSR2:
            self.previous[self.received](self.received, None)
        raise Interrupted(self.received, step)


# ---------------------------------------------------------------------------------------------- setup


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


# ---------------------------------------------------------------------------------------------- bookkeeping


class MetricSums:
    """The training terms summed since the last log, on the device (no per-step host sync), and the first
    non-finite step with its terms, so divergence is named exactly when the host next looks."""

    NAMES = ("loss", "recon_nll", "kl", "neg_elbo", "kl_penalised")

    def __init__(self, latent_dim: int, device: torch.device):
        self.scalars = torch.zeros(len(self.NAMES), device=device)
        self.kl_per_dim = torch.zeros(latent_dim, device=device)
        self.count = 0
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_terms = torch.zeros(len(self.NAMES), dtype=torch.bool, device=device)

    def add(self, terms: Dict[str, torch.Tensor], step: int) -> None:
        scalars = torch.stack([terms[k].detach().float() for k in self.NAMES])
        nonfinite = ~torch.isfinite(scalars)
        first_bad = (self.bad_step < 0) & nonfinite.any()
        self.bad_terms = torch.where(first_bad, nonfinite, self.bad_terms)
        self.bad_step = torch.where(first_bad, step, self.bad_step)
        self.scalars += scalars
        self.kl_per_dim += terms["kl_per_dim"].detach().float()
        self.count += 1

    def divergence(self) -> Optional[str]:
        """'non-finite loss, recon_nll at step 12' if a step went non-finite, else None (syncs the host)."""
        step = int(self.bad_step)
        if step < 0:
            return None
        names = [n for n, bad in zip(self.NAMES, self.bad_terms.tolist()) if bad]
        return f"non-finite {', '.join(names)} at step {step}"

    def pop_means(self) -> Dict[str, Any]:
        """The train/ means since the last call, as host numbers; the sums start again from zero."""
        row = {f"train/{k}": v for k, v in zip(self.NAMES, (self.scalars / self.count).tolist())}
        row["train/kl_per_dim"] = (self.kl_per_dim / self.count).tolist()
        self.scalars.zero_()
        self.kl_per_dim.zero_()
        self.count = 0
        return row

    def state_dict(self) -> Dict[str, Any]:
        return {"acc": {"scalars": self.scalars.cpu(), "kl_per_dim": self.kl_per_dim.cpu()}, "n_acc": self.count}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.scalars.copy_(state["acc"]["scalars"])
        self.kl_per_dim.copy_(state["acc"]["kl_per_dim"])
        self.count = state["n_acc"]


class Throughput:
    """Training images per second over training steps only: from `warmup` steps into this process, with the
    clock stopped while evaluating."""

    def __init__(self, device: torch.device, warmup: int = WARMUP_STEPS):
        self.device, self.warmup = device, warmup
        self.seconds, self.images, self.steps = 0.0, 0, 0
        self.started: Optional[float] = None
        self.pending = 0

    def before_step(self) -> None:
        if self.started is None and self.steps >= self.warmup:
            synchronize(self.device)
            self.started, self.pending = time.perf_counter(), 0

    def after_step(self, images: int) -> None:
        self.steps += 1
        self.pending += images

    def pause(self) -> None:
        if self.started is not None:
            synchronize(self.device)
            self.seconds += time.perf_counter() - self.started
            self.images += self.pending
            self.started = None

    def images_per_s(self) -> Optional[float]:
        return self.images / self.seconds if self.seconds > 0 else None


class TrainStep:
    """One optimisation step, through the compiled model when asked. A compiler that fails on the first step
    must not cost the run: it falls back to eager with a warning."""

    def __init__(self, model, objective: Objective, optimizer, scaler, autocast, compile_mode, world_size: int):
        self.eager = torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
        self.net = torch.compile(self.eager, mode=compile_mode) if compile_mode else self.eager
        self.objective, self.optimizer, self.scaler, self.autocast = objective, optimizer, scaler, autocast
        self.compile_mode, self.taken = compile_mode, 0

    def __call__(self, x: torch.Tensor, step: int) -> Dict[str, torch.Tensor]:
        """Batch x (B, C, H, W) at `step` -> the terms, still on the device."""
        try:
            terms = self._step(x, step)
        except Exception as e:
            if self.net is self.eager or self.taken:
                raise
            log.warning("trainer.compile=%s failed on the first step (%s); training eagerly", self.compile_mode,
                        str(e).splitlines()[0][:200])
            self.net, self.compile_mode = self.eager, False
            terms = self._step(x, step)
        self.taken += 1
        return terms

    def _step(self, x: torch.Tensor, step: int) -> Dict[str, torch.Tensor]:
        if self.compile_mode == "reduce-overhead":  # each graph's outputs are read before the next replay
            torch.compiler.cudagraph_mark_step_begin()
        with self.autocast:
            params, mu, logvar = self.net(x)
            terms = self.objective(params, x, mu, logvar, step)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(terms["loss"]).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return terms


class TrainState:
    """All that a run's training changes besides the weights and the optimizer: step, epoch, best, the last
    eval, the data order, the RNGs and the device-side metric sums. It is advanced before anything is logged,
    evaluated or saved, so a checkpoint always holds exactly what the next step needs."""

    def __init__(self, batches: TrainBatches, sums: MetricSums):
        self.batches, self.sums = batches, sums
        self.step, self.epoch = 0, 0
        self.best = math.inf  # lowest val/neg_elbo so far, nats per image
        self.val: Dict[str, Any] = {}  # the last eval's metrics

    def advance(self, terms: Dict[str, torch.Tensor]) -> bool:
        """Count one step and its terms; True when it ended an epoch."""
        self.step += 1
        self.sums.add(terms, self.step)
        if self.step % len(self.batches):
            return False
        self.epoch += 1
        return True

    def raise_if_diverged(self, run_dir: Path) -> None:
        """Stop with DivergedError, naming the step and terms, if any step so far went non-finite."""
        if (reason := self.sums.divergence()) is not None:
            last = run_dir / "checkpoints" / "last.pt"
            kept = f"the last good checkpoint is kept in {last}" if last.is_file() else "no checkpoint was written"
            raise DivergedError(f"{reason}; {kept}")

    def record_eval(self, val: Dict[str, Any]) -> bool:
        """Keep the eval's metrics; True when it is a new best."""
        self.val = val
        if val["val/neg_elbo"] < self.best:
            self.best = val["val/neg_elbo"]
            return True
        return False

    def batches_from_here(self) -> Iterator[torch.Tensor]:
        """Training batches forever, epoch after epoch, starting where the state stands."""
        while True:
            yield from self.batches.epoch(start=self.step % len(self.batches))

    def state_dict(self) -> Dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "best": self.best, "val": self.val, "rng": rng_state(),
                "data": self.batches.state_dict(self.step % len(self.batches)), **self.sums.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.step, self.epoch, self.best, self.val = state["step"], state["epoch"], state["best"], state["val"]
        self.batches.load_state_dict(state["data"])
        self.sums.load_state_dict(state)
        set_rng_state(state["rng"])


# ---------------------------------------------------------------------------------------------- train


def train(cfg: DictConfig | Config, run_dir: Optional[str | Path] = None) -> Dict[str, Any]:
    """Train per `cfg`, writing the run-dir contract into `run_dir` (default: Hydra's output dir).

    Returns the summary dict (also written to summary.json). A bad value raises ConfigError before any work;
    any failure still leaves summary.json with its status and error. A rerun into the same run dir with the same
    settings skips a finished run and resumes an unfinished one (trainer.resume=auto), a larger budget continues
    it, and any other difference raises RunDirRefused before anything in the dir changes. One process at a time.
    """
    run_dir = Path(run_dir if run_dir is not None else HydraConfig.get().runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunDirLock(run_dir) if int(os.environ.get("RANK", "0")) == 0 else None  # DDP: rank 0 holds the dir
    try:
        with StopSignals() as stop:
            return _train(cfg, run_dir, stop)
    finally:
        if lock is not None:
            lock.release()


def _train(raw_cfg: DictConfig | Config, run_dir: Path, stop: StopSignals) -> Dict[str, Any]:
    summary: Dict[str, Any] = {"status": "failed"}
    logger, rank, writing = None, int(os.environ.get("RANK", "0")), False
    try:
        cfg = parse(raw_cfg)
        config = OmegaConf.to_container(OmegaConf.structured(cfg))
        verdict = "new" if cfg.trainer.resume == "never" else check_rerun(run_dir, config)
        if verdict == "same" and (finished := finished_summary(run_dir)) is not None:
            log.info("Run in %s already finished; not retraining it (trainer.resume=never trains again)", run_dir)
            return finished
        writing = rank == 0
        if writing and cfg.trainer.resume == "never" and (moved := set_aside(run_dir)) is not None:
            log.info("trainer.resume=never: the earlier run's files are now in %s", moved)
        if writing:
            record_config(run_dir, config)
            write_hydra_files(run_dir, raw_cfg if isinstance(raw_cfg, DictConfig) else OmegaConf.structured(raw_cfg))
        resume_from = find_resume_checkpoint(cfg.trainer.resume, run_dir)
        rank, world_size, device = init_distributed(cfg.trainer, resolve_device(cfg.trainer.device))
        if rank != 0:  # only rank 0 talks: its log, its run dir, its W&B run
            logging.getLogger("src").setLevel(logging.WARNING)
        if cfg.data.batch_size % world_size:
            raise ConfigError(f"data.batch_size={cfg.data.batch_size} is not allowed; with {world_size} ranks it must "
                              f"divide evenly (it is the global batch)")
        seed_everything(cfg.seed)
        setup_backends(device, cfg.trainer.cudnn_benchmark)
        log.info("Run dir: %s (device %s%s)", run_dir, device, f", {world_size} ranks" if world_size > 1 else "")

        data = load_data(cfg.data)
        summary.update(data.sizes(), world_size=world_size)
        channels_last = cfg.trainer.channels_last and cfg.model.name == "conv"
        batches = TrainBatches(data.images["train"], cfg.data.batch_size, device, cfg.data.hflip, cfg.seed,
                               resolve_on_device(cfg.data.on_device, data.images["train"], device), channels_last)
        batches.shard(rank, world_size)
        if len(batches) == 0:
            raise ConfigError(f"data.batch_size={cfg.data.batch_size} is not allowed; the train split has only "
                              f"{len(data.images['train'])} images")

        objective = Objective(cfg.loss, total_steps(cfg, len(batches)))
        if (warning := objective.schedule_warning()) is not None:
            log.warning(warning)
        model = build_model(cfg.model, cfg.data, objective.likelihood).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer, scheduler = build_optimizer(cfg.optimizer, model,
                                               fused=cfg.trainer.fused_adam and device.type in ("cuda", "cpu"))
        log.info("Model: %s, %.2fM parameters; data: %s", cfg.model.name,
                 sum(p.numel() for p in model.parameters()) / 1e6, data.sizes())

        checkpoint = None
        if resume_from is not None:
            # loaded on the CPU: RNG states must stay CPU tensors, and load_state_dict moves the rest to the device
            checkpoint = load_checkpoint(resume_from)
            check_same_experiment(checkpoint["config"], config, resume_from)
            log.info("Resuming from %s at step %d", resume_from, checkpoint["step"])
        if rank == 0:
            truncate_metrics(run_dir, checkpoint["step"] if checkpoint is not None else 0)  # each step once
            logger = RunLogger(run_dir, cfg.logger, config)
        summary.update(fit(cfg, model, objective, optimizer, scheduler, batches, data, device, run_dir, logger,
                           checkpoint, rank, world_size, stop))
        summary["status"] = "finished"
    except DivergedError as e:
        summary.update(status="diverged", error=str(e))
        raise
    except Interrupted as e:
        summary.update(status="interrupted", error=str(e), step=e.step)
        raise
    except BaseException as e:
        summary["error"] = f"{type(e).__name__}: {e}"
        # a bad value into a dir that holds no experiment yet is recorded there (summary.json, W&B); a refused
        # rerun, or a bad value aimed at an existing run, leaves the dir exactly as it was
        if not writing and rank == 0 and isinstance(e, ConfigError) and not isinstance(e, RunDirRefused):
            writing = recorded_config(run_dir) is None
            if writing:
                as_given = raw_cfg if isinstance(raw_cfg, DictConfig) else OmegaConf.structured(raw_cfg)
                write_hydra_files(run_dir, as_given)  # src.compare shows the failed member's values
                record_failure(as_given, run_dir, summary)
        elif logger is None and writing and isinstance(e, (DataError, CheckpointError)):
            record_failure(raw_cfg if isinstance(raw_cfg, DictConfig) else OmegaConf.structured(raw_cfg), run_dir,
                           summary)
        raise
    finally:
        if writing:
            write_json(run_dir / "summary.json", summary)
        if logger is not None:
            logger.finish(summary)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        log.info("Finished: val/neg_elbo %.2f nats/image (%.4f bits/dim), val/kl %.2f nats; outputs in %s",
                 summary["val/neg_elbo"], summary["val/bits_per_dim"], summary["val/kl"], run_dir)
    return summary


def fit(cfg: Config, model, objective: Objective, optimizer, scheduler, batches: TrainBatches, data, device,
        run_dir: Path, logger: Optional[RunLogger], checkpoint: Optional[Dict[str, Any]], rank: int,
        world_size: int, stop: StopSignals) -> Dict[str, Any]:
    """The training loop, from `checkpoint` when resuming; returns the final metrics for summary.json."""
    t = cfg.trainer
    steps = objective.total_steps
    eval_every = t.eval_every or len(batches)
    checkpoint_every = t.checkpoint_every or eval_every
    precision = resolve_precision(t.precision, device)
    autocast = autocast_for(device, precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    take_step = TrainStep(model, objective, optimizer, scaler, autocast, resolve_compile(t.compile, device, world_size),
                          world_size)
    log.info("Training: precision %s, compile %s, channels_last %s", precision, take_step.compile_mode or "off",
             batches.memory_format == torch.channels_last)
    mean_img = mean_image(data.images["train"])
    x_fixed = torch.from_numpy(np.array(data.images["val"][: t.num_samples])).float().div(255).to(device)
    grids = FixedGrids(fixed_latents(t.num_samples, cfg.model.latent_dim).to(device), x_fixed,
                       cfg.eval.traversal_dims, cfg.eval.traversal_steps)
    state = TrainState(batches, MetricSums(cfg.model.latent_dim, device))
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        if scheduler is not None:
            scheduler.load_state_dict(checkpoint["scheduler"])
        state.load_state_dict(checkpoint)
    evaluate = partial(evaluate_split, model, objective, cfg, data, device=device, mean_img=mean_img,
                       autocast=autocast)
    meter = Throughput(device)
    bar = tqdm(total=steps, initial=state.step, disable=not t.progress or rank != 0, desc="train", unit="step",
               dynamic_ncols=True)
    batch_stream = state.batches_from_here()
    model.train()
    stop.defer = True  # a signal now ends the run at the next step boundary, after a checkpoint
    while state.step < steps:
        # 1. one step, then the state moves on (the epoch and the LR schedule with it)
        x = next(batch_stream)
        meter.before_step()
        terms = take_step(x, state.step)
        lr = optimizer.param_groups[0]["lr"]  # the rate this step used; an epoch's end moves the schedule
        meter.after_step(len(x) * world_size)
        if state.advance(terms) and scheduler is not None:
            scheduler.step()
        bar.update()
        # 2. what is due at this step: log, eval, checkpoint
        last = state.step == steps
        if state.step % t.log_every == 0 or last:
            _log_train(state, objective, lr, logger, bar, run_dir)
        if rank != 0:
            if stop.received:
                stop.stop(state.step)
            continue
        evaluating = state.step % eval_every == 0 or last
        if evaluating:
            state.raise_if_diverged(run_dir)
            meter.pause()
            improved = state.record_eval(evaluate("val", step=state.step, iwae_k=cfg.eval.iwae_k))
            logger.log(state.val, state.step)
            logger.log_images(grids.save(model, run_dir, state.step, state.val["val/kl_per_dim"]), state.step)
            _log_eval(state, cfg)
        if evaluating or state.step % checkpoint_every == 0 or stop.received:
            state.raise_if_diverged(run_dir)  # never overwrite a good checkpoint with a diverged model
            ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler else None, **state.state_dict(),
                    "wandb_run_id": logger.run_id if logger else None,
                    "config": OmegaConf.to_container(OmegaConf.structured(cfg))}
            if evaluating and improved:  # best.pt first: a kill between the two writes redoes this eval on resume
                save_checkpoint(ckpt, run_dir / "checkpoints" / "best.pt")
            save_checkpoint(ckpt, run_dir / "checkpoints" / "last.pt")
        if stop.received:
            stop.stop(state.step)
    stop.defer = False
    bar.close()
    if rank != 0:
        return {}

    test = evaluate("test", step=state.step, iwae_k=cfg.eval.iwae_k_test)
    if cfg.eval.fid:
        test.update(evaluate_fid(model, data.images["test"], cfg, device, "test"))
    logger.log(test, state.step)
    grids.save(model, run_dir, None, state.val["val/kl_per_dim"])  # the final grids; W&B has them from the last eval
    beta, capacity = objective.weights(state.step - 1)  # in force at the end, whatever the schedule reached
    final = {"step": state.step, "epoch": state.epoch, **state.val, **test, "best/val_neg_elbo": state.best,
             "train/beta": beta, **({"train/capacity": capacity} if capacity is not None else {})}
    if meter.images_per_s() is not None:
        final["perf/train_images_per_s"] = meter.images_per_s()
    return final


def _log_train(state: TrainState, objective: Objective, lr: float, logger: Optional[RunLogger], bar, run_dir: Path):
    """The train/ means since the last log, with what the schedules set for the step just taken."""
    state.raise_if_diverged(run_dir)  # the host syncs here, once per log interval
    beta, capacity = objective.weights(state.step - 1)
    row = {**state.sums.pop_means(), "train/beta": beta, "train/lr": lr, "epoch": state.epoch}
    if capacity is not None:
        row["train/capacity"] = capacity
    if logger:
        logger.log(row, state.step)
    bar.set_postfix(loss=f"{row['train/loss']:.1f}", kl=f"{row['train/kl']:.1f}")
    log.info("step %d/%d | loss %.2f | recon_nll %.2f | kl %.2f nats/image | beta %.3g", state.step,
             objective.total_steps, row["train/loss"], row["train/recon_nll"], row["train/kl"], beta)


def _log_eval(state: TrainState, cfg: Config) -> None:
    v = state.val
    log.info("eval step %d | val/neg_elbo %.2f nats/image | val/iwae_nll %.2f (k=%d) | val/kl %.2f | active units "
             "%d/%d | val/mse %.5f (mean image %.5f) | sample blur %.3f (data %.3f)", state.step, v["val/neg_elbo"],
             v["val/iwae_nll"], cfg.eval.iwae_k, v["val/kl"], v["val/active_units"], cfg.model.latent_dim,
             v["val/mse"], v["val/mse_mean_image"], v["val/sample_blur"], v["val/data_blur"])


# ---------------------------------------------------------------------------------------------- CLI

register_configs()
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")  # absolute: found however the module is run
USER_ERRORS = {RunDirRefused: "Refused", ConfigError: "Config error", DataError: "Data error",
               CheckpointError: "Checkpoint error", DivergedError: "Diverged"}
OUTPUT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)  # a full or read-only disk


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    """Hydra entrypoint: returns val/neg_elbo (nats per image), the objective sweepers minimise.

    A single run that fails on bad input or diverges exits non-zero with one line, no traceback. In a multirun
    a failing member is recorded (its summary.json and train.log, or for a refused member a line in the sweep
    dir) and returns NaN, so the other members go on; SweepReport names the failures when the sweep ends.
    A signal stops the whole process, multirun or not, with 128 + the signal's number.
    """
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        study = hydra_cfg.runtime.choices.get("sweep")
        if study and not multirun:  # a named study is a multirun; without -m it would train one default run
            raise ConfigError(f"sweep={study} is not allowed without -m; run python -m src.train -m sweep={study}")
        return train(cfg).get("val/neg_elbo", float("nan"))
    except Interrupted as e:
        last = run_dir / "checkpoints" / "last.pt"
        saved = f"checkpoint {last} (step {load_checkpoint(last)['step']})" if last.is_file() else "no checkpoint yet"
        command = " ".join(["python -m src.train", *map(shlex.quote, hydra_cfg.overrides.task),
                            f"hydra.run.dir={shlex.quote(str(run_dir))}"])
        log.error("Interrupted: %s; %s; resume with: %s", e, saved, command)
        sys.exit(e.exit_code)
    except tuple(USER_ERRORS) as e:
        label = next(text for cls, text in USER_ERRORS.items() if isinstance(e, cls))
        log.error("%s: %s", label, e)
        if isinstance(e, RunDirRefused) and multirun:
            note_refused_member(run_dir, str(e))
        if not multirun:
            sys.exit(3 if isinstance(e, DivergedError) else 2)
    except OSError as e:
        if e.errno not in OUTPUT_ERRNOS:
            raise
        log.error("Output error: cannot write %s (%s); free space or choose a writable hydra.run.dir",
                  e.filename or run_dir, e.strerror)
        if not multirun:
            sys.exit(2)
    except Exception:
        if not multirun:
            raise
        log.exception("Member failed")  # the traceback goes to this member's train.log
    return float("nan")


class SweepReport(Callback):
    """At the end of a multirun: one line per failed or refused member, and exit status 1 if any."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        (Path(config.hydra.sweep.dir) / "refused_members.jsonl").unlink(missing_ok=True)  # from an earlier launch

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        failed = []
        for summary_path in sorted(sweep.glob("*/summary.json"), key=lambda p: int(p.parent.name)
                                   if p.parent.name.isdigit() else 0):
            summary = json.loads(summary_path.read_text())
            if summary.get("status") != "finished":
                failed.append(f"member {summary_path.parent.name} {summary.get('status')}: {summary.get('error')}")
        for member in sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()):
            if (member / ".lock").is_file() and not (member / "summary.json").is_file():  # started, never ended
                failed.append(f"member {member.name} ended without a summary: killed by the system (out of memory?) "
                              "or by kill -9; rerun the sweep to resume it")
        refused = sweep / "refused_members.jsonl"
        if refused.is_file():
            for line in refused.read_text().splitlines():
                note = json.loads(line)
                failed.append(f"member {note['member']} refused: {note['error']}")
        if failed:
            for line in failed:
                log.error(line)
            log.error("%d member(s) of the sweep in %s did not finish", len(failed), sweep)
            sys.exit(1)
        log.info("Sweep finished: every member in %s", sweep)


def hydra_error_line(e: BaseException) -> str:
    """Hydra's composition and override errors as one line (it prints them over several, plus a hint)."""
    if isinstance(e, OverrideParseException):
        return f"cannot parse the override {e.override!r}: {str(e).splitlines()[0]} (Hydra's override grammar)"
    chain = [e]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    for cause in chain:  # a key that is not in the schema: name it and the nearest known key
        key = getattr(cause, "full_key", None)
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and key:
            section, _, name = key.rpartition(".")
            schema = OmegaConf.structured(Config)
            known = schema.get(section) if section else schema
            if isinstance(known, DictConfig):
                where = f"a key of {section}" if section else "a config key"
                return f"{key} is not {where}{did_you_mean(name, list(known.keys()), section + '.' if section else '')}"
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    lines = lines[: next((i for i, line in enumerate(lines) if line.startswith("Config search path")), len(lines))]
    if len(chain) > 1 and isinstance(chain[1], OmegaConfBaseException):
        lines.append(str(chain[1]).splitlines()[0])
    text = lines[0]
    for line in lines[1:]:
        text += (" " if text.endswith(":") else "; ") + line
    return text


def _one_line_hydra_errors(run_and_report: Callable) -> Callable:
    """Wrap Hydra's error reporter: a bad override or config group (the user's input), or an output dir that
    cannot be written, ends with one line and exit status 2; anything else is reported by Hydra as before.
    HYDRA_FULL_ERROR=1 still shows everything."""

    def report(func: Callable) -> Any:
        def guarded() -> Any:
            try:
                return func()
            except (HydraException, OmegaConfBaseException) as e:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                print(f"Config error: {hydra_error_line(e)}", file=sys.stderr)
                sys.exit(2)
            except OSError as e:  # Hydra could not create the run dir or its log there
                if e.errno not in (*OUTPUT_ERRNOS, errno.ENOENT) or os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                print(f"Output error: cannot write {e.filename} ({e.strerror}); choose a writable hydra.run.dir",
                      file=sys.stderr)
                sys.exit(2)

        return run_and_report(guarded)

    return report


if __name__ == "__main__":
    import hydra._internal.utils as hydra_utils

    hydra_utils.run_and_report = _one_line_hydra_errors(hydra_utils.run_and_report)
    # run the copy imported as `src.train`, not `__main__`: launchers (joblib, submitit) then pickle `main`
    # by reference instead of by value
    from src.train import main as entrypoint

    try:
        entrypoint()
    except ValueError as e:  # Hydra's own check of its flags, raised before its error reporter
        if not str(e).startswith("Only one of") or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"Command-line error: {e} (e.g. `-m ... --cfg job` cannot be combined)", file=sys.stderr)
        sys.exit(2)
