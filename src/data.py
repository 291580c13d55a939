"""The data path: sources decoded once and cached on disk, then training batches drawn by indexing a tensor.

`load_data` caches a source's uint8 arrays (N, C, H, W) in `data.cache_dir` under a key of every setting that
changes the pixels; later runs memory-map the cache instead of decoding again. `TrainBatches` gathers batches
from a tensor on the device (or pinned host memory), so the hot loop does no per-item Python or PIL work.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import numpy as np
import torch

from .config import DataConfig
from .sources import SOURCES, SPLITS, DataError, ImageData  # noqa: F401  (DataError: re-exported for callers)

log = logging.getLogger(__name__)

BINARIZE = ("none", "static", "dynamic")  # data.binarize
CACHE_VERSION = 4  # 4: classes (labels) cached beside the images; 3: EXIF orientation, float TIFFs in 0..255. Bump when a decoder's output changes, so stale caches are not reused


# --------------------------------------------------------------------------------------------------------
# the decode-once cache


def cache_key(cfg: DataConfig) -> str:
    """Hash of every setting that changes the decoded pixels (batching and device settings do not)."""
    keys = {k: v for k, v in asdict(cfg).items()
            if k not in ("batch_size", "eval_batch_size", "hflip", "cache_dir", "on_device", "download", "on_bad_file")}
    if keys["binarize"] == "none":  # the grey-level cache of every earlier release keeps its key
        del keys["binarize"]
    if keys.get("root"):
        keys["root"] = str(Path(keys["root"]).expanduser().resolve())
    keys["version"] = CACHE_VERSION
    return hashlib.sha1(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def _fingerprint(path: Path, samples: int = 64, block: int = 1 << 16) -> Dict[str, int]:
    """Size and a CRC-32 of `samples` blocks spread over the file: cheap at every load, yet a truncated or
    overwritten cache file shows."""
    size = path.stat().st_size
    crc = 0
    with open(path, "rb") as f:
        for i in range(samples):
            f.seek(size * i // samples)
            crc = zlib.crc32(f.read(block), crc)
    return {"bytes": size, "crc32": crc}


def _save_cache(folder: Path, data: ImageData) -> None:
    """Write arrays then meta.json last, through a temp folder renamed into place: a crash leaves no half cache.
    meta.json keeps each file's fingerprint and the files that were skipped as unreadable."""
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        np.save(tmp / f"{split}.npy", data.images[split])
        if split in data.factors:
            np.save(tmp / f"{split}_factors.npy", data.factors[split])
        if split in data.labels:
            np.save(tmp / f"{split}_labels.npy", data.labels[split])
    files = {p.name: _fingerprint(p) for p in sorted(tmp.glob("*.npy"))}
    meta = {"factor_names": data.factor_names, "factor_sizes": data.factor_sizes, "files": files,
            "skipped": data.skipped}
    (tmp / "meta.json").write_text(json.dumps(meta))
    try:
        os.replace(tmp, folder)
    except OSError:  # another process cached it first; theirs is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)


def _damage(folder: Path, meta: Any) -> Optional[str]:
    """What is wrong with a cache folder's meta.json or arrays (missing, truncated, changed), or None."""
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict) or any(f"{s}.npy" not in files for s in SPLITS) or \
            not {"factor_names", "factor_sizes"} <= meta.keys():
        return "meta.json does not describe the cached arrays"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if _fingerprint(path) != expected:
            return f"{name} does not match its checksum ({path.stat().st_size} of {expected['bytes']} bytes)"
    return None


def _load_cache(folder: Path) -> ImageData:
    meta = json.loads((folder / "meta.json").read_text())
    images = {s: np.load(folder / f"{s}.npy", mmap_mode="r") for s in SPLITS}
    factors = {s: np.load(folder / f"{s}_factors.npy") for s in SPLITS if (folder / f"{s}_factors.npy").exists()}
    labels = {s: np.load(folder / f"{s}_labels.npy") for s in SPLITS if (folder / f"{s}_labels.npy").exists()}
    return ImageData(images, factors, meta["factor_names"], meta["factor_sizes"], meta.get("skipped", []), labels)


def cache_folder(cfg: DataConfig) -> Path:
    """Where `cfg`'s decoded splits are cached (and what is derived from them, e.g. the judge classifier)."""
    return Path(cfg.cache_dir).expanduser() / f"{cfg.name}-{cache_key(cfg)}"


