// Shared pieces of the score-distillation CUDA kernels (fdistill.cu, uni_instruct.cu, fake_score.cu):
// 16-byte vector loads/stores of a row, the per-thread element loop, a deterministic block-wide sum
// and the row-splitting plan.
//
// Layout. Every op is "per-sample sums over a row (pass 1), then an elementwise pass that needs them
// (pass 2)" (fake_score: one pass, the gradient does not need the sum).
// - Row mode (B >= the number of SMs, so the rows fill the GPU): one block per row (grid-stride over
//   rows), pass 1, a block-wide reduction, pass 2 over the same row by the same block right after, so
//   the re-read of the row mostly hits L2. One launch.
// - Split mode (fewer rows than SMs, e.g. B = 32 with D = 65536): each row is cut into `nsplit` chunks,
//   one block per (chunk, row). Kernel 1 writes each chunk's partial sums to a small workspace
//   [B, nsplit, K] (float32, passed in by the caller); kernel 2, on the same grid, adds the row's
//   partials in chunk order (deterministic; every block of the row does this tiny sum itself) and runs
//   pass 2 over its chunk. Two launches, no atomics, no counters to reset, graph-capturable; the data
//   is still read at most twice. fake_score's kernel 2 only reduces the partials into the loss.
// Vector accesses: when every row pointer is 16-byte aligned (base pointers aligned, row strides and D
// multiples of the vector width), each thread moves 16 bytes at a time (4 floats or 8 halves); chunk
// boundaries are multiples of 1024 elements, so chunks keep the alignment. Otherwise every access is a
// coalesced scalar one. Math and sums in float32; per-row combinations of the sums in double.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common.cuh"

namespace mmfast {
namespace cuda {
namespace score {

constexpr int kSplitThreads = 256;  // block size of split mode
constexpr int kRowThreads = 512;    // largest block of row mode
constexpr int64_t kTargetBlocks = 1024;
constexpr int64_t kMinChunk = 4096;  // elements per block at least, in split mode
constexpr int64_t kMaxSplit = 64;
constexpr int64_t kChunkAlign = 1024;  // chunk lengths are multiples of this (and of every vector width)

template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

template <int W>
using Width = std::integral_constant<int, W>;

// W elements at p as floats: one 16-byte load when W is the vector width, else W scalar loads.
template <typename T, int W>
__device__ __forceinline__ void load(const T* __restrict__ p, float (&v)[W]) {
  if constexpr (W == kVec16<T>) {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
    if constexpr (sizeof(T) == 4) {
      v[0] = __uint_as_float(u.x);
      v[1] = __uint_as_float(u.y);
      v[2] = __uint_as_float(u.z);
      v[3] = __uint_as_float(u.w);
    } else {
      const uint32_t words[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 f = unpack2<T>(words[i]);
        v[2 * i] = f.x;
        v[2 * i + 1] = f.y;
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < W; ++i) v[i] = to_float(p[i]);
  }
}

template <typename T, int W>
__device__ __forceinline__ void store(T* __restrict__ p, const float (&v)[W]) {
  if constexpr (W == kVec16<T>) {
    uint4 u;
    if constexpr (sizeof(T) == 4) {
      u = make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3]));
    } else {
      u = make_uint4(pack2<T>(v[0], v[1]), pack2<T>(v[2], v[3]), pack2<T>(v[4], v[5]), pack2<T>(v[6], v[7]));
    }
    *reinterpret_cast<uint4*>(p) = u;
  } else {
#pragma unroll
    for (int i = 0; i < W; ++i) p[i] = from_float<T>(v[i]);
  }
}

// Calls fn(j, Width<W>{}) for this thread's groups of W consecutive elements [j, j + W) of [begin, end):
// vector groups while they fit (begin must then be a multiple of the vector width), single elements for
// the tail. Neighbouring threads take neighbouring groups (coalesced).
template <typename T, bool VEC, typename Fn>
__device__ __forceinline__ void for_each_group(int64_t begin, int64_t end, Fn&& fn) {
  const int64_t nt = blockDim.x;
  int64_t tail = begin;
  if constexpr (VEC) {
    constexpr int V = kVec16<T>;
    const int64_t vec_end = begin + (end - begin) / V * V;
    for (int64_t j = begin + threadIdx.x * V; j < vec_end; j += nt * V) fn(j, Width<V>{});
    tail = vec_end;
  }
  for (int64_t j = tail + threadIdx.x; j < end; j += nt) fn(j, Width<1>{});
}

// Block-wide sums of K per-thread values, returned to every thread; a fixed order (deterministic).
// `red` holds K * 32 floats of shared memory; every thread of the block must call.
template <int K>
__device__ __forceinline__ void block_sum(float (&v)[K], float* red) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int nwarps = (blockDim.x + kWarpSize - 1) / kWarpSize;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    v[k] = warp_sum(v[k]);
    if (lane == 0) red[k * kWarpSize + warp] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    float acc = 0.f;
    for (int w = 0; w < nwarps; ++w) acc += red[k * kWarpSize + w];
    v[k] = acc;
  }
  __syncthreads();  // `red` may be reused
}

