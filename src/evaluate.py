"""Evaluate a run again, more carefully: `python -m src.evaluate <run dir> [split=test] [iwae_k=5000]`.

Recomputes the final metrics over the whole split (ELBO terms and IWAE in nats per image, bits per dim, active
units, mutual information and the marginal KL, blur, MIG on shapes, the judge's sample quality where the data
has classes, and the mixture prior's, refitted to this checkpoint: prior_gmm.npz) with the
run's own data and preprocessing, writes
eval_<split>_k<iwae_k>.json beside summary.json (one file per k, so a careful k=5000 is not overwritten by a quick
check), and prints a table. `src.compare` takes a run's test numbers from the file of the largest k made from the
run's final checkpoint, in place of summary.json's, and says so. Training takes IWAE over the first eval.iwae_images images only; with that
`iwae_images=N` and the same k, this gives the same numbers as summary.json.
"""
from __future__ import annotations


import pandas as pd

from .config import total_steps
from .data import cache_folder, load_data
from .judge import judged_split, sample_quality
from .losses import Objective
from .metrics import Evaluee, evaluate_split
from .prior import mixture_quality
from .rundir import RunDir, write_json
from .tool_args import parse_args, require, run_cli
from .trained import RunError, load_run

OPTIONS = {"split": ("test", "train|val|test"), "iwae_k": (5000, "importance samples per image"),
           "batch_size": (None, "images per eval batch (default: the run's data.eval_batch_size)", int),
           "iwae_images": (None, "IWAE over the first N images of the split (default: all of them)", int),
           "device": ("auto", "auto|cpu|cuda|mps"), "checkpoint": ("last", "last|best")}


def main(argv=None) -> int:
    args = parse_args("src.evaluate", __doc__, [("run", "run dir or .pt checkpoint", None)], OPTIONS, argv)
    if args["split"] not in ("train", "val", "test") or args["iwae_k"] < 1:
        raise RunError(f"split={args['split']!r} iwae_k={args['iwae_k']}: use split=train|val|test and iwae_k >= 1")
    for key in ("batch_size", "iwae_images"):
        if args[key] is not None:
            require(args[key] > 0, key, args[key], "give a number of images >= 1")
    run = load_run(args["run"], args["device"], args["checkpoint"])
    if args["batch_size"] is not None:
        run.cfg.data.eval_batch_size = args["batch_size"]
    run.cfg.eval.iwae_images = args["iwae_images"]  # the careful step: the whole split unless asked
    data = load_data(run.cfg.data)
    device = next(run.model.parameters()).device
    steps = total_steps(run.cfg, len(data.images["train"]) // run.cfg.data.batch_size)
    objective = Objective(run.cfg.loss, steps, likelihood=run.model.likelihood)  # the run's, learned sigma included
    [metrics] = evaluate_split([Evaluee(run.model, objective, run.cfg)], data, args["split"], device=device,
                               step=run.step, iwae_k=args["iwae_k"])
    split, images = args["split"], run.cfg.eval.fid_images
    real = judged_split(data, cache_folder(run.cfg.data), device, split, images) if run.cfg.eval.judge else None
    if real is not None:
        metrics.update(sample_quality(run.model, real, images, device, split))
    if run.cfg.eval.gmm_components > 0:  # the mixture prior of this checkpoint (prior_gmm.npz, src.sample prior=gmm)
        metrics.update(mixture_quality(run.model, data.images["train"], real, run.cfg, device, run.run_dir, run.step,
                                       split, grid=run.checkpoint.resolve() == RunDir(run.run_dir).last.resolve()))
    metrics.update({"checkpoint": str(run.checkpoint), "step": run.step, f"data/{split}_size":
                    len(data.images[split])})
    out = run.run_dir / f"eval_{split}_k{args['iwae_k']}.json"  # one file per k: a careful k keeps its own
    write_json(out, metrics)
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    print(pd.Series(scalars, name="value").to_frame().to_string(float_format=lambda v: f"{v:.5g}"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
