// The bound on the classes of a row below which the CPU kernels work in row tiles (row_tiles.h).
#include "row_tiles.h"

#include <atomic>

#include "mmfast/kernels.h"

namespace mmfast {
namespace {

// -1: each kernel's own bound (tile_rows)
std::atomic<int64_t> g_tile_max_classes{-1};

}  // namespace

int64_t cpu_row_tile_max_classes() { return g_tile_max_classes.load(std::memory_order_relaxed); }
void set_cpu_row_tile_max_classes(int64_t classes) {
  g_tile_max_classes.store(classes < 0 ? -1 : classes, std::memory_order_relaxed);
}

namespace cpu {
bool tile_rows(int64_t C, int64_t default_max_classes) {
  const int64_t bound = cpu_row_tile_max_classes();
  return C <= (bound < 0 ? default_max_classes : bound);
}
}  // namespace cpu

}  // namespace mmfast
