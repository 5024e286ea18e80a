"""Is a CPU loss bandwidth-bound? The machine's memory bandwidth as torch sees it, each fused score /
reconstruction kernel's achieved bandwidth on its minimal bytes, and the fwd+bwd step of mmfast-cpu against
torch.compile of the reference, all timed the same way in one process.

  torch      a 256 MiB fp32 sum (read), fill_ (write), copy_ (read + write), add (2 reads + write)
  kernel     mmfast._native.<op>_rows("cpu", ...) alone: bytes = inputs read once + gradients written once
  step       forward + backward (torch.autograd.grad) of the bench's cases (mmfast.bench), mmfast-cpu and compile

Every time is the minimum and the median of a ``torch.utils.benchmark`` ``blocked_autorange`` run with
``num_threads`` threads (the Timer's default is 1 thread). Run it with glibc told to reuse its heap
(``MALLOC_MMAP_THRESHOLD_=2147483648 MALLOC_TRIM_THRESHOLD_=4294967296``) to leave page faults out.

Usage: python benchmarks/cpu_bandwidth.py [--threads 2] [--seconds 1.5] [--no-compile]
Prints a table; no files written.
"""

from __future__ import annotations

import argparse

import torch
import torch.utils.benchmark as tb

from mmfast import _native, bench

MIB = 2**20


def timeit(threads: int, seconds: float, fn, *args, **kwargs) -> tuple[float, float]:
    """(min, median) seconds of fn(*args, **kwargs) on ``threads`` threads."""
    timer = tb.Timer(stmt="fn(*args, **kwargs)", globals={"fn": fn, "args": args, "kwargs": kwargs},
                     num_threads=threads)
    m = timer.blocked_autorange(min_run_time=seconds)
    return min(m.times), m.median


def row(name: str, times: tuple[float, float], nbytes: int | None = None) -> str:
    lo, med = times
    bw = f"{nbytes / lo / 1e9:6.1f} GB/s" if nbytes else " " * 11
    return f"{name:58s} {lo * 1e3:8.3f} ms {med * 1e3:8.3f} ms   {bw}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--seconds", type=float, default=1.5)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    th, sec = args.threads, args.seconds
    print(f"threads={th}; columns: min, median, bandwidth at the min")

    n = 256 * MIB // 4
    src, dst, other = torch.randn(n), torch.empty(n), torch.randn(n)
    print(row("torch sum (read 256 MiB)", timeit(th, sec, torch.sum, src), 4 * n))
    print(row("torch fill_ (write 256 MiB)", timeit(th, sec, dst.fill_, 1.0), 4 * n))
    print(row("torch copy_ (read + write)", timeit(th, sec, dst.copy_, src), 8 * n))
    print(row("torch add out= (2 reads + write)", timeit(th, sec, torch.add, src, other, out=dst), 12 * n))
    del src, dst, other

    g = torch.Generator().manual_seed(0)
    for B, D in ((256, 3 * 64 * 64), (32, 4 * 128 * 128)):
        x, t0, t1 = (torch.randn(B, D, generator=g) for _ in range(3))
        coef = torch.randn(B, 3, generator=g)
        h = coef[:, 0].abs().contiguous()
        unit = B * D * 4
        fd = timeit(th, sec, _native.fdistill_rows, "cpu", x, t0, t1, h, 1.0 / B, True)
        print(row(f"kernel fdistill B={B} D={D} (3 read, 1 written)", fd, 4 * unit))
        uni = timeit(th, sec, _native.uni_instruct_rows, "cpu", x, t0, t1, coef, None, 1.0, 1.0 / B, True, True,
                     True, True, True)
        print(row(f"kernel uni_instruct B={B} D={D} (3 read, 3 written)", uni, 6 * unit))
    P, Y = torch.randn(8192, 1024, 1), torch.randn(8192, 1024, 1)
    recon = timeit(th, sec, _native.masked_reconstruction_rows, "cpu", P, Y, None, None, 0, 1.0, False, 1e-6, False,
                   True, False, False)
    print(row("kernel masked_reconstruction 8192x1024 (2 read, 1 written)", recon, 3 * P.numel() * 4))

    cases = [bench.FDistillCase(256, 3, 64, 64), bench.FDistillCase(32, 4, 128, 128),
             bench.UniInstructCase(256, 3, 64, 64), bench.UniInstructCase(32, 4, 128, 128),
             bench.MaskedReconCase(8192, 1024)]
    providers = ["mmfast-cpu"] + ([] if args.no_compile else ["compile"])
    for case in cases:
        kwargs = case.inputs(torch.device("cpu"), torch.float32)
        leaves = [v for v in kwargs.values() if isinstance(v, torch.Tensor) and v.requires_grad]
        results = {}
        for provider in providers:
            fn, context = bench._loss_fn(case, provider)

            def step(fn, context, kwargs, leaves):
                with context():
                    return torch.autograd.grad(fn(**kwargs), leaves)

            for _ in range(3):  # compilation, allocator
                step(fn, context, kwargs, leaves)
            results[provider] = timeit(th, sec, step, fn, context, kwargs, leaves)
            print(row(f"step {case.name} {provider}", results[provider]))
        if "compile" in results:
            (c_lo, c_med), (m_lo, m_med) = results["compile"], results["mmfast-cpu"]
            print(f"{'':58s} compile / mmfast-cpu: {c_lo / m_lo:.2f}x (min), {c_med / m_med:.2f}x (median)")


if __name__ == "__main__":
    main()
