#!/usr/bin/env bash
# The cuda backend's tests on the CPU emulation of the CUDA runtime (tests/cuda_emu.py), with the kernels and
# launchers built under AddressSanitizer: a read or write outside any tensor (a kernel's index bug, or a
# launcher that lets a tensor whose address it passed be freed before the launch) stops with a report. Every
# dtype runs (a row's vector width, hence its addresses, depends on it). The module is built first (about 50 s
# on 2 cores), two self-test kernels check that the sanitizer sees what the fibers read, then the tests run on
# every core with pytest-xdist when it is installed (the [test] extra): about 1.5 minutes on 2 cores.
#
#   bash scripts/cuda_emu_asan.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/asan_env.sh
export LD_PRELOAD="$asan_preload"
export MMFAST_CUDA_EMU_SANITIZE=1
python -c "import sys; sys.path.insert(0, 'tests'); import cuda_emu; cuda_emu.build()"
# the sanitizer must see what a kernel's threads do on their fibers' stacks: two self-test kernels
# (csrc/cuda_emu/selftest.cu) read out of bounds, one a heap buffer, one a thread's local array
for bug in heap_overflow stack_overflow; do
  expect_asan_report "cuda_emu_asan: the $bug self-test kernel's read" \
    "ERROR: AddressSanitizer: ${bug/_/-buffer-}" "${bug}_kernel" <<EOF
import sys
sys.path.insert(0, "tests")
import cuda_emu
cuda_emu.load().run_selftest("$bug", 64, 4)
EOF
done
parallel=()
python -c "import xdist" 2>/dev/null && parallel=(-n auto)
python -m pytest -q -p no:cacheprovider "${parallel[@]}" tests/test_kernels_cuda.py tests/test_fdiv_kernels_cuda.py \
  tests/test_masked_recon_backends.py tests/test_grad_scaling_kernels.py tests/test_launch_lifetimes.py \
  -k "cuda or lifetimes" \
  "$@"
