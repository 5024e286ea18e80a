// Device helpers shared by the CUDA kernels: element conversion, vector chunk loads/stores,
// online log-sum-exp in base 2 and block-wide column reductions.
//
// Row model: a team owns one row of C classes at a time: the whole thread block (BlockTeam, every
// kernel's default) or, in the routed-KD, mutual-KD and masked-reconstruction kernels, one thread
// (ThreadTeam: rows of few classes, and class-strided rows of dense logits, whose neighbouring rows
// are neighbours in memory so that a warp's 32 rows load as one coalesced access); a few long rows
// of routed or mutual KD are cut into pieces, a block each (PieceTeam, split mode below). The row
// is cut into chunks of kVec
// consecutive classes (kChunkBytes bytes); member t of a team of n handles chunks t, t + n, ... in
// every pass, so a thread always touches the same classes of a row and read-modify-writes of one
// row need no synchronisation. When every row pointer of a row has unit
// class stride and the same address modulo kChunkBytes, chunk j covers classes
// [j * kVec - shift, (j + 1) * kVec - shift) with shift = (address % kChunkBytes) / sizeof(T):
// interior chunks are aligned vector accesses and only the two edge chunks are element-wise.
// Otherwise (a strided class_dim=1 row, or rows of different alignment) every access is a scalar
// strided one with shift = 0: correct, not coalesced.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "mmfast/kernels.h"
#include "mmfast/params.h"

namespace mmfast {
namespace cuda {

// The entry points' dtype switch: fn(T{}) with T the element type of the dtype code (float32,
// bfloat16, float16); float64 is not served by the cuda backend.
template <typename Fn>
int dispatch_dtype(int32_t dtype, Fn&& fn) {
  switch (dtype) {
    case kFloat32: return static_cast<int>(fn(float{}));
    case kBFloat16: return static_cast<int>(fn(__nv_bfloat16{}));
    case kFloat16: return static_cast<int>(fn(__half{}));
    case kFloat64: return static_cast<int>(cudaErrorNotSupported);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 512;
// Two blocks of kMaxThreads per SM: caps the kernels at 64 registers. (Without a cap ptxas settles
// at 64 registers anyway and spills a few bytes in the larger instantiations; with it, it does not.)
constexpr int kMinBlocksPerSM = 2;
// Grid-stride loops over rows: no grid-dimension limit is ever reached.
constexpr int64_t kMaxBlocks = int64_t{1} << 20;
// Dynamic shared memory available without an opt-in attribute.
constexpr size_t kDefaultSmemBytes = 48 * 1024;

// Classes per chunk: a 16-byte access for float, an 8-byte one for bf16/fp16. Eight-wide 16-bit
// chunks double the per-class arrays that stay live across the teacher loop and push the kernels
// past 64 registers (spills, or a quarter of the threads per SM); four classes per access keep
// every kernel within 64 registers while a warp still reads 256 contiguous bytes per access.
template <typename T>
constexpr int kVec = 4;
template <typename T>
constexpr int kChunkBytes = kVec<T> * static_cast<int>(sizeof(T));

// The vector word of one chunk.
template <typename T>
using ChunkWord = std::conditional_t<sizeof(T) == 4, uint4, uint2>;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}

// Two 16-bit floats <-> one 32-bit word, in registers (no address is taken).
template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t word) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {  // bf16 is the top half of an fp32
    return make_float2(__uint_as_float(word << 16), __uint_as_float(word & 0xffff0000u));
  } else {
    return make_float2(__half2float(__ushort_as_half(static_cast<unsigned short>(word & 0xffffu))),
                       __half2float(__ushort_as_half(static_cast<unsigned short>(word >> 16))));
  }
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return static_cast<uint32_t>(__bfloat16_as_ushort(h.x)) |
           (static_cast<uint32_t>(__bfloat16_as_ushort(h.y)) << 16);
  } else {
    const __half2 h = __floats2half2_rn(lo, hi);
    return static_cast<uint32_t>(__half_as_ushort(__low2half(h))) |
           (static_cast<uint32_t>(__half_as_ushort(__high2half(h))) << 16);
  }
}

// One chunk word <-> kVec<T> floats.
template <typename T>
__device__ __forceinline__ void unpack(const ChunkWord<T>& u, float (&out)[kVec<T>]) {
  if constexpr (sizeof(T) == 4) {
    out[0] = __uint_as_float(u.x);
    out[1] = __uint_as_float(u.y);
    out[2] = __uint_as_float(u.z);
    out[3] = __uint_as_float(u.w);
  } else {
    const float2 lo = unpack2<T>(u.x), hi = unpack2<T>(u.y);
    out[0] = lo.x;
    out[1] = lo.y;
    out[2] = hi.x;
    out[3] = hi.y;
  }
}

template <typename T>
__device__ __forceinline__ ChunkWord<T> pack(const float (&v)[kVec<T>]) {
  if constexpr (sizeof(T) == 4) {
    return make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]),
                      __float_as_uint(v[3]));
  } else {
    return make_uint2(pack2<T>(v[0], v[1]), pack2<T>(v[2], v[3]));
  }
}

