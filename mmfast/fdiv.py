"""f-divergence score distillation (Uni-Instruct, f-distill; SPEC section 3): the public functions.

Thin by design: argument checks, [B, D] row views without copies, per-sample coefficients, the fused op,
and the reduction. The math lives in ``mmfast/reference/{fdiv,fdistill,uni_instruct,fake_score}.py``.

Notation: x = G(z) the generator's sample [B, ...]; a = teacher_x0, the teacher's x0-prediction at
x_t = x + sigma * eps; b = fake_x0, the fake-score network's x0-prediction at x_t; r the density ratio
p / q per sample [B] (from a discriminator, see ``density_ratio``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mmfast import _checks
from mmfast.ops import fake_score as fake_score_ops
from mmfast.ops import fdistill as fdistill_ops
from mmfast.ops import uni_instruct as uni_instruct_ops
from mmfast.reference import fdiv as fdiv_math
from mmfast.reference.routed_kd import compute_dtype

DIVERGENCES = tuple(fdiv_math.DIVERGENCES)
REDUCTIONS = ("mean", "sum", "none")
DI_NORMS = ("sample", "batch")

__all__ = [
    "DIVERGENCES",
    "density_ratio",
    "discriminator_loss",
    "fake_score_loss",
    "fdistill_loss",
    "fdiv_coefficients",
    "fdiv_weight",
    "uni_instruct_loss",
]


# ----------------------------------------------------------------------------------------------
# argument checks and [B, D] row views
# ----------------------------------------------------------------------------------------------


def _dense_in_order(t: Tensor, order: list[int]) -> bool:
    """True when the dims ``order`` (outermost first) of ``t`` form one dense block (size-1 dims ignored)."""
    expected = 1
    for d in reversed(order):
        if t.shape[d] == 1:
            continue
        if t.stride(d) != expected:
            return False
        expected *= t.shape[d]
    return True


def _sample_order(t: Tensor) -> list[int] | None:
    """A permutation of the non-batch dims of ``t`` under which they are one dense block (the identity
    for contiguous tensors; e.g. (2, 3, 1) for channels_last), or None when no permutation is."""
    dims = list(range(1, t.dim()))
    if _dense_in_order(t, dims):
        return dims
    by_stride = sorted((d for d in dims if t.shape[d] != 1), key=lambda d: -t.stride(d))
    order = by_stride + [d for d in dims if t.shape[d] == 1]
    return order if _dense_in_order(t, order) else None


def _rows(t: Tensor, order: list[int], B: int, D: int) -> Tensor:
    """[B, D] view of ``t`` with the non-batch dims taken in ``order`` (no copy when they are dense in that
    order, else one copy). Autograd maps the [B, D] gradient back to ``t``'s shape and layout."""
    p = t.permute(0, *order)
    rows = p.view(B, D) if _dense_in_order(t, order) else p.reshape(B, D)
    if B > 1 and rows.stride(0) < D:  # rows overlap (e.g. broadcast over the batch): give each its own
        rows = rows.contiguous()
    return rows


def _check_samples(names: tuple[str, ...], tensors: tuple[Tensor, ...]) -> tuple[int, int]:
    """Type, dtype, shape and device checks of same-shaped [B, ...] tensors; returns (B, D)."""
    first_name, first = names[0], tensors[0]
    for name, t in zip(names, tensors, strict=True):
        _checks.floating(name, _checks.tensor(name, t))
    if first.dim() < 1:
        raise ValueError(f"{first_name} must be [B, ...] (a batch of samples), got a 0-d tensor")
    for name, t in zip(names[1:], tensors[1:], strict=True):
        if t.shape != first.shape:
            raise ValueError(f"{name} must have the shape of {first_name} {tuple(first.shape)}, got {tuple(t.shape)}")
        if t.dtype != first.dtype:
            raise TypeError(f"{name} dtype {t.dtype} must match {first_name} dtype {first.dtype}")
    _checks.same_device(names, tensors)
    B = first.shape[0]
    D = math.prod(first.shape[1:])
    if B < 1 or D < 1:
        raise ValueError(f"{first_name} must have at least one sample and one element per sample, "
                         f"got shape {tuple(first.shape)}")
    return B, D


