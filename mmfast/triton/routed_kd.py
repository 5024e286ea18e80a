"""Routed teacher-mixture KD in Triton (one launch): row losses, with the gradients written in the forward.

Same contract as ``mmfast.reference.routed_kd.routed_kd_rows`` (x [B, C, S], z [E, B, C, S] with any
strides, weights [B, K], optional indices [B, K] and row mask [B, S]); the math is the reference's,
written through A = dL/dlog q, B = dL/dlog P, G = dL/dP with dL/du = A - q sum(A), dL/dv = B - P sum(B).

Each program owns ROWS rows: rows (b, 0) for class logits (S == 1), or ROWS consecutive pixels of one
sample for dense logits (S > 1, so that class-strided [B, C, S] loads coalesce along s). A row is
streamed over C in blocks of BLOCK_C classes, with the K selected teachers as a [ROWS, KP, BLOCK_C]
tile; unselected teachers are never read. Passes over a row:
  1. online softmax statistics (running max, sum of exp2) of the student and of the teachers (or of
     the weighted teacher logits), exp2 with log2(e) / tau folded in;
  2. loss terms and their row sums; gradients whose row reduction is known in closed form are written
     here (KL: sum_c A = -sum_c P, so dx = scale / tau * (q sum_k w_k - P); reverse KL with mix
     loss/logits: sum_c B = -1, so dz_k = scale / tau * w_k (P - q));
  3. only when a gradient needs a row sum of pass 2: the remaining gradients.
A streamed row's pass 2 runs from its last block to its first and pass 3 forward again (``STREAM_ZIGZAG``),
each starting where the previous pass ended, on the blocks most likely still in L2; its last read and the
gradients it writes are marked evict-first in L2 (``STREAM_L2_HINTS``).
When a row fits in one block (SINGLE) it is loaded once and kept in registers for every pass. A batch of a few
very long rows of class logits (fewer than the device has SMs) is cut into chunks across programs instead, one
launch per pass (``_routed_kd_split_kernel``): each chunk's softmax statistics, then (merged in chunk order)
each chunk's row sums and early gradients, then (summed in chunk order) the loss, dw and the chunk's
third-pass gradients; the results do not depend on the schedule.
log p = (v - max) log2(e) / tau - log2(sum): no per-element log except logaddexp (js) and log P (probs).
"""

from __future__ import annotations

import functools
import struct

import torch
import triton
import triton.language as tl
from torch import Tensor

from mmfast._native import routed_kd_outputs
from mmfast.reference.routed_kd import compute_dtype

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)

# Launch tuning, measured on an H200 (Triton 3.6): (tile, per_thread, stream_tile, stream_per_thread).
# A program holds a [ROWS, KP, BLOCK_C] teacher tile of ``tile`` elements, ``per_thread`` of them per
# thread (which sets num_warps); rows too long for it stream ``stream_tile``-element blocks. Tests
# shrink the tiles to run the streaming path on short rows.
ROW_TILES = (4096, 16, 8192, 32)  # class logits (S == 1)
PIXEL_TILES = (2048, 16, 2048, 16)  # dense logits (S > 1), PIXELS_PER_PROGRAM consecutive pixels each
PIXELS_PER_PROGRAM = 16
# A streamed block of class logits holds the student and KP teacher slots; its classes are at most the stream
# tile / STREAM_MIN_SLOTS, so that with one or two teachers it stays spill-free (the tile alone, 4096 classes at
# K = 2, spilled up to 220 bytes per thread at sm_90: scripts/triton_compile_check.py).
STREAM_MIN_SLOTS = 4
# Rows of class logits too long for one block are cut into chunks across programs (``split_plan``) only when
# there are fewer of them than SPLIT_BELOW of the split's target program count: on a GPU, fewer rows than SMs
# (a batch of a few very long rows). Above that the one-launch kernel keeps each row's re-reads on chip.
SPLIT_BELOW = 0.25
# Streamed rows are swept back and forth: pass 2 runs from the row's last block to its first, pass 3 forward
# again, so that each pass starts on the blocks its predecessor read last, the ones most likely still in L2 when
# the rows in flight hold more than L2 (N=4096, C=32768, E=2, fp32: 264 programs x 384 KiB ~ 100 MB against
# an H200's 50 MB). False sweeps every pass forward (benchmarks/triton_tiles.py times both).
STREAM_ZIGZAG = True
# Streamed rows' last read and gradient stores carry L2's evict-first hint (PTX ``L2::cache_hint`` with an
# evict_first policy), so that L2 keeps the lines a later pass still reads rather than those no pass reads
# again or the gradient on its way to memory. Rows in one block (read once, their gradient likely read by the
# next kernel while it is in L2) and split rows (a few rows, all in L2) take no hint.
STREAM_L2_HINTS = True


# ----------------------------------------------------------------------------------------------
# helpers shared with the mutual-KD kernel
# ----------------------------------------------------------------------------------------------


def _to_f32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


@functools.lru_cache(maxsize=256)
def f32_pairs(*values: float) -> tuple[float, ...]:
    """(hi, lo) float32 halves of each scalar. Triton passes Python floats as float32; a float64
    kernel rebuilds the scalar as hi + lo (about 48 significant bits)."""
    out = []
    for v in values:
        hi = _to_f32(v)
        out += [hi, _to_f32(v - hi)]
    return tuple(out)


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def acc_dtype(dtype: torch.dtype):
    """Triton accumulation type: float64 stays float64, bf16/fp16/fp32 accumulate in float32."""
    return tl.float64 if compute_dtype(dtype) == torch.float64 else tl.float32