// Class indices within a row are 32-bit (the launchers refuse C > kMaxClasses); element offsets
// (index * stride) and row offsets are 64-bit.
constexpr int64_t kMaxClasses = (int64_t{1} << 31) - 64;

// How one row is cut into chunks (see the file comment).
struct RowChunks {
  int C;            // classes
  int shift;        // classes before the first aligned chunk boundary (0 when !vec)
  int nchunks;      // chunks covering [0, C)
  bool vec;         // interior chunks are aligned vector accesses
};

template <typename T>
__device__ __forceinline__ RowChunks make_chunks(int C, bool vec, uintptr_t residue) {
  const int shift = vec ? static_cast<int>(residue / sizeof(T)) : 0;
  return RowChunks{C, shift, (C + shift + kVec<T> - 1) / kVec<T>, vec};
}

__device__ __forceinline__ bool in_row(int c, int C) { return c >= 0 && c < C; }

// The L2 evict-first hint (RowSweep below): vector words are loaded with __ldcs and stored with __stcs
// (ld.global.cs / st.global.cs, cache-streaming: their lines are the first the L1 and L2 give up); element-wise
// accesses never take it. The plain path unpacks the word where it lies, as before the hints (returning a copy of
// the word cost the cluster kernels up to 28 registers at sm_90).

// Unpacks the vector word at `p` (`evict_first`: loaded with the hint).
template <typename T>
__device__ __forceinline__ void load_word(const ChunkWord<T>* p, bool evict_first, float (&out)[kVec<T>]) {
  if (evict_first) {
    unpack<T>(__ldcs(p), out);
  } else {
    unpack<T>(*p, out);
  }
}

// Stores the vector word `v` at `p` (`evict_first`: with the hint).
template <typename T>
__device__ __forceinline__ void store_word(ChunkWord<T>* p, const ChunkWord<T>& v, bool evict_first) {
  if (evict_first) {
    __stcs(p, v);
  } else {
    *p = v;
  }
}

// Loads classes [c0, c0 + kVec) of a row as floats; classes outside [0, C) read `fill`. `evict_first`:
// vector words with the evict-first hint.
template <typename T>
__device__ __forceinline__ void load_chunk(const T* __restrict__ row, int64_t stride, int c0,
                                           const RowChunks& rc, float fill,
                                           float (&out)[kVec<T>], bool evict_first = false) {
  constexpr int V = kVec<T>;
  if (rc.vec && c0 >= 0 && c0 + V <= rc.C) {
    load_word<T>(reinterpret_cast<const ChunkWord<T>*>(row + c0), evict_first, out);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const int c = c0 + i;
      out[i] = in_row(c, rc.C) ? to_float(row[static_cast<int64_t>(c) * stride]) : fill;
    }
  }
}

