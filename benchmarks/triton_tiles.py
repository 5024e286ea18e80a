"""Sweep the launch tuning of the Triton routed-KD and mutual-KD kernels (a GPU lease's tuning run).

Each kernel picks its program shape from a module tuple (``mmfast.triton.routed_kd.ROW_TILES``,
``mmfast.triton.mutual_kd.ROW_TILES``): (tile, per_thread, stream_tile, stream_per_thread), the elements a
program holds when a row fits it whole (and per thread, which sets num_warps), else the streamed block; and
streamed rows are swept back and forth or every pass forward (the modules' ``STREAM_ZIGZAG``), with or without
L2 evict-first hints on their last read and gradient stores (``STREAM_L2_HINTS``). This script times the bare
kernel (``*_rows``, forward with the gradients written) for candidate tuples at shapes from C = 10 to 131072,
fp32 and bf16, the default tuple also without the hints and with neither (the L2 reuse of streamed rows), and
reports time, GB/s on the minimal bytes and % of the copy bandwidth of the same bytes, marking the current
default and the best candidate of each shape. Every candidate's outputs are compared with the default's (a
tuning must not change values beyond rounding).

    python benchmarks/triton_tiles.py [--quick | --sweeps] [--json PATH]   # on a GPU: triton.testing.do_bench

``--sweeps`` times only the three sweep settings at the default tiles, for the shapes whose rows stream through
the one-launch kernel (on an H100/H200: C >= 32768): a minute where the whole sweep takes several.

On a CPU (``TRITON_INTERPRET=1``, tiny shapes; for testing the script) the times are the interpreter's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from mmfast.triton import mutual_kd as triton_mutual  # noqa: E402
from mmfast.triton import routed_kd as triton_routed  # noqa: E402

# (tile, per_thread) of whole rows, then (stream_tile, stream_per_thread) of streamed blocks
WHOLE_ROW_TILES = ((2048, 8), (2048, 16), (4096, 8), (4096, 16), (4096, 32), (8192, 16), (8192, 32))
STREAM_TILES = ((4096, 16), (8192, 16), (8192, 32), (16384, 32), (16384, 64))


@dataclass(frozen=True)
class Shape:
    kernel: str  # "routed" (mix loss, kl, dense, student gradient) or "mutual" (gradients to all models)
    N: int
    C: int
    E: int  # teachers (routed) or models (mutual)

    def label(self) -> str:
        return f"{self.kernel} N={self.N} C={self.C} {'E' if self.kernel == 'routed' else 'M'}={self.E}"

    def minimal_bytes(self, dtype: torch.dtype) -> int:
        s = torch.finfo(dtype).bits // 8
        if self.kernel == "routed":
            return self.N * self.C * (s + self.E * s + s) + self.N * self.E * 4
        return self.E * self.N * self.C * 2 * s


GPU_SHAPES = (
    Shape("routed", 65536, 10, 4), Shape("routed", 8192, 1000, 4), Shape("routed", 1024, 32768, 4),
    Shape("routed", 4096, 32768, 2), Shape("routed", 256, 131072, 4),
    Shape("mutual", 8192, 1000, 3), Shape("mutual", 2048, 32768, 3), Shape("mutual", 256, 131072, 3),
)
QUICK_GPU_SHAPES = (Shape("routed", 8192, 1000, 4), Shape("routed", 1024, 32768, 4))
# the interpreter (fp32): tiny, and two rows streamed at the default tiles (4096-class whole rows)
CPU_SHAPES = (Shape("routed", 6, 10, 2), Shape("mutual", 5, 33, 3), Shape("routed", 2, 5000, 2))


Candidate = tuple[tuple[int, int, int, int], bool, bool]  # (ROW_TILES, STREAM_ZIGZAG, STREAM_L2_HINTS)
SETTINGS = ("ROW_TILES", "STREAM_ZIGZAG", "STREAM_L2_HINTS")


def candidates(default: tuple[int, int, int, int], zigzag: bool = True, hints: bool = True) -> list[Candidate]:
    """The default; its tiles without the L2 hints, then with every pass forward and no hints; then each
    whole-row pair with the default streaming, then each streaming pair with the default whole-row pair (these
    with the default zigzag and hints)."""
    default = tuple(default)
    tile, per_thread, stream_tile, stream_per_thread = default
    out = [(default, zigzag, hints), (default, zigzag, not hints), (default, not zigzag, not hints)]
    out += [((t, p, stream_tile, stream_per_thread), zigzag, hints) for t, p in WHOLE_ROW_TILES]
    out += [((tile, per_thread, t, p), zigzag, hints) for t, p in STREAM_TILES]
    return list(dict.fromkeys(out))


def sweep_label(zigzag: bool, hints: bool) -> str:
    return ("zigzag" if zigzag else "forward") + (" + hints" if hints else "")


def make_call(shape: Shape, dtype: torch.dtype, device: torch.device) -> Callable[[], tuple]:
    g = torch.Generator(device).manual_seed(0)  # drawn on the device: the long rows are GBs
    if shape.kernel == "routed":
        x = (2 * torch.randn(shape.N, shape.C, 1, generator=g, device=device)).to(dtype)
        z = (2 * torch.randn(shape.E, shape.N, shape.C, 1, generator=g, device=device)).to(dtype)
        w = torch.softmax(torch.randn(shape.N, shape.E, generator=g, device=device), dim=1)
        return lambda: triton_routed.routed_kd_rows(x, z, w, None, None, 4.0, 0, 0, 0.5, 1.0 / shape.N,
                                                    True, False, False)
    logits = (2 * torch.randn(shape.E, shape.N, shape.C, generator=g, device=device)).to(dtype)
    return lambda: triton_mutual.mutual_kd_rows(logits, 4.0, 1.0 / shape.N, True)


def streams(shape: Shape, device: torch.device) -> bool:
    """Whether the shape's rows stream through the one-launch kernel at the default tiles (neither whole in one
    block nor split across programs): the rows the sweep settings apply to."""
    if shape.kernel == "routed":
        block_c = triton_routed._launch_plan(shape.N, shape.C, 1, shape.E, triton_routed.ROW_TILES,
                                             triton_routed.PIXEL_TILES, triton_routed.PIXELS_PER_PROGRAM)[2]
        split = triton_routed.split_rows_plan(shape.N, shape.C, 1, block_c, device)[0]
    else:
        block_c, _, _, split, _, _ = triton_mutual.launch_plan(shape.E, shape.N, shape.C, device)
    return shape.C > block_c and split == 1


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds per call: triton.testing.do_bench on a GPU (median, L2 flushed), else a short wall-clock loop."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") / 1e3
    fn()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def copy_seconds(nbytes: int, device: torch.device) -> float:
    src = torch.ones(max(nbytes // 2, 1), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return time_call(lambda: dst.copy_(src), device)


def module_of(kernel: str):
    return triton_routed if kernel == "routed" else triton_mutual


def sweep(
    shapes: tuple[Shape, ...], dtypes: tuple[torch.dtype, ...], device: torch.device, sweeps_only: bool = False
) -> list[dict]:
    """Time every candidate (``sweeps_only``: the default tiles' three sweep settings) of each shape and dtype."""
    rows = []
    for shape in shapes:
        module = module_of(shape.kernel)
        default = tuple(getattr(module, name) for name in SETTINGS)
        for dtype in dtypes:
            call = make_call(shape, dtype, device)
            nbytes = shape.minimal_bytes(dtype)
            t_copy = copy_seconds(nbytes, device)
            expected = call()
            tried = candidates(*default)[: 3 if sweeps_only else None]
            for candidate in tried:
                for name, value in zip(SETTINGS, candidate, strict=True):
                    setattr(module, name, value)
                try:
                    got = call()
                    for a, b in zip(got, expected, strict=True):
                        if a.numel():
                            tol = 1e-5 if dtype == torch.float32 else 2e-2
                            torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)
                    seconds, error = time_call(call, device), None
                except Exception as e:  # a tuple the kernel cannot run (e.g. registers): record it
                    seconds, error = float("nan"), f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                finally:
                    for name, value in zip(SETTINGS, default, strict=True):
                        setattr(module, name, value)
                tiles, zigzag, hints = candidate
                rows.append(dict(shape=shape.label(), dtype=str(dtype).removeprefix("torch."), tiles=list(tiles),
                                 zigzag=zigzag, hints=hints, default=candidate == default, seconds=seconds,
                                 gbps=nbytes / seconds / 1e9, copy_pct=100 * t_copy / seconds, error=error,
                                 kernel=shape.kernel))
            print(f"{shape.label()} {dtype}: {len(tried)} candidates", file=sys.stderr, flush=True)
    return rows


