"""Custom ops ``mmfast::fake_score_fwd`` / ``mmfast::fake_score_bwd`` (EDM-weighted fake-score loss).

The forward op returns the per-sample loss [B] and, in the same pass, d loss_b / d fake_x0 [B, D]; the
backward op scales it by the incoming per-sample gradient. x (the generated sample) and lam are stop-gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmfast import _backend, _native
from mmfast.ops._eager_path import OpRunner
from mmfast.ops._grad_scaling import may_scale_in_place, scale_rows_
from mmfast.reference import fake_score as reference
from mmfast.reference.routed_kd import compute_dtype


def _fake_score_fwd(
    b: Tensor, x: Tensor, lam: Tensor, scale: float, need_db: bool, consume_grads: bool = False
) -> tuple[Tensor, Tensor]:
    """(loss [B], db [B, D]) for b, x [B, D] (stride(1) == 1) and lam [B]; db is empty when not requested.
    ``consume_grads``: the caller discards db, so an eager backward that frees the graph may scale it in place
    (mmfast/ops/_grad_scaling.py).
    """
    backend = _backend.resolve(b.device, b.dtype)
    if backend == "torch":
        return reference.fake_score_rows(b, x, lam, scale, need_db)
    if backend in ("cpu", "cuda"):
        return _native.fake_score_rows(backend, b, x, lam, scale, need_db)
    from mmfast.triton import fake_score as triton_fake_score

    return triton_fake_score.fake_score_rows(b, x, lam, scale, need_db)


fake_score_fwd = torch.library.custom_op("mmfast::fake_score_fwd", _fake_score_fwd, mutates_args=())


@fake_score_fwd.register_fake
def _(b, x, lam, scale, need_db, consume_grads=False):
    B, D = b.shape
    return b.new_empty((B,), dtype=compute_dtype(b.dtype)), b.new_empty((B, D) if need_db else (0,))


@torch.library.custom_op("mmfast::fake_score_bwd", mutates_args=())
def fake_score_bwd(grad_loss: Tensor, grad: Tensor) -> Tensor:
    """db[b, :] = grad_loss[b] * grad[b, :] (in the compute dtype, cast to grad's dtype)."""
    cdt = compute_dtype(grad.dtype)
    return (grad.to(cdt) * grad_loss.to(cdt)[:, None]).to(grad.dtype)


@fake_score_bwd.register_fake
def _(grad_loss, grad):
    return grad.new_empty(grad.shape)


def _setup_context(ctx, inputs, output):
    # the gradient outputs are non-differentiable: no zero-filled [B, D] grads for them in backward
    ctx.set_materialize_grads(False)
    _, db = output
    ctx.mark_non_differentiable(db)
    ctx.save_for_backward(db)
    ctx.need_db = inputs[4]
    ctx.consume_grads = inputs[5] if len(inputs) > 5 else False


def _backward(ctx, grad_loss, _gdb):
    if grad_loss is None:  # no gradient reached the loss (materialize_grads is off)
        return (None,) * len(ctx.needs_input_grad)
    (db,) = ctx.saved_tensors
    if ctx.needs_input_grad[0] and not ctx.need_db:
        raise RuntimeError("mmfast::fake_score_fwd: fake_x0 requires grad but need_db=False")
    if not ctx.need_db:
        gb = None
    elif ctx.consume_grads and may_scale_in_place(grad_loss, db):
        gb = scale_rows_(db, grad_loss)
    else:
        gb = fake_score_bwd(grad_loss, db)
    return (gb,) + (None,) * (len(ctx.needs_input_grad) - 1)


run_fake_score_fwd = OpRunner(fake_score_fwd, _fake_score_fwd, setup_context=_setup_context, backward=_backward)
