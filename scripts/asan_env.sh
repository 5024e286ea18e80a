# Sourced by scripts/cuda_emu_asan.sh and scripts/cpu_asan.sh: $cxx (the C++ compiler), $asan_preload (what
# LD_PRELOAD must hold for python to load a module built with -fsanitize=address) and ASAN_OPTIONS; exits 0
# with a message when the compiler has no AddressSanitizer runtime (nothing to check).
cxx=${CXX:-c++}
asan_runtime=$($cxx -print-file-name=libasan.so)
if [[ $asan_runtime != /* ]]; then
  echo "no AddressSanitizer runtime for $cxx: skipped"
  exit 0
fi
# libstdc++ preloaded too: ASan's exception interceptor needs it resolved before the extension modules load
asan_preload="$asan_runtime $($cxx -print-file-name=libstdc++.so)"
export ASAN_OPTIONS=detect_leaks=0:detect_stack_use_after_return=0:abort_on_error=0
