"""In-place scaling of a forward-written gradient by the incoming gradient, skipping the blocks whose factor
is exactly 1 (mmfast/ops/_grad_scaling.py).

The forward kernels write d loss / d input already scaled for ``loss.backward()`` on the mean or sum, so the
incoming factor is usually all ones; on a CPU that is checked on the host, on a GPU that would be a device
synchronisation. Here each program reads the factors of its block (a few bytes, cached) and returns at once
when they are all 1: the gradient is neither read nor written, with no host synchronisation (CUDA-graph
capturable). A NaN factor is not 1, so it reaches the gradient.

Layout (``mmfast.ops._grad_scaling.kernel_layout``): grad is contiguous [repeat, rows, D, Q] (flattened), the
factor contiguous float32 [rows, Q], broadcast over ``repeat`` and ``D``: grad[k, r, d, q] *= factor[r, q].
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .routed_kd import cdiv

BLOCK = 4096


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


def scale_unless_one_(grad: Tensor, factor: Tensor, layout: tuple[int, int, int, int]) -> bool:
    """grad[k, r, d, q] *= factor[r, q] in place (fp32 math) for grad contiguous [repeat, rows, D, Q] = ``layout``
    and factor contiguous float32 [rows * Q] (non-empty: ``kernel_layout``), skipping the blocks whose factors
    are all 1. False (nothing done) when the row is longer than the grid allows."""
    repeat, rows, D, Q = layout
    inner = D * Q
    grid = (repeat * rows, cdiv(inner, BLOCK))
    if grid[1] > 65535:
        return False
    _scale_unless_one_kernel[grid](grad, factor, rows, inner, Q, BLOCK=BLOCK, Q_IS_ONE=Q == 1, num_warps=8)
    return True
