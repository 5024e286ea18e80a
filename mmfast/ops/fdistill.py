"""Custom ops ``mmfast::fdistill_fwd`` / ``mmfast::fdistill_bwd`` (f-distill / DMD generator loss).

The forward op returns the per-sample loss [B] and, in the same pass, d loss_b / d x [B, D]; the
backward op scales it by the incoming per-sample gradient. teacher_x0, fake_x0 and h are stop-gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmfast import _backend, _native
from mmfast.ops._eager_path import OpRunner
from mmfast.ops._grad_scaling import may_scale_in_place, scale_rows_
from mmfast.reference import fdistill as reference
from mmfast.reference.routed_kd import compute_dtype


def _fdistill_fwd(
    x: Tensor, a: Tensor, b: Tensor, h: Tensor, scale: float, need_dx: bool, consume_grads: bool = False
) -> tuple[Tensor, Tensor]:
    """(loss [B], dx [B, D]) for x, a, b [B, D] (stride(1) == 1) and h [B]; dx is empty when not requested.
    ``consume_grads``: the caller discards dx, so an eager backward that frees the graph may scale it in place
    (mmfast/ops/_grad_scaling.py).
    """
    backend = _backend.resolve(x.device, x.dtype)
    if backend == "torch":
        return reference.fdistill_rows(x, a, b, h, scale, need_dx)
    if backend in ("cpu", "cuda"):
        return _native.fdistill_rows(backend, x, a, b, h, scale, need_dx)
    from mmfast.triton import fdistill as triton_fdistill

    return triton_fdistill.fdistill_rows(x, a, b, h, scale, need_dx)


fdistill_fwd = torch.library.custom_op("mmfast::fdistill_fwd", _fdistill_fwd, mutates_args=())


@fdistill_fwd.register_fake
def _(x, a, b, h, scale, need_dx, consume_grads=False):
    B, D = x.shape
    return x.new_empty((B,), dtype=compute_dtype(x.dtype)), x.new_empty((B, D) if need_dx else (0,))


@torch.library.custom_op("mmfast::fdistill_bwd", mutates_args=())
def fdistill_bwd(grad_loss: Tensor, grad: Tensor) -> Tensor:
    """dx[b, :] = grad_loss[b] * grad[b, :] (in the compute dtype, cast to grad's dtype)."""
    cdt = compute_dtype(grad.dtype)
    return (grad.to(cdt) * grad_loss.to(cdt)[:, None]).to(grad.dtype)


@fdistill_bwd.register_fake
def _(grad_loss, grad):
    return grad.new_empty(grad.shape)


def _setup_context(ctx, inputs, output):
    # the gradient outputs are non-differentiable: no zero-filled [B, D] grads for them in backward
    ctx.set_materialize_grads(False)
    _, dx = output
    ctx.mark_non_differentiable(dx)
    ctx.save_for_backward(dx)
    ctx.need_dx = inputs[5]
    ctx.consume_grads = inputs[6] if len(inputs) > 6 else False


def _backward(ctx, grad_loss, _gdx):
    if grad_loss is None:  # no gradient reached the loss (materialize_grads is off)
        return (None,) * len(ctx.needs_input_grad)
    (dx,) = ctx.saved_tensors
    if ctx.needs_input_grad[0] and not ctx.need_dx:
        raise RuntimeError("mmfast::fdistill_fwd: x requires grad but need_dx=False")
    if not ctx.need_dx:
        gx = None
    elif ctx.consume_grads and may_scale_in_place(grad_loss, dx):
        gx = scale_rows_(dx, grad_loss)
    else:
        gx = fdistill_bwd(grad_loss, dx)
    return (gx,) + (None,) * (len(ctx.needs_input_grad) - 1)


run_fdistill_fwd = OpRunner(fdistill_fwd, _fdistill_fwd, setup_context=_setup_context, backward=_backward)
