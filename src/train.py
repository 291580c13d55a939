"""Train one VAE: `train(cfg)` from Python, or `python -m src.train [overrides]` (the command line is src/cli.py).

train() reads: setup -> data -> model and objective -> (resume) -> fit() -> final eval -> summary.json.
fit() is the loop: take a step, advance the TrainState, then do what is due (log, eval, checkpoint); the final
test eval is its last block. What happens around a run as a process (the lock, Ctrl-C and SIGTERM, summary.json
on every exit) is src/lifecycle.py.
"""
from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from .checkpoint import find_resume_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state, \
    truncate_metrics
from .config import Config, ConfigError, TrainerConfig, total_steps
from .data import TrainBatches, cache_folder, load_data, mean_image, resolve_on_device
from .device import autocast_for, resolve_compile, resolve_device, resolve_precision, setup_backends, synchronize
from .fid import evaluate_fid
from .judge import content_metrics, judge_for
from .identity import check_checkpoint, check_rerun, record_config
from .lifecycle import DivergedError, RunLifecycle
from .loggers import RunLogger
from .losses import Objective
from .metrics import evaluate_split
from .models import build_model
from .optim import build_optimizer
from .rundir import RunDir, finished_summary, write_hydra_files
from .config_check import parse
from .visuals import FixedGrids, fixed_latents

log = logging.getLogger(__name__)

WARMUP_STEPS = 5  # steps left out of perf/train_images_per_s (allocator, cudnn autotune, compilation)


# ---------------------------------------------------------------------------------------------- setup


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Placement:
    """Where this process trains: its rank among `world_size` DDP ranks, and its device."""
    rank: int
    world_size: int
    device: torch.device


def init_distributed(t: TrainerConfig, device: torch.device) -> Placement:
    """Under `trainer.strategy=ddp` and torchrun: NCCL on CUDA, gloo on CPU; else one rank."""
    if t.strategy != "ddp":
        return Placement(0, 1, device)
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
    return Placement(dist.get_rank(), dist.get_world_size(), device)


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

    def share_divergence(self) -> None:
        """Under DDP: every rank learns the first step any rank went non-finite (a collective, so every rank calls
        it at the same steps), so all ranks stop together instead of one waiting in the next all-reduce."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.bad_step, op=dist.ReduceOp.MAX)

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

    def __call__(self, x: torch.Tensor, step: int, eps: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Batch x (B, C, H, W) at `step` -> the terms, still on the device; `eps` (B, latent_dim) the noise, else
        drawn from torch's generator."""
        try:
            terms = self._step(x, step, eps)
        except Exception as e:
            if self.net is self.eager or self.taken:
                raise
            log.warning("trainer.compile=%s failed on the first step (%s); training eagerly", self.compile_mode,
                        str(e).splitlines()[0][:200])
            self.net, self.compile_mode = self.eager, False
            terms = self._step(x, step, eps)
        self.taken += 1
        return terms

    def _step(self, x: torch.Tensor, step: int, eps: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        if self.compile_mode == "reduce-overhead":  # each graph's outputs are read before the next replay
            torch.compiler.cudagraph_mark_step_begin()
        with self.autocast:
            params, mu, logvar = self.net(x) if eps is None else self.net(x, eps)
            terms = self.objective(params, x, mu, logvar, step)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(terms["loss"]).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return terms


class TrainState:
    """Everything a checkpoint holds: the model, optimizer, LR scheduler and grad scaler, and what training
    changes besides them (step, epoch, best, the last eval, the data order, the RNGs, the device-side metric
    sums). It is advanced before anything is logged, evaluated or saved, so a checkpoint always holds exactly what
    the next step needs; `state_dict()` is the checkpoint, `load_state_dict()` resumes from one."""

    def __init__(self, model, optimizer, scheduler, scaler, batches: TrainBatches, sums: MetricSums,
                 config: Dict[str, Any]):
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.batches, self.sums, self.config = batches, sums, config
        self.step, self.epoch = 0, 0
        self.best = math.inf  # lowest val/neg_elbo so far, nats per image
        self.val: Dict[str, Any] = {}  # the last eval's metrics
        self.wandb_run_id: Optional[str] = None
        # the RNG states training draws from: torch's global ones, or a packed member's own (src/packed.py)
        self.get_rng, self.set_rng = rng_state, set_rng_state

    def advance(self, terms: Dict[str, torch.Tensor]) -> None:
        """Count one step and its terms; an epoch's end moves the LR schedule."""
        self.step += 1
        self.sums.add(terms, self.step)
        if self.step % len(self.batches) == 0:
            self.epoch += 1
            if self.scheduler is not None:
                self.scheduler.step()

    def raise_if_diverged(self, run_dir: RunDir) -> None:
        """Stop with DivergedError, naming the step and terms, if any step so far went non-finite."""
        if (reason := self.sums.divergence()) is not None:
            kept = f"the last good checkpoint is kept in {run_dir.last}" if run_dir.last.is_file() else \
                "no checkpoint was written"
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
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "step": self.step, "epoch": self.epoch, "best": self.best, "val": self.val, "rng": self.get_rng(),
                "data": self.batches.state_dict(self.step % len(self.batches)), **self.sums.state_dict(),
                "wandb_run_id": self.wandb_run_id, "config": self.config}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.best, self.val = state["step"], state["epoch"], state["best"], state["val"]
        self.batches.load_state_dict(state["data"])
        self.sums.load_state_dict(state)
        self.set_rng(state["rng"])


