// Kernels that check the emulation's own semantics (tests/test_cuda_emu.py): barriers, shuffles, exited
// threads, a barrier that cannot complete, uninitialised shared memory, launch limits, a race that the
// alternating thread order exposes, and out-of-bounds reads for AddressSanitizer. Built only into the emulation
// module (translated like csrc/cuda).
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace mmfast_emu_selftest {

// out[t] = sum over the block of (t' + 1), through a shared array and a barrier
__global__ void block_sum_kernel(float* out) {
  extern __shared__ __align__(16) unsigned char smem[];
  float* part = reinterpret_cast<float*>(smem);
  const int t = threadIdx.x, nt = blockDim.x;
  part[t] = static_cast<float>(t + 1);
  __syncthreads();
  float s = 0.f;
  for (int i = 0; i < nt; ++i) s += part[i];
  out[blockIdx.x * nt + t] = s;
}

// out[t] = sum over the warp of lane + 1, by xor shuffles
__global__ void warp_sum_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x % 32 + 1);
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  out[threadIdx.x] = v;
}

// threads t >= live return at once; the rest meet at a barrier and OR their predicates
__global__ void exited_threads_kernel(float* out, int live) {
  if (static_cast<int>(threadIdx.x) >= live) return;
  const int any = __syncthreads_or(threadIdx.x == 3);
  out[threadIdx.x] = static_cast<float>(any);
}

// lanes 0-15 shuffle while lanes 16-31 wait at a block barrier: neither can complete
__global__ void stuck_kernel(float* out) {
  if (threadIdx.x < 16) {
    out[threadIdx.x] = __shfl_xor_sync(0xffffu, 1.f, 1);
  } else {
    __syncthreads();
  }
}

// reads dynamic shared memory no thread wrote
__global__ void unwritten_smem_kernel(float* out) {
  extern __shared__ __align__(16) unsigned char smem[];
  out[threadIdx.x] = reinterpret_cast<const float*>(smem)[threadIdx.x];
}

// each thread writes its slot, then (no barrier) reads its lower neighbour's: a race. out[block][0][t]: the
// racy read, out[block][1][t]: the same read after a barrier (always the neighbour's index)
__global__ void racy_kernel(float* out) {
  extern __shared__ __align__(16) unsigned char smem[];
  float* slot = reinterpret_cast<float*>(smem);
  const int t = threadIdx.x, nt = blockDim.x;
  float* o = out + blockIdx.x * 2 * nt;
  slot[t] = static_cast<float>(t);
  o[t] = slot[(t + nt - 1) % nt];
  __syncthreads();
  o[nt + t] = slot[(t + nt - 1) % nt];
}

// Out-of-bounds reads for the emulation under AddressSanitizer (scripts/cuda_emu_asan.sh checks that they are
// reported from the fibers' stacks; never run without the sanitizer). heap_overflow: the last thread reads one
// element past `in` (blockDim.x elements on the heap); stack_overflow: each thread reads past a local array.
__global__ void heap_overflow_kernel(float* out, const float* in) {
  out[threadIdx.x] = in[threadIdx.x + 1];
}

__global__ void stack_overflow_kernel(float* out, int index) {
  float local[4] = {1.f, 2.f, 3.f, static_cast<float>(threadIdx.x)};
  volatile int i = index;
  out[threadIdx.x] = local[i];
}

// a cluster of gridDim.x blocks: each block's thread 0 writes its block index to slot[blockIdx.x], every thread
// meets at the cluster barrier, then out[block][t] = the sum of the slots, read after the barrier
__global__ void cluster_sum_kernel(float* out, float* slot) {
  if (threadIdx.x == 0) slot[blockIdx.x] = static_cast<float>(blockIdx.x + 1);
  mmfast_emu::sync_cluster();
  float s = 0.f;
  for (unsigned b = 0; b < gridDim.x; ++b) s += slot[b];
  out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}

}  // namespace mmfast_emu_selftest

namespace mmfast_emu {

// Runs selftest kernel `name` with `threads` threads (one block; two for block_sum and racy; a cluster of `arg`
// for cluster_sum); returns the launch's cudaGetLastError code and the output array.
std::pair<int, std::vector<float>> run_selftest(const std::string& name, int threads, int arg) {
  using namespace mmfast_emu_selftest;
  const int blocks = arg > 4 ? arg : 4;  // a cluster of arg blocks writes arg * threads outputs
  std::vector<float> out(static_cast<size_t>(threads > 0 ? blocks * threads : 1), -1.f);
  float* o = out.data();
  const size_t smem = static_cast<size_t>(threads > 0 ? threads : 0) * sizeof(float);
  cudaGetLastError();  // clear
  if (name == "block_sum") {
    block_sum_kernel<<<2, threads, smem, nullptr>>>(o);
  } else if (name == "warp_sum") {
    warp_sum_kernel<<<1, threads, 0, nullptr>>>(o);
  } else if (name == "exited_threads") {
    exited_threads_kernel<<<1, threads, 0, nullptr>>>(o, arg);
  } else if (name == "stuck") {
    stuck_kernel<<<1, threads, 0, nullptr>>>(o);
  } else if (name == "unwritten_smem") {
    unwritten_smem_kernel<<<1, threads, smem, nullptr>>>(o);
  } else if (name == "racy") {
    racy_kernel<<<2, threads, smem, nullptr>>>(o);
  } else if (name == "cluster_sum" || name == "cluster_not_dividing") {  // arg: blocks in the cluster
    std::vector<float> slot(static_cast<size_t>(arg > 0 ? arg : 1), -1.f);
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = static_cast<unsigned>(arg);
    attr[0].val.clusterDim.y = attr[0].val.clusterDim.z = 1;
    cudaLaunchConfig_t config = {};
    // cluster_not_dividing: a grid of one block more than the cluster, which the device refuses
    config.gridDim = dim3(static_cast<unsigned>(arg + (name == "cluster_not_dividing" ? 1 : 0)));
    config.blockDim = dim3(static_cast<unsigned>(threads));
    config.attrs = attr;
    config.numAttrs = 1;
    const cudaError_t err = cudaLaunchKernelEx(&config, cluster_sum_kernel, o, slot.data());
    return {static_cast<int>(err), out};
  } else if (name == "heap_overflow") {
    const std::vector<float> in(static_cast<size_t>(threads), 1.f);
    heap_overflow_kernel<<<1, threads, 0, nullptr>>>(o, in.data());
  } else if (name == "stack_overflow") {
    stack_overflow_kernel<<<1, threads, 0, nullptr>>>(o, arg);
  } else if (name == "too_much_smem") {
    block_sum_kernel<<<1, threads, 64 * 1024, nullptr>>>(o);
  } else {
    return {-1, {}};
  }
  return {static_cast<int>(cudaGetLastError()), out};
}

}  // namespace mmfast_emu
