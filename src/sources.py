"""Image sources: each decodes its on-disk format once into uint8 arrays (N, C, H, W) per split.

A source is `decode(cfg: DataConfig) -> ImageData`. Every one ends in the same shape and range: `data.channels`
channels, `data.image_size` square pixels (centre crop `data.crop` first where set), values 0..255.
Bad input raises DataError with one line naming the file or folder and the fix.
"""
from __future__ import annotations

import ctypes
import gzip
import hashlib
import logging
import multiprocessing
import os
import pickle
import signal
import sys
import zlib
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from .config import DataConfig

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class DataError(RuntimeError):
    """Unusable data on disk; the message is one line naming the path and the fix."""


@dataclass
class ImageData:
    """uint8 images per split, (N, C, H, W), plus ground-truth factors where the source has them."""

    images: Dict[str, np.ndarray]
    factors: Dict[str, np.ndarray] = field(default_factory=dict)  # split -> (N, K) int64 factor indices
    factor_names: List[str] = field(default_factory=list)
    factor_sizes: List[int] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)  # unreadable files left out (data.on_bad_file=skip)
    labels: Dict[str, np.ndarray] = field(default_factory=dict)  # split -> (N,) int64 class, where the source has one

    def sizes(self) -> Dict[str, int]:
        return {f"data/{s}_size": int(len(self.images[s])) for s in SPLITS}


# --------------------------------------------------------------------------------------------------------
# shared transforms


def fit_arrays(images: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """(N, C, H, W) uint8 -> data.channels, centre crop data.crop, resize to data.image_size (antialiased)."""
    x = torch.from_numpy(np.array(images))  # a writable copy (IDX buffers and caches are read-only)
    if x.shape[1] != cfg.channels:
        x = TF.rgb_to_grayscale(x) if cfg.channels == 1 else x.expand(-1, 3, -1, -1)
    if cfg.crop and cfg.crop < min(x.shape[-2:]):
        x = TF.center_crop(x, [cfg.crop, cfg.crop])
    if tuple(x.shape[-2:]) != (cfg.image_size, cfg.image_size):
        x = torch.cat([TF.resize(c, [cfg.image_size, cfg.image_size], antialias=True) for c in x.split(4096)])
    return np.ascontiguousarray(x.numpy())


def to_8bit(img: Image.Image) -> Image.Image:
    """High-bit-depth greyscale as it is displayed, scaled to 8 bits: PIL's own convert clips it, which turns a
    16-bit PNG all white. I;16* and I hold 16-bit values (0..65535, as 16-bit PNG and TIFF files do), F holds
    floats, in [0, 1] or, as many float TIFFs are written, in 0..255. Other modes are returned as they are."""
    if img.mode.startswith("I;16") or img.mode == "I":
        scaled = np.asarray(img, dtype=np.float64) / 257.0  # 65535 -> 255
    elif img.mode == "F":
        scaled = np.asarray(img, dtype=np.float64)
        scaled = scaled * 255.0 if np.nanmax(scaled, initial=0.0) <= 1.0 else scaled
    else:
        return img
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")


def fit_image(img: Image.Image, channels: int, size: int, crop: Optional[int]) -> np.ndarray:
    """A PIL image of any mode -> (C, size, size) uint8: high bit depths scaled to 8 bits, alpha composited over
    black, CMYK to RGB, centre crop, resize; turned upright as its EXIF orientation says, as viewers show it."""
    img = to_8bit(ImageOps.exif_transpose(img))
    if img.mode in ("P", "PA") or img.mode.endswith("A") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    img = img.convert("L" if channels == 1 else "RGB")
    if crop and crop < min(img.size):
        left, top = (img.width - crop) // 2, (img.height - crop) // 2
        img = img.crop((left, top, left + crop, top + crop))
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)  # PIL's bilinear filter widens when shrinking: antialiased
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def _decode_one(args: Tuple[str, int, int, Optional[int]]) -> Tuple[Optional[np.ndarray], Optional[str]]:
    path, channels, size, crop = args
    try:
        with Image.open(path) as img:
            img.load()
            return fit_image(img, channels, size, crop), None
    except Exception as e:  # PIL raises many types for truncated or non-image files
        return None, f"{type(e).__name__}: {e}"


