// The process-wide choice of row team for the routed-KD and mutual-KD kernels (mmfast/kernels.h).
#include <atomic>
#include <stdexcept>

#include "mmfast/kernels.h"

namespace mmfast {
namespace {
std::atomic<int> g_row_team{kCudaRowTeamAuto};
}  // namespace

int cuda_row_team() { return g_row_team.load(std::memory_order_relaxed); }

void set_cuda_row_team(int team) {
  if (team != kCudaRowTeamAuto && team != kCudaRowTeamBlock && team != kCudaRowTeamThread &&
      team != kCudaRowTeamCluster) {
    throw std::invalid_argument("set_cuda_row_team: team must be 0 (auto), 1 (block), 2 (thread) or 3 (cluster)");
  }
  g_row_team.store(team, std::memory_order_relaxed);
}

}  // namespace mmfast
