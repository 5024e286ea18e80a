// The bound on the classes of a row below which the CPU kernels work in row tiles (row_tiles.h).
#include "row_tiles.h"

#include <atomic>

#include "mmfast/kernels.h"

namespace mmfast {
namespace {

// Measured on an AVX-512 EPYC (one thread, fp32, routed KD with E = 2): tiles are 6x faster than
// rows at C = 8, 1.2-1.5x at C = 48..64, even at C = 96 and slower from C = 128 on.
constexpr int64_t kDefaultTileMaxClasses = 63;
std::atomic<int64_t> g_tile_max_classes{kDefaultTileMaxClasses};

}  // namespace

int64_t cpu_row_tile_max_classes() { return g_tile_max_classes.load(std::memory_order_relaxed); }
void set_cpu_row_tile_max_classes(int64_t classes) {
  g_tile_max_classes.store(classes < 0 ? kDefaultTileMaxClasses : classes, std::memory_order_relaxed);
}

namespace cpu {
bool tile_rows(int64_t C) { return C <= cpu_row_tile_max_classes(); }
}  // namespace cpu

}  // namespace mmfast
