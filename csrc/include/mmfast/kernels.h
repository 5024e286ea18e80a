// Entry points of the native kernels. CPU ones live in csrc/cpu, CUDA ones in csrc/cuda.
#pragma once
#include "mmfast/params.h"

namespace mmfast {

// CPU (OpenMP over rows; num_threads <= 0 means the OpenMP default).
void routed_kd_cpu(const RoutedKDParams& p, int num_threads);
void mutual_kd_cpu(const MutualKDParams& p, int num_threads);

// CUDA: enqueue on `stream` (a cudaStream_t); returns a cudaError_t code (0 = success).
int routed_kd_cuda(const RoutedKDParams& p, void* stream);
int mutual_kd_cuda(const MutualKDParams& p, void* stream);

}  // namespace mmfast
