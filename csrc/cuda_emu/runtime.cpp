// The fiber scheduler behind cuda_emu.h: a block's threads are fibers on the calling host thread.
#include <sys/mman.h>
#include <unistd.h>

// x86-64 Linux switches fibers with the few instructions below; elsewhere with ucontext, whose swapcontext
// also saves the x87 environment and makes a system call for the signal mask on every switch: that was about
// half of the emulated kernel tests' time (perf, 2026-11-29).
#if defined(__x86_64__) && defined(__linux__)
#define MMFAST_EMU_STACK_SWITCH 1
#else
#include <ucontext.h>
#endif
#if defined(__SANITIZE_ADDRESS__) && defined(MMFAST_EMU_STACK_SWITCH)
#include <sanitizer/common_interface_defs.h>
#endif

#include <cstdio>
#include <cstdlib>
#include <map>
#include <stdexcept>
#include <tuple>
#include <vector>

#include "cuda_emu.h"

#ifdef MMFAST_EMU_STACK_SWITCH
// mmfast_emu_switch_stack(save, load): pushes the callee-saved registers, MXCSR and the x87 control word (what
// the System V ABI has a callee preserve), stores the stack pointer in *save, loads `load` and pops what the
// switch that saved it pushed, returning to where that switch was called (or into the entry that make_context
// laid out).
extern "C" void mmfast_emu_switch_stack(void** save, void* load);
asm(R"(
  .pushsection .text, "ax", @progbits
  .p2align 4
  .globl mmfast_emu_switch_stack
  .hidden mmfast_emu_switch_stack
  .type mmfast_emu_switch_stack, @function
mmfast_emu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr 8(%rsp)
  fnstcw (%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  fldcw (%rsp)
  ldmxcsr 8(%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size mmfast_emu_switch_stack, .-mmfast_emu_switch_stack
  .popsection
)");
#endif

uint3 threadIdx{0, 0, 0};
uint3 blockIdx{0, 0, 0};
dim3 blockDim{1, 1, 1};
dim3 gridDim{1, 1, 1};

namespace mmfast_emu {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 1024;
constexpr unsigned kMaxGridYZ = 65535;
constexpr size_t kDefaultSmem = 48 * 1024;
constexpr size_t kStackBytes = 256 * 1024;
constexpr int kMaxCluster = 8;  // the portable cluster size limit
constexpr int kMaxFibers = kMaxThreads * kMaxCluster;

enum State { kRunnable, kWaiting, kDone };

// A barrier over a set of fibers: `arrived` of `live` have arrived in the current phase; OR of predicates.
struct Barrier {
  int live = 0, arrived = 0;
  int acc = 0, result = 0;
};

// Where a suspended fiber (or the scheduler) resumes.
struct Context {
#ifdef MMFAST_EMU_STACK_SWITCH
  void* sp = nullptr;          // its stack, holding the callee-saved registers, MXCSR and the x87 control word
  void* fake_stack = nullptr;  // AddressSanitizer's, while suspended
#else
  ucontext_t uc;
#endif
};

struct Fiber {
  Context ctx;
  State state = kRunnable;
  Barrier* waiting_on = nullptr;
};

struct Block {
  int nt = 0;
  std::vector<Fiber> fibers;
  Barrier block;
  std::vector<Barrier> warps;
  std::vector<uint64_t> lanes;  // a shuffle's value of each thread
  int current = -1;
  int done = 0;
  bool first_descending = false;
  uint3 index{0, 0, 0};                // blockIdx
  std::vector<unsigned char> shared;   // dynamic shared memory (+ alignment slack)
  unsigned char* smem = nullptr;       // 16-byte aligned start of `shared`
  int first_stack = 0;                 // fiber stacks first_stack .. first_stack + nt - 1
};

// The blocks that run together: one block, or the blocks of one thread-block cluster, whose barrier
// (cluster_sync) every live thread of every block meets.
struct Cluster {
  std::vector<Block> blocks;
  Barrier barrier;
};

cudaError_t g_last_error = cudaSuccess;
unsigned g_launches = 0;
int g_sm_count = 132;
std::tuple<unsigned, unsigned, unsigned> g_last_launch{0, 0, 0};
int g_cc_major = 9;
int g_l2_bytes = 50 * 1024 * 1024;
uint64_t g_evict_first = 0;  // __ldcs / __stcs calls (one fiber runs at a time)
std::map<const void*, size_t> g_max_smem;  // cudaFuncAttributeMaxDynamicSharedMemorySize per kernel
Context g_scheduler;
Cluster* g_cluster = nullptr;
Block* g_block = nullptr;  // the block of the running fiber
void (*g_body)(void*) = nullptr;
void* g_arg = nullptr;

// fiber stacks for the kMaxThreads threads of each of kMaxCluster blocks, mapped on first use (pages are
// committed as they are touched) and reused by every launch, each below a guard page
char* g_stacks = nullptr;
size_t page_size() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }
size_t stack_stride() { return kStackBytes + page_size(); }

char* stack_of(int t) {
  if (g_stacks == nullptr) {
    void* mem = mmap(nullptr, stack_stride() * kMaxFibers, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) throw std::runtime_error("cuda_emu: cannot map the fiber stacks");
    g_stacks = static_cast<char*>(mem);
    for (int i = 0; i < kMaxFibers; ++i) mprotect(g_stacks + i * stack_stride(), page_size(), PROT_NONE);
  }
  return g_stacks + t * stack_stride() + page_size();
}

void set_thread_index(int t) {
  threadIdx.x = t % blockDim.x;
  threadIdx.y = (t / blockDim.x) % blockDim.y;
  threadIdx.z = t / (blockDim.x * blockDim.y);
}

[[noreturn]] void fiber_entry();

// `c` starts fiber_entry on the stack [stack, stack + size) when first switched to.
void make_context(Context& c, char* stack, size_t size) {
#ifdef MMFAST_EMU_STACK_SWITCH
  auto* slot = reinterpret_cast<uint64_t*>((reinterpret_cast<uintptr_t>(stack) + size) & ~uintptr_t{15});
  *--slot = 0;                                         // fiber_entry's return address: none (it never returns)
  *--slot = reinterpret_cast<uint64_t>(&fiber_entry);  // where the first switch to `c` returns
  for (int r = 0; r < 6; ++r) *--slot = 0;             // rbp, rbx, r12-r15
  uint32_t mxcsr = 0;
  uint16_t x87_control = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(x87_control));
  *--slot = mxcsr;        // the creating thread's rounding and exception masks
  *--slot = x87_control;
  c.sp = slot;
  c.fake_stack = nullptr;
#else
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, fiber_entry, 0);
#endif
}

