"""Reference Uni-Instruct (SiD-family) generator loss: per-sample loss and explicit gradients.

Rows are samples: x (generator sample), a (teacher x0-prediction), b (fake-score x0-prediction) are [B, D]
views; coef [B, 3] holds (lambda_sim, lambda_fgm, lambda_di) of each sample. With
  d = a - b,   u = (a - x) - alpha * d,   wf_b = max((1/D) sum_j |x_bj - a_bj|, 1e-5)   (no gradient)
  n_b = sqrt(sum_j d_bj^2) per sample, or one given norm for the whole batch (no gradient)
  loss_b = scale / wf_b * (lam_sim sum_j d u  +  [fgm] lam_fgm sum_j d^2  +  [di] lam_di n_b sum_j x d)
  dx = scale / wf_b * (-lam_sim d + [di] lam_di n_b d)
  da = scale / wf_b * (lam_sim (u + (1 - alpha) d) + [fgm] 2 lam_fgm d)
  db = scale / wf_b * (lam_sim (alpha d - u)        - [fgm] 2 lam_fgm d)
The DI term's (a - b) and n_b are stop-gradient. A switched-off term is not evaluated.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .fdiv import fdiv_coefficients
from .routed_kd import compute_dtype

WF_MIN = 1e-5


def uni_instruct_rows(
    x: Tensor,
    a: Tensor,
    b: Tensor,
    coef: Tensor,
    di_norm: Tensor | None,
    alpha: float,
    scale: float,
    fgm: bool,
    di: bool,
    need_dx: bool,
    need_da: bool,
    need_db: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss [B] in the compute dtype, dx, da, db [B, D] in the inputs' dtype; each empty when not requested)."""
    cdt = compute_dtype(x.dtype)
    xc, ac, bc = x.to(cdt), a.to(cdt), b.to(cdt)
    coef = coef.to(cdt)
    lam_sim, lam_fgm, lam_di = coef[:, 0], coef[:, 1], coef[:, 2]
    d = ac - bc
    u = (ac - xc) - alpha * d
    wf = torch.clamp_min((xc - ac).abs().sum(dim=1) / x.shape[1], WF_MIN)
    c = scale / wf
    loss = lam_sim * (d * u).sum(dim=1)
    if fgm:
        loss = loss + lam_fgm * (d * d).sum(dim=1)
    di_coef = None
    if di:
        n = torch.sqrt((d * d).sum(dim=1)) if di_norm is None else di_norm.to(cdt).reshape(1).expand(x.shape[0])
        di_coef = lam_di * n
        loss = loss + di_coef * (xc * d).sum(dim=1)
    loss = loss * c
    dx, da, db = x.new_empty(0), a.new_empty(0), b.new_empty(0)  # distinct: op outputs must not alias
    if need_dx:
        k = -lam_sim if di_coef is None else di_coef - lam_sim
        dx = (d * (k * c)[:, None]).to(x.dtype)
    if need_da or need_db:
        cs = (lam_sim * c)[:, None]
        f2 = (2.0 * lam_fgm * c)[:, None] if fgm else None
        if need_da:
            ga = cs * (u + (1.0 - alpha) * d)
            if f2 is not None:
                ga = ga + f2 * d
            da = ga.to(a.dtype)
        if need_db:
            gb = cs * (alpha * d - u)
            if f2 is not None:
                gb = gb - f2 * d
            db = gb.to(b.dtype)
    return loss, dx, da, db


def uni_instruct_loss_autograd(
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
    """The loss as a user writes it in PyTorch (autograd backward): the benchmarks' baseline.

    Sum over the non-batch elements of the per-element terms, then mean over the batch ("mean"),
    sum ("sum") or per sample ("none").
    """
    shape = (-1, *([1] * (x.dim() - 1)))
    dims = tuple(range(1, x.dim()))
    lam_sim, lam_fgm, lam_di = (c.reshape(shape) for c in fdiv_coefficients(ratio.detach(), divergence))
    a, b = teacher_x0, fake_x0
    wf = (x - a).abs().mean(dim=dims, keepdim=True).clamp_min(WF_MIN).detach()
    d = a - b
    terms = lam_sim * d * ((a - x) - alpha * d) / wf
    if fgm:
        terms = terms + lam_fgm * d * d / wf
    if di:
        dd = d.detach()
        n = dd.flatten(1).norm(dim=1).reshape(shape) if di_norm == "sample" else dd.norm()
        terms = terms + lam_di * x * (dd * n) / wf
    rows = terms.flatten(1).sum(dim=1)
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.mean()
