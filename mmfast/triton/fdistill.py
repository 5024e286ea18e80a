"""f-distill (DMD-form) generator loss in one Triton launch; the reference's contract
(``mmfast.reference.fdistill.fdistill_rows``).

Per sample (row) b of x, a, b [B, D] (stride(1) == 1, any row strides) and h [B]:
  m_b = (1/D) sum_j |x_bj - a_bj|,  w_b = h_b / (m_b + 1e-6),  g = (b - a) w_b
  loss_b = scale * 0.5 * w_b^2 sum_j (b - a)^2,  dx = scale * g
Each program owns ROWS rows as a [ROWS, BLOCK] tile: pass 1 the two row sums, pass 2 (gradient only)
writes dx. A row that fits in one block (SINGLE) is loaded once and kept in registers; a streamed row is
re-read in pass 2 last block first (the blocks most likely still cached). Streamed rows too few to fill the
device (``mmfast.triton.routed_kd.split_plan``) are cut into chunks across programs: one launch writes each
chunk's partial row sums, a second reduces them per row in chunk order (deterministic) and writes the chunk's
gradient. fp32 math.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from mmfast.reference.routed_kd import compute_dtype

from .routed_kd import cdiv, next_pow2, num_warps_for, split_plan, split_program

# (row_tile, row_per_thread, stream_block, stream_per_thread, pack_tile, pack_per_thread): a row of D <=
# row_tile elements is one block held in registers (row_per_thread elements per thread, which sets num_warps);
# longer rows stream ``stream_block``-element blocks; rows short enough that two fit in ``pack_tile`` are packed
# several to a program. No register spills at sm_90 for the Uni-Instruct kernel (ptxas -v, bf16 and fp32).
# Tests shrink it to run the streaming and packing paths on short rows.
ROW_TILES = (16384, 32, 4096, 16, 2048, 8)
@triton.jit
def chunk_part(part_ptr, pid, k, NK: tl.constexpr):
    """Pointer to partial sum k of program pid in a [programs, NK] buffer."""
    return part_ptr + pid.to(tl.int64) * NK + k


@triton.jit
def row_total(part_ptr, row, n_split, k, NK: tl.constexpr, SPLIT_P2: tl.constexpr):
    """Sum over the row's chunks (in chunk order) of partial sum k."""
    chunks = tl.arange(0, SPLIT_P2)
    offs = (row.to(tl.int64) * n_split + chunks) * NK + k
    return tl.sum(tl.load(part_ptr + offs, mask=chunks < n_split, other=0.0), axis=0)


