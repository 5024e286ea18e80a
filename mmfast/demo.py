"""The end-to-end demo: ``python -m mmfast demo [--quick | --full] [--out DIR] [--recipes NAME ...] [--seed N]``.

Runs the multimodal KD recipes on the offline AV-Digits data (:func:`mmfast.datasets.load_av_digits`): MST-Distill
(``mst_distill``), multimodal-teacher ensemble KD (``ensemble_kd``, into an audio-only student) and UME vs UMT
(``ume_umt``), and the one-step diffusion distillation of a 2-D ring (``one_step_ring``), then writes into the output
folder:

* ``results.md``: machine, date, torch version, command line, and per recipe a table (method, role, modality, test
  accuracy, ECE, accuracy against the CE-only baseline and the best teacher, loss ms/step) with the recipe's notes;
* ``results.json``: the same numbers, the per-epoch curves and the timings;
* ``curves.png`` (test accuracy per epoch of every model, one panel per AV-Digits recipe) and ``reliability.png``
  (reliability diagrams of the students, baselines and ensembles); ``ring_<divergence>.png`` for the ring. The
  figures need matplotlib (``pip install 'mmfast[plot]'``); without it they are skipped with a message and the
  tables are still written.

Presets: ``--quick`` (CI: a few epochs per recipe and a short ring run, well under a minute in all), the default
(a few minutes on 2 CPU cores; the ring with reverse KL in both forms), ``--full`` (the ring's whole documented grid).
Everything runs with one torch thread unless ``--threads`` says otherwise (the networks are tiny) and is
deterministic for a fixed seed and thread count. Nothing is downloaded; a missing or corrupt data file ends the
command with exit code 2 and the loader's message, which says how to regenerate the file. ``--data PATH`` (or
``$MMFAST_AV_DIGITS``) reads another copy of the data file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmfast.recipes._common import RecipeResult

RECIPES = ("mst_distill", "ensemble_kd", "ume_umt", "one_step_ring")
DEFAULT_RECIPES = RECIPES
DATA_RECIPES = ("mst_distill", "ensemble_kd", "ume_umt")
MODES = ("quick", "default", "full")
DATA_ENV = "MMFAST_AV_DIGITS"
DEFAULT_OUT = "mmfast-demo"
RECIPE_TITLES = {
    "mst_distill": "MST-Distill: routed mixture of specialised teachers (cross-modal KD)",
    "ensemble_kd": "Multimodal-teacher ensemble KD (egocentric action recognition recipe)",
    "ume_umt": "UME vs UMT with the guiding strategy",
    "one_step_ring": "One-step diffusion distillation of a 2-D ring (f-distill and Uni-Instruct forms)",
}
# The ensemble-KD demo distils into the audio student: an image-only CE student already reaches ~99% on AV-Digits
# (a handful of test errors), which leaves a KD method nothing to show; the audio student (~89%) has room.
ENSEMBLE_KD_STUDENT = "audio"
SPARSE_BIN = 5  # reliability bins with fewer samples are drawn pale


# ---------------------------------------------------------------------------------------------------------------
# running the recipes


def _run_mst_distill(data: Any, mode: str, seed: int, progress: bool) -> RecipeResult:
    from mmfast.recipes.mst_distill import run_mst_distill

    return run_mst_distill(data, quick=mode == "quick", seed=seed, progress=progress)


def _run_ensemble_kd(data: Any, mode: str, seed: int, progress: bool) -> RecipeResult:
    from mmfast.recipes.ensemble_kd import run_ensemble_kd

    return run_ensemble_kd(data, student_modality=ENSEMBLE_KD_STUDENT, quick=mode == "quick", seed=seed,
                           progress=progress)


def _run_ume_umt(data: Any, mode: str, seed: int, progress: bool) -> RecipeResult:
    from mmfast.recipes.ume_umt import run_ume_umt

    return run_ume_umt(data, quick=mode == "quick", seed=seed, progress=progress)


def _run_one_step_ring(data: Any, mode: str, seed: int, progress: bool):
    """The ring at three sizes: --quick a smoke run (f-distill, reverse KL, 150 steps of a smaller net), the default
    reverse KL in both forms with the documented configuration (2000 steps), --full the documented grid (reverse KL,
    KL, JS, Jeffreys x both forms)."""
    from mmfast.recipes import one_step_ring as ring

    if mode == "full":
        return ring.run_one_step_ring(None, seed=seed, progress=progress)
    if mode == "default":
        return ring.run_one_step_ring(None, divergences=("reverse_kl",), forms=("fdistill", "uni_instruct"),
                                      seed=seed, progress=progress)
    config = dataclasses.replace(ring.QUICK_CONFIG, steps=150, fake_warmup_steps=30, batch_size=128, width=64)
    return ring.run_one_step_ring(None, divergences=("reverse_kl",), forms=("fdistill",), config=config,
                                  seed=seed, n_eval=2_000, progress=progress)


RUNNERS: dict[str, Callable[[Any, str, int, bool], Any]] = {
    "mst_distill": _run_mst_distill,
    "ensemble_kd": _run_ensemble_kd,
    "ume_umt": _run_ume_umt,
    "one_step_ring": _run_one_step_ring,
}


@dataclass
class DemoResults:
    """Everything the demo measured: per recipe its result (a :class:`RecipeResult`, or the ring's ``RingResults``)
    and wall time, the machine, the command line, and the files written."""

    mode: str
    seed: int
    command: str
    machine: dict
    results: dict[str, Any] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)
    total_time_s: float = 0.0
    files: list[Path] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)


def load_data(path: str | os.PathLike | None = None) -> Any:
    """AV-Digits from ``path``, else ``$MMFAST_AV_DIGITS`` when set, else the file shipped with mmfast."""
    from mmfast.datasets import load_av_digits

    return load_av_digits(path if path is not None else os.environ.get(DATA_ENV) or None)


def select_recipes(recipes: Sequence[str] | None, mode: str) -> tuple[str, ...]:
    """The recipes to run, in :data:`RECIPES` order: those named, else :data:`DEFAULT_RECIPES` (all of them; the
    mode sets their size)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if recipes is None or len(recipes) == 0:
        return DEFAULT_RECIPES
    if isinstance(recipes, str):
        recipes = [recipes]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        raise ValueError(f"recipes: unknown recipe(s) {unknown}; valid recipes are {', '.join(RECIPES)}")
    return tuple(r for r in RECIPES if r in recipes)


def run_demo(
    recipes: Sequence[str] | None = None,
    *,
    mode: str = "default",
    seed: int = 0,
    out_dir: str | os.PathLike | None = DEFAULT_OUT,
    data: Any = None,
    data_path: str | os.PathLike | None = None,
    progress: bool = True,
    command: str = "",
) -> DemoResults:
    """Run the selected recipes (see :func:`select_recipes`) and, with ``out_dir``, write the outputs.

    The AV-Digits recipes use ``data`` when given, else :func:`load_data` of ``data_path`` (read only when such a
    recipe runs; the loader's ``FileNotFoundError`` / ``ValueError`` propagate unchanged).
    """
    from mmfast.recipes.one_step_ring import machine_info

    names = select_recipes(recipes, mode)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    demo = DemoResults(mode=mode, seed=seed, command=command or f"run_demo({list(names)}, mode={mode!r})",
                       machine=machine_info())
    if data is None and any(n in DATA_RECIPES for n in names):
        data = load_data(data_path)
    start = time.perf_counter()
    for name in names:
        if progress:
            print(f"[mmfast demo] {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        demo.results[name] = RUNNERS[name](data, mode, seed, progress)
        demo.times[name] = time.perf_counter() - t0
        if progress:
            print(f"[mmfast demo] {name} done in {demo.times[name]:.1f} s", file=sys.stderr, flush=True)
    demo.total_time_s = time.perf_counter() - start
    if out_dir is not None:
        demo.files = write_outputs(demo, Path(out_dir))
    return demo


# ---------------------------------------------------------------------------------------------------------------
# tables


def _pct(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def _pts(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f}"


def recipe_table(result: RecipeResult) -> str:
    """Markdown table of a recipe's rows: method, role, modality, test accuracy and ECE (%), accuracy against the
    baseline (the CE-only student; the one of the row's modality when there are several) and the best teacher
    (percentage points, for students and baselines), loss ms/step."""
    baselines = [r for r in result.rows if r.role == "baseline"]
    teachers = [r for r in result.rows if r.role == "teacher"]
    best_teacher = max((r.accuracy for r in teachers), default=None)
    lines = [
        "| method | role | modality | test acc (%) | ECE (%) | vs baseline (pts) | vs best teacher (pts) "
        "| loss ms/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result.rows:
        base = next((b for b in baselines if b.modality == r.modality), baselines[0] if baselines else None)
        vs_base = r.accuracy - base.accuracy if base is not None and r.role != "baseline" else None
        vs_teacher = r.accuracy - best_teacher if best_teacher is not None and r.role != "teacher" else None
        ms = "-" if r.loss_ms_per_step is None else f"{r.loss_ms_per_step:.2f}"
        lines.append(f"| {r.method} | {r.role} | {r.modality} | {_pct(r.accuracy)} | {_pct(r.ece)} | "
                     f"{_pts(vs_base)} | {_pts(vs_teacher)} | {ms} |")
    return "\n".join(lines)


def _is_recipe_result(result: Any) -> bool:
    return isinstance(result, RecipeResult)


def tables_markdown(demo: DemoResults) -> str:
    """Per recipe: a heading with its wall time, its table, and its notes."""
    from mmfast.recipes import one_step_ring as ring

    parts = []
    for name, result in demo.results.items():
        parts.append(f"## {name}: {RECIPE_TITLES[name]} ({demo.times[name]:.1f} s)")
        parts.append("")
        if _is_recipe_result(result):
            parts.append(recipe_table(result))
            notes = result.notes
        else:
            parts.append(ring.results_table(result))
            c = result.config
            notes = [f"{len(result.runs)} run(s), {c.steps} generator steps after {c.fake_warmup_steps} fake-score "
                     f"warm-up steps, batch {c.batch_size}, MLP width {c.width}; metrics on "
                     f"{result.teacher_samples.shape[0]} samples (see docs/one_step_ring for the full run)."]
        if notes:
            parts.append("")
            parts.extend(f"- {note}" for note in notes)
        parts.append("")
    return "\n".join(parts)


def results_markdown(demo: DemoResults) -> str:
    """The whole ``results.md``: header (machine, date, versions, command), then :func:`tables_markdown`."""
    m = demo.machine
    lines = [
        "# mmfast demo results",
        "",
        f"Machine: {m['cpu']}, torch threads {m['torch_threads']}, torch {m['torch']}, Python {m['python']}, "
        f"mmfast backend {m['mmfast_backend']}; {m['date_utc']} UTC.",
        f"Command: `{demo.command}` (mode {demo.mode}, seed {demo.seed}); total time {demo.total_time_s:.1f} s.",
        "",
        "Test accuracy and ECE (15 bins, max-softmax confidence) in %, on the AV-Digits test split; 'vs baseline' "
        "and 'vs best teacher' are test-accuracy differences in percentage points; loss ms/step is the mean wall "
        "time of one loss computation (forward only) in training.",
        "",
    ]
    if demo.messages:
        lines += [f"> {msg}" for msg in demo.messages] + [""]
    lines.append(tables_markdown(demo))
    return "\n".join(lines)


def results_json(demo: DemoResults) -> dict:
    """JSON-ready dict: machine, command, mode, seed, timings, and per recipe its rows, curves and notes (or the
    ring's metrics)."""
    recipes = {}
    for name, result in demo.results.items():
        if _is_recipe_result(result):
            recipes[name] = {
                "time_s": demo.times[name],
                "rows": [dataclasses.asdict(r) for r in result.rows],
                "curves": {k: [float(v) for v in curve] for k, curve in result.curves.items()},
                "notes": list(result.notes),
            }
        else:
            recipes[name] = {"time_s": demo.times[name]} | result.to_json()
    return {
        "machine": demo.machine,
        "command": demo.command,
        "mode": demo.mode,
        "seed": demo.seed,
        "total_time_s": demo.total_time_s,
        "messages": list(demo.messages),
        "recipes": recipes,
    }


# ---------------------------------------------------------------------------------------------------------------
# figures


def _matplotlib():
    from mmfast.plot import _matplotlib_figure  # raises ImportError with the install hint

    return _matplotlib_figure()


def plot_curves(demo: DemoResults, path: Path) -> Path | None:
    """``curves.png``: test accuracy per epoch of every model, one panel per AV-Digits recipe (None if there are
    no curves)."""
    panels = [(n, r) for n, r in demo.results.items() if _is_recipe_result(r) and r.curves]
    if not panels:
        return None
    Figure, FigureCanvasAgg = _matplotlib()
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(5.2 * len(panels), 4.2), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, result) in zip(axes, panels, strict=True):
        for label, curve in result.curves.items():
            epochs = list(range(1, len(curve) + 1))
            ax.plot(epochs, [100 * v for v in curve], marker="o", markersize=3, linewidth=1.2, label=label)
        ax.set_title(name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _reliability_panel(ax, logits: torch.Tensor, labels: torch.Tensor, title: str, n_bins: int = 15) -> None:
    from mmfast.calibration import CalibrationStats

    stats = CalibrationStats.from_logits(logits, labels, n_bins)
    width = 1.0 / stats.n_bins
    lefts = stats.edges.tolist()[:-1]
    counts, acc, conf = stats.counts.tolist(), stats.accuracy.tolist(), stats.mean_confidence.tolist()
    filled = [i for i, n in enumerate(counts) if n > 0]
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1)
    for sparse in (False, True):  # bins with few samples are drawn pale: their accuracy is mostly noise
        bins = [i for i in filled if (counts[i] < SPARSE_BIN) == sparse]
        if not bins:
            continue
        suffix = f" (< {SPARSE_BIN} samples: pale)" if sparse else ""
        ax.bar([lefts[i] for i in bins], [acc[i] for i in bins], width=width, align="edge", color="tab:blue",
               alpha=0.3 if sparse else 1.0, edgecolor="black", linewidth=0.5, label="accuracy" + suffix)
        ax.bar([lefts[i] for i in bins], [abs(conf[i] - acc[i]) for i in bins],
               bottom=[min(acc[i], conf[i]) for i in bins], width=width, align="edge", color="tab:red",
               alpha=0.12 if sparse else 0.35, edgecolor="tab:red", linewidth=0.5,
               label=None if sparse else "gap to confidence")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"{title}\nECE {100 * float(stats.ece()):.2f}%, N = {int(sum(counts))}", fontsize=8)
    ax.tick_params(labelsize=7)


def plot_reliability(demo: DemoResults, path: Path, ncols: int = 4) -> Path | None:
    """``reliability.png``: one reliability diagram (accuracy per confidence bin, gap to the mean confidence in red)
    per entry of every recipe's ``reliability`` (None if there is none)."""
    panels = [(f"{name}: {label}", logits, labels)
              for name, result in demo.results.items() if _is_recipe_result(result)
              for label, (logits, labels) in result.reliability.items()]
    if not panels:
        return None
    Figure, FigureCanvasAgg = _matplotlib()
    cols = min(ncols, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(3.2 * cols, 3.3 * rows), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= len(panels):
            ax.set_visible(False)
            continue
        title, logits, labels = panels[k]
        _reliability_panel(ax, logits, labels, title)
        if k % cols == 0:
            ax.set_ylabel("accuracy")
        if k >= len(panels) - cols:
            ax.set_xlabel("confidence")
    legend: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend), loc="upper center", ncol=len(legend), fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    fig.savefig(path, format="png")
    return path


def write_outputs(demo: DemoResults, out_dir: Path) -> list[Path]:
    """Write the figures (when matplotlib is there), ``results.md`` and ``results.json`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    try:
        _matplotlib()
    except ImportError as err:
        demo.messages.append(f"Figures skipped: {err}.")
        print(f"[mmfast demo] warning: {err}; writing the tables only", file=sys.stderr)
    else:
        for plot, filename in ((plot_curves, "curves.png"), (plot_reliability, "reliability.png")):
            written = plot(demo, out_dir / filename)
            if written is not None:
                files.append(written)
        ring = demo.results.get("one_step_ring")
        if ring is not None:
            from mmfast.recipes.one_step_ring import plot_ring_samples

            for divergence in dict.fromkeys(r.divergence for r in ring.runs):
                files.append(plot_ring_samples(ring, divergence, out_dir / f"ring_{divergence}.png"))
    md = out_dir / "results.md"
    md.write_text(results_markdown(demo))
    js = out_dir / "results.json"
    js.write_text(json.dumps(results_json(demo), indent=2) + "\n")
    return [md, js, *files]


# ---------------------------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``demo`` subcommand's options."""
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="CI preset: a few epochs per recipe and a short ring run, well under a minute in all")
    mode.add_argument("--full", action="store_true",
                      help="the ring's whole documented grid (4 divergences x 2 forms) instead of reverse KL only "
                           "(about 3 minutes more)")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"output folder for results.md, results.json and the PNGs (default ./{DEFAULT_OUT})")
    parser.add_argument("--recipes", nargs="+", choices=RECIPES, metavar="NAME",
                        help=f"recipes to run, any of: {', '.join(RECIPES)} (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every recipe (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars or status lines")
    parser.add_argument("--threads", type=_threads, default=1, metavar="N",
                        help="torch intra-op threads (default 1: the networks are tiny, so more threads mostly add "
                             "synchronisation, and a busy machine slows them down many times; 0: torch's default)")
    parser.add_argument("--data", default=None, metavar="PATH",
                        help=f"AV-Digits .npz file (default: ${DATA_ENV} if set, else the file shipped with mmfast)")


def _threads(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"--threads must be >= 0, got {value}")
    return value


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    """Run the demo from parsed arguments; returns the exit code (2 when the data file is missing or invalid:
    the loader's message, which names the file and how to regenerate it, goes to stderr)."""
    mode = "quick" if args.quick else "full" if args.full else "default"
    words = list(sys.argv[1:] if argv is None else argv)
    command = "python -m mmfast " + " ".join(words) if words else "python -m mmfast demo"
    names = select_recipes(args.recipes, mode)
    data = None
    if any(n in DATA_RECIPES for n in names):
        try:
            data = load_data(args.data)
        except (FileNotFoundError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        demo = run_demo(names, mode=mode, seed=args.seed, out_dir=args.out, data=data,
                        progress=not args.no_progress, command=command)
    finally:
        torch.set_num_threads(threads)
    print(tables_markdown(demo))
    print(f"wrote {', '.join(str(p) for p in demo.files)}")
    return 0