// The row's totals in split mode: the partials of its nsplit chunks added in chunk order, in every
// thread of the block. `red` holds K floats of shared memory.
template <int K>
__device__ __forceinline__ void row_totals(const float* __restrict__ ws, int64_t row, int64_t nsplit, float (&v)[K],
                                           float* red) {
  if (threadIdx.x < K) {
    float acc = 0.f;
    for (int64_t c = 0; c < nsplit; ++c) acc += ws[(row * nsplit + c) * K + threadIdx.x];
    red[threadIdx.x] = acc;
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = red[k];
}

struct SplitPlan {
  int64_t nsplit;  // chunks per row; 1: row mode
  int64_t chunk;   // elements per chunk
};

// Row mode when the rows fill the GPU or are short; otherwise about kTargetBlocks blocks of at least
// kMinChunk elements (and never a workspace larger than the one given).
inline SplitPlan split_plan(int64_t B, int64_t D, int K, int64_t workspace_floats) {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    sms = 1;  // row mode
  }
  const SplitPlan row_mode{1, D};
  if (B >= sms) return row_mode;
  int64_t n = (kTargetBlocks + B - 1) / B;
  n = n < kMaxSplit ? n : kMaxSplit;
  const int64_t longest = D / kMinChunk;
  n = n < longest ? n : longest;
  if (n <= 1) return row_mode;
  const int64_t chunk = ((D + n - 1) / n + kChunkAlign - 1) / kChunkAlign * kChunkAlign;
  n = (D + chunk - 1) / chunk;
  if (n <= 1 || B * n * K > workspace_floats) return row_mode;
  return {n, chunk};
}

// Threads of a row-mode block: about one vector group per thread, a warp at least, kRowThreads at most.
inline int row_threads(int64_t D, int width) {
  const int64_t groups = (D + width - 1) / width;
  int64_t nt = (groups + kWarpSize - 1) / kWarpSize * kWarpSize;
  nt = nt < kWarpSize ? kWarpSize : (nt > kRowThreads ? kRowThreads : nt);
  return static_cast<int>(nt);
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Vector accesses are safe when every row of every tensor starts on a 16-byte boundary.
template <typename T>
inline bool rows_vectorizable(int64_t D, std::initializer_list<const void*> ptrs,
                              std::initializer_list<int64_t> strides) {
  constexpr int V = kVec16<T>;
  if (D % V != 0) return false;  // gradients are contiguous [B, D]
  for (const void* p : ptrs) {
    if (p != nullptr && !aligned16(p)) return false;
  }
  for (int64_t s : strides) {
    if (s % V != 0) return false;
  }
  return true;
}

inline unsigned grid_rows(int64_t B) { return static_cast<unsigned>(B < kMaxBlocks ? B : kMaxBlocks); }

// The launch of a loss with K per-row sums: one block per row (`row`, row_threads(D, width) threads) when
// split_plan keeps rows whole, else `partials` then `finish` over the grid (chunks, rows), which reduce the
// rows' sums through the workspace.
template <int K, typename P>
int launch_rows_or_split(const P& p, int width, void (*row)(const P), void (*partials)(const P, int64_t),
                         void (*finish)(const P, int64_t), cudaStream_t stream) {
  const SplitPlan plan = split_plan(p.B, p.D, K, p.workspace == nullptr ? 0 : p.workspace_floats);
  if (plan.nsplit == 1) {
    row<<<grid_rows(p.B), row_threads(p.D, width), 0, stream>>>(p);
    return cudaGetLastError();
  }
  const dim3 grid(static_cast<unsigned>(plan.nsplit), static_cast<unsigned>(p.B));
  partials<<<grid, kSplitThreads, 0, stream>>>(p, plan.chunk);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  finish<<<grid, kSplitThreads, 0, stream>>>(p, plan.chunk);
  return cudaGetLastError();
}

}  // namespace score
}  // namespace cuda
}  // namespace mmfast
