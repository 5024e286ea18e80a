"""Routed-KD (or mutual-KD) throughput against the class count C at a fixed number of logits N*C (SPEC
section 7: no throughput cliff from C = 10 to C = 256k).

For each C, N = elements // C student rows and E dense teachers (--loss mutual: M = E models); every
provider's forward + backward step is timed as ``python -m mmfast bench`` times it
(``mmfast.bench.measure_group``: interleaved rounds; on a GPU CUDA-graph replays and the ``copy`` provider of
the minimal bytes), and reported as GB/s on the minimal-byte model and, on a GPU, % of copy bandwidth. A cliff
shows as a C where a provider's bandwidth drops.

Usage: python benchmarks/class_sweep.py [--device cpu|cuda] [--dtype float32|bfloat16] [--elements N*C]
       [--loss routed|mutual] [--E 2] [--classes 10,100,...] [--budget 0.3] [--json PATH] [--plot PATH.png]
       [--no-compile]
Prints a markdown table; --json writes the rows, --plot a PNG of GB/s against C (needs matplotlib).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math

import torch

from mmfast import bench

DEFAULT_CLASSES = (10, 100, 1000, 8192, 32768, 131072, 262144)


def sweep(device: torch.device, dtype: torch.dtype, elements: int, E: int, classes, budget_s: float,
          compile_: bool, loss: str = "routed") -> list[dict]:
    rows = []
    for C in classes:
        N = max(1, elements // C)
        case = bench.RoutedCase(N=N, C=C, E=E) if loss == "routed" else bench.MutualCase(M=E, N=N, C=C)
        wanted = {"copy"} | ({"compile"} if compile_ else set())
        names = [p for p in bench.providers(case, device, dtype)
                 if p in wanted or (p.startswith("mmfast-") and p != "mmfast-torch")]
        results = {r.provider: r for r in bench.measure_group(case, dtype, names, device, budget_s=budget_s)}
        copy = results.get("copy")
        copy_bw = copy.bytes / copy.median_s if copy and copy.error is None and copy.median_s > 0 else None
        for name, r in results.items():
            if name == "copy":
                continue
            bw = r.bytes / r.median_s if r.error is None and r.bytes and r.median_s > 0 else math.nan
            rows.append({"C": C, "N": case.N, "provider": name, "median_s": r.median_s, "gb_s": bw / 1e9,
                         "pct_copy": 100 * bw / copy_bw if copy_bw else None, "error": r.error})
        print(f"C={C} done", flush=True)
    return rows


def render(rows: list[dict]) -> str:
    lines = ["| C | N | provider | median | GB/s | % copy |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['C']} | {r['N']} | {r['provider']} | failed: {r['error']} | | |")
            continue
        pct = f"{r['pct_copy']:.0f}%" if r["pct_copy"] is not None else ""
        time_ms = r["median_s"] * 1e3
        lines.append(f"| {r['C']} | {r['N']} | {r['provider']} | {time_ms:.3f} ms | {r['gb_s']:.1f} | {pct} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for provider in dict.fromkeys(r["provider"] for r in rows):
        pts = [(r["C"], r["gb_s"]) for r in rows if r["provider"] == provider and not r["error"]]
        ax.plot([c for c, _ in pts], [g for _, g in pts], marker="o", label=provider)
    ax.set_xscale("log")
    ax.set_xlabel("classes C (N*C fixed)")
    ax.set_ylabel("GB/s on the minimal bytes")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None)
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    ap.add_argument("--elements", type=int, default=None, help="N*C (default: 2^24 on a GPU, 2^20 on a CPU)")
    ap.add_argument("--loss", choices=("routed", "mutual"), default="routed")
    ap.add_argument("--E", type=int, default=2, help="teachers (routed) or models (mutual)")
    ap.add_argument("--classes", default=",".join(map(str, DEFAULT_CLASSES)))
    ap.add_argument("--budget", type=float, default=0.3, help="seconds of timed rounds per provider and C")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device) if args.device else bench.default_device()
    dtype = getattr(torch, args.dtype)
    elements = args.elements or (1 << 24 if device.type == "cuda" else 1 << 20)
    classes = [int(c) for c in args.classes.split(",")]
    info = bench.machine_info(device)
    if args.loss == "routed":
        what = f"routed KD, N*C = {elements}, E = {args.E}"
    else:
        what = f"mutual KD, N*C = {elements}, M = {args.E}"
    title = f"{what}, {args.dtype}, {info['device_name']}"
    print(bench.describe_machine(info, datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")))
    rows = sweep(device, dtype, elements, args.E, classes, args.budget, not args.no_compile, args.loss)
    print(f"\n## {title}\n\n{render(rows)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine_info": info, "title": title, "rows": rows}, f, indent=1)
    if args.plot:
        plot(rows, args.plot, title)


if __name__ == "__main__":
    main()
