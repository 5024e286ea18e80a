"""Uni-modal ensemble (UME) and the guiding strategy that picks UME or UMT (SPEC section 4).

UME trains one model per modality on its own and combines their predictions at test time; UMT
(uni-modal teacher, :class:`mmfast.nn.UniModalTeacherLoss`) trains a late-fusion model whose
encoders are distilled from the uni-modal models. The guiding strategy: UME when the uni-modal
ensemble is at least as good as joint late-fusion training on validation data (the paired features
matter little), UMT otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mmfast import _checks
from mmfast.reference.routed_kd import compute_dtype

COMBINES = ("logits", "probs")


def _ensemble_weights(
    weights: Tensor | Sequence[float] | None, M: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """The weights as a [M] tensor of ``dtype`` on ``device``, normalised to sum 1."""
    if weights is None:
        return torch.full((M,), 1.0 / M, dtype=dtype, device=device)
    if isinstance(weights, Tensor):
        w = weights
        if not w.is_floating_point():
            raise TypeError(f"weights must be a floating-point tensor or a sequence of numbers, got {w.dtype}")
        if w.device != device:
            raise ValueError(f"weights is on {w.device} but logits_list is on {device}; move them to one device")
        if w.dim() != 1 or w.shape[0] != M:
            raise ValueError(f"weights must have one entry per model ({M}), got shape {tuple(w.shape)}")
        if _checks.value_checks_active(w):
            if bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
                raise ValueError("weights must be finite and >= 0")
            if not bool(w.sum() > 0):
                raise ValueError("weights must not all be zero")
        w = w.to(dtype)
    else:
        if not isinstance(weights, (list, tuple)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in weights
        ):
            raise TypeError(f"weights must be None, a tensor or a sequence of numbers, got {weights!r}")
        if len(weights) != M:
            raise ValueError(f"weights must have one entry per model ({M}), got {len(weights)}")
        if any(not (0.0 <= v < math.inf) for v in weights):  # comparisons: traceable with symbolic floats
            raise ValueError(f"weights must be finite and >= 0, got {list(weights)}")
        if sum(weights) <= 0:
            raise ValueError("weights must not all be zero")
        w = torch.tensor([float(v) for v in weights], dtype=dtype, device=device)
    return w / w.sum()


def unimodal_ensemble(
    logits_list: Tensor | Sequence[Tensor],
    weights: Tensor | Sequence[float] | None = None,
    combine: str = "logits",
) -> Tensor:
    """Uni-modal ensemble (UME) of M models' predictions over the last (class) dim.

    With weights w_m >= 0 normalised to sum 1 (``None``: 1/M each):
      combine="logits": returns the weighted mean of the logits, sum_m w_m z_m.
      combine="probs":  returns log(sum_m w_m softmax(z_m)), the LOG-probabilities of the weighted
                        mean of the models' probabilities (computed in log space, shifted by the largest
                        log-probability, so entries that underflow in every model keep a finite log). They
                        are valid logits: softmax of them gives the mixture back, and they plug into
                        ``cross_entropy`` or :func:`mmfast.expected_calibration_error` as they are.
                        A class that every weighted model gives probability 0 gets -inf.

    ``logits_list`` is a sequence of M same-shaped tensors [..., C] or one tensor [M, ..., C]. The result
    has the shape of one model's logits and their dtype (bf16/fp16 are combined in fp32). Weights may be
    tensors that require grad; a weight that is exactly 0 drops its model from the value (its non-finite
    logits are ignored) and still gets its exact gradient.
    """
    z = _checks.floating("logits_list", _checks.stack("logits_list", logits_list))
    _checks.choice("combine", combine, COMBINES)
    if z.dim() < 2:
        raise ValueError(f"logits_list must hold M tensors [..., C] of rank >= 1, got stacked shape {tuple(z.shape)}")
    if z.shape[-1] < 1 or z.shape[0] < 1:
        raise ValueError(f"logits_list needs M >= 1 models and C >= 1 classes, got stacked shape {tuple(z.shape)}")
    M = z.shape[0]
    cd = compute_dtype(z.dtype)
    w = _ensemble_weights(weights, M, cd, z.device)
    w_b = w.reshape((M,) + (1,) * (z.dim() - 1))
    zc = z.to(cd)
    positive = w_b > 0
    if combine == "logits":
        # a dropped model's non-finite logits must not turn 0 * inf into NaN
        z_used = torch.where(positive | torch.isfinite(zc), zc, 0.0)
        return (w_b * z_used).sum(0).to(z.dtype)
    # log sum_m w_m p_m = shift + log sum_m w_m exp(log p_m - shift), shift = max of log p_m over the models
    # with w_m > 0: every kept term is <= 1 and the largest is 1, so nothing that the math keeps finite
    # underflows to log(0). A dropped model (w_m = 0) adds w_m * exp(.) = 0 but still gets its exact
    # gradient exp(log p_m - shift) / sum (its exponent is capped so that 0 * inf cannot occur).
    log_p = torch.log_softmax(zc, dim=-1)
    log_p = torch.where(positive | ~torch.isnan(log_p), log_p, -math.inf)
    shift = torch.where(positive, log_p, -math.inf).amax(0, keepdim=True).detach()
    shift = torch.where(shift == -math.inf, 0.0, shift)
    cap = math.log(torch.finfo(cd).max) - math.log(M) - 1.0
    total = (w_b * torch.exp((log_p - shift).clamp(max=cap))).sum(0)
    empty = total == 0  # every kept model gives the class probability 0 (e.g. -inf logits): log 0 = -inf
    out = torch.where(empty, -math.inf, shift.squeeze(0) + torch.log(torch.where(empty, 1.0, total)))
    return out.to(z.dtype)


@dataclass(frozen=True)
class LateFusionChoice:
    """The guiding strategy's decision and its evidence.

    ``margin`` is how much better UME scored than joint training (positive: UME better), in the
    score's units, with the sign flipped for losses (``higher_is_better=False``).
    """

    choice: str  # "ume" (uni-modal ensemble) or "umt" (late fusion trained with uni-modal teachers)
    ume_score: float
    joint_score: float
    margin: float
    higher_is_better: bool
    tolerance: float
    rule: str


def _score(name: str, value: float | Tensor) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def choose_late_fusion(
    ume_score: float | Tensor,
    joint_score: float | Tensor,
    *,
    higher_is_better: bool = True,
    tolerance: float = 0.0,
) -> LateFusionChoice:
    """Pick UME or UMT from validation scores (SPEC section 4).

    ``ume_score`` is the uni-modal ensemble's validation score, ``joint_score`` that of naive joint
    late-fusion training (accuracy, or a loss with ``higher_is_better=False``). UME is chosen when it is
    at least as good as joint training, within ``tolerance`` >= 0 (a tie picks UME): margin >= -tolerance
    with margin = ume - joint (joint - ume for losses). Otherwise the modalities interact and UMT is
    chosen.
    """
    ume = _score("ume_score", ume_score)
    joint = _score("joint_score", joint_score)
    if not isinstance(higher_is_better, bool):
        raise TypeError(f"higher_is_better must be a bool, got {type(higher_is_better).__name__}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)):
        raise TypeError(f"tolerance must be a number, got {type(tolerance).__name__}")
    tolerance = float(tolerance)
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance}")
    margin = ume - joint if higher_is_better else joint - ume
    choice = "ume" if margin >= -tolerance else "umt"
    op = ">=" if higher_is_better else "<="
    sign = "-" if higher_is_better else "+"
    verdict = "holds" if choice == "ume" else "fails"
    rule = (
        f"UME if ume_score {op} joint_score {sign} tolerance ({'higher' if higher_is_better else 'lower'} is better): "
        f"{ume:g} {op} {joint:g} {sign} {tolerance:g} {verdict} -> {choice.upper()}"
    )
    return LateFusionChoice(choice, ume, joint, margin, higher_is_better, tolerance, rule)
