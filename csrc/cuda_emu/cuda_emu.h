// A CPU emulation of the small part of CUDA that csrc/cuda uses, so that the CUDA kernels run, and are
// tested against the reference, on a machine without a GPU (tests/cuda_emu.py builds them with the host
// compiler; nothing of this enters the package).
//
// Every CUDA thread of a block is a fiber (a stack of its own) on one host thread; blocks run one after another,
// and the scheduler's sweeps over a block's threads alternate between ascending and descending order (the first
// sweep's order alternating between blocks and launches), so that two threads racing within one phase (no
// barrier between a write and another thread's read) show.
// __syncthreads, __syncthreads_or and the warp shuffles switch fibers until every live thread of the block
// (or warp) has arrived; a thread that has returned no longer counts, as on the device. A barrier that some
// live thread can never reach (divergent __syncthreads) fails the launch with cudaErrorLaunchFailure
// instead of hanging. Dynamic shared memory starts every block filled with 0xff bytes (NaN floats), so
// reading what no thread wrote shows. Launch configurations are checked as the device does (at most 1024
// threads, grid y and z at most 65535, dynamic shared memory within 48 KiB unless opted in) and reported
// by cudaGetLastError. The SM count that launchers query is 132 and the L2 50 MiB (an H100) unless
// mmfast_emu::set_sm_count / set_l2_cache_bytes change them.
//
// Thread-block clusters (cudaLaunchKernelEx with a cluster dimension along x, at most 8 blocks, compute
// capability 9 or more: mmfast_emu::set_compute_capability_major, default 9) run their blocks together: the
// scheduler's sweeps give every block of the cluster its turn (blocks too in alternating order), and
// mmfast_emu::sync_cluster (what csrc/cuda's cluster_sync calls) waits for every live thread of the cluster.
//
// What it does not model: concurrency between blocks outside a cluster (no data race or atomics ordering is
// exercised), the
// device's fast-math approximations (exp2f, __expf are the C library's), memory spaces (any host pointer
// works), and timing.
#pragma once

// csrc/cuda code that must differ under the emulation (inline PTX) tests this
#define MMFAST_CUDA_EMU 1

#include <math.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// static __shared__ arrays: one per kernel instantiation, which blocks running one at a time may share
#define __shared__ static

// ---- vector and index types ----
struct __align__(8) float2 {
  float x, y;
};
struct __align__(8) uint2 {
  unsigned int x, y;
};
struct uint3 {
  unsigned int x, y, z;
};
struct __align__(16) uint4 {
  unsigned int x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline uint2 make_uint2(unsigned int x, unsigned int y) { return {x, y}; }
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return {x, y, z, w}; }

struct dim3 {
  unsigned int x, y, z;
  dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};

extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;

// ---- runtime API ----
enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
  cudaErrorNotSupported = 801,
};
typedef cudaError cudaError_t;
typedef struct CUstream_st* cudaStream_t;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrL2CacheSize = 38,
};

cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t error);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);

namespace mmfast_emu {
cudaError_t set_func_max_dynamic_smem(const void* func, int bytes);
}  // namespace mmfast_emu

template <typename F>
cudaError_t cudaFuncSetAttribute(F* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return mmfast_emu::set_func_max_dynamic_smem(reinterpret_cast<const void*>(func), value);
}

