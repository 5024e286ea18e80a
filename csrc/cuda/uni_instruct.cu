// Uni-Instruct (SiD-family) generator loss on CUDA (oracle: mmfast/reference/uni_instruct.py; contract:
// UniInstructParams in params.h). Per sample row, with d = a - b, u = (a - x) - alpha d:
//   pass 1: S_abs = sum |x - a|, S_dd = sum d^2, S_du = sum d u, S_xd = sum x d
//           wf = max(S_abs / D, 1e-5), c = scale / wf, n = sqrt(S_dd) (or the given norm),
//           loss = c (ls S_du + [fgm] lf S_dd + [di] (ld n) S_xd)   (combined in double)
//   pass 2: dx = d (k c), k = -ls (+ ld n with di); da = (ls c)(u + (1 - alpha) d) [+ (2 lf c) d];
//           db = (ls c)(alpha d - u) [- (2 lf c) d]; each requested gradient written once.
// A switched-off term (fgm, di) is not evaluated. Layout (score_rows.cuh): row mode, one block per row
// and one launch, when B >= #SMs; otherwise split mode, each row over several blocks: kernel 1 writes
// per-chunk partial sums to the workspace, kernel 2 adds them in chunk order and writes the chunk's
// gradients. float64 inputs: cudaErrorNotSupported.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "mmfast/kernels.h"
#include "score_rows.cuh"

