"""Generate images from a trained run's prior: `python -m src.sample <run dir> [n=64] [temperature=1.0] [seed=0]
[prior=standard|gmm]`.

Draws z ~ N(0, temperature^2 I) (deterministic for a seed), or with prior=gmm from the mixture the final eval fitted
to the encoded train images (<run dir>/prior_gmm.npz: samples from where the data is, src/prior.py; temperature
scales each component's sd), decodes the decoder mean, and writes one grid PNG (default
<run dir>/generated/samples_n<n>_t<temperature>_seed<seed>[_gmm].png); individual=true also writes each image.
"""
from __future__ import annotations


import torch

from .prior import GMM_FILE, MixturePrior, PriorError
from .tool_args import output_path, parse_args, require, run_cli
from .trained import RunError, load_run
from .visuals import TOOL_TILE_PX, save_grid

MAX_SAMPLES = 10_000  # one grid of 100 x 100: more would be decoded at once and drawn as one PNG
OPTIONS = {"n": (64, "number of samples"), "temperature": (1.0, "prior std scale (below 1: safer, blander)"),
           "seed": (0, "seed of z"), "out": (None, "output .png path, or a folder"), "individual": (False, "also one PNG each"),
           "device": ("auto", "auto|cpu|cuda|mps"), "checkpoint": ("last", "last|best"),
           "prior": ("standard", "standard (N(0, I)) | gmm (the run's mixture prior, prior_gmm.npz)")}


def main(argv=None) -> int:
    args = parse_args("src.sample", __doc__, [("run", "run dir or .pt checkpoint", None)], OPTIONS, argv)
    require(0 < args["n"] <= MAX_SAMPLES, "n", args["n"], f"give a number of samples >= 1 and at most "
            f"{MAX_SAMPLES:,} (one grid; run again with another seed for more)")
    require(args["temperature"] > 0, "temperature", args["temperature"], "must be > 0")
    require(args["prior"] in ("standard", "gmm"), "prior", args["prior"], "standard | gmm")
    run = load_run(args["run"], args["device"], args["checkpoint"])
    generator = torch.Generator().manual_seed(args["seed"])
    if args["prior"] == "gmm":
        try:
            prior = MixturePrior.load(run.run_dir / GMM_FILE)
        except PriorError as e:
            raise RunError(f"prior=gmm: {e}") from None
        if prior.step != run.step or prior.means.shape[1] != run.cfg.model.latent_dim:
            raise RunError(f"prior=gmm: {run.run_dir / GMM_FILE} was fitted to the checkpoint of step {prior.step} "
                           f"({prior.means.shape[1]} latent dims), {run.checkpoint.name} is step {run.step} "
                           f"({run.cfg.model.latent_dim}): `python -m src.evaluate {run.run_dir} "
                           f"checkpoint={args['checkpoint']}` fits it to this one")
        z = prior.sample(args["n"], generator, args["temperature"])
    else:
        z = torch.randn(args["n"], run.cfg.model.latent_dim, generator=generator).mul(args["temperature"])
    images = run.model.sample(z.to(next(run.model.parameters()).device)).float().clamp(0, 1)
    name = f"samples_n{args['n']}_t{args['temperature']:g}_seed{args['seed']}" + ("_gmm" if args["prior"] == "gmm" else "")
    out = output_path(args["out"], run.run_dir, f"{name}.png")
    save_grid(images.cpu(), out, nrow=max(1, round(args["n"] ** 0.5)), min_tile=TOOL_TILE_PX)
    if args["individual"]:
        for i, img in enumerate(images.cpu()):
            save_grid(img[None], out.with_suffix("") / f"sample_{i:04d}.png", nrow=1)
    print(f"wrote {out} ({args['n']} samples from {run.checkpoint}, step {run.step})")
    return 0


if __name__ == "__main__":
    run_cli(main)
