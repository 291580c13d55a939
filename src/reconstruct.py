"""Reconstruct your own images: `python -m src.reconstruct <run dir> <image files or folders> [out=...]`.

Each image goes through the run's own preprocessing (channels, centre crop, resize), is encoded to its
posterior mean and decoded. The PNG has rows of inputs, each above its reconstructions (default
<run dir>/generated/reconstructions_of_<N>_images.png).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .tool_args import output_path, parse_args, require, run_cli
from .trained import load_run, read_images
from .visuals import TOOL_TILE_PX, save_reconstructions

OPTIONS = {"out": (None, "output .png path, or a folder"), "per_row": (8, "images per row"), "device": ("auto", "auto|cpu|cuda|mps"),
           "checkpoint": ("last", "last|best")}


def main(argv=None) -> int:
    args = parse_args("src.reconstruct", __doc__, [("run", "run dir or .pt checkpoint", None),
                                                   ("images", "image files or folders", "+")], OPTIONS, argv)
    require(args["per_row"] > 0, "per_row", args["per_row"], "give a number of images per row >= 1")
    run = load_run(args["run"], args["device"], args["checkpoint"])
    x = read_images([Path(p) for p in args["images"]], run.cfg).to(next(run.model.parameters()).device)
    out = output_path(args["out"], run.run_dir, f"reconstructions_of_{len(x)}_images.png")
    with torch.no_grad():
        save_reconstructions(run.model, x, out, per_row=args["per_row"], min_tile=TOOL_TILE_PX)
    print(f"wrote {out} ({len(x)} images and their reconstructions)")
    return 0


if __name__ == "__main__":
    run_cli(main)
