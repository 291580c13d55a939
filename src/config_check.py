"""The one validation point run at start-up: a composed config -> a checked `Config`, or `ConfigError` with one
line naming the key. It stands above `config.py` (the schemas) and the modules that build each choice, so the
allowed names come from the registry that builds the thing."""
from __future__ import annotations

import difflib
import functools
import math
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, List

from omegaconf import DictConfig, OmegaConf

from .config import Config, ConfigError
from .data import BINARIZE
from .device import COMPILE_MODES, DEVICES, PRECISIONS, missing_device
from .fid import missing_extra
from .judge import MIN_FD_IMAGES
from .likelihoods import LIKELIHOODS
from .loggers import LOGGER_MODES, LOGGERS
from .losses import KL_SCHEDULES
from .models import MODELS
from .optim import OPTIMIZERS, SCHEDULERS
from .sources import SOURCES


def _leaves(obj: Any, prefix: str = ""):
    """(dotted key, value) for every leaf of a config dataclass."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


@functools.lru_cache(maxsize=1)
def _schema() -> DictConfig:
    """The typed config with its defaults, built once per process (15 ms; a sweep's planning parses every member).
    Only read: OmegaConf.merge copies it."""
    return OmegaConf.structured(Config)


def _refuse_unknown_keys(cfg: DictConfig) -> None:
    """Keys added to a typed section (`+model.latnet_dim=64`, which Hydra suggests after a typo) are refused,
    with the nearest known key, instead of being silently ignored."""
    schema = _schema()
    for section, node in cfg.items():
        if section not in schema:
            if not str(section).startswith("hydra"):
                raise ConfigError(f"{section} is not a config key{did_you_mean(str(section), list(schema.keys()))}")
            continue
        if isinstance(node, DictConfig) and isinstance(schema[section], DictConfig):
            known = list(schema[section].keys())
            for key in node.keys():
                if key not in known:
                    raise ConfigError(f"{section}.{key} is not a key of {section}"
                                      f"{did_you_mean(str(key), known, section + '.')}")


def did_you_mean(key: str, known: List[str], prefix: str = "") -> str:
    """'; did you mean <prefix><nearest>?', or the known keys when none is near."""
    close = difflib.get_close_matches(key, known, n=1)
    return f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {', '.join(prefix + k for k in known)}"


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        names = "|".join(str(a).lower() if isinstance(a, bool) else str(a) for a in allowed)
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {names}")


def _check(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed; {rule}")


def parse(cfg: DictConfig | Config) -> Config:
    """Turn a composed config into a `Config` and check every value rule, once, before any work.

    The allowed names of each choice come from the registry that builds it.
    """

    if isinstance(cfg, DictConfig):
        _refuse_unknown_keys(cfg)
        cfg = OmegaConf.to_object(OmegaConf.merge(_schema(), cfg))
    m, d, o, lo, t, lg = cfg.model, cfg.data, cfg.optimizer, cfg.loss, cfg.trainer, cfg.logger
    # paths are kept absolute, so a run's recorded config finds its data from any working directory
    if d.root:
        d.root = str(Path(d.root).expanduser().resolve())
    d.cache_dir = str(Path(d.cache_dir).expanduser().resolve())
    for key, value in _leaves(cfg):
        _check(not isinstance(value, float) or math.isfinite(value), key, value, "must be a finite number")
    for key, value in (("seed", cfg.seed), ("data.seed", d.seed)):
        _check(0 <= value < 2**32, key, value, "must be in [0, 2**32), as numpy and torch seeds are")

    _choice("model.name", m.name, MODELS)
    _check(m.latent_dim > 0, "model.latent_dim", m.latent_dim, "must be a positive integer")
    _check(len(m.hidden_channels) > 0, "model.hidden_channels", m.hidden_channels, "list at least one width, e.g. [32,64]")
    _check(all(c > 0 for c in m.hidden_channels), "model.hidden_channels", m.hidden_channels, "every width must be positive")

    _choice("data.name", d.name, SOURCES)
    _check(d.name == "shapes" or bool(d.root), "data.root", d.root,
           f"data={d.name} reads files: set data.root to the folder holding them (docs/data.md)")
    _check(d.image_size > 0, "data.image_size", d.image_size, "must be a positive integer")
    _check(d.channels in (1, 3), "data.channels", d.channels, "must be 1 (grey) or 3 (RGB)")
    _check(d.batch_size > 0, "data.batch_size", d.batch_size, "must be a positive integer")
    _check(d.eval_batch_size > 0, "data.eval_batch_size", d.eval_batch_size, "must be a positive integer")
    _check(d.num_train > 0, "data.num_train", d.num_train, "must be a positive integer")
    _check(d.val_size > 0, "data.val_size", d.val_size, "must be a positive integer")
    _check(d.test_size > 0, "data.test_size", d.test_size, "must be a positive integer")
    _check(0 < d.val_fraction and 0 < d.test_fraction and d.val_fraction + d.test_fraction < 1, "data.val_fraction",
           d.val_fraction, "data.val_fraction and data.test_fraction must be > 0 and sum to < 1")
    _check(d.crop is None or d.crop > 0, "data.crop", d.crop, "must be null or a positive number of pixels")
    _choice("data.on_device", str(d.on_device).lower(), ("auto", "true", "false"))
    _choice("data.on_bad_file", d.on_bad_file, ("skip", "error"))
    _choice("data.binarize", d.binarize, BINARIZE)
    if m.name == "conv":
        depth = len(m.hidden_channels)
        _check(d.image_size >= 2**depth, "data.image_size", d.image_size,
               f"must be at least 2**len(model.hidden_channels) = {2**depth} for a {depth}-stage conv model")

    _choice("optimizer.name", o.name, OPTIMIZERS)
    _check(o.lr > 0, "optimizer.lr", o.lr, "must be > 0")
    _check(o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay, "must be >= 0")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optimizer.betas", o.betas, "two values in [0, 1)")
    _choice("optimizer.scheduler", o.scheduler, SCHEDULERS)
    _check(0 < o.gamma <= 1, "optimizer.gamma", o.gamma, "must be in (0, 1]")

    _check(lo.beta >= 0, "loss.beta", lo.beta, "must be >= 0")
    _choice("loss.likelihood", lo.likelihood, LIKELIHOODS)
    _check(lo.sigma > 0, "loss.sigma", lo.sigma, "must be > 0")
    _choice("loss.kl_schedule", lo.kl_schedule, KL_SCHEDULES)
    _check(lo.warmup_steps > 0, "loss.warmup_steps", lo.warmup_steps, "must be a positive integer")
    _check(lo.cycles > 0, "loss.cycles", lo.cycles, "must be a positive integer")
    _check(0 < lo.cycle_ratio <= 1, "loss.cycle_ratio", lo.cycle_ratio, "must be in (0, 1]")
    _check(lo.capacity_max >= 0, "loss.capacity_max", lo.capacity_max, "must be >= 0 (nats per image)")
    _check(lo.capacity_steps > 0, "loss.capacity_steps", lo.capacity_steps, "must be a positive integer")
    _check(lo.free_bits >= 0, "loss.free_bits", lo.free_bits, "must be >= 0 (nats per latent dim)")

    _check(t.max_steps is None or t.max_steps > 0, "trainer.max_steps", t.max_steps, "must be null or >= 1")
    _check(t.max_epochs is None or t.max_epochs > 0, "trainer.max_epochs", t.max_epochs, "must be null or >= 1")
    _check(t.max_steps is not None or t.max_epochs is not None, "trainer.max_steps", t.max_steps,
           "set trainer.max_steps or trainer.max_epochs")
    _check(t.eval_every is None or t.eval_every > 0, "trainer.eval_every", t.eval_every, "must be null or > 0")
    _check(t.log_every > 0, "trainer.log_every", t.log_every, "must be a positive integer")
    _check(t.checkpoint_every is None or t.checkpoint_every > 0, "trainer.checkpoint_every", t.checkpoint_every,
           "must be null or > 0")
    _choice("trainer.device", t.device, DEVICES)
    _choice("trainer.precision", t.precision, PRECISIONS)
    _choice("trainer.compile", t.compile, COMPILE_MODES)
    _choice("trainer.strategy", t.strategy, ("none", "ddp"))
    _check(bool(t.resume), "trainer.resume", t.resume, "use auto, never, or a checkpoint file or run dir")
    _check(t.num_samples > 0, "trainer.num_samples", t.num_samples, "must be a positive integer")
    if (problem := missing_device(t.device, "trainer.device")) is not None:
        raise ConfigError(problem)

    if cfg.eval.fid and (problem := missing_extra()) is not None:
        raise ConfigError(problem)
    for key in ("iwae_k", "iwae_k_test", "mi_images", "blur_samples", "traversal_steps", "fid_images"):
        _check(getattr(cfg.eval, key) > 0, f"eval.{key}", getattr(cfg.eval, key), "must be a positive integer")
    _check(cfg.eval.fid_images >= MIN_FD_IMAGES, "eval.fid_images", cfg.eval.fid_images,
           f"a Fréchet distance compares covariances: at least {MIN_FD_IMAGES} images (default 2000)")
    _check(cfg.eval.traversal_dims >= 0, "eval.traversal_dims", cfg.eval.traversal_dims, "must be >= 0")
    _check(cfg.eval.gmm_components >= 0, "eval.gmm_components", cfg.eval.gmm_components,
           "must be >= 0 (components of the mixture prior; 0 fits none)")
    _check(cfg.eval.gmm_images >= max(1, cfg.eval.gmm_components), "eval.gmm_images", cfg.eval.gmm_images,
           f"must be at least eval.gmm_components ({cfg.eval.gmm_components}): one image per component or more")
    _check(cfg.eval.iwae_images is None or cfg.eval.iwae_images > 0, "eval.iwae_images", cfg.eval.iwae_images,
           "must be a positive number of images, or null for the whole split")
    _choice("eval.final", cfg.eval.final, ("test", "none"))
    _check(cfg.eval.collapse_nats > 0, "eval.collapse_nats", cfg.eval.collapse_nats,
           "must be > 0 (nats per image; Lucas et al. 2019 use 0.01 to 0.1)")

    _choice("logger.name", lg.name, LOGGERS)
    _choice("logger.mode", lg.mode, LOGGER_MODES)
    _check(lg.init_timeout > 0, "logger.init_timeout", lg.init_timeout, "must be > 0 seconds")
    return cfg
