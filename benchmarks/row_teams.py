"""The CUDA backend's row teams, split mode, cluster mode and sweep orders, each against the other choice, on the
same problems.

The routed-KD, mutual-KD and masked-reconstruction CUDA kernels give a row to a block or to a thread, split a
few long rows over several blocks, and give each of many long rows a thread-block cluster on sm_90+
(csrc/cuda/common.cuh); the thresholds that choose (rows of at most 32 classes and class-strided rows to threads,
fewer rows than SMs of at least 8192 classes split, more of them clusters) were set from arithmetic. Where a block
per row keeps more rows in flight than the L2 holds (before sm_90, or with the block team forced), its pass 2 runs
from each row's end back to its start and the row's last read and the gradient stores carry L2 evict-first hints
(common.cuh: RowSweep); the sweep problems time that against a forward sweep and against the same sweep without
the hints, with the block team forced.
This times the kernel launches alone (``mmfast._native.*_rows("cuda", ...)``: forward with every gradient written)
for each choice, with CUDA events, and prints one markdown row per problem: microseconds per call and GB/s of the
minimal bytes (inputs read once, gradients written once) for each choice, and which one the automatic choice
takes. Needs a GPU and ``mmfast._C`` built with ``MMFAST_WITH_CUDA=ON``:

    python benchmarks/row_teams.py [--reps 50]

``--device cpu`` runs the same code on tiny shapes over whatever ``_native`` launches (the tests point it at the
CUDA emulation): a smoke test of this script, with timings that mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from mmfast import _native
from mmfast.reference.masked_reconstruction import MSE

AUTO, BLOCK, THREAD = 0, 1, 2  # mmfast/kernels.h: kCudaRowTeamAuto, kCudaRowTeamBlock, kCudaRowTeamThread
SWEEPS = {"back+hints": 1, "back": 2, "forward": 3}  # mmfast/kernels.h: kCudaSweepBackHints, ...Back, ...Forward


@dataclass(frozen=True)
class Problem:
    name: str
    # what is compared: ("block", "thread"), ("whole rows", "split"), ("block", "cluster") ("cluster" is the
    # automatic choice, which on sm_90+ gives these rows clusters) or two sweep orders of a block per row
    # ("block forward", "block back", "block back+hints")
    choices: tuple[str, str]
    auto: str  # the automatic choice
    run: Callable[[str], None]  # launches the kernel with one of the choices
    nbytes: int


@contextlib.contextmanager
def _no_split() -> Iterator[None]:
    """No workspace, so the kernels keep rows whole."""
    original = _native._row_split_workspace
    _native._row_split_workspace = lambda *args: None
    try:
        yield
    finally:
        _native._row_split_workspace = original


@contextlib.contextmanager
def _block_sweep(order: int) -> Iterator[None]:
    with _native.cuda_row_team(BLOCK), _native.cuda_sweep_order(order):
        yield


def _choice_context(choice: str):
    if choice.startswith("block "):
        return _block_sweep(SWEEPS[choice.removeprefix("block ")])
    team = _native.cuda_row_team
    return {"block": lambda: team(BLOCK), "thread": lambda: team(THREAD), "cluster": lambda: team(AUTO),
            "whole rows": _no_split, "split": contextlib.nullcontext}[choice]()


def _streamed(rows: int, C: int, sources: int, size: int, device: torch.device) -> bool:
    """Whether a block per row keeps more in flight than the L2 holds (common.cuh: rows_in_flight_exceed_l2; two
    blocks per SM): then the automatic sweep of a block-per-row launch is back and forth with the hints."""
    if device.type != "cuda":
        return False  # the emulation's 50 MiB
    props = torch.cuda.get_device_properties(device)
    return min(rows, 2 * props.multi_processor_count) * sources * C * size > props.L2_cache_size


def _sweep_choices(sweep: str, rows: int, C: int, sources: int, size: int, device) -> tuple[tuple[str, str], str]:
    """The two sweep orders compared (``sweep``: "forward" or "back" against "back+hints") and the automatic one."""
    auto = "block back+hints" if _streamed(rows, C, sources, size, device) else "block forward"
    return (f"block {sweep}", "block back+hints"), auto


def routed(B: int, C: int, E: int, pixels: tuple[int, int] | None, device, dtype, split: bool = False,
           cluster: bool = False, sweep: str | None = None) -> Problem:
    g = torch.Generator(device=device).manual_seed(0)
    S = pixels[0] * pixels[1] if pixels else 1
    x = (2 * torch.randn(B, C, S, generator=g, device=device)).to(dtype)  # drawn on the device: GBs at the
    z = (2 * torch.randn(E, B, C, S, generator=g, device=device)).to(dtype)  # largest shapes
    w = torch.softmax(torch.randn(B, E, generator=g, device=device), dim=1)
    size = x.element_size()

    def run(choice: str) -> None:
        with _choice_context(choice):
            _native.routed_kd_rows("cuda", x, z, w, None, None, 4.0, 0, 0, 0.5, 16.0, True, False, False)

    where = f" {pixels[0]}x{pixels[1]} pixels (class_dim=1)" if pixels else ""
    if sweep is not None:
        choices, auto = _sweep_choices(sweep, B * S, C, E + 1, size, device)
    elif split:
        choices, auto = ("whole rows", "split"), "split"
    elif cluster:
        choices, auto = ("block", "cluster"), "cluster"
    else:  # the automatic choice, as thread_team_threads makes it (csrc/cuda/common.cuh)
        choices, auto = ("block", "thread"), "thread" if (S > 1 or C <= 32) and C <= 1024 else "block"
    return Problem(f"routed KD B={B} C={C}{where} E={E}", choices, auto, run, B * S * C * (E + 2) * size)


def mutual(M: int, N: int, C: int, device, dtype, split: bool = False, cluster: bool = False,
           sweep: str | None = None) -> Problem:
    g = torch.Generator(device=device).manual_seed(0)
    logits = (2 * torch.randn(M, N, C, generator=g, device=device)).to(dtype)

    def run(choice: str) -> None:
        with _choice_context(choice):
            _native.mutual_kd_rows("cuda", logits, 4.0, 16.0, True)

    if sweep is not None:
        choices, auto = _sweep_choices(sweep, N, C, M, logits.element_size(), device)
    elif split or cluster:
        choices = ("whole rows", "split") if split else ("block", "cluster")
        auto = choices[1]
    else:
        choices, auto = ("block", "thread"), "thread" if C <= 32 else "block"
    return Problem(f"mutual KD M={M} N={N} C={C}", choices, auto, run, 2 * M * N * C * logits.element_size())


def reconstruction(A: int, D: int, S: int, device, dtype) -> Problem:
    """Masked reconstruction (MSE, no mask) of feature maps [A, D, S] with channel_dim=1: channel-strided rows."""
    g = torch.Generator().manual_seed(0)
    pred, target = (torch.randn(A, D, S, generator=g).to(device, dtype) for _ in range(2))

    def run(choice: str) -> None:
        with _choice_context(choice):
            _native.masked_reconstruction_rows("cuda", pred, target, None, None, MSE, 1.0, False, 1e-6, False, True,
                                               False, False)

    auto = "thread" if S > 1 and D <= 1024 else "block"
    return Problem(f"masked reconstruction [{A}, {D}, {S}] (channel_dim=1)", ("block", "thread"), auto, run,
                   3 * A * D * S * pred.element_size())


def problems(device: torch.device, dtype: torch.dtype) -> list[Problem]:
    if device.type == "cpu":  # smoke test: tiny shapes (split needs >= 8192 classes)
        return [routed(64, 10, 3, None, device, dtype), routed(2, 5, 3, (4, 8), device, dtype),
                routed(3, 8192, 2, None, device, dtype, split=True),
                routed(4, 40, 2, None, device, dtype, cluster=True),  # automatic here: blocks (40 classes)
                mutual(2, 40, 10, device, dtype), reconstruction(2, 6, 9, device, dtype),
                routed(3, 300, 2, None, device, dtype, sweep="forward"), mutual(2, 3, 300, device, dtype, sweep="back")]
    return [
        routed(65536, 10, 4, None, device, dtype),
        routed(65536, 32, 4, None, device, dtype),
        routed(32768, 64, 4, None, device, dtype),
        routed(8, 19, 4, (128, 256), device, dtype),
        routed(8, 150, 2, (64, 128), device, dtype),
        routed(16, 131072, 2, None, device, dtype, split=True),
        routed(64, 32768, 2, None, device, dtype, split=True),
        # many long rows: a block per row re-reads rows the L2 no longer holds; clusters (sm_90) cut them
        routed(4096, 32768, 2, None, device, dtype, cluster=True),
        routed(2048, 16384, 4, None, device, dtype, cluster=True),
        routed(512, 131072, 2, None, device, dtype, cluster=True),
        mutual(3, 65536, 10, device, dtype),
        mutual(3, 8, 131072, device, dtype, split=True),
        mutual(3, 4096, 32768, device, dtype, cluster=True),
        # the same rows with a block per row (as before sm_90): sweep orders and L2 hints
        routed(4096, 32768, 2, None, device, dtype, sweep="forward"),
        routed(4096, 32768, 2, None, device, dtype, sweep="back"),
        mutual(3, 4096, 32768, device, dtype, sweep="forward"),
        mutual(3, 4096, 32768, device, dtype, sweep="back"),
        reconstruction(8, 256, 64 * 64, device, dtype),
    ]


def time_us(run: Callable[[], None], device: torch.device, reps: int) -> float:
    """Median microseconds per call (CUDA events on a GPU)."""
    for _ in range(3):
        run()
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3)
        else:
            t0 = time.perf_counter()
            run()
            samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


def table(device: torch.device, dtypes: list[torch.dtype], reps: int) -> str:
    """The markdown table, printed a row at a time as it is measured (a cut run keeps its rows)."""
    lines = ["| problem | dtype | first choice | us | GB/s | second choice | us | GB/s | auto |",
             "|---|---|---|---:|---:|---|---:|---:|---|"]
    print("\n".join(lines), flush=True)
    for dtype in dtypes:
        for p in problems(device, dtype):
            cells = []
            for choice in p.choices:
                us = time_us(functools.partial(p.run, choice), device, reps)
                cells += [choice, f"{us:.1f}", f"{p.nbytes / us / 1e3:.0f}"]
            lines.append(f"| {p.name} | {str(dtype)[6:]} | " + " | ".join(cells) + f" | {p.auto} |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated torch dtypes")
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    native = _native.load()
    if native is None or not getattr(native, "with_cuda", False):
        raise SystemExit("row_teams.py needs mmfast._C built with MMFAST_WITH_CUDA=ON")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("row_teams.py: no CUDA device")
    return table(device, [getattr(torch, name) for name in args.dtypes.split(",")], args.reps)


if __name__ == "__main__":
    main()
