"""Plain against streaming (non-temporal) gradient stores in the CPU kernels, per case, side by side.

The CPU kernels write their gradients with streaming stores when a call moves more bytes than
``mmfast._C.cpu_streaming_min_bytes()`` (csrc/cpu/streaming_stores.cpp: the last-level cache, at most 64 MiB).
This script times the forward + backward step (``torch.autograd.grad``) of the score and reconstruction losses
with the stores forced plain and forced streaming, alternating the two in rounds, and prints the medians, the
bytes each call moves (inputs read once, gradients written once) and where the default threshold puts it: the
measurement behind that threshold, and the way to check it on another machine.

Usage: python benchmarks/streaming_threshold.py [--threads 2] [--rounds 4] [--seconds 0.7]
Run it with glibc told to reuse its heap (MALLOC_MMAP_THRESHOLD_=2147483648 MALLOC_TRIM_THRESHOLD_=4294967296), as
the other CPU benchmarks, to leave page faults out.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
import torch.utils.benchmark as tb

import mmfast
from mmfast import _native

NEVER = 1 << 62  # a threshold no call reaches: plain stores


def cases() -> dict[str, tuple[int, Callable[[], object]]]:
    """name -> (bytes a call moves, the step)."""
    gen = torch.Generator().manual_seed(0)
    out: dict[str, tuple[int, Callable[[], object]]] = {}
    for B, shape in [(64, (3, 64, 64)), (256, (3, 64, 64)), (32, (4, 128, 128))]:
        x, a, b = (torch.randn(B, *shape, generator=gen).requires_grad_() for _ in range(3))
        r = torch.exp(torch.empty(B).uniform_(-2.3, 3.0, generator=gen))
        size = x.numel() * x.element_size()
        label = f"B={B} {'x'.join(map(str, shape))}"
        out[f"uni-instruct {label}"] = (6 * size, lambda x=x, a=a, b=b, r=r: torch.autograd.grad(
            mmfast.uni_instruct_loss(x, a, b, r, divergence="jeffreys", fgm=True, di=True), [x, a, b]))
        out[f"fdistill {label}"] = (4 * size, lambda x=x, a=a, b=b, h=r / (1 + r): torch.autograd.grad(
            mmfast.fdistill_loss(x, a.detach(), b.detach(), h), [x]))
    for N in (1024, 2048, 4096, 8192):
        pred, target = torch.randn(N, 1024, generator=gen).requires_grad_(), torch.randn(N, 1024, generator=gen)
        out[f"masked-recon {N}x1024"] = (3 * pred.numel() * 4, lambda p=pred, y=target: torch.autograd.grad(
            mmfast.masked_reconstruction_loss(p, y), [p]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4, help="plain/streaming alternations (default 4)")
    parser.add_argument("--seconds", type=float, default=0.7, help="blocked_autorange time per measurement")
    args = parser.parse_args()
    from mmfast import _C

    threshold = _C.cpu_streaming_min_bytes()
    steps = cases()
    times: dict[str, dict[str, list[float]]] = {name: {"plain": [], "streaming": []} for name in steps}
    for _ in range(args.rounds):
        for label, min_bytes in (("plain", NEVER), ("streaming", 0)):
            with _native.cpu_streaming_min_bytes(min_bytes), mmfast.use_backend("cpu"):
                for name, (_, step) in steps.items():
                    timer = tb.Timer("step()", globals={"step": step}, num_threads=args.threads)
                    times[name][label].append(timer.blocked_autorange(min_run_time=args.seconds).median * 1e3)
    print(f"threads={args.threads}, rounds={args.rounds}; default threshold {threshold / 2**20:.0f} MiB")
    print(f"{'case':34s} {'MiB moved':>9s} {'default':>9s} {'plain ms':>9s} {'stream ms':>9s} {'plain/stream':>12s}")
    for name, (moved, _) in steps.items():
        plain, stream = (statistics.median(times[name][k]) for k in ("plain", "streaming"))
        default = "streaming" if moved > threshold else "plain"
        print(f"{name:34s} {moved / 2**20:9.0f} {default:>9s} {plain:9.2f} {stream:9.2f} {plain / stream:12.2f}")


if __name__ == "__main__":
    main()
