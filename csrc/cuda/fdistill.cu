// f-distill (DMD-form) generator loss on CUDA (oracle: mmfast/reference/fdistill.py; contract:
// FDistillParams in params.h). Per sample row of D elements, with d = b - a:
//   pass 1: S_abs = sum |x - a|, S_dd = sum d^2, Z = #{d == 0}
//           m = S_abs / D, w = h / (m + 1e-6), loss = scale * 0.5 * w^2 * S_dd (in double; NaN when w is
//           inf and some d == 0, as the reference's inf * 0)
//   pass 2: dx = scale * (d * w)   (reads a and b only)
// Layout (score_rows.cuh): row mode, one block per row and one launch, when B >= #SMs; otherwise
// split mode, each row over several blocks: kernel 1 writes per-chunk partial sums to the workspace,
// kernel 2 adds them in chunk order and writes the chunk's dx. float64 inputs: cudaErrorNotSupported.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "mmfast/kernels.h"
#include "score_rows.cuh"

namespace mmfast {
namespace cuda {
namespace {

using namespace score;

constexpr int kSums = 3;
constexpr float kEps = 1e-6f;

template <typename T, bool VEC>
__device__ __forceinline__ void fd_sums(const FDistillParams& p, int64_t r, int64_t begin, int64_t end,
                                        float (&s)[kSums]) {
  const T* __restrict__ x = static_cast<const T*>(p.x) + r * p.sx;
  const T* __restrict__ a = static_cast<const T*>(p.a) + r * p.sa;
  const T* __restrict__ b = static_cast<const T*>(p.b) + r * p.sb;
  for_each_group<T, VEC>(begin, end, [&](int64_t j, auto width) {
    constexpr int W = decltype(width)::value;
    float xv[W], av[W], bv[W];
    load<T, W>(x + j, xv);
    load<T, W>(a + j, av);
    load<T, W>(b + j, bv);
#pragma unroll
    for (int i = 0; i < W; ++i) {
      const float d = bv[i] - av[i];
      s[0] += fabsf(xv[i] - av[i]);
      s[1] += d * d;
      s[2] += d == 0.f ? 1.f : 0.f;
    }
  });
}

// w, and the loss from thread `writer`.
__device__ __forceinline__ float fd_weight(const FDistillParams& p, int64_t r, const float (&s)[kSums], bool writer) {
  const float m = s[0] / static_cast<float>(p.D);  // float division: a double one is a slow-path call
  const float w = static_cast<const float*>(p.h)[r] / (m + kEps);
  if (writer) {
    const double wd = w;
    double loss = 0.5 * p.scale * (wd * wd) * static_cast<double>(s[1]);
    if (isinf(wd) && s[2] > 0.f) loss = NAN;
    static_cast<float*>(p.loss)[r] = static_cast<float>(loss);
  }
  return w;
}

template <typename T, bool VEC>
__device__ __forceinline__ void fd_grad(const FDistillParams& p, int64_t r, int64_t begin, int64_t end, float w) {
  if (p.dx == nullptr) return;
  const T* __restrict__ a = static_cast<const T*>(p.a) + r * p.sa;
  const T* __restrict__ b = static_cast<const T*>(p.b) + r * p.sb;
  T* __restrict__ dx = static_cast<T*>(p.dx) + r * p.D;
  const float scale = static_cast<float>(p.scale);
  for_each_group<T, VEC>(begin, end, [&](int64_t j, auto width) {
    constexpr int W = decltype(width)::value;
    float av[W], bv[W], g[W];
    load<T, W>(a + j, av);
    load<T, W>(b + j, bv);
#pragma unroll
    for (int i = 0; i < W; ++i) g[i] = ((bv[i] - av[i]) * w) * scale;
    store<T, W>(dx + j, g);
  });
}

template <typename T, bool VEC>
__global__ void __launch_bounds__(kRowThreads) fdistill_row_kernel(const FDistillParams p) {
  __shared__ float red[kSums * kWarpSize];
  for (int64_t r = blockIdx.x; r < p.B; r += gridDim.x) {
    float s[kSums] = {0.f, 0.f, 0.f};
    fd_sums<T, VEC>(p, r, 0, p.D, s);
    block_sum<kSums>(s, red);
    fd_grad<T, VEC>(p, r, 0, p.D, fd_weight(p, r, s, threadIdx.x == 0));
  }
}

template <typename T, bool VEC>
__global__ void __launch_bounds__(kSplitThreads) fdistill_partials_kernel(const FDistillParams p, int64_t chunk) {
  __shared__ float red[kSums * kWarpSize];
  const int64_t r = blockIdx.y, c = blockIdx.x, begin = c * chunk;
  const int64_t end = begin + chunk < p.D ? begin + chunk : p.D;
  float s[kSums] = {0.f, 0.f, 0.f};
  fd_sums<T, VEC>(p, r, begin, end, s);
  block_sum<kSums>(s, red);
  if (threadIdx.x < kSums) static_cast<float*>(p.workspace)[(r * gridDim.x + c) * kSums + threadIdx.x] = s[threadIdx.x];
}

template <typename T, bool VEC>
__global__ void __launch_bounds__(kSplitThreads) fdistill_finish_kernel(const FDistillParams p, int64_t chunk) {
  __shared__ float red[kSums];
  const int64_t r = blockIdx.y, c = blockIdx.x, begin = c * chunk;
  const int64_t end = begin + chunk < p.D ? begin + chunk : p.D;
  float s[kSums];
  row_totals<kSums>(static_cast<const float*>(p.workspace), r, gridDim.x, s, red);
  fd_grad<T, VEC>(p, r, begin, end, fd_weight(p, r, s, c == 0 && threadIdx.x == 0));
}

template <typename T, bool VEC>
int launch(const FDistillParams& p, cudaStream_t stream) {
  return launch_rows_or_split<kSums>(p, VEC ? kVec16<T> : 1, fdistill_row_kernel<T, VEC>,
                                     fdistill_partials_kernel<T, VEC>, fdistill_finish_kernel<T, VEC>, stream);
}

template <typename T>
int dispatch(const FDistillParams& p, cudaStream_t stream) {
  const bool vec = rows_vectorizable<T>(p.D, {p.x, p.a, p.b, p.dx}, {p.sx, p.sa, p.sb});
  return vec ? launch<T, true>(p, stream) : launch<T, false>(p, stream);
}

}  // namespace
}  // namespace cuda

int fdistill_cuda(const FDistillParams& p, void* stream) {
  using namespace cuda;
  if (p.B <= 0) return cudaSuccess;
  if (p.D < 0) return cudaErrorInvalidValue;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(p.dtype, [&](auto t) { return dispatch<decltype(t)>(p, s); });
}

}  // namespace mmfast
