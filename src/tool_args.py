"""What the trained-model tools (src.sample, src.reconstruct, src.interpolate, src.evaluate) share on their command
line: `key=value` options typed like the trainer's, where they write, and errors as one line with exit 2."""
from __future__ import annotations

import argparse
import errno
import logging
import sys
from dataclasses import field, make_dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .checkpoint import CheckpointError
from .config import ConfigError
from .rundir import RunDir
from .sources import IMAGE_SUFFIXES, DataError
from .trained import RunError


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
        return RunDir(run_dir).generated / default_name
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
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR,
                           errno.ENOTDIR, errno.ENOENT, errno.EEXIST):
            raise
        print(f"error: cannot write {e.filename} ({e.strerror}); choose another out=", file=sys.stderr)
        sys.exit(2)
