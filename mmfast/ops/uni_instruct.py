"""Custom ops ``mmfast::uni_instruct_fwd`` / ``mmfast::uni_instruct_bwd`` (Uni-Instruct generator loss).

The forward op returns the per-sample loss [B] and, in the same pass, its gradients to x, teacher_x0 and
fake_x0 [B, D]; the backward op scales one saved gradient by the incoming per-sample gradient.
coef [B, 3] = (lambda_sim, lambda_fgm, lambda_di) and di_norm are stop-gradient. Which gradients the forward
writes, and whether the caller discards them, is one bit mask argument, ``grads`` (GRAD_DX | GRAD_DA | GRAD_DB |
CONSUME_GRADS), not four bools: torch.library's autograd wrapper costs time quadratic in the argument count.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmfast import _backend, _native
from mmfast.ops._eager_path import OpRunner
from mmfast.ops._grad_scaling import cpu_all_ones, may_scale_in_place, scale_rows_
from mmfast.reference import uni_instruct as reference
from mmfast.reference.routed_kd import compute_dtype

# bits of the forward op's ``grads`` argument
GRAD_DX, GRAD_DA, GRAD_DB, CONSUME_GRADS = 1, 2, 4, 8


def grad_mask(need_dx: bool, need_da: bool, need_db: bool, consume_grads: bool = False) -> int:
    """The forward op's ``grads`` bit mask for the requested gradients (and ``consume_grads``)."""
    return ((GRAD_DX if need_dx else 0) | (GRAD_DA if need_da else 0) | (GRAD_DB if need_db else 0)
            | (CONSUME_GRADS if consume_grads else 0))


def _unpack(grads: int) -> tuple[bool, bool, bool, bool]:
    """(need_dx, need_da, need_db, consume_grads) from the ``grads`` bit mask."""
    if not 0 <= grads <= GRAD_DX | GRAD_DA | GRAD_DB | CONSUME_GRADS:
        raise ValueError(
            "uni_instruct_fwd: grads must be a bit mask of GRAD_DX=1, GRAD_DA=2, GRAD_DB=4, CONSUME_GRADS=8, "
            f"got {grads}"
        )
    return bool(grads & GRAD_DX), bool(grads & GRAD_DA), bool(grads & GRAD_DB), bool(grads & CONSUME_GRADS)


def _uni_instruct_fwd(
    x: Tensor,
    a: Tensor,
    b: Tensor,
    coef: Tensor,
    di_norm: Tensor | None,
    alpha: float,
    scale: float,
    fgm: bool,
    di: bool,
    grads: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss [B], dx, da, db [B, D]) for x, a, b [B, D] (stride(1) == 1), coef [B, 3] and di_norm None
    (per-sample norms) or [1]. ``grads`` (see :func:`grad_mask`) is a bit mask: GRAD_DX = 1, GRAD_DA = 2,
    GRAD_DB = 4 request dx, da, db (each is empty when not requested); CONSUME_GRADS = 8 says the caller
    discards them, so an eager backward that frees the graph may scale them in place
    (mmfast/ops/_grad_scaling.py)."""
    need_dx, need_da, need_db, _ = _unpack(grads)
    args = (x, a, b, coef, di_norm, alpha, scale, fgm, di, need_dx, need_da, need_db)
    backend = _backend.resolve(x.device, x.dtype)
    if backend == "torch":
        return reference.uni_instruct_rows(*args)
    if backend in ("cpu", "cuda"):
        return _native.uni_instruct_rows(backend, *args)
    from mmfast.triton import uni_instruct as triton_uni_instruct

    return triton_uni_instruct.uni_instruct_rows(*args)


uni_instruct_fwd = torch.library.custom_op("mmfast::uni_instruct_fwd", _uni_instruct_fwd, mutates_args=())


@uni_instruct_fwd.register_fake
def _(x, a, b, coef, di_norm, alpha, scale, fgm, di, grads):
    need_dx, need_da, need_db, _ = _unpack(grads)
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
    need_dx, need_da, need_db, ctx.consume_grads = _unpack(inputs[9])
    ctx.need = (need_dx, need_da, need_db)


def _backward(ctx, grad_loss, _gdx, _gda, _gdb):
    if grad_loss is None:  # no gradient reached the loss (materialize_grads is off)
        return (None,) * len(ctx.needs_input_grad)
    grads = ctx.saved_tensors
    in_place = ctx.consume_grads and may_scale_in_place(grad_loss, *grads)
    all_ones = cpu_all_ones(grad_loss) if in_place else None  # found once for the three gradients
    out = []
    for i, (name, need, g) in enumerate(zip(("x", "a", "b"), ctx.need, grads, strict=True)):
        if ctx.needs_input_grad[i] and not need:
            raise RuntimeError(f"mmfast::uni_instruct_fwd: {name} requires grad but bit GRAD_D{name.upper()} of grads "
                               "is unset")
        if not need:
            out.append(None)
        else:
            out.append(scale_rows_(g, grad_loss, all_ones) if in_place else uni_instruct_bwd(grad_loss, g))
    return (*out,) + (None,) * (len(ctx.needs_input_grad) - 3)


run_uni_instruct_fwd = OpRunner(uni_instruct_fwd, _uni_instruct_fwd, setup_context=_setup_context, backward=_backward)
