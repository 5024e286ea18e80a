#!/usr/bin/env bash
# The test suite and the Triton compile check under another torch / Triton pair, on a CPU machine: by default the
# lent GPU machine's torch 2.11.0 and the Triton 3.6.0 it pins, so that an incompatibility shows before a GPU lease
# rather than during one. Makes a virtual environment (default /tmp/mmfast-compat; reused when it exists), installs
# that torch (a CUDA build from PyPI, about 3 GB with its NVIDIA libraries; no GPU is needed to import it), builds
# mmfast into it (its own build folder) and runs `pytest` and `scripts/triton_compile_check.py` (Triton's own
# toolchain lowers every kernel for sm_80 and sm_90: the GPU machine's exact compiler). About 12 minutes on 2 cores.
# Not part of .ci/run (the download); run it when the GPU machine's versions change or before a lease.
#
#   bash scripts/compat_check.sh [extra pytest args]
#   COMPAT_TORCH=2.11.0 COMPAT_VENV=/tmp/mmfast-compat bash scripts/compat_check.sh -x
#   PYTHON=python3.12 COMPAT_VENV=/tmp/mmfast-compat-312 bash scripts/compat_check.sh   # the machine's Python too
#
# Triton 3.6's interpreter fails under NumPy >= 2.4 (it converts one-element arrays to Python ints, which NumPy
# 2.4 refuses); NumPy is held below 2.4 here.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
torch_version=${COMPAT_TORCH:-2.11.0}
venv=${COMPAT_VENV:-/tmp/mmfast-compat}
python=${PYTHON:-python3}

if [[ ! -x $venv/bin/python ]]; then
  "$python" -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install -q "torch==$torch_version" "numpy<2.4" scikit-build-core pybind11 ninja
(cd "$root" && "$py" -m pip install -q --no-build-isolation -e ".[test]" -C build-dir="$venv/mmfast-build" "numpy<2.4")
"$py" -c "import torch, triton; print('compat_check: torch', torch.__version__, 'triton', triton.__version__)"

status=0
(cd "$root" && "$py" -m pytest -q -p no:cacheprovider "$@") || status=1
(cd "$root" && "$py" scripts/triton_compile_check.py | tail -n 1) || status=1
exit "$status"
