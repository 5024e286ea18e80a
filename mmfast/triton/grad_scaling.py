"""In-place scaling of a forward-written gradient by the incoming gradient, skipping the blocks whose factor
is exactly 1 (mmfast/ops/_grad_scaling.py).

The forward kernels write d loss / d input already scaled for ``loss.backward()`` on the mean or sum, so the
incoming factor is usually all ones; on a CPU that is checked on the host, on a GPU that would be a device
synchronisation. Here each program reads the factors of its block (a few bytes, cached) and returns at once
when they are all 1: the gradient is neither read nor written, with no host synchronisation (CUDA-graph
capturable). A NaN factor is not 1, so it reaches the gradient.

Layout: grad is contiguous [repeat, rows, D, Q] (flattened), the factor contiguous [rows, Q], broadcast over
``repeat`` and ``D``: grad[k, r, d, q] *= factor[r, q].
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .routed_kd import cdiv

BLOCK = 4096
MIN_D = 64  # a broadcast run shorter than this is multiplied by torch (programs of a few elements cost more)


@triton.jit
def _scale_unless_one_kernel(grad_ptr, factor_ptr, rows, inner, Q, BLOCK: tl.constexpr, Q_IS_ONE: tl.constexpr):
    p = tl.program_id(0)  # a (repeat, row) pair
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # within the row's D * Q elements
    in_row = offs < inner
    frow = p % rows
    if Q_IS_ONE:
        f = tl.load(factor_ptr + frow).to(tl.float32)
        scaled = f != 1.0
    else:
        f = tl.load(factor_ptr + frow * Q + offs % Q, mask=in_row, other=1.0).to(tl.float32)
        scaled = tl.max((f != 1.0).to(tl.int32), axis=0) > 0
    if scaled:
        ptrs = grad_ptr + p.to(tl.int64) * inner + offs
        g = tl.load(ptrs, mask=in_row)
        tl.store(ptrs, (g.to(tl.float32) * f).to(grad_ptr.dtype.element_ty), mask=in_row)


def row_layout(grad_shape: tuple[int, ...], factor_shape: tuple[int, ...]) -> tuple[int, int, int, int] | None:
    """(repeat, rows, D, Q) when grad [*] splits into [repeat, rows, D, Q] with the factor [*] of the same rank
    broadcast over repeat and D (size 1 there) and matching rows and Q; None for any other pattern."""
    if len(grad_shape) != len(factor_shape):
        return None
    sizes = [1, 1, 1, 1]  # repeat (broadcast), rows (matched), D (broadcast), Q (matched)
    phase = 0
    for g, f in zip(grad_shape, factor_shape, strict=True):
        while phase < 4 and not (f == 1 if phase % 2 == 0 else f == g):
            phase += 1
        if phase == 4:
            return None
        sizes[phase] *= g
    repeat, rows, D, Q = sizes
    if rows * Q == 1:  # one factor for all: one long row
        return 1, 1, repeat * D, 1
    return repeat, rows, D, Q


def scale_unless_one_(grad: Tensor, factor: Tensor) -> Tensor | None:
    """grad *= factor in place (factor broadcast to grad, computed in fp32), skipping the blocks whose
    factors are all 1; returns grad, or None when the layout is not [repeat, rows, D, Q] with D >= MIN_D
    (the caller then multiplies with torch)."""
    if torch.float64 in (grad.dtype, factor.dtype):  # fp32 math here; float64 is torch's
        return None
    layout = row_layout(tuple(grad.shape), tuple(factor.shape))
    if layout is None or not grad.is_contiguous() or grad.numel() == 0:
        return None
    repeat, rows, D, Q = layout
    if D < MIN_D:
        return None
    f = factor.reshape(rows * Q).contiguous()
    inner = D * Q
    grid = (repeat * rows, cdiv(inner, BLOCK))
    if grid[1] > 65535 or math.prod(grid) == 0:
        return None
    _scale_unless_one_kernel[grid](grad, f, rows, inner, Q, BLOCK=BLOCK, Q_IS_ONE=Q == 1, num_warps=8)
    return grad
