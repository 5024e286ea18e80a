"""Benchmarks of the KD losses: cases, providers, timing and the comparison table.

One definition serves ``python -m mmfast bench`` and the pytest-benchmark suites in ``benchmarks/``.
Every loss provider is timed on a training step, forward + backward::

    x.grad = None (untimed setup)  |  loss = f(...); loss.backward(); [cuda sync]  (timed)

with, unless told not to (``python -m mmfast bench --no-forward``), its forward and backward timed apart (the
``fwd`` and ``bwd`` columns: the two parts of each wall-clock round; a CUDA-graph step's forward is replayed
alone and ``bwd`` = step - fwd). One extra untimed step measures the memory the step allocates at its peak beyond its
inputs (``peak MiB``: ``torch.cuda.max_memory_allocated`` on a GPU, the profiler's allocation events on a CPU).

Providers:
  ``eager``        the loss as a user writes it (``mmfast.reference.*_loss_autograd``), autograd backward
  ``compile``      ``torch.compile`` of that function (compiled and warmed up before timing)
  ``mmfast-<b>``   the public mmfast loss forced to backend ``b`` (every backend that can run on the
                   device; Triton on CPU tensors runs in the interpreter and is left out)
  ``exp-floor``    one ``torch.exp`` (fp32) over as many elements as the loss must exponentiate (losses
                   with exponentials only)
  ``copy``         (GPU) a device-to-device copy of a buffer of the loss's minimal bytes

Minimal bytes of the fused loss that writes the gradient in its forward pass (each input read once,
each output written once): routed KD N*C*(s + R*s + g) + N*K*4 (+ N*K*8 with indices), R teachers read
(E dense, K sparse), s / g bytes per logit / gradient element; mutual KD M*N*C*(s + g). GB/s divides the
bytes a provider moves by its median time; a copy moves twice its buffer (read + write), so
``% copy`` = achieved bandwidth / copy bandwidth.

Cases are grouped in suites (``SUITES``: one per op); a case class names its suite, its eager
baseline and its mmfast function, its inputs and its minimal bytes. A new op adds a case class and
one ``SUITES`` entry; the CLI and the pytest-benchmark suites pick it up.

On a GPU each round starts with a cold L2 (a 256 MiB buffer is zeroed in the untimed setup), and
mmfast's eager value checks (they synchronise with the host) are turned off in the benchmark process.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
from torch import Tensor

import mmfast
from mmfast import _checks
from mmfast.reference.fdistill import fdistill_loss_autograd
from mmfast.reference.masked_reconstruction import masked_reconstruction_loss_autograd
from mmfast.reference.mutual_kd import mutual_kd_loss_autograd
from mmfast.reference.routed_kd import routed_kd_loss_autograd
from mmfast.reference.uni_instruct import uni_instruct_loss_autograd

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
LOSS_BASELINES = ("eager", "compile")
L2_FLUSH_BYTES = 256 << 20  # larger than the L2 of any current GPU (H100 50 MB, H200 60 MB)
LARGE_ENV = "MMFAST_BENCH_LARGE"
# measure_group: a provider's rounds in a row, after BLOCK_WARMUP_ROUNDS untimed ones (on a CPU)
BLOCK_ROUNDS, BLOCK_WARMUP_ROUNDS = 8, 2


@dataclass(frozen=True)
class RoutedCase:
    """Routed teacher-mixture KD: student [N, C], teachers [E, N, C]; dense weights, or top-k indices. With
    ``pixels`` = (H, W): dense logits [N, C, H, W] (class_dim=1, routing per sample), N * H * W rows."""

    suite: ClassVar[str] = "routed_kd"
    description: ClassVar[str] = "routed KD (mix=loss, kl, tau=4; student grad)"
    N: int
    C: int
    E: int
    top_k: int | None = None  # None: dense routing over all E teachers
    large: bool = False  # too big for a 2-core CPU: run there only with MMFAST_BENCH_LARGE=1
    mix: str = "loss"
    divergence: str = "kl"
    temperature: float = 4.0
    pixels: tuple[int, int] | None = None

    @property
    def teachers_read(self) -> int:
        return self.top_k or self.E

    @property
    def rows(self) -> int:
        return self.N * (math.prod(self.pixels) if self.pixels else 1)

    @property
    def name(self) -> str:
        routing = f"top-{self.top_k} of {self.E}" if self.top_k else f"E={self.E} dense"
        pixels = f" {self.pixels[0]}x{self.pixels[1]} pixels" if self.pixels else ""
        mix = f" mix={self.mix}" if self.mix != "loss" else ""
        divergence = f" {self.divergence}" if self.divergence != "kl" else ""
        return f"routed-kd N={self.N} C={self.C}{pixels} {routing}{mix}{divergence}"

    def label(self, dtype: torch.dtype) -> str:
        return f"{self.name} {DTYPE_NAMES[dtype]}"

    def minimal_bytes(self, dtype: torch.dtype) -> int:
        s = g = torch.finfo(dtype).bits // 8
        K = self.teachers_read
        routing = self.N * K * 4 + (self.N * K * 8 if self.top_k else 0)
        return self.rows * self.C * (s + K * s + g) + routing

    def exp_elements(self) -> int:
        """One exp per logit read: the student's and the routed teachers'."""
        return (self.teachers_read + 1) * self.rows * self.C

    def inputs(self, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
        """Keyword arguments of the loss; only the student logits require grad (frozen teachers)."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        pixels = self.pixels or ()
        x = (2 * torch.randn(self.N, self.C, *pixels, generator=gen)).to(device, dtype).requires_grad_()
        z = (2 * torch.randn(self.E, self.N, self.C, *pixels, generator=gen)).to(device, dtype)
        if self.top_k:
            indices = torch.randint(0, self.E, (self.N, self.top_k), generator=gen).to(device)
            weights = torch.full((self.N, self.top_k), 1.0 / self.top_k, device=device)  # MST hard routing
        else:
            indices = None
            weights = torch.softmax(torch.randn(self.N, self.E, generator=gen), dim=1).to(device)
        return dict(student_logits=x, teacher_logits=z, weights=weights, indices=indices,
                    temperature=self.temperature, mix=self.mix, divergence=self.divergence,
                    class_dim=1 if self.pixels else -1)

    @staticmethod
    def eager_loss() -> Callable[..., Tensor]:
        return routed_kd_loss_autograd

    @staticmethod
    def mmfast_loss() -> Callable[..., Tensor]:
        return mmfast.routed_kd_loss


