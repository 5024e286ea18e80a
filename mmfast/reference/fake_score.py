"""Reference fake-score (EDM-weighted denoising) loss on generated data: per-sample loss and gradient.

Rows are samples: b (fake-score x0-prediction) and x (generated sample, stop-gradient) are [B, D] views,
lam [B] = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2.
  loss_b = scale * lam_b * sum_j (b_bj - x_bj)^2,   d loss_b / d b = scale * 2 * lam_b * (b - x)
"""

from __future__ import annotations

from torch import Tensor

from .fdiv import edm_weight
from .routed_kd import compute_dtype


def fake_score_rows(b: Tensor, x: Tensor, lam: Tensor, scale: float, need_db: bool) -> tuple[Tensor, Tensor]:
    """(loss [B] in the compute dtype, db [B, D] in b's dtype, empty when not requested)."""
    cdt = compute_dtype(b.dtype)
    e = b.to(cdt) - x.to(cdt)
    lam = lam.to(cdt)
    loss = lam * (e * e).sum(dim=1) * scale
    if not need_db:
        return loss, b.new_empty(0)
    return loss, (e * (lam * (2.0 * scale))[:, None]).to(b.dtype).contiguous()


def fake_score_loss_autograd(fake_x0: Tensor, x: Tensor, sigma: Tensor, sigma_data: float = 0.5) -> Tensor:
    """The loss as a user writes it (autograd backward): mean over the batch of lam_b * sum (b - sg x)^2."""
    lam = edm_weight(sigma, sigma_data)
    per_sample = ((fake_x0 - x.detach()) ** 2).flatten(1).sum(dim=1)
    return (lam * per_sample).mean()
