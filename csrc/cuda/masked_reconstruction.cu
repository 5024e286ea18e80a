// Masked reconstruction loss (SPEC section 2; oracle: mmfast/reference/masked_reconstruction.py;
// layout: MaskedReconParams in params.h).
//
// One team per row r = a * S + s (grid-stride over rows), the row cut into chunks as in common.cuh:
// a thread for channel-strided rows (S > 1: a warp's 32 neighbouring rows load coalesced) of at most
// kThreadTeamMaxClasses channels, else a block.
// Yt = Y, or (Y - mean) * rstd with rstd = 1 / sqrt(var + eps) (normalize_target). Sweeps over the
// row (the repeats hit L1/L2):
//   stats (normalize_target and/or cosine): mean; then var, and the cosine's P.Yt, |P|^2, |Yt|^2;
//   main: e, dP = w m de/dP (cosine: w (k_p P - Yt inv)), dYt, row sums; writes dP, per-element
//         outputs, and dY when no normalisation is involved;
//   dY (normalize_target and dY wanted): rstd (dYt - mean dYt - Yt mean(dYt Yt)).
// A row with w == 0 is not read unless dM is wanted; its loss, dP and dY are written as 0.
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "mmfast/kernels.h"

namespace mmfast {
namespace cuda {
namespace {

constexpr int kReconCols = 5;  // block-reduced row sums: loss, raw e, mask, dYt, dYt * Yt

struct ReconArgs {
  MaskedReconParams p;
  float beta, inv_beta, eps, cos_eps;
};

// Elementwise loss of d: returns e, writes de/dd (mse 2d; smooth_l1 d / beta or sign(d), NaN kept).
template <int kLoss>
__device__ __forceinline__ float elementwise(float d, const ReconArgs& a, float& de) {
  if constexpr (kLoss == kReconMSE) {
    de = d + d;
    return d * d;
  } else {
    const float ad = fabsf(d);
    const bool quad = ad < a.beta;
    de = quad ? d * a.inv_beta : (d > 0.f ? 1.f : (d < 0.f ? -1.f : d));
    return quad ? 0.5f * d * d * a.inv_beta : ad - 0.5f * a.beta;
  }
}

// Element mask values of classes [c0, c0 + V) (1 outside the row, never read there).
template <int kElem, int V>
__device__ __forceinline__ void load_mask(const void* row, int64_t stride, int c0, int C, float (&m)[V]) {
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const int c = c0 + i;
    if constexpr (kElem == 1) {
      m[i] = in_row(c, C) ? static_cast<const float*>(row)[static_cast<int64_t>(c) * stride] : 1.f;
    } else if constexpr (kElem == 2) {
      m[i] = in_row(c, C) && static_cast<const uint8_t*>(row)[static_cast<int64_t>(c) * stride] != 0 ? 1.f : 0.f;
    } else {
      m[i] = 1.f;
    }
  }
}

// Scalar stores of classes [c0, c0 + V) inside the row.
template <typename U, int V>
__device__ __forceinline__ void store_scalars(U* row, int64_t stride, int c0, int C, const float (&v)[V]) {
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const int c = c0 + i;
    if (in_row(c, C)) row[static_cast<int64_t>(c) * stride] = from_float<U>(v[i]);
  }
}

// Per-row state shared by the sweeps.
struct RowStats {
  float w, mean, rstd, k_p, k_y, inv, cos;
};

// dP (g) and dYt (gyt) of one chunk, and e / w m e for the elementwise losses.
template <int kLoss, int V>
__device__ __forceinline__ void chunk_grads(const ReconArgs& a, const RowStats& st, const float (&p)[V],
                                            const float (&yt)[V], const float (&m)[V], float (&e)[V],
                                            float (&we)[V], float (&g)[V], float (&gyt)[V]) {
#pragma unroll
  for (int i = 0; i < V; ++i) {
    if constexpr (kLoss == kReconCosine) {
      g[i] = st.w * (st.k_p * p[i] - yt[i] * st.inv);
      gyt[i] = st.w * (st.k_y * yt[i] - p[i] * st.inv);
      e[i] = we[i] = 0.f;
    } else {
      float de;
      e[i] = elementwise<kLoss>(p[i] - yt[i], a, de);
      const float weight = st.w * m[i];
      we[i] = weight * e[i];
      g[i] = weight * de;
      gyt[i] = -g[i];
    }
  }
}

template <typename T, typename Team, int kLoss, int kElem>
__global__ void __launch_bounds__(Team::kLaunchThreads, Team::kLaunchMinBlocks)
    masked_recon_kernel(const ReconArgs a) {
  constexpr int V = kVec<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  const MaskedReconParams& p = a.p;
  SmemCarver<Team> carver{smem};
  const TeamArray<float, Team> part = carver.template take<float>(kReconCols * Team::size());  // by column
  const TeamArray<float, Team> sums = carver.template take<float>(kReconCols);
  const int nt = Team::size(), tid = Team::lane();
  const int C = static_cast<int>(p.D);
  const int64_t R = p.A * p.S, S = p.S;
  const bool per_element = p.per_element != 0, normalize = p.normalize_target != 0;
  const bool rows_mask = p.mask_kind == kReconMaskRows;
  T* dp = static_cast<T*>(p.dp);
  T* dy = static_cast<T*>(p.dy);
  float* dm = static_cast<float*>(p.dm);
  const bool dm_rows = dm != nullptr && rows_mask && !per_element;
  const float inv_D = 1.f / static_cast<float>(C);

  for (int64_t r = Team::first_row(); r < R; r += Team::row_stride()) {
    const int64_t ai = r / S, si = r - ai * S;
    const int64_t o = ai * p.D * S + si;  // outputs [A, D, S] contiguous: channel stride S
    RowStats st{};
    // row weights: a row mask, or the row_weights beside an element mask
    st.w = rows_mask ? static_cast<const float*>(p.mask)[r]
                     : (p.row_weights != nullptr ? static_cast<const float*>(p.row_weights)[r] : 1.f);
    st.rstd = 1.f;
    const bool excluded = st.w == 0.f;
    if (excluded && dm == nullptr) {  // not read
      if (per_element) {
        fill_row<T, Team>(static_cast<T*>(p.loss_out) + o, S, p.D, 0.f);
      } else if (tid == 0) {
        static_cast<float*>(p.loss_out)[r] = 0.f;
      }
      if (dp != nullptr) fill_row<T, Team>(dp + o, S, p.D, 0.f);
      if (dy != nullptr) fill_row<T, Team>(dy + o, S, p.D, 0.f);
      continue;
    }
    const T* prow = static_cast<const T*>(p.pred) + ai * p.sp_a + si * p.sp_s;
    const T* yrow = static_cast<const T*>(p.target) + ai * p.sy_a + si * p.sy_s;
    const void* mrow = nullptr;
    if constexpr (kElem == 1) mrow = static_cast<const float*>(p.mask) + ai * p.sm_a + si * p.sm_s;
    if constexpr (kElem == 2) mrow = static_cast<const uint8_t*>(p.mask) + ai * p.sm_a + si * p.sm_s;
    T* dprow = dp != nullptr ? dp + o : nullptr;
    T* dyrow = dy != nullptr ? dy + o : nullptr;
    T* lrow = per_element ? static_cast<T*>(p.loss_out) + o : nullptr;
    // vector accesses: unit channel strides (S == 1 for the outputs) and one alignment
    const uintptr_t residue = reinterpret_cast<uintptr_t>(prow) % kChunkBytes<T>;
    const bool vec = p.sp_d == 1 && p.sy_d == 1 && S == 1 &&
                     reinterpret_cast<uintptr_t>(yrow) % kChunkBytes<T> == residue &&
                     (dprow == nullptr || reinterpret_cast<uintptr_t>(dprow) % kChunkBytes<T> == residue) &&
                     (dyrow == nullptr || reinterpret_cast<uintptr_t>(dyrow) % kChunkBytes<T> == residue) &&
                     (lrow == nullptr || reinterpret_cast<uintptr_t>(lrow) % kChunkBytes<T> == residue);
    const RowChunks rc = make_chunks<T>(C, vec, residue);

    // statistics
    if (normalize || kLoss == kReconCosine) {
      if (normalize) {
        float sy = 0.f;
        for (int j = tid; j < rc.nchunks; j += nt) {
          float y[V];
          load_chunk<T>(yrow, p.sy_d, j * V - rc.shift, rc, 0.f, y);
#pragma unroll
          for (int i = 0; i < V; ++i) sy += y[i];
        }
        part[tid] = sy;
        reduce_sum_columns<Team>(part, 1, sums);
        st.mean = sums[0] * inv_D;
      }
      float sq = 0.f, dot = 0.f, pp = 0.f;
      for (int j = tid; j < rc.nchunks; j += nt) {
        const int c0 = j * V - rc.shift;
        float y[V], x[V];
        load_chunk<T>(yrow, p.sy_d, c0, rc, 0.f, y);
        if constexpr (kLoss == kReconCosine) load_chunk<T>(prow, p.sp_d, c0, rc, 0.f, x);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const float yc = in_row(c0 + i, C) ? y[i] - st.mean : 0.f;
          sq += yc * yc;
          if constexpr (kLoss == kReconCosine) {
            dot += x[i] * yc;
            pp += x[i] * x[i];
          }
        }
      }
      part[tid] = sq;
      part[nt + tid] = dot;
      part[2 * nt + tid] = pp;
      reduce_sum_columns<Team>(part, kLoss == kReconCosine ? 3 : 1, sums);
      float scale = 1.f;  // Yt = (Y - mean) * scale
      if (normalize) scale = st.rstd = rsqrtf(sums[0] * inv_D + a.eps);
      if constexpr (kLoss == kReconCosine) {
        const float norm_p = sqrtf(sums[2]);
        const float norm_y = sqrtf(sums[0]) * scale;
        const float den_p = norm_p < a.cos_eps ? a.cos_eps : norm_p;  // NaN stays NaN
        const float den_y = norm_y < a.cos_eps ? a.cos_eps : norm_y;
        st.inv = 1.f / (den_p * den_y);
        st.cos = sums[1] * scale * st.inv;
        st.k_p = norm_p > a.cos_eps ? st.cos / (den_p * den_p) : 0.f;
        st.k_y = norm_y > a.cos_eps ? st.cos / (den_y * den_y) : 0.f;
      }
    }

    // main sweep
    float acc = 0.f, raw = 0.f, macc = 0.f, sg = 0.f, sgy = 0.f;
    for (int j = tid; j < rc.nchunks; j += nt) {
      const int c0 = j * V - rc.shift;
      float x[V], yt[V], m[V], e[V], we[V], g[V], gyt[V];
      load_chunk<T>(prow, p.sp_d, c0, rc, 0.f, x);
      load_chunk<T>(yrow, p.sy_d, c0, rc, 0.f, yt);
#pragma unroll
      for (int i = 0; i < V; ++i) yt[i] = (yt[i] - st.mean) * st.rstd;
      load_mask<kElem, V>(mrow, p.sm_d, c0, C, m);
      chunk_grads<kLoss, V>(a, st, x, yt, m, e, we, g, gyt);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        if (!in_row(c0 + i, C)) continue;
        acc += we[i];
        raw += e[i];
        if (kElem != 0) macc += m[i];
        sg += gyt[i];
        sgy += gyt[i] * yt[i];
      }
      if (excluded) {
#pragma unroll
        for (int i = 0; i < V; ++i) g[i] = gyt[i] = we[i] = 0.f;
      }
      if (lrow != nullptr) store_chunk<T>(lrow, S, c0, rc, we);
      if (dm != nullptr && !dm_rows) store_scalars<float, V>(dm + o, S, c0, C, e);
      if (dprow != nullptr) store_chunk<T>(dprow, S, c0, rc, g);
      if (dyrow != nullptr && !normalize) store_chunk<T>(dyrow, S, c0, rc, gyt);
    }
    part[tid] = acc;
    part[nt + tid] = raw;
    part[2 * nt + tid] = macc;
    part[3 * nt + tid] = sg;
    part[4 * nt + tid] = sgy;
    reduce_sum_columns<Team>(part, kReconCols, sums);
    if (tid == 0) {
      const float row_raw = kLoss == kReconCosine ? 1.f - st.cos : sums[1];
      const float row_loss = kLoss == kReconCosine ? st.w * row_raw : sums[0];
      if (!per_element) static_cast<float*>(p.loss_out)[r] = excluded ? 0.f : row_loss;
      if (p.msum != nullptr) static_cast<float*>(p.msum)[r] = sums[2];
      if (dm_rows) dm[r] = row_raw;
    }

