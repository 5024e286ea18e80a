#!/usr/bin/env bash
# Compile-only check of the CUDA kernels (no GPU needed): every csrc/cuda/*.cu with nvcc for sm_80
# and sm_90, the flags of the real build (CMakeLists.txt: -O3 --use_fast_math), and a table of
# registers / spill stores / spill loads / stack / static shared memory per kernel instantiation
# and arch (the kernels' shared memory is dynamic, sized per launch); then whether the L2 evict-first
# hints reach mutual_kd.cu's PTX.
#
# Exit status: 0 when everything compiles without register spills (or when nvcc is absent),
# 1 on a compile error or hints missing from the PTX, 2 when a kernel spills. NVCC selects the compiler
# (default: nvcc on PATH, else $CUDA_HOME/bin/nvcc).
#
#   bash csrc/cuda/compile_check.sh                  # compiles every kernel here (about 2 minutes on 2 cores)
#   bash csrc/cuda/compile_check.sh --from-log LOG   # the table from a build's log instead (CI:
#                                                    # scripts/cuda_build_check.sh --ptxas builds for both archs
#                                                    # with -Xptxas -v, so the kernels compile once for both checks)
set -euo pipefail
from_log=""
if [[ ${1:-} == --from-log ]]; then
  from_log="${2:?--from-log needs the build log}"
fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
nvcc="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$nvcc" && -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]]; then
  nvcc="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
fi
if [[ -z "$nvcc" ]]; then
  echo "compile_check: nvcc not found; CUDA kernels not checked"
  exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "nvcc: $("$nvcc" --version | tail -n 1)"

status=0
table="$tmp/table"
# ptxas -v: "Compiling entry function 'NAME' for 'sm_XX'", then "N bytes stack frame, N bytes
# spill stores, N bytes spill loads", then "Used N registers, ..., N bytes smem".
ptxas_table() {
  awk '
    /Compiling entry function/ {
      split($0, q, "\x27"); fn = q[2]; arch = q[4]; sub(/^sm_/, "", arch)
    }
    /bytes stack frame/ { stack = $1; spst = $5; spld = $9 }
    /Used [0-9]+ registers/ {
      regs = $0; sub(/.*Used /, "", regs); sub(/ registers.*/, "", regs)
      smem = 0
      if (match($0, /[0-9]+ bytes smem/)) { smem = substr($0, RSTART, RLENGTH); sub(/ .*/, "", smem) }
      print arch, regs, spst, spld, stack, smem, fn
    }' "$1" >>"$table"
}
if [[ -n $from_log ]]; then
  ptxas_table "$from_log"
  if [[ ! -s $table ]] || ! grep -q '^80 ' "$table" || ! grep -q '^90 ' "$table"; then
    echo "compile_check: $from_log has no ptxas report for both sm_80 and sm_90 (build with -Xptxas -v)" >&2
    exit 1
  fi
  echo "ptxas reports from $from_log"
else
  for cu in "$root"/csrc/cuda/*.cu; do
    name="$(basename "$cu" .cu)"
    log="$tmp/$name.log"
    if ! "$nvcc" -c "$cu" -o "$tmp/$name.o" -std=c++17 -O3 --use_fast_math -I "$root/csrc/include" \
        -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
        -Xptxas -v --threads 2 >"$log" 2>&1; then
      echo "compile_check: $name.cu failed to compile:" >&2
      grep -v '^ptxas info' "$log" >&2 || true
      status=1
      continue
    fi
    ptxas_table "$log"
  done
fi

if [[ -s "$table" ]]; then
  echo "kernel<T, Div>: Div 0 kl, 1 reverse_kl, 2 js, 3 tvd; smem = static bytes (dynamic is sized per launch)"
  printf '%-4s %5s %8s %8s %6s %6s  %s\n' sm regs spill_st spill_ld stack smem kernel
  # demangle, drop the namespaces and the (single, struct) parameter list
  while read -r arch regs spst spld stack smem fn; do
    pretty="$(c++filt "$fn" 2>/dev/null || echo "$fn")"
    pretty="$(sed -E 's/mmfast::cuda::\(anonymous namespace\):://g; s/\(.*\)$//; s/^void //' <<<"$pretty")"
    printf '%-4s %5s %8s %8s %6s %6s  %s\n' "$arch" "$regs" "$spst" "$spld" "$stack" "$smem" "$pretty"
  done < <(sort -k7,7 -k1,1 "$table")
  spilling="$(awk '$3 > 0 || $4 > 0' "$table" | wc -l)"
  if [[ "$spilling" -gt 0 ]]; then
    echo "compile_check: $spilling kernel instantiation(s) spill registers" >&2
    [[ "$status" -eq 0 ]] && status=2
  fi
fi
# The L2 evict-first hints of the row kernels' last reads and gradient stores (common.cuh: load_word, store_word)
# must lower to cache-streaming accesses: mutual_kd.cu's PTX (a few seconds; the emulation's tests check which
# accesses ask for the hint, in routed KD too).
if "$nvcc" -ptx "$root/csrc/cuda/mutual_kd.cu" -o "$tmp/mutual_kd.ptx" -std=c++17 -O3 --use_fast_math \
    -I "$root/csrc/include" -arch=compute_90 >"$tmp/ptx.log" 2>&1; then
  loads="$(grep -c 'ld\.global\.cs\.v' "$tmp/mutual_kd.ptx" || true)"
  stores="$(grep -c 'st\.global\.cs\.v' "$tmp/mutual_kd.ptx" || true)"
  echo "evict-first vector accesses in mutual_kd.cu's PTX: $loads loads (ld.global.cs), $stores stores (st.global.cs)"
  if [[ "$loads" -eq 0 || "$stores" -eq 0 ]]; then
    echo "compile_check: mutual_kd.cu's evict-first hints did not reach the PTX" >&2
    status=1
  fi
else
  echo "compile_check: mutual_kd.cu failed to compile to PTX:" >&2
  cat "$tmp/ptx.log" >&2
  status=1
fi
[[ "$status" -eq 0 ]] && echo "compile_check: OK"
exit "$status"
