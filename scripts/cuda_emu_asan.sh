#!/usr/bin/env bash
# The cuda backend's tests on the CPU emulation of the CUDA runtime (tests/cuda_emu.py), with the kernels and
# launchers built under AddressSanitizer: a read or write outside any tensor (a kernel's index bug, or a
# launcher that lets a tensor whose address it passed be freed before the launch) stops with a report.
# float32 only (the indexing is the same at every dtype). The module is built first (about 1.5 minutes on 2
# cores), then the tests run on every core with pytest-xdist when it is installed (the [test] extra): about 2.5
# minutes on 2 cores, 4.5 in one process.
#
#   bash scripts/cuda_emu_asan.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
cxx=${CXX:-c++}
asan=$($cxx -print-file-name=libasan.so)
if [[ $asan != /* ]]; then
  echo "no AddressSanitizer runtime for $cxx: skipped"
  exit 0
fi
# libstdc++ preloaded too: ASan's exception interceptor needs it resolved before the extension modules load
export LD_PRELOAD="$asan $($cxx -print-file-name=libstdc++.so)"
export ASAN_OPTIONS=detect_leaks=0:detect_stack_use_after_return=0:abort_on_error=0
export MMFAST_CUDA_EMU_SANITIZE=1
# the forced cluster row team (its fibers are the slowest to run under ASan) on TestClusterMode and the split-row
# cases (pieces of long and misaligned rows, masked and bad rows): the other cases access what the block team's do
asan_cluster="(TestClusterMode or split_rows)"
# the routed-KD cases of the largest rows and grids at one divergence (js: every pass) for each mix: a divergence
# changes the arithmetic, not which addresses the kernels touch (they are the longest to run under ASan)
asan_shapes="not ((large_classes or many_rows) and not -2])"
python -c "import sys; sys.path.insert(0, 'tests'); import cuda_emu; cuda_emu.build()"
parallel=()
python -c "import xdist" 2>/dev/null && parallel=(-n auto)
python -m pytest -q -p no:cacheprovider "${parallel[@]}" tests/test_kernels_cuda.py tests/test_fdiv_kernels_cuda.py \
  tests/test_masked_recon_backends.py tests/test_grad_scaling_kernels.py tests/test_launch_lifetimes.py \
  -k "((cuda and not bfloat16 and not float16) or lifetimes) and (not cluster_rows or $asan_cluster) and $asan_shapes" \
  "$@"
