"""Argument checks shared by the public functions.

Shape, dtype and device checks always run (they read metadata only). Value checks (negative weights,
indices out of range, labels out of range) read the data on the host, so they run in eager mode only:
they are skipped under ``torch.compile`` and CUDA-graph capture, and can be turned off with
``mmfast.set_value_checks(False)`` or ``MMFAST_CHECK_VALUES=0``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
from torch import Tensor

_value_checks = os.environ.get("MMFAST_CHECK_VALUES", "1") != "0"


def set_value_checks(enabled: bool) -> None:
    """Turn the eager-mode value checks (which synchronise with the host) on or off."""
    global _value_checks
    _value_checks = bool(enabled)


def value_checks_enabled() -> bool:
    """What :func:`set_value_checks` last set (``MMFAST_CHECK_VALUES`` before that)."""
    return _value_checks


def value_checks_active(*tensors: Tensor) -> bool:
    """True when value checks may read data: enabled, eager, and not capturing a CUDA graph."""
    if not _value_checks or torch.compiler.is_compiling():
        return False
    if any(t.is_cuda for t in tensors) and torch.cuda.is_current_stream_capturing():
        return False
    return True


def choice(name: str, value: str, valid: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in valid:
        raise ValueError(f"{name} must be one of {', '.join(repr(v) for v in valid)}; got {value!r}")
    return value


def tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def floating(name: str, t: Tensor) -> Tensor:
    tensor(name, t)
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32, float64, bfloat16, float16), got {t.dtype}")
    return t


def positive(name: str, value: float) -> float:
    if isinstance(value, Tensor):
        raise TypeError(f"{name} must be a Python number, not a tensor")
    value = float(value)
    # comparisons only (no math.isfinite): under torch.compile a changing float (e.g. a temperature
    # schedule) becomes a symbolic float, which math.isfinite cannot take; NaN fails 0 < value
    if not (0.0 < value < math.inf):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def same_device(names: Sequence[str], tensors: Sequence[Tensor | None]) -> None:
    pairs = [(n, t) for n, t in zip(names, tensors, strict=True) if t is not None]
    first_name, first = pairs[0]
    for n, t in pairs[1:]:
        if t.device != first.device:
            raise ValueError(f"{n} is on {t.device} but {first_name} is on {first.device}; move them to one device")


def stack(name: str, value: Tensor | Sequence[Tensor]) -> Tensor:
    """A tensor as is, or a non-empty sequence of same-shaped tensors stacked on a new dim 0."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(t, Tensor) for t in value):
        shapes = {tuple(t.shape) for t in value}
        if len(shapes) != 1:
            raise ValueError(f"{name}: all tensors of the sequence must have one shape, got {sorted(shapes)}")
        return torch.stack(list(value))
    raise TypeError(f"{name} must be a tensor or a non-empty sequence of tensors, got {type(value).__name__}")
