#!/usr/bin/env bash
# One-shot check on the lent GPU machine (H100/H200, torch 2.11+cu130, Triton 3.6, Python 3.12, no network):
# build mmfast with its CUDA kernels, run the GPU backends' tests and `python -m mmfast bench` (every GPU
# step timed as a CUDA-graph replay: device time).
#
#   OUT=/path/to/results bash benchmarks/gpu_check.sh        # from the repository root
#
# Order (the numbers the issues' GPU targets need come first): the build runs in the background while the
# bench times the default GPU backend, Triton, from the source tree (it needs no build: providers eager,
# compile, mmfast-triton, exp-floor, copy); then the installed build's tests, then the CUDA backend's bench
# (mmfast-cuda against compile and copy, again side by side), then the CUDA kernels' row teams, split mode,
# cluster mode and sweep orders each against the other choice (benchmarks/row_teams.py, into gpu_check.log), then
# the Triton kernels' streamed rows in each sweep order (step l2, into gpu_check.log), then the host time per
# call at tiny sizes with and without the direct eager path (step overhead, into gpu_check.log).
# Writes at most 8 files under $OUT: gpu_check.log (steps, build and CLI output), env.txt, tests.txt,
# cli.json, cli.md (the Triton bench tables), cli.png (step times split into forward and backward, peak
# memory), cli_cuda.json, cli_cuda.md; the optional steps (GPU_CHECK_STEPS=...,ptxas,sweep,tiles,bench,report)
# add ptxas.txt, sweep*.json/png, tiles.md/json, bench.json/md (pick so that at most 8 come back). A failed
# step is recorded and the later steps still run; every step has a timeout, cut to what is left of the
# script's budget ($GPU_CHECK_BUDGET_S, default 560 s: a 15-minute lease less the machine's start; give the
# run tool timeout_s 600). Tests and benchmarks run from an empty temporary folder, so that the repository's
# ./mmfast does not shadow the installed build (the Triton bench, and everything when the build fails, put
# the source tree on PYTHONPATH instead).
set -u -o pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
: "${OUT:?set OUT to the folder that receives the results}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-560}
# A short lease can run a subset: GPU_CHECK_STEPS (comma-separated, default all), the test paths
# (GPU_CHECK_TESTS), a -k filter (GPU_CHECK_TESTS_K, default: the GPU backends' tests) and extra pytest
# arguments (GPU_CHECK_PYTEST_ARGS, e.g. "-n 16" with xdist).
# default: no pytest-benchmark pass (bench,report: the same cases as the CLI, twice the time); ptxas: CI prints it;
# sweep: benchmarks/class_sweep.py (routed KD over C = 10..256k, mutual KD over C = 10..32k, ~3 min);
# tiles: benchmarks/triton_tiles.py (launch-tuning sweep of the Triton softmax kernels, tiles.md / tiles.json)
STEPS=",${GPU_CHECK_STEPS:-env,build,cli,import,tests,clicuda,climd,teams,l2,overhead},"
TESTS=${GPU_CHECK_TESTS:-$REPO/tests}
# only the tests that exercise the GPU backends (test ids and file names name them); "" runs all of them
TESTS_K=${GPU_CHECK_TESTS_K-cuda or triton or gpu}
# tests in parallel when pytest-xdist is there (the lent image has it)
if [[ -z ${GPU_CHECK_PYTEST_ARGS+x} ]] && $PY -c "import xdist" 2>/dev/null; then
  PYTEST_ARGS="-n 16"
else
  PYTEST_ARGS=${GPU_CHECK_PYTEST_ARGS:-}
fi
# tests and benchmarks run from an empty folder: the working directory comes first on the module path, so the
# repository's ./mmfast (or any stray *.py) must not be there
RUN_DIR=$(mktemp -d)
LOG=$OUT/gpu_check.log
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
SUMMARY=()
: >"$LOG"

log() { echo "$*" | tee -a "$LOG"; }

# step_status RC LIMIT_S: a step's outcome from its exit status under `timeout`
step_status() {
  if (($1 == 124 || $1 == 137)); then
    echo "TIMEOUT after ${2}s"
  elif (($1 != 0)); then
    echo "FAILED rc=$1"
  else
    echo ok
  fi
}

