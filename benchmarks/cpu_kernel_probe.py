"""Times the fused CPU routed-KD kernel against its floors and peers, side by side in one process.

  exp floor    torch.exp over (E + 1) * N * C elements (the exps the kernel must do), out= preallocated
  cpu kernel   mmfast._native.routed_kd_rows("cpu", ...) with dx (the gradient is written in forward),
               and the bare mmfast._C.routed_kd_cpu call into preallocated outputs
  compile      torch.compile of the reference (loss and explicit dx), and of the plain autograd loss
               (forward + backward)

Usage: python benchmarks/cpu_kernel_probe.py [--n 256] [--c 8192] [--e 4] [--dtype float32]
       [--threads T] [--no-compile]
Prints medians and minima in milliseconds, and their ratios to the exp floor; no files written.
"""

from __future__ import annotations

import argparse

import torch
import torch.utils.benchmark as tb

from mmfast import _native
from mmfast.reference.routed_kd import routed_kd_rows


def plain_loss(x, z, w, tau):
    """sum_n sum_e w_ne KL(p_e || q) * tau^2, written the way a user would (autograd backward)."""
    lq = torch.log_softmax(x / tau, dim=-1)
    lp = torch.log_softmax(z / tau, dim=-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)  # [E, N]
    return (w.t() * kl).sum() * tau * tau


def timeit(fn, min_run_time=1.0) -> tuple[float, float]:
    """(median, min) in ms over blocks of runs; on a shared machine the min is the undisturbed time."""
    # num_threads: torch.utils.benchmark runs the statement on 1 thread unless told (the kernels take
    # torch.get_num_threads() too)
    timer = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return m.median * 1e3, min(m.times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--c", type=int, default=8192)
    ap.add_argument("--e", type=int, default=4)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=0, help="torch and kernel threads (0: default)")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dt = getattr(torch, args.dtype)
    N, C, E, tau = args.n, args.c, args.e, 4.0
    torch.manual_seed(0)
    x = torch.randn(N, C, 1, dtype=dt)
    z = torch.randn(E, N, C, 1, dtype=dt)
    w = torch.rand(N, E).softmax(-1)
    flat = torch.randn((E + 1) * N * C, dtype=dt)
    out = torch.empty_like(flat)

    print(f"N={N} C={C} E={E} {dt} threads={torch.get_num_threads()}")
    results = {}
    results["exp floor"] = timeit(lambda: torch.exp(flat, out=out))

    def kernel():
        return _native.routed_kd_rows(
            "cpu", x, z, w, None, None, tau, 0, 0, 0.5, tau * tau, True, False, False
        )

    # the kernel alone, outputs preallocated (as the exp floor's out=)
    loss, dx = torch.empty(N, 1), torch.empty_like(x)
    params = _native.routed_kd_params(x, z, w, None, None, tau, 0, 0, 0.5, tau * tau, loss, dx, None, None)
    threads = torch.get_num_threads()
    results["cpu kernel (loss+dx), no alloc"] = timeit(lambda: _native.load().routed_kd_cpu(params, threads))
    results["cpu kernel (loss+dx)"] = timeit(kernel)
    results["cpu kernel (loss+dx+dw+dz)"] = timeit(
        lambda: _native.routed_kd_rows(
            "cpu", x, z, w, None, None, tau, 0, 0, 0.5, tau * tau, True, True, True
        )
    )

    if not args.no_compile:
        ref_c = torch.compile(routed_kd_rows)

        def ref_compiled():
            return ref_c(x, z, w, None, None, tau, 0, 0, 0.5, tau * tau, True, False, False)

        ref_compiled()
        results["compile(reference loss+dx)"] = timeit(ref_compiled)

        plain_c = torch.compile(plain_loss)
        xs = x[..., 0].clone().requires_grad_()
        zs = z[..., 0]

        def plain_compiled():
            xs.grad = None
            plain_c(xs, zs, w, tau).backward()

        plain_compiled()
        results["compile(autograd loss) fwd+bwd"] = timeit(plain_compiled)

    floor_med, floor_min = results["exp floor"]
    print(f"{'':34s} {'median':>9s}    {'min':>9s}    median/floor  min/floor")
    for name, (med, low) in results.items():
        print(f"{name:34s} {med:9.3f} ms {low:9.3f} ms  {med / floor_med:9.2f}x  {low / floor_min:9.2f}x")


if __name__ == "__main__":
    main()
