"""Image sources decoded once into uint8 arrays (N, C, H, W) per split, cached on disk, and batched by indexing.

A source is a function `cfg -> {split: array}`; `load_data` caches its result in `data.cache_dir` under a key
of every setting that changes the pixels, and later runs memory-map the cache instead of decoding again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch

from .config import DataConfig

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
CACHE_VERSION = 1  # bump when a decoder's output changes, so stale caches are not reused


@dataclass
class ImageData:
    """uint8 images per split, (N, C, H, W), plus ground-truth factors where the source has them."""

    images: Dict[str, np.ndarray]
    factors: Dict[str, np.ndarray] = field(default_factory=dict)  # split -> (N, K) int64 factor indices
    factor_names: List[str] = field(default_factory=list)
    factor_sizes: List[int] = field(default_factory=list)

    def sizes(self) -> Dict[str, int]:
        return {f"data/{s}_size": int(len(self.images[s])) for s in SPLITS}


# --------------------------------------------------------------------------------------------------------
# shapes: dSprites-like sprites (Matthey et al. 2017), generated procedurally

SHAPE_FACTORS = {"shape": 3, "scale": 6, "orientation": 40, "pos_x": 32, "pos_y": 32}


def _inside(shape: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether sprite-frame points (u, v) (unit half-extent, v up) lie in square (0), ellipse (1), heart (2)."""
    square = np.maximum(np.abs(u), np.abs(v)) <= 1.0
    ellipse = u**2 + (v / 0.5) ** 2 <= 1.0
    hu, hv = 1.25 * u, 1.25 * v + 0.25  # the classic heart curve (x^2 + y^2 - 1)^3 <= x^2 y^3, centred
    heart = (hu**2 + hv**2 - 1) ** 3 - hu**2 * hv**3 <= 0
    s = shape[:, None, None]
    return np.where(s == 0, square, np.where(s == 1, ellipse, heart))


def render_shapes(factors: np.ndarray, image_size: int, colours: Optional[np.ndarray] = None) -> np.ndarray:
    """Render factor indices (N, 5) as binary sprites, uint8 (N, C, H, W) with C = 1, or 3 given colours (N, 3)."""
    n = len(factors)
    shape, scale_i, rot_i, px_i, py_i = factors.T
    scale = 0.5 + 0.5 * scale_i / (SHAPE_FACTORS["scale"] - 1)  # 0.5 .. 1, as dSprites
    theta = 2 * np.pi * rot_i / SHAPE_FACTORS["orientation"]
    cx = (0.2 + 0.6 * px_i / (SHAPE_FACTORS["pos_x"] - 1)).astype(np.float32)  # sprite centres keep it inside the frame
    cy = (0.2 + 0.6 * py_i / (SHAPE_FACTORS["pos_y"] - 1)).astype(np.float32)
    grid = ((np.arange(image_size) + 0.5) / image_size).astype(np.float32)  # pixel centres in [0, 1]
    dx = grid[None, None, :] - cx[:, None, None]  # (N, 1, W)
    dy = cy[:, None, None] - grid[None, :, None]  # (N, H, 1), image rows go down, v goes up
    cos, sin = np.cos(theta, dtype=np.float32)[:, None, None], np.sin(theta, dtype=np.float32)[:, None, None]
    radius = (0.2 * scale).astype(np.float32)[:, None, None]
    u = (cos * dx + sin * dy) / radius  # rotate by -theta into the sprite frame
    v = (-sin * dx + cos * dy) / radius
    mask = _inside(shape, u, v).astype(np.uint8)  # (N, H, W)
    if colours is None:
        return (mask * 255)[:, None]
    return (mask[:, None] * colours[:, :, None, None]).astype(np.uint8)


def decode_shapes(cfg: DataConfig) -> ImageData:
    """Draw factors uniformly from data.seed and render every split; chunked to bound memory."""
    rng = np.random.default_rng(cfg.seed)
    counts = {"train": cfg.num_train, "val": cfg.val_size, "test": cfg.test_size}
    images, factors = {}, {}
    for split, n in counts.items():
        f = np.stack([rng.integers(0, k, n) for k in SHAPE_FACTORS.values()], axis=1)
        colours = None
        if cfg.channels == 3:  # random bright colours (one channel at 255): a nuisance, not a factor
            colours = rng.integers(40, 256, (n, 3))
            colours[np.arange(n), rng.integers(0, 3, n)] = 255
        chunks = [render_shapes(f[i : i + 1000], cfg.image_size, None if colours is None else colours[i : i + 1000])
                  for i in range(0, n, 1000)]
        images[split], factors[split] = np.concatenate(chunks), f
    return ImageData(images, factors, list(SHAPE_FACTORS), list(SHAPE_FACTORS.values()))


SOURCES = {"shapes": decode_shapes}


# --------------------------------------------------------------------------------------------------------
# the decode-once cache


