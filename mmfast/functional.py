"""Functional losses: argument checks, canonical views, the fused op, and the reduction.

Thin by design: the math lives in ``mmfast/reference`` (the oracle) and the kernels; this module
validates, builds strided views without copies, and reduces the per-row loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mmfast import _checks
from mmfast._distributed import all_reduce_sum, check_process_group, global_mean
from mmfast.ops import mutual_kd as mutual_kd_ops
from mmfast.ops import routed_kd as routed_kd_ops
from mmfast.reference.routed_kd import DIVERGENCES, MIXES, compute_dtype

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

REDUCTIONS = ("batchmean", "sum", "none")
LOAD_BALANCE_MODES = ("kl", "cv")


def _reduce(
    loss_rows: Tensor, reduction: str, count: Tensor | int, out_shape, dtype, process_group=None
) -> Tensor:
    """``none``: the rows; ``sum``; ``batchmean``: sum / count. With ``process_group`` the sum and the
    count are taken over all ranks: every rank returns the same, global value."""
    if reduction == "none":
        return loss_rows.reshape(out_shape).to(dtype)
    total = loss_rows.sum()
    if reduction == "sum":
        return all_reduce_sum(total, process_group).to(dtype)
    if process_group is not None:
        return global_mean(total, count, process_group).to(dtype)
    return (total / count).to(dtype)


def _folded_mean(reduction: str, count: Tensor | int, process_group: ProcessGroup | None) -> float | None:
    """1 / count when the ``batchmean`` can ride in the forward op's ``scale``: a local mean over a row count
    known on the host. The loss is then the plain sum of the rows, and ``loss.backward()`` hands the op's
    backward a gradient of all ones, which makes no pass over the forward's gradients (mmfast/ops/_grad_scaling.py)."""
    if reduction == "batchmean" and process_group is None and isinstance(count, int) and count > 0:
        return 1.0 / count
    return None