def _die_with_parent(run_pid: int) -> None:
    """A decode worker ends when the run that started it does (Linux), so a killed run leaves no workers."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != run_pid:  # the run died while this worker was starting, before the line above
        os._exit(1)


def decode_workers() -> int:
    """Workers that decode or render images at once: every core, up to 16."""
    return min(os.cpu_count() or 1, 16)


def decode_files(paths: Sequence[Path], cfg: DataConfig, desc: str) -> Tuple[np.ndarray, List[bool]]:
    """Decode image files on every core, with a progress bar. Returns (N_ok, C, H, W) and an ok-mask per path.

    Unreadable files are skipped with one warning naming them (data.on_bad_file=skip) or stop the decode at
    the first one (error).
    """
    jobs = [(str(p), cfg.channels, cfg.image_size, cfg.crop) for p in paths]
    workers = decode_workers()
    out = np.empty((len(paths), cfg.channels, cfg.image_size, cfg.image_size), np.uint8)
    ok, bad = [], []
    # spawn, not fork: a forked worker would inherit the run dir's lock and the run's signal handlers, and outlive
    # a killed run holding the lock; a spawned worker starts clean and ends with the run (a forkserver's would
    # not: its workers keep the server alive, and the server them)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_die_with_parent, initargs=(os.getpid(),)) if workers > 1 and len(jobs) > 256 else None
    results = pool.map(_decode_one, jobs, chunksize=64) if pool else map(_decode_one, jobs)
    try:
        for i, (arr, err) in enumerate(tqdm(results, total=len(jobs), desc=desc, unit="img", mininterval=1.0)):
            if err is not None:
                if cfg.on_bad_file == "error":
                    raise DataError(f"cannot read image {paths[i]} ({err}); fix or remove it, or set data.on_bad_file=skip")
                bad.append(str(paths[i]))
            else:
                out[i] = arr
            ok.append(err is None)
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    if bad:
        log.warning("Skipped %d unreadable image file(s): %s", len(bad), ", ".join(bad))
    return out[np.array(ok, bool)], ok


def carve_val(train: np.ndarray, val_size: int, seed: int, source: str) -> Tuple[np.ndarray, np.ndarray]:
    """Split a validation set of val_size images off train, at random by data.seed; train keeps its order.
    (The same split of any array as long as train, e.g. its labels: same length, same seed, same split.)"""
    if val_size >= len(train):
        raise DataError(f"data.val_size={val_size} leaves no training images: data={source} has {len(train)}; "
                        "lower data.val_size")
    val_idx = np.random.default_rng(seed).permutation(len(train))[:val_size]
    keep = np.ones(len(train), bool)
    keep[val_idx] = False
    return train[keep], train[np.sort(val_idx)]


def _require_root(cfg: DataConfig, expected: str, where: str) -> Path:
    root = Path(cfg.root).expanduser()
    if not root.exists():
        raise DataError(f"data.root={cfg.root} does not exist; data={cfg.name} expects {expected}. {where}")
    return root


# --------------------------------------------------------------------------------------------------------
# mnist, fashion_mnist: IDX files (LeCun et al.), gzipped or not

IDX_FILES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
IDX_LABELS = {"train": "train-labels-idx1-ubyte", "test": "t10k-labels-idx1-ubyte"}  # optional: the classes
IDX_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
IDX_WHERE = {
    "mnist": "Get the four IDX files from the MNIST page (Y. LeCun), or let torchvision fetch them with data.download=true.",
    "fashion_mnist": "Get them from the Fashion-MNIST repository (zalandoresearch), with data.download=true, or "
                     "Debian's dataset-fashion-mnist package (/usr/share/datasets/fashion-mnist).",
}


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (optionally gzipped): big-endian magic, dims, then uint8 data."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as e:  # a download cut short, or not gzip at all
            raise DataError(f"{path} is not a complete gzip file ({e}); delete it and download it again") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes; replace it with the original download")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated ({data.size} of {int(np.prod(dims))} bytes); download it again")
    return data.reshape(dims)


def _find_idx(root: Path, folder: str, stem: str) -> Optional[Path]:
    for base in (root, root / folder / "raw", root / "raw"):
        for name in (stem, stem + ".gz"):
            if (base / name).is_file():
                return base / name
    return None


def decode_idx(cfg: DataConfig) -> ImageData:
    folder = IDX_FOLDERS[cfg.name]
    expected = (f"train-images-idx3-ubyte[.gz] and t10k-images-idx3-ubyte[.gz] in data.root or in "
                f"<root>/{folder}/raw/")
    root = _require_root(cfg, expected, IDX_WHERE[cfg.name])
    if cfg.download and _find_idx(root, folder, IDX_FILES["train"]) is None:
        _torchvision_download(cfg, root)
    arrays = {}
    for split, stem in IDX_FILES.items():
        path = _find_idx(root, folder, stem)
        if path is None:
            raise DataError(f"data.root={cfg.root} has no {stem}[.gz]; data={cfg.name} expects {expected}. "
                            f"{IDX_WHERE[cfg.name]}")
        arrays[split] = fit_arrays(read_idx(path)[:, None], cfg)  # (N, 28, 28) -> (N, 1, 28, 28) -> fitted
    train, val = carve_val(arrays["train"], cfg.val_size, cfg.seed, cfg.name)
    return ImageData({"train": train, "val": val, "test": arrays["test"]}, labels=_idx_labels(root, folder, arrays, cfg))


def _idx_labels(root: Path, folder: str, arrays: Dict[str, np.ndarray], cfg: DataConfig) -> Dict[str, np.ndarray]:
    """The classes from the IDX label files, split as the images are; none when a file is missing or does not
    match its images (the label-based metrics are then skipped, with one line)."""
    labels = {}
    for split, stem in IDX_LABELS.items():
        path = _find_idx(root, folder, stem)
        if path is None:
            return {}
        try:
            labels[split] = read_idx(path).astype(np.int64)
        except DataError as e:
            log.warning("no classes for data=%s: %s", cfg.name, e)
            return {}
        if len(labels[split]) != len(arrays[split]):
            log.warning("no classes for data=%s: %s has %d labels for %d images", cfg.name, path,
                        len(labels[split]), len(arrays[split]))
            return {}
    train, val = carve_val(labels["train"], cfg.val_size, cfg.seed, cfg.name)
    return {"train": train, "val": val, "test": labels["test"]}


def _torchvision_download(cfg: DataConfig, root: Path) -> None:
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST}[cfg.name]
    try:
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except Exception as e:
        raise DataError(f"data.download=true could not fetch {cfg.name} into {root} ({type(e).__name__}); "
                        f"{IDX_WHERE[cfg.name]}") from None


# --------------------------------------------------------------------------------------------------------
# cifar10: the python pickle batches (Krizhevsky 2009)

CIFAR_WHERE = "Get cifar-10-python.tar.gz from the CIFAR page (A. Krizhevsky) and unpack it into data.root."


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR's batches are pickles: allow the numpy array machinery they need and nothing that runs code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}  # encode: protocol-2 bytes

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """(images (N, 3, 32, 32), classes (N,) or None where the batch has none)."""
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"], np.uint8)
        labels = np.asarray(batch[b"labels"], np.int64) if b"labels" in batch else None
    except (pickle.UnpicklingError, KeyError, EOFError, TypeError, ValueError) as e:
        raise DataError(f"{path} is not a CIFAR-10 python batch ({e}); {CIFAR_WHERE}") from None
    data = data.reshape(-1, 3, 32, 32)
    return data, labels if labels is not None and len(labels) == len(data) else None


def decode_cifar10(cfg: DataConfig) -> ImageData:
    expected = "cifar-10-batches-py/ (data_batch_1..5, test_batch) in data.root, or data.root pointing at it"
    root = _require_root(cfg, expected, CIFAR_WHERE)
    folder = root if (root / "data_batch_1").is_file() else root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)]
    missing = [n for n in [*names, "test_batch"] if not (folder / n).is_file()]
    if missing:
        raise DataError(f"{folder} lacks {', '.join(missing)}; data=cifar10 expects {expected}. {CIFAR_WHERE}")
    batches = [_read_cifar_batch(folder / n) for n in names]
    test, test_labels = _read_cifar_batch(folder / "test_batch")
    train = fit_arrays(np.concatenate([images for images, _ in batches]), cfg)
    train, val = carve_val(train, cfg.val_size, cfg.seed, cfg.name)
    labels = {}
    if test_labels is not None and all(lab is not None for _, lab in batches):  # split as the images are
        train_labels, val_labels = carve_val(np.concatenate([lab for _, lab in batches]), cfg.val_size, cfg.seed,
                                             cfg.name)
        labels = {"train": train_labels, "val": val_labels, "test": test_labels}
    return ImageData({"train": train, "val": val, "test": fit_arrays(test, cfg)}, labels=labels)


# --------------------------------------------------------------------------------------------------------
# celeba: aligned faces with the official partition (Liu et al. 2015), in Kaggle's or torchvision's layout

CELEBA_EXPECTED = ("img_align_celeba/img_align_celeba/*.jpg + list_eval_partition.csv (Kaggle) or "
                   "celeba/img_align_celeba/*.jpg + list_eval_partition.txt (torchvision)")
CELEBA_WHERE = ("Get 'CelebFaces Attributes (CelebA)' from Kaggle or the CelebA page (MMLAB, CUHK), "
                "or with torchvision.datasets.CelebA(download=True).")


def _celeba_layout(root: Path) -> Tuple[Path, Path]:
    """(images folder, partition file) for whichever layout is under root."""
    for base in (root, root / "celeba"):
        partition = next((base / n for n in ("list_eval_partition.csv", "list_eval_partition.txt")
                          if (base / n).is_file()), None)
        images = next((d for d in (base / "img_align_celeba" / "img_align_celeba", base / "img_align_celeba")
                       if d.is_dir() and any(d.glob("*.jpg"))), None)
        if partition and images:
            return images, partition
    raise DataError(f"data.root={root} holds no CelebA layout; data=celeba expects {CELEBA_EXPECTED}. {CELEBA_WHERE}")


def read_celeba_partition(path: Path) -> List[Tuple[str, int]]:
    """(file name, split 0/1/2) rows from the csv (with header) or the space-separated txt."""
    rows = []
    for line in path.read_text().splitlines():
        parts = line.replace(",", " ").split()
        if len(parts) == 2 and parts[1].isdigit():
            rows.append((parts[0], int(parts[1])))
    if not rows:
        raise DataError(f"{path} has no '<image> <0|1|2>' rows; replace it with the original partition file")
    return rows


def decode_celeba(cfg: DataConfig) -> ImageData:
    root = _require_root(cfg, CELEBA_EXPECTED, CELEBA_WHERE)
    folder, partition = _celeba_layout(root)
    rows = read_celeba_partition(partition)
    missing = [name for name, _ in rows if not (folder / name).is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(f"{partition} names {len(missing)} image(s) missing from {folder}: {shown}; "
                        "unpack the whole archive or use the partition file that came with it")
    images, ok = decode_files([folder / name for name, _ in rows], cfg, desc="decode celeba")
    split_of = np.array([s for (_, s), good in zip(rows, ok) if good])
    labels = {}
    if (classes := read_celeba_classes(partition.parent, [name for (name, _), good in zip(rows, ok) if good])) \
            is not None:
        labels = {name: classes[split_of == i] for i, name in enumerate(SPLITS)}
    return ImageData({name: images[split_of == i] for i, name in enumerate(SPLITS)},
                     skipped=[name for (name, _), good in zip(rows, ok) if not good], labels=labels)


CELEBA_CLASS_ATTRIBUTES = ("Male", "Smiling")  # the judge's 4 classes: 2 * Male + Smiling


def read_celeba_classes(base: Path, names: List[str]) -> Optional[np.ndarray]:
    """A class per image from CelebA's attribute file beside the partition file (list_attr_celeba.csv, or the
    .txt whose second line names the attributes): 2 * Male + Smiling, 0..3. None without the file."""
    path = next((base / n for n in ("list_attr_celeba.csv", "list_attr_celeba.txt") if (base / n).is_file()), None)
    if path is None:
        return None
    lines = [line.replace(",", " ").split() for line in path.read_text().splitlines() if line.strip()]
    header = next((i for i, parts in enumerate(lines) if all(a in parts for a in CELEBA_CLASS_ATTRIBUTES)), None)
    if header is None:
        log.warning("no classes for data=celeba: %s names no %s column", path, " or ".join(CELEBA_CLASS_ATTRIBUTES))
        return None
    names_row = [a for a in lines[header] if a != "image_id"]
    columns = [names_row.index(a) + 1 for a in CELEBA_CLASS_ATTRIBUTES]  # +1: the image's name comes first
    value = {parts[0]: parts for parts in lines[header + 1:] if len(parts) == len(names_row) + 1}
    if any(name not in value for name in names):
        log.warning("no classes for data=celeba: %s lacks some images", path)
        return None
    return np.array([2 * (value[n][columns[0]] == "1") + (value[n][columns[1]] == "1") for n in names], np.int64)


# --------------------------------------------------------------------------------------------------------
# folder: any tree of images, split by a hash of the relative path


def hash_split(relative: str, val_fraction: float, test_fraction: float) -> str:
    """train/val/test from the first 32 bits of sha1(relative path): stable as files come and go."""
    u = int(hashlib.sha1(relative.encode()).hexdigest()[:8], 16) / 2**32
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def decode_folder(cfg: DataConfig) -> ImageData:
    expected = f"a folder tree of images ({', '.join(IMAGE_SUFFIXES)})"
    root = _require_root(cfg, expected, "Point data.root at your own images.")
    if not root.is_dir():
        raise DataError(f"data.root={cfg.root} is a file, not a folder; data=folder expects {expected}")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise DataError(f"data.root={cfg.root} holds no images; data=folder expects {expected}")
    images, ok = decode_files(paths, cfg, desc="decode folder")
    splits = np.array([hash_split(p.relative_to(root).as_posix(), cfg.val_fraction, cfg.test_fraction)
                       for p, good in zip(paths, ok) if good])
    out = {s: images[splits == s] for s in SPLITS}
    empty = [s for s in SPLITS if len(out[s]) == 0]
    if empty:
        raise DataError(f"data.root={cfg.root} has {len(images)} readable images, too few to fill the "
                        f"{'/'.join(empty)} split(s) at data.val_fraction={cfg.val_fraction}, "
                        f"data.test_fraction={cfg.test_fraction}; add images or raise the fractions")
    return ImageData(out, skipped=[p.relative_to(root).as_posix() for p, good in zip(paths, ok) if not good])


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
    """Draw factors uniformly from data.seed and render every split, in chunks of 1000 images (to bound memory)
    on every core: numpy releases the GIL, so threads render chunks at once (CelebA's 162,770 train images at
    64x64x3: 54 s on one core)."""
    rng = np.random.default_rng(cfg.seed)
    counts = {"train": cfg.num_train, "val": cfg.val_size, "test": cfg.test_size}
    images, factors = {}, {}
    pool = ThreadPoolExecutor(decode_workers())
    try:
        for split, n in counts.items():
            f = np.stack([rng.integers(0, k, n) for k in SHAPE_FACTORS.values()], axis=1)
            colours = None
            if cfg.channels == 3:  # random bright colours (one channel at 255): a nuisance, not a factor
                colours = rng.integers(40, 256, (n, 3))
                colours[np.arange(n), rng.integers(0, 3, n)] = 255
            render = lambda i, f=f, c=colours: render_shapes(f[i: i + 1000], cfg.image_size,  # noqa: E731
                                                             None if c is None else c[i: i + 1000])
            chunks = list(tqdm(pool.map(render, range(0, n, 1000)), total=-(-n // 1000), desc=f"render shapes/{split}",
                               unit="kimg", mininterval=1.0))
            images[split], factors[split] = np.concatenate(chunks), f
    finally:  # a signal while rendering: the chunks not started are dropped, not waited for
        pool.shutdown(cancel_futures=True)
    labels = {split: f[:, 0].astype(np.int64) for split, f in factors.items()}  # the shape is the class
    return ImageData(images, factors, list(SHAPE_FACTORS), list(SHAPE_FACTORS.values()), labels=labels)


SOURCES: Dict[str, Callable[[DataConfig], ImageData]] = {
    "shapes": decode_shapes,
    "mnist": decode_idx,
    "fashion_mnist": decode_idx,
    "cifar10": decode_cifar10,
    "celeba": decode_celeba,
    "folder": decode_folder,
}