@dataclass(frozen=True)
class RoutedMixCase(RoutedCase):
    """Routed KD with the other teacher mixtures (``mix`` "logits" or "probs"): a suite of its own, which the GPU
    check script leaves out unless asked (GPU_CHECK_CLI_SUITES)."""

    suite: ClassVar[str] = "routed_kd_mixes"
    description: ClassVar[str] = "routed KD, mix=logits and mix=probs (kl, tau=4; student grad)"


@dataclass(frozen=True)
class RoutedDivergenceCase(RoutedCase):
    """Routed KD with the other divergences (reverse KL, JS, TVD), mix "loss" and "logits": a suite of its own, which
    the GPU check script leaves out unless asked (GPU_CHECK_CLI_SUITES)."""

    suite: ClassVar[str] = "routed_kd_divergences"
    description: ClassVar[str] = "routed KD, divergences reverse_kl, js, tvd (mix=loss and logits, tau=4; student grad)"


@dataclass(frozen=True)
class MutualCase:
    """Mutual KD of M co-trained models: logits [M, N, C], gradients to all of them."""

    suite: ClassVar[str] = "mutual_kd"
    description: ClassVar[str] = "mutual KD (tau=4; grads to all models)"
    M: int
    N: int
    C: int
    large: bool = False
    temperature: float = 4.0

    @property
    def name(self) -> str:
        return f"mutual-kd M={self.M} N={self.N} C={self.C}"

    def label(self, dtype: torch.dtype) -> str:
        return f"{self.name} {DTYPE_NAMES[dtype]}"

    def minimal_bytes(self, dtype: torch.dtype) -> int:
        s = g = torch.finfo(dtype).bits // 8
        return self.M * self.N * self.C * (s + g)

    def exp_elements(self) -> int:
        return self.M * self.N * self.C

    def inputs(self, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        logits = (2 * torch.randn(self.M, self.N, self.C, generator=gen)).to(device, dtype).requires_grad_()
        return dict(logits=logits, temperature=self.temperature)

    @staticmethod
    def eager_loss() -> Callable[..., Tensor]:
        return mutual_kd_loss_autograd

    @staticmethod
    def mmfast_loss() -> Callable[..., Tensor]:
        return mmfast.mutual_kd_loss


@dataclass(frozen=True)
class _ScoreCase:
    """Score distillation on images [B, C, H, W]: generator sample x, teacher and fake-score x0-predictions."""

    B: int
    C: int
    H: int
    W: int
    large: bool = False

    @property
    def name(self) -> str:
        return f"{self.suite.replace('_', '-')} B={self.B} {self.C}x{self.H}x{self.W}"

    def label(self, dtype: torch.dtype) -> str:
        return f"{self.name} {DTYPE_NAMES[dtype]}"

    def minimal_bytes(self, dtype: torch.dtype) -> int:
        """Read x, teacher_x0, fake_x0 once; write each requested gradient once."""
        s = g = torch.finfo(dtype).bits // 8
        return self.B * self.C * self.H * self.W * (3 * s + len(self.grads) * g)

    def exp_elements(self) -> None:
        return None

    def inputs(self, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        shape = (self.B, self.C, self.H, self.W)
        x, a, b = (torch.randn(shape, generator=gen).to(device, dtype) for _ in range(3))
        ratio = torch.exp(torch.empty(self.B).uniform_(-2.3, 3.0, generator=gen)).to(device)
        out = dict(x=x, teacher_x0=a, fake_x0=b, **self.weight(ratio))
        for name in self.grads:
            out[name].requires_grad_()
        return out


@dataclass(frozen=True)
class FDistillCase(_ScoreCase):
    suite: ClassVar[str] = "fdistill"
    description: ClassVar[str] = "f-distill generator loss (h = js weight; grad to x)"
    grads: ClassVar[tuple[str, ...]] = ("x",)

    @staticmethod
    def weight(ratio: Tensor) -> dict:
        return dict(h=ratio / (1 + ratio))

    @staticmethod
    def eager_loss() -> Callable[..., Tensor]:
        return fdistill_loss_autograd

    @staticmethod
    def mmfast_loss() -> Callable[..., Tensor]:
        return mmfast.fdistill_loss


@dataclass(frozen=True)
class UniInstructCase(_ScoreCase):
    suite: ClassVar[str] = "uni_instruct"
    description: ClassVar[str] = "Uni-Instruct generator loss (jeffreys, fgm + di; grads to x, teacher_x0, fake_x0)"
    grads: ClassVar[tuple[str, ...]] = ("x", "teacher_x0", "fake_x0")

    @staticmethod
    def weight(ratio: Tensor) -> dict:
        return dict(ratio=ratio, divergence="jeffreys", fgm=True, di=True)

    @staticmethod
    def eager_loss() -> Callable[..., Tensor]:
        return uni_instruct_loss_autograd

    @staticmethod
    def mmfast_loss() -> Callable[..., Tensor]:
        return mmfast.uni_instruct_loss


@dataclass(frozen=True)
class MaskedReconCase:
    """Masked reconstruction (mse, mean; grad to pred, target detached): pred and target [N, D] with no
    mask, a bool row mask [N, 1] keeping ``keep`` of the rows (random rows), or a bool element mask
    [N, D] keeping ``keep`` of the elements. Minimal bytes read only the rows a row mask keeps. With ``hw``
    = (H, W): feature maps [N, D, H, W] with ``channel_dim=1`` (a row per pixel, channels strided), no mask."""

    suite: ClassVar[str] = "masked_reconstruction"
    description: ClassVar[str] = (
        "masked reconstruction (mse, mean; grad to pred); a row mask's excluded rows are not read"
    )
    N: int
    D: int
    mask: str = "none"  # "none", "row" or "element"
    keep: float = 1.0
    large: bool = False
    hw: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.hw is not None and self.mask != "none":
            raise ValueError("MaskedReconCase: feature maps (hw) are benchmarked without a mask")

    @property
    def rows(self) -> int:
        return self.N * (self.hw[0] * self.hw[1] if self.hw else 1)

    @property
    def kept_rows(self) -> int:
        return round(self.N * self.keep) if self.mask == "row" else self.rows

    def skipped_bytes(self, dtype: torch.dtype) -> int:
        """Reads of pred and target that row skipping saves."""
        return (self.rows - self.kept_rows) * self.D * 2 * (torch.finfo(dtype).bits // 8)

    @property
    def name(self) -> str:
        if self.hw is not None:
            return f"masked-recon B={self.N} D={self.D} {self.hw[0]}x{self.hw[1]} channel_dim=1 no mask"
        base = f"masked-recon N={self.N} D={self.D}"
        if self.mask == "row":
            saved = self.skipped_bytes(torch.float32) / 2**20
            return f"{base} row mask {100 * self.keep:.0f}% (skips {saved:.0f} MiB fp32 reads)"
        return f"{base} element mask {100 * self.keep:.0f}%" if self.mask == "element" else f"{base} no mask"

    def label(self, dtype: torch.dtype) -> str:
        return f"{self.name} {DTYPE_NAMES[dtype]}"

    def minimal_bytes(self, dtype: torch.dtype) -> int:
        """Read the kept rows of pred and target and the mask; write the whole gradient."""
        s = g = torch.finfo(dtype).bits // 8
        mask_bytes = {"none": 0, "row": self.N, "element": self.N * self.D}[self.mask]
        return self.kept_rows * self.D * 2 * s + self.rows * self.D * g + mask_bytes

    def exp_elements(self) -> None:
        return None

    def inputs(self, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        shape = (self.N, self.D) + (tuple(self.hw) if self.hw else ())
        pred = torch.randn(shape, generator=gen).to(device, dtype).requires_grad_()
        target = torch.randn(shape, generator=gen).to(device, dtype)
        if self.hw is not None:
            return dict(pred=pred, target=target, mask=None, loss="mse", channel_dim=1)
        if self.mask == "row":
            mask = torch.zeros(self.N, 1, dtype=torch.bool)
            mask[torch.randperm(self.N, generator=gen)[: self.kept_rows]] = True
        elif self.mask == "element":
            mask = torch.rand(self.N, self.D, generator=gen) < self.keep
        else:
            mask = None
        return dict(pred=pred, target=target, mask=None if mask is None else mask.to(device), loss="mse")

    @staticmethod
    def eager_loss() -> Callable[..., Tensor]:
        return masked_reconstruction_loss_autograd

    @staticmethod
    def mmfast_loss() -> Callable[..., Tensor]:
        return mmfast.masked_reconstruction_loss


class Case(Protocol):
    """What a benchmark case provides (see :class:`RoutedCase`)."""

    suite: ClassVar[str]  # the op's suite name (a key of SUITES)
    description: ClassVar[str]  # one line printed above the suite's tables
    large: bool  # too big for a small CPU: run there only with MMFAST_BENCH_LARGE=1

    @property
    def name(self) -> str: ...
    def label(self, dtype: torch.dtype) -> str: ...
    def minimal_bytes(self, dtype: torch.dtype) -> int: ...
    def exp_elements(self) -> int | None: ...  # None: the loss has no exponentials (no exp-floor row)
    def inputs(self, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict: ...
    @staticmethod
    def eager_loss() -> Callable[..., Tensor]: ...
    @staticmethod
    def mmfast_loss() -> Callable[..., Tensor]: ...

ROUTED_CASES = (
    RoutedCase(N=256, C=1000, E=4),
    RoutedCase(N=256, C=8192, E=4),
    RoutedCase(N=4096, C=32768, E=2, large=True),
    RoutedCase(N=256, C=8192, E=4, top_k=1),
    RoutedCase(N=16, C=131072, E=2),  # a few long rows: fewer than a GPU's SMs, split over several blocks
    RoutedCase(N=65536, C=10, E=4),  # many rows of few classes (CUDA backend: a thread per row)
    RoutedCase(N=8, C=19, E=4, pixels=(128, 256), large=True),  # segmentation logits (class_dim=1)
)
MUTUAL_CASES = (
    MutualCase(M=3, N=256, C=1000),
    MutualCase(M=3, N=256, C=8192),
    MutualCase(M=3, N=65536, C=10),
)
# one entry per op: the suite name -> its cases (the pytest-benchmark fixture is "<suite>_case")
SUITES: dict[str, tuple[Case, ...]] = {
    "routed_kd": ROUTED_CASES,
    "routed_kd_mixes": tuple(RoutedMixCase(N=256, C=8192, E=4, mix=mix) for mix in ("logits", "probs")),
    "routed_kd_divergences": tuple(RoutedDivergenceCase(N=256, C=8192, E=4, mix=mix, divergence=divergence)
                                   for mix in ("loss", "logits") for divergence in ("reverse_kl", "js", "tvd")),
    "mutual_kd": MUTUAL_CASES,
    "fdistill": (FDistillCase(B=256, C=3, H=64, W=64), FDistillCase(B=32, C=4, H=128, W=128)),
    "uni_instruct": (UniInstructCase(B=256, C=3, H=64, W=64), UniInstructCase(B=32, C=4, H=128, W=128)),
    "masked_reconstruction": (
        MaskedReconCase(N=8192, D=1024),
        MaskedReconCase(N=8192, D=1024, mask="row", keep=0.25),
        MaskedReconCase(N=8192, D=1024, mask="row", keep=0.75),
        MaskedReconCase(N=8192, D=1024, mask="element", keep=0.5),
        MaskedReconCase(N=8, D=256, hw=(32, 32)),
    ),
}
QUICK_CASES: tuple[Case, ...] = (ROUTED_CASES[0],)  # what ``--quick`` (CI) runs: cheap cases only
CASES = {case.name: case for cases in SUITES.values() for case in cases}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bench_dtypes(device: torch.device) -> tuple[torch.dtype, ...]:
    return (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,)


def skip_reason(case: Case, device: torch.device) -> str | None:
    """Why ``case`` is left out on ``device`` (None when it runs)."""
    if case.large and device.type == "cpu" and os.environ.get(LARGE_ENV, "0") != "1":
        return f"too large for a small CPU; set {LARGE_ENV}=1 to run it"
    return None


def mmfast_backends(device: torch.device, dtype: torch.dtype) -> list[str]:
    """The mmfast backends that can run on ``device`` with ``dtype``, in ``mmfast.BACKENDS`` order."""
    info = mmfast.backend_info(device)
    dtype_name = str(dtype).replace("torch.", "")
    return [
        name for name in mmfast.BACKENDS
        if info["available"][name] and dtype_name in info["dtypes"][name]
        and not (name == "triton" and device.type == "cpu")  # the interpreter is no performance path
    ]


def providers(case: Case, device: torch.device, dtype: torch.dtype) -> list[str]:
    names = [*LOSS_BASELINES, *(f"mmfast-{b}" for b in mmfast_backends(device, dtype))]
    if case.exp_elements() is not None:
        names.append("exp-floor")
    return [*names, "copy"] if device.type == "cuda" else names


def matrix(cases: Iterable[Case], device: torch.device) -> list[tuple[Case, torch.dtype, str, str | None]]:
    """(case, dtype, provider, skip reason) for every benchmark on ``device``."""
    return [
        (case, dtype, provider, skip_reason(case, device))
        for case in cases for dtype in bench_dtypes(device) for provider in providers(case, device, dtype)
    ]


def provider_bytes(case: Case, provider: str, dtype: torch.dtype) -> int:
    """Bytes the provider moves under the minimal-byte model (what GB/s is computed from)."""
    if provider == "exp-floor":
        return 2 * 4 * case.exp_elements()
    if provider == "copy":
        return 2 * case.minimal_bytes(dtype)
    return case.minimal_bytes(dtype)


# ------------------------------------------------------------------------------------------- steps


def _allow_recompiles() -> None:
    """One compiled function serves every case and dtype: lift dynamo's per-function recompile limit."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), 64))


@functools.cache
def _compiled(fn: Callable) -> Callable:
    _allow_recompiles()
    return torch.compile(fn, dynamic=False)  # specialised per shape, as a fixed-shape training loop gets


def _loss_fn(case: Case, provider: str) -> tuple[Callable[..., Tensor], Callable[[], ContextManager]]:
    """The loss function of ``provider`` and a factory of the context it runs in."""
    eager = case.eager_loss()
    if provider == "eager":
        return eager, contextlib.nullcontext
    if provider == "compile":
        return _compiled(eager), contextlib.nullcontext
    if provider.startswith("mmfast-"):
        return case.mmfast_loss(), functools.partial(_mmfast_context, provider.removeprefix("mmfast-"))
    raise ValueError(f"unknown loss provider {provider!r}")


@contextlib.contextmanager
def _mmfast_context(backend: str) -> Iterator[None]:
    """An mmfast provider's step: its backend forced and the host-synchronising value checks off (they are
    not part of the kernel's cost); the caller's settings are back after the step."""
    checks = _checks.value_checks_enabled()
    mmfast.set_value_checks(False)
    try:
        with mmfast.use_backend(backend):
            yield
    finally:
        mmfast.set_value_checks(checks)


@functools.cache
def _l2_flush_buffer(device: torch.device) -> Tensor:
    return torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)


@dataclass
class Step:
    """One benchmark round: ``setup`` (untimed), then ``run``.

    ``run`` returns the round's time in seconds when it measures it itself (``timing == "cuda-graph"``: the
    device time of one CUDA-graph replay between two CUDA events), else ``None`` and the caller times it with the
    wall clock (``timing == "wall"``: ``run`` ends with a device sync).
    """

    setup: Callable[[], None]
    run: Callable[[], float | None]
    timing: str = "wall"
    keep_alive: object = None  # a captured graph, its output tensors and the body whose inputs it reads
    peak_bytes: int | None = None  # loss providers: memory the step allocates at its peak (see step_peak_bytes)
    # wall-clock loss steps: ``run`` timed in two parts, (forward, backward) seconds, each ending with a device sync
    split: Callable[[], tuple[float, float]] | None = None


def _graph_step(body: Callable[[], object], flush: Tensor, warmup: int = 3) -> Step:
    """``body`` (one whole training-step computation) captured in a CUDA graph.

    Each round flushes the L2 (untimed, enqueued before the first event) and times one replay between two CUDA
    events: the device time of the step, free of the host's Python dispatch and launch latency (which a
    host-bound harness would measure instead, for every provider alike). ``body`` is warmed up on a side stream
    first (compilation, autotuning, allocator), as capture requires.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            body()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = body()  # live in the graph's memory pool; kept alive with the graph below
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def setup() -> None:
        flush.zero_()

    def run() -> float:
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    # the graph replays raw addresses: everything it reads or writes must outlive it. ``body``'s closure holds the
    # inputs (nothing else may: a freed input's memory is reused, and a replay then reads whatever lives there,
    # or faults once the allocator has released it); the outputs live in the graph's memory pool.
    return Step(setup, run, "cuda-graph", keep_alive=(graph, outputs, body))


# the profiler's own start/stop lines, which its C++ side writes to stderr at any log level
_PROFILER_LOG_LINE = re.compile(r"^(USDT|STAGE):\S+ \S+ \d+:\d+ \S+\.cpp:\d+\] ")


@contextlib.contextmanager
def _without_profiler_log() -> Iterator[None]:
    """Drop the profiler's start/stop lines from stderr (file descriptor 2) within the block; everything else
    written there meanwhile is passed on when the block ends."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines(keepends=True)
                    if not _PROFILER_LOG_LINE.match(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def step_peak_bytes(body: Callable[[], object], device: torch.device) -> int | None:
    """Memory one eager run of ``body`` allocates at its peak on ``device``, beyond what was allocated before it
    (inputs excluded; outputs, saved tensors and temporaries included). ``body`` is run once first, so that
    compilation and autotuning buffers are not counted.

    GPU: ``torch.cuda.max_memory_allocated``. CPU: the running sum of the profiler's allocation and free events
    of torch's CPU allocator (every tensor, also those torch.compile's generated code allocates); what a native
    kernel allocates itself is not seen (mmfast's CPU kernels: per-thread row scratch, O(threads * C)). None
    where this torch's profiler does not expose its memory events."""
    body()
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = body()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        del out
        return peak
    from torch.profiler import ProfilerActivity, profile

    with _without_profiler_log(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = body()
        del out
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None:
        return None
    deltas = sorted((e.start_ns(), e.nbytes()) for e in results.events()
                    if e.name() == "[memory]" and e.device_type() == torch._C._autograd.DeviceType.CPU)
    running = peak = 0
    for _, nbytes in deltas:
        running += nbytes
        peak = max(peak, running)
    return peak


def make_step(
    case: Case, provider: str, device: torch.device, dtype: torch.dtype, seed: int = 0, *, graph: bool | None = None,
    forward_only: bool = False,
) -> Step:
    """The benchmark round of ``provider`` on ``case``: forward + backward (gradients of every input that requires
    grad); with ``forward_only`` (loss providers) the forward alone, recording the autograd graph that a backward
    would use (dropped with the loss). On a GPU (``graph`` None or True) the round is a CUDA-graph replay timed
    with CUDA events (see :func:`_graph_step`); if capturing fails, the step says so by raising (``graph=True``)
    or falls back to the synchronised wall clock with the reason in ``Step.timing`` (``graph=None``).
    ``graph=False``: wall clock.
    A loss provider's step also reports its peak memory (``Step.peak_bytes``, :func:`step_peak_bytes`)."""
    cuda = device.type == "cuda"
    use_graph = cuda and graph is not False
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    flush = _l2_flush_buffer(device) if cuda else None

    def cold_cache() -> None:
        if flush is not None:
            flush.zero_()
            sync()

    if provider in ("exp-floor", "copy"):
        if forward_only:
            raise ValueError(f"forward_only: {provider!r} is not a loss provider")
        if provider == "exp-floor":
            src = torch.randn(case.exp_elements(), device=device)  # fp32: the kernels exponentiate in fp32
            dst = torch.empty_like(src)

            def body() -> Tensor:
                return torch.exp(src, out=dst)
        else:
            src = torch.ones(case.minimal_bytes(dtype), dtype=torch.uint8, device=device)
            dst = torch.empty_like(src)

            def body() -> Tensor:
                return dst.copy_(src)
        setup_wall = cold_cache
    else:
        fn, context = _loss_fn(case, provider)
        kwargs = case.inputs(device, dtype, seed)
        leaves = [t for t in kwargs.values() if isinstance(t, Tensor) and t.requires_grad]

        def body() -> Tensor | tuple[Tensor, ...]:
            with context():
                loss = fn(**kwargs)
                return loss if forward_only else torch.autograd.grad(loss, leaves)

        def setup_wall() -> None:
            cold_cache()

        def split() -> tuple[float, float]:
            t0 = time.perf_counter()
            with context():
                loss = fn(**kwargs)
                sync()
                t1 = time.perf_counter()
                grads = torch.autograd.grad(loss, leaves)
                del loss, grads
                sync()
            return t1 - t0, time.perf_counter() - t1

    loss_step = is_loss_provider(provider) and not forward_only  # a whole training step of a loss
    peak = step_peak_bytes(body, device) if loss_step else None
    if use_graph:
        try:
            return dataclasses.replace(_graph_step(body, flush), peak_bytes=peak)
        except Exception as e:
            if graph:
                raise
            reason = f"wall (graph capture failed: {_describe_error(e)})"
            torch.cuda.synchronize()
    else:
        reason = "wall"

    def run() -> None:
        body()
        sync()

    return Step(setup_wall, run, reason, peak_bytes=peak, split=split if loss_step else None)


def warm_up(step: Step, rounds: int = 3) -> float:
    """Run ``rounds`` untimed rounds (compilation, autotuning, allocator); return the last one's time."""
    elapsed = math.inf
    for _ in range(rounds):
        elapsed = _time_round(step)
    return elapsed


def plan_rounds(estimate_s: float, budget_s: float, min_rounds: int = 5, max_rounds: int = 2000) -> int:
    """Rounds that fill ``budget_s`` at ``estimate_s`` per round, within [min_rounds, max_rounds]."""
    return int(min(max(budget_s / max(estimate_s, 1e-9), min_rounds), max_rounds))


def _time_round(step: Step) -> float:
    step.setup()
    t0 = time.perf_counter()
    measured = step.run()
    wall = time.perf_counter() - t0
    return wall if measured is None else measured


def _describe_error(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"


class DeviceLost(RuntimeError):
    """A provider hit a sticky device error (an illegal memory access, say): the CUDA context is unusable, so
    nothing after it in this process can be measured. ``where`` names the group and provider (or the group's
    final synchronisation) where it surfaced; with asynchronous launches that is at or after the fault."""

    def __init__(self, where: str, error: BaseException):
        super().__init__(f"{where}: {_describe_error(error)}")
        self.where = where


def _is_device_fatal(e: BaseException) -> bool:
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(e, accelerator_error):
        return True
    return isinstance(e, RuntimeError) and "CUDA error" in str(e)


def _provider_error(e: Exception, where: str) -> str:
    """The one-line description of a provider's failure for its table row; its traceback goes to stderr.
    Raises :class:`DeviceLost` for an error that leaves the device unusable."""
    if _is_device_fatal(e):
        raise DeviceLost(where, e) from e
    print(f"bench: {where} failed:\n{''.join(traceback.format_exception(e)).rstrip()}", file=sys.stderr, flush=True)
    return _describe_error(e)


def is_loss_provider(name: str) -> bool:
    """A provider that runs the loss (the baselines and the mmfast backends), not a reference kernel."""
    return name in LOSS_BASELINES or name.startswith("mmfast-")


def measure_group(
    case: Case, dtype: torch.dtype, names: Sequence[str], device: torch.device, *,
    budget_s: float, warmup_rounds: int = 3, min_rounds: int = 5, on_warm: Callable[[], None] | None = None,
    forward: bool = False, graph: bool | None = None, block_rounds: int = BLOCK_ROUNDS,
) -> list[Result]:
    """Time the providers ``names`` on one case and dtype, interleaved in blocks of rounds.

    Every provider is warmed up first; the timed rounds then alternate between providers in blocks of
    ``block_rounds`` (:data:`BLOCK_ROUNDS`), so that a change in background load (a shared CPU) affects all of
    them alike and the ratios stay meaningful. On a CPU each block starts with :data:`BLOCK_WARMUP_ROUNDS` untimed
    rounds: every timed round follows rounds of the same provider, as in a training loop. (Alternating single
    rounds timed each provider in the caches the other one left. On this project's CPU host, whose last-level
    cache takes several passes to hold a re-read buffer again, mmfast's Uni-Instruct step at B=32 took 2.7 ms
    after a torch.compile step, 1.8 ms after its own; compile's took 3.5 ms and 3.2 ms: the order favoured the
    provider that moves more bytes. On a GPU every round starts from a flushed L2 anyway.)
    A provider that raises gets a row with its error (its traceback on stderr); the others still run. An error
    that leaves the device unusable raises :class:`DeviceLost` instead, also one that surfaces only in the
    group's final synchronisation (after its steps are freed). ``graph``: as in :func:`make_step`.

    With ``forward`` every loss provider's forward and backward are timed apart (``Result.forward_s`` and
    ``Result.backward_s``): on the wall clock as the two parts of each step round (``Step.split``); for a
    CUDA-graph step the forward is captured alone and replayed in rounds of its own, and the backward is the
    step's median less the forward's (device times). A NaN forward: only the forward's own step failed.
    """
    group = case.label(dtype)
    steps: dict[tuple[str, bool], Step] = {}
    rounds: dict[tuple[str, bool], int] = {}
    errors: dict[tuple[str, bool], str] = {}
    for name in names:
        key = (name, False)
        try:
            steps[key] = make_step(case, name, device, dtype, graph=graph)
            rounds[key] = plan_rounds(warm_up(steps[key], warmup_rounds), budget_s, min_rounds)
        except Exception as e:
            steps.pop(key, None)
            errors[key] = _provider_error(e, f"{group} / {name}")
        if forward and key in steps and is_loss_provider(name) and steps[key].split is None:
            alone = (name, True)
            try:
                steps[alone] = make_step(case, name, device, dtype, graph=graph, forward_only=True)
                rounds[alone] = plan_rounds(warm_up(steps[alone], warmup_rounds), budget_s, min_rounds)
            except Exception as e:
                steps.pop(alone, None)
                errors[alone] = _provider_error(e, f"{group} / {name} (forward alone)")
        if on_warm is not None:
            on_warm()
    times: dict[tuple[str, bool], list[float]] = {key: [] for key in steps}
    parts: dict[str, list[tuple[float, float]]] = {}

    def timed_round(key: tuple[str, bool]) -> None:
        step = steps[key]
        if forward and step.split is not None:
            step.setup()
            fwd, bwd = step.split()
            parts.setdefault(key[0], []).append((fwd, bwd))
            times[key].append(fwd + bwd)
        else:
            times[key].append(_time_round(step))

    # a GPU round starts from a flushed L2 whatever ran before it: no untimed rounds there
    block_warmup = BLOCK_WARMUP_ROUNDS if device.type == "cpu" else 0
    while pending := [k for k in steps if len(times[k]) < rounds[k]]:
        for key in pending:
            try:
                for _ in range(block_warmup):  # untimed: the provider's data back in the caches
                    _time_round(steps[key])
                for _ in range(min(block_rounds, rounds[key] - len(times[key]))):
                    timed_round(key)
            except Exception as e:
                del steps[key]
                errors[key] = _provider_error(e, f"{group} / {key[0]}" + (" (forward alone)" if key[1] else ""))

    def forward_backward(name: str) -> tuple[float | None, float | None]:
        if name in parts:
            return (statistics.median(f for f, _ in parts[name]), statistics.median(b for _, b in parts[name]))
        alone = (name, True)
        if alone in steps:
            return statistics.median(times[alone]), None
        return (math.nan if alone in errors else None), None

    results = [
        Result(group, name, math.nan, math.nan, 0, error=errors[(name, False)]) if (name, False) in errors
        else Result.from_times(group, name, times[(name, False)], provider_bytes(case, name, dtype),
                               steps[(name, False)].timing, steps[(name, False)].peak_bytes,
                               *forward_backward(name))
        for name in names
    ]
    # free the group's graphs and buffers now (autograd graphs hold reference cycles), and let an asynchronous
    # device error surface here, in the group that caused it
    steps.clear()
    gc.collect()
    if device.type == "cuda":
        try:
            torch.cuda.synchronize()
        except Exception as e:
            if _is_device_fatal(e):
                raise DeviceLost(f"{group} (its final synchronisation)", e) from e
            raise
    return results


# ------------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class Result:
    group: str
    provider: str
    median_s: float
    iqr_s: float
    rounds: int
    bytes: int | None = None
    error: str | None = None
    timing: str = "wall"  # Step.timing: "wall", "cuda-graph" or "wall (graph capture failed: ...)"
    peak_bytes: int | None = None  # Step.peak_bytes (loss providers)
    # measure_group(forward=True): medians of the forward and of the backward (None: the median less the forward)
    forward_s: float | None = None
    backward_s: float | None = None

    @classmethod
    def from_times(
        cls, group: str, provider: str, times: Sequence[float], bytes_: int | None, timing: str = "wall",
        peak_bytes: int | None = None, forward_s: float | None = None, backward_s: float | None = None,
    ) -> Result:
        q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3
        return cls(group, provider, statistics.median(times), q3 - q1, len(times), bytes_, timing=timing,
                   peak_bytes=peak_bytes, forward_s=forward_s, backward_s=backward_s)

    def to_json(self) -> dict:
        """A pytest-benchmark record (the fields :func:`load_results` reads)."""
        return {
            "group": self.group,
            "name": f"{self.group} [{self.provider}]",
            "stats": {"median": self.median_s, "iqr": self.iqr_s, "rounds": self.rounds},
            "extra_info": {"provider": self.provider, "bytes": self.bytes, "error": self.error, "timing": self.timing,
                           "peak_bytes": self.peak_bytes, "forward_median": self.forward_s,
                           "backward_median": self.backward_s},
        }


def load_results(doc: dict) -> list[Result]:
    """Results from a pytest-benchmark JSON document (or one written by ``python -m mmfast bench``)."""
    results = []
    for rec in doc["benchmarks"]:
        extra, stats = rec.get("extra_info", {}), rec.get("stats") or {}
        provider = extra.get("provider") or rec.get("params", {}).get("provider") or rec["name"]
        if "device_median" in extra:  # pytest-benchmark times the host; the step measured the device itself
            stats = {"median": extra["device_median"], "iqr": extra.get("device_iqr", math.nan),
                     "rounds": extra.get("device_rounds", 0)}
        results.append(Result(
            group=rec.get("group") or extra.get("group") or rec["name"],
            provider=provider,
            median_s=stats.get("median", math.nan),
            iqr_s=stats.get("iqr", math.nan),
            rounds=stats.get("rounds", 0),
            bytes=extra.get("bytes"),
            error=extra.get("error"),
            timing=extra.get("timing", "wall"),
            peak_bytes=extra.get("peak_bytes"),
            forward_s=extra.get("forward_median"),
            backward_s=extra.get("backward_median"),
        ))
    return results


def _fmt_time(t: float) -> str:
    if not math.isfinite(t):
        return "-"
    return f"{t * 1e3:.3f} ms" if t >= 1e-3 else f"{t * 1e6:.1f} us"


def _fmt_ratio(r: float | None) -> str:
    return f"{r:.2f}x" if r is not None and math.isfinite(r) else ""


def render_tables(results: Sequence[Result]) -> str:
    """A markdown table per group (shape and dtype): medians, spread, speedups and bandwidth.

    ``vs eager`` / ``vs compile``: t_baseline / t (above 1 is faster). ``/ exp-floor``: t / t_exp
    (the CPU target is <= 1.5 for mmfast-cpu). ``GB/s``: bytes moved / t; ``% copy``: that bandwidth
    over the copy provider's. ``fwd`` / ``bwd`` (loss providers, when measured): medians of the forward and of the
    backward (see :func:`measure_group`; where the backward was not timed apart, median - fwd). ``peak MiB``: the
    memory a loss step allocates at its peak beyond its inputs (:func:`step_peak_bytes`).
    """
    groups: dict[str, list[Result]] = {}
    for r in results:
        groups.setdefault(r.group, []).append(r)
    return "\n\n".join(_render_group(group, rows) for group, rows in groups.items()) + "\n"


def _render_group(group: str, rows: list[Result]) -> str:
    medians = {r.provider: r.median_s for r in rows if r.error is None}
    t_eager, t_compile, t_exp = medians.get("eager"), medians.get("compile"), medians.get("exp-floor")
    copy = next((r for r in rows if r.provider == "copy" and r.error is None and r.bytes), None)
    copy_bw = copy.bytes / copy.median_s if copy and copy.median_s > 0 else None
    forwards = any(r.forward_s is not None for r in rows if r.error is None)
    header = ["provider", "median", "IQR", *(("fwd", "bwd") if forwards else ()),
              "vs eager", "vs compile", "/ exp-floor", "GB/s"]
    if copy_bw:
        header.append("% copy")
    peaks = any(r.peak_bytes is not None for r in rows if r.error is None)
    if peaks:
        header.append("peak MiB")
    lines = [f"### {group}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if r.error is not None:
            cells = [r.provider, f"failed: {r.error}"] + [""] * (len(header) - 2)
        else:
            is_loss = is_loss_provider(r.provider)
            bw = r.bytes / r.median_s if r.bytes and r.median_s > 0 else None
            cells = [r.provider, _fmt_time(r.median_s), _fmt_time(r.iqr_s)]
            if forwards:
                backward = r.backward_s
                if backward is None and r.forward_s is not None:
                    backward = r.median_s - r.forward_s
                cells += [_fmt_time(r.forward_s) if r.forward_s is not None else "",
                          _fmt_time(backward) if backward is not None else ""]
            cells += [
                _fmt_ratio(t_eager / r.median_s) if is_loss and t_eager else "",
                _fmt_ratio(t_compile / r.median_s) if is_loss and t_compile else "",
                _fmt_ratio(r.median_s / t_exp) if is_loss and t_exp else "",
                f"{bw / 1e9:.1f}" if bw else "",
            ]
            if copy_bw:
                cells.append(f"{100 * bw / copy_bw:.0f}%" if bw else "")
            if peaks:
                cells.append(f"{r.peak_bytes / 2**20:.1f}" if r.peak_bytes is not None else "")
        lines.append("| " + " | ".join(cells) + " |")
    timings = {r.provider: r.timing for r in rows if r.error is None}
    kinds = sorted(set(timings.values()))
    if kinds != ["wall"] and kinds:  # say how a GPU group was timed (CPU groups: the wall clock, as always)
        if len(kinds) == 1:
            note = _TIMING_NOTES.get(kinds[0], kinds[0])
        else:
            note = "; ".join(f"{p}: {_TIMING_NOTES.get(t, t)}" for p, t in timings.items())
        lines += ["", f"timing: {note}"]
    return "\n".join(lines)


_TIMING_NOTES = {
    "cuda-graph": "device time of one CUDA-graph replay of the step (CUDA events, L2 flushed before each)",
    "wall": "host wall clock per step, synchronised",
}


# ------------------------------------------------------------------------------------ environment


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def cpu_allocator() -> str:
    """How host memory is allocated, as far as the environment says: with glibc's defaults every allocation
    of 32 MiB or more is a fresh mapping whose pages fault on first touch, each step, which weighs on
    memory-bound CPU benchmarks (README, Performance)."""
    preload = os.environ.get("LD_PRELOAD", "")
    for lib in ("jemalloc", "tcmalloc", "mimalloc"):
        if lib in preload:
            return f"{lib} (LD_PRELOAD)"
    threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    if threshold:
        trim = os.environ.get("MALLOC_TRIM_THRESHOLD_", "default")
        return f"glibc, MALLOC_MMAP_THRESHOLD_={threshold} MALLOC_TRIM_THRESHOLD_={trim}"
    return "glibc defaults (allocations of 32 MiB or more are fresh mappings: page faults every step)"


def machine_info(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = mmfast.backend_info(device)
    return {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "mmfast": mmfast.__version__,
        "mmfast_backends": dict(info["available"]),
        "mmfast_auto": info["chosen"],
        **({"cpu_allocator": cpu_allocator()} if device.type == "cpu" else {}),
    }


def describe_machine(info: dict, date: str) -> str:
    line = (
        f"device: {info.get('device_name')} [{info.get('device')}]  torch {info.get('torch')}"
        f" (CUDA {info.get('cuda')})  triton {info.get('triton')}  python {info.get('python')}  date {date}"
    )
    return line + (f"\nhost allocator: {info['cpu_allocator']}" if info.get("cpu_allocator") else "")


def describe_backends(device: torch.device) -> str:
    info = mmfast.backend_info(device)
    lines = [f"mmfast backends on {info['device']}: auto -> {info['chosen']}"]
    for name, ok in info["available"].items():
        status = "available" if ok else f"unavailable: {info['unavailable_reasons'][name]}"
        lines.append(f"  {name:7s} {status}")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="device to benchmark on (default: cuda when present, else cpu)")
    parser.add_argument("--quick", action="store_true",
                        help="a few small shapes, short timings (what CI runs)")
    parser.add_argument("--suite", action="append", choices=sorted(SUITES), default=None, metavar="SUITE",
                        help=f"only this op's cases (repeatable; default: all of {', '.join(SUITES)})")
    parser.add_argument("--case", action="append", default=None, metavar="TEXT",
                        help="only the cases whose name contains TEXT (repeatable), e.g. 'C=8192 E=4 dense'")
    parser.add_argument("--provider", action="append", default=None, metavar="NAME",
                        help="only this provider (repeatable): eager, compile, mmfast-<backend>, exp-floor, copy")
    parser.add_argument("--wall-clock", action="store_true",
                        help="on a GPU, time each step on the wall clock with a device sync instead of as a "
                             "CUDA-graph replay (host overhead included; for diagnosis)")
    parser.add_argument("--no-forward", action="store_true",
                        help="do not time the forward and the backward apart (the fwd and bwd columns)")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write the results as pytest-benchmark JSON (read by benchmarks/report.py)")
    parser.add_argument("--append", action="store_true",
                        help="with --json: keep the results already in that file and add these (one file from "
                             "several runs, e.g. one process per suite)")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    device = torch.device(args.device) if args.device else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    suites = list(dict.fromkeys(args.suite or SUITES))
    pool = QUICK_CASES if args.quick else tuple(CASES.values())
    cases = [c for suite in suites for c in pool if c.suite == suite]  # in the order the suites were asked
    if args.case:
        cases = [c for c in cases if any(text in c.name for text in args.case)]
    budget_s = 0.1 if args.quick else (0.3 if device.type == "cuda" else 0.5)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    info = machine_info(device)
    earlier = None  # --append: the JSON document of the earlier runs (its machine and date are kept)
    if args.append and args.json and os.path.exists(args.json):
        with open(args.json) as f:
            earlier = json.load(f)
    print(describe_machine(info, date))
    print(describe_backends(device))
    print("median: forward + backward per training step; speedup = t_baseline / t"
          + ("" if args.no_forward else "; fwd, bwd: its two parts, medians of each") + "\n")

    plan = matrix(cases, device)
    skipped = {case.label(dtype): reason for case, dtype, _, reason in plan if reason}
    groups: dict[tuple[Case, torch.dtype], list[str]] = {}
    for case, dtype, provider, reason in plan:
        if reason is None and (not args.provider or provider in args.provider):
            groups.setdefault((case, dtype), []).append(provider)
    if not groups:
        print("error: no benchmark matches the --suite, --case and --provider filters", file=sys.stderr)
        return 2
    results: list[Result] = []
    with tqdm(total=sum(map(len, groups.values())), desc="mmfast bench", unit="provider",
              delay=2.0, leave=False, disable=None, file=sys.stderr) as progress:
        described = set()
        for (case, dtype), names in groups.items():
            if case.suite not in described:
                described.add(case.suite)
                progress.clear()
                print(f"## {case.description}\n", flush=True)
            try:
                group = measure_group(
                    case, dtype, names, device, budget_s=budget_s, warmup_rounds=2 if args.quick else 3,
                    min_rounds=3 if args.quick else 5, on_warm=progress.update, forward=not args.no_forward,
                    graph=False if args.wall_clock else None,
                )
            except DeviceLost as lost:
                progress.clear()
                trace = "".join(traceback.format_exception(lost.__cause__ or lost))
                print(f"error: the device failed in {lost}\n{trace}"
                      "Nothing more can run in this process. To find the faulting kernel, rerun that case alone "
                      "(--case, --provider) with CUDA_LAUNCH_BLOCKING=1 and --wall-clock, or under "
                      "compute-sanitizer.", file=sys.stderr, flush=True)
                return 1
            results += group
            # each table as soon as it is measured: a run cut short keeps what it measured
            progress.clear()
            print(render_tables(group), flush=True)
            if args.json:
                _write_json(args.json, info, date, results, earlier)
    for label, reason in skipped.items():
        print(f"skipped {label}: {reason}")
    return 0


def _write_json(path: str, info: dict, date: str, results: Sequence[Result], earlier: dict | None = None) -> None:
    """The results as pytest-benchmark JSON; after those of ``earlier`` (a document this wrote before), whose
    machine and date it keeps."""
    doc = {"machine_info": info, "datetime": date, "benchmarks": [r.to_json() for r in results]}
    if earlier is not None:
        doc = {**earlier, "benchmarks": [*earlier["benchmarks"], *doc["benchmarks"]]}
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
