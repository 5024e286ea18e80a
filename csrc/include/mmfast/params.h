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

// The workspace of the routed-KD and mutual-KD CUDA kernels (nullptr elsewhere): float32 scratch of
// workspace_floats elements for the partial statistics of a few long rows of class logits (at least
// kRowSplitMinClasses classes; routed KD: S == 1) split over several blocks. kRowSplitWorkspaceFloats
// always suffices; with less, rows are not split.
constexpr int64_t kRowSplitMinClasses = 8192;
constexpr int64_t kRowSplitWorkspaceFloats = int64_t{1} << 17;

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
// workspace (CUDA only; nullptr elsewhere): see kRowSplitWorkspaceFloats.
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
  void* workspace;
  int64_t workspace_floats;
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
  void* workspace;  // see kRowSplitWorkspaceFloats
  int64_t workspace_floats;
};

// Masked reconstruction loss (SPEC section 2; oracle: mmfast/reference/masked_reconstruction.py).
enum ReconLoss : int32_t { kReconMSE = 0, kReconSmoothL1 = 1, kReconCosine = 2 };
// How the mask is given: none, per row ([R] weights), or per element ([A, D, S], strided, possibly
// with zero strides for a broadcast channel mask), as compute-type floats or as bytes (bool).
enum ReconMask : int32_t { kReconMaskNone = 0, kReconMaskRows = 1, kReconMaskFloat = 2, kReconMaskBool = 3 };

// Logical shapes (element strides; A outer positions, D channels, S inner positions; rows are
// r = a * S + s, R = A * S):
//   pred, target [A, D, S]        (dtype)
//   mask         [R] contiguous compute type (kReconMaskRows) or [A, D, S] strided compute type /
//                uint8 (kReconMaskFloat / kReconMaskBool); nullptr for kReconMaskNone
//   row_weights  [R] contiguous compute type with an element mask (kReconMaskFloat / kReconMaskBool), or
//                nullptr: row weights on top of it (a mean's 1 / sum(M) in every row); then msum and dm
//                are nullptr
// Yt = target, or (target - mean) / sqrt(var + eps) per row (normalize_target, biased variance).
// Weights: w_r (row mask or row_weights, else 1) and m_i (element mask, else 1). Outputs (contiguous):
//   loss   [R] compute type: sum_c w_r m_i e_i (cosine: w_r (1 - cos_r)); or, per_element,
//          [A, D, S] dtype: w_r m_i e_i
//   msum   [R] compute type: sum_c m_i (element masks without row_weights, !per_element), or nullptr
//   dp, dy [A, D, S] dtype: d loss / d pred, d loss / d target (per row or per element), or nullptr
//   dm     d loss / d weight, or nullptr: [R] compute type sum_c e_i (cosine: 1 - cos_r) for a row
//          mask and !per_element; else [A, D, S] compute type e_i
// Rows with w_r == 0 are excluded: loss and dp, dy are written as 0 and pred/target are NOT read,
// unless dm != nullptr (then they are read for dm only). cosine: row masks only, !per_element.
struct MaskedReconParams {
  int64_t A, D, S;
  const void* pred;
  int64_t sp_a, sp_d, sp_s;
  const void* target;
  int64_t sy_a, sy_d, sy_s;
  const void* mask;
  int64_t sm_a, sm_d, sm_s;
  const void* row_weights;   // with an element mask, or nullptr
  int32_t mask_kind;         // ReconMask
  int32_t loss;              // ReconLoss
  int32_t normalize_target;  // 0 / 1
  int32_t per_element;       // 0 / 1
  int32_t dtype;             // DType of pred, target, dp, dy (and of a per-element loss)
  double beta;               // smooth_l1 threshold, > 0
  double eps;                // normalize_target: var + eps
  double cos_eps;            // cosine: norms clamped below at cos_eps
  void* loss_out;
  void* msum;
  void* dp;
  void* dy;
  void* dm;
};

// Score distillation (SPEC section 3; oracles: mmfast/reference/{fdistill,uni_instruct,fake_score}.py).
// Rows are samples: every [B, D] input is a view with unit element stride and its own row stride
// (element units, >= D). Per-sample inputs (h, coef, lam, di_norm) are contiguous compute-type
// arrays (float32; float64 when dtype == kFloat64). Outputs: loss [B] compute type; gradients
// [B, D] contiguous in dtype, or nullptr when not requested. All sums in float32 blocks added in
// double on the CPU (double throughout for kFloat64); in float32 on CUDA.
// workspace (CUDA only; nullptr on the CPU): float32 scratch of workspace_floats elements for the
// per-row partial sums of rows split over several blocks; kScoreWorkspaceFloats always suffices
// (with less, the kernels do not split rows).
constexpr int64_t kScoreWorkspaceFloats = 8192;

// f-distill: m = mean_j |x - a|, w = h / (m + 1e-6), g = (b - a) w;
//   loss = scale * 0.5 * sum_j g^2, dx = scale * g.
struct FDistillParams {
  int64_t B, D;
  const void* x;
  int64_t sx;
  const void* a;
  int64_t sa;
  const void* b;
  int64_t sb;
  const void* h;  // [B]
  double scale;
  int32_t dtype;  // DType of x, a, b, dx
  void* loss;
  void* dx;
  void* workspace;
  int64_t workspace_floats;
};

// Uni-Instruct: d = a - b, u = (a - x) - alpha d, wf = max(mean_j |x - a|, 1e-5), c = scale / wf,
// n = sqrt(sum_j d^2) (or *di_norm when given); with (ls, lf, ld) = coef[b, 0:3]:
//   loss = c (ls sum d u + [fgm] lf sum d^2 + [di] ld n sum x d)
//   dx = c (-ls + [di] ld n) d, da = c ls (u + (1 - alpha) d) + [fgm] 2 c lf d,
//   db = c ls (alpha d - u) - [fgm] 2 c lf d.  A switched-off term is not evaluated.
struct UniInstructParams {
  int64_t B, D;
  const void* x;
  int64_t sx;
  const void* a;
  int64_t sa;
  const void* b;
  int64_t sb;
  const void* coef;     // [B, 3] contiguous
  const void* di_norm;  // [1], or nullptr: per-sample norms
  double alpha;
  double scale;
  int32_t fgm;    // 0 / 1
  int32_t di;     // 0 / 1
  int32_t dtype;  // DType of x, a, b, dx, da, db
  void* loss;
  void* dx;
  void* da;
  void* db;
  void* workspace;
  int64_t workspace_floats;
};

// Fake score: e = b - x; loss = scale * lam * sum_j e^2, db = scale * 2 * lam * e.
struct FakeScoreParams {
  int64_t B, D;
  const void* b;
  int64_t sb;
  const void* x;
  int64_t sx;
  const void* lam;  // [B]
  double scale;
  int32_t dtype;  // DType of b, x, db
  void* loss;
  void* db;
  void* workspace;
  int64_t workspace_floats;
};

// In-place scaling of a forward-written gradient by the incoming gradient (mmfast/ops/_grad_scaling.py):
// grad [repeat, rows, D, Q] contiguous (dtype), factor [rows, Q] contiguous float32;
// grad[k, r, d, q] *= factor[r, q], except in the blocks whose factors are all exactly 1 (left unread).
struct GradScaleParams {
  int64_t repeat, rows, D, Q;
  void* grad;
  const void* factor;
  int32_t dtype;  // DType of grad
};

}  // namespace mmfast