// ---- bit casts and math intrinsics ----
inline float __uint_as_float(unsigned int u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline unsigned int __float_as_uint(float f) {
  unsigned int u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}
inline float __expf(float x) { return expf(x); }
inline float __fmul_rn(float a, float b) { return a * b; }  // never contracted: built with -ffp-contract=off
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
// Cache-streaming (evict-first) load and store: plain accesses, counted (mmfast_emu::evict_first_accesses) so
// that tests can see which launches ask for the hint.
namespace mmfast_emu {
void count_evict_first();
}  // namespace mmfast_emu
template <typename T>
inline T __ldcs(const T* p) {
  mmfast_emu::count_evict_first();
  return *p;
}
template <typename T>
inline void __stcs(T* p, T v) {
  mmfast_emu::count_evict_first();
  *p = v;
}

// ---- bfloat16 and float16 ----
struct __nv_bfloat16 {
  unsigned short x;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float(static_cast<unsigned int>(h.x) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {  // round to nearest even; NaN stays a (quiet) NaN
  const unsigned int u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<unsigned short>((u >> 16) | 0x40u)};
  return {static_cast<unsigned short>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.x; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}

struct __half {
  unsigned short x;
};
struct __half2 {
  __half x, y;
};
inline float __half2float(__half h) {
  _Float16 v;
  std::memcpy(&v, &h.x, sizeof v);
  return static_cast<float>(v);
}
inline __half __float2half_rn(float f) {
  const _Float16 v = static_cast<_Float16>(f);  // round to nearest even
  __half h;
  std::memcpy(&h.x, &v, sizeof v);
  return h;
}
inline __half __ushort_as_half(unsigned short u) { return {u}; }
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline __half __low2half(__half2 h) { return h.x; }
inline __half __high2half(__half2 h) { return h.y; }
inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half_rn(lo), __float2half_rn(hi)}; }

// ---- synchronisation ----
namespace mmfast_emu {
int sync_block(int predicate);
uint64_t shfl_xor(uint64_t bits, int lane_mask, int width);
unsigned char* dynamic_smem();
void sync_cluster();
void launch(const void* func, dim3 grid, dim3 block, size_t smem, unsigned cluster, void (*body)(void*),
            void* arg);
void set_sm_count(int sms);
void set_compute_capability_major(int major);
void set_l2_cache_bytes(int bytes);
std::tuple<unsigned, unsigned, unsigned> last_launch();  // (blocks, threads per block, blocks per cluster)
uint64_t evict_first_accesses();  // __ldcs and __stcs calls so far
}  // namespace mmfast_emu

inline void __syncthreads() { mmfast_emu::sync_block(0); }
inline int __syncthreads_or(int predicate) { return mmfast_emu::sync_block(predicate != 0); }

template <typename T>
inline T __shfl_xor_sync(unsigned int /*mask: every lane of the warp takes part*/, T v, int lane_mask,
                         int width = 32) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>, "a register value");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof v);
  bits = mmfast_emu::shfl_xor(bits, lane_mask, width);
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// ---- kernel launch: `kernel<<<grid, block, smem, stream>>>(args)` is rewritten by tests/cuda_emu.py into
// `::mmfast_emu::Launch(grid, block, smem, stream).run(kernel, args)` ----
namespace mmfast_emu {

struct Launch {
  dim3 grid, block;
  size_t smem;
  unsigned cluster;  // blocks per cluster along x (1: no clusters)
  Launch(dim3 g, dim3 b, size_t s = 0, cudaStream_t = nullptr, unsigned c = 1)
      : grid(g), block(b), smem(s), cluster(c) {}

  template <typename... P, typename... A>
  void run(void (*kernel)(P...), A&&... args) const {
    using Call = std::pair<void (*)(P...), std::tuple<std::decay_t<P>...>>;
    Call call{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
    launch(reinterpret_cast<const void*>(kernel), grid, block, smem, cluster,
           [](void* c) {
             auto* self = static_cast<Call*>(c);
             std::apply(self->first, self->second);
           },
           &call);
  }
};

}  // namespace mmfast_emu

// ---- extensible launch (cluster dimensions only) ----
enum cudaLaunchAttributeID { cudaLaunchAttributeClusterDimension = 4 };
union cudaLaunchAttributeValue {
  struct {
    unsigned int x, y, z;
  } clusterDim;
};
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
};
struct cudaLaunchConfig_t {
  dim3 gridDim, blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned int numAttrs;
};

template <typename... P, typename... A>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(P...), A&&... args) {
  unsigned cluster = 1;
  for (unsigned i = 0; i < config->numAttrs; ++i) {
    const cudaLaunchAttribute& at = config->attrs[i];
    if (at.id != cudaLaunchAttributeClusterDimension || at.val.clusterDim.y != 1 || at.val.clusterDim.z != 1) {
      return cudaErrorInvalidValue;  // not emulated
    }
    cluster = at.val.clusterDim.x;
  }
  ::mmfast_emu::Launch(config->gridDim, config->blockDim, config->dynamicSmemBytes, config->stream, cluster)
      .run(kernel, std::forward<A>(args)...);
  return cudaGetLastError();
}
