"""Interpolate between two images: `python -m src.interpolate <run dir> <image a> <image b> [steps=10]`.

Both images are encoded to their posterior means; the strip decodes `steps` points from a to b. The path is
spherical (slerp, White 2016) by default: under a Gaussian prior almost all mass lies near the sphere of radius
sqrt(latent_dim), and a straight line between two typical codes dips inside it, through codes the decoder
rarely saw, which gives blurry, washed-out middles. method=lerp draws the straight line.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .tool_args import output_path, parse_args, run_cli
from .trained import RunError, load_run, read_images
from .visuals import TOOL_TILE_PX, save_grid

OPTIONS = {"steps": (10, "points on the path, ends included"), "method": ("slerp", "slerp|lerp"),
           "out": (None, "output .png path, or a folder"), "device": ("auto", "auto|cpu|cuda|mps"), "checkpoint": ("last", "last|best")}


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of vectors a, b (D,) at fractions t (T,) -> (T, D); lerp when they are parallel."""
    omega = torch.arccos(torch.clamp(torch.dot(a / a.norm(), b / b.norm()), -1.0, 1.0))
    if omega.abs() < 1e-6:
        return torch.lerp(a[None], b[None], t[:, None])
    return (torch.sin((1 - t) * omega)[:, None] * a + torch.sin(t * omega)[:, None] * b) / torch.sin(omega)


def main(argv=None) -> int:
    args = parse_args("src.interpolate", __doc__, [("run", "run dir or .pt checkpoint", None),
                                                   ("a", "first image", None), ("b", "second image", None)],
                      OPTIONS, argv)
    if args["method"] not in ("slerp", "lerp") or args["steps"] < 2:
        raise RunError(f"method={args['method']!r} steps={args['steps']}: use method=slerp|lerp and steps >= 2")
    run = load_run(args["run"], args["device"], args["checkpoint"])
    x = read_images([Path(args["a"]), Path(args["b"])], run.cfg).to(next(run.model.parameters()).device)
    with torch.no_grad():
        mu = run.model.encode(x)[0].float()  # (2, D)
        t = torch.linspace(0, 1, args["steps"], device=mu.device)
        z = slerp(mu[0], mu[1], t) if args["method"] == "slerp" else torch.lerp(mu[0][None], mu[1][None], t[:, None])
        strip = run.model.sample(z).float().clamp(0, 1).cpu()
    out = output_path(args["out"], run.run_dir,
                      f"interpolation_{Path(args['a']).stem}_to_{Path(args['b']).stem}_{args['method']}.png")
    save_grid(strip, out, nrow=args["steps"], min_tile=TOOL_TILE_PX)
    print(f"wrote {out} ({args['steps']} steps, {args['method']})")
    return 0


if __name__ == "__main__":
    run_cli(main)
