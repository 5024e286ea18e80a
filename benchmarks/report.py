"""Markdown tables from a pytest-benchmark JSON file (or one written by ``python -m mmfast bench --json``).

Usage: python benchmarks/report.py out.json [-o report.md] [--plot report.png]

One table per group (shape and dtype): provider, median, IQR, the forward and backward parts where they were
timed, speedup vs eager and vs torch.compile (t_baseline / t), time over the exp floor, GB/s with % of the copy
bandwidth where a copy was timed, and each loss step's peak memory. ``--plot`` draws, per group, each loss
provider's step time split into forward and backward, with its peak memory (needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:
    from mmfast import bench
except ImportError:  # a source checkout that is not installed: use the package next to this folder
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mmfast import bench


def render(doc: dict) -> str:
    info = doc.get("machine_info", {})
    lines = ["# mmfast benchmarks", "", bench.describe_machine(info, doc.get("datetime", "?")), ""]
    if info.get("mmfast_backends"):
        available = [name for name, ok in info["mmfast_backends"].items() if ok]
        lines += [f"mmfast backends available: {', '.join(available)} (auto: {info.get('mmfast_auto')})", ""]
    lines += [
        "Forward + backward per training step (median; fwd, bwd: its two parts, where timed apart). vs eager /"
        " vs compile: t_baseline / t (above 1 is faster); / exp-floor: t / t_exp; GB/s: minimal bytes / t (copy:"
        " bytes read + written); peak MiB: memory a loss step allocates beyond its inputs.",
        "",
    ]
    return "\n".join(lines) + bench.render_tables(bench.load_results(doc))


def plot(results: list[bench.Result], path: str, title: str = "") -> None:
    """A PNG with one panel per group: each loss provider's median step as a horizontal bar, split into its
    forward and backward parts where they were timed apart, labelled with the step time and peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[bench.Result]] = {}
    for r in results:
        if r.error is None and bench.is_loss_provider(r.provider):
            groups.setdefault(r.group, []).append(r)
    if not groups:
        raise ValueError("no loss provider results to plot")
    cols = min(3, len(groups))
    rows = -(-len(groups) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 0.45 * 5 * rows + 1.2), squeeze=False)
    for ax, (group, rs) in zip(axes.flat, groups.items(), strict=False):
        names = [r.provider for r in rs]
        ypos = range(len(rs))
        fwd = [r.forward_s * 1e3 if r.forward_s is not None else r.median_s * 1e3 for r in rs]
        bwd = [max(r.median_s * 1e3 - f, 0.0) if r.forward_s is not None else 0.0 for r, f in zip(rs, fwd, strict=True)]
        ax.barh(ypos, fwd, color="tab:blue", label="forward")
        ax.barh(ypos, bwd, left=fwd, color="tab:orange", label="backward")
        for y, r in zip(ypos, rs, strict=True):
            peak = f", {r.peak_bytes / 2**20:.1f} MiB" if r.peak_bytes is not None else ""
            ax.text(r.median_s * 1e3, y, f" {r.median_s * 1e3:.2f} ms{peak}", va="center", fontsize=7)
        ax.set_yticks(list(ypos), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, max(r.median_s for r in rs) * 1e3 * 1.6)
        ax.set_xlabel("ms per step", fontsize=8)
        ax.set_title(group, fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_path", help="pytest-benchmark JSON (--benchmark-json), or mmfast bench --json")
    parser.add_argument("-o", "--output", help="write the markdown here instead of stdout")
    parser.add_argument("--plot", metavar="PNG", help="also draw each group's step times and peak memory (matplotlib)")
    args = parser.parse_args(argv)
    doc = json.loads(Path(args.json_path).read_text())
    text = render(doc)
    if args.plot:
        info = doc.get("machine_info", {})
        plot(bench.load_results(doc), args.plot, f"{info.get('device_name', '?')}, torch {info.get('torch', '?')}")
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
