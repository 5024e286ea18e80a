// Entry points of the native kernels. CPU ones live in csrc/cpu, CUDA ones in csrc/cuda.
#pragma once
#include "mmfast/params.h"

namespace mmfast {

// CPU (OpenMP over rows; num_threads <= 0 means the OpenMP default).
void routed_kd_cpu(const RoutedKDParams& p, int num_threads);
void mutual_kd_cpu(const MutualKDParams& p, int num_threads);
void masked_reconstruction_cpu(const MaskedReconParams& p, int num_threads);
void fdistill_cpu(const FDistillParams& p, int num_threads);
void uni_instruct_cpu(const UniInstructParams& p, int num_threads);
void fake_score_cpu(const FakeScoreParams& p, int num_threads);

// CPU kernels that move more bytes (read + written) than this write their large outputs with
// streaming (non-temporal) stores; the default (a negative value set) is the last-level cache size, at
// most 64 MiB (streaming_stores.cpp).
int64_t cpu_streaming_min_bytes();
void set_cpu_streaming_min_bytes(int64_t bytes);

// The x86-64 level the CPU kernels that write a cache line at a time (csrc/cpu/streaming_stores.h:
// f-distill, Uni-Instruct, fake score, masked reconstruction) run at: 4 (AVX-512), 3 (AVX2) or 0
// (baseline SSE2). By default this CPU's highest; set_cpu_isa_level caps it (0-2 mean the baseline; a
// negative value removes the cap), so one machine can run the code of each lower level. Values agree
// to rounding across levels (FMA contraction differs).
int cpu_isa_level();
void set_cpu_isa_level(int level);

// The CPU routed-KD and mutual-KD kernels run rows of at most this many
// classes a vector of rows at a time (one row per lane, csrc/cpu/row_tiles.h), longer rows one at a
// time. -1 (the default; any negative value set): each kernel's own measured bound. The values agree
// to rounding either way.
int64_t cpu_row_tile_max_classes();
void set_cpu_row_tile_max_classes(int64_t classes);

// Which team of threads the CUDA routed-KD, mutual-KD and masked-reconstruction kernels give one row
// (csrc/cuda/common.cuh): kCudaRowTeamAuto (the default) a thread per row for class-strided rows and
// (not masked reconstruction) rows of few classes, a thread-block cluster per row for many long rows of class
// logits (routed and mutual KD, compute capability 9.0+), else a block; kCudaRowTeamBlock /
// kCudaRowTeamThread / kCudaRowTeamCluster force one (tests: all run the same problems; rows of more than 1024
// classes, and rows whose thread-team tables would not fit the default shared memory, always run as blocks;
// forced clusters cut every routed/mutual-KD row of class logits of two chunks or more, other rows run as
// blocks). A few long rows (fewer than the SMs) are split over blocks in three launches in automatic mode.
constexpr int kCudaRowTeamAuto = 0, kCudaRowTeamBlock = 1, kCudaRowTeamThread = 2, kCudaRowTeamCluster = 3;
int cuda_row_team();
void set_cuda_row_team(int team);  // std::invalid_argument outside the three values

// How the CUDA routed-KD and mutual-KD kernels' teams go over a row in the passes after the first
// (csrc/cuda/common.cuh: RowSweep). kCudaSweepAuto (the default): a block-per-row launch whose rows in flight
// exceed the L2 sweeps pass 2 from each row's last chunk back to its first (it starts on what pass 1 read last,
// still in the L2) and marks the row's last read and the gradient stores evict-first in the L2; every other launch
// sweeps forward without hints. kCudaSweepBackHints / kCudaSweepBack / kCudaSweepForward force one of back and
// forth with the hints, back and forth without them, and forward, on every block- and thread-per-row launch (tests
// and benchmarks; the values agree to rounding). Pieces of rows (split and cluster mode) always sweep forward.
constexpr int kCudaSweepAuto = 0, kCudaSweepBackHints = 1, kCudaSweepBack = 2, kCudaSweepForward = 3;
int cuda_sweep_order();
void set_cuda_sweep_order(int order);  // std::invalid_argument outside the four values

// CUDA: enqueue on `stream` (a cudaStream_t); returns a cudaError_t code (0 = success).
int routed_kd_cuda(const RoutedKDParams& p, void* stream);
int mutual_kd_cuda(const MutualKDParams& p, void* stream);
int masked_reconstruction_cuda(const MaskedReconParams& p, void* stream);
int fdistill_cuda(const FDistillParams& p, void* stream);
int uni_instruct_cuda(const UniInstructParams& p, void* stream);
int fake_score_cuda(const FakeScoreParams& p, void* stream);
int scale_unless_one_cuda(const GradScaleParams& p, void* stream);

}  // namespace mmfast