    // dY through the normalisation
    if (dyrow != nullptr && normalize) {
      const float mean_g = sums[3] * inv_D, mean_gy = sums[4] * inv_D;
      for (int j = tid; j < rc.nchunks; j += nt) {
        const int c0 = j * V - rc.shift;
        float x[V], yt[V], m[V], e[V], we[V], g[V], gyt[V];
        load_chunk<T>(prow, p.sp_d, c0, rc, 0.f, x);
        load_chunk<T>(yrow, p.sy_d, c0, rc, 0.f, yt);
#pragma unroll
        for (int i = 0; i < V; ++i) yt[i] = (yt[i] - st.mean) * st.rstd;
        load_mask<kElem, V>(mrow, p.sm_d, c0, C, m);
        chunk_grads<kLoss, V>(a, st, x, yt, m, e, we, g, gyt);
#pragma unroll
        for (int i = 0; i < V; ++i) g[i] = excluded ? 0.f : st.rstd * (gyt[i] - mean_g - yt[i] * mean_gy);
        // a one-element row normalises to the constant 0: its gradient is exactly 0 (the recomputed gyt may
        // differ from the one summed into mean_g by an ulp, which rstd would amplify); * 0 keeps a NaN
        if (C == 1) {
#pragma unroll
          for (int i = 0; i < V; ++i) g[i] *= 0.f;
        }
        store_chunk<T>(dyrow, S, c0, rc, g);
      }
    }
    Team::sync();  // `sums` is read above before the next row's reductions overwrite it
  }
}