def num_warps_for(tile_elems: int, elems_per_thread: int) -> int:
    return min(max(next_pow2(tile_elems // (32 * elems_per_thread)), 1), 16)


@triton.jit
def scalar_arg(hi, lo, ACC: tl.constexpr):
    """A scalar passed as float32 halves (see ``f32_pair``); in float32 kernels this is hi."""
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


@triton.jit
def online_lse(m, s, a, c2):
    """Fold a block of raw logits ``a`` into an online softmax over the last axis: running max ``m`` (in
    logit units) and sum ``s`` of 2^((a - m) c2), c2 = log2(e) / tau. A row that is all -inf so far
    keeps m = -inf, s = 0 (no NaN). log2 softmax = (a - m) c2 - log2 s: a - m is exact near the max,
    so confident rows keep full precision (x c2 - (m c2 + log2 s) would lose ulp(|x| / tau))."""
    m_new = tl.maximum(m, tl.max(a, axis=-1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp2((m - m_ref) * c2) + tl.sum(tl.exp2((a - tl.expand_dims(m_ref, -1)) * c2), axis=-1)
    return m_new, s


@triton.jit
def merge_chunk_lse(m_ptrs, s_ptrs, ok, c2):
    """Online softmax statistics of a row cut into chunks, merged over axis 0 in chunk order: (m, s) from each
    chunk's max at ``m_ptrs`` and sum of 2^((a - m) c2) at ``s_ptrs`` ([SPLIT_P2, X]; ``ok``: real chunks). A
    chunk that is all -inf adds nothing (no NaN); a NaN stays NaN."""
    mk = tl.load(m_ptrs, mask=ok, other=float("-inf"))
    sk = tl.load(s_ptrs, mask=ok, other=0.0)
    m = tl.max(mk, axis=0)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    s = tl.sum(tl.where(mk == float("-inf"), 0.0, sk * tl.exp2((mk - m_ref[None, :]) * c2)), axis=0)
    return m, s


@triton.jit
def divergence_terms(DIV: tl.constexpr, lP, lq, P, q, beta, log_beta, log1m_beta):
    """Elementwise pieces of D(P || q) from natural log-probabilities, as the reference's
    ``divergence_terms``: D = sum terms, A = dD/dlog q, B = dD/dlog P, G = dD/dP.
    P * (log P - log r) is 0 where P == 0 (an entry that underflows never gives NaN; a NaN stays NaN)."""
    if DIV == 0:  # KL(P || q)
        terms = tl.where(P == 0, 0.0, P * (lP - lq))
        A = -P
        B = terms + P
        G = lP - lq + 1.0
    elif DIV == 1:  # KL(q || P)
        terms = tl.where(q == 0, 0.0, q * (lq - lP))
        A = terms + q
        B = -q
        G = -tl.exp2((lq - lP) * LOG2E)
    elif DIV == 2:  # beta KL(P || M) + (1 - beta) KL(q || M), M = beta P + (1 - beta) q in log space
        t1 = lP + log_beta
        t2 = lq + log1m_beta
        # logaddexp(t1, t2) = max + log(1 + 2^(-|t1 - t2| log2 e)); |t1 - t2| carries a NaN that max drops
        lM = tl.maximum(t1, t2) + LN2 * tl.log2(1.0 + tl.exp2(-tl.abs(t1 - t2) * LOG2E))
        tp = tl.where(P == 0, 0.0, P * (lP - lM))
        tq = tl.where(q == 0, 0.0, q * (lq - lM))
        A = (1.0 - beta) * tq
        B = beta * tp
        terms = A + B
        G = beta * (lP - lM)
    else:  # 0.5 sum |P - q|; sign(0) = 0 (and sign(NaN) = 0, as torch.sign)
        d = q - P
        sgn = (d > 0).to(d.dtype) - (d < 0).to(d.dtype)
        terms = 0.5 * tl.abs(d)
        A = 0.5 * q * sgn
        B = -0.5 * P * sgn
        G = -0.5 * sgn
    return terms, A, B, G


@triton.jit
def finish_rows(value, keep, bad):
    """NaN for rows with a bad teacher index, 0 for masked rows (broadcast over trailing axes)."""
    return tl.where(bad, float("nan"), tl.where(keep, value, 0.0))


# Streamed rows are split across programs when there are fewer rows than this many programs per SM (on CPU
# tensors, in the interpreter: than CPU_SPLIT_PROGRAMS programs); 0 never splits (tests).
SPLIT_PROGRAMS_PER_SM = 4
CPU_SPLIT_PROGRAMS = 8


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def split_plan(
    B: int, D: int, block: int, device: torch.device, split_below: float = 1.0
) -> tuple[int, int, int]:
    """(n_split, chunk, SPLIT_P2) for B streamed rows of D elements in ``block``-element blocks: each row cut
    into n_split chunks of ``chunk`` elements (a multiple of ``block``) so that B * n_split programs fill the
    device; n_split == 1: no split. Rows are split only when B < split_below * target programs. SPLIT_P2 is
    the power of two >= n_split the reduction loads."""
    if SPLIT_PROGRAMS_PER_SM <= 0:
        return 1, D, 1
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        target = SPLIT_PROGRAMS_PER_SM * _sm_count(index)
    else:
        target = CPU_SPLIT_PROGRAMS
    n_split = min(cdiv(D, block), cdiv(target, B)) if B < split_below * target else 1
    if n_split <= 1:
        return 1, D, 1
    chunk = cdiv(cdiv(D, n_split), block) * block
    n_split = cdiv(D, chunk)
    return n_split, chunk, next_pow2(n_split)


@triton.jit
def sweep_block(i, n_blocks, BACKWARD: tl.constexpr):
    """Block index of step i of a sweep over n_blocks blocks: i, or n_blocks - 1 - i sweeping backward."""
    if BACKWARD:
        return n_blocks - 1 - i
    else:
        return i


@triton.jit
def split_program(n_split, chunk, D):
    """Program (row, chunk) of a split launch: (row, c_begin, c_end, rows [1] int64, row_in [1])."""
    pid = tl.program_id(0)
    row = pid // n_split
    c_begin = (pid % n_split) * chunk
    rows = row.to(tl.int64) + tl.arange(0, 1)
    return row, c_begin, tl.minimum(D, c_begin + chunk), rows, rows >= 0


# ----------------------------------------------------------------------------------------------
# routed KD
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_tile(
    x_ptr, z_ptr, x_row, z_row, load_row, load_slot, cols, C, sx_c, sz_c, EVICT: tl.constexpr, ACC: tl.constexpr
):
    """Student logits [ROWS, BLOCK_C] (-inf past C) and teacher logits [ROWS, KP, BLOCK_C] (0 where not
    loaded), in the accumulation type; loaded with L2 eviction policy EVICT ("" or "evict_first")."""
    cm = cols < C
    c64 = cols.to(tl.int64)
    xv = tl.load(
        x_ptr + x_row[:, None] + c64[None, :] * sx_c, mask=load_row[:, None] & cm[None, :], other=0.0,
        eviction_policy=EVICT,
    )
    xa = tl.where(cm[None, :], xv.to(ACC), float("-inf"))
    z_off = z_row[:, :, None] + c64[None, None, :] * sz_c
    zv = tl.load(z_ptr + z_off, mask=load_slot[:, :, None] & cm[None, None, :], other=0.0, eviction_policy=EVICT)
    return xa, zv.to(ACC)


@triton.jit
def _teacher_side(MIX: tl.constexpr, za, w, cols, C):
    """The logits whose softmax is tracked: every slot [ROWS, KP, BLOCK_C], or for mix "logits" the
    weighted sum [ROWS, BLOCK_C]; -inf past C."""
    cm = cols < C
    if MIX == 1:
        t = tl.where(cm[None, :], tl.sum(w[:, :, None] * za, axis=1), float("-inf"))
    else:
        t = tl.where(cm[None, None, :], za, float("-inf"))
    return t


@triton.jit
def _elementwise(
    MIX: tl.constexpr, DIV: tl.constexpr, xa, t, mx, lsx, mt, lst, c2, w, lw2, beta, log_beta, log1m_beta
):
    """Per-element pieces of one block: (q, p, terms, A, B, G, P).

    mix loss:   p = softmax of each slot, terms/A/B/G per slot [ROWS, KP, BLOCK_C], P = sum_k w_k p_k;
    mix logits: p = P = softmax of the weighted logits, pieces [ROWS, BLOCK_C];
    mix probs:  p per slot, P = sum_k w_k p_k formed in log space, pieces of D(P || q) [ROWS, BLOCK_C],
                and G replaced by p_k dD/dP [ROWS, KP, BLOCK_C] (reverse KL: -p_k q / P in log space,
                since P may underflow where p_k does not).
    """
    lq2 = (xa - mx[:, None]) * c2 - lsx[:, None]
    q = tl.exp2(lq2)
    lq = lq2 * LN2
    if MIX == 0:
        lp2 = (t - mt[:, :, None]) * c2 - lst[:, :, None]
        p = tl.exp2(lp2)
        terms, A, B, G = divergence_terms(
            DIV, lp2 * LN2, lq[:, None, :], p, q[:, None, :], beta, log_beta, log1m_beta
        )
        P = tl.sum(w[:, :, None] * p, axis=1)
    elif MIX == 1:
        lP2 = (t - mt[:, None]) * c2 - lst[:, None]
        P = tl.exp2(lP2)
        p = P
        terms, A, B, G = divergence_terms(DIV, lP2 * LN2, lq, P, q, beta, log_beta, log1m_beta)
    else:
        lp2 = (t - mt[:, :, None]) * c2 - lst[:, :, None]
        p = tl.exp2(lp2)
        # log P = logsumexp_k(log w_k + log p_k), as the reference: a class on which every weighted
        # teacher underflows keeps a finite log P
        lwp = lw2[:, :, None] + lp2
        m = tl.max(lwp, axis=1)
        m_ref = tl.where(m == float("-inf"), 0.0, m)
        lP2 = m + tl.log2(tl.sum(tl.exp2(lwp - m_ref[:, None, :]), axis=1))
        P = tl.exp2(lP2)
        terms, A, B, G = divergence_terms(DIV, lP2 * LN2, lq, P, q, beta, log_beta, log1m_beta)
        if DIV == 1:
            G = -tl.exp2(lp2 + (lq2 - lP2)[:, None, :])
        else:
            G = p * G[:, None, :]
    return q, p, terms, A, B, G, P


@triton.jit
def _store_dx(dx_ptr, du, gscale, dx_row, cols, C, S, row_in, keep, bad, EVICT: tl.constexpr):
    g = finish_rows(du * gscale, keep[:, None], bad[:, None])
    off = dx_row[:, None] + cols.to(tl.int64)[None, :] * S
    tl.store(
        dx_ptr + off, g.to(dx_ptr.dtype.element_ty), mask=row_in[:, None] & (cols < C)[None, :], eviction_policy=EVICT
    )


@triton.jit
def _store_dz(dz_ptr, dv, gscale, dz_row, cols, C, S, store_slot, keep, bad, EVICT: tl.constexpr):
    """dv [ROWS, KP, BLOCK_C] is d loss / dv of each slot's teacher, already scaled by the slot's
    effective weight; a teacher selected twice is stored once (store_slot) with the summed weight. EVICT: the
    stores' L2 eviction policy."""
    g = finish_rows(dv * gscale, keep[:, None, None], bad[:, None, None])
    off = dz_row[:, :, None] + cols.to(tl.int64)[None, None, :] * S
    tl.store(
        dz_ptr + off, g.to(dz_ptr.dtype.element_ty), mask=store_slot[:, :, None] & (cols < C)[None, None, :],
        eviction_policy=EVICT,
    )


@triton.jit
def _routing(
    b, s, S, row_in, w_ptr, idx_ptr, mask_ptr, E, K,
    HAS_IDX: tl.constexpr, HAS_MASK: tl.constexpr, NEED_DZ: tl.constexpr, KP: tl.constexpr, ACC: tl.constexpr,
):
    """Routing of rows (b, s): (kk, k_ok, slot_in, w, teacher, bad, keep, load_row, load_slot, w_eff, store_slot).
    A row with an out-of-range index is ``bad`` (NaN row, its teachers never read), a masked row is not kept; a
    teacher selected twice gets one store (store_slot) carrying the sum of its slots' weights (w_eff)."""
    kk = tl.arange(0, KP)
    k_ok = kk < K
    slot_in = row_in[:, None] & k_ok[None, :]
    w = tl.load(w_ptr + b[:, None] * K + kk[None, :], mask=slot_in, other=0.0).to(ACC)
    if HAS_IDX:
        teacher = tl.load(idx_ptr + b[:, None] * K + kk[None, :], mask=slot_in, other=0)
        bad = tl.max((slot_in & ((teacher < 0) | (teacher >= E))).to(tl.int32), axis=1) > 0
        # clamped: read only for good rows; a bad row's NaN gradient lands on its clamped slots
        teacher = tl.minimum(tl.maximum(teacher, 0), E - 1)
    else:
        teacher = tl.zeros_like(b)[:, None] + kk[None, :]
        bad = b < 0
    if HAS_MASK:
        keep = tl.load(mask_ptr + b * S + s, mask=row_in, other=0) != 0
    else:
        keep = row_in
    load_row = row_in & keep & (~bad)
    load_slot = load_row[:, None] & k_ok[None, :]
    # a teacher selected twice: its slots see the same teacher row, so their gradients differ only by the weight
    if NEED_DZ and HAS_IDX:
        same = (teacher[:, :, None] == teacher[:, None, :]) & k_ok[None, None, :]
        w_eff = tl.sum(tl.where(same, w[:, None, :], 0.0), axis=2)
        earlier = tl.sum((same & (kk[None, :] < kk[:, None])[None, :, :]).to(tl.int32), axis=2)
        store_slot = (row_in & (keep | bad))[:, None] & k_ok[None, :] & (earlier == 0)
    else:
        w_eff = w
        store_slot = slot_in
    return kk, k_ok, slot_in, w, teacher, bad, keep, load_row, load_slot, w_eff, store_slot


@triton.jit
def _scalars(inv_tau_hi, inv_tau_lo, scale_hi, scale_lo, beta_hi, beta_lo, ACC: tl.constexpr):
    """(1/tau, scale, beta, log beta, log(1 - beta), c2 = log2(e) / tau, gradient scale = scale / tau)."""
    inv_tau = scalar_arg(inv_tau_hi, inv_tau_lo, ACC)
    scale = scalar_arg(scale_hi, scale_lo, ACC)
    beta = scalar_arg(beta_hi, beta_lo, ACC)
    return inv_tau, scale, beta, tl.log(beta), tl.log(1.0 - beta), inv_tau * LOG2E, scale * inv_tau


@triton.jit
def _lse_init(MIX: tl.constexpr, ROWS: tl.constexpr, KP: tl.constexpr, ACC: tl.constexpr):
    """Empty online-softmax statistics (mx, sx, mt, st) of the student [ROWS] and the teacher side ([ROWS, KP],
    or [ROWS] for mix "logits")."""
    mx = tl.full([ROWS], float("-inf"), ACC)
    sx = tl.zeros([ROWS], ACC)
    if MIX == 1:
        mt = tl.full([ROWS], float("-inf"), ACC)
        st = tl.zeros([ROWS], ACC)
    else:
        mt = tl.full([ROWS, KP], float("-inf"), ACC)
        st = tl.zeros([ROWS, KP], ACC)
    return mx, sx, mt, st


@triton.jit
def _lse_block(
    MIX: tl.constexpr, x_ptr, z_ptr, x_row, z_row, load_row, load_slot, w, cols, bound, sx_c, sz_c, c2,
    mx, sx, mt, st, ACC: tl.constexpr,
):
    """Pass 1 over one block (classes ``cols`` below ``bound``): the block's logits folded into the online
    log-sum-exps; returns (mx, sx, mt, st, xa, za, t) with the block's student, teacher and teacher-side logits."""
    xa, za = _load_tile(x_ptr, z_ptr, x_row, z_row, load_row, load_slot, cols, bound, sx_c, sz_c, "", ACC)
    t = _teacher_side(MIX, za, w, cols, bound)
    mx, sx = online_lse(mx, sx, xa, c2)
    mt, st = online_lse(mt, st, t, c2)
    return mx, sx, mt, st, xa, za, t


@triton.jit
def _sums_init(MIX: tl.constexpr, ROWS: tl.constexpr, KP: tl.constexpr, ACC: tl.constexpr):
    """Zero row sums of pass 2: (D, sum_A, sum_B, bv, pv).
    mix loss: D [ROWS, KP] per slot, sum_A [ROWS] = sum_k w_k sum_c A_k, sum_B [ROWS, KP];
    mix logits: D, sum_A, sum_B [ROWS], bv = sum_c B v_k and pv = sum_c P v_k [ROWS, KP] (for dw);
    mix probs: D, sum_A [ROWS], sum_B = sum_c p_k dD/dP [ROWS, KP] (= dL/dw_k)."""
    sum_A = tl.zeros([ROWS], ACC)
    bv = tl.zeros([ROWS, KP], ACC)
    pv = tl.zeros([ROWS, KP], ACC)
    if MIX == 0:
        D = tl.zeros([ROWS, KP], ACC)
        sum_B = tl.zeros([ROWS, KP], ACC)
    elif MIX == 1:
        D = tl.zeros([ROWS], ACC)
        sum_B = tl.zeros([ROWS], ACC)
    else:
        D = tl.zeros([ROWS], ACC)
        sum_B = tl.zeros([ROWS, KP], ACC)
    return D, sum_A, sum_B, bv, pv


@triton.jit
def _sums_block(
    MIX: tl.constexpr, DIV: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DZ: tl.constexpr,
    DX_EARLY: tl.constexpr, DZ_EARLY: tl.constexpr,
    xa, za, t, mx, lsx, mt, lst, c2, inv_tau, gscale, w, lw2, w_sum, w_eff, beta, log_beta, log1m_beta,
    cols, bound, S, dx_ptr, dz_ptr, dx_row, dz_row, row_in, keep, bad, store_slot,
    D, sum_A, sum_B, bv, pv, EVICT: tl.constexpr,
):
    """Pass 2 over one block: its loss terms and row sums added to (D, sum_A, sum_B, bv, pv), returned; the
    gradients known in closed form are written (KL: sum_c A = -sum_c P, so dx = scale / tau * (q sum_k w_k - P);
    reverse KL with mix loss/logits: sum_c B = -1, so dz_k = scale / tau * w_k (P - q)), with L2 eviction policy
    EVICT."""
    q, p, terms, A, Bt, G, P = _elementwise(
        MIX, DIV, xa, t, mx, lsx, mt, lst, c2, w, lw2, beta, log_beta, log1m_beta
    )
    # row sums are accumulated only where a later gradient reads them
    if MIX == 0:
        D += tl.sum(terms, axis=2)
        if NEED_DX and not DX_EARLY:
            sum_A += tl.sum(tl.sum(w[:, :, None] * A, axis=2), axis=1)
        if NEED_DZ and not DZ_EARLY:
            sum_B += tl.sum(Bt, axis=2)
    elif MIX == 1:
        D += tl.sum(terms, axis=1)
        if NEED_DX and not DX_EARLY:
            sum_A += tl.sum(A, axis=1)
        if NEED_DW or (NEED_DZ and not DZ_EARLY):
            sum_B += tl.sum(Bt, axis=1)
        if NEED_DW:
            v = za * inv_tau  # z / tau, 0 where not loaded
            bv += tl.sum(Bt[:, None, :] * v, axis=2)
            pv += tl.sum(P[:, None, :] * v, axis=2)
    else:
        D += tl.sum(terms, axis=1)
        if NEED_DX and not DX_EARLY:
            sum_A += tl.sum(A, axis=1)
        if NEED_DW or NEED_DZ:
            sum_B += tl.sum(tl.where((cols < bound)[None, None, :], G, 0.0), axis=2)
    if DX_EARLY:  # KL: sum_c A = -sum_c P = -(sum_k w_k) (mix logits: -1)
        if MIX == 1:
            _store_dx(dx_ptr, q - P, gscale, dx_row, cols, bound, S, row_in, keep, bad, EVICT)
        else:
            _store_dx(dx_ptr, q * w_sum[:, None] - P, gscale, dx_row, cols, bound, S, row_in, keep, bad, EVICT)
    if DZ_EARLY:  # reverse KL, mix loss/logits: B = -q, sum_c B = -1
        if MIX == 1:
            dv = w_eff[:, :, None] * (P - q)[:, None, :]
        else:
            dv = w_eff[:, :, None] * (p - q[:, None, :])
        _store_dz(dz_ptr, dv, gscale, dz_row, cols, bound, S, store_slot, keep, bad, EVICT)
    return D, sum_A, sum_B, bv, pv


@triton.jit
def _late_block(
    MIX: tl.constexpr, DIV: tl.constexpr, NEED_DX: tl.constexpr, NEED_DZ: tl.constexpr,
    DX_EARLY: tl.constexpr, DZ_EARLY: tl.constexpr,
    xa, t, mx, lsx, mt, lst, c2, gscale, w, lw2, w_eff, beta, log_beta, log1m_beta, sum_A, sum_B,
    cols, bound, S, dx_ptr, dz_ptr, dx_row, dz_row, row_in, keep, bad, store_slot, EVICT: tl.constexpr,
):
    """Pass 3 over one block: the gradients that need the row sums of pass 2 (stored with L2 eviction policy
    EVICT)."""
    q, p, terms, A, Bt, G, P = _elementwise(
        MIX, DIV, xa, t, mx, lsx, mt, lst, c2, w, lw2, beta, log_beta, log1m_beta
    )
    if NEED_DX and not DX_EARLY:
        if MIX == 0:
            du = tl.sum(w[:, :, None] * A, axis=1) - q * sum_A[:, None]
        else:
            du = A - q * sum_A[:, None]
        _store_dx(dx_ptr, du, gscale, dx_row, cols, bound, S, row_in, keep, bad, EVICT)
    if NEED_DZ and not DZ_EARLY:
        if MIX == 0:  # w_k (B_k - p_k sum_c B_k)
            dv = w_eff[:, :, None] * (Bt - p * sum_B[:, :, None])
        elif MIX == 1:  # w_k (B - P sum_c B)
            dv = w_eff[:, :, None] * (Bt - P * sum_B[:, None])[:, None, :]
        else:  # w_k (p_k G - p_k sum_c p_k G), G here already p_k dD/dP
            dv = w_eff[:, :, None] * (G - p * sum_B[:, :, None])
        _store_dz(dz_ptr, dv, gscale, dz_row, cols, bound, S, store_slot, keep, bad, EVICT)


@triton.jit
def _store_row_results(
    MIX: tl.constexpr, NEED_DW: tl.constexpr, loss_ptr, dw_ptr, n, K, kk, w, D, sum_B, bv, pv, scale,
    row_out, slot_out, keep, bad,
):
    """The rows' loss (and dL/dw) from the totals of pass 2, scaled, into loss [B * S] and dw [B * S, K]."""
    if MIX == 0:
        loss = tl.sum(w * D, axis=1)
        dw = D
    elif MIX == 1:
        loss = D
        dw = bv - sum_B[:, None] * pv  # sum_c (B - P sum_c B) v_k
    else:
        loss = D
        dw = sum_B
    tl.store(loss_ptr + n, finish_rows(loss * scale, keep, bad), mask=row_out)
    if NEED_DW:
        tl.store(dw_ptr + n[:, None] * K + kk[None, :], finish_rows(dw * scale, keep[:, None], bad[:, None]),
                 mask=slot_out)


@triton.jit
def _routed_kd_kernel(
    x_ptr, z_ptr, w_ptr, idx_ptr, mask_ptr, loss_ptr, dx_ptr, dw_ptr, dz_ptr,
    B, C, S, E, K, s_blocks, sx_b, sx_c, sx_s, sz_e, sz_b, sz_c, sz_s,
    inv_tau_hi, inv_tau_lo, scale_hi, scale_lo, beta_hi, beta_lo,
    MIX: tl.constexpr, DIV: tl.constexpr, HAS_IDX: tl.constexpr, HAS_MASK: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DZ: tl.constexpr,
    DX_EARLY: tl.constexpr, DZ_EARLY: tl.constexpr, THIRD_PASS: tl.constexpr,
    ROWS: tl.constexpr, KP: tl.constexpr, BLOCK_C: tl.constexpr, SINGLE: tl.constexpr,
    ROWS_OVER_S: tl.constexpr, ZIGZAG: tl.constexpr, EVICT: tl.constexpr, ACC: tl.constexpr,
):
    """ROWS whole rows per program, the three passes of the module docstring (pass 2 backward with ZIGZAG; the
    row's last read and the gradient stores with L2 eviction policy EVICT)."""
    pid = tl.program_id(0)
    r = tl.arange(0, ROWS)
    if ROWS_OVER_S:  # ROWS consecutive pixels of sample b
        b = tl.zeros([ROWS], tl.int64) + pid // s_blocks
        s = ((pid % s_blocks) * ROWS + r).to(tl.int64)
        row_in = s < S
    else:  # ROWS samples, S == 1
        b = pid.to(tl.int64) * ROWS + r
        s = tl.zeros([ROWS], tl.int64)
        row_in = b < B
    kk, k_ok, slot_in, w, teacher, bad, keep, load_row, load_slot, w_eff, store_slot = _routing(
        b, s, S, row_in, w_ptr, idx_ptr, mask_ptr, E, K, HAS_IDX, HAS_MASK, NEED_DZ, KP, ACC
    )
    x_row = b * sx_b + s * sx_s
    z_row = teacher * sz_e + (b * sz_b + s * sz_s)[:, None]
    dx_row = b * C * S + s
    dz_row = teacher * B * C * S + (b * C * S + s)[:, None]
    inv_tau, scale, beta, log_beta, log1m_beta, c2, gscale = _scalars(
        inv_tau_hi, inv_tau_lo, scale_hi, scale_lo, beta_hi, beta_lo, ACC
    )
    if MIX == 2:
        lw2 = tl.log2(w)  # -inf for w = 0: that teacher is left out of log P
    else:
        lw2 = w
    w_sum = tl.sum(w, axis=1)

    # pass 1: online log-sum-exps of the student and the teacher side
    mx, sx, mt, st = _lse_init(MIX, ROWS, KP, ACC)
    if SINGLE:  # the whole row in one block, kept in registers for every pass
        cols = tl.arange(0, BLOCK_C)
        mx, sx, mt, st, xa, za, t = _lse_block(
            MIX, x_ptr, z_ptr, x_row, z_row, load_row, load_slot, w, cols, C, sx_c, sz_c, c2, mx, sx, mt, st, ACC
        )
    else:
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            mx, sx, mt, st, xa, za, t = _lse_block(
                MIX, x_ptr, z_ptr, x_row, z_row, load_row, load_slot, w, cols, C, sx_c, sz_c, c2, mx, sx, mt, st,
                ACC,
            )
    lsx = tl.log2(sx)  # log2 softmax = (logit - m) c2 - log2 s
    lst = tl.log2(st)

    # pass 2: loss terms and row sums; closed-form gradients
    D, sum_A, sum_B, bv, pv = _sums_init(MIX, ROWS, KP, ACC)
    n_blocks = 1 if SINGLE else tl.cdiv(C, BLOCK_C)
    for i in range(0, n_blocks):
        cols = sweep_block(i, n_blocks, ZIGZAG) * BLOCK_C + tl.arange(0, BLOCK_C)
        if not SINGLE:
            if THIRD_PASS:
                xa, za = _load_tile(x_ptr, z_ptr, x_row, z_row, load_row, load_slot, cols, C, sx_c, sz_c, "", ACC)
            else:  # the row's last read
                xa, za = _load_tile(x_ptr, z_ptr, x_row, z_row, load_row, load_slot, cols, C, sx_c, sz_c, EVICT, ACC)
            t = _teacher_side(MIX, za, w, cols, C)
        D, sum_A, sum_B, bv, pv = _sums_block(
            MIX, DIV, NEED_DX, NEED_DW, NEED_DZ, DX_EARLY, DZ_EARLY,
            xa, za, t, mx, lsx, mt, lst, c2, inv_tau, gscale, w, lw2, w_sum, w_eff, beta, log_beta, log1m_beta,
            cols, C, S, dx_ptr, dz_ptr, dx_row, dz_row, row_in, keep, bad, store_slot, D, sum_A, sum_B, bv, pv, EVICT,
        )
    _store_row_results(
        MIX, NEED_DW, loss_ptr, dw_ptr, b * S + s, K, kk, w, D, sum_B, bv, pv, scale, row_in, slot_in, keep, bad
    )

    # pass 3: gradients that need the row sums of pass 2
    if THIRD_PASS:
        for blk in range(0, n_blocks):
            cols = blk * BLOCK_C + tl.arange(0, BLOCK_C)
            if not SINGLE:
                xa, za = _load_tile(x_ptr, z_ptr, x_row, z_row, load_row, load_slot, cols, C, sx_c, sz_c, EVICT, ACC)
                t = _teacher_side(MIX, za, w, cols, C)
            _late_block(
                MIX, DIV, NEED_DX, NEED_DZ, DX_EARLY, DZ_EARLY,
                xa, t, mx, lsx, mt, lst, c2, gscale, w, lw2, w_eff, beta, log_beta, log1m_beta, sum_A, sum_B,
                cols, C, S, dx_ptr, dz_ptr, dx_row, dz_row, row_in, keep, bad, store_slot, EVICT,
            )


@triton.jit
def _store_part(ptr, v, kk, ONE_PER_ROW: tl.constexpr):
    """Store a chunk's [1] (ONE_PER_ROW) or [1, KP] statistic at ptr."""
    if ONE_PER_ROW:
        tl.store(ptr + tl.arange(0, 1), v)
    else:
        tl.store(ptr + kk[None, :], v)


@triton.jit
def _part_total(part_ptr, row_base, ok, off, kk, ONE_PER_ROW: tl.constexpr):
    """Sum over a row's chunks, in chunk order, of the [1] or [1, KP] statistic at offset ``off`` of each chunk's
    record (records at part_ptr + row_base [SPLIT_P2]; ok: real chunks)."""
    if ONE_PER_ROW:
        cols = tl.arange(0, 1)
    else:
        cols = kk
    v = tl.load(part_ptr + (row_base + off)[:, None] + cols[None, :], mask=ok[:, None], other=0.0)
    total = tl.sum(v, axis=0)
    if not ONE_PER_ROW:
        total = total[None, :]
    return total


@triton.jit
def _part_lse(part_ptr, row_base, ok, off, kk, GAP: tl.constexpr, c2, ONE_PER_ROW: tl.constexpr):
    """(m, log2 s) of a row from its chunks' online softmax statistics (max at ``off``, sum at ``off + GAP``)."""
    if ONE_PER_ROW:
        cols = tl.arange(0, 1)
    else:
        cols = kk
    at = part_ptr + (row_base + off)[:, None] + cols[None, :]
    m, s = merge_chunk_lse(at, at + GAP, ok[:, None], c2)
    ls = tl.log2(s)
    if not ONE_PER_ROW:
        m = m[None, :]
        ls = ls[None, :]
    return m, ls


@triton.jit
def _routed_kd_split_kernel(
    x_ptr, z_ptr, w_ptr, idx_ptr, mask_ptr, loss_ptr, dx_ptr, dw_ptr, dz_ptr, lse_part_ptr, sum_part_ptr,
    B, C, E, K, sx_b, sx_c, sz_e, sz_b, sz_c,
    inv_tau_hi, inv_tau_lo, scale_hi, scale_lo, beta_hi, beta_lo, n_split, chunk,
    PHASE: tl.constexpr, MIX: tl.constexpr, DIV: tl.constexpr, HAS_IDX: tl.constexpr, HAS_MASK: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DZ: tl.constexpr,
    DX_EARLY: tl.constexpr, DZ_EARLY: tl.constexpr, THIRD_PASS: tl.constexpr,
    KP: tl.constexpr, BLOCK_C: tl.constexpr, SPLIT_P2: tl.constexpr, ACC: tl.constexpr,
):
    """Program (row, chunk) of a class-logit row (S == 1) cut into chunks, one pass per PHASE: 1 the chunk's
    online softmax statistics; 2 (statistics merged in chunk order) the chunk's row sums and closed-form
    gradients; 3 (row sums added in chunk order) the loss and dw (chunk 0) and the chunk's third-pass gradients.
    Records per program: lse_part [mx, mt(KP), sx, st(KP)] (2 KP + 2), sum_part [D, sum_B, bv, pv (KP each),
    sum_A] (4 KP + 1); a per-row value of a [1, KP]-shaped slot sits in its first entry."""
    pid = tl.program_id(0)
    row, c_begin, c_end, b, row_in = split_program(n_split, chunk, C)
    s = tl.zeros_like(b)
    kk, k_ok, slot_in, w, teacher, bad, keep, load_row, load_slot, w_eff, store_slot = _routing(
        b, s, 1, row_in, w_ptr, idx_ptr, mask_ptr, E, K, HAS_IDX, HAS_MASK, NEED_DZ, KP, ACC
    )
    x_row = b * sx_b
    z_row = teacher * sz_e + (b * sz_b)[:, None]
    dx_row = b * C
    dz_row = teacher * B * C + (b * C)[:, None]
    inv_tau, scale, beta, log_beta, log1m_beta, c2, gscale = _scalars(
        inv_tau_hi, inv_tau_lo, scale_hi, scale_lo, beta_hi, beta_lo, ACC
    )
    if MIX == 2:
        lw2 = tl.log2(w)
    else:
        lw2 = w
    LW: tl.constexpr = 2 * KP + 2
    NS: tl.constexpr = 4 * KP + 1
    if PHASE == 1:
        mx, sx, mt, st = _lse_init(MIX, 1, KP, ACC)
        for c0 in range(c_begin, c_end, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            mx, sx, mt, st, xa, za, t = _lse_block(
                MIX, x_ptr, z_ptr, x_row, z_row, load_row, load_slot, w, cols, c_end, sx_c, sz_c, c2,
                mx, sx, mt, st, ACC,
            )
        rec = lse_part_ptr + pid.to(tl.int64) * LW
        _store_part(rec, mx, kk, True)
        _store_part(rec + 1, mt, kk, MIX == 1)
        _store_part(rec + KP + 1, sx, kk, True)
        _store_part(rec + KP + 2, st, kk, MIX == 1)
    else:
        chunks = tl.arange(0, SPLIT_P2)
        ok = chunks < n_split
        first = row.to(tl.int64) * n_split + chunks
        mx, lsx = _part_lse(lse_part_ptr, first * LW, ok, 0, kk, KP + 1, c2, True)
        mt, lst = _part_lse(lse_part_ptr, first * LW, ok, 1, kk, KP + 1, c2, MIX == 1)
        if PHASE == 2:
            D, sum_A, sum_B, bv, pv = _sums_init(MIX, 1, KP, ACC)
            for c0 in range(c_begin, c_end, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                xa, za = _load_tile(
                    x_ptr, z_ptr, x_row, z_row, load_row, load_slot, cols, c_end, sx_c, sz_c, "", ACC
                )
                t = _teacher_side(MIX, za, w, cols, c_end)
                D, sum_A, sum_B, bv, pv = _sums_block(
                    MIX, DIV, NEED_DX, NEED_DW, NEED_DZ, DX_EARLY, DZ_EARLY,
                    xa, za, t, mx, lsx, mt, lst, c2, inv_tau, gscale, w, lw2, tl.sum(w, axis=1), w_eff,
                    beta, log_beta, log1m_beta, cols, c_end, 1, dx_ptr, dz_ptr, dx_row, dz_row, row_in, keep, bad,
                    store_slot, D, sum_A, sum_B, bv, pv, "",
                )
            rec = sum_part_ptr + pid.to(tl.int64) * NS
            _store_part(rec, D, kk, MIX != 0)
            _store_part(rec + KP, sum_B, kk, MIX == 1)
            _store_part(rec + 2 * KP, bv, kk, False)
            _store_part(rec + 3 * KP, pv, kk, False)
            _store_part(rec + 4 * KP, sum_A, kk, True)
        else:
            D = _part_total(sum_part_ptr, first * NS, ok, 0, kk, MIX != 0)
            sum_B = _part_total(sum_part_ptr, first * NS, ok, KP, kk, MIX == 1)
            bv = _part_total(sum_part_ptr, first * NS, ok, 2 * KP, kk, False)
            pv = _part_total(sum_part_ptr, first * NS, ok, 3 * KP, kk, False)
            sum_A = _part_total(sum_part_ptr, first * NS, ok, 4 * KP, kk, True)
            chunk0 = row_in & ((c_begin + tl.zeros_like(b)) == 0)
            _store_row_results(
                MIX, NEED_DW, loss_ptr, dw_ptr, b, K, kk, w, D, sum_B, bv, pv, scale, chunk0,
                chunk0[:, None] & slot_in, keep, bad,
            )
            if THIRD_PASS:
                for c0 in range(c_begin, c_end, BLOCK_C):
                    cols = c0 + tl.arange(0, BLOCK_C)
                    xa, za = _load_tile(
                        x_ptr, z_ptr, x_row, z_row, load_row, load_slot, cols, c_end, sx_c, sz_c, "", ACC
                    )
                    t = _teacher_side(MIX, za, w, cols, c_end)
                    _late_block(
                        MIX, DIV, NEED_DX, NEED_DZ, DX_EARLY, DZ_EARLY,
                        xa, t, mx, lsx, mt, lst, c2, gscale, w, lw2, w_eff, beta, log_beta, log1m_beta, sum_A,
                        sum_B, cols, c_end, 1, dx_ptr, dz_ptr, dx_row, dz_row, row_in, keep, bad, store_slot, "",
                    )


def tile_plan(C: int, KP: int, rows_max: int, min_rows: int, tiles: tuple[int, int, int, int]):
    """(BLOCK_C, ROWS, num_warps) for rows of C classes with KP slots: whole rows when they fit the
    tile, else streaming blocks; at least ``min_rows`` rows (pixels) per program when available."""
    tile, per_thread, stream_tile, stream_per_thread = tiles
    lead = min(min_rows, rows_max)
    if next_pow2(C) * KP * lead > tile:
        tile, per_thread = stream_tile, stream_per_thread
    block_c = min(next_pow2(C), max(tile // (KP * lead), 16))
    rows = max(1, min(tile // (KP * block_c), rows_max))
    return block_c, rows, num_warps_for(rows * KP * block_c, per_thread)


@functools.lru_cache(maxsize=1024)
def _launch_plan(B: int, C: int, S: int, K: int, row_tiles: tuple, pixel_tiles: tuple, pixels: int):
    """(KP, ROWS_OVER_S, BLOCK_C, ROWS, s_blocks, grid, num_warps) for one problem shape."""
    KP = next_pow2(K)
    rows_over_s = S > 1
    if rows_over_s:
        block_c, rows, num_warps = tile_plan(C, KP, next_pow2(S), pixels, pixel_tiles)
    else:
        block_c, rows, num_warps = tile_plan(C, KP, next_pow2(B), 1, row_tiles)
        if C > block_c:  # streamed: the student's block counts too, so one or two teachers stream shorter blocks
            block_c = max(min(block_c, row_tiles[2] // STREAM_MIN_SLOTS), 16)
    s_blocks = cdiv(S, rows)
    grid = (B * s_blocks if rows_over_s else cdiv(B, rows),)
    return KP, rows_over_s, block_c, rows, s_blocks, grid, num_warps


def split_rows_plan(B: int, C: int, S: int, block_c: int, device: torch.device) -> tuple[int, int, int, int]:
    """(n_split, chunk, SPLIT_P2, BLOCK_C) of the split kernel for B rows of C class logits that the one-launch
    kernel streams in ``block_c``-class blocks; n_split == 1: not split (rows of dense logits never are). Split
    programs stream half-size blocks at the same warps (spill-free at sm_80 and sm_90 with every gradient)."""
    if S > 1 or C <= block_c:
        return 1, C, 1, block_c
    block = max(block_c // 2, 16)
    n_split, chunk, split_p2 = split_plan(B, C, block, device, SPLIT_BELOW)
    return n_split, chunk, split_p2, block


def routed_kd_rows(
    x: Tensor,
    z: Tensor,
    weights: Tensor,
    indices: Tensor | None,
    mask: Tensor | None,
    temperature: float,
    mix: int,
    divergence: int,
    beta: float,
    scale: float,
    need_dx: bool,
    need_dw: bool,
    need_dz: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Row losses and row gradients (loss [B, S], dx [B, C, S], dw [B, S, K], dz [E, B, C, S]) in one
    launch (three for split rows); the reference's contract (``mmfast.reference.routed_kd.routed_kd_rows``)."""
    B, C, S = x.shape
    E, K = z.shape[0], weights.shape[1]
    w, idx, m, loss, dx, dw, dz = routed_kd_outputs(x, z, weights, indices, mask, need_dx, need_dw, need_dz)
    if loss.numel() == 0 or C == 0:
        loss.zero_()
        return loss, dx, dw, dz

    KP, rows_over_s, block_c, rows, s_blocks, grid, num_warps = _launch_plan(
        B, C, S, K, ROW_TILES, PIXEL_TILES, PIXELS_PER_PROGRAM
    )
    dx_early = need_dx and divergence == 0
    dz_early = need_dz and divergence == 1 and mix != 2
    third_pass = (need_dx and not dx_early) or (need_dz and not dz_early)
    flags = dict(
        MIX=mix,
        DIV=divergence,
        HAS_IDX=idx is not None,
        HAS_MASK=m is not None,
        NEED_DX=need_dx,
        NEED_DW=need_dw,
        NEED_DZ=need_dz,
        DX_EARLY=dx_early,
        DZ_EARLY=dz_early,
        THIRD_PASS=third_pass,
        KP=KP,
        ACC=acc_dtype(x.dtype),
        num_warps=num_warps,
    )
    tensors = (x, z, w, idx if idx is not None else w, m if m is not None else w, loss, dx, dw, dz)
    scalars = f32_pairs(1.0 / temperature, scale, beta)
    n_split, chunk, split_p2, split_block = split_rows_plan(B, C, S, block_c, x.device)
    if n_split > 1:
        acc = compute_dtype(x.dtype)
        lse_part = torch.empty(B * n_split, 2 * KP + 2, dtype=acc, device=x.device)
        sum_part = torch.empty(B * n_split, 4 * KP + 1, dtype=acc, device=x.device)
        for phase in (1, 2, 3):
            _routed_kd_split_kernel[(B * n_split,)](
                *tensors, lse_part, sum_part, B, C, E, K, x.stride(0), x.stride(1), z.stride(0), z.stride(1),
                z.stride(2), *scalars, n_split, chunk, PHASE=phase, BLOCK_C=split_block, SPLIT_P2=split_p2, **flags,
            )
        return loss, dx, dw, dz
    single = C <= block_c
    if not single and not rows_over_s and third_pass:
        # three passes hold more per class: half the block at the same warps (the whole block spilled up to 52
        # bytes per thread at 255 registers, bf16 js; scripts/triton_compile_check.py)
        block_c = max(block_c // 2, 16)
    _routed_kd_kernel[grid](
        *tensors, B, C, S, E, K, s_blocks, *x.stride(), *z.stride(), *scalars,
        ROWS=rows, BLOCK_C=block_c, SINGLE=single, ROWS_OVER_S=rows_over_s, ZIGZAG=STREAM_ZIGZAG and not single,
        EVICT="evict_first" if STREAM_L2_HINTS and not single else "", **flags,
    )
    return loss, dx, dw, dz