def routed_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | Sequence[Tensor],
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
    process_group: ProcessGroup | None = None,
) -> Tensor:
    """Routed teacher-mixture KD loss (MST-Distill; SPEC section 1).

    With q = softmax(x / tau) and p_e = softmax(z_e / tau), per row n:
      mix="loss":   l_n = sum_e w_ne D(p_e || q)
      mix="logits": l_n = D(softmax(sum_e w_ne z_e / tau) || q)
      mix="probs":  l_n = D(sum_e w_ne p_e || q)
    D is ``kl`` (teacher || student), ``reverse_kl``, ``js`` (with ``beta``) or ``tvd``; the loss is
    multiplied by tau^2 when ``t2_scale``. Reduction ``batchmean`` = sum over valid rows / their count.

    Args:
        student_logits: [N, C], or [B, C, *spatial] with ``class_dim=1`` (rows are pixels).
        teacher_logits: [E, *student_logits.shape] or a sequence of E tensors shaped like the student.
        weights: routing weights >= 0, [N, E] ([B, E] for dense logits), or [N, K] with ``indices``.
            ``None`` means 1/E for every teacher (1/K on each selected teacher with ``indices``).
        indices: sparse routing, [N, K] (or [B, K]) int64 teacher ids; only those teachers are read.
        mask: bool, the student's shape without the class dim; False rows contribute nothing and are
            not counted.
        reduction: ``batchmean``, ``sum`` or ``none`` (per-row loss, [N] or [B, *spatial]).
        process_group: a ``torch.distributed`` group (e.g. ``dist.group.WORLD``): the sum and the count
            of valid rows are all-reduced, so every rank returns the loss of the concatenated batch
            (a global batchmean), and DDP / FSDP, which average gradients over the ranks, give the
            single-process gradients (docs/distributed.md). Not with ``reduction="none"``.
    """
    x = _checks.floating("student_logits", _checks.tensor("student_logits", student_logits))
    z = _checks.floating("teacher_logits", _checks.stack("teacher_logits", teacher_logits))
    _checks.choice("mix", mix, tuple(MIXES))
    _checks.choice("divergence", divergence, tuple(DIVERGENCES))
    _checks.choice("reduction", reduction, REDUCTIONS)
    process_group = check_process_group(process_group, reduction)
    temperature = _checks.positive("temperature", temperature)
    if divergence == "js" and not (0.0 < float(beta) < 1.0):
        raise ValueError(f"beta must be in (0, 1) for divergence='js', got {beta}")
    if z.dtype != x.dtype:
        raise TypeError(f"teacher_logits dtype {z.dtype} must match student_logits dtype {x.dtype}")

    # canonical strided views: x [B, C, S], z [E, B, C, S]
    if x.dim() < 2:
        raise ValueError(f"student_logits must be [N, C] or [B, C, *spatial], got shape {tuple(x.shape)}")
    if x.dim() == 2 and class_dim in (-1, 1):
        (B, C), S, row_shape = x.shape, 1, (x.shape[0],)
        x3, z_expect = x.unsqueeze(-1), x.shape
    elif class_dim == 1 and x.dim() >= 3:
        B, C = x.shape[:2]
        row_shape = (B, *x.shape[2:])
        S = math.prod(x.shape[2:])
        x3, z_expect = x.reshape(B, C, S), x.shape
    elif class_dim in (-1, x.dim() - 1):
        raise ValueError(
            f"student_logits must be [N, C] for class_dim=-1, got shape {tuple(x.shape)}; "
            "use class_dim=1 for dense logits [B, C, *spatial]"
        )
    else:
        raise ValueError(f"class_dim must be -1 ([N, C] logits) or 1 ([B, C, *spatial] logits), got {class_dim}")
    if C < 1 or B < 1:
        raise ValueError(f"student_logits must have at least one row and one class, got shape {tuple(x.shape)}")
    if z.dim() != x.dim() + 1 or z.shape[1:] != z_expect:
        what = "N or C" if x.dim() == 2 else "B, C or spatial dims"
        raise ValueError(
            f"teacher_logits must be [E, {', '.join(map(str, z_expect))}] (mismatched {what}), got {tuple(z.shape)}"
        )
    E = z.shape[0]
    z4 = z.unsqueeze(-1) if x.dim() == 2 else z.reshape(E, B, C, S)

    if indices is not None:
        _checks.tensor("indices", indices)
        if indices.dtype in (torch.bool,) or indices.is_floating_point() or indices.is_complex():
            raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
        if indices.dim() != 2 or indices.shape[0] != B:
            raise ValueError(f"indices must be [{B}, K], got {tuple(indices.shape)}")
        K = indices.shape[1]
        if K < 1:
            raise ValueError("indices must select at least one teacher per row (K >= 1)")
    else:
        K = E
    cdt = compute_dtype(x.dtype)
    if weights is None:
        w = x.new_full((B, K), 1.0 / K, dtype=cdt)
    else:
        _checks.floating("weights", _checks.tensor("weights", weights))
        if weights.shape != (B, K):
            expect = f"[{B}, {K}] (the shape of indices)" if indices is not None else f"[{B}, {E}] ([rows, teachers])"
            raise ValueError(f"weights must be {expect}, got {tuple(weights.shape)}")
        w = weights.to(cdt)
    if mask is not None:
        _checks.tensor("mask", mask)
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = row counts), got {mask.dtype}")
        if tuple(mask.shape) != tuple(row_shape):
            raise ValueError(f"mask must have shape {tuple(row_shape)} (student_logits without the class dim), "
                             f"got {tuple(mask.shape)}")
        mask2 = mask.reshape(B, S)
    else:
        mask2 = None
    _checks.same_device(("student_logits", "teacher_logits", "weights", "indices", "mask"),
                        (x, z, weights, indices, mask))

    if _checks.value_checks_active(x):
        if weights is not None and bool((weights < 0).any()):
            raise ValueError("weights must be >= 0 (found a negative weight)")
        if indices is not None and indices.numel() and bool(((indices < 0) | (indices >= E)).any()):
            raise ValueError(f"indices must be in [0, {E}) (E = number of teachers); found one out of range")

    if mask2 is None:
        count = B * S
    else:  # the global count is clamped after the all-reduce
        count = mask2.sum() if process_group is not None else mask2.sum().clamp_min(1)
    inv_count = _folded_mean(reduction, count, process_group)
    grad_on = torch.is_grad_enabled()
    loss_rows, _, _, _ = routed_kd_ops.run_routed_kd_fwd(
        x3, z4, w, indices, mask2, temperature, MIXES[mix], DIVERGENCES[divergence], float(beta),
        (temperature**2 if t2_scale else 1.0) * (inv_count or 1.0),
        routed_kd_ops.grad_mask(
            grad_on and x.requires_grad, grad_on and w.requires_grad, grad_on and z.requires_grad, consume_grads=True
        ),
    )
    if inv_count is not None:
        return loss_rows.sum().to(x.dtype)
    return _reduce(loss_rows, reduction, count, row_shape, x.dtype, process_group)


def mutual_kd_loss(
    logits: Tensor | Sequence[Tensor],
    temperature: float = 1.0,
    t2_scale: bool = True,
    reduction: str = "batchmean",
    process_group: ProcessGroup | None = None,
) -> Tensor:
    """Mutual (co-training) KD of MST-Distill stage 1, nothing detached.

    L = sum over ordered pairs i != j of tau^2 * KL(p_j || p_i), p_i = softmax(logits_i / tau), reduced
    over rows (``batchmean`` divides by N). Gradients flow to every logit set.

    Args:
        logits: [M, N, C] or a sequence of M tensors [N, C].
        process_group: a ``torch.distributed`` group: sum and N over all ranks (the loss of the
            concatenated batch on every rank, also for unequal per-rank batches; docs/distributed.md).
    """
    x = _checks.floating("logits", _checks.stack("logits", logits))
    if x.dim() != 3:
        raise ValueError(f"logits must be [M, N, C] (or a sequence of M [N, C] tensors), got shape {tuple(x.shape)}")
    if min(x.shape) < 1:
        raise ValueError(f"logits must have M, N, C >= 1, got shape {tuple(x.shape)}")
    temperature = _checks.positive("temperature", temperature)
    _checks.choice("reduction", reduction, REDUCTIONS)
    process_group = check_process_group(process_group, reduction)
    need = torch.is_grad_enabled() and x.requires_grad
    inv_count = _folded_mean(reduction, x.shape[1], process_group)
    scale = (temperature**2 if t2_scale else 1.0) * (inv_count or 1.0)
    loss_rows, _ = mutual_kd_ops.run_mutual_kd_fwd(x, temperature, scale, need, True)
    if inv_count is not None:
        return loss_rows.sum().to(x.dtype)
    return _reduce(loss_rows, reduction, x.shape[1], (x.shape[1],), x.dtype, process_group)