# ---------------------------------------------------------------------------------------------- train


@dataclass
class Trainee:
    """A run being trained: its settings and training state, the data, where it runs, its lifecycle (run dir,
    logger, signals), and what evaluates it and draws its grids. `sync` brings `state.model` and its optimizer up
    to date before they are read (a packed member's live weights are a slice of the pack's; solo: nothing)."""
    cfg: Config
    state: TrainState
    objective: Objective
    data: Any
    place: Placement
    run: RunLifecycle
    evaluate: Any = None
    grids: Optional[FixedGrids] = None
    meter: Optional[Throughput] = None
    sync: Callable[[], None] = lambda: None
    rng: Any = None  # a packed member's own RNG states (src/packed.py MemberRNG); solo: torch's global ones


@dataclass
class Shared:
    """What the members of a pack share instead of each loading it: the data, and its train split as one tensor
    on the device."""
    data: Any
    device: torch.device
    train_images: torch.Tensor
    mean_img: torch.Tensor  # the train split's mean image, (C, H, W): a pass over the whole split, done once


def train(cfg: DictConfig | Config, run_dir: Optional[str | Path] = None) -> Dict[str, Any]:
    """Train per `cfg`, writing the run-dir contract into `run_dir` (default: Hydra's output dir).

    Returns the summary dict (also written to summary.json). A bad value raises ConfigError before any work;
    any failure still leaves summary.json with its status and error. A rerun into the same run dir with the same
    settings skips a finished run and resumes an unfinished one (trainer.resume=auto), a larger budget continues
    it, and any other difference raises RunDirRefused before anything in the dir changes. One process at a time.
    """
    rd = RunDir(run_dir if run_dir is not None else HydraConfig.get().runtime.output_dir)
    with RunLifecycle(rd, cfg) as run:
        trainee = start(cfg, run)
        if isinstance(trainee, dict):  # finished already
            return trainee
        run.summary.update(fit(trainee))
    if trainee.place.rank == 0:
        log_finished(run.summary, rd.root)
    return run.summary


def log_finished(s: Dict[str, Any], root: Path) -> None:
    log.info("Finished: val/neg_elbo %.2f nats/image (%.4f bits/dim), val/kl %.2f nats; outputs in %s",
             s["val/neg_elbo"], s["val/bits_per_dim"], s["val/kl"], root)