def _sample_views(tensors: tuple[Tensor, ...], B: int, D: int) -> tuple[Tensor, ...]:
    """[B, D] views of the tensors in the first one's layout (others are brought to it, copying only when needed)."""
    first = tensors[0]
    if first.dim() == 1:
        return tuple(t.view(B, 1) for t in tensors)
    if all(t.is_contiguous() for t in tensors):  # the common case: the rows are already dense, as is
        return tuple(t if t.dim() == 2 else t.view(B, D) for t in tensors)
    order = _sample_order(first)
    if order is None:  # not dense in any order (e.g. a strided slice): one contiguous copy
        order = list(range(1, first.dim()))
    return tuple(_rows(t, order, B, D) for t in tensors)


def _per_sample(name: str, t: Tensor, B: int, device: torch.device, cdt: torch.dtype, positive: bool) -> Tensor:
    """A [B] floating tensor (detached) in the compute dtype, contiguous; optional eager check of > 0."""
    _checks.floating(name, _checks.tensor(name, t))
    if t.shape != (B,):
        raise ValueError(f"{name} must be [B] = [{B}] (one value per sample), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}; move them to one device")
    if positive and _checks.value_checks_active(t) and bool((t <= 0).any()):
        raise ValueError(f"{name} must be > 0 for every sample (found a non-positive entry)")
    return t.detach().to(cdt).contiguous()


def _check_reduction(reduction: str) -> str:
    return _checks.choice("reduction", reduction, REDUCTIONS)


def _finish(loss_rows: Tensor, reduction: str, dtype: torch.dtype) -> Tensor:
    """Loss rows already carry the reduction's scale: sum them unless reduction is "none"."""
    return (loss_rows if reduction == "none" else loss_rows.sum()).to(dtype)


def _needs(*tensors: Tensor) -> tuple[bool, ...]:
    grad_on = torch.is_grad_enabled()
    return tuple(grad_on and t.requires_grad for t in tensors)


# ----------------------------------------------------------------------------------------------
# per-sample math
# ----------------------------------------------------------------------------------------------


def density_ratio(
    logits: Tensor, logit_clamp: float = 10.0, ratio_min: float = 0.1, ratio_max: float = 20.0
) -> Tensor:
    """Density ratio r = p_teacher / q_generator per sample from discriminator logits (detached).

    r = clamp(exp(clamp(mean_k logit_k, -logit_clamp, logit_clamp)), ratio_min, ratio_max); ``logits`` is
    [B] or [B, K] (K patches or heads, averaged). Returns [B] in float32 (float64 for float64 logits);
    NaN logits give NaN.
    """
    z = _checks.floating("logits", _checks.tensor("logits", logits))
    if z.dim() not in (1, 2):
        raise ValueError(f"logits must be [B] or [B, K] (K patches or heads), got shape {tuple(z.shape)}")
    if z.shape[0] < 1 or (z.dim() == 2 and z.shape[1] < 1):
        raise ValueError(f"logits must have at least one sample (and one head), got shape {tuple(z.shape)}")
    logit_clamp = _checks.positive("logit_clamp", logit_clamp)
    ratio_min = _checks.positive("ratio_min", ratio_min)
    ratio_max = _checks.positive("ratio_max", ratio_max)
    if ratio_max < ratio_min:
        raise ValueError(f"ratio_max ({ratio_max}) must be >= ratio_min ({ratio_min})")
    return fdiv_math.density_ratio(z, logit_clamp, ratio_min, ratio_max)


def _check_ratio(name: str, r: Tensor) -> Tensor:
    _checks.floating(name, _checks.tensor(name, r))
    if _checks.value_checks_active(r) and bool((r <= 0).any()):
        raise ValueError(f"{name} must be > 0 (found a non-positive entry)")
    return r


def fdiv_weight(r: Tensor, divergence: str) -> Tensor:
    """The f-divergence weight h(r) = r^2 f''(r), elementwise (any shape, r > 0):

    reverse_kl 1, softened_reverse_kl 1/(1+r), js r/(1+r), squared_hellinger sqrt(r)/2, kl r,
    jeffreys 1+r, neyman_chi2 2/r, pearson_chi2 2r^2.
    """
    fdiv_math.check_divergence(divergence)
    return fdiv_math.fdiv_weight(_check_ratio("r", r), divergence)


