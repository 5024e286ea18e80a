"""Custom ops ``mmfast::mutual_kd_fwd`` / ``mmfast::mutual_kd_bwd``.

The forward op returns the per-row loss [N] and, in the same pass, d loss_n / d logits [M, N, C];
the backward op scales it by the incoming row gradient (in place, in an eager backward that frees the
graph, when the caller discarded it: mmfast/ops/_grad_scaling.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmfast import _backend, _native
from mmfast.ops._eager_path import OpRunner
from mmfast.ops._grad_scaling import may_scale_in_place, plain_eager, scale_
from mmfast.reference import mutual_kd as reference
from mmfast.reference.routed_kd import compute_dtype


def _mutual_kd_fwd(
    logits: Tensor, temperature: float, scale: float, need_grad: bool, consume_grads: bool = False
) -> tuple[Tensor, Tensor]:
    """(loss [N], grad [M, N, C]) for logits [M, N, C]; grad is empty when not requested.
    ``consume_grads``: the caller discards grad, so an eager backward that frees the graph may scale it in
    place (``mutual_kd_loss`` sets it; the values returned are the same)."""
    backend = _backend.resolve(logits.device, logits.dtype)
    if backend == "torch":
        return reference.mutual_kd_rows(logits, temperature, scale, need_grad)
    if backend in ("cpu", "cuda"):
        return _native.mutual_kd_rows(backend, logits, temperature, scale, need_grad)
    from mmfast.triton import mutual_kd as triton_mutual_kd

    return triton_mutual_kd.mutual_kd_rows(logits, temperature, scale, need_grad)


mutual_kd_fwd = torch.library.custom_op("mmfast::mutual_kd_fwd", _mutual_kd_fwd, mutates_args=())


@mutual_kd_fwd.register_fake
def _(logits, temperature, scale, need_grad, consume_grads=False):
    M, N, C = logits.shape
    loss = logits.new_empty((N,), dtype=compute_dtype(logits.dtype))
    return loss, logits.new_empty((M, N, C) if need_grad else (0,))


def _mutual_kd_bwd(grad_loss: Tensor, grad: Tensor) -> Tensor:
    """grad_logits[m, n, :] = grad_loss[n] * grad[m, n, :]."""
    return (grad * grad_loss.to(compute_dtype(grad.dtype))[None, :, None]).to(grad.dtype)


# the op for compile / tracing; an eager backward calls _mutual_kd_bwd directly (no dispatch overhead)
mutual_kd_bwd = torch.library.custom_op("mmfast::mutual_kd_bwd", _mutual_kd_bwd, mutates_args=())


@mutual_kd_bwd.register_fake
def _(grad_loss, grad):
    return grad.new_empty(grad.shape)


def _setup_context(ctx, inputs, output):
    # the gradient outputs are non-differentiable: no zero-filled [B, D] grads for them in backward
    ctx.set_materialize_grads(False)
    _, grad = output
    ctx.mark_non_differentiable(grad)
    ctx.save_for_backward(grad)
    ctx.need_grad = inputs[3]
    ctx.consume_grads = inputs[4] if len(inputs) > 4 else False


def _backward(ctx, grad_loss, _ggrad):
    if grad_loss is None:  # no gradient reached the loss (materialize_grads is off)
        return (None,) * len(ctx.needs_input_grad)
    (grad,) = ctx.saved_tensors
    if ctx.needs_input_grad[0] and not ctx.need_grad:
        raise RuntimeError("mmfast::mutual_kd_fwd: logits require grad but need_grad=False")
    if not ctx.need_grad:
        return None, None, None, None, None
    if ctx.consume_grads and may_scale_in_place(grad_loss, grad):
        return scale_(grad, grad_loss[None, :, None]), None, None, None, None
    bwd = _mutual_kd_bwd if plain_eager(grad_loss, grad) else mutual_kd_bwd
    return bwd(grad_loss, grad), None, None, None, None


run_mutual_kd_fwd = OpRunner(mutual_kd_fwd, _mutual_kd_fwd, setup_context=_setup_context, backward=_backward)
