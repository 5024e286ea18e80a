#!/usr/bin/env bash
# Build check of the CUDA configuration (no GPU needed): CMakeLists.txt with MMFAST_WITH_CUDA=ON (CMake's CUDA
# language, CUDAToolkit, nvcc with the build's flags, the link against cudart), configured and built as
# benchmarks/gpu_check.sh builds it on the lent GPU machine (sm_90, CPU kernels without their ISA clones; here at
# -O0: its CPU code is not what this checks, and a routed-KD CPU shard compiles in 2 s instead of 8 s at -O1),
# into a temporary folder; then the module is imported (with every symbol resolved) and must report with_cuda
# and the kernels' bindings. Without it that build path first ran on a GPU lease. The kernels' compile for sm_80
# and sm_90 and their registers: csrc/cuda/compile_check.sh; their behaviour: the tests on the CUDA emulation.
# About 3 minutes on 2 cores with --ptxas (both architectures). Exit status 0 also when nvcc is absent
# (nothing to check).
#
#   bash scripts/cuda_build_check.sh [--ptxas]
#
# --ptxas (CI): build for sm_80 and sm_90 with ptxas's resource report (-Xptxas -v), then print the kernels'
# registers and spills from the build's log (csrc/cuda/compile_check.sh --from-log, which fails on a spill): the
# kernels compile once for both checks instead of twice.
set -euo pipefail
archs=90
cuda_flags=""
if [[ ${1:-} == --ptxas ]]; then
  archs="80;90"
  cuda_flags="-Xptxas -v --threads 2"
fi
root="$(cd "$(dirname "$0")/.." && pwd)"
if ! command -v nvcc >/dev/null 2>&1; then
  echo "cuda_build_check: nvcc not found; CUDA build not checked"
  exit 0
fi
py=${PYTHON:-python}
build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT
start=$(date +%s)
if ! { cmake -S "$root" -B "$build" -G Ninja -DMMFAST_WITH_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$archs" \
         -DCMAKE_CUDA_FLAGS="$cuda_flags" \
         -DMMFAST_CPU_ISA_CLONES=OFF -DMMFAST_CXX_OPTIMIZATION=-O0 -DPython_EXECUTABLE="$(command -v "$py")" \
         -Dpybind11_DIR="$("$py" -c 'import pybind11; print(pybind11.get_cmake_dir())')" &&
       cmake --build "$build" --parallel; } >"$build/log" 2>&1; then
  tail -n 60 "$build/log" >&2
  echo "cuda_build_check: the MMFAST_WITH_CUDA=ON build failed" >&2
  exit 1
fi
module=$(ls "$build"/_C.*.so)
"$py" - "$module" <<'EOF'
import importlib.util
import sys

spec = importlib.util.spec_from_file_location("_C", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)  # every symbol resolved now: a missing kernel definition fails here
assert module.with_cuda, "built with MMFAST_WITH_CUDA=ON but with_cuda is False"
kernels = sorted(name for name in dir(module) if name.endswith("_cuda") and callable(getattr(module, name)))
expected = {"routed_kd_cuda", "mutual_kd_cuda", "masked_reconstruction_cuda", "fdistill_cuda",
            "uni_instruct_cuda", "fake_score_cuda", "scale_unless_one_cuda"}
missing = expected.difference(kernels)
assert not missing, f"kernels not bound: {sorted(missing)}"
print("cuda_build_check: mmfast._C with_cuda imports; kernels:", ", ".join(kernels))
EOF
echo "cuda_build_check: OK ($(( $(date +%s) - start )) s)"
if [[ -n $cuda_flags ]]; then
  bash "$root/csrc/cuda/compile_check.sh" --from-log "$build/log"
fi