def load_data(cfg: DataConfig) -> ImageData:
    """Decoded splits for `cfg`, from the cache when present and intact, else decoded once and cached."""
    folder = cache_folder(cfg)
    if (folder / "meta.json").exists():
        try:
            meta = json.loads((folder / "meta.json").read_text())
            problem = _damage(folder, meta)
        except (OSError, ValueError) as e:
            problem = f"meta.json is unreadable ({e})"
        if problem is None:
            if cfg.on_bad_file == "error" and meta.get("skipped"):
                raise DataError(f"data.on_bad_file=error: the cache {folder} was built without "
                                f"{len(meta['skipped'])} unreadable file(s), first {meta['skipped'][0]}; fix or remove "
                                "them and delete that folder, or set data.on_bad_file=skip")
            log.info("Data: %s from cache %s", cfg.name, folder)
            return _load_cache(folder)
        log.warning("Data cache %s is damaged (%s); decoding %s again", folder, problem, cfg.name)
        aside = folder.with_name(f"{folder.name}.damaged{os.getpid()}")
        try:
            os.replace(folder, aside)
            shutil.rmtree(aside, ignore_errors=True)
        except OSError as e:
            raise DataError(f"the data cache {folder} is damaged ({problem}) and cannot be replaced ({e.strerror}); "
                            "delete that folder") from None
    log.info("Data: decoding %s into %s", cfg.name, folder)
    data = SOURCES[cfg.name](cfg)
    if cfg.binarize != "none":
        binarize(data, cfg.binarize, cfg.seed)
    _save_cache(folder, data)
    return _load_cache(folder)


def binarize(data: ImageData, how: str, seed: int) -> None:
    """Pixels drawn once as 0 or 255 from Bernoulli(grey level / 255), with `data.seed`: every split under
    `static` (a fixed binarised set, as binarised MNIST is); under `dynamic` only val and test, so every run's evals
    see the same images, while the train split keeps its grey levels and TrainBatches draws each batch afresh
    (Burda et al. 2015). A Bernoulli NLL of binary pixels is the probability of the binary image; of grey levels it
    is a cross-entropy, the probability of no image."""
    for i, split in enumerate(SPLITS):
        if how == "dynamic" and split == "train":
            continue
        rng = np.random.default_rng([seed, i])  # one stream per split: val and test are the same under either mode
        grey = data.images[split]
        binary = np.empty_like(grey)
        for at in range(0, len(grey), 4096):  # in chunks: float noise for a whole split would be 4x its bytes
            chunk = grey[at : at + 4096]
            binary[at : at + 4096] = (rng.random(chunk.shape, dtype=np.float32) * 255 < chunk) * np.uint8(255)
        data.images[split] = binary


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

    Images live on the device when they fit (else in pinned host memory, copied asynchronously); flips and
    dynamic binarisation are done on the batch, on the device. The shuffle draws from its own generator so resume
    can restore it; a binarised batch draws from a device generator seeded from that one, per batch, so a resumed
    epoch draws the same pixels.
    """

    def __init__(self, images: np.ndarray | torch.Tensor, batch_size: int, device: torch.device, hflip: bool, seed: int,
                 on_device: bool = True, channels_last: bool = False, binarize: bool = False):
        self.device, self.batch_size, self.hflip, self.binarize = device, batch_size, hflip, binarize
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # (N, C, H, W) uint8, read from the memory-mapped cache; a tensor is used as it is (a pack's members share one)
        data = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images))
        self.images = data.to(device) if on_device else data
        self.pinned = not on_device and device.type == "cuda"
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch_start_state = self.generator.get_state()
        self.steps_per_epoch = len(data) // batch_size
        self.rank, self.world_size = 0, 1

    def __len__(self) -> int:
        return self.steps_per_epoch

    def shard(self, rank: int, world_size: int) -> None:
        """Under DDP each rank takes every world_size-th image of each (global) batch: same order, own shard."""
        self.rank, self.world_size = rank, world_size

    def epoch(self, start: int = 0) -> Iterator[torch.Tensor]:
        """One pass from batch `start`: float batches (B, C, H, W) in [0, 1] on the device."""
        # the whole epoch's order and flips are drawn up front on the CPU generator: no per-step host work
        self.epoch_start_state = self.generator.get_state()
        perm = torch.randperm(len(self.images), generator=self.generator).to(self.images.device)
        flips = (torch.rand(len(self.images), generator=self.generator) < 0.5).to(self.device) if self.hflip else None
        pixels = torch.Generator(device=self.device) if self.binarize else None
        first = int(torch.randint(2**62, (1,), generator=self.generator)) if self.binarize else 0
        for i in range(start, self.steps_per_epoch):
            batch = slice(i * self.batch_size, (i + 1) * self.batch_size)
            idx = perm[batch][self.rank :: self.world_size]
            if self.pinned:  # gather into pinned memory so the copy to the GPU is asynchronous
                buf = torch.empty((len(idx), *self.images.shape[1:]), dtype=torch.uint8, pin_memory=True)
                x = torch.index_select(self.images, 0, idx, out=buf).to(self.device, non_blocking=True)
            else:
                x = self.images[idx]
            x = to_float(x)
            if flips is not None:  # mirror the chosen images left-right, on the device
                flip = flips[batch][self.rank :: self.world_size, None, None, None]
                x = torch.where(flip, x.flip(-1), x)
            if pixels is not None:  # data.binarize=dynamic: each pixel 0/1 drawn afresh from its grey level
                x = torch.bernoulli(x, generator=pixels.manual_seed(first + i))
            yield x.contiguous(memory_format=self.memory_format)


    def state_dict(self, step_in_epoch: int) -> dict:
        """What resume needs to replay the order: the generator as it was when this epoch drew its order
        (mid-epoch), or as it is now (at an epoch boundary, where the next epoch draws afresh)."""
        return {"generator": self.epoch_start_state if step_in_epoch else self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 in [0, 1]."""
    return x.float().div_(255)


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

