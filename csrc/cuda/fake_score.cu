// Fake-score (EDM-weighted denoising) loss on CUDA (oracle: mmfast/reference/fake_score.py; contract:
// FakeScoreParams in params.h). Per sample row, with e = b - x:
//   loss = scale * lam * sum e^2,   db = e * (lam * 2 scale)
// One pass over the data: db does not need the row sum, so each element is read once and db written in
// the same loop that sums e^2. Layout (score_rows.cuh): row mode, one block per row and one launch, when
// B >= #SMs; otherwise split mode: kernel 1 (a block per chunk of a row) writes db and the chunk's
// partial sum to the workspace, kernel 2 (a thread per row) adds the partials in chunk order into the
// loss. float64 inputs: cudaErrorNotSupported.
#include <cuda_runtime.h>

#include <cstdint>

#include "mmfast/kernels.h"
#include "score_rows.cuh"

namespace mmfast {
namespace cuda {
namespace {

using namespace score;

// This thread's sum of e^2 over [begin, end); writes db there when requested.
template <typename T, bool VEC>
__device__ __forceinline__ float fs_pass(const FakeScoreParams& p, int64_t r, int64_t begin, int64_t end) {
  const T* __restrict__ b = static_cast<const T*>(p.b) + r * p.sb;
  const T* __restrict__ x = static_cast<const T*>(p.x) + r * p.sx;
  T* __restrict__ db = p.db != nullptr ? static_cast<T*>(p.db) + r * p.D : nullptr;
  const float k = static_cast<const float*>(p.lam)[r] * static_cast<float>(2.0 * p.scale);
  float sum = 0.f;
  for_each_group<T, VEC>(begin, end, [&](int64_t j, auto width) {
    constexpr int W = decltype(width)::value;
    float bv[W], xv[W], g[W];
    load<T, W>(b + j, bv);
    load<T, W>(x + j, xv);
#pragma unroll
    for (int i = 0; i < W; ++i) {
      const float e = bv[i] - xv[i];
      sum += e * e;
      g[i] = e * k;
    }
    if (db != nullptr) store<T, W>(db + j, g);
  });
  return sum;
}

__device__ __forceinline__ void fs_loss(const FakeScoreParams& p, int64_t r, float sum) {
  const double lam = static_cast<const float*>(p.lam)[r];
  static_cast<float*>(p.loss)[r] = static_cast<float>(lam * static_cast<double>(sum) * p.scale);
}

template <typename T, bool VEC>
__global__ void __launch_bounds__(kRowThreads) fake_score_row_kernel(const FakeScoreParams p) {
  __shared__ float red[kWarpSize];
  for (int64_t r = blockIdx.x; r < p.B; r += gridDim.x) {
    float s[1] = {fs_pass<T, VEC>(p, r, 0, p.D)};
    block_sum<1>(s, red);
    if (threadIdx.x == 0) fs_loss(p, r, s[0]);
  }
}

template <typename T, bool VEC>
__global__ void __launch_bounds__(kSplitThreads) fake_score_chunk_kernel(const FakeScoreParams p, int64_t chunk) {
  __shared__ float red[kWarpSize];
  const int64_t r = blockIdx.y, c = blockIdx.x, begin = c * chunk;
  const int64_t end = begin + chunk < p.D ? begin + chunk : p.D;
  float s[1] = {fs_pass<T, VEC>(p, r, begin, end)};
  block_sum<1>(s, red);
  if (threadIdx.x == 0) static_cast<float*>(p.workspace)[r * gridDim.x + c] = s[0];
}

__global__ void fake_score_loss_kernel(const FakeScoreParams p, int64_t nsplit) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= p.B) return;
  const float* ws = static_cast<const float*>(p.workspace) + r * nsplit;
  float sum = 0.f;
  for (int64_t c = 0; c < nsplit; ++c) sum += ws[c];
  fs_loss(p, r, sum);
}

template <typename T, bool VEC>
int launch(const FakeScoreParams& p, cudaStream_t stream) {
  const SplitPlan plan = split_plan(p.B, p.D, 1, p.workspace == nullptr ? 0 : p.workspace_floats);
  if (plan.nsplit == 1) {
    const int nt = row_threads(p.D, VEC ? kVec16<T> : 1);
    fake_score_row_kernel<T, VEC><<<grid_rows(p.B), nt, 0, stream>>>(p);
    return cudaGetLastError();
  }
  const dim3 grid(static_cast<unsigned>(plan.nsplit), static_cast<unsigned>(p.B));
  fake_score_chunk_kernel<T, VEC><<<grid, kSplitThreads, 0, stream>>>(p, plan.chunk);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const unsigned blocks = static_cast<unsigned>((p.B + kSplitThreads - 1) / kSplitThreads);
  fake_score_loss_kernel<<<blocks, kSplitThreads, 0, stream>>>(p, plan.nsplit);
  return cudaGetLastError();
}

template <typename T>
int dispatch(const FakeScoreParams& p, cudaStream_t stream) {
  const bool vec = rows_vectorizable<T>(p.D, {p.b, p.x, p.db}, {p.sb, p.sx});
  return vec ? launch<T, true>(p, stream) : launch<T, false>(p, stream);
}

}  // namespace
}  // namespace cuda

int fake_score_cuda(const FakeScoreParams& p, void* stream) {
  using namespace cuda;
  if (p.B <= 0) return cudaSuccess;
  if (p.D < 0) return cudaErrorInvalidValue;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(p.dtype, [&](auto t) { return dispatch<decltype(t)>(p, s); });
}

}  // namespace mmfast
