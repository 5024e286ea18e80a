"""When the backward op may scale a forward-written gradient in place.

The forward ops write d loss / d input in their forward pass and save it; the backward scales it by
the incoming gradient. Scaling into the saved buffer instead of a fresh one saves an allocation (and,
on a CPU, the page faults of first touching it) plus one write of the gradient's size per step. That
is safe only when nothing else can see the buffer afterwards:

- the public function discarded the op's gradient outputs (the op's ``consume_grads`` argument);
- the backward runs eagerly on plain tensors (no compile, tracing or dispatch mode);
- the graph is freed after this backward (no ``retain_graph``, no ``create_graph``), so the saved
  buffer is never read again.

Otherwise the out-of-place backward op runs. The check reads autograd's graph-task state, which
older torch builds may not expose; there it always answers False.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmfast import _backend
from mmfast.ops._eager_path import untraced

_keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)

# below this many elements, multiplying by the factor costs less than checking it for all ones
# (x * 1 == x exactly, so both give the same values)
_ONES_CHECK_MIN_NUMEL = 4096


def plain_eager(*saved: Tensor) -> bool:
    """True in an eager backward on plain tensors: nothing compiled or traced and no mode active
    (:func:`mmfast.ops._eager_path.untraced`), no ``create_graph`` (grad mode off), every tensor of ``saved`` a
    plain ``Tensor``. A backward may then call its backward op's Python implementation directly, skipping the
    custom-op dispatch (same result: the op runs that function on the same tensors)."""
    return not torch.is_grad_enabled() and untraced() and all(type(t) is Tensor for t in saved)


def may_scale_in_place(*saved: Tensor) -> bool:
    """True when the saved gradients ``saved`` may be scaled in place (see the module docstring);
    the caller must also know that its op's gradient outputs were discarded."""
    return _keep_graph is not None and plain_eager(*saved) and not _keep_graph()


# a broadcast run shorter than this is multiplied by torch (kernel blocks of a few elements cost more)
_KERNEL_MIN_D = 64


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


def _kernel_takes(grad: Tensor, factor: Tensor) -> bool:
    """False for what the GPU scaling kernels never take: float64 (they compute in fp32), a non-contiguous or
    empty gradient."""
    return torch.float64 not in (grad.dtype, factor.dtype) and grad.is_contiguous() and grad.numel() > 0


def kernel_layout(grad: Tensor, factor: Tensor) -> tuple[int, int, int, int] | None:
    """The [repeat, rows, D, Q] layout (:func:`row_layout`) a GPU scaling kernel takes, or None where torch
    multiplies: float64 (the kernels compute in fp32), a non-contiguous or empty gradient, another broadcast
    pattern, or broadcast runs shorter than 64 elements."""
    if not _kernel_takes(grad, factor):
        return None
    layout = row_layout(tuple(grad.shape), tuple(factor.shape))
    return layout if layout is not None and layout[2] >= _KERNEL_MIN_D else None


def _one_value(factor: Tensor) -> Tensor | None:
    """The factor's single value as a [1] view when every element is the same memory (strides all 0: an
    expanded scalar, which is what autograd passes down from a sum or mean), else None."""
    spread = any(stride != 0 for size, stride in zip(factor.shape, factor.stride(), strict=True) if size > 1)
    if factor.numel() == 0 or spread:
        return None
    return factor.as_strided((1,), (1,))


# both kernels: elements of a row per program (BLOCK in mmfast/triton/grad_scaling.py, kScaleBlock in
# csrc/cuda/grad_scaling.cu), and programs per row at most (the CUDA grid's y limit)
_KERNEL_BLOCK = 4096
_MAX_BLOCKS_PER_ROW = 65535


