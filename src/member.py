"""A run as the training loop holds it (`Member`), built whole by `build_member`: everything before its first step.

build_member reads: the rerun plan (skip a finished run, resume an unfinished one, refuse another experiment) ->
where it trains -> data -> objective, model, optimizer and RNG (resumed from the checkpoint where the plan says) ->
the run dir claimed (its record, .hydra/, metrics.jsonl up to the step, the logger) -> what evaluates it and draws its
grids. A solo run and each member of a pack are built by it alike; a pack's members share their data (`SharedData`).
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from .checkpoint import load_checkpoint, truncate_metrics
from .config import Config, ConfigError, TrainerConfig, applying, as_dict, total_steps
from .config_check import parse
from .data import TrainBatches, cache_folder, load_data, mean_image, resolve_on_device
from .device import resolve_device, resolve_precision, setup_backends
from .identity import check_checkpoint, plan_rerun
from .judge import JudgedReal, judged_split
from .lifecycle import RunLifecycle
from .loggers import RunLogger
from .losses import Objective
from .models import build_model
from .optim import build_optimizer
from .rundir import finished_summary, write_hydra_files
from .sources import ImageData
from .state import MemberRNG, MetricSums, TrainState
from .visuals import FixedGrids, fixed_latents

log = logging.getLogger(__name__)


@dataclass
class Placement:
    """Where a run trains: its rank among `world_size` DDP ranks, and its device."""
    rank: int
    world_size: int
    device: torch.device


def init_distributed(t: TrainerConfig, device: torch.device, hydra_cfg: Optional[DictConfig]) -> Placement:
    """Under `trainer.strategy=ddp` and torchrun: NCCL on CUDA, gloo on CPU; else one rank."""
    if t.strategy != "ddp":
        return Placement(0, 1, device)
    if "RANK" not in os.environ:
        raise ConfigError("trainer.strategy='ddp' is not allowed outside torchrun; run "
                          "torchrun --nproc_per_node=N -m src.train trainer.strategy=ddp hydra.run.dir=<dir> ...")
    if hydra_cfg is not None and not any(o.startswith("hydra.run.dir=") for o in hydra_cfg.overrides.hydra):
        raise ConfigError("trainer.strategy='ddp' needs hydra.run.dir=<dir> on the command line, so every rank "
                          "shares one run dir")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Placement(dist.get_rank(), dist.get_world_size(), device)


class SharedData:
    """The data of the members of one loop (they share the pack signature that decides it), loaded by the first
    member that needs it: the splits, the train split as one tensor on the device it is drawn from, its mean image,
    and the judge with what it makes of the real test images."""

    def __init__(self):
        self.data: Optional[ImageData] = None
        self._judged: Dict[Any, Optional[JudgedReal]] = {}

    def judged(self, cfg: Config, device: torch.device) -> Optional[JudgedReal]:
        """The data set's judge and its view of the first eval.fid_images real test images (None: no classes)."""
        key = (str(device), cfg.eval.fid_images)
        if key not in self._judged:
            self._judged[key] = judged_split(self.data, cache_folder(cfg.data), device, "test", cfg.eval.fid_images)
        return self._judged[key]

    def load(self, cfg: Config, device: torch.device) -> "SharedData":
        if self.data is None:
            self.data = load_data(cfg.data)
            train = self.data.images["train"]
            self.on_device = resolve_on_device(cfg.data.on_device, train, device)
            images = torch.from_numpy(np.array(train))  # (N, C, H, W) uint8
            self.train_images = images.to(device) if self.on_device else images
            self.mean_img = mean_image(train)  # (C, H, W): a pass over the whole split, once
        return self


