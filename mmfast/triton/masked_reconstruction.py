"""Masked reconstruction loss in one Triton launch; the reference's contract
(``mmfast.reference.masked_reconstruction.masked_reconstruction_rows``).

Each program owns ROWS rows (r = a * S + s of pred/target [A, D, S]) as a [ROWS, BLOCK_D] tile. A
row that fits one block (SINGLE) is loaded once and kept in registers; longer rows are streamed:
statistics passes (normalize_target: mean, variance; cosine: dot and norms), then the pass that
writes the loss and dP (and dY), plus one more pass for dY through the normalisation. Rows a row
mask excludes are never loaded (masked loads) unless dM is wanted; their outputs are written as 0.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from mmfast import _native
from mmfast.reference.masked_reconstruction import COSINE_EPS

from .routed_kd import acc_dtype, cdiv, f32_pairs, next_pow2, scalar_arg, tile_plan

# (tile, per_thread, stream_tile, stream_per_thread) of the [ROWS, BLOCK_D] tile (tests shrink it).
RECON_TILES = (4096, 16, 4096, 16)


@triton.jit
def _load_block(ptr, row_off, cols, D, s_d, ld_rows, ACC: tl.constexpr):
    """[ROWS, BLOCK_D] values in the accumulation type; 0 past D and in rows not loaded."""
    off = row_off[:, None] + cols.to(tl.int64)[None, :] * s_d
    ld = ld_rows[:, None] & (cols < D)[None, :]
    return tl.load(ptr + off, mask=ld, other=0.0).to(ACC)


@triton.jit
def _block_grads(LOSS: tl.constexpr, ELEM_MASK: tl.constexpr, p, yt, m, w, beta, k_p, k_y, inv):
    """(e, weight * e, dP, dYt) of one block; e is unweighted (cosine: unused, 0)."""
    if LOSS == 2:  # cosine
        g = w[:, None] * (k_p[:, None] * p - yt * inv[:, None])
        gyt = w[:, None] * (k_y[:, None] * yt - p * inv[:, None])
        e = tl.zeros_like(p)
        we = e
    else:
        d = p - yt
        if LOSS == 1:  # smooth_l1
            ad = tl.abs(d)
            quad = ad < beta
            sgn = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, d))
            e = tl.where(quad, 0.5 * d * d / beta, ad - 0.5 * beta)
            de = tl.where(quad, d / beta, sgn)
        else:
            e = d * d
            de = d + d
        if ELEM_MASK:
            weight = w[:, None] * m
        else:
            weight = w[:, None] + tl.zeros_like(p)
        we = weight * e
        g = weight * de
        gyt = -g
    return e, we, g, gyt


@triton.jit
def _masked_recon_kernel(
    p_ptr,
    y_ptr,
    m_ptr,
    w_ptr,
    loss_ptr,
    msum_ptr,
    dp_ptr,
    dy_ptr,
    dm_ptr,
    R,
    D,
    S,
    sp_a,
    sp_d,
    sp_s,
    sy_a,
    sy_d,
    sy_s,
    sm_a,
    sm_d,
    sm_s,
    beta_hi,
    beta_lo,
    eps_hi,
    eps_lo,
    cos_eps,
    LOSS: tl.constexpr,
    MASK: tl.constexpr,  # 0 none, 1 rows, 2 float elements, 3 bool (uint8) elements
    ROW_W: tl.constexpr,  # row weights at w_ptr beside an element mask
    NORMALIZE: tl.constexpr,
    PER_ELEMENT: tl.constexpr,
    NEED_DP: tl.constexpr,
    NEED_DY: tl.constexpr,
    NEED_DM: tl.constexpr,
    NEED_MSUM: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE: tl.constexpr,
    ACC: tl.constexpr,
):
    ELEM_MASK: tl.constexpr = MASK >= 2
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_in = r < R
    a = r // S
    s = r - a * S
    p_row = a * sp_a + s * sp_s
    y_row = a * sy_a + s * sy_s
    m_row = a * sm_a + s * sm_s
    o_row = a * D * S + s
    beta = scalar_arg(beta_hi, beta_lo, ACC)
    eps = scalar_arg(eps_hi, eps_lo, ACC)
    Df = tl.cast(D, ACC)
    if MASK == 1:
        w = tl.load(m_ptr + r, mask=row_in, other=0.0).to(ACC)
        keep = w != 0
    elif ROW_W:
        w = tl.load(w_ptr + r, mask=row_in, other=0.0).to(ACC)
        keep = w != 0
    else:
        w = tl.full([ROWS], 1.0, ACC)
        keep = row_in
    if NEED_DM:
        ld_rows = row_in
    else:
        ld_rows = row_in & keep  # excluded rows are not read
    n_blocks = 1 if SINGLE else tl.cdiv(D, BLOCK_D)

    if SINGLE:
        cols = tl.arange(0, BLOCK_D)
        p = _load_block(p_ptr, p_row, cols, D, sp_d, ld_rows, ACC)
        y = _load_block(y_ptr, y_row, cols, D, sy_d, ld_rows, ACC)

    # statistics: mean and rstd of the target row, then the cosine's dot and norms
    mean = tl.zeros([ROWS], ACC)
    rstd = tl.full([ROWS], 1.0, ACC)
    if NORMALIZE:
        sum_y = tl.zeros([ROWS], ACC)
        for blk in range(0, n_blocks):
            if not SINGLE:
                cols = blk * BLOCK_D + tl.arange(0, BLOCK_D)
                y = _load_block(y_ptr, y_row, cols, D, sy_d, ld_rows, ACC)
            sum_y += tl.sum(y, axis=1)
        mean = sum_y / Df
        sq = tl.zeros([ROWS], ACC)
        for blk in range(0, n_blocks):
            if not SINGLE:
                cols = blk * BLOCK_D + tl.arange(0, BLOCK_D)
                y = _load_block(y_ptr, y_row, cols, D, sy_d, ld_rows, ACC)
            yc = tl.where((cols < D)[None, :], y - mean[:, None], 0.0)
            sq += tl.sum(yc * yc, axis=1)
        rstd = 1.0 / tl.sqrt(sq / Df + eps)
    k_p = tl.zeros([ROWS], ACC)
    k_y = tl.zeros([ROWS], ACC)
    inv = tl.zeros([ROWS], ACC)
    cos = tl.zeros([ROWS], ACC)
    if LOSS == 2:
        dot = tl.zeros([ROWS], ACC)
        pp = tl.zeros([ROWS], ACC)
        yy = tl.zeros([ROWS], ACC)
        for blk in range(0, n_blocks):
            if not SINGLE:
                cols = blk * BLOCK_D + tl.arange(0, BLOCK_D)
                p = _load_block(p_ptr, p_row, cols, D, sp_d, ld_rows, ACC)
                y = _load_block(y_ptr, y_row, cols, D, sy_d, ld_rows, ACC)
            yt = tl.where((cols < D)[None, :], (y - mean[:, None]) * rstd[:, None], 0.0)
            dot += tl.sum(p * yt, axis=1)
            pp += tl.sum(p * p, axis=1)
            yy += tl.sum(yt * yt, axis=1)
        norm_p = tl.sqrt(pp)
        norm_y = tl.sqrt(yy)
        den_p = tl.where(norm_p < cos_eps, cos_eps, norm_p)  # NaN stays NaN
        den_y = tl.where(norm_y < cos_eps, cos_eps, norm_y)
        inv = 1.0 / (den_p * den_y)
        cos = dot * inv
        k_p = tl.where(norm_p > cos_eps, cos / (den_p * den_p), 0.0)
        k_y = tl.where(norm_y > cos_eps, cos / (den_y * den_y), 0.0)

    # loss, dP, dY (or the sums dY needs), per-element outputs
    acc = tl.zeros([ROWS], ACC)
    raw = tl.zeros([ROWS], ACC)
    macc = tl.zeros([ROWS], ACC)
    sg = tl.zeros([ROWS], ACC)
    sgy = tl.zeros([ROWS], ACC)
    m = tl.zeros([ROWS, BLOCK_D], ACC)
    for blk in range(0, n_blocks):
        if not SINGLE:
            cols = blk * BLOCK_D + tl.arange(0, BLOCK_D)
            p = _load_block(p_ptr, p_row, cols, D, sp_d, ld_rows, ACC)
            y = _load_block(y_ptr, y_row, cols, D, sy_d, ld_rows, ACC)
        cm = (cols < D)[None, :]
        yt = (y - mean[:, None]) * rstd[:, None]
        if ELEM_MASK:
            m = _load_block(m_ptr, m_row, cols, D, sm_d, row_in, ACC)
        e, we, g, gyt = _block_grads(LOSS, ELEM_MASK, p, yt, m, w, beta, k_p, k_y, inv)
        acc += tl.sum(tl.where(cm, we, 0.0), axis=1)
        raw += tl.sum(tl.where(cm, e, 0.0), axis=1)
        if ELEM_MASK:
            macc += tl.sum(m, axis=1)
        out_off = o_row[:, None] + cols.to(tl.int64)[None, :] * S
        st = row_in[:, None] & cm
        kp = keep[:, None]
        if PER_ELEMENT:
            tl.store(loss_ptr + out_off, tl.where(kp, we, 0.0).to(loss_ptr.dtype.element_ty), mask=st)
        if NEED_DM:
            if PER_ELEMENT or ELEM_MASK:
                tl.store(dm_ptr + out_off, e.to(dm_ptr.dtype.element_ty), mask=st)
        if NEED_DP:
            tl.store(dp_ptr + out_off, tl.where(kp, g, 0.0).to(dp_ptr.dtype.element_ty), mask=st)
        if NEED_DY:
            if NORMALIZE:
                sg += tl.sum(tl.where(cm, gyt, 0.0), axis=1)
                sgy += tl.sum(tl.where(cm, gyt * yt, 0.0), axis=1)
            else:
                tl.store(dy_ptr + out_off, tl.where(kp, gyt, 0.0).to(dy_ptr.dtype.element_ty), mask=st)
    if LOSS == 2:
        raw = 1.0 - cos
        acc = w * raw
    if not PER_ELEMENT:
        tl.store(loss_ptr + r, tl.where(keep, acc, 0.0), mask=row_in)
    if NEED_MSUM:
        tl.store(msum_ptr + r, macc, mask=row_in)
    if NEED_DM:
        if not (PER_ELEMENT or ELEM_MASK):
            tl.store(dm_ptr + r, raw, mask=row_in)

    # dY through the normalisation: rstd (dYt - mean dYt - Yt mean(dYt Yt))
    if NEED_DY:
        if NORMALIZE:
            mean_g = sg / Df
            mean_gy = sgy / Df
            for blk in range(0, n_blocks):
                if not SINGLE:
                    cols = blk * BLOCK_D + tl.arange(0, BLOCK_D)
                    p = _load_block(p_ptr, p_row, cols, D, sp_d, ld_rows, ACC)
                    y = _load_block(y_ptr, y_row, cols, D, sy_d, ld_rows, ACC)
                    if ELEM_MASK:
                        m = _load_block(m_ptr, m_row, cols, D, sm_d, row_in, ACC)
                yt = (y - mean[:, None]) * rstd[:, None]
                e, we, g, gyt = _block_grads(LOSS, ELEM_MASK, p, yt, m, w, beta, k_p, k_y, inv)
                dyv = rstd[:, None] * (gyt - mean_g[:, None] - yt * mean_gy[:, None])
                # a one-element row normalises to the constant 0: its gradient is exactly 0 (the recomputed
                # gyt may differ from the one summed into mean_g by an ulp, which rstd would amplify); * 0 keeps NaN
                dyv = tl.where(D == 1, dyv * 0.0, dyv)
                out_off = o_row[:, None] + cols.to(tl.int64)[None, :] * S
                st = row_in[:, None] & (cols < D)[None, :]
                tl.store(dy_ptr + out_off, tl.where(keep[:, None], dyv, 0.0).to(dy_ptr.dtype.element_ty), mask=st)


def masked_reconstruction_rows(
    pred: Tensor,
    target: Tensor,
    mask_rows: Tensor | None,
    mask: Tensor | None,
    loss_kind: int,
    beta: float,
    normalize_target: bool,
    eps: float,
    per_element: bool,
    need_dp: bool,
    need_dy: bool,
    need_dm: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, msum, dP, dY, dM) for pred/target [A, D, S] (any strides); the reference's contract."""
    kind, m, rw, loss, msum, dp, dy, dm = _native.masked_reconstruction_outputs(
        pred, mask_rows, mask, per_element, need_dp, need_dy, need_dm
    )
    A, D, S = pred.shape
    R = A * S
    if R == 0 or D == 0:
        return loss, msum, dp, dy, dm
    block_d, rows, num_warps = tile_plan(D, 1, next_pow2(R), 1, RECON_TILES)
    m_strides = m.stride() if (m is not None and m.dim() == 3) else (0, 0, 0)
    _masked_recon_kernel[(cdiv(R, rows),)](
        pred,
        target,
        m if m is not None else pred,
        rw if rw is not None else pred,
        loss,
        msum,
        dp,
        dy,
        dm,
        R,
        D,
        S,
        *pred.stride(),
        *target.stride(),
        *m_strides,
        *f32_pairs(beta, eps),
        COSINE_EPS,
        LOSS=loss_kind,
        MASK=kind,
        ROW_W=rw is not None,
        NORMALIZE=normalize_target,
        PER_ELEMENT=per_element,
        NEED_DP=dp.numel() > 0,
        NEED_DY=dy.numel() > 0,
        NEED_DM=dm.numel() > 0,
        NEED_MSUM=msum.numel() > 0,
        ROWS=rows,
        BLOCK_D=block_d,
        SINGLE=D <= block_d,
        ACC=acc_dtype(pred.dtype),
        num_warps=num_warps,
    )
    return loss, msum, dp, dy, dm

