"""Backend selection: which implementation runs an op, and why.

Names: ``torch`` (pure-PyTorch reference), ``cpu`` (fused C++ in ``mmfast._C``), ``triton``
(``mmfast/triton``; on CPU tensors only under ``TRITON_INTERPRET=1``), ``cuda`` (hand-written CUDA in
``mmfast._C``, built with ``MMFAST_WITH_CUDA=ON``). ``auto`` picks, per call, by device and dtype:
on a GPU Triton, else the CUDA extension, else torch; on a CPU the C++ extension when built, else
torch. A forced backend that cannot run a call raises :class:`BackendUnavailableError`; nothing
falls back silently. Nothing here probes a GPU or imports Triton at ``import mmfast``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
from collections.abc import Iterator

import torch

from mmfast import _native

BACKENDS = ("torch", "cpu", "triton", "cuda")
_CHOICES = ("auto", *BACKENDS)

# dtypes each backend's kernels accept
_DTYPES = {
    "torch": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
    "cpu": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
    "triton": (torch.float32, torch.bfloat16, torch.float16),
    "cuda": (torch.float32, torch.bfloat16, torch.float16),
}

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("mmfast_backend", default=None)


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run this call (not built, wrong device or dtype)."""


def _check_name(name: str, source: str) -> str:
    name = name.strip().lower()
    if name not in _CHOICES:
        raise ValueError(f"{source}: unknown backend {name!r}; valid names are {', '.join(_CHOICES)}")
    return name


def requested_backend() -> str:
    """The backend asked for: ``use_backend`` if active, else ``$MMFAST_BACKEND``, else ``auto``."""
    name = _forced.get()
    if name is not None:
        return name
    env = os.environ.get("MMFAST_BACKEND")
    return _check_name(env, "MMFAST_BACKEND") if env else "auto"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend (``torch``, ``cpu``, ``triton``, ``cuda`` or ``auto``) inside a ``with`` block."""
    token = _forced.set(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        _forced.reset(token)


@functools.cache
def _triton_installed() -> bool:
    # cached: find_spec searches sys.path (tens of microseconds) and resolve() runs on every op call
    return importlib.util.find_spec("triton") is not None


def _triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _availability(name: str, device_type: str) -> str | None:
    """None when ``name`` can run on ``device_type``, else the reason it cannot."""
    if name == "torch":
        return None
    if name == "cpu":
        if device_type != "cpu":
            return f"the cpu backend runs on CPU tensors, got {device_type} tensors"
        if _native.load() is None:
            return f"mmfast._C is not built ({_native.load_error()})"
        return None
    if name == "triton":
        if not _triton_installed():
            return "triton is not installed (pip install triton)"
        if device_type == "cpu" and not _triton_interpreter():
            return "triton on CPU tensors needs TRITON_INTERPRET=1 (set before triton is imported)"
        if device_type not in ("cpu", "cuda"):
            return f"triton kernels run on cuda tensors, got {device_type}"
        return None
    if name == "cuda":
        if device_type != "cuda":
            return f"the cuda backend runs on CUDA tensors, got {device_type} tensors"
        mod = _native.load()
        if mod is None:
            return f"mmfast._C is not built ({_native.load_error()})"
        if not mod.with_cuda:
            return "mmfast._C was built without CUDA kernels (rebuild with MMFAST_WITH_CUDA=ON)"
        return None
    raise ValueError(f"unknown backend {name!r}")


def _auto_order(device_type: str) -> tuple[str, ...]:
    return ("triton", "cuda", "torch") if device_type == "cuda" else ("cpu", "torch")


def resolve(device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs a call on ``device`` with logits of ``dtype``."""
    name = requested_backend()
    if name != "auto":
        reason = _availability(name, device.type)
        if reason is None and dtype not in _DTYPES[name]:
            reason = f"it does not support {dtype}"
        if reason is not None:
            raise BackendUnavailableError(f"mmfast backend {name!r} was forced but cannot run: {reason}")
        return name
    for cand in _auto_order(device.type):
        if _availability(cand, device.type) is None and dtype in _DTYPES[cand]:
            return cand
    return "torch"


def backend_info(device: str | torch.device | None = None) -> dict:
    """What is available, what ``auto`` chooses on ``device`` (default: CUDA if present, else CPU), and why."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    available, reasons = {}, {}
    for name in BACKENDS:
        reason = _availability(name, device.type)
        available[name] = reason is None
        if reason is not None:
            reasons[name] = reason
    requested = requested_backend()
    if requested == "auto":
        chosen = resolve(device, torch.float32)
        why = (
            f"auto on {device.type}: first available of {', '.join(_auto_order(device.type))}"
            + (f" (skipped: {'; '.join(f'{k}: {v}' for k, v in reasons.items() if k != chosen)})" if reasons else "")
        )
    else:
        chosen = requested
        why = "forced by use_backend()" if _forced.get() is not None else "forced by $MMFAST_BACKEND"
        if not available[requested]:
            why += f", but unavailable: {reasons[requested]}"
    mod = _native.load()
    return {
        "device": str(device),
        "requested": requested,
        "chosen": chosen,
        "why": why,
        "available": available,
        "unavailable_reasons": reasons,
        "dtypes": {k: [str(d).replace("torch.", "") for d in v] for k, v in _DTYPES.items()},
        "native_built": mod is not None,
        "native_with_cuda": bool(mod is not None and mod.with_cuda),
        "triton_interpreter": _triton_interpreter(),
        "torch": torch.__version__,
    }
