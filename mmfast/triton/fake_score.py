"""EDM-weighted fake-score loss in one Triton launch; the reference's contract
(``mmfast.reference.fake_score.fake_score_rows``).

Per sample (row) of b, x [B, D] (stride(1) == 1, any row strides) and lam [B]:
  loss_b = scale * lam_b * sum_j (b - x)^2,   db = scale * 2 lam_b (b - x)
The gradient needs no row sum, so one pass over [ROWS, BLOCK] tiles writes db and accumulates the loss.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mmfast.reference.routed_kd import compute_dtype

from .fdistill import ROW_TILES, load_rows, row_plan, store_rows


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


def fake_score_rows(b: Tensor, x: Tensor, lam: Tensor, scale: float, need_db: bool) -> tuple[Tensor, Tensor]:
    """(loss [B] fp32, db [B, D] in b's dtype, empty when not requested) for b, x [B, D], lam [B]."""
    B, D = b.shape
    loss = torch.empty(B, dtype=compute_dtype(b.dtype), device=b.device)
    db = torch.empty(B, D, dtype=b.dtype, device=b.device) if need_db else b.new_empty(0)
    if B == 0:
        return loss, db
    block, rows, single, grid, num_warps = row_plan(B, D, ROW_TILES)
    _fake_score_kernel[(grid,)](
        b, x, lam.contiguous(), loss, db,
        B, D, b.stride(0), x.stride(0), float(scale),
        NEED_DB=need_db, ROWS=rows, BLOCK=block, SINGLE=single, num_warps=num_warps,
    )
    return loss, db