# run_step NAME CAP_S OUTFILE COMMAND: run COMMAND (bash) with a timeout of min(CAP_S, budget left),
# append its output to OUTFILE, record the outcome; returns COMMAND's status. At the timeout the command gets
# $STEP_SIGNAL (default TERM; INT lets pytest print what failed so far), and KILL 15 s later.
run_step() {
  local name=$1 cap=$2 out=$3 cmd=$4
  if [[ $STEPS != *",$name,"* ]]; then
    SUMMARY+=("$(printf '%-7s not selected (GPU_CHECK_STEPS)' "$name")")
    return 0
  fi
  local left=$((BUDGET_S - SECONDS))
  local limit=$((cap < left ? cap : left))
  if ((limit < 5)); then
    log "=== $name: skipped, the ${BUDGET_S}s budget is spent"
    SUMMARY+=("$(printf '%-7s SKIPPED (budget spent)' "$name")")
    return 1
  fi
  log "=== $name $(date -u +%H:%M:%S) (timeout ${limit}s, output: $(basename "$out")): $cmd"
  local t0=$SECONDS rc status
  timeout -s "${STEP_SIGNAL:-TERM}" -k 15 "$limit" bash -o pipefail -c "$cmd" >>"$out" 2>&1
  rc=$?
  status=$(step_status "$rc" "$limit")
  log "=== $name: $status ($((SECONDS - t0)) s)"
  SUMMARY+=("$(printf '%-7s %-22s %4d s  %s' "$name" "$status" "$((SECONDS - t0))" "$(basename "$out")")")
  return "$rc"
}

PYTEST="$PY -m pytest -p no:cacheprovider --rootdir=$REPO -c $REPO/pyproject.toml"

# (a) environment
run_step env 60 "$OUT/env.txt" "
  echo \"date: \$(date -u +%FT%TZ)  host: \$(hostname)  cpus: \$(nproc)\"
  nvidia-smi
  nvcc --version | tail -n 2
  cmake --version | head -n 1
  $PY -VV
  $PY -c 'import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__); print(\"device\", torch.cuda.get_device_name(), \"sm\", torch.cuda.get_device_capability())'
  $PY -m pip list 2>/dev/null | grep -i -E '^(torch|triton|pybind11|scikit-build-core|cmake|ninja|pytest|pytest-benchmark|hypothesis|numpy|tqdm) '
"

# (b) build and install with the CUDA kernels, in the background (into build.log, appended to gpu_check.log when
# it ends): sm_90 only, and the CPU kernels (not what is measured here) for the baseline ISA only
BUILD_CAP=${GPU_CHECK_BUILD_CAP:-300}
BUILD_PID=
BUILD_T0=$SECONDS
BUILD_LOG=$RUN_DIR/build.log
if [[ $STEPS == *",build,"* ]]; then
  log "=== build $(date -u +%H:%M:%S) (background, timeout ${BUILD_CAP}s, output: gpu_check.log when it ends)"
  (
    cd "$REPO" && MMFAST_WITH_CUDA=ON timeout -k 10 "$BUILD_CAP" $PY -m pip install --no-build-isolation --no-deps \
      --no-index -v -C cmake.define.CMAKE_CUDA_ARCHITECTURES=90 -C cmake.define.MMFAST_CPU_ISA_CLONES=OFF . \
      >"$BUILD_LOG" 2>&1
    echo $? >"$RUN_DIR/build.rc"
  ) &
  BUILD_PID=$!
else
  SUMMARY+=("$(printf '%-7s not selected (GPU_CHECK_STEPS)' build)")
fi

# bench_suites NAME CAP JSON PROVIDERS...: `python -m mmfast bench`, one process per suite (GPU_CHECK_CLI_SUITES,
# in that order), all appending to JSON, so that a device fault in one suite (the bench stops at a lost CUDA
# context) does not cost the others; GPU_CHECK_CLI_ARGS: more bench arguments (e.g. --case TEXT). The default leaves
# out routed_kd_mixes and routed_kd_divergences (the other mixes and divergences: no GPU target of their own, eight
# more torch.compile graphs in a 15-minute lease).
CLI_SUITES=${GPU_CHECK_CLI_SUITES:-routed_kd fdistill uni_instruct masked_reconstruction mutual_kd}
bench_suites() {
  local name=$1 cap=$2 json=$3 env=$4
  shift 4
  local providers="" p
  for p in "$@"; do providers+=" --provider $p"; done
  run_step "$name" "$cap" "$LOG" "
    cd $RUN_DIR && rc=0 && for suite in $CLI_SUITES; do
      $env $PY -m mmfast bench --suite \$suite $providers ${GPU_CHECK_CLI_ARGS:-} --json $json --append || rc=1
    done; exit \$rc"
}

