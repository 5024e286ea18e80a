// The process-wide launch settings of the CUDA row kernels: the row team and the sweep order (mmfast/kernels.h).
#include <atomic>
#include <stdexcept>

#include "mmfast/kernels.h"

namespace mmfast {
namespace {
std::atomic<int> g_row_team{kCudaRowTeamAuto};
std::atomic<int> g_sweep_order{kCudaSweepAuto};
}  // namespace

int cuda_row_team() { return g_row_team.load(std::memory_order_relaxed); }

void set_cuda_row_team(int team) {
  if (team != kCudaRowTeamAuto && team != kCudaRowTeamBlock && team != kCudaRowTeamThread &&
      team != kCudaRowTeamCluster) {
    throw std::invalid_argument("set_cuda_row_team: team must be 0 (auto), 1 (block), 2 (thread) or 3 (cluster)");
  }
  g_row_team.store(team, std::memory_order_relaxed);
}

int cuda_sweep_order() { return g_sweep_order.load(std::memory_order_relaxed); }

void set_cuda_sweep_order(int order) {
  if (order < kCudaSweepAuto || order > kCudaSweepForward) {
    throw std::invalid_argument(
        "set_cuda_sweep_order: order must be 0 (auto), 1 (back and forth, L2 hints), 2 (back and forth) or 3 "
        "(forward)");
  }
  g_sweep_order.store(order, std::memory_order_relaxed);
}

}  // namespace mmfast
