# Sourced by scripts/cuda_emu_asan.sh and scripts/cpu_asan.sh: $cxx (the C++ compiler), $asan_preload (what
# LD_PRELOAD must hold for python to load a module built with -fsanitize=address), ASAN_OPTIONS and
# expect_asan_report; exits 0 with a message when the compiler has no AddressSanitizer runtime (nothing to check).
cxx=${CXX:-c++}
asan_runtime=$($cxx -print-file-name=libasan.so)
if [[ $asan_runtime != /* ]]; then
  echo "no AddressSanitizer runtime for $cxx: skipped"
  exit 0
fi
# libstdc++ preloaded too: ASan's exception interceptor needs it resolved before the extension modules load
asan_preload="$asan_runtime $($cxx -print-file-name=libstdc++.so)"
export ASAN_OPTIONS=detect_leaks=0:detect_stack_use_after_return=0:abort_on_error=0

# expect_asan_report WHAT PATTERN...: the python code on stdin ($PYTHON or python, with LD_PRELOAD set) must stop
# with an AddressSanitizer report holding every PATTERN: the check that the sanitizer sees the kernels at all.
expect_asan_report() {
  local what=$1 report pattern
  shift
  if report=$("${PYTHON:-python}" - 2>&1); then
    echo "$what ran without a report: AddressSanitizer does not see the kernels"
    return 1
  fi
  for pattern in "$@"; do
    if ! grep -q -- "$pattern" <<<"$report"; then
      echo "$what failed without the expected report (no '$pattern'):"
      echo "$report" | tail -30
      return 1
    fi
  done
  echo "$what was reported"
}
