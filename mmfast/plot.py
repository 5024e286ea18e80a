"""Plots (matplotlib, an optional dependency: ``pip install matplotlib`` or ``pip install mmfast[plot]``).

matplotlib is imported inside the functions only, so ``import mmfast`` never needs it.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor

from mmfast.calibration import CalibrationAccumulator, CalibrationStats


def _matplotlib_figure():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - exercised only where matplotlib is missing
        raise ImportError(
            "mmfast.plot needs matplotlib, an optional dependency: pip install matplotlib "
            "(or pip install 'mmfast[plot]')"
        ) from e
    return Figure, FigureCanvasAgg


def reliability_diagram(
    source: CalibrationStats | CalibrationAccumulator | Tensor,
    path: str | os.PathLike,
    labels: Tensor | None = None,
    *,
    n_bins: int = 15,
    title: str | None = None,
) -> Path:
    """Write a reliability diagram (accuracy per confidence bin against the diagonal) as a PNG.

    ``source`` is per-bin statistics (:class:`mmfast.calibration.CalibrationStats`), an accumulator, or
    logits [N, C] together with ``labels`` [N] (binned into ``n_bins`` bins (lo, hi]). Bars show each
    bin's accuracy, the red part the gap to its mean confidence; empty bins have no bar. The title
    carries the ECE. Returns the path written.
    """
    if isinstance(source, CalibrationAccumulator):
        stats = source.stats()
    elif isinstance(source, CalibrationStats):
        stats = source
    elif isinstance(source, Tensor):
        if labels is None:
            raise ValueError("labels are required when source is a logits tensor")
        stats = CalibrationStats.from_logits(source, labels, n_bins)
    else:
        raise TypeError(
            f"source must be CalibrationStats, a CalibrationAccumulator or a logits tensor, got {type(source).__name__}"
        )
    if labels is not None and not isinstance(source, Tensor):
        raise ValueError("labels are only used with a logits tensor as source")
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"path must end in .png, got {str(path)!r}")
    Figure, FigureCanvasAgg = _matplotlib_figure()

    edges = stats.edges.tolist()
    width = 1.0 / stats.n_bins
    lefts = edges[:-1]
    counts = stats.counts.cpu().tolist()
    acc = stats.accuracy.cpu().tolist()
    conf = stats.mean_confidence.cpu().tolist()
    filled = [i for i, n in enumerate(counts) if n > 0]
    ece = float(stats.ece())

    fig = Figure(figsize=(4.5, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1, label="perfect calibration")
    ax.bar([lefts[i] for i in filled], [acc[i] for i in filled], width=width, align="edge",
           color="tab:blue", edgecolor="black", linewidth=0.5, label="accuracy")
    gap_bottom = [min(acc[i], conf[i]) for i in filled]
    gap_height = [abs(conf[i] - acc[i]) for i in filled]
    ax.bar([lefts[i] for i in filled], gap_height, bottom=gap_bottom, width=width, align="edge",
           color="tab:red", alpha=0.35, edgecolor="tab:red", linewidth=0.5, label="gap to confidence")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (max softmax)")
    ax.set_ylabel("accuracy")
    head = f"{title}\n" if title else ""
    ax.set_title(f"{head}ECE = {100 * ece:.2f}% (N = {int(sum(counts))}, {stats.n_bins} bins)")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
