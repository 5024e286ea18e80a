"""Custom ops ``mmfast::masked_reconstruction_fwd`` / ``mmfast::masked_reconstruction_bwd``.

The forward op returns the per-row loss sums (or the per-element loss), the per-row mask sums and,
in the same pass over pred and target, the gradients dP, dY, dM that the caller asked for (contract:
``mmfast.reference.masked_reconstruction``). The backward op only scales them by the incoming
gradient g (per row [R], or per element [A, D, S]) and adds the mask-sum gradient h [R] (in an eager
backward that frees the graph, the saved gradients are scaled in place instead: no new buffers):
  grad_P = g * dP;  grad_Y = g * dY;
  grad_mask_rows = g * dM (per row) or sum_c g * dM (per element);
  grad_mask = g * dM + h (broadcast over the channels).
Which gradients the forward writes, and whether the caller discards them, is one bit mask argument,
``grads`` (GRAD_DP | GRAD_DY | GRAD_DM | CONSUME_GRADS), not four bools: torch.library's autograd
wrapper costs time quadratic in the argument count per call.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmfast import _backend, _native
from mmfast.ops._eager_path import OpRunner
from mmfast.ops._grad_scaling import cpu_all_ones, may_scale_in_place, scale_
from mmfast.reference import masked_reconstruction as reference
from mmfast.reference.routed_kd import compute_dtype

# bits of the forward op's ``grads`` argument
GRAD_DP, GRAD_DY, GRAD_DM, CONSUME_GRADS = 1, 2, 4, 8


def grad_mask(need_dp: bool, need_dy: bool, need_dm: bool, consume_grads: bool = False) -> int:
    """The forward op's ``grads`` bit mask for the requested gradients (and ``consume_grads``)."""
    return ((GRAD_DP if need_dp else 0) | (GRAD_DY if need_dy else 0) | (GRAD_DM if need_dm else 0)
            | (CONSUME_GRADS if consume_grads else 0))


def _unpack(grads: int) -> tuple[bool, bool, bool, bool]:
    """(need_dp, need_dy, need_dm, consume_grads) from the ``grads`` bit mask."""
    if not 0 <= grads <= GRAD_DP | GRAD_DY | GRAD_DM | CONSUME_GRADS:
        raise ValueError(
            "masked_reconstruction_fwd: grads must be a bit mask of GRAD_DP=1, GRAD_DY=2, GRAD_DM=4, "
            f"CONSUME_GRADS=8, got {grads}"
        )
    return bool(grads & GRAD_DP), bool(grads & GRAD_DY), bool(grads & GRAD_DM), bool(grads & CONSUME_GRADS)


def _run_backend(backend: str, *args) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if backend == "torch":
        return reference.masked_reconstruction_rows(*args)
    if backend in ("cpu", "cuda"):
        return _native.masked_reconstruction_rows(backend, *args)
    if backend == "triton":
        from mmfast.triton import masked_reconstruction as triton_masked_reconstruction

        return triton_masked_reconstruction.masked_reconstruction_rows(*args)
    raise AssertionError(backend)


def _check_args(pred: Tensor, target: Tensor, mask_rows: Tensor | None, mask: Tensor | None, loss: int,
                per_element: bool, need_dm: bool) -> None:
    if pred.dim() != 3 or target.shape != pred.shape or target.dtype != pred.dtype:
        raise ValueError("masked_reconstruction_fwd: pred and target must be [A, D, S] tensors of one shape and dtype")
    A, _, S = pred.shape
    if mask_rows is not None and mask is not None and need_dm:
        raise ValueError("masked_reconstruction_fwd: with both mask_rows and mask (row weights on an element mask) "
                         "dM cannot be requested")
    if mask_rows is not None and (mask_rows.shape != (A * S,) or mask_rows.dtype != compute_dtype(pred.dtype)):
        raise ValueError("masked_reconstruction_fwd: mask_rows must be [A * S] in the compute dtype")
    if mask is not None and (
        mask.shape != pred.shape or (mask.dtype != torch.bool and mask.dtype != compute_dtype(pred.dtype))
    ):
        raise ValueError("masked_reconstruction_fwd: mask must be [A, D, S], bool or in the compute dtype")
    if loss not in (reference.MSE, reference.SMOOTH_L1, reference.COSINE):
        raise ValueError(f"masked_reconstruction_fwd: unknown loss code {loss}")
    if loss == reference.COSINE and (mask is not None or per_element):
        raise ValueError("masked_reconstruction_fwd: the cosine loss is per row (row masks only, not per_element)")


