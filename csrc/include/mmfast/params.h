// Plain-C++ parameter blocks shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels.
// No torch headers: kernels see raw pointers, sizes and element strides only.
#pragma once
#include <cstdint>

namespace mmfast {

// Element type codes used across the Python <-> C++ boundary (mmfast/_native.py).
enum DType : int32_t { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// How teachers are combined per row (SPEC section 1).
enum Mix : int32_t { kMixLoss = 0, kMixLogits = 1, kMixProbs = 2 };

// Divergence D(P || q), P the teacher-side distribution, q = softmax(x / tau).
enum Divergence : int32_t { kKL = 0, kReverseKL = 1, kJS = 2, kTVD = 3 };

// Routed teacher-mixture KD, per-row loss and per-row gradients.
//
// Logical shapes (element strides, any layout; B samples, C classes, S pixels per sample (1 for
// class logits), E teachers, K routing slots (K == E for dense routing)):
//   x    [B, C, S]        student logits                 (dtype)
//   z    [E, B, C, S]     teacher logits                 (dtype)
//   w    [B, K]           routing weights, contiguous    (float32; float64 when dtype == kFloat64)
//   idx  [B, K]           teacher of each slot, contiguous int64, or nullptr for dense routing
//                         (slot k is teacher k). An index outside [0, E) is never dereferenced:
//                         that row's loss and gradients are NaN.
//   mask [B, S]           row mask, contiguous uint8 (0 = row ignored), or nullptr
// Outputs (contiguous; rows are (b, s)):
//   loss [B, S]           scale * l_row (0 for masked rows)            (float32 / float64)
//   dx   [B, C, S]        d loss_row / d x, or nullptr                  (dtype)
//   dw   [B, S, K]        d loss_row / d w[b, k], or nullptr            (float32 / float64)
//   dz   [E, B, C, S]     d loss_row / d z, or nullptr                  (dtype). The caller
//                         zero-fills dz when idx != nullptr; the kernel then ADDS into the
//                         selected teachers' rows (a teacher selected twice accumulates).
//                         With dense routing the kernel writes every element.
// Masked rows: loss, dx, dw (and dz for dense routing) are written as 0; x and z are not read.
struct RoutedKDParams {
  int64_t B, C, S, E, K;
  const void* x;
  int64_t sx_b, sx_c, sx_s;
  const void* z;
  int64_t sz_e, sz_b, sz_c, sz_s;
  const void* w;
  const int64_t* idx;
  const uint8_t* mask;
  double inv_tau;  // 1 / temperature
  double beta;     // JS mixing weight, 0 < beta < 1
  double scale;    // tau^2 when t2_scale, else 1
  int32_t mix;     // Mix
  int32_t div;     // Divergence
  int32_t dtype;   // DType of x, z, dx, dz
  void* loss;
  void* dx;
  void* dw;
  void* dz;
};

// Mutual (co-training) KD over M models, per-row loss and gradient.
//   logits [M, N, C] (element strides), loss [N], grad [M, N, C] contiguous or nullptr.
//   loss_n = scale * sum_{i != j} KL(p_j,n || p_i,n), p_i = softmax(logits_i / tau).
struct MutualKDParams {
  int64_t M, N, C;
  const void* logits;
  int64_t s_m, s_n, s_c;
  double inv_tau;
  double scale;
  int32_t dtype;
  void* loss;
  void* grad;
};

}  // namespace mmfast
