"""Modules of f-divergence score distillation: the per-noise-level ratio normaliser and the two generator losses."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mmfast import _checks
from mmfast import fdiv as F
from mmfast._distributed import all_reduce_sum, check_process_group, deepcopy_sharing_group, global_mean
from mmfast.reference import fdiv as fdiv_math
from mmfast.reference.routed_kd import compute_dtype


def batch_mean(h: Tensor, process_group=None) -> Tensor:
    """mean(h) over the batch, over all ranks of ``process_group`` when given (0-d, no gradient, no host sync)."""
    h = h.detach()
    if process_group is None:
        return h.sum() / h.shape[0]
    return global_mean(h.sum(), h.shape[0], process_group).to(h.dtype)


class DensityRatioNormalizer(nn.Module):
    """Per-noise-level normalisation of the density ratio: r / (running mean of r in t's bin + eps).

    t in [t_min, t_max] is split into ``num_bins`` equal bins (t outside is clamped to the end bins). In
    training mode each call first updates every bin that holds samples of the batch (over all ranks of
    ``process_group``: bin sums and counts are all-reduced) with the EMA
    ``mean = (1 - momentum) * mean + momentum * batch_mean`` (a bin's first batch sets its mean), then
    normalises; in eval mode the stored means are used as they are. ``bin_mean`` and ``bin_seen`` are
    buffers (saved in the state dict). No host synchronisation. A sample with NaN t gives NaN and is left out
    of the statistics; a NaN ratio propagates into its bin's mean.
    """

    bin_mean: Tensor
    bin_seen: Tensor

    __deepcopy__ = deepcopy_sharing_group  # the copy shares process_group

    def __init__(
        self,
        num_bins: int = 10,
        momentum: float = 0.1,
        t_min: float = 0.0,
        t_max: float = 1.0,
        eps: float = 1e-6,
        process_group=None,
    ) -> None:
        super().__init__()
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
            raise ValueError(f"num_bins must be an int >= 1, got {num_bins!r}")
        momentum = float(momentum)
        if not (0.0 < momentum <= 1.0):
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        t_min, t_max = float(t_min), float(t_max)
        if not (math.isfinite(t_min) and math.isfinite(t_max) and t_max > t_min):
            raise ValueError(f"t_min and t_max must be finite with t_max > t_min, got t_min={t_min}, t_max={t_max}")
        self.num_bins = num_bins
        self.momentum = momentum
        self.t_min, self.t_max = t_min, t_max
        self.eps = _checks.positive("eps", eps)
        self.process_group = check_process_group(process_group)
        self.register_buffer("bin_mean", torch.ones(num_bins))
        self.register_buffer("bin_seen", torch.zeros(num_bins, dtype=torch.bool))

    def extra_repr(self) -> str:
        return f"num_bins={self.num_bins}, momentum={self.momentum}, t_min={self.t_min}, t_max={self.t_max}"

    def bin_index(self, t: Tensor) -> Tensor:
        """The bin of each t (int64 [B]); NaN t maps to bin 0 (its result is made NaN by ``forward``)."""
        pos = (t.detach().double() - self.t_min) * (self.num_bins / (self.t_max - self.t_min))
        pos = torch.nan_to_num(pos, nan=0.0)
        return pos.floor().clamp(0, self.num_bins - 1).to(torch.int64)

    @torch.no_grad()
    def update(self, ratio: Tensor, idx: Tensor, valid: Tensor) -> None:
        """Fold the batch's per-bin mean ratio (samples where ``valid``) into the running means (sums and
        counts all-reduced over the group)."""
        cdt = torch.float64 if self.bin_mean.dtype == torch.float64 else torch.float32
        stats = torch.zeros(2, self.num_bins, dtype=cdt, device=ratio.device)
        r = torch.where(valid, ratio.to(cdt), 0.0)
        stats.index_add_(1, idx, torch.stack([r, valid.to(cdt)]))
        sums, counts = all_reduce_sum(stats, self.process_group)
        has = counts > 0
        batch = sums / counts.clamp_min(1)
        old = self.bin_mean.to(cdt)
        ema = torch.where(self.bin_seen, (1.0 - self.momentum) * old + self.momentum * batch, batch)
        self.bin_mean.copy_(torch.where(has, ema, old))
        self.bin_seen.logical_or_(has)

    def forward(self, ratio: Tensor, t: Tensor) -> Tensor:
        """ratio [B] > 0 and noise level t [B] -> ratio / (bin_mean[bin(t)] + eps), [B], detached."""
        r = _checks.floating("ratio", _checks.tensor("ratio", ratio))
        tt = _checks.floating("t", _checks.tensor("t", t))
        if r.dim() != 1 or r.shape[0] < 1:
            raise ValueError(f"ratio must be [B] with B >= 1, got shape {tuple(r.shape)}")
        if tt.shape != r.shape:
            raise ValueError(f"t must be [B] = [{r.shape[0]}] like ratio, got {tuple(tt.shape)}")
        _checks.same_device(("ratio", "t", "bin_mean"), (r, tt, self.bin_mean))
        if _checks.value_checks_active(r) and bool((r <= 0).any()):
            raise ValueError("ratio must be > 0 for every sample (found a non-positive entry)")
        r = r.detach()
        idx = self.bin_index(tt)
        t_nan = torch.isnan(tt)
        if self.training:
            self.update(r, idx, ~t_nan)
        cdt = compute_dtype(r.dtype)
        out = r.to(cdt) / (self.bin_mean.to(cdt)[idx] + self.eps)
        return torch.where(t_nan, torch.full_like(out, math.nan), out)


class FDistillLoss(nn.Module):
    """f-distill generator loss with the weight taken from the density ratio:
    h = fdiv_weight(ratio, divergence), divided by its batch mean when ``normalize`` (the mean over all ranks
    of ``process_group`` when given; constant factors of h cancel), then :func:`mmfast.fdistill_loss`.
    """

    __deepcopy__ = deepcopy_sharing_group  # the copy shares process_group

    def __init__(
        self, divergence: str = "reverse_kl", normalize: bool = True, reduction: str = "mean", process_group=None
    ) -> None:
        super().__init__()
        self.divergence = fdiv_math.check_divergence(divergence)
        self.normalize = bool(normalize)
        self.reduction = _checks.choice("reduction", reduction, F.REDUCTIONS)
        self.process_group = check_process_group(process_group)

    def extra_repr(self) -> str:
        return f"divergence={self.divergence!r}, normalize={self.normalize}, reduction={self.reduction!r}"

    def weight(self, ratio: Tensor, batch: int, device: torch.device, cdt: torch.dtype) -> Tensor:
        """h [B] (normalised when configured) from ratio [B]."""
        r = F._per_sample("ratio", ratio, batch, device, cdt, positive=True)
        h = fdiv_math.fdiv_weight(r, self.divergence)
        return h / batch_mean(h, self.process_group) if self.normalize else h

    def forward(self, x: Tensor, teacher_x0: Tensor, fake_x0: Tensor, ratio: Tensor) -> Tensor:
        # the samples first: a shape error names the sample tensor, not the ratio checked against its B
        B, _ = F._check_samples(("x", "teacher_x0", "fake_x0"), (x, teacher_x0, fake_x0))
        h = self.weight(ratio, B, x.device, compute_dtype(x.dtype))
        return F.fdistill_loss(x, teacher_x0, fake_x0, h, reduction=self.reduction)


class UniInstructLoss(nn.Module):
    """Uni-Instruct generator loss (:func:`mmfast.uni_instruct_loss`) with the configuration fixed here; with
    ``normalize`` the coefficients (lambda_sim, lambda_fgm, lambda_di) of the divergence are divided by the
    batch mean of h = lambda_sim (over all ranks of ``process_group`` when given).
    """

    __deepcopy__ = deepcopy_sharing_group  # the copy shares process_group

    def __init__(
        self,
        divergence: str = "kl",
        alpha: float = 1.0,
        fgm: bool = False,
        di: bool = True,
        di_norm: str = "sample",
        normalize: bool = True,
        reduction: str = "mean",
        process_group=None,
    ) -> None:
        super().__init__()
        self.divergence = fdiv_math.check_divergence(divergence)
        self.alpha = F._check_uni_instruct_args(alpha, fgm, di, di_norm, reduction)
        self.fgm, self.di, self.di_norm = fgm, di, di_norm
        self.normalize = bool(normalize)
        self.reduction = reduction
        self.process_group = check_process_group(process_group)

    def extra_repr(self) -> str:
        return (
            f"divergence={self.divergence!r}, alpha={self.alpha}, fgm={self.fgm}, di={self.di}, "
            f"di_norm={self.di_norm!r}, normalize={self.normalize}, reduction={self.reduction!r}"
        )

    def forward(self, x: Tensor, teacher_x0: Tensor, fake_x0: Tensor, ratio: Tensor) -> Tensor:
        normalizer = (lambda h: batch_mean(h, self.process_group)) if self.normalize else None
        return F._uni_instruct_loss(
            x, teacher_x0, fake_x0, ratio, self.divergence, self.alpha, self.fgm, self.di, self.di_norm,
            self.reduction, h_normalizer=normalizer,
        )
