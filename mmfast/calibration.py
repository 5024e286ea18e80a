"""Expected calibration error (ECE) and its accumulating form (SPEC section 4).

Confidence c_n = max_k softmax(z_n)_k, prediction argmax_k z_n, correct_n = [prediction == y_n].
Bins are the equal-width intervals (lo, hi] = ((b-1)/B, b/B], b = 1..B; with n_b samples, mean
confidence conf_b and accuracy acc_b in bin b:

    ECE = sum_b |acc_b - conf_b| * n_b / N = sum_b |sum_{n in b} correct_n - sum_{n in b} c_n| / N

a fraction in [0, 1] (papers report it x100). The bin sums are formed with ``scatter_add`` into B
fixed slots, so nothing synchronises with the host (no ``.item()``, no data-dependent shape) and the
computation compiles with ``torch.compile(fullgraph=True)``; the only host reads are the eager-mode
label range check (:func:`mmfast.set_value_checks`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmfast import _checks
from mmfast._distributed import all_reduce_sum, check_process_group
from mmfast.reference.routed_kd import compute_dtype

STAT_ROWS = 3  # rows of the packed bin statistics: count, confidence sum, correct sum


def _n_bins(n_bins: int) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int):
        raise TypeError(f"n_bins must be an int, got {type(n_bins).__name__}")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    return n_bins


def _check_logits_labels(logits: Tensor, labels: Tensor) -> None:
    _checks.floating("logits", _checks.tensor("logits", logits))
    _checks.tensor("labels", labels)
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, C], got shape {tuple(logits.shape)}")
    N, C = logits.shape
    if C < 1:
        raise ValueError(f"logits must have C >= 1 classes, got shape {tuple(logits.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of class ids, got {labels.dtype}")
    if labels.shape != (N,):
        raise ValueError(f"labels must be [{N}] (one class id per row of logits), got {tuple(labels.shape)}")
    _checks.same_device(("logits", "labels"), (logits, labels))
    if _checks.value_checks_active(labels) and N and bool(((labels < 0) | (labels >= C)).any()):
        raise ValueError(f"labels must be in [0, {C}) (C = number of classes); found one out of range")


def confidences(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(c, correct): max softmax probability per row in the compute dtype (fp32 for bf16/fp16) and
    whether the argmax equals the label (bool), for logits [N, C] and integer labels [N]."""
    _check_logits_labels(logits, labels)
    return _confidences(logits, labels)


