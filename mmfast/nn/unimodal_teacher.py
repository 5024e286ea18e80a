"""UMT, the uni-modal teacher loss (SPEC section 2): late fusion trained with uni-modal feature distillation.

    L = CE(fused_logits, y) + lambda * sum_m MSE(f_m^student, sg f_m^teacher),   lambda = 10 by default

f_m^student is the late-fusion model's encoder feature of modality m, f_m^teacher that of the uni-modal
model trained on modality m alone; the widths differ between modalities. Each MSE is the mean over its
own elements (``mmfast.masked_reconstruction_loss`` with ``mask=None, loss="mse"``).

Why one call per modality rather than one launch for all: the features are separate tensors of
different widths. One launch would need them in one buffer, i.e. ``torch.cat`` of the student and of the
teacher features: that copy reads and writes every element once more (about 2x the bytes the loss itself
reads, plus a split of the gradient), while each per-modality call already reads each element once and
writes its gradient in the same pass. With M = 2-3 modalities that is M fused launches instead of the
~4M kernels of eager ``F.mse_loss`` forward+backward, and no extra memory traffic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfast import _checks
from mmfast.reconstruction import masked_reconstruction_loss


class UMTLoss(NamedTuple):
    total: Tensor  # CE + weight * distill
    cross_entropy: Tensor
    distill: Tensor  # sum_m MSE_m (before the weight)


def _features(name: str, value: Sequence[Tensor]) -> list[Tensor]:
    if isinstance(value, Tensor) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of tensors (one per modality), got {type(value).__name__}")
    if len(value) < 1:
        raise ValueError(f"{name} must hold at least one modality's features")
    for i, t in enumerate(value):
        _checks.floating(f"{name}[{i}]", _checks.tensor(f"{name}[{i}]", t))
    return list(value)


def unimodal_teacher_loss(
    fused_logits: Tensor,
    labels: Tensor,
    student_features: Sequence[Tensor],
    teacher_features: Sequence[Tensor],
    *,
    weight: float = 10.0,
    return_parts: bool = False,
) -> Tensor | UMTLoss:
    """UMT loss CE(fused_logits, labels) + weight * sum_m MSE(student_features[m], sg teacher_features[m]).

    Args:
        fused_logits: [N, C] logits of the late-fusion model.
        labels: [N] integer class ids in [0, C).
        student_features: one tensor per modality ([N, D_m] or [N, D_m, *spatial]); widths may differ.
        teacher_features: the uni-modal teachers' features, shaped like ``student_features``; detached
            (no gradient reaches the teachers).
        weight: lambda >= 0.
        return_parts: also return the CE and the unweighted distillation term (a :class:`UMTLoss`).
    """
    x = _checks.floating("fused_logits", _checks.tensor("fused_logits", fused_logits))
    _checks.tensor("labels", labels)
    if x.dim() != 2 or x.shape[1] < 1:
        raise ValueError(f"fused_logits must be [N, C] with C >= 1, got shape {tuple(x.shape)}")
    N, C = x.shape
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of class ids, got {labels.dtype}")
    if labels.shape != (N,):
        raise ValueError(f"labels must be [{N}] (one class id per row of fused_logits), got {tuple(labels.shape)}")
    _checks.same_device(("fused_logits", "labels"), (x, labels))
    if isinstance(weight, Tensor):
        raise TypeError("weight must be a Python number, not a tensor")
    weight = float(weight)
    # comparisons only (no math.isfinite): under torch.compile a changing weight becomes a symbolic float
    if not (0.0 <= weight < math.inf):
        raise ValueError(f"weight must be a finite number >= 0, got {weight}")
    students = _features("student_features", student_features)
    teachers = _features("teacher_features", teacher_features)
    if len(students) != len(teachers):
        raise ValueError(
            f"student_features and teacher_features must list the same modalities, got {len(students)} and "
            f"{len(teachers)} tensors"
        )
    for m, (s, t) in enumerate(zip(students, teachers, strict=True)):
        if s.shape != t.shape:
            raise ValueError(
                f"student_features[{m}] and teacher_features[{m}] must have one shape, got {tuple(s.shape)} "
                f"and {tuple(t.shape)}"
            )
        if s.dtype != t.dtype:
            raise TypeError(f"teacher_features[{m}] dtype {t.dtype} must match student_features[{m}] dtype {s.dtype}")
        if s.dim() < 2 or s.shape[0] != N:
            raise ValueError(
                f"student_features[{m}] must be [N={N}, D_m] or [N={N}, D_m, *spatial], got {tuple(s.shape)}"
            )
        _checks.same_device(("fused_logits", f"student_features[{m}]", f"teacher_features[{m}]"), (x, s, t))
    if _checks.value_checks_active(labels) and N and bool(((labels < 0) | (labels >= C)).any()):
        raise ValueError(f"labels must be in [0, {C}) (C = number of classes); found one out of range")

    ce = F.cross_entropy(x, labels)
    distill = None
    for s, t in zip(students, teachers, strict=True):
        mse = masked_reconstruction_loss(s, t.detach(), loss="mse", channel_dim=1 if s.dim() > 2 else -1)
        distill = mse if distill is None else distill + mse
    total = ce + weight * distill
    return UMTLoss(total, ce, distill) if return_parts else total


class UniModalTeacherLoss(nn.Module):
    """Module form of :func:`mmfast.unimodal_teacher_loss`:
    CE(fused_logits, y) + weight * sum_m MSE(f_m^student, sg f_m^teacher), weight = 10 by default."""

    def __init__(self, weight: float = 10.0) -> None:
        super().__init__()
        if isinstance(weight, Tensor):
            raise TypeError("weight must be a Python number, not a tensor")
        weight = float(weight)
        if not (0.0 <= weight < math.inf):
            raise ValueError(f"weight must be a finite number >= 0, got {weight}")
        self.weight = weight

    def forward(
        self,
        fused_logits: Tensor,
        labels: Tensor,
        student_features: Sequence[Tensor],
        teacher_features: Sequence[Tensor],
        return_parts: bool = False,
    ) -> Tensor | UMTLoss:
        return unimodal_teacher_loss(
            fused_logits, labels, student_features, teacher_features, weight=self.weight, return_parts=return_parts
        )

    def extra_repr(self) -> str:
        return f"weight={self.weight}"
