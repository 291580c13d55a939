"""The GPU figures in one command, for a GPU machine lent for minutes: one JSON with every step's result.

    python benchmarks/gpu.py --out $OUT/gpu.json          # on the GPU machine: about 9 minutes, 10 at the most
    python benchmarks/gpu.py --dry-run --out /tmp/gpu.json # the same steps, tiny, on a CPU: about two minutes

Steps, in order, each in its own process with its own time cap (a step that runs over is recorded as such, and
the next one starts), each one's output or error in the JSON; the steps before the headline stop short of the
last HEADLINE_RESERVE_S seconds of the budget, which are the headline's:
1. `cuda_tests`: tests/test_cuda.py and the CUDA fast-path test (pytest).
2. `packed_throughput`: benchmarks/throughput.py --packed: the VanillaVAE at batch 64 a member, M = 16 packed
   (engines vmap, loop and the auto rule's) against the members one after another, with peak GPU memory.
3. `processes_and_dense`: benchmarks/throughput.py: one VanillaVAE process at batch 64 and at batch 1024 (a dense
   model as big as the pack), and 16 and 4 processes at once at batch 64 (their summed images/s), with peak
   memory, beside PyTorch-VAE's own loop.
4. `headline_data`, then `headline`: the data set generated and the judge trained, once, before the clock; then
   benchmarks/sweep.py: the 16-member beta x latent sweep of the VanillaVAE (experiment
   vanilla_vae_celeba64) on generated shapes of CelebA's size (162,770 train images, 64x64x3),
   `hydra/launcher=packed` against `hydra/launcher=parallel`, each member `--headline-steps` steps (a share of one
   epoch, said in the JSON) with its val and test evals, and the phases; `projected_10_epochs_s` scales the
   training and val evals to 10 epochs (an eval per epoch) and adds the start and the final evals once.

On a machine with only torch (and torchvision), carry the other wheels (the device tool's README says how).
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from src.judge import judge_file  # noqa: E402

CELEBA_TRAIN = 162_770  # CelebA's train split
BETAS, LATENTS = "0.25,1,4,16", "16,32,64,128"
HEADLINE_RESERVE_S = 300  # of the budget, kept for the headline's data and sweeps: the steps before it stop short


def step(name: str, command: list, cap_s: float, deadline: float, out_json: Path = None) -> dict:
    """Run one step as its own process, for at most min(cap_s, what is left before `deadline`)."""
    left = min(cap_s, deadline - time.monotonic())
    if left < 10:
        return {"skipped": "no time left"}
    started = time.monotonic()
    try:
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=left)
    except subprocess.TimeoutExpired as e:
        return {"timed_out_s": round(left), "tail": str(e.stdout or "")[-2000:]}
    row = {"rc": proc.returncode, "seconds": round(time.monotonic() - started, 1)}
    if out_json is not None and out_json.is_file():
        row["result"] = json.loads(out_json.read_text())
    else:
        row["tail"] = (proc.stdout + proc.stderr)[-3000:]
    print(f"{name}: rc {proc.returncode} in {row['seconds']} s", file=sys.stderr, flush=True)
    return row


def headline_overrides(dry: bool, steps: int, cache: str) -> list:
    if dry:  # a small conv on a few small images: the same commands, in a minute on a CPU
        return ["loss.beta=1,4", "model.latent_dim=2,4", "model.hidden_channels=[8,16]", "data.image_size=16",
                "data.num_train=512", "data.val_size=64", "data.test_size=64", f"trainer.max_steps={steps}",
                "trainer.device=cpu", "trainer.progress=false", f"data.cache_dir={cache}"]
    return ["experiment=vanilla_vae_celeba64", "data=shapes", "data.channels=3", "data.image_size=64",
            f"data.num_train={CELEBA_TRAIN}", f"loss.beta={BETAS}", f"model.latent_dim={LATENTS}",
            f"trainer.max_steps={steps}", "trainer.progress=false", f"data.cache_dir={cache}"]


def project(run: dict, share_of_epoch: float, epochs: int = 10) -> float:
    """Seconds for `epochs` epochs from a run of `share_of_epoch` of one: training scales with the steps, a val
    eval is taken once per epoch (the run took one), the start and the final evals are paid once."""
    return run["other_s"] + run["train_s"] * epochs / share_of_epoch + run["val_eval_s"] * epochs + run["test_eval_s"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true", help="tiny settings on the CPU, to check the script")
    parser.add_argument("--budget-s", type=float, default=570, help="all steps together")
    parser.add_argument("--headline-steps", type=int, default=300, help="steps a headline member trains")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="vae-gpu-"))  # the steps' data, runs and JSONs
    try:
        report = run_steps(args, work)
        text = json.dumps(report, indent=2)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        print(text)
        return report
    finally:  # (a step that timed out may leave a process writing there: whatever cannot go stays)
        shutil.rmtree(work, ignore_errors=True)


def run_steps(args: argparse.Namespace, work: Path) -> dict:
    deadline = time.monotonic() + args.budget_s
    before_headline = deadline - min(HEADLINE_RESERVE_S, args.budget_s / 2)
    dry, py = args.dry_run, sys.executable
    device = "cpu" if dry else "cuda"
    cache = str(work / "cache")
    report = {"dry_run": dry, "python": platform.python_version(), "steps": {}}
    try:
        import torch

        report.update(torch=torch.__version__, gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    except ImportError:
        pass
    steps = report["steps"]
    steps["cuda_tests"] = step("cuda_tests", [py, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
                                              "tests/test_cuda.py", "tests/test_fast_paths.py", "-k", "cuda"],
                               150, before_headline)
    packed = [py, "benchmarks/throughput.py", "--packed", "4" if dry else "16", "--devices", device,
              "--packed-models", "small_conv16" if dry else "vanilla_vae64", "--repeats", "1",
              "--steps", "5" if dry else "100", "--solo-runs", "2", "--cache", cache, "--out", str(work / "packed.json")]
    steps["packed_throughput"] = step("packed_throughput", packed, 150, before_headline, work / "packed.json")
    processes = []
    for n in ((2,) if dry else (16, 4)):
        out = work / f"processes{n}.json"
        command = [py, "benchmarks/throughput.py", "--settings", "vanilla_vae_celeba64", "--devices", device,
                   "--batches", *(["64"] if dry or n == 4 else ["64", "1024"]), "--concurrent", str(n),
                   "--repeats", "1", "--steps", "3" if dry else "100", "--cache", cache, "--out", str(out)]
        processes.append(step(f"processes{n}", command, 120, before_headline, out))
    steps["processes_and_dense"] = processes
    share = args.headline_steps * (32 if dry else 64) / (512 if dry else CELEBA_TRAIN)  # of one epoch
    sweep = [py, "benchmarks/sweep.py", "--launchers", "parallel", "packed", "--repeats", "1", "--out",
             str(work / "headline.json"), "--", *headline_overrides(dry, args.headline_steps, cache)]
    # before the clock, once: the data set generated and cached, and the judge trained and cached (a 1-step run with
    # its final eval); else the first sweep would pay both and the second find them (the judge: every member of a
    # parallel sweep would train its own at once)
    steps["headline_data"] = step("headline_data", [py, "-m", "src.train", *[
        o for o in headline_overrides(dry, 1, cache) if not o.startswith(("loss.beta", "model.latent_dim"))],
        "logger=none", f"hydra.run.dir={work / 'warm'}"], 120, deadline)
    steps["headline_data"]["judge_cached"] = Path(cache).is_dir() and any(judge_file(f).is_file()
                                                                         for f in Path(cache).iterdir())
    headline = step("headline", sweep, 330, deadline, work / "headline.json")
    if "result" in headline:
        headline["share_of_an_epoch"] = round(share, 4)
        headline["projected_10_epochs_s"] = {name: round(project(run, share))
                                             for name, run in headline["result"]["launchers"].items()}
    steps["headline"] = headline
    return report


if __name__ == "__main__":
    main()
