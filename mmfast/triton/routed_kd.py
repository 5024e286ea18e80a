"""Routed teacher-mixture KD in one Triton launch: row losses, with the gradients written in the forward.

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
When a row fits in one block (SINGLE) it is loaded once and kept in registers for every pass.
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


# ----------------------------------------------------------------------------------------------
# routed KD
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_tile(x_ptr, z_ptr, x_row, z_row, load_row, load_slot, cols, C, sx_c, sz_c, ACC: tl.constexpr):
    """Student logits [ROWS, BLOCK_C] (-inf past C) and teacher logits [ROWS, KP, BLOCK_C] (0 where not
    loaded), in the accumulation type."""
    cm = cols < C
    c64 = cols.to(tl.int64)
    xv = tl.load(
        x_ptr + x_row[:, None] + c64[None, :] * sx_c, mask=load_row[:, None] & cm[None, :], other=0.0
    )
    xa = tl.where(cm[None, :], xv.to(ACC), float("-inf"))
    z_off = z_row[:, :, None] + c64[None, None, :] * sz_c
    zv = tl.load(z_ptr + z_off, mask=load_slot[:, :, None] & cm[None, None, :], other=0.0)
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
def _store_dx(dx_ptr, du, gscale, dx_row, cols, C, S, row_in, keep, bad):
    g = finish_rows(du * gscale, keep[:, None], bad[:, None])
    off = dx_row[:, None] + cols.to(tl.int64)[None, :] * S
    tl.store(dx_ptr + off, g.to(dx_ptr.dtype.element_ty), mask=row_in[:, None] & (cols < C)[None, :])


@triton.jit
def _store_dz(dz_ptr, dv, gscale, dz_row, cols, C, S, store_slot, keep, bad):
    """dv [ROWS, KP, BLOCK_C] is d loss / dv of each slot's teacher, already scaled by the slot's
    effective weight; a teacher selected twice is stored once (store_slot) with the summed weight."""
    g = finish_rows(dv * gscale, keep[:, None, None], bad[:, None, None])
    off = dz_row[:, :, None] + cols.to(tl.int64)[None, None, :] * S
    tl.store(
        dz_ptr + off, g.to(dz_ptr.dtype.element_ty), mask=store_slot[:, :, None] & (cols < C)[None, None, :]
    )


@triton.jit
def _routed_kd_kernel(
    x_ptr,
    z_ptr,
    w_ptr,
    idx_ptr,
    mask_ptr,
    loss_ptr,
    dx_ptr,
    dw_ptr,
    dz_ptr,
    B,
    C,
    S,
    E,
    K,
    s_blocks,
    sx_b,
    sx_c,
    sx_s,
    sz_e,
    sz_b,
    sz_c,
    sz_s,
    inv_tau_hi,
    inv_tau_lo,
    scale_hi,
    scale_lo,
    beta_hi,
    beta_lo,
    MIX: tl.constexpr,
    DIV: tl.constexpr,
    HAS_IDX: tl.constexpr,
    HAS_MASK: tl.constexpr,
    NEED_DX: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_DZ: tl.constexpr,
    DX_EARLY: tl.constexpr,
    DZ_EARLY: tl.constexpr,
    THIRD_PASS: tl.constexpr,
    ROWS: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_C: tl.constexpr,
    SINGLE: tl.constexpr,
    ROWS_OVER_S: tl.constexpr,
    ACC: tl.constexpr,
):
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
        teacher = tl.zeros([ROWS, KP], tl.int64) + kk[None, :]
        bad = r < 0
    if HAS_MASK:
        keep = tl.load(mask_ptr + b * S + s, mask=row_in, other=0) != 0
    else:
        keep = row_in
    load_row = row_in & keep & (~bad)
    load_slot = load_row[:, None] & k_ok[None, :]
    x_row = b * sx_b + s * sx_s
    z_row = teacher * sz_e + (b * sz_b + s * sz_s)[:, None]

    inv_tau = scalar_arg(inv_tau_hi, inv_tau_lo, ACC)
    scale = scalar_arg(scale_hi, scale_lo, ACC)
    beta = scalar_arg(beta_hi, beta_lo, ACC)
    log_beta = tl.log(beta)  # used by js only
    log1m_beta = tl.log(1.0 - beta)
    c2 = inv_tau * LOG2E
    gscale = scale * inv_tau
    if MIX == 2:
        lw2 = tl.log2(w)  # -inf for w = 0: that teacher is left out of log P
    else:
        lw2 = w

    # ---- pass 1: online log-sum-exps of the student and the teacher side
    mx = tl.full([ROWS], float("-inf"), ACC)
    sx = tl.zeros([ROWS], ACC)
    if MIX == 1:
        mt = tl.full([ROWS], float("-inf"), ACC)
        st = tl.zeros([ROWS], ACC)
    else:
        mt = tl.full([ROWS, KP], float("-inf"), ACC)
        st = tl.zeros([ROWS, KP], ACC)
    if SINGLE:
        cols = tl.arange(0, BLOCK_C)
        xa, za = _load_tile(x_ptr, z_ptr, x_row, z_row, load_row, load_slot, cols, C, sx_c, sz_c, ACC)
        t = _teacher_side(MIX, za, w, cols, C)
        mx, sx = online_lse(mx, sx, xa, c2)
        mt, st = online_lse(mt, st, t, c2)
    else:
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            xa, za = _load_tile(x_ptr, z_ptr, x_row, z_row, load_row, load_slot, cols, C, sx_c, sz_c, ACC)
            t = _teacher_side(MIX, za, w, cols, C)
            mx, sx = online_lse(mx, sx, xa, c2)
            mt, st = online_lse(mt, st, t, c2)
    lsx = tl.log2(sx)  # log2 softmax = (logit - m) c2 - log2 s
    lst = tl.log2(st)

    # sparse routing: a teacher selected twice gets one store carrying the sum of its slots' weights
    # (its slots see the same teacher row, so their gradients differ only by the weight)
    if NEED_DZ and HAS_IDX:
        same = (teacher[:, :, None] == teacher[:, None, :]) & k_ok[None, None, :]
        w_eff = tl.sum(tl.where(same, w[:, None, :], 0.0), axis=2)
        earlier = tl.sum((same & (kk[None, :] < kk[:, None])[None, :, :]).to(tl.int32), axis=2)
        store_slot = (row_in & (keep | bad))[:, None] & k_ok[None, :] & (earlier == 0)
    else:
        w_eff = w
        store_slot = slot_in
    dx_row = b * C * S + s
    dz_row = teacher * B * C * S + (b * C * S + s)[:, None]
    w_sum = tl.sum(w, axis=1)

    # ---- pass 2: loss terms and row sums; closed-form gradients
    # mix loss: D [ROWS, KP] per slot, sum_A [ROWS] = sum_k w_k sum_c A_k, sum_B [ROWS, KP];
    # mix logits: D, sum_A, sum_B [ROWS], bv = sum_c B v_k and pv = sum_c P v_k [ROWS, KP] (for dw);
    # mix probs: D, sum_A [ROWS], sum_B = sum_c p_k dD/dP [ROWS, KP] (= dL/dw_k).
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
    n_blocks = 1 if SINGLE else tl.cdiv(C, BLOCK_C)
    for blk in range(0, n_blocks):
        cols = blk * BLOCK_C + tl.arange(0, BLOCK_C)
        if not SINGLE:
            xa, za = _load_tile(x_ptr, z_ptr, x_row, z_row, load_row, load_slot, cols, C, sx_c, sz_c, ACC)
            t = _teacher_side(MIX, za, w, cols, C)
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
                sum_B += tl.sum(tl.where((cols < C)[None, None, :], G, 0.0), axis=2)
        if DX_EARLY:  # KL: sum_c A = -sum_c P = -(sum_k w_k) (mix logits: -1)
            if MIX == 1:
                _store_dx(dx_ptr, q - P, gscale, dx_row, cols, C, S, row_in, keep, bad)
            else:
                _store_dx(dx_ptr, q * w_sum[:, None] - P, gscale, dx_row, cols, C, S, row_in, keep, bad)
        if DZ_EARLY:  # reverse KL, mix loss/logits: B = -q, sum_c B = -1
            if MIX == 1:
                dv = w_eff[:, :, None] * (P - q)[:, None, :]
            else:
                dv = w_eff[:, :, None] * (p - q[:, None, :])
            _store_dz(dz_ptr, dv, gscale, dz_row, cols, C, S, store_slot, keep, bad)

    if MIX == 0:
        loss = tl.sum(w * D, axis=1)
        dw = D
    elif MIX == 1:
        loss = D
        dw = bv - sum_B[:, None] * pv  # sum_c (B - P sum_c B) v_k
    else:
        loss = D
        dw = sum_B
    n = b * S + s
    tl.store(loss_ptr + n, finish_rows(loss * scale, keep, bad), mask=row_in)
    if NEED_DW:
        tl.store(
            dw_ptr + n[:, None] * K + kk[None, :],
            finish_rows(dw * scale, keep[:, None], bad[:, None]),
            mask=slot_in,
        )

    # ---- pass 3: gradients that need the row sums of pass 2
    if THIRD_PASS:
        for blk in range(0, n_blocks):
            cols = blk * BLOCK_C + tl.arange(0, BLOCK_C)
            if not SINGLE:
                xa, za = _load_tile(x_ptr, z_ptr, x_row, z_row, load_row, load_slot, cols, C, sx_c, sz_c, ACC)
                t = _teacher_side(MIX, za, w, cols, C)
            q, p, terms, A, Bt, G, P = _elementwise(
                MIX, DIV, xa, t, mx, lsx, mt, lst, c2, w, lw2, beta, log_beta, log1m_beta
            )
            if NEED_DX and not DX_EARLY:
                if MIX == 0:
                    du = tl.sum(w[:, :, None] * A, axis=1) - q * sum_A[:, None]
                else:
                    du = A - q * sum_A[:, None]
                _store_dx(dx_ptr, du, gscale, dx_row, cols, C, S, row_in, keep, bad)
            if NEED_DZ and not DZ_EARLY:
                if MIX == 0:  # w_k (B_k - p_k sum_c B_k)
                    dv = w_eff[:, :, None] * (Bt - p * sum_B[:, :, None])
                elif MIX == 1:  # w_k (B - P sum_c B)
                    dv = w_eff[:, :, None] * (Bt - P * sum_B[:, None])[:, None, :]
                else:  # w_k (p_k G - p_k sum_c p_k G), G here already p_k dD/dP
                    dv = w_eff[:, :, None] * (G - p * sum_B[:, :, None])
                _store_dz(dz_ptr, dv, gscale, dz_row, cols, C, S, store_slot, keep, bad)


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
    s_blocks = cdiv(S, rows)
    grid = (B * s_blocks if rows_over_s else cdiv(B, rows),)
    return KP, rows_over_s, block_c, rows, s_blocks, grid, num_warps


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
    launch; the reference's contract (``mmfast.reference.routed_kd.routed_kd_rows``)."""
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
    _routed_kd_kernel[grid](
        x,
        z,
        w,
        idx if idx is not None else w,
        m if m is not None else w,
        loss,
        dx,
        dw,
        dz,
        B,
        C,
        S,
        E,
        K,
        s_blocks,
        *x.stride(),
        *z.stride(),
        *f32_pairs(1.0 / temperature, scale, beta),
        MIX=mix,
        DIV=divergence,
        HAS_IDX=idx is not None,
        HAS_MASK=m is not None,
        NEED_DX=need_dx,
        NEED_DW=need_dw,
        NEED_DZ=need_dz,
        DX_EARLY=dx_early,
        DZ_EARLY=dz_early,
        THIRD_PASS=(need_dx and not dx_early) or (need_dz and not dz_early),
        ROWS=rows,
        KP=KP,
        BLOCK_C=block_c,
        SINGLE=C <= block_c,
        ROWS_OVER_S=rows_over_s,
        ACC=acc_dtype(x.dtype),
        num_warps=num_warps,
    )
    return loss, dx, dw, dz