def _masked_reconstruction_fwd(
    pred: Tensor,
    target: Tensor,
    mask_rows: Tensor | None,
    mask: Tensor | None,
    loss: int,
    beta: float,
    normalize_target: bool,
    eps: float,
    per_element: bool,
    grads: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss [R] or [A, D, S], msum [R], dP [A, D, S], dY [A, D, S], dM [R] or [A, D, S]) for pred and
    target [A, D, S]; unrequested outputs are empty.

    ``grads`` (see :func:`grad_mask`) is a bit mask: GRAD_DP = 1, GRAD_DY = 2, GRAD_DM = 4 request dP, dY,
    dM; CONSUME_GRADS = 8 says the caller discards dP, dY, dM, so an eager backward that frees the graph
    may scale them in place (``masked_reconstruction_loss`` sets it; the values returned are the same).
    """
    need_dp, need_dy, need_dm, _ = _unpack(grads)
    _check_args(pred, target, mask_rows, mask, loss, per_element, need_dm)
    backend = _backend.resolve(pred.device, pred.dtype)
    return _run_backend(
        backend, pred, target, mask_rows, mask, loss, beta, normalize_target, eps, per_element,
        need_dp, need_dy, need_dm and (mask_rows is not None or mask is not None),
    )


masked_reconstruction_fwd = torch.library.custom_op(
    "mmfast::masked_reconstruction_fwd", _masked_reconstruction_fwd, mutates_args=()
)


# shapes of the forward op's five outputs ((0,) when absent)
output_shapes = _native.masked_reconstruction_output_shapes


@masked_reconstruction_fwd.register_fake
def _(pred, target, mask_rows, mask, loss, beta, normalize_target, eps, per_element, grads):
    need_dp, need_dy, need_dm, _ = _unpack(grads)
    _check_args(pred, target, mask_rows, mask, loss, per_element, need_dm)
    cdt = compute_dtype(pred.dtype)
    s_loss, s_msum, s_dp, s_dy, s_dm = output_shapes(
        pred.shape, mask_rows is not None, mask is not None, per_element, need_dp, need_dy, need_dm
    )
    return (
        pred.new_empty(s_loss, dtype=pred.dtype if per_element else cdt),
        pred.new_empty(s_msum, dtype=cdt),
        pred.new_empty(s_dp),
        pred.new_empty(s_dy),
        pred.new_empty(s_dm, dtype=cdt),
    )


def _present(t: Tensor) -> bool:
    return t.dim() > 1 or t.numel() > 0


@torch.library.custom_op("mmfast::masked_reconstruction_bwd", mutates_args=())
def masked_reconstruction_bwd(
    grad_loss: Tensor, grad_msum: Tensor, dp: Tensor, dy: Tensor, dm: Tensor, shape: list[int], row_mask: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_pred, grad_target, grad_mask) from the forward's saved gradients; empty in, empty out.

    ``shape`` is [A, D, S]; ``grad_loss`` is [R] (per row) or [A, D, S] (per element); ``row_mask``
    says whether dM belongs to a row mask (its gradient is then [R]).
    """
    A, D, S = shape
    per_element = grad_loss.dim() == 3
    cdt = grad_loss.dtype if grad_loss.is_floating_point() else torch.float32
    if _present(dp):
        cdt = compute_dtype(dp.dtype)
    g = grad_loss.to(cdt)
    g3 = g if per_element else g.reshape(A, 1, S)
    gp = (dp * g3).to(dp.dtype) if _present(dp) else dp.new_empty(0)
    gy = (dy * g3).to(dy.dtype) if _present(dy) else dy.new_empty(0)
    if not _present(dm):
        gm = dm.new_empty(0)
    elif row_mask:
        gm = (dm * g.to(dm.dtype)) if not per_element else (dm * g3.to(dm.dtype)).sum(1).reshape(A * S)
    else:
        gm = dm * g3.to(dm.dtype)
        if not per_element and grad_msum.numel() > 0:
            gm = gm + grad_msum.to(dm.dtype).reshape(A, 1, S)
    return gp, gy, gm


