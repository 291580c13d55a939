"""The benchmark scripts run as documented: benchmarks/gpu.py's steps, tiny, on a CPU (a GPU session runs them for
real), with benchmarks/sweep.py's phases."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.slow  # each step starts real processes and sweeps


def test_the_gpu_script_dry_runs_every_step_on_a_cpu(tmp_path):
    """Every step runs, and every process it starts keeps the caller's PYTHONPATH: on a lent GPU machine the
    project's dependencies are importable only through it (benchmarks/gpu_wheels.sh). A sitecustomize.py on that
    path, which Python imports at each start, writes the command line of each process that saw it (Linux's /proc)."""
    out, site, seen = tmp_path / "gpu.json", tmp_path / "site", tmp_path / "seen"
    site.mkdir(), seen.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os, pathlib\n"
        "if os.environ.get('VAE_TEST_SEEN'):\n"
        "    line = pathlib.Path('/proc/self/cmdline').read_bytes().replace(b'\\0', b' ').decode()\n"
        "    pathlib.Path(os.environ['VAE_TEST_SEEN'], str(os.getpid())).write_text(line)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
           "VAE_TEST_SEEN": str(seen)}
    proc = subprocess.run([sys.executable, "benchmarks/gpu.py", "--dry-run", "--headline-steps", "4", "--out",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    commands = [p.read_text() for p in seen.iterdir()]
    assert sum("--worker" in c for c in commands) == 2, commands  # the two concurrent product processes
    assert any("-m src.train" in c for c in commands) and any("-m pytest" in c for c in commands), commands
    assert sum("submitit" in c for c in commands) >= 2, commands  # the packed and parallel launchers' jobs
    steps = json.loads(out.read_text())["steps"]
    assert steps["cuda_tests"]["rc"] in (0, 5)  # 5: pytest collected nothing to run (no GPU: every test skips)
    packed = steps["packed_throughput"]["result"]["results"]["packed/small_conv16/cpu/M4"]
    assert packed["packed_vmap_img_s"] > 0 and packed["auto_chose"] == ["vmap"]
    [processes] = steps["processes_and_dense"]
    assert processes["result"]["results"]["vanilla_vae_celeba64/cpu/batch64"]["concurrent"]["total_img_s"] > 0
    assert steps["headline_data"]["rc"] == 0 and steps["headline_data"]["judge_cached"]  # before either sweep
    headline = steps["headline"]
    launchers = headline["result"]["launchers"]
    assert set(launchers) == {"parallel", "packed"} and launchers["packed"]["pack_members"] == [4]
    packed = launchers["packed"]  # one pack: its phases follow one another, each a real share of the wall time
    assert all(packed[k] > 0 for k in ("train_s", "val_eval_s", "test_eval_s", "other_s"))
    assert packed["train_s"] + packed["val_eval_s"] + packed["test_eval_s"] < packed["wall_s"]
    for name, run in launchers.items():  # 10 epochs take longer than a share of one
        assert headline["projected_10_epochs_s"][name] > run["wall_s"]
