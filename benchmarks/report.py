"""Markdown tables from a pytest-benchmark JSON file (or one written by ``python -m mmfast bench --json``).

Usage: python benchmarks/report.py out.json [-o report.md]

One table per group (shape and dtype): provider, median, IQR, speedup vs eager and vs torch.compile
(t_baseline / t), time over the exp floor, and GB/s with % of the copy bandwidth where a copy was timed.
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
        "Forward + backward per training step. vs eager / vs compile: t_baseline / t (above 1 is faster);"
        " / exp-floor: t / t_exp; GB/s: minimal bytes / t (copy: bytes read + written).",
        "",
    ]
    return "\n".join(lines) + bench.render_tables(bench.load_results(doc))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_path", help="pytest-benchmark JSON (--benchmark-json), or mmfast bench --json")
    parser.add_argument("-o", "--output", help="write the markdown here instead of stdout")
    args = parser.parse_args(argv)
    text = render(json.loads(Path(args.json_path).read_text()))
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
