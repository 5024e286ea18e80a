// Mutual (co-training) KD over M models (SPEC section 1, MST-Distill stage 1).
//
// With p_i = softmax(x_i / tau), T = sum_i log p_i, S = sum_i p_i (per class):
//   R_i = sum_c p_i (M log p_i - T)              (0 where p_i == 0; a NaN stays NaN)
//   loss = scale * sum_i R_i                     (= scale * sum over i != j of KL(p_j || p_i))
//   grad_i = scale / tau * (M p_i - S + p_i (M log p_i - T - R_i))
// One team per row n (a block, or a thread for rows of few classes and class-strided rows:
// common.cuh), grid-stride over rows. Pass 1: log-sum-exp of each model's row (one row at
// a time, so each is read once); pass 2: R_i (needs T, a sum over models, per class); pass 3 (only
// with a gradient): grad_i (needs S and T per class, and R_i). Base-2 logits as in routed_kd.cu.
// A few long rows (fewer than the SMs) are cut into pieces, a block per piece, one launch per pass
// (split mode, common.cuh; records of 2M floats).
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "mmfast/kernels.h"

namespace mmfast {
namespace cuda {
namespace {

struct MutualArgs {
  MutualKDParams p;
  float k2;     // log2(e) / tau
  float g;      // scale / tau
  float scale;  // tau^2 or 1
  Pieces pc;      // split mode, or whole rows
  int64_t units;  // N * pc.nsplit: (row, piece)
  RowSweep sweep; // passes 2 and 3 (common.cuh)
};

// Per-row tables of a team in dynamic shared memory (M models, a team of nt).
template <typename T, typename Team>
struct MutualShared {
  TeamArray<const T*, Team> row;  // [M] logits row of model i
  TeamArray<T*, Team> grow;       // [M] gradient row of model i (nullptr without a gradient)
  TeamArray<RowLse2, Team> lse;   // [M] log2-sum-exp2 of the scaled logits of model i
  TeamArray<float, Team> R;       // [M] R_i
  TeamArray<float, Team> part;    // [2M * nt] per-member partials, by column
};

__host__ __device__ __forceinline__ size_t mutual_fixed_bytes(int64_t M) {
  return static_cast<size_t>(M) * (2 * sizeof(void*) + sizeof(RowLse2) + sizeof(float));
}

template <typename T, typename Team>
__device__ __forceinline__ MutualShared<T, Team> carve_mutual(unsigned char* smem, int M) {
  SmemCarver<Team> c{smem};
  MutualShared<T, Team> sh;
  sh.row = c.template take<const T*>(M);
  sh.grow = c.template take<T*>(M);
  sh.lse = c.template take<RowLse2>(M);
  sh.R = c.template take<float>(M);
  sh.part = c.template take<float>(2 * M * Team::size());
  return sh;
}

// Base-2 log-probabilities of a chunk of model i (classes outside the row: -inf; `last`: the row's last read,
// evict-first).
template <typename T, typename Team>
__device__ __forceinline__ void log2_softmax_chunk(const MutualArgs& a, const MutualShared<T, Team>& sh, int i,
                                                   const RowChunks& rc, int c0, float (&l2)[kVec<T>], bool last) {
  load_chunk<T>(sh.row[i], a.p.s_c, c0, rc, -INFINITY, l2, last);
  const RowLse2 L = sh.lse[i];
#pragma unroll
  for (int v = 0; v < kVec<T>; ++v) l2[v] = L.log2_prob(l2[v], a.k2);
}

template <typename T, typename Team>
__global__ void __launch_bounds__(Team::kLaunchThreads, Team::kLaunchMinBlocks)
    mutual_kd_kernel(const MutualArgs a) {
  constexpr int V = kVec<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  const MutualKDParams& p = a.p;
  const int M = static_cast<int>(p.M), nt = Team::size(), tid = Team::lane();
  const float Mf = static_cast<float>(p.M);
  const MutualShared<T, Team> sh = carve_mutual<T, Team>(smem, M);
  const RowSweep sweep = sweep_of<Team>(a.sweep);  // passes 2 and 3

  for_each_unit<Team>(a.pc, a.units, [&](int64_t unit, int phase, int64_t slot) {
    const int64_t n = unit / pieces_of<Team>(a.pc);
    const int piece = static_cast<int>(unit - n * pieces_of<Team>(a.pc));
    Team::sync();  // the previous row is done with the tables
    for (int i = tid; i < M; i += nt) {
      sh.row[i] = static_cast<const T*>(p.logits) + i * p.s_m + n * p.s_n;
      sh.grow[i] = p.grad != nullptr ? static_cast<T*>(p.grad) + (i * p.N + n) * p.C : nullptr;
    }
    Team::sync();
    // vector accesses when every row has unit class stride and one alignment
    const uintptr_t residue = reinterpret_cast<uintptr_t>(sh.row[0]) % kChunkBytes<T>;
    bool vec = p.s_c == 1;
    for (int i = 0; vec && i < M; ++i) {
      vec = reinterpret_cast<uintptr_t>(sh.row[i]) % kChunkBytes<T> == residue &&
            (sh.grow[i] == nullptr || reinterpret_cast<uintptr_t>(sh.grow[i]) % kChunkBytes<T> == residue);
    }
    const RowChunks rc = make_chunks<T>(static_cast<int>(p.C), vec, residue);
    int j0, j1;  // this team's chunks
    piece_range<Team>(a.pc, piece, rc.nchunks, j0, j1);

    // pass 1
    const bool whole = pieces_lse<Team>(a.pc, phase, slot, piece, sh.part, M, sh.lse, [&] {
      for (int i = 0; i < M; ++i) lse_sweep<T, Team>(sh.row[i], p.s_c, rc, j0, j1, a.k2, sh.part, i);
    });
    if (!whole) return;

    // pass 2: R_i partials in column i (split phase 3: summed over the pieces)
    for (int i = 0; i < M; ++i) sh.part[i * nt + tid] = 0.f;
    const bool last2 = sweep.evict_first && p.grad == nullptr;  // no pass 3 reads the row again
    const bool ev = sweep.evict_first;
    for (int step = j0 + tid; phase != 3 && step < j1; step += nt) {
      const int c0 = swept_chunk(step, j0, j1, sweep.back) * V - rc.shift;
      float T2[V];  // T in base-2 units
#pragma unroll
      for (int v = 0; v < V; ++v) T2[v] = 0.f;
      for (int i = 0; i < M; ++i) {
        float l2[V];
        log2_softmax_chunk<T, Team>(a, sh, i, rc, c0, l2, false);  // read again below
#pragma unroll
        for (int v = 0; v < V; ++v) T2[v] += l2[v];
      }
      for (int i = 0; i < M; ++i) {
        float l2[V];
        log2_softmax_chunk<T, Team>(a, sh, i, rc, c0, l2, last2);
        float acc = 0.f;
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const float pv = exp2f(l2[v]);
          acc += in_row(c0 + v, rc.C) && pv != 0.f ? pv * fmaf(Mf, l2[v], -T2[v]) : 0.f;
        }
        sh.part[i * nt + tid] += acc * kLn2;
      }
    }
    if (!pieces_sums<Team>(a.pc, phase, slot, piece, sh.part, M, sh.R)) return;
    if (tid == 0 && (!Team::kPieces || piece == 0)) {
      float loss = 0.f;
      for (int i = 0; i < M; ++i) loss += sh.R[i];
      static_cast<float*>(p.loss)[n] = a.scale * loss;
    }
    if (p.grad == nullptr) return;

    // pass 3
    for (int j = j0 + tid; j < j1; j += nt) {
      const int c0 = j * V - rc.shift;
      float T2[V], S[V];
#pragma unroll
      for (int v = 0; v < V; ++v) T2[v] = S[v] = 0.f;
      for (int i = 0; i < M; ++i) {
        float l2[V];
        log2_softmax_chunk<T, Team>(a, sh, i, rc, c0, l2, false);  // read again below
#pragma unroll
        for (int v = 0; v < V; ++v) {
          T2[v] += l2[v];
          S[v] += exp2f(l2[v]);
        }
      }
      for (int i = 0; i < M; ++i) {
        float l2[V];
        log2_softmax_chunk<T, Team>(a, sh, i, rc, c0, l2, ev);
        const float Ri = sh.R[i];
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const float pv = exp2f(l2[v]);
          const float self = pv == 0.f ? 0.f : pv * (fmaf(Mf, l2[v], -T2[v]) * kLn2 - Ri);
          l2[v] = a.g * (fmaf(Mf, pv, -S[v]) + self);
        }
        store_chunk<T>(sh.grow[i], 1, c0, rc, l2, ev);
      }
    }
  });
}

// A thread per row (few classes, or class-strided rows whose neighbours are neighbours in memory),
// a block per row, (a few long rows) a block per piece of a row in three launches, or (many long rows,
// sm_90+) a thread-block cluster per row (common.cuh: cluster mode).
template <typename T>
int launch_mutual(const MutualArgs& a, cudaStream_t stream) {
  const size_t fixed = mutual_fixed_bytes(a.p.M);
  const size_t per_thread = static_cast<size_t>(2 * a.p.M) * sizeof(float);
  const int rec = static_cast<int>(2 * a.p.M);
  int64_t clusters = 0;
  const Pieces cl = cluster_plan(a.p.N, a.p.C, kVec<T>, rec, static_cast<int>(a.p.M), static_cast<int>(sizeof(T)),
                                 a.p.workspace, a.p.workspace_floats, clusters);
  const Pieces pc = cl.nsplit > 1 && cuda_row_team() == kCudaRowTeamCluster
                        ? whole_rows()
                        : piece_plan(a.p.N, a.p.C, kVec<T>, rec, a.p.workspace, a.p.workspace_floats);
  if (pc.nsplit <= 1 && cl.nsplit > 1) {
    MutualArgs ca = a;
    ca.pc = cl;
    ca.units = a.p.N * cl.nsplit;
    const int nt = ClusterTeam::threads(
        threads_for_row(static_cast<int64_t>(cl.span) * kVec<T>, kVec<T>, fixed, 2 * a.p.M));
    return launch_cluster_with_smem(mutual_kd_kernel<T, ClusterTeam>, ca, static_cast<unsigned>(clusters * cl.nsplit),
                                    nt, fixed + per_thread * nt, cl.nsplit, stream);
  }
  if (pc.nsplit > 1) {
    MutualArgs sa = a;
    sa.pc = pc;
    sa.units = a.p.N * pc.nsplit;
    const int nt = threads_for_row(static_cast<int64_t>(pc.span) * kVec<T>, kVec<T>, fixed, 2 * a.p.M);
    const unsigned grid = static_cast<unsigned>(sa.units < kMaxBlocks ? sa.units : kMaxBlocks);
    for (int phase = 1; phase <= 3; ++phase) {
      sa.pc.phase = phase;
      const int err =
          launch_with_smem(mutual_kd_kernel<T, PieceTeam>, sa, grid, nt, fixed + per_thread * nt, stream);
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  }
  const int rows_per_block = thread_team_threads(a.p.C, a.p.s_c != 1 && a.p.s_n == 1, fixed + per_thread);
  if (rows_per_block > 0) {
    return launch_with_smem(mutual_kd_kernel<T, ThreadTeam>, a, thread_team_grid(a.p.N, rows_per_block),
                            rows_per_block, rows_per_block * (fixed + per_thread), stream);
  }
  // a block per row: rows of class logits whose rows in flight exceed the L2 sweep back and forth (common.cuh)
  MutualArgs ba = a;
  ba.sweep = row_sweep(a.p.s_c == 1 && rows_in_flight_exceed_l2(a.p.N, a.p.C, static_cast<int>(a.p.M),
                                                                static_cast<int>(sizeof(T))));
  const int nt = threads_for_row(a.p.C, kVec<T>, fixed, 2 * a.p.M);
  const int64_t grid = a.p.N < kMaxBlocks ? a.p.N : kMaxBlocks;
  return launch_with_smem(mutual_kd_kernel<T, BlockTeam>, ba, static_cast<unsigned>(grid), nt,
                          fixed + per_thread * nt, stream);
}

}  // namespace
}  // namespace cuda

int mutual_kd_cuda(const MutualKDParams& p, void* stream) {
  using namespace cuda;
  if (p.N <= 0) return cudaSuccess;
  if (p.M < 1 || p.C < 0 || p.C > kMaxClasses) return cudaErrorInvalidValue;
  MutualArgs a;
  a.p = p;
  a.k2 = static_cast<float>(p.inv_tau * 1.4426950408889634);
  a.g = static_cast<float>(p.scale * p.inv_tau);
  a.scale = static_cast<float>(p.scale);
  a.pc = whole_rows();  // launch_mutual may split them
  a.units = p.N;
  a.sweep = row_sweep(false);  // launch_mutual's block-per-row launch may stream its rows
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(p.dtype, [&](auto t) { return launch_mutual<decltype(t)>(a, s); });
}

}  // namespace mmfast
