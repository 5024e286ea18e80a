"""EDM-weighted fake-score loss in one Triton launch; the reference's contract
(``mmfast.reference.fake_score.fake_score_rows``).

Per sample (row) of b, x [B, D] (stride(1) == 1, any row strides) and lam [B]:
  loss_b = scale * lam_b * sum_j (b - x)^2,   db = scale * 2 lam_b (b - x)
The gradient needs no row sum, so one pass over [ROWS, BLOCK] tiles writes db and accumulates the loss.
Streamed rows too few to fill the device (``mmfast.triton.routed_kd.split_plan``) are cut into chunks across
programs, each writing its chunk's db and partial sum; a second launch adds the partials per row in chunk order.
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
def _fake_score_kernel(
    b_ptr,
    x_ptr,
    lam_ptr,
    loss_ptr,
    db_ptr,
    B,
    D,
    sb,
    sx,
    scale,
    NEED_DB: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    SINGLE: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_in = rows < B
    bo, xo = rows * sb, rows * sx
    lam = tl.load(lam_ptr + rows, mask=row_in, other=0.0).to(tl.float32)
    gw = 2.0 * lam * scale
    s_sq = tl.zeros([ROWS], tl.float32)
    n_blocks = 1 if SINGLE else tl.cdiv(D, BLOCK)
    for blk in range(0, n_blocks):
        cols = blk * BLOCK + tl.arange(0, BLOCK)
        e = load_rows(b_ptr, bo, cols, D, row_in) - load_rows(x_ptr, xo, cols, D, row_in)
        s_sq += tl.sum(e * e, axis=1)
        if NEED_DB:
            store_rows(db_ptr, e * gw[:, None], rows, cols, D, row_in)
    tl.store(loss_ptr + rows, lam * s_sq * scale, mask=row_in)


@triton.jit
def _fake_score_split_kernel(
    b_ptr, x_ptr, lam_ptr, loss_ptr, db_ptr, part_ptr, D, sb, sx, scale, n_split, chunk,
    PHASE: tl.constexpr, NEED_DB: tl.constexpr, BLOCK: tl.constexpr, SPLIT_P2: tl.constexpr,
):
    """PHASE 1, program (row, chunk): the chunk's db and sum (b - x)^2; PHASE 2, program row: the loss from the
    row's partials."""
    pid = tl.program_id(0)
    if PHASE == 1:
        row, c_begin, c_end, rows, row_in = split_program(n_split, chunk, D)
        gw = 2.0 * tl.load(lam_ptr + rows).to(tl.float32) * scale
        r_out = row.to(tl.int64) * D  # db is contiguous [B, D]: the row's base pointer, row index 0
        first = tl.zeros([1], tl.int64)
        s_sq = tl.zeros([1], tl.float32)
        for c0 in range(c_begin, c_end, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            e = load_rows(b_ptr, rows * sb, cols, c_end, row_in) - load_rows(x_ptr, rows * sx, cols, c_end, row_in)
            s_sq += tl.sum(e * e, axis=1)
            if NEED_DB:
                store_rows(db_ptr + r_out, e * gw[:, None], first, cols, c_end, row_in)
        tl.store(chunk_part(part_ptr, pid, 0, 1) + tl.arange(0, 1), s_sq)
    else:
        s_sq = row_total(part_ptr, pid, n_split, 0, 1, SPLIT_P2)
        tl.store(loss_ptr + pid, tl.load(lam_ptr + pid).to(tl.float32) * s_sq * scale)


def fake_score_rows(b: Tensor, x: Tensor, lam: Tensor, scale: float, need_db: bool) -> tuple[Tensor, Tensor]:
    """(loss [B] fp32, db [B, D] in b's dtype, empty when not requested) for b, x [B, D], lam [B]."""
    B, D = b.shape
    loss = torch.empty(B, dtype=compute_dtype(b.dtype), device=b.device)
    db = torch.empty(B, D, dtype=b.dtype, device=b.device) if need_db else b.new_empty(0)
    if B == 0:
        return loss, db
    block, rows, single, grid, num_warps = row_plan(B, D, fdistill.ROW_TILES)
    n_split, chunk, split_p2 = (1, D, 1) if single else split_plan(B, D, block, b.device)
    if n_split > 1:
        part = torch.empty(B * n_split, dtype=torch.float32, device=b.device)
        for phase, programs in ((1, B * n_split), (2, B)):
            _fake_score_split_kernel[(programs,)](
                b, x, lam.contiguous(), loss, db, part, D, b.stride(0), x.stride(0), float(scale), n_split, chunk,
                PHASE=phase, NEED_DB=need_db, BLOCK=block, SPLIT_P2=split_p2, num_warps=num_warps,
            )
        return loss, db
    _fake_score_kernel[(grid,)](
        b, x, lam.contiguous(), loss, db,
        B, D, b.stride(0), x.stride(0), float(scale),
        NEED_DB=need_db, ROWS=rows, BLOCK=block, SINGLE=single, num_warps=num_warps,
    )
    return loss, db