# (c) the Triton bench, from the source tree while the build runs (CUDA-graph replays time the device, so the
# build's load on the host CPUs does not enter the numbers; it only slows torch.compile's warm-up)
# GPU_CHECK_CLI_PROVIDERS / GPU_CHECK_CLICUDA_PROVIDERS: other providers for either bench
# (each list is split on spaces)
bench_suites cli "${GPU_CHECK_CLI_CAP:-270}" "$OUT/cli.json" "PYTHONPATH=$REPO" \
  ${GPU_CHECK_CLI_PROVIDERS:-eager compile mmfast-triton exp-floor copy}

# (d) the build's end (without the build step: an installed CUDA build from an earlier call on this machine
# counts, so that a second call can run, e.g., GPU_CHECK_STEPS=import,clicuda,climd,teams)
BUILD_OK=0
if [[ -z $BUILD_PID ]] && (cd "$RUN_DIR" && $PY -c "import mmfast._C as C; assert C.with_cuda" 2>/dev/null); then
  BUILD_OK=1
  log "=== build: not selected; the installed mmfast._C has the CUDA kernels (an earlier call's build)"
fi
if [[ -n $BUILD_PID ]]; then
  left=$((BUILD_CAP + 15 - (SECONDS - BUILD_T0)))
  log "=== build: waiting (at most ${left}s more)"
  wait "$BUILD_PID"
  cat "$BUILD_LOG" >>"$LOG"
  rc=$(cat "$RUN_DIR/build.rc" 2>/dev/null || echo 1)
  status=$(step_status "$rc" "$BUILD_CAP")
  ((rc == 0)) && BUILD_OK=1
  log "=== build: $status ($((SECONDS - BUILD_T0)) s since its start)"
  SUMMARY+=("$(printf '%-7s %-22s %4d s  %s' build "$status" "$((SECONDS - BUILD_T0))" gpu_check.log)")
fi
if ((BUILD_OK)); then
  run_step import 60 "$LOG" "
    cd $RUN_DIR && $PY -c '