def _one_value_pieces(numel: int) -> list[tuple[int, int, tuple[int, int, int, int]]]:
    """(start, stop, layout) pieces of a flat gradient of ``numel`` elements scaled by one value: one long row
    when the grid allows it (one launch), else rows of one kernel block each, then the rest as one short row."""
    if -(-numel // _KERNEL_BLOCK) <= _MAX_BLOCKS_PER_ROW:
        return [(0, numel, (1, 1, numel, 1))]
    bulk = numel // _KERNEL_BLOCK * _KERNEL_BLOCK
    pieces = [(0, bulk, (bulk // _KERNEL_BLOCK, 1, _KERNEL_BLOCK, 1))]
    return pieces + ([(bulk, numel, (1, 1, numel - bulk, 1))] if numel > bulk else [])


def _scale_unless_one_(backend: str, grad: Tensor, factor: Tensor) -> bool:
    """grad *= factor in place with the ``backend``'s kernel that skips blocks of unit factors; False (nothing
    done) where the kernel does not take the layout.

    A factor that is one value broadcast (an expanded scalar: autograd's gradient of a sum or mean) is read as
    that value, without first copying it out to the factor's size, over the gradient taken flat: any row
    length, any size (:func:`_one_value_pieces`)."""
    one = _one_value(factor)
    if one is not None and torch.broadcast_shapes(grad.shape, factor.shape) == grad.shape:
        if not _kernel_takes(grad, factor):
            return False
        flat = grad.view(-1)
        pieces = [(flat[start:stop], layout) for start, stop, layout in _one_value_pieces(grad.numel())]
        value = one.to(torch.float32)
    else:
        layout = kernel_layout(grad, factor)
        if layout is None:
            return False
        _, rows, _, Q = layout
        pieces, value = [(grad, layout)], factor.reshape(rows * Q).to(torch.float32).contiguous()
    if backend == "triton":
        from mmfast.triton.grad_scaling import scale_unless_one_ as scale_piece
    else:
        from mmfast._native import scale_unless_one_cuda as scale_piece
    # every piece after the first is one row shorter than a block: the kernels refuse none but the first, so
    # False never comes after a piece was scaled
    return all(scale_piece(piece, value, layout) for piece, layout in pieces)


def cpu_all_ones(factor: Tensor) -> bool:
    """Whether every element of ``factor`` is 1, on a CPU (False on other devices, which
    :func:`scale_` does not ask). One value broadcast (what ``loss.backward()`` on a sum or mean passes down)
    is read once: two small ops, which matter after a kernel has swept the caches (each op then costs
    5-20 us on the project's CPU host), rather than a compare and a reduction over the factor."""
    if factor.device.type != "cpu":
        return False
    one = _one_value(factor)
    if one is not None:
        return one.item() == 1.0
    return bool((factor == 1).all())


def scale_(grad: Tensor, factor: Tensor, all_ones: bool | None = None) -> Tensor:
    """grad *= factor (broadcast, same rank), in place (computed in fp32 for bf16/fp16 gradients).

    A factor of all ones (the incoming gradient of ``loss.backward()`` on a mean or sum whose scale the
    forward already applied) makes no pass over the gradient:
    - on a CPU, where reading a value costs no device synchronisation, a large buffer is returned as it
      is (small ones are multiplied: cheaper than the check); ``all_ones``, when given, is
      :func:`cpu_all_ones` of the factor's values, found once for several gradients;
    - on a GPU with the ``triton`` or ``cuda`` backend, a kernel whose blocks skip every stretch of factors
      of 1 (mmfast/triton/grad_scaling.py, csrc/cuda/grad_scaling.cu), with no synchronisation; with the
      ``torch`` backend (or a layout the kernels do not take) torch multiplies.
    """
    if grad.device.type == "cpu":
        if grad.numel() >= _ONES_CHECK_MIN_NUMEL and (cpu_all_ones(factor) if all_ones is None else all_ones):
            return grad
    else:
        backend = _backend.resolve(grad.device, grad.dtype)
        if backend in ("triton", "cuda") and _scale_unless_one_(backend, grad, factor):
            return grad
    return grad.mul_(factor)


def scale_rows_(grad: Tensor, grad_loss: Tensor, all_ones: bool | None = None) -> Tensor:
    """grad[b, :] *= grad_loss[b], in place (see :func:`scale_`)."""
    if grad.device.type == "cpu" and grad.numel() >= _ONES_CHECK_MIN_NUMEL:
        all_ones = cpu_all_ones(grad_loss) if all_ones is None else all_ones
        if all_ones:
            return grad
    return scale_(grad, grad_loss[:, None], all_ones)
