"""Mutual (co-training) KD over M models in one Triton launch; the reference's contract
(``mmfast.reference.mutual_kd.mutual_kd_rows``).

With p_i = softmax(x_i / tau), T = sum_i log p_i, S = sum_i p_i, per row:
  R_i = sum_c p_i (M log p_i - T),   loss = scale * sum_i R_i,
  d loss / d x_i = scale / tau * (M p_i - S + p_i (M log p_i - T - R_i)).
Each program owns ROWS rows and holds the M models as a [ROWS, MP, BLOCK_C] tile: pass 1 computes the
M online log-sum-exps, pass 2 the R_i, pass 3 (gradient only) writes the gradient. A row that fits in
one block is loaded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mmfast.reference.routed_kd import compute_dtype

from .routed_kd import LN2, LOG2E, acc_dtype, cdiv, f32_pairs, next_pow2, online_lse, scalar_arg, tile_plan

# (tile, per_thread, stream_tile, stream_per_thread) of the [ROWS, MP, BLOCK_C] model tile, as
# routed_kd.ROW_TILES (H200-tuned; tests shrink it).
ROW_TILES = (4096, 16, 16384, 32)


@triton.jit
def _load_models(x_ptr, row_off, model_off, model_ok, row_in, cols, C, s_c, ACC: tl.constexpr):
    """Logits of a [ROWS, MP, BLOCK_C] block in the accumulation type: -inf past C, 0 for padded models."""
    cm = cols < C
    off = row_off[:, None, None] + model_off[None, :, None] + cols.to(tl.int64)[None, None, :] * s_c
    ld = row_in[:, None, None] & model_ok[None, :, None] & cm[None, None, :]
    xv = tl.load(x_ptr + off, mask=ld, other=0.0).to(ACC)
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
    ACC: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_in = n < N
    mm = tl.arange(0, MP)
    model_ok = mm < M
    row_off = n * s_n
    model_off = mm.to(tl.int64) * s_m
    inv_tau = scalar_arg(inv_tau_hi, inv_tau_lo, ACC)
    scale = scalar_arg(scale_hi, scale_lo, ACC)
    c2 = inv_tau * LOG2E
    Mf = tl.cast(M, ACC)

    # pass 1: the M log-sum-exps
    m_run = tl.full([ROWS, MP], float("-inf"), ACC)
    s_run = tl.zeros([ROWS, MP], ACC)
    if SINGLE:
        cols = tl.arange(0, BLOCK_C)
        xa = _load_models(x_ptr, row_off, model_off, model_ok, row_in, cols, C, s_c, ACC)
        m_run, s_run = online_lse(m_run, s_run, xa, c2)
    else:
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            xa = _load_models(x_ptr, row_off, model_off, model_ok, row_in, cols, C, s_c, ACC)
            m_run, s_run = online_lse(m_run, s_run, xa, c2)
    ls = tl.log2(s_run)

    # pass 2: R_i = sum_c p_i (M log p_i - T), 0 where p_i == 0 (NaN stays NaN)
    R = tl.zeros([ROWS, MP], ACC)
    n_blocks = 1 if SINGLE else tl.cdiv(C, BLOCK_C)
    for blk in range(0, n_blocks):
        cols = blk * BLOCK_C + tl.arange(0, BLOCK_C)
        if not SINGLE:
            xa = _load_models(x_ptr, row_off, model_off, model_ok, row_in, cols, C, s_c, ACC)
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
                xa = _load_models(x_ptr, row_off, model_off, model_ok, row_in, cols, C, s_c, ACC)
            p, lp, T = _log_probs(xa, m_run, ls, c2, model_ok)
            S = tl.sum(tl.where(model_ok[None, :, None], p, 0.0), axis=1)
            g = Mf * p - S[:, None, :] + tl.where(p == 0, 0.0, p * (Mf * lp - T[:, None, :] - R[:, :, None]))
            off = (
                mm.to(tl.int64)[None, :, None] * N * C
                + n[:, None, None] * C
                + cols.to(tl.int64)[None, None, :]
            )
            st = row_in[:, None, None] & model_ok[None, :, None] & (cols < C)[None, None, :]
            tl.store(grad_ptr + off, (g * gscale).to(grad_ptr.dtype.element_ty), mask=st)


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
    block_c, rows, num_warps = tile_plan(C, MP, next_pow2(N), 1, ROW_TILES)
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
        ACC=acc_dtype(logits.dtype),
        num_warps=num_warps,
    )
    return loss, grad