def fdiv_coefficients(r: Tensor, divergence: str) -> tuple[Tensor, Tensor, Tensor]:
    """Uni-Instruct's coefficients (lambda_sim, lambda_fgm, lambda_di) = (h, h - r h', -r^2 h''), elementwise.

    Closed forms per divergence: reverse_kl (1, 1, 0); softened_reverse_kl (1/(1+r), (1+2r)/(1+r)^2,
    -2r^2/(1+r)^3); js (r/(1+r), r^2/(1+r)^2, 2r^2/(1+r)^3); squared_hellinger (sqrt(r)/2, sqrt(r)/4,
    sqrt(r)/8); kl (r, 0, 0); jeffreys (1+r, 1, 0); neyman_chi2 (2/r, 4/r, -4/r); pearson_chi2 (2r^2, -2r^2,
    -4r^2).
    """
    fdiv_math.check_divergence(divergence)
    return fdiv_math.fdiv_coefficients(_check_ratio("r", r), divergence)


# ----------------------------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------------------------


def fdistill_loss(x: Tensor, teacher_x0: Tensor, fake_x0: Tensor, h: Tensor, reduction: str = "mean") -> Tensor:
    """f-distill generator loss (DMD form): per sample w_b = h_b / (mean_j |x_bj - a_bj| + 1e-6),
    g = (b - a) * w_b, loss = 0.5 * mean over all elements of (x - sg(x - g))^2, so d loss / dx = g / numel.

    Only x gets a gradient (teacher_x0, fake_x0 and h are stop-gradient). ``h`` [B] > 0 is the per-sample
    weight, e.g. ``fdiv_weight(density_ratio(logits), divergence)`` normalised by its batch mean.
    ``reduction``: "mean" (over all elements, as above), "sum" (over all elements) or "none" ([B]: each
    sample's mean over its elements; their mean is the "mean" loss). x may have any dense layout
    (contiguous, channels_last, ...); the gradient comes back in x's layout.
    """
    B, D = _check_samples(("x", "teacher_x0", "fake_x0"), (x, teacher_x0, fake_x0))
    _check_reduction(reduction)
    cdt = compute_dtype(x.dtype)
    hc = _per_sample("h", h, B, x.device, cdt, positive=True)
    x2, a2, b2 = _sample_views((x, teacher_x0, fake_x0), B, D)
    scale = {"mean": 1.0 / (B * D), "sum": 1.0, "none": 1.0 / D}[reduction]
    (need_dx,) = _needs(x)
    loss_rows, _ = fdistill_ops.run_fdistill_fwd(x2, a2.detach(), b2.detach(), hc, scale, need_dx, True)
    return _finish(loss_rows, reduction, x.dtype)


def _uni_instruct(
    x: Tensor,
    teacher_x0: Tensor,
    fake_x0: Tensor,
    coef: Tensor,
    B: int,
    D: int,
    alpha: float,
    fgm: bool,
    di: bool,
    di_norm: str,
    reduction: str,
) -> Tensor:
    """The Uni-Instruct loss from checked inputs and per-sample coefficients coef [B, 3] (compute dtype)."""
    x2, a2, b2 = _sample_views((x, teacher_x0, fake_x0), B, D)
    cdt = coef.dtype
    norm = None
    if di and di_norm == "batch":  # one norm of (a - b) over the whole batch, on device, no gradient
        with torch.no_grad():
            norm = torch.linalg.vector_norm(a2.to(cdt) - b2.to(cdt)).reshape(1)
    scale = 1.0 / B if reduction == "mean" else 1.0
    loss_rows, _, _, _ = uni_instruct_ops.run_uni_instruct_fwd(
        x2, a2, b2, coef, norm, float(alpha), scale, bool(fgm), bool(di),
        uni_instruct_ops.grad_mask(*_needs(x, teacher_x0, fake_x0), consume_grads=True),
    )
    return _finish(loss_rows, reduction, x.dtype)


