"""Use a trained run: `load_run` (the one loading path) and what src.sample, src.reconstruct, src.interpolate
and src.evaluate share: their `key=value` arguments, image reading with the run's own preprocessing, errors."""
from __future__ import annotations

import argparse
import errno
import logging
import sys
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from PIL import Image

from .checkpoint import CheckpointError, load_checkpoint, saved_config
from .config import Config, ConfigError, parse
from .likelihoods import build_likelihood
from .models import VAE, build_model
from .sources import IMAGE_SUFFIXES, DataError, fit_image
from .device import missing_device, resolve_device

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
        checkpoint, run_dir = path / "checkpoints" / f"{which}.pt", path
        if not checkpoint.is_file():
            if not (path / ".hydra").is_dir() and not (path / "summary.json").is_file():
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


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a usage error in one line (not the usage block, then the error)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def parse_args(prog: str, doc: str, positional: List[Tuple[str, str, Any]], options: Dict[str, Tuple],
               argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """`<positional ...> [key=value ...]`: the options are OmegaConf dotlist overrides, typed by their defaults,
    as the trainer's are; --help lists every key. An unknown key or a wrong type ends with one line."""
    epilog = "options (key=value):\n" + "\n".join(f"  {k + '=' + repr(e[0]):<24} {e[1]}" for k, e in options.items())
    parser = OneLineParser(prog=f"python -m {prog}", description=doc, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, help_text, nargs in positional:
        parser.add_argument(name, help=help_text, nargs=nargs)
    parser.add_argument("options", nargs="*", metavar="key=value", help="see the options below")
    ns = vars(parser.parse_args(argv))
    rest = ns.pop("options")
    # a trailing positional with nargs="+" swallows key=value tokens; give them back
    for name, _, nargs in positional:
        if nargs == "+":
            rest = [a for a in ns[name] if "=" in a] + rest
            ns[name] = [a for a in ns[name] if "=" not in a]
            if not ns[name]:
                parser.error(f"{name}: give at least one")
    for token in rest:
        if "=" not in token:
            parser.error(f"unexpected argument {token!r}; options are key=value: {', '.join(options)}")
    def kind(entry: Tuple) -> type:  # (default, help[, type]): the type of a None default is given, else str
        return entry[2] if len(entry) > 2 else type(entry[0]) if entry[0] is not None else str

    schema = make_dataclass(f"{prog}_options", [(k, Optional[kind(e)] if e[0] is None else kind(e), field(default=e[0]))
                                               for k, e in options.items()])
    try:
        values = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_dotlist(rest))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or str(e).splitlines()[0]
        if key not in options:
            parser.error(f"unknown option {key!r}; options are {', '.join(options)} (key=value)")
        raw = [t.partition("=")[2] for t in rest if t.startswith(key + "=")][-1]
        parser.error(f"{key}={raw!r}: expected {kind(options[key]).__name__}")
    return {**ns, **OmegaConf.to_container(values)}


def output_path(out: Optional[str], run_dir: Path, default_name: str) -> Path:
    """Where a tool writes: out= as a file (it ends in an image suffix) or a folder (anything else, created if
    needed), else <run dir>/generated/<default_name>."""
    if not out:
        return run_dir / "generated" / default_name
    path = Path(out).expanduser()
    return path if path.suffix.lower() in IMAGE_SUFFIXES else path / default_name


def require(ok: bool, key: str, value: Any, rule: str) -> None:
    """One line naming a tool's option and what it must be."""
    if not ok:
        raise RunError(f"{key}={value!r} is not allowed; {rule}")


def run_cli(main: Callable[[], int]) -> None:
    """Run an entrypoint: user errors print one line to stderr and exit 2, with no traceback."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        sys.exit(main())
    except (RunError, CheckpointError, ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR):
            raise
        print(f"error: cannot write {e.filename} ({e.strerror}); choose another out=", file=sys.stderr)
        sys.exit(2)
