// The threshold above which the CPU kernels write large outputs with streaming stores
// (streaming_stores.h).
#include "streaming_stores.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <fstream>
#include <string>

#include "mmfast/kernels.h"

namespace mmfast {
namespace {

// -1: the default (cpu_streaming_min_bytes)
std::atomic<int64_t> g_streaming_min_bytes{-1};
// -1: no cap on the ISA level of the with_isa kernels
std::atomic<int> g_isa_level_cap{-1};

// The largest cache cpu0 reports in sysfs (its own instance: sysconf's L3 size is the whole
// package's on some virtual machines, 10x what one core can use); sysconf where sysfs is absent.
int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    int64_t largest = 0;
    for (int index = 0; index < 8; ++index) {
      const std::string path = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/size";
      std::ifstream file(path);
      long long value = 0;
      std::string unit;
      if (!(file >> value)) continue;
      file >> unit;  // "K" or "M" (the number and its unit may be one token: "32768K")
      const int64_t scale = unit == "M" ? int64_t{1} << 20 : unit == "K" ? int64_t{1} << 10 : 1;
      largest = std::max<int64_t>(largest, value * scale);
    }
#ifdef _SC_LEVEL3_CACHE_SIZE
    if (largest <= 0) largest = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
    return largest > 0 ? largest : int64_t{32} << 20;  // 32 MiB when the system does not say
  }();
  return bytes;
}

}  // namespace

// The default threshold is capped: a socket's shared last-level cache (what a virtual machine or a
// many-core server reports: 480 MiB on this project's Intel Xeon host) is not what a few threads can
// keep their outputs in. There, with 2 threads, a step with streaming stores took as long as with plain
// ones (plain / streaming 0.97-1.01) for calls moving 12-48 MiB (save one run's 1.28 for the 48 MiB
// reconstruction, 1.01 in the next), 1.03-1.04x less at 72 MiB and 1.25-1.40x less at 96 MiB
// (benchmarks/streaming_threshold.py, benchmarks/results/cpu-2026-11-29-streaming/).
// On an AMD EPYC the reported cache (one CCX's 32 MiB) is below the cap.
constexpr int64_t kMaxStreamingMinBytes = int64_t{64} << 20;

int64_t cpu_streaming_min_bytes() {
  const int64_t v = g_streaming_min_bytes.load(std::memory_order_relaxed);
  return v < 0 ? std::min(last_level_cache_bytes(), kMaxStreamingMinBytes) : v;
}

void set_cpu_streaming_min_bytes(int64_t bytes) { g_streaming_min_bytes.store(bytes < 0 ? -1 : bytes); }

int cpu_isa_level() {
#ifdef MMFAST_ISA_DISPATCH
  return cpu::isa_level();
#else
  return 0;
#endif
}
void set_cpu_isa_level(int level) { g_isa_level_cap.store(level < 0 ? -1 : level, std::memory_order_relaxed); }

namespace cpu {

#ifdef MMFAST_ISA_DISPATCH
int isa_level() {
  static const int level = __builtin_cpu_supports("x86-64-v4") ? 4 : __builtin_cpu_supports("x86-64-v3") ? 3 : 0;
  const int cap = g_isa_level_cap.load(std::memory_order_relaxed);
  return cap < 0 ? level : std::min(level, cap < 3 ? 0 : cap);
}
#endif

bool streaming_worthwhile(int64_t bytes) {
#ifdef MMFAST_STREAMING_STORES
  return bytes > cpu_streaming_min_bytes();
#else
  (void)bytes;
  return false;
#endif
}

}  // namespace cpu
}  // namespace mmfast
