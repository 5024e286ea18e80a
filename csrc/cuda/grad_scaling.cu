// In-place scaling of a forward-written gradient by the incoming gradient, skipping the blocks whose
// factors are all exactly 1 (contract: GradScaleParams in params.h; caller: mmfast/ops/_grad_scaling.py).
//
// The forward kernels write d loss / d input already scaled for `loss.backward()` on a mean or sum, so
// the incoming factor is usually all ones. Each block reads the factors of its elements (a few cached
// bytes) and returns at once when all are 1: the gradient is neither read nor written, with no host
// synchronisation (CUDA-graph capturable). A NaN factor is not 1: it reaches the gradient.
// Grid: x = the (repeat, row) pairs, y = blocks of kScaleBlock elements of a row's D * Q.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "common.cuh"
#include "mmfast/kernels.h"

namespace mmfast {
namespace cuda {
namespace {

constexpr int kScaleThreads = 256;
constexpr int64_t kScaleBlock = 4096;
constexpr int64_t kMaxGridY = 65535;

template <typename T>
__global__ void __launch_bounds__(kScaleThreads) scale_unless_one_kernel(const GradScaleParams p) {
  const int64_t inner = p.D * p.Q;
  const int64_t pair = blockIdx.x;
  const float* __restrict__ f = static_cast<const float*>(p.factor) + (pair % p.rows) * p.Q;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * kScaleBlock;
  const int64_t end = begin + kScaleBlock < inner ? begin + kScaleBlock : inner;
  int differs = 0;
  if (p.Q == 1) {
    differs = !(f[0] == 1.f);
  } else {
    for (int64_t i = begin + threadIdx.x; i < end; i += kScaleThreads) differs |= !(f[i % p.Q] == 1.f);
  }
  if (!__syncthreads_or(differs)) return;
  T* __restrict__ g = static_cast<T*>(p.grad) + pair * inner;
  for (int64_t i = begin + threadIdx.x; i < end; i += kScaleThreads) {
    g[i] = from_float<T>(to_float(g[i]) * f[p.Q == 1 ? 0 : i % p.Q]);
  }
}

}  // namespace
}  // namespace cuda

int scale_unless_one_cuda(const GradScaleParams& p, void* stream) {
  using namespace cuda;
  const int64_t pairs = p.repeat * p.rows, inner = p.D * p.Q;
  if (pairs < 0 || inner < 0 || p.rows <= 0 || p.Q <= 0) return cudaErrorInvalidValue;
  if (pairs == 0 || inner == 0) return cudaSuccess;
  const int64_t blocks_y = (inner + kScaleBlock - 1) / kScaleBlock;
  if (pairs > INT_MAX || blocks_y > kMaxGridY) return cudaErrorInvalidValue;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const dim3 grid(static_cast<unsigned>(pairs), static_cast<unsigned>(blocks_y));
  return dispatch_dtype(p.dtype, [&](auto t) {
    scale_unless_one_kernel<decltype(t)><<<grid, kScaleThreads, 0, s>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace mmfast
