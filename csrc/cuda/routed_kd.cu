// Routed teacher-mixture KD (SPEC section 1): per-row loss and gradients, written in the forward.
//
// One team per row (b, s) (a block, or a thread for short and class-strided rows: common.cuh),
// grid-stride over the B * S rows. With u = x / tau, q = softmax(u),
// p_k = softmax(z_k / tau) for routing slot k (teacher idx[b, k], weight w_k), the divergence is
// written through A = dD/dlog q and B = dD/dlog P (G = dD/dP for the probs mix), so that
//   dL/du = A - q sum_c(A),   dL/dv = B - P sum_c(B)          (mmfast/reference/routed_kd.py).
// Logits are handled in base 2: a = x * log2(e) / tau, log q = (a - lse2) * ln 2, q = exp2(a - lse2)
// (one exp2 per element and pass). Passes over the row:
//   1. online log-sum-exp of the student and of each slot's teacher (mix "logits": of the mixed
//      logits), one source at a time so each row is read once;
//   2. the row sums of the divergence, plus every gradient that needs no row sum (KL: sum A is the
//      teacher mass; reverse KL: sum B = -1);
//   3. only when a gradient needs a row sum of pass 2: those gradients.
// Per-slot statistics live in shared memory (sized by K at launch), never in per-thread arrays.
// A batch of fewer class-logit rows than the GPU has SMs (a few very long rows) runs in split mode
// (common.cuh): the passes above become three launches over pieces of the rows, the loss and dw
// written by each row's first piece. There the mix "logits" dw, a row sum of pass-3 gradients, is
// formed from two pass-2 sums instead: dw_k = sum_c B v_k - (sum_c B) sum_c P v_k.
// With sparse routing a teacher's dz row is written by the first slot that selects it, with the
// summed weight of all its slots (every factor but w_k is identical for those slots), added into
// the caller's zero-filled dz. An index outside [0, E) is never dereferenced: the row's loss and
// gradients become NaN (dz: NaN at the clamped teacher rows, as the reference). Masked rows write
// zeros and read neither x nor z.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "common.cuh"
#include "mmfast/dtype_shards.h"
#include "mmfast/kernels.h"

