// Dtype shards. A kernel file whose instantiations take minutes to compile (the storage types x its
// compile-time variants, x 3 ISA clones on the CPU, x 2 architectures in CUDA) is built by CMakeLists.txt as
// one object per storage type, with MMFAST_DTYPE_SHARD set to that DType code (mmfast/params.h), plus one
// object with -1 for its dtype dispatch; the objects compile in parallel. Built without MMFAST_DTYPE_SHARD
// (the CUDA compile check, the CUDA emulation) the file holds everything. The file guards each storage
// type's explicit instantiation with MMFAST_BUILDS_DTYPE(code) and its dispatch with MMFAST_BUILDS_DISPATCH,
// and declares the instantiations `extern` in the dispatch-only object (MMFAST_DISPATCH_ONLY).
#pragma once

#ifdef MMFAST_DTYPE_SHARD
#define MMFAST_BUILDS_DTYPE(code) (MMFAST_DTYPE_SHARD == (code))
#define MMFAST_BUILDS_DISPATCH (MMFAST_DTYPE_SHARD == -1)
#define MMFAST_DISPATCH_ONLY (MMFAST_DTYPE_SHARD == -1)
#else
#define MMFAST_BUILDS_DTYPE(code) 1
#define MMFAST_BUILDS_DISPATCH 1
#define MMFAST_DISPATCH_ONLY 0
#endif
