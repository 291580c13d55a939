"""A trained model, loaded: `load_run` (the one loading path, weights only) and image reading with the run's own
preprocessing, for src.sample, src.reconstruct, src.interpolate and src.evaluate. They never import the trainer."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from PIL import Image

from .checkpoint import load_checkpoint, saved_config
from .config import Config, ConfigError
from .likelihoods import build_likelihood
from .models import VAE, build_model
from .sources import IMAGE_SUFFIXES, fit_image
from .device import missing_device, resolve_device
from .rundir import RunDir
from .config_check import parse

log = logging.getLogger(__name__)


class RunError(RuntimeError):
    """A path, image or checkpoint that cannot be used; the message is one line naming it and the fix."""


@dataclass
class LoadedRun:
    model: VAE
    cfg: Config
    run_dir: Path
    checkpoint: Path
    step: int


def load_run(path: str | Path, device: str = "auto", which: str = "last") -> LoadedRun:
    """A run dir (its checkpoints/<which>.pt) or a checkpoint file -> the model, in eval mode on `device`, rebuilt
    from the config saved in the checkpoint. Weights only: a checkpoint that would run code is refused."""
    path = Path(path).expanduser()
    if path.is_file():
        checkpoint, run_dir = path, path.parent.parent if path.parent.name == "checkpoints" else path.parent
    elif path.is_dir():
        checkpoint, run_dir = RunDir(path).checkpoint(which), path
        if not checkpoint.is_file():
            if not RunDir(path).is_run():
                raise RunError(f"{path} is not a run: expected a run dir (with .hydra/ and checkpoints/{which}.pt, "
                               "as python -m src.train writes) or a .pt checkpoint file")
            raise RunError(f"run {path} has no checkpoint {checkpoint.relative_to(path)}: it stopped before its first "
                           "checkpoint; rerun the same training command into it (trainer.resume=auto) to finish it")
    else:
        raise RunError(f"{path} does not exist; give a run dir (outputs/runs/<date>/<time>) or a .pt checkpoint")
    state = load_checkpoint(checkpoint)
    try:
        cfg = parse(OmegaConf.merge(OmegaConf.structured(Config), saved_config(state)))
    except (ConfigError, OmegaConfBaseException, KeyError) as e:
        first = str(e).splitlines()[0]
        raise RunError(f"the config saved in {checkpoint} no longer composes ({first}); retrain with this version "
                       "or load it with the version that wrote it") from None
    if (problem := missing_device(device, "device")) is not None:
        raise RunError(problem)
    model = build_model(cfg.model, cfg.data, build_likelihood(cfg.loss.likelihood, cfg.loss.sigma))
    model.load_state_dict(state["model"])
    if cfg.trainer.channels_last and cfg.model.name == "conv":  # as training ran it: the same numbers, to the bit
        model = model.to(memory_format=torch.channels_last)
    return LoadedRun(model.to(resolve_device(device)).eval(), cfg, run_dir, checkpoint, int(state["step"]))


def read_images(paths: Sequence[Path], cfg: Config) -> torch.Tensor:
    """Image files (or folders of them) -> (N, C, H, W) in [0, 1], with the run's channels, crop and size."""
    files: List[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not found:
                raise RunError(f"{p} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise RunError(f"{p} does not exist; give image files or folders")
    arrays = []
    for f in files:
        try:
            with Image.open(f) as img:
                img.load()
                arrays.append(fit_image(img, cfg.data.channels, cfg.data.image_size, cfg.data.crop))
        except Exception as e:
            raise RunError(f"cannot read image {f} ({type(e).__name__}: {e}); give a png, jpg, webp, ... file") from None
    return torch.from_numpy(np.stack(arrays)).float().div(255)
