"""Reference routed teacher-mixture KD: per-row loss and explicit per-row gradients.

Canonical layout (see ``csrc/include/mmfast/params.h``): student ``x`` [B, C, S], teachers ``z``
[E, B, C, S], routing ``weights`` [B, K] with optional ``indices`` [B, K] (dense routing when
``None``: K == E, slot k is teacher k), optional row ``mask`` [B, S]. Rows are (b, s); the weights of
sample b apply to all of its S rows.

With u = x / tau, q = softmax(u), p_e = softmax(z_e / tau), the row loss is ``scale * L`` with
  mix loss:   L = sum_k w_k D(p_k || q)
  mix logits: L = D(softmax(sum_k w_k z_k / tau) || q)
  mix probs:  L = D(sum_k w_k p_k || q)
Every divergence is written through A = dL/dlog q and B = dL/dlog P (and G = dL/dP for the
probs mix); softmax chains give dL/du = A - q * sum(A) and dL/dv = B - P * sum(B).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

MIXES = {"loss": 0, "logits": 1, "probs": 2}
DIVERGENCES = {"kl": 0, "reverse_kl": 1, "js": 2, "tvd": 3}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _xlogy_diff(p: Tensor, lp: Tensor, lr: Tensor) -> Tensor:
    """p * (lp - lr), defined as 0 where p == 0 (an entry that underflows never gives NaN; a NaN stays NaN)."""
    return torch.where(p == 0, torch.zeros_like(p), p * (lp - lr))


def divergence_terms(div: int, lP: Tensor, lq: Tensor, beta: float):
    """Elementwise pieces of D(P || q) from log-probabilities.

    Returns (terms, A, B, G): D = sum_c terms, A = dD/dlog q, B = dD/dlog P, G = dD/dP.
    """
    P, q = lP.exp(), lq.exp()
    if div == 0:  # KL(P || q) = sum P (log P - log q)
        terms = _xlogy_diff(P, lP, lq)
        A = -P
        B = terms + P
        G = lP - lq + 1
    elif div == 1:  # KL(q || P)
        terms = _xlogy_diff(q, lq, lP)
        A = terms + q
        B = -q
        G = -torch.exp(lq - lP)
    elif div == 2:  # beta KL(P || M) + (1 - beta) KL(q || M), M = beta P + (1 - beta) q in log space
        lM = torch.logaddexp(lP + math.log(beta), lq + math.log1p(-beta))
        tp = _xlogy_diff(P, lP, lM)
        tq = _xlogy_diff(q, lq, lM)
        terms = beta * tp + (1 - beta) * tq
        A = (1 - beta) * tq
        B = beta * tp
        G = beta * (lP - lM)
    elif div == 3:  # 0.5 sum |P - q|
        s = torch.sign(q - P)
        terms = 0.5 * (P - q).abs()
        A = 0.5 * q * s
        B = -0.5 * P * s
        G = -0.5 * s
    else:
        raise ValueError(f"unknown divergence code {div}")
    return terms, A, B, G


def routed_kd_rows(
    x: Tensor,
    z: Tensor,
    weights: Tensor,
    indices: Tensor | None,
    mask: Tensor | None,
    temperature: float,
    mix: int,
    divergence: int,
    beta: float,
    scale: float,
    need_dx: bool,
    need_dw: bool,
    need_dz: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Row losses and row gradients: (loss [B, S], dx [B, C, S], dw [B, S, K], dz [E, B, C, S]).

    Gradients that are not requested come back as empty tensors. ``loss``/``dw`` are float32
    (float64 for float64 inputs); ``dx``/``dz`` have the logits' dtype.
    """
    B, C, S = x.shape
    E = z.shape[0]
    K = weights.shape[1]
    cdt = compute_dtype(x.dtype)
    inv_tau = 1.0 / temperature
    N = B * S
    dev = x.device

    # rows-major views [N, C] (a copy: the reference favours clarity over bytes)
    u = x.to(cdt).permute(0, 2, 1).reshape(N, C) * inv_tau
    v_all = z.to(cdt).permute(0, 1, 3, 2).reshape(E, N, C) * inv_tau
    w = weights.to(cdt).repeat_interleave(S, dim=0)  # [N, K]
    rows = torch.arange(N, device=dev)
    if indices is None:
        sel = torch.arange(K, device=dev).expand(N, K)
        bad = torch.zeros(N, dtype=torch.bool, device=dev)
    else:
        sel = indices.repeat_interleave(S, dim=0)
        bad = ((sel < 0) | (sel >= E)).any(dim=1)
        sel = sel.clamp(0, E - 1)
    v = v_all[:K] if indices is None else v_all[sel.t(), rows]  # [K, N, C]: the routed teachers of each row

    lq = torch.log_softmax(u, dim=-1)
    q = lq.exp()
    wk = w.t().unsqueeze(-1)  # [K, N, 1]
    if mix == 0:
        lp = torch.log_softmax(v, dim=-1)
        p = lp.exp()
        terms, A, Bv, _ = divergence_terms(divergence, lp, lq.expand_as(lp), beta)
        D = terms.sum(-1)  # [K, N]
        loss = (w * D.t()).sum(-1)
        A = (wk * A).sum(0)
        dw = D.t()
        dv = wk * (Bv - p * Bv.sum(-1, keepdim=True)) if need_dz else None
    elif mix == 1:
        vbar = (wk * v).sum(0)
        lP = torch.log_softmax(vbar, dim=-1)
        P = lP.exp()
        terms, A, Bv, _ = divergence_terms(divergence, lP, lq, beta)
        loss = terms.sum(-1)
        dvbar = Bv - P * Bv.sum(-1, keepdim=True)
        dw = (dvbar.unsqueeze(0) * v).sum(-1).t() if need_dw else None
        dv = wk * dvbar if need_dz else None
    elif mix == 2:
        lp = torch.log_softmax(v, dim=-1)
        p = lp.exp()
        lP = torch.logsumexp(torch.log(wk) + lp, dim=0)
        terms, A, _, G = divergence_terms(divergence, lP, lq, beta)
        loss = terms.sum(-1)
        # p * dL/dP; for reverse KL p * G = -p q / P is formed in log space (P may underflow)
        pG = -torch.exp(lp + lq - lP) if divergence == 1 else p * G
        dw = pG.sum(-1).t()
        dv = wk * (pG - p * pG.sum(-1, keepdim=True)) if need_dz else None
    else:
        raise ValueError(f"unknown mix code {mix}")

    du = A - q * A.sum(-1, keepdim=True)
    valid = ~bad if mask is None else (mask.reshape(N).bool() & ~bad)
    nan = torch.full((), float("nan"), dtype=cdt, device=dev)  # a fill kernel: capturable in CUDA graphs
    zero = torch.zeros((), dtype=cdt, device=dev)

    def finish(t: Tensor, row_dim: int) -> Tensor:
        if mask is None and indices is None:  # every row valid
            return t
        shape = [1] * t.dim()
        shape[row_dim] = N
        t = torch.where(bad.view(shape), nan, t)
        return torch.where((valid | bad).view(shape), t, zero)

    loss_rows = finish(loss * scale, 0).reshape(B, S).contiguous()
    # not-requested gradients: distinct empty tensors (op outputs must not alias each other)
    dx, dw_out, dz = x.new_empty(0), x.new_empty(0), x.new_empty(0)
    if need_dx:
        g = finish(du * (scale * inv_tau), 0)
        dx = g.reshape(B, S, C).permute(0, 2, 1).contiguous().to(x.dtype)
    if need_dw:
        dw_out = finish(dw * scale, 0).reshape(B, S, K).contiguous()
    if need_dz:
        g = finish(dv * (scale * inv_tau), 1)  # [K, N, C]
        if indices is None and K == E:  # dense routing: teacher k is slot k
            dz_rows = g
        else:
            dz_rows = torch.zeros(E, N, C, dtype=cdt, device=dev)
            dz_rows.index_put_((sel.t(), rows.expand(K, N)), g, accumulate=True)
        dz = dz_rows.reshape(E, B, S, C).permute(0, 1, 3, 2).contiguous().to(z.dtype)
    return loss_rows, dx, dw_out, dz