def render(rows: list[dict]) -> str:
    lines = ["| shape | dtype | tiles | sweep | time | GB/s | % copy | |", "|---|---|---|---|---|---|---|---|"]
    best: dict[tuple[str, str], float] = {}
    for r in rows:
        if r["error"] is None:
            key = (r["shape"], r["dtype"])
            best[key] = min(best.get(key, float("inf")), r["seconds"])
    for r in rows:
        key = (r["shape"], r["dtype"])
        marks = [m for m, on in (("default", r["default"]), ("best", r["seconds"] == best.get(key))) if on]
        head = f"| {r['shape']} | {r['dtype']} | {tuple(r['tiles'])} | {sweep_label(r['zigzag'], r['hints'])} |"
        if r["error"] is not None:
            lines.append(f"{head} failed: {r['error']} | | | |")
            continue
        lines.append(f"{head} {r['seconds'] * 1e6:.1f} us | "
                     f"{r['gbps']:.0f} | {r['copy_pct']:.0f}% | {', '.join(marks)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two routed-KD shapes only")
    ap.add_argument("--sweeps", action="store_true",
                    help="the default tiles' sweep settings only, at the shapes whose rows stream")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        shapes, dtypes = (QUICK_GPU_SHAPES if args.quick else GPU_SHAPES), (torch.float32, torch.bfloat16)
    else:
        shapes, dtypes = CPU_SHAPES, (torch.float32,)
    if args.sweeps:
        shapes = tuple(s for s in shapes if streams(s, device))
    rows = sweep(shapes, dtypes, device, sweeps_only=args.sweeps)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton interpreter)"
    print(f"{name}, torch {torch.__version__}\n")
    print(render(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