def start(raw_cfg: DictConfig | Config, run: RunLifecycle, shared: Optional[Shared] = None) -> Trainee | Dict[str, Any]:
    """Everything before the first step: check the run dir, build data, objective, model and optimizer (resumed
    where a checkpoint says so), claim the run dir and start the logger. Returns the finished summary instead when
    the run already finished. `shared`: a packed member's data and device, loaded once for its pack."""
    rd = run.dir
    cfg = parse(raw_cfg)
    config = OmegaConf.to_container(OmegaConf.structured(cfg))
    # 1. the run dir: skip a finished run, resume or continue an unfinished one, refuse another experiment
    verdict = "new" if cfg.trainer.resume == "never" else check_rerun(rd, config)
    if verdict == "same" and (finished := finished_summary(rd)) is not None:
        log.info("Run in %s already finished; not retraining it (trainer.resume=never trains again)", rd.root)
        return finished
    resume_from = find_resume_checkpoint(cfg.trainer.resume, rd)
    place = Placement(0, 1, shared.device) if shared else init_distributed(cfg.trainer,
                                                                            resolve_device(cfg.trainer.device))
    if place.rank != 0:  # only rank 0 talks: its log, its run dir, its W&B run
        logging.getLogger("src").setLevel(logging.WARNING)
    if cfg.data.batch_size % place.world_size:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is not allowed; with {place.world_size} ranks "
                          "it must divide evenly (it is the global batch)")
    seed_everything(cfg.seed)
    setup_backends(place.device, cfg.trainer.cudnn_benchmark)
    log.info("Run dir: %s (device %s%s)", rd.root, place.device,
             f", {place.world_size} ranks" if place.world_size > 1 else "")

    # 2. data
    data = shared.data if shared else load_data(cfg.data)
    run.summary.update(data.sizes(), world_size=place.world_size, device=str(place.device),
                       precision=resolve_precision(cfg.trainer.precision, place.device))  # what "auto" became
    channels_last = cfg.trainer.channels_last and cfg.model.name == "conv"
    batches = TrainBatches(shared.train_images if shared else data.images["train"], cfg.data.batch_size,
                           place.device, cfg.data.hflip, cfg.seed,
                           resolve_on_device(cfg.data.on_device, data.images["train"], place.device), channels_last)
    batches.shard(place.rank, place.world_size)
    if len(batches) == 0:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is not allowed; the train split has only "
                          f"{len(data.images['train'])} images")

    # 3. objective, model, optimizer: the training state
    objective = Objective(cfg.loss, total_steps(cfg, len(batches)))
    if (warning := objective.schedule_warning()) is not None:
        log.warning(warning)
    model = build_model(cfg.model, cfg.data, objective.likelihood).to(place.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer, scheduler = build_optimizer(cfg.optimizer, model,
                                           fused=cfg.trainer.fused_adam and place.device.type in ("cuda", "cpu"))
    scaler = torch.amp.GradScaler(place.device.type,
                                  enabled=resolve_precision(cfg.trainer.precision, place.device) == "fp16")
    state = TrainState(model, optimizer, scheduler, scaler, batches, MetricSums(cfg.model.latent_dim,
                                                                                 place.device), config)
    log.info("Model: %s, %.2fM parameters; data: %s", cfg.model.name,
             sum(p.numel() for p in model.parameters()) / 1e6, data.sizes())
    if resume_from is not None:
        # loaded on the CPU: RNG states must stay CPU tensors, and load_state_dict moves the rest to the device
        checkpoint = load_checkpoint(resume_from)
        check_checkpoint(checkpoint["config"], config, resume_from)
        state.load_state_dict(checkpoint)
        log.info("Resuming from %s at step %d", resume_from, state.step)

    # 4. the run dir is this run's from here: its record, .hydra/, metrics (each step once) and logger
    if place.rank == 0 and cfg.trainer.resume == "never" and (moved := rd.set_aside()) is not None:
        log.info("trainer.resume=never: the earlier run's files are now in %s", moved)
    run.claim()
    if run.writing:
        record_config(rd, config)
        write_hydra_files(rd, raw_cfg if isinstance(raw_cfg, DictConfig) else OmegaConf.structured(raw_cfg))
        truncate_metrics(rd, state.step)
        run.logger = RunLogger(rd.root, cfg.logger, config)
        state.wandb_run_id = run.logger.run_id
    trainee = Trainee(cfg, state, objective, data, place, run)
    x_fixed = torch.from_numpy(np.array(data.images["val"][: cfg.trainer.num_samples])).float().div(255)
    trainee.grids = FixedGrids(fixed_latents(cfg.trainer.num_samples, cfg.model.latent_dim).to(place.device),
                               x_fixed.to(place.device), cfg.eval.traversal_dims, cfg.eval.traversal_steps)
    trainee.evaluate = partial(evaluate_split, model, objective, cfg, data, device=place.device,
                               mean_img=shared.mean_img if shared else mean_image(data.images["train"]),
                               autocast=autocast_for(place.device, resolve_precision(cfg.trainer.precision,
                                                                                      place.device)))
    trainee.meter = Throughput(place.device)
    return trainee


def fit(t: Trainee) -> Dict[str, Any]:
    """The training loop from where `t.state` stands, then the final test eval; returns the final metrics."""
    cfg, state, place, stop = t.cfg, t.state, t.place, t.run.stop
    stop.defer, stop.step = True, state.step  # from here a signal ends the run at the next step boundary, after a
    # checkpoint; outside the loop (the final eval) it stops at once, at the step reached
    precision = resolve_precision(cfg.trainer.precision, place.device)
    take_step = TrainStep(state.model, t.objective, state.optimizer, state.scaler, autocast_for(place.device, precision),
                          resolve_compile(cfg.trainer.compile, place.device, place.world_size), place.world_size)
    log.info("Training: precision %s, compile %s, channels_last %s", precision, take_step.compile_mode or "off",
             state.batches.memory_format == torch.channels_last)
    bar = tqdm(total=t.objective.total_steps, initial=state.step, disable=not cfg.trainer.progress or place.rank != 0,
               desc="train", unit="step", dynamic_ncols=True)
    batch_stream = state.batches_from_here()
    state.model.train()
    while state.step < t.objective.total_steps:
        # 1. one step, then the state moves on (the epoch and the LR schedule with it)
        x = next(batch_stream)
        t.meter.before_step()
        terms = take_step(x, state.step)
        lr = state.optimizer.param_groups[0]["lr"]  # the rate this step used; an epoch's end moves the schedule
        t.meter.after_step(len(x) * place.world_size)
        state.advance(terms)
        stop.step = state.step
        bar.update()
        # 2. what is due at this step: log, eval, checkpoint; then a stop a signal asked for (read once: a signal
        # that arrives after the checkpoint's turn is acted on at the next step, never without its checkpoint)
        stopping = stop.received
        after_step(t, lr, bar, stopping)
        if stopping:
            stop.stop(state.step)
    bar.close()
    if place.rank != 0:
        return {}
    stop.defer = False
    return finish(t)


def after_step(t: Trainee, lr: float, bar: Optional[tqdm] = None, stopping: bool = False) -> None:
    """What is due once the state has advanced by a step: log the train/ means, evaluate (with the grids), and
    write the checkpoint, also when `stopping` (a signal asked to stop, as the caller read it once for the step).
    Raises DivergedError once a non-finite step is seen."""
    cfg, state, rd, logger = t.cfg, t.state, t.run.dir, t.run.logger
    steps = t.objective.total_steps
    eval_every = cfg.trainer.eval_every or len(state.batches)
    checkpoint_every = cfg.trainer.checkpoint_every or eval_every
    last = state.step == steps
    evaluating = state.step % eval_every == 0 or last
    checking = evaluating or state.step % cfg.trainer.log_every == 0 or state.step % checkpoint_every == 0
    if checking and t.place.world_size > 1:
        state.sums.share_divergence()
    if state.step % cfg.trainer.log_every == 0 or last:
        if t.objective.likelihood.learned:  # its sigma is read there (a packed member's lives in the pack)
            t.sync()
        _log_train(state, t.objective, lr, logger, bar, rd)
    if t.place.rank != 0:
        if checking:
            state.raise_if_diverged(rd)
        return
    if evaluating:
        state.raise_if_diverged(rd)
        t.meter.pause()
        t.sync()
        improved = state.record_eval(t.evaluate("val", step=state.step, iwae_k=cfg.eval.iwae_k))
        logger.log(state.val, state.step)
        logger.log_images(t.grids.save(state.model, rd.root, state.step, state.val["val/kl_per_dim"]), state.step)
        _log_eval(state, cfg)
    if evaluating or state.step % checkpoint_every == 0 or stopping:
        state.raise_if_diverged(rd)  # never overwrite a good checkpoint with a diverged model
        t.sync()
        ckpt = state.state_dict()
        if evaluating and improved:  # best.pt first: a kill between the two writes redoes this eval on resume
            save_checkpoint(ckpt, rd.best)
        save_checkpoint(ckpt, rd.last)


def finish(t: Trainee) -> Dict[str, Any]:
    """The final test eval (after the last checkpoint: a kill here redoes only this block; eval.final=none leaves
    it to `python -m src.evaluate` for the members a sweep keeps) and the final grids; returns the final metrics."""
    cfg, state, rd, logger = t.cfg, t.state, t.run.dir, t.run.logger
    t.sync()
    test = final_test_eval(cfg, state.model, t.data, t.evaluate, state.step, t.place.device) \
        if cfg.eval.final == "test" else {}
    if test:
        logger.log(test, state.step)
    logger.log_images(t.grids.save(state.model, rd.root, None, state.val["val/kl_per_dim"]), state.step,
                      prefix="test")  # the final grids, also W&B's test-time panels
    beta, capacity = t.objective.weights(state.step - 1)  # in force at the end, whatever the schedule reached
    final = {"step": state.step, "epoch": state.epoch, **state.val, **test, "best/val_neg_elbo": state.best,
             "train/beta": beta, **({"train/capacity": capacity} if capacity is not None else {}),
             "grid/traversal_dims": t.grids.dims}  # traversals.png's rows, so a montage labels them right
    if t.meter.images_per_s() is not None:
        final["perf/train_images_per_s"] = t.meter.images_per_s()
    return final


def final_test_eval(cfg: Config, model, data, evaluate, step: int, device: torch.device) -> Dict[str, Any]:
    """Every metric on the test split, FID where asked, and the judge's sample quality where the data has classes."""
    test = evaluate("test", step=step, iwae_k=cfg.eval.iwae_k_test)
    if cfg.eval.fid:
        test.update(evaluate_fid(model, data.images["test"], cfg, device, "test"))
    if cfg.eval.judge and (judge := judge_for(data, cache_folder(cfg.data), device)) is not None:
        z = fixed_latents(cfg.eval.fid_images, cfg.model.latent_dim).to(device)
        quality = content_metrics(model, judge, data.images["test"], data.labels["test"], z, device,
                                  cfg.eval.fid_images)
        test.update({f"test/{k}": v for k, v in quality.items()})
    return test


def _log_train(state: TrainState, objective: Objective, lr: float, logger: Optional[RunLogger], bar, rd: RunDir):
    """The train/ means since the last log, with what the schedules set for the step just taken."""
    state.raise_if_diverged(rd)  # the host syncs here, once per log interval
    beta, capacity = objective.weights(state.step - 1)
    row = {**state.sums.pop_means(), "train/beta": beta, "train/lr": lr, "epoch": state.epoch}
    if capacity is not None:
        row["train/capacity"] = capacity
    if objective.likelihood.learned:  # a learned sigma (sigma-VAE)
        row["train/sigma"] = objective.likelihood.scale()
    if logger:
        logger.log(row, state.step)
    if bar is not None:  # (a pack's bar is the pack's)
        bar.set_postfix(loss=f"{row['train/loss']:.1f}", kl=f"{row['train/kl']:.1f}")
    log.info("step %d/%d | loss %.2f | recon_nll %.2f | kl %.2f nats/image | beta %.3g", state.step,
             objective.total_steps, row["train/loss"], row["train/recon_nll"], row["train/kl"], beta)


def _log_eval(state: TrainState, cfg: Config) -> None:
    v = state.val
    log.info("eval step %d | val/neg_elbo %.2f nats/image | val/iwae_nll %.2f (k=%d) | val/kl %.2f | dims with KL > "
             "%g nats %d/%d (active units %d) | val/mse %.5f (mean image %.5f) | sample blur %.3f (data %.3f)",
             state.step, v["val/neg_elbo"], v["val/iwae_nll"], cfg.eval.iwae_k, v["val/kl"], cfg.eval.collapse_nats,
             v["val/kl_active_units"], cfg.model.latent_dim, v["val/active_units"], v["val/mse"],
             v["val/mse_mean_image"], v["val/sample_blur"], v["val/data_blur"])


if __name__ == "__main__":
    # `python -m src.train`: the command line lives in src/cli.py; launchers (joblib, submitit) pickle its `main`
    # by reference, as `src.cli.main`
    from src.cli import run

    run()
