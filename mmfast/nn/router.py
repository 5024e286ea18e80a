"""``TeacherRouter``: MST-Distill's instance-level router over E teachers."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from mmfast import _checks
from mmfast import functional as F
from mmfast._distributed import deepcopy_sharing_group


class RouterOutput(NamedTuple):
    weights: Tensor  # [N, top_k] routing weights of the selected teachers
    indices: Tensor  # [N, top_k] selected teacher ids (int64)
    probs: Tensor  # [N, E] router probabilities
    load_balance_loss: Tensor  # scalar


class TeacherRouter(nn.Module):
    """Router from the student's logits to E teachers (MST-Distill).

    pi = softmax(W2 (W1 x + b1) + b2) with Linear(C, 2C) -> Linear(2C, E) and no nonlinearity between
    them (as the reference), then top-k. ``weighting="hard"`` gives 1/k to each selected teacher (the
    router then learns only from the load-balance loss); ``"soft"`` gives the renormalised top-k
    probabilities, so the router also learns from the KD loss. The output plugs into
    :func:`mmfast.routed_kd_loss` as ``weights=out.weights, indices=out.indices``.
    """

    __deepcopy__ = deepcopy_sharing_group  # the copy shares process_group

    def __init__(
        self,
        num_classes: int,
        num_teachers: int,
        top_k: int = 1,
        weighting: str = "hard",
        load_balance: str = "kl",
        process_group=None,
    ) -> None:
        super().__init__()
        if num_classes < 1 or num_teachers < 1:
            raise ValueError(f"num_classes and num_teachers must be >= 1, got {num_classes}, {num_teachers}")
        if not 1 <= top_k <= num_teachers:
            raise ValueError(f"top_k must be in [1, num_teachers={num_teachers}], got {top_k}")
        self.weighting = _checks.choice("weighting", weighting, ("hard", "soft"))
        self.load_balance = _checks.choice("load_balance", load_balance, F.LOAD_BALANCE_MODES)
        self.num_teachers = num_teachers
        self.top_k = top_k
        self.process_group = process_group
        self.proj = nn.Linear(num_classes, 2 * num_classes)
        self.gate = nn.Linear(2 * num_classes, num_teachers)

    def forward(self, student_logits: Tensor) -> RouterOutput:
        x = _checks.floating("student_logits", _checks.tensor("student_logits", student_logits))
        if x.dim() != 2 or x.shape[1] != self.proj.in_features:
            raise ValueError(f"student_logits must be [N, {self.proj.in_features}], got {tuple(x.shape)}")
        probs = torch.softmax(self.gate(self.proj(x)), dim=-1)
        top_p, indices = probs.topk(self.top_k, dim=-1)
        if self.weighting == "hard":
            weights = torch.full_like(top_p, 1.0 / self.top_k).detach()
        else:
            weights = top_p / top_p.sum(-1, keepdim=True)
        lb = F.load_balance_loss(probs, self.load_balance, self.process_group)
        return RouterOutput(weights, indices, probs, lb)

    def extra_repr(self) -> str:
        return f"num_teachers={self.num_teachers}, top_k={self.top_k}, weighting={self.weighting!r}"
