"""Custom ops ``mmfast::routed_kd_fwd`` / ``mmfast::routed_kd_bwd``.

The forward op returns the per-row loss and, in the same pass, the per-row gradients (dx, dw, dz)
that the caller asked for; the backward op only scales them by the incoming row gradient:
  grad_x[b, :, s] = g[b, s] * dx[b, :, s];  grad_w[b, k] = sum_s g[b, s] * dw[b, s, k];
  grad_z[e, b, :, s] = g[b, s] * dz[e, b, :, s].
Shapes follow ``csrc/include/mmfast/params.h``: x [B, C, S], z [E, B, C, S], weights [B, K].
Which gradients the forward writes, and whether the caller discards them, is one bit mask argument,
``grads`` (GRAD_DX | GRAD_DW | GRAD_DZ | CONSUME_GRADS), not four bools: torch.library's autograd wrapper
costs time quadratic in the argument count per call. In an eager backward that frees the graph, discarded
gradients are scaled in place (mmfast/ops/_grad_scaling.py): no new [B, C, S] buffers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmfast import _backend, _native
from mmfast.ops._eager_path import OpRunner
from mmfast.ops._grad_scaling import cpu_all_ones, may_scale_in_place, plain_eager, scale_
from mmfast.reference import routed_kd as reference
from mmfast.reference.routed_kd import compute_dtype

# bits of the forward op's ``grads`` argument
GRAD_DX, GRAD_DW, GRAD_DZ, CONSUME_GRADS = 1, 2, 4, 8


def grad_mask(need_dx: bool, need_dw: bool, need_dz: bool, consume_grads: bool = False) -> int:
    """The forward op's ``grads`` bit mask for the requested gradients (and ``consume_grads``)."""
    return ((GRAD_DX if need_dx else 0) | (GRAD_DW if need_dw else 0) | (GRAD_DZ if need_dz else 0)
            | (CONSUME_GRADS if consume_grads else 0))


def _unpack(grads: int) -> tuple[bool, bool, bool]:
    """(need_dx, need_dw, need_dz) from the ``grads`` bit mask."""
    if not 0 <= grads <= GRAD_DX | GRAD_DW | GRAD_DZ | CONSUME_GRADS:
        raise ValueError(
            "routed_kd_fwd: grads must be a bit mask of GRAD_DX=1, GRAD_DW=2, GRAD_DZ=4, CONSUME_GRADS=8, "
            f"got {grads}"
        )
    return bool(grads & GRAD_DX), bool(grads & GRAD_DW), bool(grads & GRAD_DZ)


def _run_backend(backend: str, *args) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if backend == "torch":
        return reference.routed_kd_rows(*args)
    if backend in ("cpu", "cuda"):
        return _native.routed_kd_rows(backend, *args)
    if backend == "triton":
        from mmfast.triton import routed_kd as triton_routed_kd

        return triton_routed_kd.routed_kd_rows(*args)
    raise AssertionError(backend)


def _routed_kd_fwd(
    x: Tensor,
    z: Tensor,
    weights: Tensor,
    indices: Tensor | None,
    mask: Tensor | None,
    temperature: float,
    mix: int,
    divergence: int,
    beta: float,
    scale: float,
    grads: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss [B, S], dx [B, C, S], dw [B, S, K], dz [E, B, C, S]); ``grads`` is the bit mask of the
    gradients to write (GRAD_DX = 1, GRAD_DW = 2, GRAD_DZ = 4; see :func:`grad_mask`), the others are empty.
    CONSUME_GRADS = 8 says the caller discards dx, dw, dz, so an eager backward that frees the graph may
    scale them in place (``routed_kd_loss`` sets it; the values returned are the same)."""
    need_dx, need_dw, need_dz = _unpack(grads)
    backend = _backend.resolve(x.device, x.dtype)
    return _run_backend(
        backend, x, z, weights, indices, mask, temperature, mix, divergence, beta, scale,
        need_dx, need_dw, need_dz,
    )


routed_kd_fwd = torch.library.custom_op("mmfast::routed_kd_fwd", _routed_kd_fwd, mutates_args=())


@routed_kd_fwd.register_fake
def _(x, z, weights, indices, mask, temperature, mix, divergence, beta, scale, grads):
    need_dx, need_dw, need_dz = _unpack(grads)
    B, C, S = x.shape
    E, K = z.shape[0], weights.shape[1]
    cdt = compute_dtype(x.dtype)
    loss = x.new_empty((B, S), dtype=cdt)
    dx = x.new_empty((B, C, S) if need_dx else (0,))
    dw = x.new_empty((B, S, K) if need_dw else (0,), dtype=cdt)
    dz = z.new_empty((E, B, C, S) if need_dz else (0,))
    return loss, dx, dw, dz


def _routed_kd_bwd(grad_loss: Tensor, dx: Tensor, dw: Tensor, dz: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Scale the forward's row gradients by ``grad_loss`` [B, S]; empty in, empty out."""
    g = grad_loss.to(compute_dtype(dx.dtype) if dx.numel() else grad_loss.dtype)
    gx = (dx * g[:, None, :]).to(dx.dtype) if dx.numel() else dx.new_empty(0)
    gw = (dw * g[..., None]).sum(1) if dw.numel() else dw.new_empty(0)
    gz = (dz * g[None, :, None, :]).to(dz.dtype) if dz.numel() else dz.new_empty(0)
    return gx, gw, gz


