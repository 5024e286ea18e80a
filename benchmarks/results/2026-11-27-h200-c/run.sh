#!/usr/bin/env bash
# Second call of the third H200 lease (2026-11-27), in ~390 s of device time: the first call's build timed out
# (LTO made one serial 5-minute link) and its bench lost the CUDA context at routed-kd C=8192. Here the build
# (dtype shards, no LTO) runs in the background while the failing case is rerun on the source tree (torch and
# triton backends), then the GPU tests and the per-suite bench run on the build. From the repository root:
#   OUT=/path bash benchmarks/results/2026-11-27-h200-c/run.sh
set -u
R=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
: "${OUT:?set OUT}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
T=$(mktemp -d)
LOG=$OUT/steps.log
left() { local l=$(($1 - SECONDS)); echo $((l > 5 ? l : 5)); }
say() { echo "[$SECONDS s] $*" | tee -a "$LOG"; }
say "start $(date -u +%FT%TZ); $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)"
(cd "$R" && timeout 250 env MMFAST_WITH_CUDA=ON python3 -m pip install --no-build-isolation --no-deps --no-index -v \
   -C cmake.define.CMAKE_CUDA_ARCHITECTURES=90 . >"$OUT/build.log" 2>&1
 echo "build rc=$? at $SECONDS s" >>"$OUT/build.log") &
BUILD=$!
cd "$T"
say "diag 1: routed C=1000 then C=8192 (graph replay), source tree"
PYTHONPATH=$R timeout 100 python3 -m mmfast bench --suite routed_kd --case "N=256 C=1000" \
  --case "C=8192 E=4 dense" --no-forward >"$OUT/diag.txt" 2>&1
say "diag 1 rc=$?"
say "diag 2: routed C=8192 alone, wall clock"
PYTHONPATH=$R timeout 60 python3 -m mmfast bench --suite routed_kd --case "C=8192 E=4 dense" --wall-clock \
  --no-forward >>"$OUT/diag.txt" 2>&1
say "diag 2 rc=$?"
wait $BUILD
say "$(tail -n 1 "$OUT/build.log")"
if ! python3 -c "import mmfast._C as c; assert c.with_cuda" 2>>"$LOG"; then
  export PYTHONPATH=$R
  say "no CUDA build: tests and bench on the source tree"
fi
say "tests"
timeout "$(left 290)" python3 -m pytest -q -p no:cacheprovider --rootdir="$R" -c "$R/pyproject.toml" -n 16 -rf \
  --maxfail=30 -k "cuda or triton or gpu" "$R/tests" >"$OUT/tests.txt" 2>&1
say "tests rc=$?: $(tail -n 1 "$OUT/tests.txt")"
for suite in routed_kd fdistill uni_instruct masked_reconstruction mutual_kd; do
  ((SECONDS < 375)) || break
  say "bench $suite"
  timeout "$(left 380)" python3 -m mmfast bench --suite $suite --json "$OUT/cli.json" --append >>"$OUT/cli.txt" 2>&1
  say "bench $suite rc=$?"
done
say "done"