@masked_reconstruction_bwd.register_fake
def _(grad_loss, grad_msum, dp, dy, dm, shape, row_mask):
    A, D, S = shape
    if not _present(dm):
        gm_shape = (0,)
    elif row_mask:
        gm_shape = (A * S,)
    else:
        gm_shape = (A, D, S)
    return dp.new_empty(dp.shape), dy.new_empty(dy.shape), dm.new_empty(gm_shape)


def _setup_context(ctx, inputs, output):
    pred, mask_rows = inputs[0], inputs[2]
    need_dp, need_dy, need_dm, consume_grads = _unpack(inputs[9])
    _, _, dp, dy, dm = output
    ctx.mark_non_differentiable(dp, dy, dm)
    ctx.set_materialize_grads(False)  # no [A, D, S] zero tensors for the unused gradient outputs
    ctx.save_for_backward(dp, dy, dm)
    ctx.need = (need_dp, need_dy, need_dm)
    ctx.shape = list(pred.shape)
    ctx.row_mask = mask_rows is not None
    ctx.consume_grads = consume_grads


def _bwd_in_place(grad_loss: Tensor, grad_msum: Tensor, dp: Tensor, dy: Tensor, dm: Tensor, shape: list[int],
                  row_mask: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``masked_reconstruction_bwd`` writing into the saved gradients."""
    A, D, S = shape
    per_element = grad_loss.dim() == 3
    g3 = grad_loss if per_element else grad_loss.reshape(A, 1, S)
    all_ones = cpu_all_ones(grad_loss) if _present(dp) and _present(dy) else None  # once for both
    gp = scale_(dp, g3, all_ones) if _present(dp) else dp
    gy = scale_(dy, g3, all_ones) if _present(dy) else dy
    if not _present(dm):
        gm = dm
    elif row_mask:
        gm = dm.mul_(grad_loss) if not per_element else (dm * g3).sum(1).reshape(A * S)
    else:
        gm = dm.mul_(g3)
        if not per_element and grad_msum.numel() > 0:
            gm = gm.add_(grad_msum.reshape(A, 1, S))
    return gp, gy, gm


def _backward(ctx, grad_loss, grad_msum, _gdp, _gdy, _gdm):
    dp, dy, dm = ctx.saved_tensors
    names = ("pred", "target", "mask_rows", "mask")
    flags = (ctx.need[0], ctx.need[1], ctx.need[2], ctx.need[2])
    for i, (name, flag) in enumerate(zip(names, flags, strict=True)):
        if ctx.needs_input_grad[i] and not flag:
            raise RuntimeError(
                f"mmfast::masked_reconstruction_fwd: {name} requires grad but its gradient was not requested; "
                "call mmfast.masked_reconstruction_loss, which sets the flags"
            )
    if grad_loss is None:  # only the mask sums were used: just the mask gets a gradient
        A, D, S = ctx.shape
        gm = None
        if ctx.need[2] and grad_msum is not None and not ctx.row_mask:
            gm = grad_msum.reshape(A, 1, S).expand(A, D, S).to(dm.dtype)
        return (None, None, None, gm, None, None, None, None, None, None)
    if grad_msum is None:
        grad_msum = dm.new_empty(0)
    in_place = ctx.consume_grads and may_scale_in_place(grad_loss, dp, dy, dm)
    bwd = _bwd_in_place if in_place else masked_reconstruction_bwd
    gp, gy, gm = bwd(grad_loss, grad_msum, dp, dy, dm, ctx.shape, ctx.row_mask)
    return (
        gp if ctx.need[0] else None,
        gy if ctx.need[1] else None,
        gm if (ctx.need[2] and ctx.row_mask) else None,
        gm if (ctx.need[2] and not ctx.row_mask) else None,
        None, None, None, None, None, None,
    )


run_masked_reconstruction_fwd = OpRunner(
    masked_reconstruction_fwd, _masked_reconstruction_fwd, setup_context=_setup_context, backward=_backward
)
