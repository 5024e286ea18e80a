"""Uni-Instruct (SiD-family) generator loss in one Triton launch; the reference's contract
(``mmfast.reference.uni_instruct.uni_instruct_rows``).

Per sample (row) of x, a, b [B, D] (stride(1) == 1, any row strides), coef [B, 3] = (lam_sim, lam_fgm,
lam_di), with d = a - b, u = (a - x) - alpha d, wf = max(mean |x - a|, 1e-5), c = scale / wf:
  pass 1: S_abs = sum |x - a|, S_du = sum d u, [fgm or per-sample norm] S_dd = sum d^2, [di] S_xd = sum x d
          loss = c (lam_sim S_du + [fgm] lam_fgm S_dd + [di] lam_di n S_xd),  n = sqrt(S_dd) or the given norm
  pass 2: dx = c (-lam_sim + [di] lam_di n) d
          da = c lam_sim (u + (1 - alpha) d) + [fgm] 2 c lam_fgm d,   db = c lam_sim (alpha d - u) - [fgm] 2 c lam_fgm d
          (as da = cs u + ka d, db = kb d - cs u with per-row cs = c lam_sim, ka, kb)
A switched-off term is not evaluated. Rows that fit one block are loaded once (SINGLE); streamed rows are
re-read in pass 2 last block first, or, too few to fill the device, split across programs in two launches
(``mmfast.triton.routed_kd.split_plan``: chunk partial sums, then per-row totals in chunk order and the chunk's
gradients). fp32 math.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mmfast.reference.routed_kd import compute_dtype

from . import fdistill
from .fdistill import chunk_part, load_rows, row_plan, row_total, store_rows
from .routed_kd import split_plan, split_program


@triton.jit
def _block_terms(x_ptr, a_ptr, b_ptr, xo, ao, bo, cols, D, row_in, alpha):
    """(x, d = a - b, u = (a - x) - alpha d, |x - a|) of one [ROWS, BLOCK] block."""
    xv = load_rows(x_ptr, xo, cols, D, row_in)
    av = load_rows(a_ptr, ao, cols, D, row_in)
    d = av - load_rows(b_ptr, bo, cols, D, row_in)
    return xv, d, (av - xv) - alpha * d, tl.abs(xv - av)


@triton.jit
def _store_grads(dx_ptr, da_ptr, db_ptr, d, u, gx, cs, ka, kb, rows, cols, D, row_in,
                 NEED_DX: tl.constexpr, NEED_DA: tl.constexpr, NEED_DB: tl.constexpr):
    """dx = gx d;  da = cs u + ka d;  db = kb d - cs u  (ka, kb fold the alpha and fgm terms per row)."""
    if NEED_DX:
        store_rows(dx_ptr, d * gx, rows, cols, D, row_in)
    if NEED_DA:
        store_rows(da_ptr, cs * u + ka * d, rows, cols, D, row_in)
    if NEED_DB:
        store_rows(db_ptr, kb * d - cs * u, rows, cols, D, row_in)


@triton.jit
def _streamed_sums(x_ptr, a_ptr, b_ptr, xo, ao, bo, c_begin, c_end, row_in, alpha,
                   ROWS: tl.constexpr, BLOCK: tl.constexpr, SUM_DD: tl.constexpr, DI: tl.constexpr):
    """(S_abs, S_du, S_dd, S_xd) [ROWS] over columns [c_begin, c_end), BLOCK at a time (S_dd only with SUM_DD,
    S_xd only with DI; 0 otherwise)."""
    s_abs = tl.zeros([ROWS], tl.float32)
    s_du = tl.zeros([ROWS], tl.float32)
    s_dd = tl.zeros([ROWS], tl.float32)
    s_xd = tl.zeros([ROWS], tl.float32)
    for c0 in range(c_begin, c_end, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        xb, db_, ub, adist = _block_terms(x_ptr, a_ptr, b_ptr, xo, ao, bo, cols, c_end, row_in, alpha)
        s_abs += tl.sum(adist, axis=1)
        s_du += tl.sum(db_ * ub, axis=1)
        if SUM_DD:
            s_dd += tl.sum(db_ * db_, axis=1)
        if DI:
            s_xd += tl.sum(xb * db_, axis=1)
    return s_abs, s_du, s_dd, s_xd


@triton.jit
def _row_loss(s_abs, s_du, s_dd, s_xd, coef_ptr, norm_ptr, rows, row_in, D, scale, alpha,
              ROWS: tl.constexpr, FGM: tl.constexpr, DI: tl.constexpr, BATCH_NORM: tl.constexpr):
    """The loss [ROWS] from the row sums, and the gradients' per-row factors [ROWS, 1]: dx = gx d,
    da = cs u + ka d, db = kb d - cs u."""
    m = s_abs / D
    wf = tl.where(m < 1e-5, 1e-5, m)  # max(m, 1e-5) that keeps a NaN
    c = scale / wf
    cbase = coef_ptr + rows * 3
    lam_sim = tl.load(cbase, mask=row_in, other=0.0).to(tl.float32)
    lam_fgm = tl.zeros([ROWS], tl.float32)
    loss = lam_sim * s_du
    if FGM:
        lam_fgm = tl.load(cbase + 1, mask=row_in, other=0.0).to(tl.float32)
        loss += lam_fgm * s_dd
    k_dx = -lam_sim
    if DI:
        lam_di = tl.load(cbase + 2, mask=row_in, other=0.0).to(tl.float32)
        if BATCH_NORM:
            di_coef = lam_di * tl.load(norm_ptr).to(tl.float32)
        else:
            di_coef = lam_di * tl.sqrt(s_dd)
        loss += di_coef * s_xd
        k_dx = di_coef - lam_sim
    cs = lam_sim * c
    f2 = 2.0 * lam_fgm * c  # 0 without fgm
    ka = cs * (1.0 - alpha) + f2  # da = lam_sim c (u + (1 - alpha) d) + 2 lam_fgm c d
    kb = cs * alpha - f2  # db = lam_sim c (alpha d - u) - 2 lam_fgm c d
    return loss * c, (k_dx * c)[:, None], cs[:, None], ka[:, None], kb[:, None]


@triton.jit
def _uni_instruct_kernel(
    x_ptr,
    a_ptr,
    b_ptr,
    coef_ptr,
    norm_ptr,
    loss_ptr,
    dx_ptr,
    da_ptr,
    db_ptr,
    B,
    D,
    sx,
    sa,
    sb,
    alpha,
    scale,
    FGM: tl.constexpr,
    DI: tl.constexpr,
    BATCH_NORM: tl.constexpr,
    SUM_DD: tl.constexpr,
    NEED_DX: tl.constexpr,
    NEED_DA: tl.constexpr,
    NEED_DB: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    SINGLE: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_in = rows < B
    xo, ao, bo = rows * sx, rows * sa, rows * sb

    # pass 1: row sums (S_dd only when fgm or the per-sample norm needs it, S_xd only with di)
    if SINGLE:  # the whole row in one block: loaded once, kept for pass 2
        cols = tl.arange(0, BLOCK)
        xv, d, u, adist = _block_terms(x_ptr, a_ptr, b_ptr, xo, ao, bo, cols, D, row_in, alpha)
        s_abs = tl.sum(adist, axis=1)
        s_du = tl.sum(d * u, axis=1)
        s_dd = tl.zeros([ROWS], tl.float32)
        s_xd = tl.zeros([ROWS], tl.float32)
        if SUM_DD:
            s_dd = tl.sum(d * d, axis=1)
        if DI:
            s_xd = tl.sum(xv * d, axis=1)
    else:
        s_abs, s_du, s_dd, s_xd = _streamed_sums(x_ptr, a_ptr, b_ptr, xo, ao, bo, 0, D, row_in, alpha,
                                                 ROWS, BLOCK, SUM_DD, DI)
    loss, gx, cs, ka, kb = _row_loss(s_abs, s_du, s_dd, s_xd, coef_ptr, norm_ptr, rows, row_in, D, scale, alpha,
                                     ROWS, FGM, DI, BATCH_NORM)
    tl.store(loss_ptr + rows, loss, mask=row_in)

    # pass 2: gradients
    if NEED_DX or NEED_DA or NEED_DB:
        if SINGLE:
            _store_grads(dx_ptr, da_ptr, db_ptr, d, u, gx, cs, ka, kb, rows, tl.arange(0, BLOCK), D, row_in,
                         NEED_DX, NEED_DA, NEED_DB)
        else:
            n_blocks = tl.cdiv(D, BLOCK)
            for i in range(0, n_blocks):  # last block first: the blocks read last in pass 1 are likeliest cached
                cols = (n_blocks - 1 - i) * BLOCK + tl.arange(0, BLOCK)
                _, db_, ub, _ = _block_terms(x_ptr, a_ptr, b_ptr, xo, ao, bo, cols, D, row_in, alpha)
                _store_grads(dx_ptr, da_ptr, db_ptr, db_, ub, gx, cs, ka, kb, rows, cols, D, row_in,
                             NEED_DX, NEED_DA, NEED_DB)


@triton.jit
def _uni_instruct_split_kernel(
    x_ptr, a_ptr, b_ptr, coef_ptr, norm_ptr, loss_ptr, dx_ptr, da_ptr, db_ptr, part_ptr,
    D, sx, sa, sb, alpha, scale, n_split, chunk,
    PHASE: tl.constexpr, FGM: tl.constexpr, DI: tl.constexpr, BATCH_NORM: tl.constexpr, SUM_DD: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DA: tl.constexpr, NEED_DB: tl.constexpr, BLOCK: tl.constexpr,
    SPLIT_P2: tl.constexpr,
):
    """Program (row, chunk) of a split row: PHASE 1 writes the chunk's S_abs, S_du, S_dd, S_xd; PHASE 2 reduces
    the row's partials, writes the loss (chunk 0) and the chunk's gradients (same math as the one-launch kernel,
    on a [1, BLOCK] tile)."""
    pid = tl.program_id(0)
    row, c_begin, c_end, rows, row_in = split_program(n_split, chunk, D)
    xo, ao, bo = rows * sx, rows * sa, rows * sb
    if PHASE == 1:
        s_abs, s_du, s_dd, s_xd = _streamed_sums(x_ptr, a_ptr, b_ptr, xo, ao, bo, c_begin, c_end, row_in, alpha,
                                                 1, BLOCK, SUM_DD, DI)
        sums = (s_abs, s_du, s_dd, s_xd)
        for k in tl.static_range(4):
            tl.store(chunk_part(part_ptr, pid, k, 4) + tl.arange(0, 1), sums[k])
    else:
        one = tl.zeros([1], tl.float32)
        s_abs = one + row_total(part_ptr, row, n_split, 0, 4, SPLIT_P2)
        s_du = one + row_total(part_ptr, row, n_split, 1, 4, SPLIT_P2)
        s_dd = one + row_total(part_ptr, row, n_split, 2, 4, SPLIT_P2)
        s_xd = one + row_total(part_ptr, row, n_split, 3, 4, SPLIT_P2)
        loss, gx, cs, ka, kb = _row_loss(s_abs, s_du, s_dd, s_xd, coef_ptr, norm_ptr, rows, row_in, D, scale,
                                         alpha, 1, FGM, DI, BATCH_NORM)
        tl.store(loss_ptr + rows, loss, mask=(c_begin + tl.zeros([1], tl.int32)) == 0)  # chunk 0 writes it
        if NEED_DX or NEED_DA or NEED_DB:
            # outputs are contiguous [B, D]: the row's base pointers, row index 0 and the chunk end as the bound
            r_out = row.to(tl.int64) * D
            first = tl.zeros([1], tl.int64)
            for c0 in range(c_begin, c_end, BLOCK):
                cols = c0 + tl.arange(0, BLOCK)
                _, db_, ub, _ = _block_terms(x_ptr, a_ptr, b_ptr, xo, ao, bo, cols, c_end, row_in, alpha)
                _store_grads(dx_ptr + r_out, da_ptr + r_out, db_ptr + r_out, db_, ub, gx, cs, ka, kb, first,
                             cols, c_end, row_in, NEED_DX, NEED_DA, NEED_DB)


def uni_instruct_rows(
    x: Tensor,
    a: Tensor,
    b: Tensor,
    coef: Tensor,
    di_norm: Tensor | None,
    alpha: float,
    scale: float,
    fgm: bool,
    di: bool,
    need_dx: bool,
    need_da: bool,
    need_db: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss [B] fp32, dx, da, db [B, D], each empty when not requested) for x, a, b [B, D], coef [B, 3]."""
    B, D = x.shape
    dev = x.device
    loss = torch.empty(B, dtype=compute_dtype(x.dtype), device=dev)
    dx = torch.empty(B, D, dtype=x.dtype, device=dev) if need_dx else x.new_empty(0)
    da = torch.empty(B, D, dtype=a.dtype, device=dev) if need_da else a.new_empty(0)
    db = torch.empty(B, D, dtype=b.dtype, device=dev) if need_db else b.new_empty(0)
    if B == 0:
        return loss, dx, da, db
    batch_norm = di and di_norm is not None
    norm = di_norm.contiguous() if batch_norm else loss
    block, rows, single, grid, num_warps = row_plan(B, D, fdistill.ROW_TILES)
    n_split, chunk, split_p2 = (1, D, 1) if single else split_plan(B, D, block, dev)
    if n_split > 1:
        part = torch.empty(B * n_split, 4, dtype=torch.float32, device=dev)
        for phase in (1, 2):
            _uni_instruct_split_kernel[(B * n_split,)](
                x, a, b, coef.contiguous(), norm, loss, dx, da, db, part,
                D, x.stride(0), a.stride(0), b.stride(0), float(alpha), float(scale), n_split, chunk,
                PHASE=phase, FGM=fgm, DI=di, BATCH_NORM=batch_norm, SUM_DD=fgm or (di and not batch_norm),
                NEED_DX=need_dx, NEED_DA=need_da, NEED_DB=need_db, BLOCK=block, SPLIT_P2=split_p2,
                num_warps=num_warps,
            )
        return loss, dx, da, db
    _uni_instruct_kernel[(grid,)](
        x, a, b, coef.contiguous(), norm, loss, dx, da, db,
        B, D, x.stride(0), a.stride(0), b.stride(0), float(alpha), float(scale),
        FGM=fgm, DI=di, BATCH_NORM=batch_norm, SUM_DD=fgm or (di and not batch_norm),
        NEED_DX=need_dx, NEED_DA=need_da, NEED_DB=need_db,
        ROWS=rows, BLOCK=block, SINGLE=single, num_warps=num_warps,
    )
    return loss, dx, da, db
