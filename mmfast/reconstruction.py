"""Masked feature reconstruction loss (SPEC section 2): argument checks, canonical views, the fused
op and the reduction. The math lives in ``mmfast/reference/masked_reconstruction.py``."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mmfast import _checks
from mmfast.ops import masked_reconstruction as ops
from mmfast.reference import masked_reconstruction as reference
from mmfast.reference.routed_kd import compute_dtype

RECON_LOSSES = tuple(reference.LOSSES)
RECON_REDUCTIONS = ("mean", "sum", "none")


def _mask_kind(mask_shape: tuple[int, ...], shape: tuple[int, ...], cd: int) -> str:
    """"row" (one value per position: size 1 on the channel dim), "channel" (size 1 everywhere else)
    or "element", for a mask already checked to broadcast to ``shape``."""
    full = (1,) * (len(shape) - len(mask_shape)) + tuple(mask_shape)
    if full[cd] == 1:
        return "row"
    if all(n == 1 for i, n in enumerate(full) if i != cd):
        return "channel"
    return "element"


def _broadcasts_to(mask_shape: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """True when ``mask_shape`` broadcasts to ``shape`` (``torch.broadcast_shapes(mask_shape, shape) == shape``,
    without its cost: it is written for symbolic shapes)."""
    if len(mask_shape) > len(shape):
        return False
    return all(m == 1 or m == s for m, s in zip(reversed(mask_shape), reversed(shape), strict=False))


def _safe_mean(total: Tensor, count: Tensor) -> Tensor:
    """total / count, and exactly 0 (with zero gradients, never NaN) where count == 0."""
    nonzero = count > 0
    return torch.where(nonzero, total / torch.where(nonzero, count, torch.ones_like(count)), torch.zeros_like(total))


def _mean_row_weights(mask_rows: Tensor | None, R: int, per_row: int, cdt: torch.dtype,
                      device: torch.device) -> Tensor:
    """Row weights M_r / sum(M) for the "mean" reduction (M_r = 1 without a mask; sum(M) counts
    ``per_row`` elements a row): the forward then writes the loss rows and the gradients of the mean
    itself, and the backward of ``loss.backward()`` (an incoming gradient of ones) has no pass over
    them. A row weight is 0 exactly where M_r is (the kernels skip those rows; a positive weight
    never underflows to 0), and all are 0 when sum(M) is."""
    if mask_rows is None:
        return torch.full((R,), 1.0 / max(R * per_row, 1), dtype=cdt, device=device)
    scaled = (mask_rows / (mask_rows.sum() * per_row)).clamp_min(torch.finfo(cdt).tiny)
    return torch.where(mask_rows == 0, mask_rows, scaled)


def _mean_weight_beside(mask: Tensor, numel: int, cdt: torch.dtype) -> Tensor:
    """1 / sum(M) for the "mean" under an element or channel mask ``mask`` broadcast to ``numel`` elements
    (the mask's own sum times how often broadcasting repeats it: no pass over the broadcast view), and 0 when
    sum(M) == 0: every row is then excluded (0 loss, zero gradients, not read)."""
    # a bool mask on the CPU is counted (count_nonzero: ~15x faster there than a sum in a floating dtype); on a
    # GPU the sum is one plain reduction kernel, capturable in a CUDA graph
    if mask.dtype == torch.bool and mask.device.type == "cpu":
        total = mask.count_nonzero().to(cdt)
    else:
        total = mask.sum(dtype=cdt)
    count = total * (numel // max(mask.numel(), 1))
    return _safe_mean(torch.ones_like(count), count)


def masked_reconstruction_loss(
    pred: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    *,
    loss: str = "mse",
    beta: float = 1.0,
    normalize_target: bool = False,
    eps: float = 1e-6,
    channel_dim: int = -1,
    reduction: str = "mean",
) -> Tensor:
    """Masked reconstruction loss between ``pred`` P and ``target`` Y (MAE, UMT feature distillation).

    Per element e = (P - Yt)^2 (``loss="mse"``) or PyTorch's smooth L1 with ``beta``; per row
    e_r = 1 - cos(P_r, Yt_r) (``"cosine"``; norms clamped at 1e-8 as F.cosine_similarity). A row is
    one position: all dims but ``channel_dim``. With ``normalize_target``, Yt = (Y - mean) /
    sqrt(var + eps) over the channels of each row (biased variance); otherwise Yt = Y.

    ``mask`` M (bool, or float in [0, 1]) broadcasts to P's shape: a row mask (size 1 on the channel
    dim), a channel mask (size D on it, 1 elsewhere) or an element mask. ``"cosine"`` takes row masks
    only. Reductions, with sum(M) taken over the mask broadcast to P's shape:
      "mean": sum(M e) / sum(M)  (cosine: sum_r M_r e_r / sum_r M_r; no mask: mean over elements/rows);
              0 with zero gradients when sum(M) == 0 (or when there are no rows),
      "sum":  sum(M e),
      "none": M e with P's shape (cosine: M_r e_r, P's shape without the channel dim).
    Rows a row mask sets to 0 are not read: their loss and gradients are exactly 0, even with NaN
    data (only d loss / d M_r, when M requires grad, reads them). Element and channel mask zeros do
    read the data (0 * NaN is NaN).

    Gradients flow to ``pred``, to ``target`` when it requires grad (through the normalisation) and
    to a float ``mask`` when it requires grad (d mean / d M_i = (e_i - mean) / sum(M), summed over
    the broadcast dims).

    Args:
        pred, target: one shape and dtype: [N, D], [..., D] (``channel_dim=-1``) or [B, D, *spatial]
            (``channel_dim=1``, read through strides without a transposed copy).
        channel_dim: the feature dim, any valid dim (negative counts from the end).
    """
    P = _checks.floating("pred", _checks.tensor("pred", pred))
    Y = _checks.floating("target", _checks.tensor("target", target))
    _checks.choice("loss", loss, RECON_LOSSES)
    _checks.choice("reduction", reduction, RECON_REDUCTIONS)
    beta = _checks.positive("beta", beta)
    eps = _checks.positive("eps", eps)
    if not isinstance(normalize_target, bool):
        raise TypeError(f"normalize_target must be a bool, got {type(normalize_target).__name__}")
    if Y.dtype != P.dtype:
        raise TypeError(f"target dtype {Y.dtype} must match pred dtype {P.dtype}")
    if Y.shape != P.shape:
        raise ValueError(f"target must have pred's shape {tuple(P.shape)}, got {tuple(Y.shape)}")
    if P.dim() < 1:
        raise ValueError("pred must have at least one dim (the channel dim)")
    if not isinstance(channel_dim, int) or isinstance(channel_dim, bool) or not -P.dim() <= channel_dim < P.dim():
        raise ValueError(f"channel_dim must be an int in [{-P.dim()}, {P.dim() - 1}] for pred of shape "
                         f"{tuple(P.shape)}, got {channel_dim!r}")
    cd = channel_dim % P.dim()
    shape = tuple(P.shape)
    D = shape[cd]
    if D < 1:
        raise ValueError(f"pred must have at least one channel (dim {channel_dim} of shape {shape} is 0)")
    A, S = math.prod(shape[:cd]), math.prod(shape[cd + 1:])
    R = A * S
    cdt = compute_dtype(P.dtype)
    cosine = loss == "cosine"

    kind = "none"
    if mask is not None:
        _checks.tensor("mask", mask)
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(f"mask must be a bool or floating-point tensor, got {mask.dtype}")
        if not _broadcasts_to(tuple(mask.shape), shape):
            hint = ""
            if tuple(mask.shape) == shape[:cd] + shape[cd + 1:]:
                hint = f"; a per-row mask needs size 1 on channel_dim: mask.unsqueeze({channel_dim})"
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to pred's shape {shape}{hint}")
        kind = _mask_kind(tuple(mask.shape), shape, cd)
        if cosine and kind != "row":
            raise ValueError(
                f"mask: loss='cosine' is per row and takes a per-row mask (size 1 on channel_dim); got a {kind} mask "
                f"of shape {tuple(mask.shape)}"
            )
    _checks.same_device(("pred", "target", "mask"), (P, Y, mask))
    if mask is not None and mask.is_floating_point() and _checks.value_checks_active(mask):
        if mask.numel() and not bool(((mask >= 0) & (mask <= 1)).all()):
            raise ValueError("mask values must be in [0, 1] (found one outside, or NaN)")

    # canonical views [A, D, S] (no copy for a tensor with mergeable leading/trailing dims)
    P3, Y3 = P.reshape(A, D, S), Y.reshape(A, D, S)
    mask_rows = mask_elems = None
    full = None
    if kind != "none":
        full = mask.reshape((1,) * (P.dim() - mask.dim()) + tuple(mask.shape))
        if kind == "row":
            m = full.to(cdt).select(cd, 0)
            mask_rows = m.expand(shape[:cd] + shape[cd + 1:]).reshape(R)
        else:
            m = full if full.dtype == torch.bool else full.to(cdt)
            mask_elems = m.expand(shape).reshape(A, D, S)
    grad_on = torch.is_grad_enabled()
    need_dp = grad_on and P.requires_grad
    need_dy = grad_on and Y.requires_grad
    mask_t = mask_rows if mask_rows is not None else mask_elems
    need_dm = grad_on and mask_t is not None and mask_t.requires_grad
    per_element = reduction == "none" and not cosine

    normalize_in_op = normalize_target
    if normalize_target and per_element and need_dy:
        # A per-element loss depends on its whole row through the normalisation: let autograd take
        # the normalisation's backward (rows a row mask excludes get exactly 0 gradient, NaN or not).
        Yn = Y3.to(cdt)
        if mask_rows is not None:
            Yn = torch.where((mask_rows != 0).reshape(A, 1, S), Yn, Yn.detach())
        Y3 = reference.normalize_rows(Yn, eps)[0].to(P.dtype)
        normalize_in_op = False

    prescaled = reduction == "mean" and not need_dm
    if prescaled and kind in ("none", "row"):
        mask_rows = _mean_row_weights(mask_rows, R, 1 if cosine else D, cdt, P.device)
    elif prescaled:  # an element or channel mask: 1 / sum(M) rides as row weights beside it
        mask_rows = _mean_weight_beside(full, P.numel(), cdt).expand(R)
    loss_out, msum, _, _, _ = ops.run_masked_reconstruction_fwd(
        P3, Y3, mask_rows, mask_elems, reference.LOSSES[loss], beta, normalize_in_op, eps, per_element,
        ops.grad_mask(need_dp, need_dy, need_dm, consume_grads=True),
    )
    if reduction == "none":
        if per_element:
            return loss_out.reshape(shape)
        return loss_out.reshape(shape[:cd] + shape[cd + 1:]).to(P.dtype)
    total = loss_out.sum()
    if reduction == "sum" or prescaled:
        return total.to(P.dtype)
    # a mask that requires grad (its gradient needs the unscaled rows)
    count = mask_rows.sum() * (1 if cosine else D) if kind == "row" else msum.sum()
    return _safe_mean(total, count).to(P.dtype)
