"""Per-call host overhead of the mmfast losses at tiny sizes, against their eager references.

At these sizes the arithmetic is negligible: the times are Python, dispatch and allocation cost. Each
case times the forward (inputs require grad, so the op records its graph) and forward + backward
(``loss.backward()``, grads cleared between calls) of the public loss under ``mmfast.use_backend``
and of its eager reference (``mmfast.reference.*_autograd``), on one thread: best of ``--repeats``
rounds of ``--calls`` calls, in microseconds per call (on a GPU each round ends with a synchronisation;
the launches are asynchronous, so the time is the host's as long as the device keeps up). ``ratio`` =
mmfast / eager (below 1 is faster). ``op path``: mmfast's forward + backward with the direct eager path
switched off (every forward through torch.library's dispatcher; mmfast/ops/_eager_path.py).

    python benchmarks/overhead.py [--ops routed_kd,masked_reconstruction] [--device cuda] [--backend triton]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

import mmfast
from mmfast import bench
from mmfast.ops import _eager_path
from mmfast.reference.fake_score import fake_score_loss_autograd
from mmfast.reference.fdistill import fdistill_loss_autograd
from mmfast.reference.masked_reconstruction import masked_reconstruction_loss_autograd
from mmfast.reference.mutual_kd import mutual_kd_loss_autograd
from mmfast.reference.routed_kd import routed_kd_loss_autograd
from mmfast.reference.uni_instruct import uni_instruct_loss_autograd

# a case: name -> () -> (mmfast loss fn, eager loss fn, tensors whose .grad backward fills)
Case = tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor], list[torch.Tensor]]

_DEVICE = torch.device("cpu")  # where the cases' tensors live (main: --device)


def _randn(*shape: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=generator).to(_DEVICE)


def _rand(*shape: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(*shape, generator=generator).to(_DEVICE)


def _routed_kd() -> Case:
    g = torch.Generator().manual_seed(0)
    x = _randn(64, 10, generator=g).requires_grad_()
    z = _randn(2, 64, 10, generator=g)
    w = _rand(64, 2, generator=g)
    kw = dict(temperature=4.0, mix="logits")
    return (lambda: mmfast.routed_kd_loss(x, z, w, **kw), lambda: routed_kd_loss_autograd(x, z, w, **kw), [x])


def _mutual_kd() -> Case:
    x = _randn(3, 64, 10, generator=torch.Generator().manual_seed(0)).requires_grad_()
    return (lambda: mmfast.mutual_kd_loss(x, 4.0), lambda: mutual_kd_loss_autograd(x, 4.0), [x])


def _fdistill() -> Case:
    g = torch.Generator().manual_seed(0)
    x = _randn(4, 16, generator=g).requires_grad_()
    a, b = _randn(4, 16, generator=g), _randn(4, 16, generator=g)
    h = _rand(4, generator=g) + 0.5
    return (lambda: mmfast.fdistill_loss(x, a, b, h), lambda: fdistill_loss_autograd(x, a, b, h), [x])


def _uni_instruct() -> Case:
    g = torch.Generator().manual_seed(0)
    x = _randn(4, 16, generator=g).requires_grad_()
    a, b = _randn(4, 16, generator=g), _randn(4, 16, generator=g)
    r = _rand(4, generator=g) + 0.5
    return (lambda: mmfast.uni_instruct_loss(x, a, b, r), lambda: uni_instruct_loss_autograd(x, a, b, r), [x])


def _fake_score() -> Case:
    g = torch.Generator().manual_seed(0)
    fake = _randn(4, 16, generator=g).requires_grad_()
    x = _randn(4, 16, generator=g)
    sigma = _rand(4, generator=g) + 0.5
    return (lambda: mmfast.fake_score_loss(fake, x, sigma), lambda: fake_score_loss_autograd(fake, x, sigma), [fake])


def _masked_reconstruction() -> Case:
    g = torch.Generator().manual_seed(0)
    p = _randn(4, 8, generator=g).requires_grad_()
    y = _randn(4, 8, generator=g)
    return (lambda: mmfast.masked_reconstruction_loss(p, y), lambda: masked_reconstruction_loss_autograd(p, y), [p])


def _masked_reconstruction_rowmask() -> Case:
    g = torch.Generator().manual_seed(0)
    p = _randn(4, 8, generator=g).requires_grad_()
    y = _randn(4, 8, generator=g)
    m = _rand(4, 1, generator=g) > 0.3
    return (
        lambda: mmfast.masked_reconstruction_loss(p, y, m),
        lambda: masked_reconstruction_loss_autograd(p, y, m),
        [p],
    )


CASES: dict[str, tuple[str, Callable[[], Case]]] = {
    "routed_kd": ("x[64,10] z[2,64,10] w[64,2] tau=4 mix=logits", _routed_kd),
    "mutual_kd": ("logits[3,64,10] tau=4", _mutual_kd),
    "fdistill": ("x,a,b[4,16] h[4]", _fdistill),
    "uni_instruct": ("x,a,b[4,16] ratio[4]", _uni_instruct),
    "fake_score": ("fake,x[4,16] sigma[4]", _fake_score),
    "masked_reconstruction": ("P,Y[4,8]", _masked_reconstruction),
    "masked_reconstruction_rowmask": ("P,Y[4,8] mask[4,1] bool", _masked_reconstruction_rowmask),
}


def best_us(step: Callable[[], None], calls: int, repeats: int) -> float:
    """Best over ``repeats`` rounds of the mean time of ``calls`` calls of ``step``, in microseconds."""
    sync = torch.cuda.synchronize if _DEVICE.type == "cuda" else (lambda: None)
    for _ in range(max(calls // 10, 5)):  # warm-up (lazy imports, caches, allocator)
        step()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            step()
        sync()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


def _steps(fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor]) -> tuple[Callable[[], None], ...]:
    def fwd() -> None:
        fn()

    def fwd_bwd() -> None:
        for t in leaves:
            t.grad = None
        fn().backward()

    return fwd, fwd_bwd


def run(ops: list[str], backend: str, calls: int, repeats: int) -> list[dict]:
    """One row per op: us/call of the forward and forward + backward, mmfast and eager."""
    rows = []
    for name in ops:
        shape, make = CASES[name]
        ours, eager, leaves = make()
        with mmfast.use_backend(backend):
            o_f, o_fb = (best_us(s, calls, repeats) for s in _steps(ours, leaves))
            with _eager_path.direct_path(False):
                op_fb = best_us(_steps(ours, leaves)[1], calls, repeats)
        e_f, e_fb = (best_us(s, calls, repeats) for s in _steps(eager, leaves))
        rows.append(dict(op=name, shape=shape, fwd=o_f, eager_fwd=e_f, fwd_bwd=o_fb, eager_fwd_bwd=e_fb,
                         op_path_fwd_bwd=op_fb))
    return rows


def markdown(rows: list[dict], backend: str) -> str:
    lines = [
        f"| op ({backend}) | shape | fwd us | eager fwd us | fwd ratio "
        "| fwd+bwd us | eager fwd+bwd us | fwd+bwd ratio | op path fwd+bwd us |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['fwd']:.0f} | {r['eager_fwd']:.0f} | {r['fwd'] / r['eager_fwd']:.2f} "
            f"| {r['fwd_bwd']:.0f} | {r['eager_fwd_bwd']:.0f} | {r['fwd_bwd'] / r['eager_fwd_bwd']:.2f} "
            f"| {r['op_path_fwd_bwd']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the tensors live")
    parser.add_argument("--backend", default=None,
                        help="mmfast backend to time (default: cpu on the CPU, triton on a GPU)")
    parser.add_argument("--calls", type=int, default=300, help="calls per round (default: 300)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds; the best is reported (default: 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default: 1)")
    args = parser.parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in CASES]
    if unknown:
        parser.error(f"unknown ops {unknown}; choose from {', '.join(CASES)}")
    if args.calls < 1 or args.repeats < 1:
        parser.error("--calls and --repeats must be >= 1")
    global _DEVICE
    _DEVICE = torch.device(args.device)
    backend = args.backend or ("triton" if _DEVICE.type == "cuda" else "cpu")
    torch.set_num_threads(args.threads)
    print(f"{bench.device_name(_DEVICE)}, torch {torch.__version__}")
    print(markdown(run(ops, backend, args.calls, args.repeats), backend))


if __name__ == "__main__":
    main()