def cache_key(cfg: DataConfig) -> str:
    """Hash of every setting that changes the decoded pixels (batching and device settings do not)."""
    keys = {k: v for k, v in asdict(cfg).items()
            if k not in ("batch_size", "eval_batch_size", "hflip", "cache_dir", "on_device", "download", "on_bad_file")}
    if keys.get("root"):
        keys["root"] = str(Path(keys["root"]).expanduser().resolve())
    keys["version"] = CACHE_VERSION
    return hashlib.sha1(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def _save_cache(folder: Path, data: ImageData) -> None:
    """Write arrays then meta.json last, through a temp folder renamed into place: a crash leaves no half cache."""
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        np.save(tmp / f"{split}.npy", data.images[split])
        if split in data.factors:
            np.save(tmp / f"{split}_factors.npy", data.factors[split])
    meta = {"factor_names": data.factor_names, "factor_sizes": data.factor_sizes}
    (tmp / "meta.json").write_text(json.dumps(meta))
    try:
        os.replace(tmp, folder)
    except OSError:  # another process cached it first; theirs is as good as ours
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()


def _load_cache(folder: Path) -> ImageData:
    meta = json.loads((folder / "meta.json").read_text())
    images = {s: np.load(folder / f"{s}.npy", mmap_mode="r") for s in SPLITS}
    factors = {s: np.load(folder / f"{s}_factors.npy") for s in SPLITS if (folder / f"{s}_factors.npy").exists()}
    return ImageData(images, factors, meta["factor_names"], meta["factor_sizes"])


def load_data(cfg: DataConfig) -> ImageData:
    """Decoded splits for `cfg`, from the cache when present, else decoded once and cached."""
    folder = Path(cfg.cache_dir).expanduser() / f"{cfg.name}-{cache_key(cfg)}"
    if (folder / "meta.json").exists():
        log.info("Data: %s from cache %s", cfg.name, folder)
        return _load_cache(folder)
    log.info("Data: decoding %s into %s", cfg.name, folder)
    data = SOURCES[cfg.name](cfg)
    _save_cache(folder, data)
    return _load_cache(folder)


# --------------------------------------------------------------------------------------------------------
# batches


def resolve_on_device(setting: str, images: np.ndarray, device: torch.device) -> bool:
    """`data.on_device`: auto keeps the uint8 train split on an accelerator when it takes under a quarter of it."""
    if device.type == "cpu":
        return True  # host memory is the device
    if str(setting).lower() != "auto":
        return str(setting).lower() == "true"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return images.nbytes < free / 4
    return True


class TrainBatches:
    """Shuffled fixed-size batches (the ragged tail is dropped), gathered by indexing a uint8 tensor.

    Images live on the device when they fit (else in pinned host memory, copied asynchronously); flips are
    done on the batch, on the device. The shuffle draws from its own generator so resume can restore it.
    """

    def __init__(self, images: np.ndarray, batch_size: int, device: torch.device, hflip: bool, seed: int,
                 on_device: bool = True, channels_last: bool = False):
        self.device, self.batch_size, self.hflip = device, batch_size, hflip
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        data = torch.from_numpy(np.array(images))  # (N, C, H, W) uint8, read from the memory-mapped cache
        if on_device:
            self.images = data.to(device)
        else:
            self.images = data.pin_memory() if device.type == "cuda" else data
        self.generator = torch.Generator().manual_seed(seed)
        self.steps_per_epoch = len(data) // batch_size

    def __len__(self) -> int:
        return self.steps_per_epoch

    def epoch(self) -> Iterator[torch.Tensor]:
        """One pass: float batches (B, C, H, W) in [0, 1] on the device."""
        perm = torch.randperm(len(self.images), generator=self.generator)
        perm = perm.to(self.images.device)
        for i in range(self.steps_per_epoch):
            idx = perm[i * self.batch_size : (i + 1) * self.batch_size]
            x = self.images[idx].to(self.device, non_blocking=True)
            yield to_float(x, self.hflip, self.generator).contiguous(memory_format=self.memory_format)


def to_float(x: torch.Tensor, hflip: bool = False, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float in [0, 1]; with hflip, half the images mirrored left-right."""
    x = x.float().div_(255)
    if hflip:
        flip = torch.rand(len(x), generator=generator).lt(0.5).to(x.device)  # drawn on CPU: device-independent
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


def eval_batches(images: np.ndarray, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """Every image of a split in order, as float batches in [0, 1]; the last batch may be short."""
    for i in range(0, len(images), batch_size):
        yield to_float(torch.from_numpy(np.array(images[i : i + batch_size])).to(device))  # copy out of the mmap


def mean_image(images: np.ndarray) -> torch.Tensor:
    """Per-pixel mean of a split, (C, H, W) in [0, 1], computed in chunks to keep memory flat."""
    total = np.zeros(images.shape[1:], np.float64)
    for i in range(0, len(images), 4096):
        total += images[i : i + 4096].sum(0, dtype=np.float64)
    return torch.from_numpy(total / (255.0 * len(images))).float()


def num_pixels(cfg: DataConfig) -> int:
    """D, the number of pixel channels per image, for bits per dim."""
    return cfg.channels * cfg.image_size * cfg.image_size

