"""Mutual (co-training) KD over M models in one Triton launch; the reference's contract
(``mmfast.reference.mutual_kd.mutual_kd_rows``).

With p_i = softmax(x_i / tau), T = sum_i log p_i, S = sum_i p_i, per row:
  R_i = sum_c p_i (M log p_i - T),   loss = scale * sum_i R_i,
  d loss / d x_i = scale / tau * (M p_i - S + p_i (M log p_i - T - R_i)).
Each program owns ROWS rows and holds the M models as a [ROWS, MP, BLOCK_C] tile: pass 1 computes the
M online log-sum-exps, pass 2 the R_i, pass 3 (gradient only) writes the gradient; a streamed row's pass 2
runs from its last block to its first (``STREAM_ZIGZAG``), and its last read and the gradient stores are marked
evict-first in L2 (``STREAM_L2_HINTS``). A row that fits in one block is loaded once.
Streamed rows too few to fill the device (``mmfast.triton.routed_kd.split_plan``) are cut into chunks across
programs, one launch per pass: each chunk's online log-sum-exps, then (merged in chunk order) each chunk's part
of R_i, then (R_i summed in chunk order) the loss and each chunk's gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mmfast.reference.routed_kd import compute_dtype

from .routed_kd import (
    LN2,
    LOG2E,
    acc_dtype,
    cdiv,
    f32_pairs,
    merge_chunk_lse,
    next_pow2,
    online_lse,
    scalar_arg,
    split_plan,
    split_program,
    sweep_block,
    tile_plan,
)

# (tile, per_thread, stream_tile, stream_per_thread) of the [ROWS, MP, BLOCK_C] model tile, as
# routed_kd.ROW_TILES (tests shrink it). Streamed rows take 8192-element blocks, 16 per thread (16 warps): the
# 16384-element, 32-per-thread block of the first H200 tuning spilled 304 bytes per thread in the gradient pass
# at sm_90 (scripts/triton_compile_check.py); the smaller block is spill-free and not yet timed on a GPU.
ROW_TILES = (4096, 16, 8192, 16)
# Streamed rows: pass 2 sweeps the row backward, pass 3 forward, and the row's last read and the gradient
# stores carry L2's evict-first hint (as ``mmfast.triton.routed_kd.STREAM_ZIGZAG`` and ``STREAM_L2_HINTS``).
STREAM_ZIGZAG = True
STREAM_L2_HINTS = True


@triton.jit
def _load_models(
    x_ptr, row_off, model_off, model_ok, row_in, cols, C, s_c, EVICT: tl.constexpr, ACC: tl.constexpr
):
    """Logits of a [ROWS, MP, BLOCK_C] block in the accumulation type: -inf past C, 0 for padded models; loaded
    with L2 eviction policy EVICT ("" or "evict_first")."""
    cm = cols < C
    off = row_off[:, None, None] + model_off[None, :, None] + cols.to(tl.int64)[None, None, :] * s_c
    ld = row_in[:, None, None] & model_ok[None, :, None] & cm[None, None, :]
    xv = tl.load(x_ptr + off, mask=ld, other=0.0, eviction_policy=EVICT).to(ACC)
    return tl.where(cm[None, None, :], xv, float("-inf"))


@triton.jit
def _log_probs(xa, m, ls, c2, model_ok):
    """(p, log p, T = sum over real models of log p) of one block; log2 p = (x - m) c2 - log2 s."""
    lp2 = (xa - m[:, :, None]) * c2 - ls[:, :, None]
    p = tl.exp2(lp2)
    lp = lp2 * LN2
    T = tl.sum(tl.where(model_ok[None, :, None], lp, 0.0), axis=1)
    return p, lp, T


@triton.jit
def _setup(n, M, s_m, s_n, inv_tau_hi, inv_tau_lo, scale_hi, scale_lo, MP: tl.constexpr, ACC: tl.constexpr):
    """Per-program constants of rows ``n``: (models, model_ok, row and model offsets, 1/tau, scale,
    log2(e)/tau, M)."""
    mm = tl.arange(0, MP)
    inv_tau = scalar_arg(inv_tau_hi, inv_tau_lo, ACC)
    return (mm, mm < M, n * s_n, mm.to(tl.int64) * s_m, inv_tau, scalar_arg(scale_hi, scale_lo, ACC),
            inv_tau * LOG2E, tl.cast(M, ACC))


@triton.jit
def _store_grad(
    grad_ptr, xa, m_run, ls, R, c2, Mf, gscale, mm, model_ok, n, row_in, cols, N, C, bound, EVICT: tl.constexpr
):
    """d loss / d x_i of one [ROWS, MP, BLOCK_C] block into grad [M, N, C] (columns below ``bound``; L2 eviction
    policy EVICT)."""
    p, lp, T = _log_probs(xa, m_run, ls, c2, model_ok)
    S = tl.sum(tl.where(model_ok[None, :, None], p, 0.0), axis=1)
    g = Mf * p - S[:, None, :] + tl.where(p == 0, 0.0, p * (Mf * lp - T[:, None, :] - R[:, :, None]))
    off = mm.to(tl.int64)[None, :, None] * N * C + n[:, None, None] * C + cols.to(tl.int64)[None, None, :]
    st = row_in[:, None, None] & model_ok[None, :, None] & (cols < bound)[None, None, :]
    tl.store(grad_ptr + off, (g * gscale).to(grad_ptr.dtype.element_ty), mask=st, eviction_policy=EVICT)


@triton.jit
def _mutual_kd_kernel(
    x_ptr,
    loss_ptr,
    grad_ptr,
    M,
    N,
    C,
    s_m,
    s_n,
    s_c,
    inv_tau_hi,
    inv_tau_lo,
    scale_hi,
    scale_lo,
    NEED_GRAD: tl.constexpr,
    ROWS: tl.constexpr,
    MP: tl.constexpr,
    BLOCK_C: tl.constexpr,
    SINGLE: tl.constexpr,
    ZIGZAG: tl.constexpr,
    EVICT: tl.constexpr,
    ACC: tl.constexpr,
):
    """ROWS whole rows per program, the three passes of the module docstring (pass 2 backward with ZIGZAG; the
    row's last read and the gradient stores with L2 eviction policy EVICT)."""
    n = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_in = n < N
    mm, model_ok, row_off, model_off, inv_tau, scale, c2, Mf = _setup(
        n, M, s_m, s_n, inv_tau_hi, inv_tau_lo, scale_hi, scale_lo, MP, ACC
    )

    # pass 1: the M log-sum-exps
    m_run = tl.full([ROWS, MP], float("-inf"), ACC)
    s_run = tl.zeros([ROWS, MP], ACC)
    if SINGLE:
        cols = tl.arange(0, BLOCK_C)
        xa = _load_models(x_ptr, row_off, model_off, model_ok, row_in, cols, C, s_c, "", ACC)
        m_run, s_run = online_lse(m_run, s_run, xa, c2)
    else:
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            xa = _load_models(x_ptr, row_off, model_off, model_ok, row_in, cols, C, s_c, "", ACC)
            m_run, s_run = online_lse(m_run, s_run, xa, c2)
    ls = tl.log2(s_run)

    # pass 2: R_i = sum_c p_i (M log p_i - T), 0 where p_i == 0 (NaN stays NaN)
    R = tl.zeros([ROWS, MP], ACC)
    n_blocks = 1 if SINGLE else tl.cdiv(C, BLOCK_C)
    for i in range(0, n_blocks):
        cols = sweep_block(i, n_blocks, ZIGZAG) * BLOCK_C + tl.arange(0, BLOCK_C)
        if not SINGLE:
            if NEED_GRAD:
                xa = _load_models(x_ptr, row_off, model_off, model_ok, row_in, cols, C, s_c, "", ACC)
            else:  # the row's last read
                xa = _load_models(x_ptr, row_off, model_off, model_ok, row_in, cols, C, s_c, EVICT, ACC)
        p, lp, T = _log_probs(xa, m_run, ls, c2, model_ok)
        R += tl.sum(tl.where(p == 0, 0.0, p * (Mf * lp - T[:, None, :])), axis=2)
    loss = tl.sum(tl.where(model_ok[None, :], R, 0.0), axis=1) * scale
    tl.store(loss_ptr + n, loss, mask=row_in)

    # pass 3: gradient
    if NEED_GRAD:
        gscale = scale * inv_tau
        for blk in range(0, n_blocks):
            cols = blk * BLOCK_C + tl.arange(0, BLOCK_C)
            if not SINGLE:
                xa = _load_models(x_ptr, row_off, model_off, model_ok, row_in, cols, C, s_c, EVICT, ACC)
            _store_grad(grad_ptr, xa, m_run, ls, R, c2, Mf, gscale, mm, model_ok, n, row_in, cols, N, C, C, EVICT)


@triton.jit
def _merged_lse(part_ptr, n, n_split, mm, c2, MP: tl.constexpr, SPLIT_P2: tl.constexpr):
    """(m, log2 s) [1, MP] of row n from its chunks' online log-sum-exps (max and sum of each chunk at
    part[(n * n_split + chunk) * 2 MP + (0 | MP) + model]), merged in chunk order."""
    k = tl.arange(0, SPLIT_P2)
    at = part_ptr + ((n * n_split + k) * (2 * MP))[:, None] + mm[None, :]
    m, s = merge_chunk_lse(at, at + MP, (k < n_split)[:, None], c2)
    return m[None, :], tl.log2(s)[None, :]


@triton.jit
def _mutual_kd_split_kernel(
    x_ptr, loss_ptr, grad_ptr, lse_part_ptr, r_part_ptr,
    M, N, C, s_m, s_n, s_c, inv_tau_hi, inv_tau_lo, scale_hi, scale_lo, n_split, chunk,
    PHASE: tl.constexpr, NEED_GRAD: tl.constexpr, MP: tl.constexpr, BLOCK_C: tl.constexpr,
    SPLIT_P2: tl.constexpr, ACC: tl.constexpr,
):
    """Program (row, chunk) of a split row, one pass per PHASE (module docstring); a [1, MP, BLOCK_C] tile."""
    pid = tl.program_id(0)
    row, c_begin, c_end, n, row_in = split_program(n_split, chunk, C)
    mm, model_ok, row_off, model_off, inv_tau, scale, c2, Mf = _setup(
        n, M, s_m, s_n, inv_tau_hi, inv_tau_lo, scale_hi, scale_lo, MP, ACC
    )
    if PHASE == 1:
        m_run = tl.full([1, MP], float("-inf"), ACC)
        s_run = tl.zeros([1, MP], ACC)
        for c0 in range(c_begin, c_end, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            xa = _load_models(x_ptr, row_off, model_off, model_ok, row_in, cols, c_end, s_c, "", ACC)
            m_run, s_run = online_lse(m_run, s_run, xa, c2)
        out = lse_part_ptr + pid.to(tl.int64) * (2 * MP) + mm[None, :]
        tl.store(out, m_run)
        tl.store(out + MP, s_run)
    else:
        m_run, ls = _merged_lse(lse_part_ptr, row.to(tl.int64), n_split, mm, c2, MP, SPLIT_P2)
        if PHASE == 2:  # this chunk's part of R_i
            R = tl.zeros([1, MP], ACC)
            for c0 in range(c_begin, c_end, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                xa = _load_models(x_ptr, row_off, model_off, model_ok, row_in, cols, c_end, s_c, "", ACC)
                p, lp, T = _log_probs(xa, m_run, ls, c2, model_ok)
                R += tl.sum(tl.where(p == 0, 0.0, p * (Mf * lp - T[:, None, :])), axis=2)
            tl.store(r_part_ptr + pid.to(tl.int64) * MP + mm[None, :], R)
        else:  # R_i in chunk order, the loss (chunk 0) and this chunk's gradient
            k = tl.arange(0, SPLIT_P2)
            offs = ((row.to(tl.int64) * n_split + k) * MP)[:, None] + mm[None, :]
            R = tl.sum(tl.load(r_part_ptr + offs, mask=(k < n_split)[:, None], other=0.0), axis=0)[None, :]
            loss = tl.sum(tl.where(model_ok[None, :], R, 0.0), axis=1) * scale
            tl.store(loss_ptr + n, loss, mask=(c_begin + tl.zeros([1], tl.int32)) == 0)
            if NEED_GRAD:
                gscale = scale * inv_tau
                for c0 in range(c_begin, c_end, BLOCK_C):
                    cols = c0 + tl.arange(0, BLOCK_C)
                    xa = _load_models(x_ptr, row_off, model_off, model_ok, row_in, cols, c_end, s_c, "", ACC)
                    _store_grad(grad_ptr, xa, m_run, ls, R, c2, Mf, gscale, mm, model_ok, n, row_in, cols, N, C,
                                c_end, "")


def launch_plan(M: int, N: int, C: int, device: torch.device) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_C, ROWS, num_warps, n_split, chunk, SPLIT_P2) for logits [M, N, C]: rows whole in one block, streamed
    (C > BLOCK_C, n_split == 1) or cut into n_split chunks across programs (``split_plan``)."""
    block_c, rows, num_warps = tile_plan(C, next_pow2(M), next_pow2(N), 1, ROW_TILES)
    n_split, chunk, split_p2 = (1, C, 1) if C <= block_c else split_plan(N, C, block_c, device)
    return block_c, rows, num_warps, n_split, chunk, split_p2


def mutual_kd_rows(
    logits: Tensor, temperature: float, scale: float, need_grad: bool
) -> tuple[Tensor, Tensor]:
    """(loss [N], grad [M, N, C]) for logits [M, N, C] (any strides); grad is empty when not requested."""
    M, N, C = logits.shape
    dev = logits.device
    loss = torch.empty(N, dtype=compute_dtype(logits.dtype), device=dev)
    grad = torch.empty(M, N, C, dtype=logits.dtype, device=dev) if need_grad else logits.new_empty(0)
    if N == 0:
        return loss, grad
    if C == 0 or M == 0:
        loss.zero_()
        return loss, grad

    MP = next_pow2(M)
    block_c, rows, num_warps, n_split, chunk, split_p2 = launch_plan(M, N, C, dev)
    if n_split > 1:
        acc = compute_dtype(logits.dtype)
        lse_part = torch.empty(N * n_split, 2 * MP, dtype=acc, device=dev)
        r_part = torch.empty(N * n_split, MP, dtype=acc, device=dev)
        for phase in (1, 2, 3):
            _mutual_kd_split_kernel[(N * n_split,)](
                logits, loss, grad, lse_part, r_part, M, N, C, *logits.stride(),
                *f32_pairs(1.0 / temperature, scale), n_split, chunk,
                PHASE=phase, NEED_GRAD=need_grad, MP=MP, BLOCK_C=block_c, SPLIT_P2=split_p2,
                ACC=acc_dtype(logits.dtype), num_warps=num_warps,
            )
        return loss, grad
    _mutual_kd_kernel[(cdiv(N, rows),)](
        logits,
        loss,
        grad,
        M,
        N,
        C,
        *logits.stride(),
        *f32_pairs(1.0 / temperature, scale),
        NEED_GRAD=need_grad,
        ROWS=rows,
        MP=MP,
        BLOCK_C=block_c,
        SINGLE=C <= block_c,
        ZIGZAG=STREAM_ZIGZAG and C > block_c,
        EVICT="evict_first" if STREAM_L2_HINTS and C > block_c else "",
        ACC=acc_dtype(logits.dtype),
        num_warps=num_warps,
    )
    return loss, grad
