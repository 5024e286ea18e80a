"""Reference masked reconstruction loss: per-row (or per-element) loss and explicit gradients.

Canonical layout (see ``csrc/include/mmfast/params.h``): pred P and target Y [A, D, S] (any strides),
D channels; rows are r = a * S + s (R = A * S rows). ``mask_rows`` [R] (weights w_r, compute dtype)
and/or ``mask`` [A, D, S] (element weights m_i, bool or compute dtype, possibly a broadcast view); both
together weight w_r m_i (a mean's 1 / sum(M) as row weights beside an element mask), without msum and dM.

Target: Yt = Y, or with ``normalize_target`` Yt = (Y - mean_c Y) / sqrt(var_c Y + eps) per row
(biased variance, as masked autoencoders do). With d = P - Yt, per element:
  mse:        e = d^2,                                   de/dP = 2 d
  smooth_l1:  e = 0.5 d^2 / beta if |d| < beta, else |d| - 0.5 beta;  de/dP = d / beta or sign(d)
and per row, for cosine (with eps_c = COSINE_EPS, as F.cosine_similarity):
  cos = P . Yt / (max(|P|, eps_c) max(|Yt|, eps_c)),  e_r = 1 - cos.
Outputs (per_element=False): loss_r = sum_c w_r m_rc e_rc (cosine: w_r e_r), msum_r = sum_c m_rc
(element masks), dP = d loss_r / dP, dY = d loss_r / dY, dM = d loss_r / d(weight): e_rc for an
element mask, sum_c e_rc (cosine: e_r) for a row mask. per_element=True (mse/smooth_l1 only): the
loss is the element w m e itself, and every gradient is elementwise (dM = e).

Rows with w_r == 0 are excluded: their loss and gradients are 0 and their P and Y are not read
(a NaN there never reaches the loss) -- except for dM, which is d loss / d w_r = sum_c e_rc and
does read them when the mask requires grad. Element-mask zeros are read: 0 * NaN is NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .routed_kd import compute_dtype

LOSSES = {"mse": 0, "smooth_l1": 1, "cosine": 2}
MSE, SMOOTH_L1, COSINE = 0, 1, 2
# clamp of the norms in the cosine loss (F.cosine_similarity's default eps)
COSINE_EPS = 1e-8


def normalize_rows(y: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(Yt, rstd) for y [A, D, S]: Yt = (y - mean) * rstd, rstd = 1 / sqrt(biased var + eps), over dim 1."""
    yc = y - y.mean(1, keepdim=True)
    rstd = torch.rsqrt((yc * yc).mean(1, keepdim=True) + eps)
    return yc * rstd, rstd


def normalize_backward(g: Tensor, yt: Tensor, rstd: Tensor) -> Tensor:
    """d / dY from g = d / dYt through Yt = normalize_rows(Y): rstd (g - mean g - Yt mean(g Yt))."""
    return rstd * (g - g.mean(1, keepdim=True) - yt * (g * yt).mean(1, keepdim=True))


def elementwise_terms(d: Tensor, loss: int, beta: float) -> tuple[Tensor, Tensor]:
    """(e, de/dd) of the elementwise losses for d = P - Yt (NaN stays NaN, sign(+-inf) = +-1)."""
    if loss == MSE:
        return d * d, 2 * d
    if loss == SMOOTH_L1:
        ad = d.abs()
        quad = ad < beta
        e = torch.where(quad, 0.5 * d * d / beta, ad - 0.5 * beta)
        # sign(d) with NaN kept (torch.sign(nan) is 0, which would hide it)
        sign = torch.where(d > 0, 1.0, torch.where(d < 0, -1.0, d))
        return e, torch.where(quad, d / beta, sign)
    raise ValueError(f"unknown elementwise loss code {loss}")