def _routed_kd_bwd_in_place(grad_loss: Tensor, dx: Tensor, dw: Tensor, dz: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``_routed_kd_bwd`` scaling the saved dx and dz in place (dw [B, S, K] is summed over S anyway)."""
    all_ones = cpu_all_ones(grad_loss) if dx.numel() and dz.numel() else None  # once for both
    gx = scale_(dx, grad_loss[:, None, :], all_ones) if dx.numel() else dx
    gw = (dw * grad_loss[..., None]).sum(1) if dw.numel() else dw.new_empty(0)
    gz = scale_(dz, grad_loss[None, :, None, :], all_ones) if dz.numel() else dz
    return gx, gw, gz


# the op for compile / tracing; an eager backward calls _routed_kd_bwd directly (no dispatch overhead)
routed_kd_bwd = torch.library.custom_op("mmfast::routed_kd_bwd", _routed_kd_bwd, mutates_args=())


@routed_kd_bwd.register_fake
def _(grad_loss, dx, dw, dz):
    gw_shape = (dw.shape[0], dw.shape[2]) if dw.dim() == 3 else (0,)
    return dx.new_empty(dx.shape), dw.new_empty(gw_shape), dz.new_empty(dz.shape)


def _setup_context(ctx, inputs, output):
    # the gradient outputs are non-differentiable: no zero-filled [B, D] grads for them in backward
    ctx.set_materialize_grads(False)
    x, z, weights = inputs[0], inputs[1], inputs[2]
    _, dx, dw, dz = output
    ctx.mark_non_differentiable(dx, dw, dz)
    ctx.save_for_backward(dx, dw, dz)
    ctx.need = _unpack(inputs[10])
    ctx.consume_grads = bool(inputs[10] & CONSUME_GRADS)
    ctx.input_dtypes = (x.dtype, z.dtype, weights.dtype)


def _backward(ctx, grad_loss, _gdx, _gdw, _gdz):
    if grad_loss is None:  # no gradient reached the loss (materialize_grads is off)
        return (None,) * len(ctx.needs_input_grad)
    dx, dw, dz = ctx.saved_tensors
    for i, (name, flag) in enumerate(zip(("x", "z", "weights"), (ctx.need[0], ctx.need[2], ctx.need[1]), strict=True)):
        if ctx.needs_input_grad[i] and not flag:
            raise RuntimeError(
                f"mmfast::routed_kd_fwd: {name} requires grad but its gradient was not requested "
                f"(bit GRAD_D{name[0].upper()} of grads unset); call mmfast.routed_kd_loss, which sets the flags"
            )
    if ctx.consume_grads and may_scale_in_place(grad_loss, dx, dw, dz):
        bwd = _routed_kd_bwd_in_place
    elif plain_eager(grad_loss, dx, dw, dz):
        bwd = _routed_kd_bwd
    else:
        bwd = routed_kd_bwd
    gx, gw, gz = bwd(grad_loss, dx, dw, dz)
    return (
        gx if ctx.need[0] else None,
        gz if ctx.need[2] else None,
        gw.to(ctx.input_dtypes[2]) if ctx.need[1] else None,
        None, None, None, None, None, None, None, None,
    )


run_routed_kd_fwd = OpRunner(routed_kd_fwd, _routed_kd_fwd, setup_context=_setup_context, backward=_backward)