import json, mmfast, mmfast._C
assert not mmfast.__file__.startswith(\"$REPO/\"), \"the source tree shadows the installed build: \" + mmfast.__file__
print(mmfast.__file__, \"with_cuda =\", mmfast._C.with_cuda)
print(json.dumps(mmfast.backend_info(), indent=1))
'"
else
  export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
  log "=== no build: tests and benchmarks use the source tree (no mmfast._C: torch and triton backends only)"
fi

# (e) ptxas resource report of the CUDA kernels (optional: CI prints it)
if [[ -f $REPO/csrc/cuda/compile_check.sh ]]; then
  run_step ptxas 120 "$OUT/ptxas.txt" "cd '$REPO' && bash csrc/cuda/compile_check.sh"
fi

# (f) tests (GPU tests are selected automatically when CUDA is present): each test's outcome on its own line as
# it ends, and at the timeout an interrupt, so that pytest still lists the failures (with tracebacks) so far
STEP_SIGNAL=INT run_step tests "${GPU_CHECK_TESTS_CAP:-200}" "$OUT/tests.txt" \
  "cd $RUN_DIR && $PYTEST -v -rfE --maxfail=50 $PYTEST_ARGS ${TESTS_K:+-k '$TESTS_K'} $TESTS"

# (g) the CUDA backend's bench (the installed build only), against compile and copy measured again beside it
if ((BUILD_OK)); then
  bench_suites clicuda "${GPU_CHECK_CLICUDA_CAP:-240}" "$OUT/cli_cuda.json" "" \
    ${GPU_CHECK_CLICUDA_PROVIDERS:-compile mmfast-cuda copy}
else
  SUMMARY+=("$(printf '%-7s SKIPPED (no build)' clicuda)")
fi

# the tables of whatever was measured, even when the budget cut a run
if [[ -s $OUT/cli.json ]]; then
  run_step climd 60 "$LOG" "cd $RUN_DIR && $PY $REPO/benchmarks/report.py $OUT/cli.json -o $OUT/cli.md --plot $OUT/cli.png"
fi
if [[ -s $OUT/cli_cuda.json ]]; then
  run_step climd 60 "$LOG" "cd $RUN_DIR && $PY $REPO/benchmarks/report.py $OUT/cli_cuda.json -o $OUT/cli_cuda.md"
fi

# (g2) the CUDA kernels' row teams (a block or a thread per row), split mode (a few long rows over several
# blocks), cluster mode (many long rows, a thread-block cluster each, sm_90) and a block per row's sweep orders
# (back and forth with L2 evict-first hints, without them, forward), each against the other choice at the same
# problems: the thresholds were set from arithmetic
if ((BUILD_OK)); then
  run_step teams "${GPU_CHECK_TEAMS_CAP:-90}" "$LOG" "cd $RUN_DIR && $PY $REPO/benchmarks/row_teams.py --reps 30"
else
  SUMMARY+=("$(printf '%-7s SKIPPED (no build)' teams)")
fi

# (g3) the Triton kernels' streamed rows (C >= 32768) swept back and forth with L2 evict-first hints (the
# default), without the hints, and every pass forward (benchmarks/triton_tiles.py --sweeps, into gpu_check.log):
# whether each keeps its place is the measurement's to say
run_step l2 "${GPU_CHECK_L2_CAP:-150}" "$LOG" "cd $RUN_DIR && $PY $REPO/benchmarks/triton_tiles.py --sweeps"

# (g4) host time per call at tiny sizes (what a small model's step pays): each loss on the GPU backends against
# its eager reference, with and without the direct eager path (benchmarks/overhead.py, into gpu_check.log)
OVERHEAD_BACKENDS="triton"
((BUILD_OK)) && OVERHEAD_BACKENDS+=" cuda"
run_step overhead "${GPU_CHECK_OVERHEAD_CAP:-90}" "$LOG" "
  cd $RUN_DIR && rc=0 && for backend in $OVERHEAD_BACKENDS; do
    $PY $REPO/benchmarks/overhead.py --device cuda --backend \$backend --calls 200 || rc=1
  done; exit \$rc"

# (h) routed- and mutual-KD throughput against C at a fixed N*C (no cliff from C = 10 to 256k); optional
# step "sweep"
run_step sweep "${GPU_CHECK_SWEEP_CAP:-180}" "$LOG" "
  cd $RUN_DIR && $PY $REPO/benchmarks/class_sweep.py --json $OUT/sweep.json --plot $OUT/sweep.png &&
  $PY $REPO/benchmarks/class_sweep.py --loss mutual --E 3 --classes 10,100,1000,32768 \
    --json $OUT/sweep-mutual.json --plot $OUT/sweep-mutual.png
"

# (i) launch tuning of the Triton routed- and mutual-KD kernels: candidate ROW_TILES per shape, fp32 and bf16
# (optional step "tiles", ~3 min; GPU_CHECK_TILES_ARGS=--quick for two shapes)
run_step tiles "${GPU_CHECK_TILES_CAP:-240}" "$OUT/tiles.md" "
  cd $RUN_DIR && $PY $REPO/benchmarks/triton_tiles.py ${GPU_CHECK_TILES_ARGS:-} --json $OUT/tiles.json
"

# (j) benchmarks -> bench.json -> bench.md
run_step bench 300 "$LOG" "
  cd $RUN_DIR && $PYTEST -q $REPO/benchmarks --benchmark-only --benchmark-json=$OUT/bench.json \
    --benchmark-max-time=0.25 --benchmark-min-rounds=10
"
if [[ -s $OUT/bench.json ]]; then
  run_step report 60 "$LOG" "cd $RUN_DIR && $PY $REPO/benchmarks/report.py $OUT/bench.json -o $OUT/bench.md"
fi

log ""
log "=== summary ($SECONDS s of ${BUDGET_S} s; files in $OUT)"
for line in "${SUMMARY[@]}"; do log "$line"; done
[[ -s $OUT/tests.txt ]] && log "tests: $(grep -E '^=+ .*(passed|failed|error)' "$OUT/tests.txt" | tail -n 1)"
[[ -s $OUT/bench.md ]] && log "bench: $(grep '^| ' "$OUT/bench.md" | grep -vc '^| provider') timed rows in bench.md"
exit 0