def _check_uni_instruct_args(alpha: float, fgm: bool, di: bool, di_norm: str, reduction: str) -> float:
    if isinstance(alpha, Tensor):
        raise TypeError("alpha must be a Python number, not a tensor")
    alpha = float(alpha)
    # comparisons only (no math.isfinite): under torch.compile a changing alpha becomes a symbolic float
    if not (0.0 <= alpha < math.inf):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha}")
    for name, flag in (("fgm", fgm), ("di", di)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    _checks.choice("di_norm", di_norm, DI_NORMS)
    _check_reduction(reduction)
    return alpha


def uni_instruct_loss(
    x: Tensor,
    teacher_x0: Tensor,
    fake_x0: Tensor,
    ratio: Tensor,
    divergence: str = "kl",
    alpha: float = 1.0,
    fgm: bool = False,
    di: bool = True,
    di_norm: str = "sample",
    reduction: str = "mean",
) -> Tensor:
    """Uni-Instruct generator loss (SiD-family form). With d = a - b, wf_b = max(mean_j |x_bj - a_bj|, 1e-5)
    (detached) and (lambda_sim, lambda_fgm, lambda_di) = ``fdiv_coefficients(ratio, divergence)``, per element:

      lambda_sim * d * ((a - x) - alpha * d) / wf      (score-implicit term; gradients to x, a, b)
    + [fgm] lambda_fgm * d^2 / wf                       (gradients to a, b)
    + [di]  lambda_di * x * sg(d * ||d_b||) / wf        (gradient to x only)

    ``di_norm``: "sample" takes ||a_b - b_b|| per sample; "batch" one norm over the whole batch (the
    released reference's behaviour). ``reduction``: "mean" = sum over each sample's elements, mean over the
    batch; "sum"; "none" -> [B]. ``ratio`` [B] > 0 is detached. teacher_x0 and fake_x0 get gradients when
    they require grad (the networks' outputs depend on the generator through x_t).
    """
    return _uni_instruct_loss(x, teacher_x0, fake_x0, ratio, divergence, alpha, fgm, di, di_norm, reduction)


def _uni_instruct_loss(
    x: Tensor,
    teacher_x0: Tensor,
    fake_x0: Tensor,
    ratio: Tensor,
    divergence: str,
    alpha: float,
    fgm: bool,
    di: bool,
    di_norm: str,
    reduction: str,
    h_normalizer=None,
) -> Tensor:
    """``uni_instruct_loss``; ``h_normalizer(h) -> 0-d tensor`` (e.g. the batch mean of h) divides the
    three coefficients when given (``mmfast.nn.UniInstructLoss(normalize=True)``)."""
    B, D = _check_samples(("x", "teacher_x0", "fake_x0"), (x, teacher_x0, fake_x0))
    fdiv_math.check_divergence(divergence)
    alpha = _check_uni_instruct_args(alpha, fgm, di, di_norm, reduction)
    r = _per_sample("ratio", ratio, B, x.device, compute_dtype(x.dtype), positive=True)
    coef = torch.stack(fdiv_math.fdiv_coefficients(r, divergence), dim=1)
    if h_normalizer is not None:
        coef = coef / h_normalizer(coef[:, 0])
    return _uni_instruct(x, teacher_x0, fake_x0, coef, B, D, alpha, fgm, di, di_norm, reduction)


def fake_score_loss(
    fake_x0: Tensor, x: Tensor, sigma: Tensor, sigma_data: float = 0.5, reduction: str = "mean"
) -> Tensor:
    """EDM-weighted denoising loss of the fake-score network on generated samples:
    lambda_b = (sigma_b^2 + sigma_data^2) / (sigma_b * sigma_data)^2, loss = mean over the batch of
    lambda_b * sum_j (b_bj - sg(x_bj))^2 ("sum": sum over the batch; "none": [B]). Only fake_x0 gets a gradient.
    """
    B, D = _check_samples(("fake_x0", "x"), (fake_x0, x))
    _check_reduction(reduction)
    sigma_data = _checks.positive("sigma_data", sigma_data)
    cdt = compute_dtype(fake_x0.dtype)
    s = _per_sample("sigma", sigma, B, fake_x0.device, cdt, positive=True)
    lam = fdiv_math.edm_weight(s, sigma_data)
    b2, x2 = _sample_views((fake_x0, x), B, D)
    scale = 1.0 / B if reduction == "mean" else 1.0
    (need_db,) = _needs(fake_x0)
    loss_rows, _ = fake_score_ops.run_fake_score_fwd(b2, x2.detach(), lam, scale, need_db, True)
    return _finish(loss_rows, reduction, fake_x0.dtype)


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Discriminator loss for the density ratio: mean softplus(-real_logits) + mean softplus(fake_logits)
    (binary cross-entropy with teacher samples labelled 1 and generator samples 0)."""
    real = _checks.floating("real_logits", _checks.tensor("real_logits", real_logits))
    fake = _checks.floating("fake_logits", _checks.tensor("fake_logits", fake_logits))
    if real.numel() == 0 or fake.numel() == 0:
        raise ValueError("real_logits and fake_logits must be non-empty")
    _checks.same_device(("real_logits", "fake_logits"), (real, fake))
    return F.softplus(-real).mean() + F.softplus(fake).mean()