template <typename T, int kLoss, int kElem>
cudaError_t launch(const ReconArgs& a, cudaStream_t stream) {
  const int64_t R = a.p.A * a.p.S;
  constexpr size_t kCols = kReconCols * sizeof(float);
  // channel-strided rows (S > 1) only: rows of few unit-stride channels are rare here (patches, features)
  const int rows_per_block = a.p.S > 1 ? thread_team_threads(a.p.D, true, 2 * kCols) : 0;
  if (rows_per_block > 0) {
    const unsigned grid = thread_team_grid(R, rows_per_block);
    const size_t smem = rows_per_block * 2 * kCols;
    masked_recon_kernel<T, ThreadTeam, kLoss, kElem><<<grid, rows_per_block, smem, stream>>>(a);
    return cudaGetLastError();
  }
  const int nt = threads_for_row(a.p.D, kVec<T>, kCols, kReconCols);
  const size_t smem = kCols * nt + kCols;
  const int64_t blocks = R < kMaxBlocks ? R : kMaxBlocks;
  masked_recon_kernel<T, BlockTeam, kLoss, kElem><<<static_cast<unsigned>(blocks), nt, smem, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, int kLoss>
cudaError_t launch_mask(const ReconArgs& a, cudaStream_t stream) {
  if constexpr (kLoss == kReconCosine) {
    return launch<T, kLoss, 0>(a, stream);
  } else {
    if (a.p.mask_kind == kReconMaskFloat) return launch<T, kLoss, 1>(a, stream);
    if (a.p.mask_kind == kReconMaskBool) return launch<T, kLoss, 2>(a, stream);
    return launch<T, kLoss, 0>(a, stream);
  }
}

template <typename T>
cudaError_t launch_loss(const ReconArgs& a, cudaStream_t stream) {
  switch (a.p.loss) {
    case kReconMSE:
      return launch_mask<T, kReconMSE>(a, stream);
    case kReconSmoothL1:
      return launch_mask<T, kReconSmoothL1>(a, stream);
    default:
      return launch_mask<T, kReconCosine>(a, stream);
  }
}

}  // namespace
}  // namespace cuda

int masked_reconstruction_cuda(const MaskedReconParams& p, void* stream) {
  if (p.A * p.S <= 0 || p.D <= 0) return 0;
  if (p.D > cuda::kMaxClasses) return static_cast<int>(cudaErrorInvalidValue);
  if (p.loss != kReconMSE && p.loss != kReconSmoothL1 && p.loss != kReconCosine)
    return static_cast<int>(cudaErrorInvalidValue);
  const bool elem = p.mask_kind == kReconMaskFloat || p.mask_kind == kReconMaskBool;
  if (p.loss == kReconCosine && (elem || p.per_element)) return static_cast<int>(cudaErrorInvalidValue);
  if (p.row_weights != nullptr && (!elem || p.msum != nullptr || p.dm != nullptr))
    return static_cast<int>(cudaErrorInvalidValue);
  cuda::ReconArgs a{p, static_cast<float>(p.beta), static_cast<float>(1.0 / p.beta), static_cast<float>(p.eps),
                    static_cast<float>(p.cos_eps)};
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  return cuda::dispatch_dtype(p.dtype, [&](auto t) { return cuda::launch_loss<decltype(t)>(a, s); });
}

}  // namespace mmfast