// the scheduler's stack, as AddressSanitizer reports it when a fiber first starts (not needed, and left unknown,
// without the sanitizer)
const void* g_scheduler_stack = nullptr;
size_t g_scheduler_stack_size = 0;

// Suspends the running context into `from` (never to resume when `from_finished`) and resumes `to`, which runs
// on [to_stack, to_stack + to_size); returns when something switches back to `from`. AddressSanitizer is told
// of every switch between stacks (ucontext's swapcontext it intercepts itself).
void switch_context(Context& from, Context& to, [[maybe_unused]] const void* to_stack,
                    [[maybe_unused]] size_t to_size, [[maybe_unused]] bool from_finished = false) {
#ifdef MMFAST_EMU_STACK_SWITCH
#ifdef __SANITIZE_ADDRESS__
  __sanitizer_start_switch_fiber(from_finished ? nullptr : &from.fake_stack, to_stack, to_size);
#endif
  mmfast_emu_switch_stack(&from.sp, to.sp);
#ifdef __SANITIZE_ADDRESS__
  __sanitizer_finish_switch_fiber(from.fake_stack, nullptr, nullptr);
#endif
#else
  swapcontext(&from.uc, &to.uc);
#endif
}

// Releases `b`'s phase when every live fiber has arrived: its waiters become runnable.
void release_if_complete(Barrier& b) {
  if (b.arrived == 0 || b.arrived < b.live) return;
  b.result = b.acc;
  b.acc = 0;
  b.arrived = 0;
  for (Block& blk : g_cluster->blocks) {
    for (Fiber& f : blk.fibers) {
      if (f.state == kWaiting && f.waiting_on == &b) {
        f.state = kRunnable;
        f.waiting_on = nullptr;
      }
    }
  }
}

// The running fiber `self` hands back to the scheduler (for good when `finished`).
void yield_to_scheduler(Fiber& self, bool finished) {
  switch_context(self.ctx, g_scheduler, g_scheduler_stack, g_scheduler_stack_size, finished);
}

// The current fiber arrives at `b` and waits for the others; returns the phase's OR of predicates.
int arrive_and_wait(Barrier& b, int predicate) {
  Block& blk = *g_block;
  Fiber& self = blk.fibers[blk.current];
  b.acc |= predicate;
  ++b.arrived;
  self.state = kWaiting;
  self.waiting_on = &b;
  release_if_complete(b);
  if (self.state == kWaiting) yield_to_scheduler(self, false);
  return b.result;
}

