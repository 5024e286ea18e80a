"""Reference mutual (co-training) KD: per-row loss and explicit gradient.

For M models with p_i = softmax(x_i / tau), S = sum_i p_i, T = sum_i log p_i:
  R_i = sum_{k != i} KL(p_i || p_k) = sum_c p_i (M log p_i - T)
  loss_n = scale * sum_i R_i    (= scale * sum over ordered pairs i != j of KL(p_j || p_i))
  d loss_n / d x_i = scale / tau * (M p_i - S + p_i (M log p_i - T - R_i))
"""

from __future__ import annotations

import torch
from torch import Tensor

from .routed_kd import _xlogy_diff, compute_dtype


def mutual_kd_rows(
    logits: Tensor, temperature: float, scale: float, need_grad: bool
) -> tuple[Tensor, Tensor]:
    """(loss [N], grad [M, N, C]) for logits [M, N, C]; grad is empty when not requested."""
    M = logits.shape[0]
    cdt = compute_dtype(logits.dtype)
    inv_tau = 1.0 / temperature
    lp = torch.log_softmax(logits.to(cdt) * inv_tau, dim=-1)
    p = lp.exp()
    T = lp.sum(0, keepdim=True)
    R = _xlogy_diff(p, M * lp, T).sum(-1, keepdim=True)  # [M, N, 1]
    loss = R.sum(0).squeeze(-1) * scale
    if not need_grad:
        return loss, logits.new_empty(0)
    S = p.sum(0, keepdim=True)
    grad = M * p - S + torch.where(p == 0, torch.zeros_like(p), p * (M * lp - T - R))
    return loss, (grad * (scale * inv_tau)).to(logits.dtype)


def mutual_kd_loss_autograd(
    logits: Tensor, temperature: float = 1.0, t2_scale: bool = True, reduction: str = "batchmean"
) -> Tensor:
    """The eager-PyTorch loss a user writes (autograd backward): the benchmarks' baseline."""
    M = logits.shape[0]
    lp = torch.log_softmax(logits / temperature, dim=-1)
    p = lp.exp()
    rows = sum((p[j] * (lp[j] - lp[i])).sum(-1) for i in range(M) for j in range(M) if i != j)
    if not isinstance(rows, Tensor):  # M == 1
        rows = logits.new_zeros(logits.shape[1])
    if t2_scale:
        rows = rows * temperature**2
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.sum() / logits.shape[1]
