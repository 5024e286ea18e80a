"""``RoutedKDLoss``: the routed teacher-mixture KD loss as a module."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from mmfast import functional as F


class RoutedKDLoss(nn.Module):
    """Module form of :func:`mmfast.routed_kd_loss` with the configuration fixed at construction.

    MST-Distill stage 3 is ``RoutedKDLoss(temperature=4.0)`` fed hard top-k routing from
    :class:`mmfast.nn.TeacherRouter`.
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
    ) -> None:
        super().__init__()
        self.temperature = temperature
        self.mix = mix
        self.divergence = divergence
        self.beta = beta
        self.t2_scale = t2_scale
        self.class_dim = class_dim
        self.reduction = reduction

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
            class_dim=self.class_dim, mask=mask, reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, mix={self.mix!r}, divergence={self.divergence!r}, "
            f"t2_scale={self.t2_scale}, class_dim={self.class_dim}, reduction={self.reduction!r}"
        )
