"""``RoutedKDLoss``: the routed teacher-mixture KD loss as a module."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import Tensor, nn

from mmfast import _checks
from mmfast import functional as F
from mmfast._distributed import check_process_group, deepcopy_sharing_group
from mmfast.reference.routed_kd import DIVERGENCES, MIXES

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


class RoutedKDLoss(nn.Module):
    """Module form of :func:`mmfast.routed_kd_loss` with the configuration fixed at construction.

    MST-Distill stage 3 is ``RoutedKDLoss(temperature=4.0)`` fed hard top-k routing from
    :class:`mmfast.nn.TeacherRouter`. The configuration is validated here, at construction. With
    ``process_group`` the reduction is global over the ranks (docs/distributed.md).
    """

    def __init__(
        self,
        temperature: float = 1.0,
        mix: str = "loss",
        divergence: str = "kl",
        beta: float = 0.5,
        t2_scale: bool = True,
        class_dim: int = -1,
        reduction: str = "batchmean",
        process_group: ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.temperature = _checks.positive("temperature", temperature)
        self.mix = _checks.choice("mix", mix, tuple(MIXES))
        self.divergence = _checks.choice("divergence", divergence, tuple(DIVERGENCES))
        if divergence == "js" and not (0.0 < float(beta) < 1.0):
            raise ValueError(f"beta must be in (0, 1) for divergence='js', got {beta}")
        if class_dim not in (-1, 1):
            raise ValueError(f"class_dim must be -1 ([N, C] logits) or 1 ([B, C, *spatial] logits), got {class_dim}")
        self.reduction = _checks.choice("reduction", reduction, F.REDUCTIONS)
        self.process_group = check_process_group(process_group, reduction)
        self.beta = beta
        self.t2_scale = t2_scale
        self.class_dim = class_dim

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | Sequence[Tensor],
        weights: Tensor | None = None,
        indices: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        return F.routed_kd_loss(
            student_logits, teacher_logits, weights, indices=indices, temperature=self.temperature,
            mix=self.mix, divergence=self.divergence, beta=self.beta, t2_scale=self.t2_scale,
            class_dim=self.class_dim, mask=mask, reduction=self.reduction, process_group=self.process_group,
        )

    __deepcopy__ = deepcopy_sharing_group  # the copy shares process_group

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, mix={self.mix!r}, divergence={self.divergence!r}, "
            f"t2_scale={self.t2_scale}, class_dim={self.class_dim}, reduction={self.reduction!r}"
        )
