"""Typed config schemas and their defaults, registered with Hydra (every default has its one home here).

A leaf: this module imports nothing from `src`. Hydra checks types and key names when it composes `conf/`
against these dataclasses; `src.config_check.parse()` then checks values, names and cross-field rules.
"""
from __future__ import annotations

import math

from dataclasses import asdict, dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore


class ConfigError(ValueError):
    """A config value that is not allowed; the message is one line naming the key."""


@dataclass
class ModelConfig:
    name: str = "conv"
    latent_dim: int = 10
    # conv: channels of each stride-2 stage (image_size >= 2**len); mlp: hidden widths
    hidden_channels: List[int] = field(default_factory=lambda: [16, 32, 64, 128])


@dataclass
class DataConfig:
    name: str = "shapes"
    root: Optional[str] = None
    image_size: int = 64
    channels: int = 1
    batch_size: int = 64
    eval_batch_size: int = 256
    num_train: int = 20000  # shapes only: images generated for the train split
    val_size: int = 1000  # carved from train where a source has no validation split
    test_size: int = 1000  # shapes only
    val_fraction: float = 0.05  # folder only: share of files hashed into val
    test_fraction: float = 0.05  # folder only: share of files hashed into test
    seed: int = 0  # data generation and split seed, kept apart from `seed` so runs share data
    crop: Optional[int] = None  # centre crop (pixels) before resizing; null: none
    hflip: bool = False  # random horizontal flip of train batches, done on the device
    binarize: str = "none"  # none|static|dynamic: pixels drawn as 0/1 from their grey level (data.md), for Bernoulli
    cache_dir: str = ".cache/vae-data"
    on_device: str = "auto"  # keep the uint8 arrays on the accelerator: auto|true|false
    download: bool = False
    on_bad_file: str = "skip"  # skip|error


@dataclass
class OptimizerConfig:
    name: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    scheduler: str = "none"
    gamma: float = 0.95  # exponential: lr multiplied by gamma once per epoch


@dataclass
class LossConfig:
    beta: float = 1.0
    likelihood: str = "bernoulli"
    sigma: float = 0.1  # gaussian std / laplace scale, in data units ([0, 1] pixels)
    kl_schedule: str = "none"
    warmup_steps: int = 1000  # linear: beta ramps 0 -> beta over these steps
    cycles: int = 4  # cyclical: number of cycles over the run (Fu et al. 2019)
    cycle_ratio: float = 0.5  # cyclical: fraction of each cycle spent ramping
    capacity_max: float = 25.0  # capacity: target KL in nats per image (Burgess et al. 2018)
    capacity_steps: int = 10000  # capacity: steps to raise the target from 0 to capacity_max
    free_bits: float = 0.0  # nats per latent dim below which KL is not penalised (Kingma et al. 2016)


@dataclass
class TrainerConfig:
    max_steps: Optional[int] = None  # null: max_epochs decides
    max_epochs: Optional[int] = 3  # the main job: val mse 0.22 of the mean image's in 108 s (docs/speed.md)
    eval_every: Optional[int] = None  # steps; null: once per epoch
    log_every: int = 50
    checkpoint_every: Optional[int] = None  # steps; null: at every eval
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 on CUDA (where supported), fp32 elsewhere
    compile: Any = "auto"  # auto: reduce-overhead (CUDA graphs) on one CUDA device, off elsewhere
    fused_adam: bool = True  # fused Adam/AdamW kernels on CUDA and CPU (one kernel for all parameters)
    cudnn_benchmark: bool = True  # CUDA: autotune conv algorithms for the fixed batch shape
    channels_last: bool = True  # conv models: NHWC memory layout, faster on CUDA and on CPU (oneDNN)
    progress: bool = True
    resume: str = "auto"  # auto (continue from this run dir's last.pt; skip a finished run) | never | <path>
    strategy: str = "none"  # none | ddp (under torchrun; data.batch_size is the global batch)
    num_samples: int = 64  # images in the fixed-z sample grid and the reconstruction grid