@functools.lru_cache(maxsize=1024)
def row_plan(B: int, D: int, tiles: tuple[int, ...]) -> tuple[int, int, bool, int, int]:
    """(BLOCK, ROWS, SINGLE, grid, num_warps) for B rows of D elements (shared by the three score kernels)."""
    row_tile, row_per_thread, stream_block, stream_per_thread, pack_tile, pack_per_thread = tiles
    if D > row_tile:
        return stream_block, 1, False, B, num_warps_for(stream_block, stream_per_thread)
    block = next_pow2(D)
    if 2 * block > pack_tile:
        return block, 1, True, B, num_warps_for(block, row_per_thread)
    rows = max(1, min(pack_tile // block, next_pow2(B)))
    return block, rows, True, cdiv(B, rows), num_warps_for(rows * block, pack_per_thread)


@triton.jit
def load_rows(ptr, row_off, cols, D, row_in):
    """A [ROWS, BLOCK] block of rows (0 outside) in fp32."""
    ok = row_in[:, None] & (cols < D)[None, :]
    return tl.load(ptr + row_off[:, None] + cols.to(tl.int64)[None, :], mask=ok, other=0.0).to(tl.float32)


@triton.jit
def store_rows(ptr, value, rows, cols, D, row_in):
    """Store a [ROWS, BLOCK] block into a contiguous [B, D] output."""
    ok = row_in[:, None] & (cols < D)[None, :]
    tl.store(ptr + rows[:, None] * D + cols.to(tl.int64)[None, :], value.to(ptr.dtype.element_ty), mask=ok)


@triton.jit
def _fdistill_kernel(
    x_ptr,
    a_ptr,
    b_ptr,
    h_ptr,
    loss_ptr,
    dx_ptr,
    B,
    D,
    sx,
    sa,
    sb,
    scale,
    NEED_DX: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    SINGLE: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_in = rows < B
    xo, ao, bo = rows * sx, rows * sa, rows * sb

    # pass 1: sum |x - a| and sum (b - a)^2
    if SINGLE:  # the whole row in one block: loaded once, kept for pass 2
        cols = tl.arange(0, BLOCK)
        av = load_rows(a_ptr, ao, cols, D, row_in)
        s_abs = tl.sum(tl.abs(load_rows(x_ptr, xo, cols, D, row_in) - av), axis=1)
        e = load_rows(b_ptr, bo, cols, D, row_in) - av
        s_sq = tl.sum(e * e, axis=1)
    else:
        s_abs = tl.zeros([ROWS], tl.float32)
        s_sq = tl.zeros([ROWS], tl.float32)
        for c0 in range(0, D, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            av = load_rows(a_ptr, ao, cols, D, row_in)
            s_abs += tl.sum(tl.abs(load_rows(x_ptr, xo, cols, D, row_in) - av), axis=1)
            eb = load_rows(b_ptr, bo, cols, D, row_in) - av
            s_sq += tl.sum(eb * eb, axis=1)
    h = tl.load(h_ptr + rows, mask=row_in, other=1.0).to(tl.float32)
    w = h / (s_abs / D + 1e-6)
    tl.store(loss_ptr + rows, (0.5 * scale) * (w * w) * s_sq, mask=row_in)

    # pass 2: dx = scale * (b - a) * w
    if NEED_DX:
        gw = (w * scale)[:, None]
        if SINGLE:
            store_rows(dx_ptr, e * gw, rows, tl.arange(0, BLOCK), D, row_in)
        else:
            n_blocks = tl.cdiv(D, BLOCK)
            for i in range(0, n_blocks):  # last block first: the blocks read last in pass 1 are likeliest cached
                cols = (n_blocks - 1 - i) * BLOCK + tl.arange(0, BLOCK)
                eb = load_rows(b_ptr, bo, cols, D, row_in) - load_rows(a_ptr, ao, cols, D, row_in)
                store_rows(dx_ptr, eb * gw, rows, cols, D, row_in)


@triton.jit
def _fdistill_split_kernel(
    x_ptr, a_ptr, b_ptr, h_ptr, loss_ptr, dx_ptr, part_ptr,
    D, sx, sa, sb, scale, n_split, chunk,
    PHASE: tl.constexpr, NEED_DX: tl.constexpr, BLOCK: tl.constexpr, SPLIT_P2: tl.constexpr,
):
    """Program (row, chunk) of a split row: PHASE 1 writes the chunk's sum |x - a| and sum (b - a)^2; PHASE 2
    reduces the row's partials, writes the loss (chunk 0) and the chunk's dx."""
    pid = tl.program_id(0)
    row, c_begin, c_end, _, _ = split_program(n_split, chunk, D)
    r64 = row.to(tl.int64)
    xr, ar, br = x_ptr + r64 * sx, a_ptr + r64 * sa, b_ptr + r64 * sb
    if PHASE == 1:
        s_abs = tl.zeros([BLOCK], tl.float32)
        s_sq = tl.zeros([BLOCK], tl.float32)
        for c0 in range(c_begin, c_end, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            ok = cols < c_end
            av = tl.load(ar + cols, mask=ok, other=0.0).to(tl.float32)
            s_abs += tl.abs(tl.load(xr + cols, mask=ok, other=0.0).to(tl.float32) - av)
            e = tl.load(br + cols, mask=ok, other=0.0).to(tl.float32) - av
            s_sq += e * e
        tl.store(chunk_part(part_ptr, pid, 0, 2), tl.sum(s_abs, axis=0))
        tl.store(chunk_part(part_ptr, pid, 1, 2), tl.sum(s_sq, axis=0))
    else:
        s_abs = row_total(part_ptr, row, n_split, 0, 2, SPLIT_P2)
        s_sq = row_total(part_ptr, row, n_split, 1, 2, SPLIT_P2)
        w = tl.load(h_ptr + row).to(tl.float32) / (s_abs / D + 1e-6)
        tl.store(loss_ptr + row, (0.5 * scale) * (w * w) * s_sq, mask=c_begin == 0)
        if NEED_DX:
            gw = w * scale
            for c0 in range(c_begin, c_end, BLOCK):
                cols = c0 + tl.arange(0, BLOCK)
                ok = cols < c_end
                av = tl.load(ar + cols, mask=ok, other=0.0).to(tl.float32)
                e = tl.load(br + cols, mask=ok, other=0.0).to(tl.float32) - av
                tl.store(dx_ptr + r64 * D + cols, (e * gw).to(dx_ptr.dtype.element_ty), mask=ok)


def fdistill_rows(
    x: Tensor, a: Tensor, b: Tensor, h: Tensor, scale: float, need_dx: bool
) -> tuple[Tensor, Tensor]:
    """(loss [B] fp32, dx [B, D] in x's dtype, empty when not requested) for x, a, b [B, D], h [B]."""
    B, D = x.shape
    loss = torch.empty(B, dtype=compute_dtype(x.dtype), device=x.device)
    dx = torch.empty(B, D, dtype=x.dtype, device=x.device) if need_dx else x.new_empty(0)
    if B == 0:
        return loss, dx
    block, rows, single, grid, num_warps = row_plan(B, D, ROW_TILES)
    n_split, chunk, split_p2 = (1, D, 1) if single else split_plan(B, D, block, x.device)
    if n_split > 1:
        part = torch.empty(B * n_split, 2, dtype=torch.float32, device=x.device)
        for phase in (1, 2):
            _fdistill_split_kernel[(B * n_split,)](
                x, a, b, h.contiguous(), loss, dx, part, D, x.stride(0), a.stride(0), b.stride(0), float(scale),
                n_split, chunk, PHASE=phase, NEED_DX=need_dx, BLOCK=block, SPLIT_P2=split_p2, num_warps=num_warps,
            )
        return loss, dx
    _fdistill_kernel[(grid,)](
        x, a, b, h.contiguous(), loss, dx,
        B, D, x.stride(0), a.stride(0), b.stride(0), float(scale),
        NEED_DX=need_dx, ROWS=rows, BLOCK=block, SINGLE=single, num_warps=num_warps,
    )
    return loss, dx
