"""Custom ops ``mmfast::uni_instruct_fwd`` / ``mmfast::uni_instruct_bwd`` (Uni-Instruct generator loss).

The forward op returns the per-sample loss [B] and, in the same pass, its gradients to x, teacher_x0 and
fake_x0 [B, D]; the backward op scales one saved gradient by the incoming per-sample gradient.
coef [B, 3] = (lambda_sim, lambda_fgm, lambda_di) and di_norm are stop-gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmfast import _backend, _native
from mmfast.ops._grad_scaling import may_scale_in_place, scale_rows_
from mmfast.reference import uni_instruct as reference
from mmfast.reference.routed_kd import compute_dtype


@torch.library.custom_op("mmfast::uni_instruct_fwd", mutates_args=())
def uni_instruct_fwd(
    x: Tensor,
    a: Tensor,
    b: Tensor,
    coef: Tensor,
    di_norm: Tensor | None,
    alpha: float,
    scale: float,
    fgm: bool,
    di: bool,
    need_dx: bool,
    need_da: bool,
    need_db: bool,
    consume_grads: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss [B], dx, da, db [B, D]) for x, a, b [B, D] (stride(1) == 1), coef [B, 3] and di_norm None
    (per-sample norms) or [1]; each gradient is empty when not requested. ``consume_grads``: the caller
    discards dx, da, db, so an eager backward that frees the graph may scale them in place
    (mmfast/ops/_grad_scaling.py)."""
    args = (x, a, b, coef, di_norm, alpha, scale, fgm, di, need_dx, need_da, need_db)
    backend = _backend.resolve(x.device, x.dtype)
    if backend == "torch":
        return reference.uni_instruct_rows(*args)
    if backend in ("cpu", "cuda"):
        return _native.uni_instruct_rows(backend, *args)
    from mmfast.triton import uni_instruct as triton_uni_instruct

    return triton_uni_instruct.uni_instruct_rows(*args)


@uni_instruct_fwd.register_fake
def _(x, a, b, coef, di_norm, alpha, scale, fgm, di, need_dx, need_da, need_db, consume_grads=False):
    B, D = x.shape
    loss = x.new_empty((B,), dtype=compute_dtype(x.dtype))
    return (
        loss,
        x.new_empty((B, D) if need_dx else (0,)),
        a.new_empty((B, D) if need_da else (0,)),
        b.new_empty((B, D) if need_db else (0,)),
    )


@torch.library.custom_op("mmfast::uni_instruct_bwd", mutates_args=())
def uni_instruct_bwd(grad_loss: Tensor, grad: Tensor) -> Tensor:
    """dX[b, :] = grad_loss[b] * grad[b, :] (in the compute dtype, cast to grad's dtype)."""
    cdt = compute_dtype(grad.dtype)
    return (grad.to(cdt) * grad_loss.to(cdt)[:, None]).to(grad.dtype)


@uni_instruct_bwd.register_fake
def _(grad_loss, grad):
    return grad.new_empty(grad.shape)


def _setup_context(ctx, inputs, output):
    # the gradient outputs are non-differentiable: no zero-filled [B, D] grads for them in backward
    ctx.set_materialize_grads(False)
    _, dx, da, db = output
    ctx.mark_non_differentiable(dx, da, db)
    ctx.save_for_backward(dx, da, db)
    ctx.need = inputs[9:12]
    ctx.consume_grads = inputs[12] if len(inputs) > 12 else False


def _backward(ctx, grad_loss, _gdx, _gda, _gdb):
    if grad_loss is None:  # no gradient reached the loss (materialize_grads is off)
        return (None,) * len(ctx.needs_input_grad)
    grads = ctx.saved_tensors
    in_place = ctx.consume_grads and may_scale_in_place(grad_loss, *grads)
    out = []
    for i, (name, need, g) in enumerate(zip(("x", "a", "b"), ctx.need, grads, strict=True)):
        if ctx.needs_input_grad[i] and not need:
            raise RuntimeError(f"mmfast::uni_instruct_fwd: {name} requires grad but need_d{name}=False")
        if not need:
            out.append(None)
        else:
            out.append(scale_rows_(g, grad_loss) if in_place else uni_instruct_bwd(grad_loss, g))
    return (*out,) + (None,) * (len(ctx.needs_input_grad) - 3)


uni_instruct_fwd.register_autograd(_backward, setup_context=_setup_context)
