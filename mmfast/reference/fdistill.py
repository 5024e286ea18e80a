"""Reference f-distill (DMD-form) generator loss: per-sample loss and explicit gradient.

Rows are samples: x, a (teacher x0-prediction), b (fake-score x0-prediction) are [B, D] views, h [B].
  m_b = (1/D) sum_j |x_bj - a_bj|,   w_b = h_b / (m_b + 1e-6),   g = (b - a) * w_b
  loss_b = scale * 0.5 * sum_j g_bj^2,   d loss_b / d x = scale * g
(the DMD surrogate 0.5 * ||x - sg(x - g)||^2: a, b and h are stop-gradient, only x gets a gradient).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .routed_kd import compute_dtype

EPS = 1e-6


def fdistill_rows(
    x: Tensor, a: Tensor, b: Tensor, h: Tensor, scale: float, need_dx: bool
) -> tuple[Tensor, Tensor]:
    """(loss [B] in the compute dtype, dx [B, D] in x's dtype, empty when not requested)."""
    cdt = compute_dtype(x.dtype)
    xc, ac, bc = x.to(cdt), a.to(cdt), b.to(cdt)
    m = (xc - ac).abs().sum(dim=1) / x.shape[1]
    w = h.to(cdt) / (m + EPS)
    g = (bc - ac) * w[:, None]
    loss = 0.5 * (g * g).sum(dim=1) * scale
    if not need_dx:
        return loss, x.new_empty(0)
    return loss, (g * scale).to(x.dtype).contiguous()


def fdistill_loss_autograd(x: Tensor, teacher_x0: Tensor, fake_x0: Tensor, h: Tensor) -> Tensor:
    """The loss as a user writes it in PyTorch (autograd backward): the benchmarks' baseline.

    0.5 * mean over all elements of (x - sg(x - g))^2.
    """
    with torch.no_grad():
        dims = tuple(range(1, x.dim()))
        m = (x - teacher_x0).abs().mean(dim=dims, keepdim=True)
        w = h.reshape(-1, *([1] * (x.dim() - 1))) / (m + EPS)
        g = (fake_x0 - teacher_x0) * w
    target = (x - g).to(x.dtype).detach()  # mse_loss wants one dtype (a bf16 x with an fp32 h fails on CUDA)
    return 0.5 * torch.nn.functional.mse_loss(x, target, reduction="mean")