@dataclass
class EvalConfig:
    iwae_k: int = 5  # importance samples for val/iwae_nll at every eval
    iwae_k_test: int = 20  # for the final test/iwae_nll (docs/diagnostics.md: what it costs)
    iwae_images: Optional[int] = 2000  # IWAE over the first N images of a split (k decodes each); null: all of it
    final: str = "test"  # the final eval: test (the official split) | none (a cheap sweep; src.evaluate later)
    mi_images: int = 2000  # images whose aggregate posterior estimates mutual_info
    blur_samples: int = 256  # fixed prior samples and real images behind the blur measures
    traversal_dims: int = 8  # rows of the traversal grid: the dims with most KL, the last quarter those with least
    traversal_steps: int = 7  # values from -3 to 3
    fid: bool = False  # FID and KID at the final test eval (optional extra: pip install -e ".[fid]")
    fid_images: int = 2000  # real images, prior samples and reconstructions each
    collapse_nats: float = 0.1  # a dim with mean KL above this (nats per image) is in use; at or below, collapsed
    judge: bool = True  # sample quality by a small classifier of the data's classes (judge_*, recon_accuracy)
    gmm_components: int = 10  # the final eval's mixture prior fitted to the encoded train split (src/prior.py); 0: none
    gmm_images: int = 10000  # train images whose posterior means the mixture is fitted to


@dataclass
class LoggerConfig:
    name: str = "wandb"  # wandb | none (metrics.jsonl and summary.json only)
    mode: str = "auto"  # auto (online with credentials, offline without) | online | offline | disabled
    project: str = "vae-sweeps"
    entity: Optional[str] = None
    init_timeout: float = 30.0  # seconds to reach W&B online before going on offline
    group: Optional[str] = None  # W&B group; default: the sweep folder's name (a lone run: its own folder's)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0


def as_dict(cfg: Config) -> dict:
    """The config as nested plain dicts (what trained_with.yaml and a checkpoint's "config" hold)."""
    return asdict(cfg)


def register_configs() -> None:
    """Register the schema Hydra composes `conf/config.yaml` against."""
    ConfigStore.instance().store(name="base_config", node=Config)


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    """The run's length in optimisation steps: trainer.max_steps or max_epochs, whichever ends first."""
    return int(budget_steps(cfg.trainer.max_steps, cfg.trainer.max_epochs, steps_per_epoch))


def budget_steps(max_steps: Optional[int], max_epochs: Optional[int], steps_per_epoch: int) -> float:
    """The optimisation steps a budget allows: the smaller of max_steps and max_epochs epochs (None: no limit of
    that kind; both None: inf, which config_check refuses for a run)."""
    limits = [s for s in (max_steps, None if max_epochs is None else max_epochs * steps_per_epoch) if s is not None]
    return min(limits, default=math.inf)


# keys that mean something only under another setting: key -> (that setting, the values under which it applies)
APPLIES_ONLY = {
    "data.num_train": ("data.name", {"shapes"}), "data.test_size": ("data.name", {"shapes"}),
    "data.val_fraction": ("data.name", {"folder"}), "data.test_fraction": ("data.name", {"folder"}),
    "data.root": ("data.name", {"mnist", "fashion_mnist", "cifar10", "celeba", "folder"}),
    "loss.sigma": ("loss.likelihood", {"gaussian", "gaussian_learned", "laplace"}),
    "loss.warmup_steps": ("loss.kl_schedule", {"linear"}),
    "loss.cycles": ("loss.kl_schedule", {"cyclical"}), "loss.cycle_ratio": ("loss.kl_schedule", {"cyclical"}),
    "loss.capacity_max": ("loss.kl_schedule", {"capacity"}), "loss.capacity_steps": ("loss.kl_schedule", {"capacity"}),
    "optimizer.gamma": ("optimizer.scheduler", {"exponential"}),
}


def applies(key: str, settings: dict) -> bool:
    """Whether `key` means anything for a run with these flat settings ({"loss.likelihood": "bernoulli", ...}):
    loss.sigma does not for a Bernoulli decoder, data.test_size only for generated shapes."""
    if key not in APPLIES_ONLY:
        return True
    other, values = APPLIES_ONLY[key]
    return other not in settings or settings[other] in values


def applying(config: dict) -> dict:
    """The nested config less the keys that mean nothing for it (`applies`): what a dashboard shows, so a
    Fashion-MNIST run does not show the built-in shapes' data.num_train."""
    flat = {f"{section}.{key}": value for section, keys in config.items() if isinstance(keys, dict)
            for key, value in keys.items()}
    return {section: ({key: value for key, value in keys.items() if applies(f"{section}.{key}", flat)}
                      if isinstance(keys, dict) else keys) for section, keys in config.items()}