namespace mmfast {
namespace cuda {
namespace {

struct RoutedArgs {
  RoutedKDParams p;
  int64_t N;         // rows, B * S
  float k2;          // log2(e) / tau
  float inv_tau;     // 1 / tau
  float g;           // scale / tau: d loss / d logit = g * d L / d u
  float scale;       // tau^2 or 1
  float beta;        // JS mixing weight
  float log_beta;    // log(beta)
  float log1m_beta;  // log(1 - beta)
  Pieces pc;      // split mode (common.cuh; records of 2K + 2 floats), or whole rows
  int64_t units;  // N * pc.nsplit blocks' worth of work: (row, piece)
  RowSweep sweep; // passes 2 and 3 (common.cuh)
};

__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }


// ---------------------------------------------------------------------------------------------
// Divergence, elementwise and per row
// ---------------------------------------------------------------------------------------------

// One class of D(P || q): the row sums S1/S2 it feeds, A = dD/dlog q, B = dD/dlog P, G = dD/dP.
struct Elem {
  float s1, s2, A, B, G;
};

// log(exp(a) + exp(b)); -inf when both are -inf; NaN propagates.
__device__ __forceinline__ float logaddexp(float a, float b) {
  const float hi = a > b ? a : b, lo = a > b ? b : a;  // a NaN lands in lo or hi: result NaN
  if (hi == -INFINITY && lo == -INFINITY) return -INFINITY;
  return hi + log1pf(__expf(lo - hi));
}

template <int Div>
__device__ __forceinline__ Elem elem(float lP, float P, float lq, float q, const RoutedArgs& a) {
  Elem e{0.f, 0.f, 0.f, 0.f, 0.f};
  if constexpr (Div == kKL) {  // P (log P - log q); 0 where P == 0 (a NaN stays NaN)
    const float t = P == 0.f ? 0.f : P * (lP - lq);
    e.s1 = t;
    e.A = -P;
    e.B = t + P;
    e.G = lP - lq + 1.f;
  } else if constexpr (Div == kReverseKL) {  // q (log q - log P)
    const float t = q == 0.f ? 0.f : q * (lq - lP);
    e.s1 = t;
    e.A = t + q;
    e.B = -q;  // G = -q / P: the probs mix forms p_k G in log space (p_times_G)
  } else if constexpr (Div == kJS) {  // beta KL(P || M) + (1 - beta) KL(q || M), M mixed in log space
    const float lM = logaddexp(lP + a.log_beta, lq + a.log1m_beta);
    const float tp = P == 0.f ? 0.f : P * (lP - lM);
    const float tq = q == 0.f ? 0.f : q * (lq - lM);
    e.s1 = tp;
    e.s2 = tq;
    e.A = (1.f - a.beta) * tq;
    e.B = a.beta * tp;
    e.G = a.beta * (lP - lM);
  } else {  // TVD: 0.5 |P - q| = A + B with A = 0.5 q sign(q - P), B = -0.5 P sign(q - P)
    const float d = q - P;
    const float sgn = static_cast<float>(d > 0.f) - static_cast<float>(d < 0.f);  // sign(0) = 0
    e.A = 0.5f * q * sgn;
    e.B = -0.5f * P * sgn;
    e.s1 = e.A;
    e.s2 = e.B;
    e.G = -0.5f * sgn;
  }
  return e;
}

// Row value D and the row sums of A and B from the accumulated S1, S2. `mass` = sum_c P
// (1 for a softmax, W = sum_k w_k for the probs mix).
struct RowSums {
  float D, SA, SB;
};

template <int Div>
__device__ __forceinline__ RowSums row_sums(float S1, float S2, float mass, float beta) {
  if constexpr (Div == kKL) return {S1, -mass, S1 + mass};
  if constexpr (Div == kReverseKL) return {S1, S1 + 1.f, -1.f};
  if constexpr (Div == kJS) return {beta * S1 + (1.f - beta) * S2, (1.f - beta) * S2, beta * S1};
  return {S1 + S2, S1, S2};
}

// ---------------------------------------------------------------------------------------------
// Shared memory and row setup
// ---------------------------------------------------------------------------------------------

// Per-row tables of a team in dynamic shared memory (K slots, a team of nt), in this order.
template <typename T, typename Team>
struct RoutedShared {
  TeamArray<const T*, Team> zrow;  // [K] teacher row of slot k (clamped index; never read for an invalid row)
  TeamArray<T*, Team> dzrow;       // [K] dz row slot k writes; nullptr when an earlier slot has the same teacher
  TeamArray<RowLse2, Team> lse;    // [K + 1] log2-sum-exp2 of the scaled student row (0) and teachers (1 + k)
  TeamArray<float, Team> w;        // [K] routing weight
  TeamArray<float, Team> wdz;      // [K] summed weight of the slots of slot k's teacher
  TeamArray<float, Team> inf_nan;  // [K] 1 where those weights include a zero or both signs (see write_dz)
  TeamArray<float, Team> lw2;      // [K] log2 w
  TeamArray<float, Team> red;      // [2K + 2] column-reduction results
  TeamArray<float, Team> W;        // [1] sum_k w_k
  TeamArray<float, Team> part;     // [(2K + 2) * nt] per-member partials, by column
};

__host__ __device__ __forceinline__ int64_t routed_columns(int64_t K) { return 2 * K + 2; }

__host__ __device__ __forceinline__ size_t routed_fixed_bytes(int64_t K) {
  return static_cast<size_t>(K) * 2 * sizeof(void*) +
         static_cast<size_t>(4 * K + 2 * (K + 1) + routed_columns(K) + 1) * sizeof(float);
}

template <typename T, typename Team>
__device__ __forceinline__ RoutedShared<T, Team> carve_routed(unsigned char* smem, int K) {
  SmemCarver<Team> c{smem};
  RoutedShared<T, Team> sh;
  sh.zrow = c.template take<const T*>(K);
  sh.dzrow = c.template take<T*>(K);
  sh.lse = c.template take<RowLse2>(K + 1);
  sh.w = c.template take<float>(K);
  sh.wdz = c.template take<float>(K);
  sh.inf_nan = c.template take<float>(K);
  sh.lw2 = c.template take<float>(K);
  sh.red = c.template take<float>(routed_columns(K));
  sh.W = c.template take<float>(1);
  sh.part = c.template take<float>(routed_columns(K) * Team::size());
  return sh;
}

template <typename T>
struct RoutedRow {
  int64_t row;  // b * S + s
  int piece;    // split and cluster mode: the piece of the row this block owns (0 otherwise)
  int phase;    // split and cluster mode: the phase (1-3) this pass over the unit is; 0 otherwise
  int64_t slot; // split and cluster mode: the workspace records of the row (common.cuh: pieces_lse)
  const T* x;   // student row, class stride p.sx_c
  T* dx;        // dx row (class stride S) or nullptr
  RowChunks rc;
  int j0, j1;   // the chunks of the row this team sweeps
};

// dz of slot k's teacher from X = dL/dv / w (the same for every slot of that teacher):
// g * (sum of their weights) * X, added into the caller's zero-filled dz with sparse routing,
// written with dense routing. The summed weight gives the reference's sum over the slots except
// where X = +-inf and the weights include a zero or both signs: that sum is NaN there.
template <typename T, typename Team>
__device__ __forceinline__ void write_dz(const RoutedArgs& a, const RoutedShared<T, Team>& sh, int k, int c0,
                                         const RowChunks& rc, float (&X)[kVec<T>]) {
  const bool evict = sweep_of<Team>(a.sweep).evict_first;
  const float gw = a.g * sh.wdz[k];
  const bool inf_nan = sh.inf_nan[k] != 0.f;
#pragma unroll
  for (int i = 0; i < kVec<T>; ++i) X[i] = inf_nan && fabsf(X[i]) == INFINITY ? quiet_nan() : gw * X[i];
  if (a.p.idx != nullptr) {
    store_chunk<T, true>(sh.dzrow[k], a.p.S, c0, rc, X, evict);
  } else {
    store_chunk<T, false>(sh.dzrow[k], a.p.S, c0, rc, X, evict);
  }
}

// Fills the slot tables of work unit `unit` (row, piece) in `phase` (common.cuh: for_each_unit). Rows with an
// index outside [0, E) (NaN) and masked rows (zeros) are written here (split and cluster mode: the piece's
// classes, in phase 1) and give false. Uniform over the team; starts with a barrier that ends the previous
// row's use of the tables.
template <typename T, typename Team>
__device__ bool setup_routed_row(const RoutedArgs& a, const RoutedShared<T, Team>& sh, int64_t unit, int phase,
                                 int64_t slot, RoutedRow<T>& r) {
  const RoutedKDParams& p = a.p;
  const int64_t nsplit = pieces_of<Team>(a.pc), row = unit / nsplit;
  r.row = row;
  r.piece = static_cast<int>(unit - row * nsplit);
  r.phase = phase;
  r.slot = slot;
  const int K = static_cast<int>(p.K);
  const int64_t b = row / p.S, s = row - b * p.S;
  const float* w = static_cast<const float*>(p.w) + b * K;
  const int64_t* idx = p.idx != nullptr ? p.idx + b * K : nullptr;
  const T* z = static_cast<const T*>(p.z);
  T* dz = static_cast<T*>(p.dz);

  Team::sync();
  int bad = 0;
  for (int k = Team::lane(); k < K; k += Team::size()) {
    const int64_t e = idx != nullptr ? idx[k] : k;
    bad |= e < 0 || e >= p.E;
    const int64_t ec = e < 0 ? 0 : (e >= p.E ? p.E - 1 : e);
    sh.zrow[k] = z + ec * p.sz_e + b * p.sz_b + s * p.sz_s;
    sh.w[k] = w[k];
    sh.lw2[k] = log2f(w[k]);
    if (dz != nullptr) {
      float wsum = w[k];
      bool first = true, zero = false, pos = false, neg = false;
      if (idx != nullptr) {
        wsum = 0.f;
        for (int k2 = 0; k2 < K; ++k2) {
          if (idx[k2] == e) {
            first = first && k2 >= k;
            wsum += w[k2];
            zero = zero || w[k2] == 0.f;
            pos = pos || w[k2] > 0.f;
            neg = neg || w[k2] < 0.f;
          }
        }
      }
      sh.wdz[k] = wsum;
      sh.inf_nan[k] = zero || (pos && neg) ? 1.f : 0.f;
      sh.dzrow[k] = first ? dz + (ec * p.B + b) * p.C * p.S + s : nullptr;
    }
  }
  if (Team::leader()) {
    float W = 0.f;
    for (int k = 0; k < K; ++k) W += w[k];
    sh.W[0] = W;
  }
  bad = Team::any(bad);

  T* dx = p.dx != nullptr ? static_cast<T*>(p.dx) + b * p.C * p.S + s : nullptr;
  const bool masked = p.mask != nullptr && p.mask[row] == 0;
  if (bad || masked) {
    if (phase > 1) return false;  // written in phase 1
    const float v = bad ? quiet_nan() : 0.f;
    if (r.piece == 0) {
      if (Team::leader()) static_cast<float*>(p.loss)[row] = v;
      if (p.dw != nullptr) {
        for (int k = Team::lane(); k < K; k += Team::size()) static_cast<float*>(p.dw)[row * K + k] = v;
      }
    }
    int64_t c_lo, c_hi;  // this piece's classes (the whole row unless split)
    piece_classes<Team>(a.pc, r.piece, kVec<T>, p.C, c_lo, c_hi);
    if (dx != nullptr) fill_row<T, Team>(dx + c_lo * p.S, p.S, c_hi - c_lo, v);
    if (dz != nullptr && (bad || idx == nullptr)) {  // sparse masked rows leave dz untouched
      for (int k = 0; k < K; ++k) {
        if (sh.dzrow[k] != nullptr) fill_row<T, Team>(sh.dzrow[k] + c_lo * p.S, p.S, c_hi - c_lo, v);
      }
    }
    return false;
  }

  r.x = static_cast<const T*>(p.x) + b * p.sx_b + s * p.sx_s;
  r.dx = dx;
  // vector accesses when every row involved has unit class stride and one alignment
  const uintptr_t residue = reinterpret_cast<uintptr_t>(r.x) % kChunkBytes<T>;
  bool vec = p.sx_c == 1 && p.sz_c == 1 && (p.S == 1 || (dx == nullptr && dz == nullptr));
  if (vec && dx != nullptr) vec = reinterpret_cast<uintptr_t>(dx) % kChunkBytes<T> == residue;
  for (int k = 0; vec && k < K; ++k) {
    vec = reinterpret_cast<uintptr_t>(sh.zrow[k]) % kChunkBytes<T> == residue &&
          (dz == nullptr || sh.dzrow[k] == nullptr || reinterpret_cast<uintptr_t>(sh.dzrow[k]) % kChunkBytes<T> == residue);
  }
  r.rc = make_chunks<T>(static_cast<int>(p.C), vec, residue);
  piece_range<Team>(a.pc, r.piece, r.rc.nchunks, r.j0, r.j1);
  return true;
}

// log p and p = softmax(logits / tau) of a chunk of a row with log2-sum-exp2 `L` (`last`: the row's last read,
// evict-first).
template <typename T>
__device__ __forceinline__ void log_softmax_chunk(const T* row, int64_t stride, int c0, const RowChunks& rc,
                                                  float k2, RowLse2 L, float (&lp)[kVec<T>],
                                                  float (&pr)[kVec<T>], bool last) {
  float v[kVec<T>];
  load_chunk<T>(row, stride, c0, rc, -INFINITY, v, last);
#pragma unroll
  for (int i = 0; i < kVec<T>; ++i) {
    const float d = L.log2_prob(v[i], k2);
    lp[i] = d * kLn2;
    pr[i] = exp2f(d);
  }
}

// Pass 1 for the student and every slot's teacher: sh.lse[0] and sh.lse[1 + k] (see pieces_lse).
template <typename T, typename Team>
__device__ __forceinline__ bool student_teacher_lse(const RoutedArgs& a, const RoutedShared<T, Team>& sh,
                                                    const RoutedRow<T>& r) {
  const int K = static_cast<int>(a.p.K);
  return pieces_lse<Team>(a.pc, r.phase, r.slot, r.piece, sh.part, K + 1, sh.lse, [&] {
    lse_sweep<T, Team>(r.x, a.p.sx_c, r.rc, r.j0, r.j1, a.k2, sh.part, 0);
    for (int k = 0; k < K; ++k) lse_sweep<T, Team>(sh.zrow[k], a.p.sz_c, r.rc, r.j0, r.j1, a.k2, sh.part, 1 + k);
  });
}

// ---------------------------------------------------------------------------------------------
// mix = "loss": L = sum_k w_k D(p_k || q)
//   dx = g (sum_k w_k A_k - q sum_k w_k sum_c A_k),  dz_k = g w_k (B_k - p_k sum_c B_k),  dw_k = D_k
// ---------------------------------------------------------------------------------------------
template <typename T, typename Team, int Div>
__global__ void __launch_bounds__(Team::kLaunchThreads, Team::kLaunchMinBlocks)
    routed_loss_kernel(const RoutedArgs a) {
  constexpr int V = kVec<T>;
  constexpr int NQ = (Div == kJS || Div == kTVD) ? 2 : 1;  // row sums per slot
  extern __shared__ __align__(16) unsigned char smem[];
  const RoutedKDParams& p = a.p;
  const int K = static_cast<int>(p.K), nt = Team::size(), tid = Team::lane();
  const RoutedShared<T, Team> sh = carve_routed<T, Team>(smem, K);
  const RowSweep sweep = sweep_of<Team>(a.sweep);  // passes 2 and 3
  // KL: sum_c A = -W, so dx needs no row sum; reverse KL: sum_c B_k = -1, so dz_k needs none.
  const bool dx_pass2 = Div == kKL && p.dx != nullptr, dx_pass3 = Div != kKL && p.dx != nullptr;
  const bool dz_pass2 = Div == kReverseKL && p.dz != nullptr, dz_pass3 = Div != kReverseKL && p.dz != nullptr;

  for_each_unit<Team>(a.pc, a.units, [&](int64_t unit, int phase, int64_t slot) {
    RoutedRow<T> r;
    if (!setup_routed_row<T, Team>(a, sh, unit, phase, slot, r)) return;
    const int64_t row = r.row;
    const bool results = !Team::kPieces || r.piece == 0;  // the row's loss and dw: one block of a split row
    if (!student_teacher_lse<T, Team>(a, sh, r)) return;
    const RowLse2 Lq = sh.lse[0];
    const float W = sh.W[0];

    // pass 2: S1_k, S2_k in columns k, K + k (split phase 3: summed over the pieces instead)
    for (int col = 0; col < NQ * K; ++col) sh.part[col * nt + tid] = 0.f;
    const bool last2 = sweep.evict_first && !dx_pass3 && !dz_pass3;  // no pass 3 reads the row again
    const bool ev = sweep.evict_first;
    for (int step = r.j0 + tid; phase != 3 && step < r.j1; step += nt) {
      const int c0 = swept_chunk(step, r.j0, r.j1, sweep.back) * V - r.rc.shift;
      float lq[V], q[V], wp[V];  // wp = sum_k w_k p_k
      log_softmax_chunk<T>(r.x, p.sx_c, c0, r.rc, a.k2, Lq, lq, q, last2);
#pragma unroll
      for (int i = 0; i < V; ++i) wp[i] = 0.f;
      for (int k = 0; k < K; ++k) {
        float lp[V], pk[V], dv[V];
        log_softmax_chunk<T>(sh.zrow[k], p.sz_c, c0, r.rc, a.k2, sh.lse[1 + k], lp, pk, last2);
        const float wk = sh.w[k];
        float s1 = 0.f, s2 = 0.f;
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const Elem e = elem<Div>(lp[i], pk[i], lq[i], q[i], a);
          if (in_row(c0 + i, r.rc.C)) {
            s1 += e.s1;
            s2 += e.s2;
          }
          wp[i] = fmaf(wk, pk[i], wp[i]);
          dv[i] = pk[i] - q[i];  // reverse KL: B_k - p_k sum B_k = p_k - q
        }
        sh.part[k * nt + tid] += s1;
        if constexpr (NQ == 2) sh.part[(K + k) * nt + tid] += s2;
        if (dz_pass2 && sh.dzrow[k] != nullptr) write_dz<T, Team>(a, sh, k, c0, r.rc, dv);
      }
      if (dx_pass2) {  // KL: A - q sum A = q W - sum_k w_k p_k
        float d[V];
#pragma unroll
        for (int i = 0; i < V; ++i) d[i] = a.g * fmaf(W, q[i], -wp[i]);
        store_chunk<T>(r.dx, p.S, c0, r.rc, d, ev);
      }
    }
    if (!pieces_sums<Team>(a.pc, phase, slot, r.piece, sh.part, NQ * K, sh.red)) return;

    float L = 0.f, SA = 0.f;  // sum_k w_k D_k, sum_k w_k sum_c A_k
    for (int k = 0; k < K; ++k) {
      const RowSums rs = row_sums<Div>(sh.red[k], NQ == 2 ? sh.red[K + k] : 0.f, 1.f, a.beta);
      L = fmaf(sh.w[k], rs.D, L);
      SA = fmaf(sh.w[k], rs.SA, SA);
    }
    if (results && tid == 0) static_cast<float*>(p.loss)[row] = a.scale * L;
    if (results && p.dw != nullptr) {
      for (int k = tid; k < K; k += nt) {
        const RowSums rs = row_sums<Div>(sh.red[k], NQ == 2 ? sh.red[K + k] : 0.f, 1.f, a.beta);
        static_cast<float*>(p.dw)[row * K + k] = a.scale * rs.D;
      }
    }
    if (!dx_pass3 && !dz_pass3) return;

    // pass 3: the gradients that need the row sums
    for (int j = r.j0 + tid; j < r.j1; j += nt) {
      const int c0 = j * V - r.rc.shift;
      float lq[V], q[V], A[V];  // A = sum_k w_k A_k
      log_softmax_chunk<T>(r.x, p.sx_c, c0, r.rc, a.k2, Lq, lq, q, ev);
#pragma unroll
      for (int i = 0; i < V; ++i) A[i] = 0.f;
      for (int k = 0; k < K; ++k) {
        float lp[V], pk[V], dv[V];
        log_softmax_chunk<T>(sh.zrow[k], p.sz_c, c0, r.rc, a.k2, sh.lse[1 + k], lp, pk, ev);
        const float wk = sh.w[k];
        const float SB = row_sums<Div>(sh.red[k], NQ == 2 ? sh.red[K + k] : 0.f, 1.f, a.beta).SB;
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const Elem e = elem<Div>(lp[i], pk[i], lq[i], q[i], a);
          A[i] = fmaf(wk, e.A, A[i]);
          dv[i] = fmaf(-pk[i], SB, e.B);
        }
        if (dz_pass3 && sh.dzrow[k] != nullptr) write_dz<T, Team>(a, sh, k, c0, r.rc, dv);
      }
      if (dx_pass3) {
        float d[V];
#pragma unroll
        for (int i = 0; i < V; ++i) d[i] = a.g * fmaf(-q[i], SA, A[i]);
        store_chunk<T>(r.dx, p.S, c0, r.rc, d, ev);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// mix = "logits": vbar = sum_k w_k v_k, P = softmax(vbar), L = D(P || q)
//   dx = g (A - q sum A),  dvbar = B - P sum B,  dz_k = g w_k dvbar,  dw_k = sum_c dvbar v_k
// ---------------------------------------------------------------------------------------------

// The mixed logits of a chunk in base-2 units, -inf outside the row (`last`: the rows' last read, evict-first).
template <typename T, typename Team>
__device__ __forceinline__ void mixed_logits_chunk(const RoutedArgs& a, const RoutedShared<T, Team>& sh,
                                                   const RowChunks& rc, int c0, float (&vb)[kVec<T>], bool last) {
#pragma unroll
  for (int i = 0; i < kVec<T>; ++i) vb[i] = 0.f;
  for (int k = 0; k < static_cast<int>(a.p.K); ++k) {
    float zk[kVec<T>];
    load_chunk<T>(sh.zrow[k], a.p.sz_c, c0, rc, 0.f, zk, last);
    const float wk2 = sh.w[k] * a.k2;
#pragma unroll
    for (int i = 0; i < kVec<T>; ++i) vb[i] = fmaf(wk2, zk[i], vb[i]);
  }
#pragma unroll
  for (int i = 0; i < kVec<T>; ++i) vb[i] = in_row(c0 + i, rc.C) ? vb[i] : -INFINITY;
}

// Given dvbar of a chunk (0 outside the row): dz_k (slots that own a dz row) and, with `with_dw`,
// the dw_k partial sum_c dvbar v_k into column col0 + k (`last`: the teacher rows' last read, evict-first).
template <typename T, typename Team>
__device__ __forceinline__ void mixed_logits_slot_grads(const RoutedArgs& a, const RoutedShared<T, Team>& sh,
                                                        const RowChunks& rc, int c0,
                                                        const float (&dvb)[kVec<T>], int col0, bool with_dw,
                                                        bool last) {
  constexpr int V = kVec<T>;
  const RoutedKDParams& p = a.p;
  for (int k = 0; k < static_cast<int>(p.K); ++k) {
    if (with_dw) {
      float zk[V];
      load_chunk<T>(sh.zrow[k], p.sz_c, c0, rc, 0.f, zk, last);
      float acc = 0.f;
#pragma unroll
      for (int i = 0; i < V; ++i) acc = fmaf(dvb[i], zk[i], acc);
      sh.part[(col0 + k) * Team::size() + Team::lane()] += acc * a.inv_tau;
    }
    if (p.dz != nullptr && sh.dzrow[k] != nullptr) {
      float d[V];
#pragma unroll
      for (int i = 0; i < V; ++i) d[i] = dvb[i];
      write_dz<T, Team>(a, sh, k, c0, rc, d);
    }
  }
}

template <typename T, typename Team, int Div>
__global__ void __launch_bounds__(Team::kLaunchThreads, Team::kLaunchMinBlocks)
    routed_logits_kernel(const RoutedArgs a) {
  constexpr int V = kVec<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  const RoutedKDParams& p = a.p;
  const int K = static_cast<int>(p.K), nt = Team::size(), tid = Team::lane();
  const RoutedShared<T, Team> sh = carve_routed<T, Team>(smem, K);
  const RowSweep sweep = sweep_of<Team>(a.sweep);  // passes 2 and 3
  const bool slot_grads = p.dw != nullptr || p.dz != nullptr;
  // KL: sum A = -1, so dx needs no row sum; reverse KL: sum B = -1, so dvbar = P - q needs none.
  const bool dx_pass2 = Div == kKL && p.dx != nullptr, dx_pass3 = Div != kKL && p.dx != nullptr;
  const bool dv_pass2 = Div == kReverseKL && slot_grads, dv_pass3 = Div != kReverseKL && slot_grads;
  // split rows: dw_k = sum_c B v_k - SB sum_c P v_k from pass-2 sums (columns 2 + k, 2 + K + k)
  const bool dw_bv = Team::kPieces && dv_pass3 && p.dw != nullptr;
  const bool dw_pass3 = !dw_bv && dv_pass3 && p.dw != nullptr;

  for_each_unit<Team>(a.pc, a.units, [&](int64_t unit, int phase, int64_t slot) {
    RoutedRow<T> r;
    if (!setup_routed_row<T, Team>(a, sh, unit, phase, slot, r)) return;
    const int64_t row = r.row;
    const bool results = !Team::kPieces || r.piece == 0;  // the row's loss and dw: one block of a split row

    // pass 1: student (column pair 0) and mixed logits (column pair 1)
    const bool whole = pieces_lse<Team>(a.pc, phase, slot, r.piece, sh.part, 2, sh.lse, [&] {
      lse_sweep<T, Team>(r.x, p.sx_c, r.rc, r.j0, r.j1, a.k2, sh.part, 0);
      OnlineLse2 acc;
      for (int j = r.j0 + tid; j < r.j1; j += nt) {
        float vb[V];
        mixed_logits_chunk<T, Team>(a, sh, r.rc, j * V - r.rc.shift, vb, false);
        acc.add(vb);
      }
      sh.part[2 * nt + tid] = acc.m;
      sh.part[3 * nt + tid] = acc.s;
    });
    if (!whole) return;
    const RowLse2 Lq = sh.lse[0], LP = sh.lse[1];

    // pass 2: S1, S2 (columns 0, 1; registers until the end), reverse-KL dw_k in columns 2 + k, or
    // sum_c B v_k and sum_c P v_k in columns 2 + k and 2 + K + k (split phase 3: summed over the pieces)
    const int ncols = 2 + (dv_pass2 && p.dw != nullptr ? K : 0) + (dw_bv ? 2 * K : 0);
    for (int col = 2; col < ncols; ++col) sh.part[col * nt + tid] = 0.f;
    float S1 = 0.f, S2 = 0.f;
    const bool last2 = sweep.evict_first && !dx_pass3 && !dv_pass3;  // no pass 3 reads the row again
    const bool reread2 = dw_bv || (dv_pass2 && p.dw != nullptr);  // pass 2 reads v_k twice
    const bool ev = sweep.evict_first;
    for (int step = r.j0 + tid; phase != 3 && step < r.j1; step += nt) {
      const int c0 = swept_chunk(step, r.j0, r.j1, sweep.back) * V - r.rc.shift;
      float lq[V], q[V], vb[V], d[V], Bc[V], Pc[V];
      log_softmax_chunk<T>(r.x, p.sx_c, c0, r.rc, a.k2, Lq, lq, q, last2);
      mixed_logits_chunk<T, Team>(a, sh, r.rc, c0, vb, last2 && !reread2);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float dl = (vb[i] - LP.m) - LP.ls;
        const float P = exp2f(dl);
        const Elem e = elem<Div>(dl * kLn2, P, lq[i], q[i], a);
        const bool ok = in_row(c0 + i, r.rc.C);
        Bc[i] = ok ? e.B : 0.f;  // B and P of the chunk, 0 outside the row (dw_bv)
        Pc[i] = ok ? P : 0.f;
        S1 += ok ? e.s1 : 0.f;
        S2 += ok ? e.s2 : 0.f;
        // KL: dx = g (A - q sum A) = g (q - P); reverse KL: dvbar = B - P sum B = P - q
        d[i] = dx_pass2 ? a.g * (q[i] - P) : (ok ? P - q[i] : 0.f);
      }
      if (dx_pass2) store_chunk<T>(r.dx, p.S, c0, r.rc, d, ev);
      if (dv_pass2) mixed_logits_slot_grads<T, Team>(a, sh, r.rc, c0, d, 2, p.dw != nullptr, last2);
      if (dw_bv) {
        for (int k = 0; k < K; ++k) {
          float zk[V];
          load_chunk<T>(sh.zrow[k], p.sz_c, c0, r.rc, 0.f, zk, last2);
          float bv = 0.f, pv = 0.f;
#pragma unroll
          for (int i = 0; i < V; ++i) {
            bv = fmaf(Bc[i], zk[i], bv);
            pv = fmaf(Pc[i], zk[i], pv);
          }
          sh.part[(2 + k) * nt + tid] += bv * a.inv_tau;
          sh.part[(2 + K + k) * nt + tid] += pv * a.inv_tau;
        }
      }
    }
    sh.part[tid] = S1;
    sh.part[nt + tid] = S2;
    if (!pieces_sums<Team>(a.pc, phase, slot, r.piece, sh.part, ncols, sh.red)) return;
    const RowSums rs = row_sums<Div>(sh.red[0], sh.red[1], 1.f, a.beta);
    if (results && tid == 0) static_cast<float*>(p.loss)[row] = a.scale * rs.D;
    if (results && dv_pass2 && p.dw != nullptr) {
      for (int k = tid; k < K; k += nt) static_cast<float*>(p.dw)[row * K + k] = a.scale * sh.red[2 + k];
    }
    if (results && dw_bv) {  // sum_c (B - P SB) v_k
      for (int k = tid; k < K; k += nt) {
        static_cast<float*>(p.dw)[row * K + k] = a.scale * fmaf(-rs.SB, sh.red[2 + K + k], sh.red[2 + k]);
      }
    }
    if (!dx_pass3 && !dv_pass3) return;

    // pass 3: dx and dvbar with the row sums; dw_k in columns k (whole rows)
    if (dw_pass3) {
      for (int k = 0; k < K; ++k) sh.part[k * nt + tid] = 0.f;
    }
    for (int j = r.j0 + tid; j < r.j1; j += nt) {
      const int c0 = j * V - r.rc.shift;
      float lq[V], q[V], vb[V], d[V];
      log_softmax_chunk<T>(r.x, p.sx_c, c0, r.rc, a.k2, Lq, lq, q, ev);
      mixed_logits_chunk<T, Team>(a, sh, r.rc, c0, vb, ev && !dw_pass3);  // dw_pass3 reads v_k again
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float dl = (vb[i] - LP.m) - LP.ls;
        const float P = exp2f(dl);
        const Elem e = elem<Div>(dl * kLn2, P, lq[i], q[i], a);
        d[i] = a.g * fmaf(-q[i], rs.SA, e.A);  // dx
        vb[i] = in_row(c0 + i, r.rc.C) ? fmaf(-P, rs.SB, e.B) : 0.f;  // dvbar
      }
      if (dx_pass3) store_chunk<T>(r.dx, p.S, c0, r.rc, d, ev);
      if (dv_pass3) mixed_logits_slot_grads<T, Team>(a, sh, r.rc, c0, vb, 0, dw_pass3, ev);
    }
    if (dw_pass3) {
      reduce_sum_columns<Team>(sh.part, K, sh.red);
      for (int k = tid; k < K; k += nt) static_cast<float*>(p.dw)[row * K + k] = a.scale * sh.red[k];
    }
  });
}

// ---------------------------------------------------------------------------------------------
// mix = "probs": P = sum_k w_k p_k (log P by a log-sum-exp over k), L = D(P || q)
//   dx = g (A - q sum A),  Y_k = sum_c p_k G,  dw_k = Y_k,  dz_k = g w_k (p_k G - p_k Y_k)
// ---------------------------------------------------------------------------------------------

// p_k * G of one class from log2 p_k and g = G, except reverse KL: g = log2(q / P) and
// p_k G = -p_k q / P is formed in log space (G itself overflows where P underflows).
template <int Div>
__device__ __forceinline__ float p_times_G(float lp2, float g) {
  if constexpr (Div == kReverseKL) {
    return -exp2f(lp2 + g);
  } else {
    return exp2f(lp2) * g;
  }
}

template <int Div>
__device__ __forceinline__ float probs_g(const Elem& e, float lq, float lP2) {
  if constexpr (Div == kReverseKL) {
    return fmaf(lq, kLog2e, -lP2);
  } else {
    return e.G;
  }
}

// log2 P of a chunk: log2-sum-exp2 over k of log2 w_k + log2 p_k, per class (`last`: the teacher rows' last
// read, evict-first).
template <typename T, typename Team>
__device__ __forceinline__ void mixed_probs_chunk(const RoutedArgs& a, const RoutedShared<T, Team>& sh,
                                                  const RowChunks& rc, int c0, float (&lP2)[kVec<T>], bool last) {
  constexpr int V = kVec<T>;
  float m[V], s[V];
#pragma unroll
  for (int i = 0; i < V; ++i) {
    m[i] = -INFINITY;
    s[i] = 0.f;
  }
  for (int k = 0; k < static_cast<int>(a.p.K); ++k) {
    float zk[V];
    load_chunk<T>(sh.zrow[k], a.p.sz_c, c0, rc, -INFINITY, zk, last);
    const RowLse2 Lk = sh.lse[1 + k];
    const float lw2 = sh.lw2[k];
#pragma unroll
    for (int i = 0; i < V; ++i) lse2_push(m[i], s[i], Lk.log2_prob(zk[i], a.k2) + lw2);
  }
#pragma unroll
  for (int i = 0; i < V; ++i) lP2[i] = m[i] + log2f(s[i]);
}

template <typename T, typename Team, int Div>
__global__ void __launch_bounds__(Team::kLaunchThreads, Team::kLaunchMinBlocks)
    routed_probs_kernel(const RoutedArgs a) {
  constexpr int V = kVec<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  const RoutedKDParams& p = a.p;
  const int K = static_cast<int>(p.K), nt = Team::size(), tid = Team::lane();
  const RoutedShared<T, Team> sh = carve_routed<T, Team>(smem, K);
  const RowSweep sweep = sweep_of<Team>(a.sweep);  // passes 2 and 3
  const bool need_Y = p.dw != nullptr || p.dz != nullptr;
  // KL: sum A = -W, so dx needs no row sum
  const bool dx_pass2 = Div == kKL && p.dx != nullptr, dx_pass3 = Div != kKL && p.dx != nullptr;

  for_each_unit<Team>(a.pc, a.units, [&](int64_t unit, int phase, int64_t slot) {
    RoutedRow<T> r;
    if (!setup_routed_row<T, Team>(a, sh, unit, phase, slot, r)) return;
    const int64_t row = r.row;
    const bool results = !Team::kPieces || r.piece == 0;  // the row's loss and dw: one block of a split row
    if (!student_teacher_lse<T, Team>(a, sh, r)) return;
    const RowLse2 Lq = sh.lse[0];
    const float W = sh.W[0];

    // pass 2: S1, S2 (columns 0, 1), Y_k (columns 2 + k) (split phase 3: summed over the pieces)
    if (need_Y) {
      for (int k = 0; k < K; ++k) sh.part[(2 + k) * nt + tid] = 0.f;
    }
    float S1 = 0.f, S2 = 0.f;
    const bool last2 = sweep.evict_first && !dx_pass3 && p.dz == nullptr;  // no pass 3 reads the row again
    const bool ev = sweep.evict_first;
    for (int step = r.j0 + tid; phase != 3 && step < r.j1; step += nt) {
      const int c0 = swept_chunk(step, r.j0, r.j1, sweep.back) * V - r.rc.shift;
      float lq[V], q[V], lP2[V], G[V], d[V];
      log_softmax_chunk<T>(r.x, p.sx_c, c0, r.rc, a.k2, Lq, lq, q, last2);
      mixed_probs_chunk<T, Team>(a, sh, r.rc, c0, lP2, last2 && !need_Y);  // need_Y reads z_k again
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float P = exp2f(lP2[i]);
        const Elem e = elem<Div>(lP2[i] * kLn2, P, lq[i], q[i], a);
        const bool ok = in_row(c0 + i, r.rc.C);
        S1 += ok ? e.s1 : 0.f;
        S2 += ok ? e.s2 : 0.f;
        G[i] = probs_g<Div>(e, lq[i], lP2[i]);
        d[i] = a.g * fmaf(W, q[i], -P);  // KL dx: -P + q W
      }
      if (dx_pass2) store_chunk<T>(r.dx, p.S, c0, r.rc, d, ev);
      if (need_Y) {
        for (int k = 0; k < K; ++k) {
          float pk[V];
          load_chunk<T>(sh.zrow[k], p.sz_c, c0, r.rc, -INFINITY, pk, last2);
          const RowLse2 Lk = sh.lse[1 + k];
          float acc = 0.f;
#pragma unroll
          for (int i = 0; i < V; ++i) acc += in_row(c0 + i, r.rc.C) ? p_times_G<Div>(Lk.log2_prob(pk[i], a.k2), G[i]) : 0.f;
          sh.part[(2 + k) * nt + tid] += acc;
        }
      }
    }
    sh.part[tid] = S1;
    sh.part[nt + tid] = S2;
    if (!pieces_sums<Team>(a.pc, phase, slot, r.piece, sh.part, need_Y ? 2 + K : 2, sh.red)) return;
    const RowSums rs = row_sums<Div>(sh.red[0], sh.red[1], W, a.beta);
    if (results && tid == 0) static_cast<float*>(p.loss)[row] = a.scale * rs.D;
    if (results && p.dw != nullptr) {
      for (int k = tid; k < K; k += nt) static_cast<float*>(p.dw)[row * K + k] = a.scale * sh.red[2 + k];
    }
    if (!dx_pass3 && p.dz == nullptr) return;

    // pass 3: dx with sum A, dz_k with Y_k
    for (int j = r.j0 + tid; j < r.j1; j += nt) {
      const int c0 = j * V - r.rc.shift;
      float lq[V], q[V], lP2[V], G[V], d[V];
      log_softmax_chunk<T>(r.x, p.sx_c, c0, r.rc, a.k2, Lq, lq, q, ev);
      mixed_probs_chunk<T, Team>(a, sh, r.rc, c0, lP2, ev && p.dz == nullptr);  // dz reads z_k again
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float P = exp2f(lP2[i]);
        const Elem e = elem<Div>(lP2[i] * kLn2, P, lq[i], q[i], a);
        G[i] = probs_g<Div>(e, lq[i], lP2[i]);
        d[i] = a.g * fmaf(-q[i], rs.SA, e.A);  // dx
      }
      if (dx_pass3) store_chunk<T>(r.dx, p.S, c0, r.rc, d, ev);
      if (p.dz != nullptr) {
        for (int k = 0; k < K; ++k) {
          if (sh.dzrow[k] == nullptr) continue;
          float pk[V];
          load_chunk<T>(sh.zrow[k], p.sz_c, c0, r.rc, -INFINITY, pk, ev);
          const RowLse2 Lk = sh.lse[1 + k];
          const float Yk = sh.red[2 + k];
#pragma unroll
          for (int i = 0; i < V; ++i) {
            const float lp2 = Lk.log2_prob(pk[i], a.k2);
            pk[i] = fmaf(-exp2f(lp2), Yk, p_times_G<Div>(lp2, G[i]));
          }
          write_dz<T, Team>(a, sh, k, c0, r.rc, pk);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Launch
// ---------------------------------------------------------------------------------------------

using RoutedKernel = void (*)(RoutedArgs);

template <typename T, typename Team, int Mix, int Div>
RoutedKernel routed_kernel() {
  if constexpr (Mix == kMixLoss) return routed_loss_kernel<T, Team, Div>;
  if constexpr (Mix == kMixLogits) return routed_logits_kernel<T, Team, Div>;
  return routed_probs_kernel<T, Team, Div>;
}

// A thread per row (few classes, or dense logits whose neighbouring pixels are neighbours in
// memory), a block per row, (a few long rows) a block per piece of a row in three launches, or (many long
// rows, sm_90+) a thread-block cluster per row (common.cuh: cluster mode).
template <typename T, int Mix, int Div>
int launch_routed(const RoutedArgs& a, cudaStream_t stream) {
  const size_t fixed = routed_fixed_bytes(a.p.K);
  const size_t per_thread = static_cast<size_t>(routed_columns(a.p.K)) * sizeof(float);
  const int rec = static_cast<int>(routed_columns(a.p.K));
  int64_t clusters = 0;
  const Pieces cl = a.p.S == 1 ? cluster_plan(a.N, a.p.C, kVec<T>, rec, static_cast<int>(a.p.K) + 1,
                                              static_cast<int>(sizeof(T)), a.p.workspace, a.p.workspace_floats,
                                              clusters)
                               : whole_rows();
  const bool cluster_first = cl.nsplit > 1 && cuda_row_team() == kCudaRowTeamCluster;
  const Pieces pc = a.p.S == 1 && !cluster_first
                        ? piece_plan(a.N, a.p.C, kVec<T>, rec, a.p.workspace, a.p.workspace_floats)
                        : whole_rows();
  if (pc.nsplit <= 1 && cl.nsplit > 1) {
    RoutedArgs ca = a;
    ca.pc = cl;
    ca.units = a.N * cl.nsplit;
    const int nt = ClusterTeam::threads(
        threads_for_row(static_cast<int64_t>(cl.span) * kVec<T>, kVec<T>, fixed, routed_columns(a.p.K)));
    return launch_cluster_with_smem(routed_kernel<T, ClusterTeam, Mix, Div>(), ca,
                                    static_cast<unsigned>(clusters * cl.nsplit), nt, fixed + per_thread * nt,
                                    cl.nsplit, stream);
  }
  if (pc.nsplit > 1) {
    RoutedArgs sa = a;
    sa.pc = pc;
    sa.units = a.N * pc.nsplit;
    const int nt = threads_for_row(static_cast<int64_t>(pc.span) * kVec<T>, kVec<T>, fixed, routed_columns(a.p.K));
    const unsigned grid = static_cast<unsigned>(sa.units < kMaxBlocks ? sa.units : kMaxBlocks);
    for (int phase = 1; phase <= 3; ++phase) {
      sa.pc.phase = phase;
      const int err = launch_with_smem(routed_kernel<T, PieceTeam, Mix, Div>(), sa, grid, nt,
                                       fixed + per_thread * nt, stream);
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  }
  const int rows_per_block = thread_team_threads(a.p.C, a.p.S > 1, fixed + per_thread);
  if (rows_per_block > 0) {
    return launch_with_smem(routed_kernel<T, ThreadTeam, Mix, Div>(), a, thread_team_grid(a.N, rows_per_block),
                            rows_per_block, rows_per_block * (fixed + per_thread), stream);
  }
  // a block per row: rows of class logits whose rows in flight exceed the L2 sweep back and forth (common.cuh)
  RoutedArgs ba = a;
  ba.sweep = row_sweep(a.p.S == 1 && rows_in_flight_exceed_l2(a.N, a.p.C, static_cast<int>(a.p.K) + 1,
                                                               static_cast<int>(sizeof(T))));
  const int nt = threads_for_row(a.p.C, kVec<T>, fixed, routed_columns(a.p.K));
  const int64_t grid = a.N < kMaxBlocks ? a.N : kMaxBlocks;
  return launch_with_smem(routed_kernel<T, BlockTeam, Mix, Div>(), ba, static_cast<unsigned>(grid), nt,
                          fixed + per_thread * nt, stream);
}

template <typename T, int Mix>
int dispatch_div(const RoutedArgs& a, cudaStream_t stream) {
  switch (a.p.div) {
    case kKL: return launch_routed<T, Mix, kKL>(a, stream);
    case kReverseKL: return launch_routed<T, Mix, kReverseKL>(a, stream);
    case kJS: return launch_routed<T, Mix, kJS>(a, stream);
    case kTVD: return launch_routed<T, Mix, kTVD>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
int dispatch_mix(const RoutedArgs& a, cudaStream_t stream) {
  switch (a.p.mix) {
    case kMixLoss: return dispatch_div<T, kMixLoss>(a, stream);
    case kMixLogits: return dispatch_div<T, kMixLogits>(a, stream);
    case kMixProbs: return dispatch_div<T, kMixProbs>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

// The launches of one element type: each built in its own object (dtype shards, mmfast/dtype_shards.h).
template <typename T>
int routed_kd_typed(const RoutedKDParams& p, cudaStream_t stream) {
  RoutedArgs a;
  a.p = p;
  a.N = p.B * p.S;
  if (a.N <= 0) return cudaSuccess;
  a.pc = whole_rows();  // launch_routed may split them
  a.units = a.N;
  a.sweep = row_sweep(false);  // launch_routed's block-per-row launch may stream its rows
  if (p.K < 0 || p.C < 0 || p.C > kMaxClasses || (p.idx == nullptr && p.K != p.E)) return cudaErrorInvalidValue;
  a.k2 = static_cast<float>(p.inv_tau * 1.4426950408889634);
  a.inv_tau = static_cast<float>(p.inv_tau);
  a.g = static_cast<float>(p.scale * p.inv_tau);
  a.scale = static_cast<float>(p.scale);
  a.beta = static_cast<float>(p.beta);
  a.log_beta = static_cast<float>(std::log(p.beta));
  a.log1m_beta = static_cast<float>(std::log1p(-p.beta));
  return dispatch_mix<T>(a, stream);
}

static_assert(kFloat32 == 0 && kBFloat16 == 2 && kFloat16 == 3,
              "the dtype shards below and in CMakeLists.txt use these DType codes");
#if MMFAST_DISPATCH_ONLY
extern template int routed_kd_typed<float>(const RoutedKDParams&, cudaStream_t);
extern template int routed_kd_typed<__nv_bfloat16>(const RoutedKDParams&, cudaStream_t);
extern template int routed_kd_typed<__half>(const RoutedKDParams&, cudaStream_t);
#endif
#if MMFAST_BUILDS_DTYPE(0)  // kFloat32
template int routed_kd_typed<float>(const RoutedKDParams&, cudaStream_t);
#endif
#if MMFAST_BUILDS_DTYPE(2)  // kBFloat16
template int routed_kd_typed<__nv_bfloat16>(const RoutedKDParams&, cudaStream_t);
#endif
#if MMFAST_BUILDS_DTYPE(3)  // kFloat16
template int routed_kd_typed<__half>(const RoutedKDParams&, cudaStream_t);
#endif

}  // namespace cuda

#if MMFAST_BUILDS_DISPATCH
int routed_kd_cuda(const RoutedKDParams& p, void* stream) {
  if (p.B * p.S <= 0) return cudaSuccess;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  return cuda::dispatch_dtype(p.dtype, [&](auto t) { return cuda::routed_kd_typed<decltype(t)>(p, s); });
}
#endif

}  // namespace mmfast