def routed_kd_loss_autograd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    weights: Tensor | None = None,
    *,
    indices: Tensor | None = None,
    temperature: float = 1.0,
    mix: str = "loss",
    divergence: str = "kl",
    beta: float = 0.5,
    t2_scale: bool = True,
    class_dim: int = -1,
    mask: Tensor | None = None,
    reduction: str = "batchmean",
) -> Tensor:
    """The loss as a user writes it in eager PyTorch (autograd does the backward).

    Same arguments as :func:`mmfast.routed_kd_loss` (teacher_logits stacked, no argument checks). It
    is the baseline of the benchmarks (eager and ``torch.compile``) and the naive formula the explicit
    reference is tested against.
    """
    x, z = student_logits, teacher_logits
    if class_dim == 1 and x.dim() > 2:
        x, z = x.movedim(1, -1), z.movedim(2, -1)  # [B, *sp, C], [E, B, *sp, C]
    lead = x.shape[:-1]
    E = z.shape[0]
    K = E if indices is None else indices.shape[1]
    w = weights if weights is not None else x.new_full((x.shape[0], K), 1.0 / K)
    if indices is not None:
        bidx = torch.arange(x.shape[0], device=x.device)
        z = torch.stack([z[indices[:, k], bidx] for k in range(K)])  # [K, B, ...]
    wk = w.t().reshape(K, x.shape[0], *([1] * (x.dim() - 1)))  # broadcast over pixels and classes
    lq = torch.log_softmax(x / temperature, dim=-1)
    lp = torch.log_softmax(z / temperature, dim=-1)

    def div(lP: Tensor, lQ: Tensor) -> Tensor:
        if divergence == "kl":
            return F_kl(lP, lQ)
        if divergence == "reverse_kl":
            return F_kl(lQ, lP)
        if divergence == "js":
            lM = torch.logaddexp(lP + math.log(beta), lQ + math.log1p(-beta))
            return beta * F_kl(lP, lM) + (1 - beta) * F_kl(lQ, lM)
        return 0.5 * (lP.exp() - lQ.exp()).abs().sum(-1)

    if mix == "loss":
        rows = (wk[..., 0] * div(lp, lq.unsqueeze(0))).sum(0)
    elif mix == "logits":
        rows = div(torch.log_softmax((wk * z).sum(0) / temperature, dim=-1), lq)
    else:
        rows = div(torch.logsumexp(torch.log(wk) + lp, dim=0), lq)
    if t2_scale:
        rows = rows * temperature**2
    count = rows.numel()
    if mask is not None:
        rows = torch.where(mask.reshape(lead), rows, torch.zeros_like(rows))
        count = mask.sum().clamp_min(1)
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.sum() / count


def F_kl(lP: Tensor, lQ: Tensor) -> Tensor:
    """sum_c P (log P - log Q) over the last dim, 0 where P == 0."""
    P = lP.exp()
    return torch.where(P == 0, torch.zeros_like(P), P * (lP - lQ)).sum(-1)