// A fiber runs the kernel's body for its thread, leaves the barriers it counted in and hands back for good.
[[noreturn]] void fiber_entry() {
#if defined(MMFAST_EMU_STACK_SWITCH) && defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(nullptr, &g_scheduler_stack, &g_scheduler_stack_size);
#endif
  g_body(g_arg);
  Block& blk = *g_block;
  const int t = blk.current;
  blk.fibers[t].state = kDone;
  ++blk.done;
  --blk.block.live;
  --blk.warps[t / kWarp].live;
  --g_cluster->barrier.live;
  release_if_complete(blk.block);
  release_if_complete(blk.warps[t / kWarp]);
  release_if_complete(g_cluster->barrier);
  yield_to_scheduler(blk.fibers[t], true);
  std::fprintf(stderr, "cuda_emu: a finished thread was resumed\n");
  std::abort();
}

// Makes the fibers of `blk` (stacks from blk.first_stack) runnable at the kernel's entry.
void start_block(Block& blk) {
  for (int t = 0; t < blk.nt; ++t) {
    Fiber& f = blk.fibers[t];
    f.state = kRunnable;
    f.waiting_on = nullptr;
    make_context(f.ctx, stack_of(blk.first_stack + t), kStackBytes);
  }
  blk.done = 0;
  blk.block = Barrier{blk.nt};
  for (int w = 0; w < static_cast<int>(blk.warps.size()); ++w) {
    const int lanes = blk.nt - w * kWarp;
    blk.warps[w] = Barrier{lanes < kWarp ? lanes : kWarp};
  }
}

// One sweep over the threads of `blk` in the given order: each runnable thread runs until it waits or returns;
// true when some thread ran.
bool sweep_block(Block& blk, bool descending) {
  g_block = &blk;
  blockIdx = blk.index;
  bool moved = false;
  for (int i = 0; i < blk.nt; ++i) {
    const int t = descending ? blk.nt - 1 - i : i;
    if (blk.fibers[t].state != kRunnable) continue;
    blk.current = t;
    set_thread_index(t);
    switch_context(g_scheduler, blk.fibers[t].ctx, stack_of(blk.first_stack + t), kStackBytes);
    moved = true;
  }
  return moved;
}

// Runs the blocks of one cluster to their end; false when no live thread can move (a barrier some thread
// never reaches). Sweeps alternate between ascending and descending thread order, and blocks (and launches)
// alternate the order of their first sweep: a thread that reads what another writes in the same phase (a
// race: no barrier between them) sees a different value in one of the two orders. The blocks of a cluster
// take turns in alternating order too, either a sweep each (lockstep) or, with `greedy`, each block as far as
// it can go before the next one runs: a block that reads what another block writes without a cluster barrier
// between them then reads it unwritten.
bool run_cluster(Cluster& cl, bool greedy) {
  g_cluster = &cl;
  int threads = 0;
  for (Block& blk : cl.blocks) {
    start_block(blk);
    threads += blk.nt;
  }
  cl.barrier = Barrier{threads};
  const int nblocks = static_cast<int>(cl.blocks.size());
  std::vector<bool> descending(nblocks);
  for (int b = 0; b < nblocks; ++b) descending[b] = cl.blocks[b].first_descending;
  int finished = 0;
  for (int round = 0; finished < nblocks; ++round) {
    bool moved = false;
    finished = 0;
    for (int i = 0; i < nblocks; ++i) {
      const int b = round % 2 == 0 ? i : nblocks - 1 - i;
      Block& blk = cl.blocks[b];
      do {
        const bool ran = sweep_block(blk, descending[b]);
        descending[b] = !descending[b];
        moved = moved || ran;
        if (!ran) break;
      } while (greedy);
      finished += blk.done == blk.nt;
    }
    if (finished < nblocks && !moved) return false;
  }
  return true;
}

}  // namespace

cudaError_t set_func_max_dynamic_smem(const void* func, int bytes) {
  if (bytes < 0 || bytes > 227 * 1024) return cudaErrorInvalidValue;  // an H100's opt-in limit
  g_max_smem[func] = static_cast<size_t>(bytes);
  return cudaSuccess;
}

int sync_block(int predicate) { return arrive_and_wait(g_block->block, predicate); }

void sync_cluster() { arrive_and_wait(g_cluster->barrier, 0); }

