#!/usr/bin/env bash
# The C++ CPU kernels (csrc/cpu) under AddressSanitizer: mmfast._C is built with -fsanitize=address into
# build/cpu_asan, and the CPU kernels' tests run on that build (tests/conftest.py: MMFAST_TEST_NATIVE). A
# kernel's read or write outside a tensor's allocation (a row, tail or split-row index bug) stops with a
# report; torch allocates every tensor through the intercepted malloc, so each has a redzone behind it. A
# mutual-KD launch whose parameters claim longer rows than its tensor holds must be reported first (the check
# that the sanitizer sees the kernels). Built at -O1 for the baseline ISA only (MMFAST_CPU_ISA_CLONES=OFF):
# the kernels' indexing is the same source in every ISA clone, and the build takes about a minute on 2 cores
# (MMFAST_ASAN_ISA_CLONES=ON MMFAST_ASAN_OPT=-O3 builds what the package ships, AVX-512 and AVX2 clones with
# their hand-written streaming stores included: 7.5 minutes on 2026-11-29, before the routed-KD file's compile
# was halved; its tests passed too). About 1.5 minutes on 2 cores with the build.
#
#   bash scripts/cpu_asan.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/asan_env.sh
py=${PYTHON:-python}
build=build/cpu_asan
log=build/cpu_asan.log
mkdir -p build
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER="$cxx" \
  -DMMFAST_CPU_ISA_CLONES="${MMFAST_ASAN_ISA_CLONES:-OFF}" -DMMFAST_CXX_OPTIMIZATION="${MMFAST_ASAN_OPT:--O1}" \
  -DCMAKE_CXX_FLAGS="-fsanitize=address -fno-omit-frame-pointer -g1" \
  -DCMAKE_MODULE_LINKER_FLAGS="-fsanitize=address" -DPython_EXECUTABLE="$(command -v "$py")" \
  -Dpybind11_DIR="$("$py" -c 'import pybind11; print(pybind11.get_cmake_dir())')" >"$log" 2>&1 ||
  { tail -n 40 "$log"; exit 1; }
cmake --build "$build" --parallel >>"$log" 2>&1 || { tail -n 60 "$log"; exit 1; }
MMFAST_TEST_NATIVE=$(pwd)/$(ls "$build"/_C.*.so)
export MMFAST_TEST_NATIVE
export LD_PRELOAD="$asan_preload"  # after the build: the compiler runs without it

PYTHON=$py expect_asan_report "cpu_asan: a mutual-KD launch reading past its tensor" \
  "ERROR: AddressSanitizer: heap-buffer-overflow" <<'EOF'
import sys
sys.path.insert(0, "tests")
import conftest  # noqa: F401  (loads MMFAST_TEST_NATIVE as mmfast._C)
import torch
from mmfast import _native

logits = torch.randn(2, 4, 64)
loss, grad = torch.empty(4), torch.empty_like(logits)
p = _native.mutual_kd_params(logits, 1.0, 1.0, loss, grad)
p.C = 72  # the last row's read runs 8 floats past the tensor
_native.load().mutual_kd_cpu(p, 1)
EOF

parallel=()
"$py" -c "import xdist" 2>/dev/null && parallel=(-n auto)
"$py" -m pytest -q -p no:cacheprovider "${parallel[@]}" tests/test_kernels_cpu.py tests/test_fdiv_kernels_cpu.py \
  tests/test_streaming_stores.py tests/test_masked_recon_backends.py tests/test_backend_parity.py \
  tests/test_precision.py tests/test_ops.py tests/test_fdiv_ops.py \
  -k "(cpu and not cuda) or test_streaming_stores" \
  "$@"