namespace mmfast {
namespace cuda {
namespace {

using namespace score;

constexpr int kSums = 4;
constexpr float kWfMin = 1e-5f;

template <typename T, bool VEC>
__device__ __forceinline__ void ui_sums(const UniInstructParams& p, int64_t r, int64_t begin, int64_t end,
                                        float (&s)[kSums]) {
  const T* __restrict__ x = static_cast<const T*>(p.x) + r * p.sx;
  const T* __restrict__ a = static_cast<const T*>(p.a) + r * p.sa;
  const T* __restrict__ b = static_cast<const T*>(p.b) + r * p.sb;
  const float alpha = static_cast<float>(p.alpha);
  for_each_group<T, VEC>(begin, end, [&](int64_t j, auto width) {
    constexpr int W = decltype(width)::value;
    float xv[W], av[W], bv[W];
    load<T, W>(x + j, xv);
    load<T, W>(a + j, av);
    load<T, W>(b + j, bv);
#pragma unroll
    for (int i = 0; i < W; ++i) {
      const float d = av[i] - bv[i];
      const float u = (av[i] - xv[i]) - alpha * d;
      s[0] += fabsf(xv[i] - av[i]);
      s[1] += d * d;
      s[2] += d * u;
      s[3] += xv[i] * d;
    }
  });
}

// Per-row coefficients of the gradients (the loss is written by thread `writer`).
struct UniCoef {
  float dx;  // (di ? ld n - ls : -ls) c
  float cs;  // ls c
  float f2;  // 2 lf c (fgm only)
};

__device__ __forceinline__ UniCoef ui_coef(const UniInstructParams& p, int64_t r, const float (&s)[kSums],
                                           bool writer) {
  const float* coef = static_cast<const float*>(p.coef) + 3 * r;
  const float ls = coef[0], lf = coef[1], ld = coef[2];
  const float mean = s[0] / static_cast<float>(p.D);  // float division: a double one is a slow-path call
  const float wf = mean != mean ? mean : fmaxf(mean, kWfMin);  // a NaN mean stays NaN (fmaxf would drop it)
  const float c = static_cast<float>(p.scale) / wf;
  float di_coef = 0.f;
  if (p.di) {
    const float n = p.di_norm != nullptr ? static_cast<const float*>(p.di_norm)[0] : sqrtf(s[1]);
    di_coef = ld * n;
  }
  if (writer) {
    double inner = static_cast<double>(ls) * s[2];
    if (p.fgm) inner += static_cast<double>(lf) * s[1];
    if (p.di) inner += static_cast<double>(di_coef) * s[3];
    static_cast<float*>(p.loss)[r] = static_cast<float>(static_cast<double>(c) * inner);
  }
  return UniCoef{(p.di ? di_coef - ls : -ls) * c, ls * c, p.fgm ? 2.f * lf * c : 0.f};
}

template <typename T, bool VEC>
__device__ __forceinline__ void ui_grad(const UniInstructParams& p, int64_t r, int64_t begin, int64_t end,
                                        const UniCoef& k) {
  if (p.dx == nullptr && p.da == nullptr && p.db == nullptr) return;
  const T* __restrict__ x = static_cast<const T*>(p.x) + r * p.sx;
  const T* __restrict__ a = static_cast<const T*>(p.a) + r * p.sa;
  const T* __restrict__ b = static_cast<const T*>(p.b) + r * p.sb;
  T* __restrict__ dx = p.dx != nullptr ? static_cast<T*>(p.dx) + r * p.D : nullptr;
  T* __restrict__ da = p.da != nullptr ? static_cast<T*>(p.da) + r * p.D : nullptr;
  T* __restrict__ db = p.db != nullptr ? static_cast<T*>(p.db) + r * p.D : nullptr;
  const bool need_x = da != nullptr || db != nullptr;
  const bool fgm = p.fgm != 0;
  const float alpha = static_cast<float>(p.alpha), one_minus_alpha = static_cast<float>(1.0 - p.alpha);
  for_each_group<T, VEC>(begin, end, [&](int64_t j, auto width) {
    constexpr int W = decltype(width)::value;
    float xv[W], av[W], bv[W], g[W];
    if (need_x) load<T, W>(x + j, xv);
    load<T, W>(a + j, av);
    load<T, W>(b + j, bv);
    if (dx != nullptr) {
#pragma unroll
      for (int i = 0; i < W; ++i) g[i] = (av[i] - bv[i]) * k.dx;
      store<T, W>(dx + j, g);
    }
    if (da != nullptr) {
#pragma unroll
      for (int i = 0; i < W; ++i) {
        const float d = av[i] - bv[i];
        const float u = (av[i] - xv[i]) - alpha * d;
        g[i] = k.cs * (u + one_minus_alpha * d);
        if (fgm) g[i] = g[i] + k.f2 * d;
      }
      store<T, W>(da + j, g);
    }
    if (db != nullptr) {
#pragma unroll
      for (int i = 0; i < W; ++i) {
        const float d = av[i] - bv[i];
        const float u = (av[i] - xv[i]) - alpha * d;
        g[i] = k.cs * (alpha * d - u);
        if (fgm) g[i] = g[i] - k.f2 * d;
      }
      store<T, W>(db + j, g);
    }
  });
}

template <typename T, bool VEC>
__global__ void __launch_bounds__(kRowThreads) uni_instruct_row_kernel(const UniInstructParams p) {
  __shared__ float red[kSums * kWarpSize];
  for (int64_t r = blockIdx.x; r < p.B; r += gridDim.x) {
    float s[kSums] = {0.f, 0.f, 0.f, 0.f};
    ui_sums<T, VEC>(p, r, 0, p.D, s);
    block_sum<kSums>(s, red);
    ui_grad<T, VEC>(p, r, 0, p.D, ui_coef(p, r, s, threadIdx.x == 0));
  }
}

template <typename T, bool VEC>
__global__ void __launch_bounds__(kSplitThreads) uni_instruct_partials_kernel(const UniInstructParams p,
                                                                              int64_t chunk) {
  __shared__ float red[kSums * kWarpSize];
  const int64_t r = blockIdx.y, c = blockIdx.x, begin = c * chunk;
  const int64_t end = begin + chunk < p.D ? begin + chunk : p.D;
  float s[kSums] = {0.f, 0.f, 0.f, 0.f};
  ui_sums<T, VEC>(p, r, begin, end, s);
  block_sum<kSums>(s, red);
  if (threadIdx.x < kSums) static_cast<float*>(p.workspace)[(r * gridDim.x + c) * kSums + threadIdx.x] = s[threadIdx.x];
}

template <typename T, bool VEC>
__global__ void __launch_bounds__(kSplitThreads) uni_instruct_finish_kernel(const UniInstructParams p,
                                                                            int64_t chunk) {
  __shared__ float red[kSums];
  const int64_t r = blockIdx.y, c = blockIdx.x, begin = c * chunk;
  const int64_t end = begin + chunk < p.D ? begin + chunk : p.D;
  float s[kSums];
  row_totals<kSums>(static_cast<const float*>(p.workspace), r, gridDim.x, s, red);
  ui_grad<T, VEC>(p, r, begin, end, ui_coef(p, r, s, c == 0 && threadIdx.x == 0));
}

template <typename T, bool VEC>
int launch(const UniInstructParams& p, cudaStream_t stream) {
  return launch_rows_or_split<kSums>(p, VEC ? kVec16<T> : 1, uni_instruct_row_kernel<T, VEC>,
                                     uni_instruct_partials_kernel<T, VEC>, uni_instruct_finish_kernel<T, VEC>, stream);
}

template <typename T>
int dispatch(const UniInstructParams& p, cudaStream_t stream) {
  const bool vec = rows_vectorizable<T>(p.D, {p.x, p.a, p.b, p.dx, p.da, p.db}, {p.sx, p.sa, p.sb});
  return vec ? launch<T, true>(p, stream) : launch<T, false>(p, stream);
}

}  // namespace
}  // namespace cuda

int uni_instruct_cuda(const UniInstructParams& p, void* stream) {
  using namespace cuda;
  if (p.B <= 0) return cudaSuccess;
  if (p.D < 0) return cudaErrorInvalidValue;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(p.dtype, [&](auto t) { return dispatch<decltype(t)>(p, s); });
}

}  // namespace mmfast