// Stores classes [c0, c0 + kVec) of a row (classes outside [0, C) are skipped). kAdd: row += v.
// `evict_first`: vector words with the evict-first hint.
template <typename T, bool kAdd = false>
__device__ __forceinline__ void store_chunk(T* __restrict__ row, int64_t stride, int c0,
                                            const RowChunks& rc, const float (&v)[kVec<T>],
                                            bool evict_first = false) {
  constexpr int V = kVec<T>;
  if (rc.vec && c0 >= 0 && c0 + V <= rc.C) {
    ChunkWord<T>* dst = reinterpret_cast<ChunkWord<T>*>(row + c0);
    if constexpr (kAdd) {
      float old[V];
      load_word<T>(dst, evict_first, old);
      float sum[V];
#pragma unroll
      for (int i = 0; i < V; ++i) sum[i] = old[i] + v[i];
      store_word<T>(dst, pack<T>(sum), evict_first);
    } else {
      store_word<T>(dst, pack<T>(v), evict_first);
    }
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const int c = c0 + i;
      if (in_row(c, rc.C)) {
        T* dst = row + static_cast<int64_t>(c) * stride;
        *dst = from_float<T>(kAdd ? to_float(*dst) + v[i] : v[i]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Teams: who works on one row
// ---------------------------------------------------------------------------------------------

// Thread-team launches: this many threads (rows) per block, fewer when the rows' tables would pass
// the default shared memory.
constexpr int kThreadTeamThreads = 128;

// One row per block: the block's threads split the row's chunks and meet at block barriers.
// kLaunchThreads / kLaunchMinBlocks: the kernels' __launch_bounds__ (a 64-register cap).
struct BlockTeam {
  static constexpr bool kPerThread = false;
  static constexpr bool kPieces = false;  // a team of a piece of a row (split mode, below)
  static constexpr bool kCluster = false;  // the pieces of a row are a thread-block cluster (cluster mode, below)
  static constexpr int kLaunchThreads = kMaxThreads, kLaunchMinBlocks = kMinBlocksPerSM;
  __device__ static int lane() { return static_cast<int>(threadIdx.x); }
  __device__ static int size() { return static_cast<int>(blockDim.x); }
  __device__ static bool leader() { return threadIdx.x == 0; }
  __device__ static void sync() { __syncthreads(); }
  __device__ static int any(int v) { return __syncthreads_or(v); }
  __device__ static int64_t first_row() { return blockIdx.x; }
  __device__ static int64_t row_stride() { return gridDim.x; }
};

// One row per thread: no barriers, no shuffles; per-row tables are per thread. Blocks of at most
// kThreadTeamThreads, six per SM (an 80-register cap: a 64-register one spilled the logits mix at
// sm_90; more blocks would not fit the shared memory of 4 teachers' tables anyway).
struct ThreadTeam {
  static constexpr bool kPerThread = true;
  static constexpr bool kPieces = false;
  static constexpr bool kCluster = false;
  static constexpr int kLaunchThreads = kThreadTeamThreads, kLaunchMinBlocks = 6;
  __device__ static int lane() { return 0; }
  __device__ static int size() { return 1; }
  __device__ static bool leader() { return true; }
  __device__ static void sync() {}
  __device__ static int any(int v) { return v; }
  __device__ static int64_t first_row() { return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; }
  __device__ static int64_t row_stride() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }
};

// A team's table in shared memory, indexed as if the team had it alone: one copy per block for a
// BlockTeam; one copy per thread for a ThreadTeam, interleaved (entry i of thread t at
// i * blockDim.x + t) so that a warp reading the same entry touches 32 consecutive words.
template <typename V, typename Team>
struct TeamArray {
  V* base;
  __device__ __forceinline__ V& operator[](int64_t i) const {
    if constexpr (Team::kPerThread) {
      return base[i * blockDim.x];
    } else {
      return base[i];
    }
  }
};

// Cuts a block's dynamic shared memory into consecutive team tables (take in decreasing alignment).
template <typename Team>
struct SmemCarver {
  unsigned char* next;
  template <typename V>
  __device__ __forceinline__ TeamArray<V, Team> take(int64_t count) {
    V* start = reinterpret_cast<V*>(next);
    next += static_cast<size_t>(count) * (Team::kPerThread ? blockDim.x : 1) * sizeof(V);
    return TeamArray<V, Team>{Team::kPerThread ? start + threadIdx.x : start};
  }
};

// Writes one value to every class of a row (masked / invalid rows); coalesced for stride 1.
template <typename T, typename Team = BlockTeam>
__device__ __forceinline__ void fill_row(T* __restrict__ row, int64_t stride, int64_t C, float v) {
  const T value = from_float<T>(v);
  for (int64_t c = Team::lane(); c < C; c += Team::size()) row[c * stride] = value;
}

// Online log-sum-exp in base 2: the running (max m, sum s of exp2(a - m)) of a stream of values.
// A value of -inf contributes 0; while everything seen is -inf the reference point is 0, so
// exp2(-inf - -inf) = NaN never occurs. NaN propagates through s; +inf gives NaN as softmax does.
struct OnlineLse2 {
  float m = -INFINITY;
  float s = 0.f;

  template <int V>
  __device__ __forceinline__ void add(const float (&a)[V]) {
    float cm = a[0];
#pragma unroll
    for (int i = 1; i < V; ++i) cm = fmaxf(cm, a[i]);
    const float mn = fmaxf(m, cm);
    const float ref = mn == -INFINITY ? 0.f : mn;
    float acc = s * exp2f(m - ref);
#pragma unroll
    for (int i = 0; i < V; ++i) acc += exp2f(a[i] - ref);
    m = mn;
    s = acc;
  }

  __device__ __forceinline__ void merge(float m2, float s2) {
    const float mn = fmaxf(m, m2);
    const float ref = mn == -INFINITY ? 0.f : mn;
    s = s * exp2f(m - ref) + s2 * exp2f(m2 - ref);
    m = mn;
  }
};

// A row's log2-sum-exp2 kept as its max m and ls = log2 of the sum relative to it, so that a base-2
// log-probability is (a - m) - ls: exact-ish near the max, where (a - (m + ls)) would carry the
// rounding of m's magnitude. m = -inf (an empty or all -inf row) gives NaN log-probabilities.
struct RowLse2 {
  float m, ls;
  // logit * k2 rounded as in lse_sweep (never fused: the row's largest logit gives exactly -ls, so one class
  // has probability exactly 1, as in the reference)
  __device__ __forceinline__ float log2_prob(float logit, float k2) const { return (__fmul_rn(logit, k2) - m) - ls; }
};

// (m, s) <- (m, s) (+) l for one value with a single exp2 (the smaller side is rescaled).
__device__ __forceinline__ void lse2_push(float& m, float& s, float l) {
  const bool up = l > m;
  const float e = l == -INFINITY ? 0.f : exp2f(-fabsf(l - m));  // NaN l gives NaN s
  s = up ? fmaf(s, e, 1.f) : s + e;
  m = up ? l : m;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Team-wide reductions over per-member partials laid out by column: part[col * n + t] is member
// t's partial of column col (n = Team::size()). Block teams: warp w reduces columns w, w + nwarps,
// ... in a fixed order (deterministic); every thread of the block must call; both barriers are
// inside: the first makes the partials visible, the second makes `out` visible and frees `part`
// for reuse. Thread teams: a member's partial is the row's value.
template <typename Team = BlockTeam, typename Part, typename Out>
__device__ __forceinline__ void reduce_sum_columns(const Part& part, int ncols, const Out& out) {
  if constexpr (Team::kPerThread) {
    for (int col = 0; col < ncols; ++col) out[col] = part[col];
    return;
  }
  __syncthreads();
  const int nt = blockDim.x, lane = threadIdx.x % kWarpSize;
  for (int col = threadIdx.x / kWarpSize; col < ncols; col += nt / kWarpSize) {
    float acc = 0.f;
    for (int t = lane; t < nt; t += kWarpSize) acc += part[col * nt + t];
    acc = warp_sum(acc);
    if (lane == 0) out[col] = acc;
  }
  __syncthreads();
}

// Same for log-sum-exp partials: column 2i holds maxima, column 2i + 1 sums; emit(src, acc) gets
// each source's merged OnlineLse2 (block teams: on lane 0 of the warp that reduced it).
template <typename Team, typename Part, typename Emit>
__device__ __forceinline__ void reduce_lse_columns_to(const Part& part, int nsources, Emit&& emit) {
  if constexpr (Team::kPerThread) {
    for (int src = 0; src < nsources; ++src) {
      OnlineLse2 acc;  // the block path's merge of one partial (NaN and -inf handled alike)
      acc.merge(part[2 * src], part[2 * src + 1]);
      emit(src, acc);
    }
    return;
  }
  __syncthreads();
  const int nt = blockDim.x, lane = threadIdx.x % kWarpSize;
  for (int src = threadIdx.x / kWarpSize; src < nsources; src += nt / kWarpSize) {
    OnlineLse2 acc;
    for (int t = lane; t < nt; t += kWarpSize) acc.merge(part[2 * src * nt + t], part[(2 * src + 1) * nt + t]);
#pragma unroll
    for (int o = kWarpSize / 2; o > 0; o /= 2) {
      const float m2 = __shfl_xor_sync(0xffffffffu, acc.m, o);
      const float s2 = __shfl_xor_sync(0xffffffffu, acc.s, o);
      acc.merge(m2, s2);
    }
    if (lane == 0) emit(src, acc);
  }
  __syncthreads();
}

// The row's log2-sum-exp2 of each source into out[src].
template <typename Team = BlockTeam, typename Part, typename Out>
__device__ __forceinline__ void reduce_lse_columns(const Part& part, int nsources, const Out& out) {
  reduce_lse_columns_to<Team>(part, nsources,
                              [&](int src, const OnlineLse2& acc) { out[src] = RowLse2{acc.m, log2f(acc.s)}; });
}

// Chunks a member of a pass-1 sweep loads before it uses the first: kSweepLoads independent loads in
// flight per thread, so that a block of a few hundred threads keeps enough bytes in flight to cover the
// memory latency (one 16-byte load per thread at a time is ~16 KiB per SM, about what an H100 needs
// to reach its bandwidth), and one rescale of the running sum per kSweepLoads chunks.
constexpr int kSweepLoads = 4;

// Pass-1 sweep of chunks [j0, j1) of one row: this member's (max, sum) of exp2(k2 * logit) over its
// chunks, stored as column pair `src` of `part`. The member's chunks are taken kSweepLoads at a time
// (then one at a time for the rest); every logit is scaled by k2 as in RowLse2::log2_prob.
template <typename T, typename Team = BlockTeam, typename Part>
__device__ __forceinline__ void lse_sweep(const T* __restrict__ row, int64_t stride, const RowChunks& rc,
                                          int j0, int j1, float k2, const Part& part, int src) {
  constexpr int V = kVec<T>, U = kSweepLoads;
  const int n = Team::size(), t = Team::lane();
  OnlineLse2 acc;
  int j = j0 + t;
  for (; j + (U - 1) * n < j1; j += U * n) {
    float a[U * V];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float c[V];
      load_chunk<T>(row, stride, (j + u * n) * V - rc.shift, rc, -INFINITY, c);
#pragma unroll
      for (int i = 0; i < V; ++i) a[u * V + i] = c[i];
    }
#pragma unroll
    for (int i = 0; i < U * V; ++i) a[i] = __fmul_rn(a[i], k2);  // not fused into a later subtraction
    acc.add(a);
  }
  for (; j < j1; j += n) {
    float a[V];
    load_chunk<T>(row, stride, j * V - rc.shift, rc, -INFINITY, a);
#pragma unroll
    for (int i = 0; i < V; ++i) a[i] = __fmul_rn(a[i], k2);
    acc.add(a);
  }
  part[2 * src * n + t] = acc.m;
  part[(2 * src + 1) * n + t] = acc.s;
}

// Threads per row: about one chunk per thread, a warp at least, kMaxThreads at most, and
// `fixed_bytes` + `floats_per_thread` floats per thread within the default 48 KiB of shared memory
// when possible (a warp otherwise: the caller then opts in to more shared memory).
__host__ __forceinline__ int threads_for_row(int64_t C, int vec, size_t fixed_bytes,
                                             size_t floats_per_thread) {
  const int64_t chunks = (C + vec - 1) / vec;
  int64_t nt = (chunks + kWarpSize - 1) / kWarpSize * kWarpSize;
  nt = nt < kWarpSize ? kWarpSize : (nt > kMaxThreads ? kMaxThreads : nt);
  const size_t per_thread = floats_per_thread * sizeof(float);
  if (fixed_bytes + per_thread * kWarpSize > kDefaultSmemBytes) return kWarpSize;
  const int64_t fit = static_cast<int64_t>((kDefaultSmemBytes - fixed_bytes) / per_thread) / kWarpSize * kWarpSize;
  return static_cast<int>(nt < fit ? nt : fit);
}

// Rows of unit class stride run one per thread up to this many classes: at most 8 chunks, which a
// block team would give to a warp of mostly idle lanes, paying its barriers for a row of a few
// hundred bytes. (Set from the arithmetic, not yet from a GPU measurement.)
constexpr int64_t kThreadRowMaxClasses = 32;
// No row of more classes ever runs on one thread (even when forced): a thread sums its row's terms
// one after another, whose rounding grows with the count (a block sums ~C / nt per thread, then a
// tree), and a long row cannot stay in cache between the passes of the 128 rows of a block.
constexpr int64_t kThreadTeamMaxClasses = 1024;

// Threads per block of a thread-team launch for rows of C classes whose member needs
// `bytes_per_member` of shared memory, or 0 for block teams: by cuda_row_team(), and on its own
// (kCudaRowTeamAuto) for `strided_rows` (class-strided rows whose neighbours are adjacent: a warp's
// rows then load coalesced) and rows of at most kThreadRowMaxClasses classes. 0 also for rows of
// more than kThreadTeamMaxClasses classes and when not even a warp of members fits the default
// shared memory.
__host__ inline int thread_team_threads(int64_t C, bool strided_rows, size_t bytes_per_member) {
  const int team = cuda_row_team();
  if (team == kCudaRowTeamBlock || team == kCudaRowTeamCluster || C > kThreadTeamMaxClasses ||
      (team == kCudaRowTeamAuto && !strided_rows && C > kThreadRowMaxClasses)) {
    return 0;
  }
  const size_t fit = kDefaultSmemBytes / bytes_per_member / kWarpSize * kWarpSize;
  return static_cast<int>(fit < static_cast<size_t>(kThreadTeamThreads) ? fit : kThreadTeamThreads);
}

// kernel(args) with `smem` bytes of dynamic shared memory, opting in past the default 48 KiB (which fails
// cleanly past the device's limit); returns the cudaError_t code.
template <typename Args>
__host__ inline int launch_with_smem(void (*kernel)(Args), const Args& args, unsigned grid, int threads, size_t smem,
                                     cudaStream_t stream) {
  if (smem > kDefaultSmemBytes) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, threads, smem, stream>>>(args);
  return cudaGetLastError();
}

// Grid of a thread-team launch: a block per `threads` rows (grid-stride beyond kMaxBlocks).
__host__ inline unsigned thread_team_grid(int64_t rows, int threads) {
  const int64_t blocks = (rows + threads - 1) / threads;
  return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

// ---------------------------------------------------------------------------------------------
// Split mode: a few long rows cut into pieces
// ---------------------------------------------------------------------------------------------
// A batch of fewer rows than the GPU has SMs, each of at least kRowSplitMinClasses classes: each row's
// chunks are cut into `nsplit` pieces of `span` chunks, a block per (row, piece), and the kernel's
// passes become one launch each (phase 1, 2, 3). Partial statistics go through the caller's workspace
// [rows, nsplit, 2, rec] (record 0: a piece's softmax statistics, record 1: its pass-2 sums) and
// every block of a row merges them in piece order (the same bits in every block; no atomics).
struct Pieces {
  int phase;   // 0: whole rows in one launch; 1, 2, 3: the launch of a split (cluster mode: 0, all in one)
  int nsplit;  // pieces per row (1: whole rows; cluster mode: the blocks of a cluster)
  int span;    // chunks per piece
  int rec;     // floats per record
  float* ws;
};

__host__ inline Pieces whole_rows() { return Pieces{0, 1, 0, 0, nullptr}; }

// A block per piece of a row: the block team's code with the phases compiled in (other teams fold
// them away); one block of kMaxThreads per SM, as the phases' extra state spilled at the 64
// registers that two would leave.
struct PieceTeam : BlockTeam {
  static constexpr bool kPieces = true;
  static constexpr int kLaunchMinBlocks = 1;
};

// The launch's phase and pieces per row as the team sees them (0 and 1 unless it is a PieceTeam).
template <typename Team>
__device__ __forceinline__ int phase_of(const Pieces& pc) {
  return Team::kPieces ? pc.phase : 0;
}
template <typename Team>
__device__ __forceinline__ int64_t pieces_of(const Pieces& pc) {
  return Team::kPieces ? pc.nsplit : 1;
}

// Chunks [j0, j1) of a row of `nchunks` chunks that piece `piece` sweeps (pieces of `span`; the last
// takes the rest) and its classes [c_lo, c_hi) of C (the same cut by classes, for rows written
// without chunks).
template <typename Team>
__device__ __forceinline__ void piece_range(const Pieces& pc, int piece, int nchunks, int& j0, int& j1) {
  j0 = 0;
  j1 = nchunks;
  if (pieces_of<Team>(pc) > 1) {
    j0 = piece * pc.span < nchunks ? piece * pc.span : nchunks;
    if (piece + 1 < pc.nsplit) j1 = j0 + pc.span < nchunks ? j0 + pc.span : nchunks;
  }
}
template <typename Team>
__device__ __forceinline__ void piece_classes(const Pieces& pc, int piece, int vec, int64_t C, int64_t& c_lo,
                                              int64_t& c_hi) {
  c_lo = 0;
  c_hi = C;
  if (pieces_of<Team>(pc) > 1) {
    const int64_t n = static_cast<int64_t>(pc.span) * vec;
    c_lo = piece * n < C ? piece * n : C;
    if (piece + 1 < pc.nsplit) c_hi = c_lo + n < C ? c_lo + n : C;
  }
}

// Pass 1 of a row: the log2-sum-exp2 of `nsrc` sources into lse[src], after `sweep()` has put this
// member's partials of the team's chunks in `part` (column pairs by source). Split phase 1 writes the
// piece's statistics to the workspace records of `slot` (split mode: the row; cluster mode: the cluster's)
// and gives false (nothing more in that phase); phases 2 and 3 merge the pieces' statistics in piece order,
// without a sweep.
template <typename Team, typename Part, typename Lse, typename Sweep>
__device__ __forceinline__ bool pieces_lse(const Pieces& pc, int phase, int64_t slot, int piece, const Part& part,
                                           int nsrc, const Lse& lse, Sweep&& sweep) {
  if (phase <= 1) {
    sweep();
    if (phase == 0) {
      reduce_lse_columns<Team>(part, nsrc, lse);
      return true;
    }
    float* rec = pc.ws + (slot * pc.nsplit + piece) * 2 * pc.rec;
    reduce_lse_columns_to<Team>(part, nsrc, [&](int src, const OnlineLse2& acc) {
      rec[2 * src] = acc.m;
      rec[2 * src + 1] = acc.s;
    });
    return false;
  }
  const float* first = pc.ws + slot * pc.nsplit * 2 * pc.rec;
  for (int src = Team::lane(); src < nsrc; src += Team::size()) {
    OnlineLse2 acc;
    for (int k = 0; k < pc.nsplit; ++k) acc.merge(first[k * 2 * pc.rec + 2 * src], first[k * 2 * pc.rec + 2 * src + 1]);
    lse[src] = RowLse2{acc.m, log2f(acc.s)};
  }
  Team::sync();
  return true;
}

// The pass-2 row sums (`ncols` columns of `part`) into red[col]. Split phase 2 writes the piece's sums
// to the workspace records of `slot` and gives false; phase 3 (which skips the pass-2 sweep) adds the
// pieces' sums in piece order.
template <typename Team, typename Part, typename Red>
__device__ __forceinline__ bool pieces_sums(const Pieces& pc, int phase, int64_t slot, int piece, const Part& part,
                                            int ncols, const Red& red) {
  if (phase == 3) {
    const float* first = pc.ws + (slot * pc.nsplit * 2 + 1) * pc.rec;
    for (int col = Team::lane(); col < ncols; col += Team::size()) {
      float total = 0.f;
      for (int k = 0; k < pc.nsplit; ++k) total += first[k * 2 * pc.rec + col];
      red[col] = total;
    }
    Team::sync();
    return true;
  }
  reduce_sum_columns<Team>(part, ncols, red);
  if (phase == 0) return true;
  float* rec = pc.ws + ((slot * pc.nsplit + piece) * 2 + 1) * pc.rec;
  for (int col = Team::lane(); col < ncols; col += Team::size()) rec[col] = red[col];
  return false;
}

// Split plan for `rows` rows of C classes (chunks of `vec`) whose pieces need records of `rec` floats:
// about a block per SM in all, pieces of at least kSplitMinPieceClasses classes, at most
// kMaxSplit per row; whole rows unless the rows are fewer than the SMs, at least kRowSplitMinClasses
// long, and the workspace holds the records.
constexpr int64_t kSplitMinPieceClasses = 4096;
constexpr int64_t kMaxSplit = 64;

__host__ inline Pieces piece_plan(int64_t rows, int64_t C, int vec, int rec, void* workspace,
                                  int64_t workspace_floats) {
  const Pieces whole = whole_rows();
  if (C < kRowSplitMinClasses || workspace == nullptr) return whole;
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || rows >= sms) {
    return whole;
  }
  const int64_t chunks = (C + vec - 1) / vec + 1;  // a row's chunks at most (one more when misaligned)
  int64_t n = (PieceTeam::kLaunchMinBlocks * static_cast<int64_t>(sms) + rows - 1) / rows;
  n = n < kMaxSplit ? n : kMaxSplit;
  n = n < C / kSplitMinPieceClasses ? n : C / kSplitMinPieceClasses;
  if (n <= 1) return whole;
  const int64_t span = (chunks + n - 1) / n;
  n = (chunks + span - 1) / span;
  if (n <= 1 || rows * n * 2 * rec > workspace_floats) return whole;
  return Pieces{0, static_cast<int>(n), static_cast<int>(span), rec, static_cast<float*>(workspace)};
}

// ---------------------------------------------------------------------------------------------
// Cluster mode (compute capability 9.0+): many long rows, the pieces of a row a thread-block cluster
// ---------------------------------------------------------------------------------------------
// A block per row re-reads its row in passes 2 and 3; with as many rows in flight as the GPU holds blocks,
// rows of a few hundred KiB are evicted from the L2 before the re-read, which then costs DRAM bandwidth
// again (one read of a row is all the minimal-byte model allows). In cluster mode each row is cut into
// `nsplit` pieces (as in split mode), the pieces of a row are the blocks of one cluster, and the three
// phases run in one launch, the cluster's blocks meeting at a cluster barrier between them: a piece is
// re-read right after its first read, while it is in the L2, and there are nsplit times fewer rows in
// flight. Automatic mode takes it only where a block per row would keep more in flight than the L2 holds
// (rows_in_flight_exceed_l2); elsewhere the re-reads hit the L2 anyway and the barriers would only cost.
// Records go through the workspace as in split mode, at the cluster's slot (two per cluster, alternating
// between its rows, so that a row's phase 1 never overwrites what a slower block of the cluster is still
// reading in the previous row's phase 3).
// Blocks of at most 256 threads, two per SM (a 128-register cap, as a split block's): a block waiting at its
// cluster's barrier leaves the SM to the other cluster's block.
struct ClusterTeam : PieceTeam {
  static constexpr bool kCluster = true;
  static constexpr int kLaunchThreads = kMaxThreads / 2, kLaunchMinBlocks = 2;
  // threads for a piece of `span` chunks (threads_for_row's choice, at most kLaunchThreads)
  __host__ static int threads(int nt) { return nt < kLaunchThreads ? nt : kLaunchThreads; }
};

constexpr int kMaxClusterBlocks = 8;  // the portable cluster size
// Pieces of at least this many classes in automatic mode (C >= kRowSplitMinClasses); forced
// (kCudaRowTeamCluster, tests) any row of two chunks or more is cut, into at most kForcedClusterBlocks pieces
// (fewer blocks to emulate; rows of at least 8 * kClusterMinPieceClasses classes take clusters of 8 in
// automatic mode).
constexpr int64_t kClusterMinPieceClasses = 2048;
constexpr int kForcedClusterBlocks = 4;

// Waits until every thread of the thread-block cluster has arrived; the writes before it (shared and global
// memory) are visible to the cluster's threads after it (release / acquire at cluster scope).
__device__ __forceinline__ void cluster_sync() {
#if defined(MMFAST_CUDA_EMU)
  mmfast_emu::sync_cluster();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#elif defined(__CUDA_ARCH__)
  __trap();  // never launched below sm_90 (cluster_plan)
#endif
}

// Runs fn(unit, phase, slot) for each work unit of this block: whole rows or split pieces (phase of the
// launch, slot = the row), or in cluster mode each piece of the cluster's rows through phases 1-3 with a
// cluster barrier between them (slot: the cluster's record slot of that row).
template <typename Team, typename Fn>
__device__ __forceinline__ void for_each_unit(const Pieces& pc, int64_t units, Fn&& fn) {
  if constexpr (Team::kCluster) {
    const int64_t cluster = blockIdx.x / pc.nsplit;
    int parity = 0;
    for (int64_t unit = Team::first_row(); unit < units; unit += Team::row_stride()) {
      const int64_t slot = 2 * cluster + parity;
      fn(unit, 1, slot);
      cluster_sync();
      fn(unit, 2, slot);
      cluster_sync();
      fn(unit, 3, slot);
      parity ^= 1;
    }
  } else {
    const int phase = phase_of<Team>(pc);
    for (int64_t unit = Team::first_row(); unit < units; unit += Team::row_stride()) {
      fn(unit, phase, unit / pieces_of<Team>(pc));
    }
  }
}

__host__ inline bool cluster_launch_supported() {
  int device = 0, major = 0;
  return cudaGetDevice(&device) == cudaSuccess &&
         cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess && major >= 9;
}

// Whether a launch of a block per row would keep more of `rows` rows in flight (two blocks per SM) than the L2
// holds, reading `sources` rows of C elements of `elem_bytes` each per row: then the re-reads of pass 2 and 3
// come from DRAM.
__host__ inline bool rows_in_flight_exceed_l2(int64_t rows, int64_t C, int sources, int elem_bytes) {
  int device = 0, sms = 0, l2 = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device) != cudaSuccess) {
    return false;
  }
  const int64_t in_flight = rows < kMinBlocksPerSM * static_cast<int64_t>(sms) ? rows : kMinBlocksPerSM * sms;
  return in_flight * sources * C * elem_bytes > static_cast<int64_t>(l2);
}

// How a team goes over its chunks after pass 1 (cuda_sweep_order(), mmfast/kernels.h). `back`: pass 2 from the
// last chunk to the first, so that it starts on the chunks pass 1 read last (the likeliest still in the L2 when
// more rows are in flight than the L2 holds), then pass 3 forward again, starting on what pass 2 read last.
// `evict_first`: the row's last read (pass 3's loads, or pass 2's when no pass 3 follows) and the gradient stores
// carry the evict-first hint (load_chunk, store_chunk), so that the L2 gives up those lines, which no pass reads
// again, before the ones a later pass of a row in flight still needs. Pass 1 takes no hint: an evict-last mark
// could outlive the kernel and crowd the next kernels out of the L2.
struct RowSweep {
  bool back;
  bool evict_first;
};

// The sweep of a launch whose rows in flight exceed the L2 (`streamed`: a block per row, rows_in_flight_exceed_l2)
// or not, by cuda_sweep_order(): automatically back and forth with the hints for streamed rows, forward without
// them otherwise (rows that stay in the L2 gain nothing, and their gradients had better stay for the next kernel).
__host__ inline RowSweep row_sweep(bool streamed) {
  switch (cuda_sweep_order()) {
    case kCudaSweepBackHints: return RowSweep{true, true};
    case kCudaSweepBack: return RowSweep{true, false};
    case kCudaSweepForward: return RowSweep{false, false};
    default: return RowSweep{streamed, streamed};
  }
}

// The sweep a team takes: pieces of rows (split and cluster mode, whose rows stay in the L2) always forward
// without hints, which keeps the choice, and its registers, out of their kernels.
template <typename Team>
__device__ __forceinline__ RowSweep sweep_of(const RowSweep& sweep) {
  return Team::kPieces ? RowSweep{false, false} : sweep;
}

// The chunk of step `j` of a sweep over chunks [j0, j1): j itself, or its mirror when the sweep goes `back`
// (a member keeps its stride; a warp's accesses stay one contiguous span).
__device__ __forceinline__ int swept_chunk(int j, int j0, int j1, bool back) { return back ? j0 + j1 - 1 - j : j; }

// Cluster plan for `rows` rows of C classes (`sources` rows of `elem_bytes` elements read per row) with records
// of `rec` floats: in automatic mode, for rows of at least kRowSplitMinClasses classes whose block-per-row launch
// would keep more in flight than the L2 holds, nsplit pieces (<= 8) of at least kClusterMinPieceClasses classes;
// forced, for rows of at least two chunks, as many pieces as chunks up to kForcedClusterBlocks. `clusters`:
// clusters in the grid (grid-stride over the rows, as many as the workspace holds slots for); nsplit == 1: not
// in cluster mode (a block or thread team setting, no workspace, a device before sm_90, rows that fit).
__host__ inline Pieces cluster_plan(int64_t rows, int64_t C, int vec, int rec, int sources, int elem_bytes,
                                    void* workspace, int64_t workspace_floats, int64_t& clusters) {
  const Pieces whole = whole_rows();
  clusters = 0;
  const int team = cuda_row_team();
  const bool forced = team == kCudaRowTeamCluster;
  if ((team != kCudaRowTeamAuto && !forced) || workspace == nullptr || !cluster_launch_supported()) return whole;
  if (!forced && (C < kRowSplitMinClasses || !rows_in_flight_exceed_l2(rows, C, sources, elem_bytes))) {
    return whole;
  }
  const int64_t chunks = (C + vec - 1) / vec + 1;  // a row's chunks at most (one more when misaligned)
  int64_t n = forced ? chunks - 1 : C / kClusterMinPieceClasses;
  const int64_t most = forced ? kForcedClusterBlocks : kMaxClusterBlocks;
  n = n < most ? n : most;
  if (n <= 1) return whole;
  const int64_t span = (chunks + n - 1) / n;
  n = (chunks + span - 1) / span;
  if (n <= 1) return whole;
  const int64_t per_cluster = 2 * n * 2 * rec;  // two slots of n pieces' two records
  clusters = workspace_floats / per_cluster;
  clusters = clusters < rows ? clusters : rows;
  clusters = clusters < kMaxBlocks / n ? clusters : kMaxBlocks / n;
  if (clusters < 1) return whole;
  return Pieces{0, static_cast<int>(n), static_cast<int>(span), rec, static_cast<float*>(workspace)};
}

// kernel(args) as a grid of `grid` blocks in clusters of `cluster` blocks (grid a multiple of it), with `smem`
// bytes of dynamic shared memory as launch_with_smem; returns the cudaError_t code.
template <typename Args>
__host__ inline int launch_cluster_with_smem(void (*kernel)(Args), const Args& args, unsigned grid, int threads,
                                             size_t smem, int cluster, cudaStream_t stream) {
  if (smem > kDefaultSmemBytes) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(cluster);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(grid);
  config.blockDim = dim3(static_cast<unsigned>(threads));
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = 1;
  const cudaError_t err = cudaLaunchKernelEx(&config, kernel, args);
  return err != cudaSuccess ? static_cast<int>(err) : static_cast<int>(cudaGetLastError());
}

}  // namespace cuda
}  // namespace mmfast