def cosine_terms(p: Tensor, yt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(e_r [A, 1, S], de_r/dP, de_r/dYt) of e_r = 1 - cos(P_r, Yt_r) over dim 1."""
    dot = (p * yt).sum(1, keepdim=True)
    norm_p = (p * p).sum(1, keepdim=True).sqrt()
    norm_y = (yt * yt).sum(1, keepdim=True).sqrt()
    den_p, den_y = norm_p.clamp_min(COSINE_EPS), norm_y.clamp_min(COSINE_EPS)
    inv = 1 / (den_p * den_y)
    cos = dot * inv
    zero = torch.zeros_like(cos)
    k_p = torch.where(norm_p > COSINE_EPS, cos / (den_p * den_p), zero)  # the clamp has no gradient
    k_y = torch.where(norm_y > COSINE_EPS, cos / (den_y * den_y), zero)
    return 1 - cos, k_p * p - yt * inv, k_y * yt - p * inv


def masked_reconstruction_rows(
    pred: Tensor,
    target: Tensor,
    mask_rows: Tensor | None,
    mask: Tensor | None,
    loss: int,
    beta: float,
    normalize_target: bool,
    eps: float,
    per_element: bool,
    need_dp: bool,
    need_dy: bool,
    need_dm: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, msum, dP, dY, dM) as in the module docstring; unrequested outputs are empty [0] tensors.

    loss: [R] compute dtype, or [A, D, S] in pred's dtype when ``per_element``; msum: [R] compute
    dtype (element mask and not per_element); dP, dY: [A, D, S] contiguous in pred's dtype; dM:
    [R] (row mask, not per_element) or [A, D, S], compute dtype.
    """
    A, D, S = pred.shape
    R = A * S
    if need_dm and mask_rows is not None and mask is not None:
        raise ValueError("masked reconstruction: dM is not defined with both row weights and an element mask")
    cdt = compute_dtype(pred.dtype)
    P, Y = pred.to(cdt), target.to(cdt)
    if normalize_target:
        Yt, rstd = normalize_rows(Y, eps)
    else:
        Yt, rstd = Y, None
    w = None if mask_rows is None else mask_rows.to(cdt).reshape(A, 1, S)
    m = None if mask is None else mask.to(cdt)

    if loss == COSINE:
        e_row, de_p, de_y = cosine_terms(P, Yt)
        weight = w if w is not None else torch.ones_like(e_row)
        out = (weight * e_row).reshape(R)
        g_p, g_yt = weight * de_p, weight * de_y
        raw = e_row.reshape(R)
    else:
        e, de = elementwise_terms(P - Yt, loss, beta)
        weight = m if w is None else w if m is None else w * m
        le, g_p = (e, de) if weight is None else (e * weight, de * weight)
        g_yt = -g_p if need_dy else None
        out = le if per_element else le.sum(1).reshape(R)
        if need_dm:
            raw = e if (per_element or m is not None) else e.sum(1).reshape(R)
    # the gradients that are not requested are not formed
    g_y = None
    if need_dy:
        g_y = normalize_backward(g_yt, Yt, rstd) if normalize_target else g_yt

    if w is not None:  # excluded rows: exactly 0, whatever their data
        keep = w != 0
        out = torch.where(keep.reshape(R) if out.dim() == 1 else keep, out, 0.0)
        g_p = torch.where(keep, g_p, 0.0) if need_dp else None
        g_y = torch.where(keep, g_y, 0.0) if need_dy else None

    # outputs never alias one another (nor the inputs): distinct empties, raw cloned where shared
    msum = m.sum(1).reshape(R) if (m is not None and w is None and not per_element) else pred.new_empty(0, dtype=cdt)
    loss_out = (out.to(pred.dtype) if per_element else out).contiguous()
    dp = g_p.to(pred.dtype).contiguous() if need_dp else pred.new_empty(0)
    dy = g_y.to(pred.dtype).contiguous() if need_dy else pred.new_empty(0)
    dm = (raw.clone() if raw is out else raw.contiguous()) if need_dm else pred.new_empty(0, dtype=cdt)
    return loss_out, msum, dp, dy, dm


def masked_reconstruction_loss_autograd(
    pred: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    loss: str = "mse",
    beta: float = 1.0,
    normalize_target: bool = False,
    eps: float = 1e-6,
    channel_dim: int = -1,
    reduction: str = "mean",
) -> Tensor:
    """The eager-PyTorch loss a user writes (autograd backward): the benchmarks' baseline.

    mean = sum(M e) / sum(M) over the broadcast mask (cosine: over rows). Excluded rows are read
    (0 * NaN is NaN here), unlike the fused op.
    """
    cd = channel_dim % pred.dim()
    if normalize_target:
        mu = target.mean(cd, keepdim=True)
        var = target.var(cd, keepdim=True, unbiased=False)
        target = (target - mu) / (var + eps).sqrt()
    if loss == "cosine":
        e = 1 - F.cosine_similarity(pred, target, dim=cd, eps=COSINE_EPS)
        if mask is not None:
            mask = mask.reshape((1,) * (pred.dim() - mask.dim()) + tuple(mask.shape)).select(cd, 0)
    elif loss == "smooth_l1":
        e = F.smooth_l1_loss(pred, target, reduction="none", beta=beta)
    else:
        e = (pred - target) ** 2
    if mask is None:
        return e if reduction == "none" else e.sum() if reduction == "sum" else e.mean()
    mask = mask.to(e.dtype)
    le = e * mask
    if reduction == "none":
        return le
    if reduction == "sum":
        return le.sum()
    return le.sum() / mask.expand_as(le).sum()
