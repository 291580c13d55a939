#!/usr/bin/env bash
# The wheels a lent GPU machine lacks for benchmarks/gpu.py, into .whl/ (git-ignored), for its Python 3.12.
#
#   bash benchmarks/gpu_wheels.sh            # here, where pip reaches a registry; then, on the GPU machine:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl/*.whl && export PYTHONPATH=/tmp/site && python3 benchmarks/gpu.py --out $OUT/gpu.json
#
# The machine's image holds torch, torchvision, numpy, scipy, pandas, scikit-learn, matplotlib, pillow, tqdm,
# tabulate, PyYAML, cloudpickle, pytest and pytest-xdist (the device tool's KINDS.md lists it); gpu.py's steps need
# besides only Hydra (with OmegaConf and its parser's ANTLR runtime), submitit and Hydra's submitit launcher (the
# packed and parallel launchers), and torch-fidelity (the judge's scores in the final evals). W&B and Optuna are
# imported only by logger=wandb and the halving sweeper, which gpu.py does not use. The versions are this
# machine's, the ones the tests ran with. ANTLR's runtime is published as source only: it is built into a
# (pure-Python) wheel here.
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(hydra-core omegaconf submitit hydra-submitit-launcher torch-fidelity)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64)
version() { python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
rm -rf .whl && mkdir .whl
pins=()
for p in "${PACKAGES[@]}"; do pins+=("$p==$(version "$p")"); done
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]/#/--platform=}" -d .whl "${pins[@]}"
python -m pip wheel -q --no-deps -w .whl "antlr4-python3-runtime==$(version antlr4-python3-runtime)"
ls .whl
du -sh .whl | sed 's/\t.*/ in .whl: name it in the device call'"'"'s carry/'