uint64_t shfl_xor(uint64_t bits, int lane_mask, int width) {
  if (width != kWarp) {
    std::fprintf(stderr, "cuda_emu: __shfl_xor_sync with width %d is not emulated\n", width);
    std::abort();
  }
  Block& blk = *g_block;
  const int t = blk.current, warp = t / kWarp, lane = t % kWarp;
  blk.lanes[t] = bits;
  arrive_and_wait(blk.warps[warp], 0);
  const int partner = warp * kWarp + (lane ^ (lane_mask & (kWarp - 1)));
  const uint64_t value = partner < blk.nt ? blk.lanes[partner] : bits;
  arrive_and_wait(blk.warps[warp], 0);  // every lane has read before any lane writes again
  return value;
}

unsigned char* dynamic_smem() { return g_block->smem; }

void set_sm_count(int sms) { g_sm_count = sms; }

void set_compute_capability_major(int major) { g_cc_major = major; }

void set_l2_cache_bytes(int bytes) { g_l2_bytes = bytes; }

std::tuple<unsigned, unsigned, unsigned> last_launch() { return g_last_launch; }

void count_evict_first() { ++g_evict_first; }

uint64_t evict_first_accesses() { return g_evict_first; }

void launch(const void* func, dim3 grid, dim3 block, size_t smem, unsigned cluster, void (*body)(void*),
            void* arg) {
  const long long nt = static_cast<long long>(block.x) * block.y * block.z;
  const auto opted = g_max_smem.find(func);
  const size_t smem_limit = opted == g_max_smem.end() ? kDefaultSmem : opted->second;
  if (nt <= 0 || nt > kMaxThreads || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.y > kMaxGridYZ || grid.z > kMaxGridYZ || smem > smem_limit) {
    g_last_error = cudaErrorInvalidConfiguration;
    return;
  }
  // clusters along x only (what csrc/cuda launches): at most kMaxCluster blocks, dividing the grid, on a
  // device of compute capability 9 or more
  if (cluster == 0 || cluster > kMaxCluster || grid.x % cluster != 0 || (cluster > 1 && g_cc_major < 9)) {
    g_last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (g_block != nullptr) {
    std::fprintf(stderr, "cuda_emu: a kernel launched from inside a kernel\n");
    std::abort();
  }
  g_last_launch = {grid.x * grid.y * grid.z, static_cast<unsigned>(nt), cluster};
  Cluster cl;
  cl.blocks.resize(cluster);
  for (unsigned r = 0; r < cluster; ++r) {
    Block& blk = cl.blocks[r];
    blk.nt = static_cast<int>(nt);
    blk.fibers.resize(blk.nt);
    blk.warps.resize((blk.nt + kWarp - 1) / kWarp);
    blk.lanes.resize(blk.nt);
    blk.shared.resize(smem + 16);
    blk.smem = blk.shared.data() + (16 - reinterpret_cast<uintptr_t>(blk.shared.data()) % 16) % 16;
    blk.first_stack = static_cast<int>(r) * kMaxThreads;
  }
  g_body = body;
  g_arg = arg;
  blockDim = block;
  gridDim = grid;
  const unsigned launch_parity = g_launches++ % 2;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x0 = 0; x0 < grid.x; x0 += cluster) {
        for (unsigned r = 0; r < cluster; ++r) {
          Block& blk = cl.blocks[r];
          const unsigned x = x0 + r;
          blk.index = {x, y, z};
          blk.first_descending = ((x + y + z + launch_parity) % 2) == 1;
          std::memset(blk.smem, 0xff, smem);
        }
        if (!run_cluster(cl, cluster > 1 && ((x0 / cluster + launch_parity) % 2) == 1)) {
          std::fprintf(stderr, "cuda_emu: block (%u, %u, %u)%s cannot finish: a barrier that some thread never "
                               "reaches\n", x0, y, z, cluster > 1 ? " and its cluster" : "");
          g_last_error = cudaErrorLaunchFailure;
          g_block = nullptr;
          g_cluster = nullptr;
          return;
        }
      }
    }
  }
  g_block = nullptr;
  g_cluster = nullptr;
}

}  // namespace mmfast_emu

cudaError_t cudaGetLastError() {
  const cudaError_t e = mmfast_emu::g_last_error;
  mmfast_emu::g_last_error = cudaSuccess;
  return e;
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorNotSupported: return "operation not supported";
  }
  return "unknown error";
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = mmfast_emu::g_sm_count; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = mmfast_emu::g_cc_major; return cudaSuccess;
    case cudaDevAttrL2CacheSize: *value = mmfast_emu::g_l2_bytes; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