@dataclass
class Member:
    """A run in the training loop: its settings, its run (dir, lock, logger, summary), its training state (everything
    its checkpoint holds, its RNG included), its objective, where it trains, its data, and its grids. Every field is
    set when it is built."""
    cfg: Config
    run: RunLifecycle
    state: TrainState
    objective: Objective
    place: Placement
    shared: SharedData  # its data, shared with the loop's other members
    grids: FixedGrids


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_member(raw_cfg: DictConfig | Config, run: RunLifecycle, shared: SharedData,
                 place: Optional[Placement] = None) -> Member | Dict[str, Any]:
    """A run ready for its next step, or its summary when it finished already. `place`: where the loop trains
    (a pack's members share it); None: this run's own (its device, DDP under torchrun)."""
    rd = run.dir
    cfg = parse(raw_cfg)
    config = as_dict(cfg)
    # 1. the run dir: skip a finished run, resume or continue an unfinished one, refuse another experiment
    plan = plan_rerun(rd, config, cfg.trainer.resume)
    if plan.kind == "finished":
        log.info("Run in %s already finished; not retraining it (trainer.resume=never trains again)", rd.root)
        return plan.summary
    place = place or init_distributed(cfg.trainer, resolve_device(cfg.trainer.device), run.hydra_cfg)
    if place.rank != 0:  # only rank 0 talks: its log, its run dir, its W&B run
        logging.getLogger("src").setLevel(logging.WARNING)
    if cfg.data.batch_size % place.world_size:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is not allowed; with {place.world_size} ranks "
                          "it must divide evenly (it is the global batch)")
    seed_everything(cfg.seed)
    setup_backends(place.device, cfg.trainer.cudnn_benchmark)
    precision = resolve_precision(cfg.trainer.precision, place.device)  # what "auto" became
    log.info("Run dir: %s (device %s%s)", rd.root, place.device,
             f", {place.world_size} ranks" if place.world_size > 1 else "")

    # 2. data
    shared = shared.load(cfg, place.device)
    data = shared.data
    run.summary.update(data.sizes(), world_size=place.world_size, device=str(place.device), precision=precision)
    channels_last = cfg.trainer.channels_last and cfg.model.name == "conv"
    batches = TrainBatches(shared.train_images, cfg.data.batch_size, place.device, cfg.data.hflip, cfg.seed,
                           shared.on_device, channels_last, binarize=cfg.data.binarize == "dynamic")
    batches.shard(place.rank, place.world_size)
    if len(batches) == 0:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is not allowed; the train split has only "
                          f"{len(data.images['train'])} images")

    # 3. objective, model, optimizer and RNG: the training state, resumed where the plan says
    objective = Objective(cfg.loss, total_steps(cfg, len(batches)))
    if (warning := objective.schedule_warning()) is not None:
        log.warning(warning)
    model = build_model(cfg.model, cfg.data, objective.likelihood).to(place.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer, scheduler = build_optimizer(cfg.optimizer, model,
                                           fused=cfg.trainer.fused_adam and place.device.type in ("cuda", "cpu"))
    scaler = torch.amp.GradScaler(place.device.type, enabled=precision == "fp16")
    rng = MemberRNG(place.device)  # the process's RNG right after the model is built: this run's from here on
    state = TrainState(model, optimizer, scheduler, scaler, batches, MetricSums(cfg.model.latent_dim, place.device),
                       rng, config)
    log.info("Model: %s, %.2fM parameters; data: %s", cfg.model.name,
             sum(p.numel() for p in model.parameters()) / 1e6, data.sizes())
    if plan.kind == "resume":
        # loaded on the CPU: RNG states must stay CPU tensors, and load_state_dict moves the rest to the device
        checkpoint = load_checkpoint(plan.checkpoint)
        check_checkpoint(checkpoint["config"], config, plan.checkpoint)
        state.load_state_dict(checkpoint)
        log.info("Resuming from %s at step %d", plan.checkpoint, state.step)

    # 4. the run dir is this run's from here: its record, .hydra/, metrics (each step once) and logger
    if place.rank == 0 and cfg.trainer.resume == "never" and (moved := rd.set_aside()) is not None:
        log.info("trainer.resume=never: the earlier run's files are now in %s", moved)
    run.claim(config, extending=plan.kind == "resume" and finished_summary(rd) is not None)
    if run.writing:
        write_hydra_files(rd, raw_cfg if isinstance(raw_cfg, DictConfig) else OmegaConf.structured(raw_cfg),
                          run.hydra_cfg)
        truncate_metrics(rd, state.step)
        run.logger = RunLogger(rd.root, cfg.logger, applying(config), run.hydra_cfg)
        state.wandb_run_id = run.logger.run_id

    # 5. its grids: the same inputs and latents at every eval and in every run
    x_fixed = torch.from_numpy(np.array(data.images["val"][: cfg.trainer.num_samples])).float().div(255)
    grids = FixedGrids(fixed_latents(cfg.trainer.num_samples, cfg.model.latent_dim).to(place.device),
                       x_fixed.to(place.device), cfg.eval.traversal_dims, cfg.eval.traversal_steps)
    return Member(cfg, run, state, objective, place, shared, grids)