def load_balance_loss(probs: Tensor, mode: str = "kl", process_group: ProcessGroup | None = None) -> Tensor:
    """Load-balance loss of the teacher router (MST-Distill).

    With pbar = mean over rows of the router probabilities ``probs`` [N, E] (over all ranks of
    ``process_group``, computed in fp32 for bf16/fp16 input): ``kl`` gives (1/E) * KL(u || pbar),
    u uniform; ``cv`` gives the coefficient of variation std(sum_n pi_n) / mean(sum_n pi_n)
    (unbiased std; equal to std(pbar) / mean(pbar)). With ``process_group`` every rank returns the
    global value (docs/distributed.md).
    """
    p = _checks.floating("probs", _checks.tensor("probs", probs))
    _checks.choice("mode", mode, LOAD_BALANCE_MODES)
    process_group = check_process_group(process_group)
    if p.dim() != 2 or p.shape[0] < 1 or p.shape[1] < 1:
        raise ValueError(f"probs must be [N, E] with N, E >= 1, got shape {tuple(p.shape)}")
    N, E = p.shape
    if mode == "cv" and E < 2:
        raise ValueError("mode='cv' needs at least two teachers (probs.shape[1] >= 2)")
    cdt = compute_dtype(p.dtype)
    col_sum = p.sum(0, dtype=cdt)
    pbar = col_sum / N if process_group is None else global_mean(col_sum, N, process_group).to(cdt)
    if mode == "cv":
        out = pbar.std() / pbar.mean()
    else:
        out = (-math.log(E) - torch.log(pbar)).sum() / (E * E)
    return out.to(p.dtype)


def teacher_weights(
    teacher_logits: Tensor | Sequence[Tensor],
    labels: Tensor,
    temperature: float = 1.0,
    per_sample: bool = True,
    process_group: ProcessGroup | None = None,
) -> Tensor:
    """Teacher weights from the teachers' own losses (egocentric multimodal KD).

    l_ne = CE(z_e,n, y_n); w_n = softmin_e(l_ne / tau) per sample, or, with ``per_sample=False``,
    one vector softmin_e(mean_n l_ne / tau) repeated for every row; the mean is over all ranks of
    ``process_group`` when one is given (``per_sample=True`` needs no communication). Computed in fp32
    for bf16/fp16 logits; returns [N, E] in the logits' dtype.
    """
    z = _checks.floating("teacher_logits", _checks.stack("teacher_logits", teacher_logits))
    if z.dim() != 3:
        raise ValueError(f"teacher_logits must be [E, N, C], got shape {tuple(z.shape)}")
    E, N, C = z.shape
    _checks.tensor("labels", labels)
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of class ids, got {labels.dtype}")
    if labels.shape != (N,):
        raise ValueError(f"labels must be [{N}] (one class id per row), got {tuple(labels.shape)}")
    temperature = _checks.positive("temperature", temperature)
    process_group = check_process_group(process_group)
    _checks.same_device(("teacher_logits", "labels"), (z, labels))
    if _checks.value_checks_active(labels) and N and bool(((labels < 0) | (labels >= C)).any()):
        raise ValueError(f"labels must be in [0, {C}) (C = number of classes); found one out of range")
    cdt = compute_dtype(z.dtype)
    log_p = torch.log_softmax(z, dim=-1, dtype=cdt)
    # with value checks off, a label out of range gives a NaN row (no out-of-bounds read, no device assert)
    valid = (labels >= 0) & (labels < C)
    safe = torch.where(valid, labels, torch.zeros_like(labels)).reshape(1, N, 1).expand(E, N, 1)
    ce = torch.where(valid, -log_p.gather(-1, safe).squeeze(-1), torch.full_like(log_p[..., 0], math.nan))
    if not per_sample:
        if process_group is None:
            mean = ce.mean(1, keepdim=True)
        else:
            mean = global_mean(ce.sum(1, keepdim=True), N, process_group).to(cdt)
        ce = mean.expand(E, N)
    return torch.softmax(-ce.t() / temperature, dim=1).to(z.dtype)