def _confidences(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    z = logits.to(compute_dtype(logits.dtype))
    top, pred = z.max(dim=1)
    # c = max_k exp(z_k) / sum_j exp(z_j) = exp(max - logsumexp): one logsumexp, no [N, C] softmax
    conf = torch.exp(top - torch.logsumexp(z, dim=1))
    return conf, pred == labels


def bin_stats(confidence: Tensor, correct: Tensor, n_bins: int = 15) -> Tensor:
    """Packed per-bin sums, a float64 [3, n_bins] tensor: sample count, confidence sum, correct sum.

    ``confidence`` [N] in [0, 1] goes to the bin (lo, hi] that holds it: index ceil(c * B) - 1, which is
    ``bucketize`` against the upper edges b/B with ``right=False``; c = 0 joins the first bin.
    """
    n_bins = _n_bins(n_bins)
    c = _checks.floating("confidence", _checks.tensor("confidence", confidence))
    _checks.tensor("correct", correct)
    if c.dim() != 1 or correct.shape != c.shape:
        raise ValueError(
            f"confidence and correct must be [N] of one length, got {tuple(c.shape)} and {tuple(correct.shape)}"
        )
    _checks.same_device(("confidence", "correct"), (c, correct))
    # b / B by a correctly rounded division: the edge 0.3 is the same number as a confidence 0.3
    upper = torch.arange(1, n_bins + 1, dtype=c.dtype, device=c.device) / n_bins
    index = torch.bucketize(c, upper, right=False).clamp_(max=n_bins - 1)
    values = torch.stack((torch.ones_like(c), c, correct.to(c.dtype))).to(torch.float64)
    stats = torch.zeros(STAT_ROWS, n_bins, dtype=torch.float64, device=c.device)
    return stats.scatter_add_(1, index.unsqueeze(0).expand(STAT_ROWS, -1), values)


def _ece_from_stats(stats: Tensor) -> Tensor:
    count, conf_sum, correct_sum = stats.unbind(0)
    return (correct_sum - conf_sum).abs().sum() / count.sum()


def expected_calibration_error(logits: Tensor, labels: Tensor, n_bins: int = 15) -> Tensor:
    """ECE of a classifier (a 0-dim tensor fraction; float64 for float64 logits, else float32).

    logits [N, C] (N >= 1), integer labels [N] in [0, C); ``n_bins`` equal-width bins (lo, hi] over the
    max-softmax confidence. See the module docstring for the formula.
    """
    n_bins = _n_bins(n_bins)
    _check_logits_labels(logits, labels)
    if logits.shape[0] < 1:
        raise ValueError("logits must have N >= 1 rows: the ECE of no samples is undefined")
    conf, correct = _confidences(logits, labels)
    return _ece_from_stats(bin_stats(conf, correct, n_bins)).to(conf.dtype)


@dataclass(frozen=True)
class CalibrationStats:
    """Per-bin statistics for a reliability diagram: bin b covers (edges[b], edges[b + 1]].

    ``accuracy`` and ``mean_confidence`` are NaN in empty bins.
    """

    counts: Tensor  # [B] samples per bin (float64)
    confidence_sum: Tensor  # [B]
    correct_sum: Tensor  # [B]

    @classmethod
    def from_packed(cls, stats: Tensor) -> CalibrationStats:
        count, conf_sum, correct_sum = stats.detach().to(torch.float64).unbind(0)
        return cls(count, conf_sum, correct_sum)

    @classmethod
    def from_logits(cls, logits: Tensor, labels: Tensor, n_bins: int = 15) -> CalibrationStats:
        return cls.from_packed(bin_stats(*confidences(logits, labels), n_bins))

    @property
    def n_bins(self) -> int:
        return self.counts.shape[0]

    @property
    def edges(self) -> Tensor:
        return torch.arange(0, self.n_bins + 1, dtype=torch.float64) / self.n_bins

    @property
    def accuracy(self) -> Tensor:
        return self.correct_sum / self.counts

    @property
    def mean_confidence(self) -> Tensor:
        return self.confidence_sum / self.counts

    @property
    def total(self) -> Tensor:
        return self.counts.sum()

    def ece(self) -> Tensor:
        """sum_b |correct_b - confidence_b| / N (float64; NaN when there are no samples)."""
        return _ece_from_stats(torch.stack((self.counts, self.confidence_sum, self.correct_sum)))


class CalibrationAccumulator:
    """ECE over an evaluation loop: ``update`` per batch, ``compute`` at the end, ``reset`` to reuse.

    The bin sums live on the logits' device (float64 [3, n_bins]); ``update`` never synchronises
    with the host. ``compute(process_group)`` all-reduces a copy of the sums over the group (so the
    result is the ECE of every rank's samples; calling it again does not double count), then
    returns sum_b |correct_b - confidence_b| / N as a float64 0-dim tensor.
    """

    def __init__(self, n_bins: int = 15) -> None:
        self.n_bins = _n_bins(n_bins)
        self._stats: Tensor | None = None
        self._local_count = 0

    def reset(self) -> None:
        self._stats = None
        self._local_count = 0

    @property
    def local_count(self) -> int:
        """Samples added on this process since the last ``reset`` (known from shapes, no sync)."""
        return self._local_count

    def update(self, logits: Tensor, labels: Tensor) -> None:
        conf, correct = confidences(logits, labels)
        self.update_confidences(conf, correct)

    def update_confidences(self, confidence: Tensor, correct: Tensor) -> None:
        """Add precomputed confidences [N] in [0, 1] and correctness flags [N]."""
        stats = bin_stats(confidence, correct, self.n_bins)
        if self._stats is None:
            self._stats = stats
        else:
            if stats.device != self._stats.device:
                raise ValueError(
                    f"update on {stats.device} but the accumulator holds sums on {self._stats.device}"
                )
            self._stats = self._stats + stats
        self._local_count += confidence.shape[0]

    def _reduced(self, process_group) -> Tensor:
        process_group = check_process_group(process_group)
        if self._stats is None:
            if process_group is None:
                raise ValueError("no samples: call update() before compute()/stats()")
            raise ValueError(
                "this rank has no samples yet; call update() (with an empty batch if need be) on every rank "
                "first, so that the sums have a device for the all-reduce"
            )
        return all_reduce_sum(self._stats, process_group)  # a new tensor: the local sums stay local

    def compute(self, process_group=None) -> Tensor:
        """ECE over every sample added (over all ranks of ``process_group`` when given)."""
        return _ece_from_stats(self._reduced(process_group))

    def stats(self, process_group=None) -> CalibrationStats:
        """Per-bin statistics (all-reduced over ``process_group`` when given), e.g. for plotting."""
        return CalibrationStats.from_packed(self._reduced(process_group))
