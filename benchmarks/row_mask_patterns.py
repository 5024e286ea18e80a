"""How the layout of a row mask's kept rows changes what skipping the excluded rows saves (CPU kernel).

The masked-reconstruction kernel does not read the rows a row mask excludes. What that saves depends on
where the excluded rows lie: the time of the bare kernel (``mmfast._native.masked_reconstruction_rows``,
mse, gradient to pred, N x D fp32 rows) for periodic masks "keep k rows, skip s rows" and random masks,
as a fraction of the unmasked time, next to the fraction of bytes the kernel must move (kept rows read,
the whole gradient written). Medians of interleaved rounds; run with glibc told to reuse its heap
(``MALLOC_MMAP_THRESHOLD_=2147483648 MALLOC_TRIM_THRESHOLD_=4294967296``).

    python benchmarks/row_mask_patterns.py [--N 8192] [--D 1024] [--rounds 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mmfast import _native


def periodic(N: int, keep: int, skip: int) -> torch.Tensor:
    return ((torch.arange(N) % (keep + skip)) < keep).float()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--N", type=int, default=8192)
    ap.add_argument("--D", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    N, D = args.N, args.D
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(N, D, 1, generator=g), torch.randn(N, D, 1, generator=g)
    masks = {"none": torch.ones(N)}
    for keep, skip in ((3, 1), (12, 4), (48, 16), (1, 1), (4, 4), (32, 32), (1, 3), (8, 24)):
        masks[f"keep {keep}, skip {skip}"] = periodic(N, keep, skip)
    for fraction in (0.75, 0.25):
        m = torch.zeros(N)
        m[torch.randperm(N, generator=g)[: round(N * fraction)]] = 1.0
        masks[f"random {100 * fraction:.0f}%"] = m
    weights = {name: m / (m.sum() * D) for name, m in masks.items()}  # the "mean" row weights

    def kernel(w: torch.Tensor) -> None:
        _native.masked_reconstruction_rows("cpu", pred, target, w, None, 0, 1.0, False, 1e-6, False, True, False,
                                           False)

    for w in weights.values():
        kernel(w)
    times: dict[str, list[float]] = {name: [] for name in weights}
    for _ in range(args.rounds):
        for name, w in weights.items():
            t0 = time.perf_counter()
            for _ in range(5):
                kernel(w)
            times[name].append((time.perf_counter() - t0) / 5)
    base = statistics.median(times["none"])
    print(f"N={N} D={D} fp32, {torch.get_num_threads()} threads; time and bytes relative to no mask\n")
    print("| mask | kept rows | median | time / unmasked | bytes / unmasked |")
    print("|---|---|---|---|---|")
    for name, m in masks.items():
        kept = float(m.mean())
        med = statistics.median(times[name])
        print(f"| {name} | {100 * kept:.0f}% | {med * 1e3:.2f} ms | {med / base:.2f} | {(2 * kept + 1) / 3:.2f} |")


if __name__ == "__main__":
    main()
