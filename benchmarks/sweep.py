"""A whole sweep as a user runs it, end to end: the same `python -m src.train -m ...` command with one launcher and
with another, interleaved, each the median of --repeats runs, as a ratio; with each run's phases.

    python benchmarks/sweep.py --launchers basic packed --repeats 2 -- \
        'loss.beta=0.25,1,4,16' 'model.latent_dim=4,16' trainer.max_steps=150
    python benchmarks/sweep.py --launchers parallel packed -- hydra.launcher.engine=vmap ...

Everything after `--` is the sweep's overrides (`-m` is added, with `logger=none` and a fresh hydra.sweep.dir per
run). Phases come from the members' summaries: `train_s`, the loops' wall time less their val evals; `val_eval_s` and
`test_eval_s`, the members' evals (grids included); `other_s`, the rest of the wall time (starting processes,
composing and planning, loading data, writing). Where a launcher runs members or packs at once (parallel), the
phases overlap and `other_s` can be negative. Prints one JSON object (and writes it to --out).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]


def run_sweep(launcher: str, overrides: List[str], sweep_dir: Path, timeout: float) -> Dict[str, float]:
    """One sweep: its wall time (s) and phases, from the command's start to its exit."""
    command = [sys.executable, "-m", "src.train", "-m", *overrides, "logger=none", f"hydra/launcher={launcher}",
               f"hydra.sweep.dir={sweep_dir}"]
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{launcher}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    summaries = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("[0-9]*/summary.json"))]
    assert summaries and all(s["status"] == "finished" for s in summaries), f"{launcher}: a member did not finish"
    loops = {(s.get("perf/pack_engine"), s["perf/loop_s"]) for s in summaries}  # a pack's members share one loop
    val = sum(s["perf/val_eval_s"] for s in summaries)
    test = sum(s["perf/test_eval_s"] for s in summaries)
    loop = sum(seconds for _, seconds in loops)
    return {"wall_s": wall, "train_s": loop - val, "val_eval_s": val, "test_eval_s": test,
            "other_s": wall - loop - test, "members": len(summaries),
            "engines": sorted({s.get("perf/pack_engine") for s in summaries}),
            "pack_members": sorted({s.get("perf/pack_members") for s in summaries})}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--launchers", nargs="+", default=["basic", "packed"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds for one sweep")
    parser.add_argument("--out", type=Path)
    parser.add_argument("overrides", nargs="+", help="the sweep's overrides, after --")
    args = parser.parse_args(argv)
    runs: Dict[str, List[dict]] = {name: [] for name in args.launchers}
    with tempfile.TemporaryDirectory() as root:
        for r in range(args.repeats):  # interleaved, the order alternating, so drift hits both alike
            order = args.launchers if r % 2 == 0 else args.launchers[::-1]
            for name in order:
                runs[name].append(run_sweep(name, args.overrides, Path(root) / f"{name}{r}", args.timeout))
                print(f"{name} run {r}: {runs[name][-1]['wall_s']:.1f} s", file=sys.stderr, flush=True)
    result = {"device": platform.processor() or platform.machine(), "python": platform.python_version(),
              "command": "python -m src.train -m " + " ".join(args.overrides), "repeats": args.repeats,
              "launchers": {}}
    for name, rows in runs.items():
        medians = {k: statistics.median(row[k] for row in rows) for k in rows[0] if k.endswith("_s")}
        result["launchers"][name] = {**medians, "runs_wall_s": [round(row["wall_s"], 1) for row in rows],
                                     "members": rows[0]["members"], "engines": rows[0]["engines"],
                                     "pack_members": rows[0]["pack_members"]}
    first, *others = args.launchers
    for name in others:  # > 1: `name` is faster than the first launcher, end to end
        result[f"speedup_{name}_over_{first}"] = result["launchers"][first]["wall_s"] / \
            result["launchers"][name]["wall_s"]
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
