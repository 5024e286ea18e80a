"""Running a forward op: through torch.library, or, in plain eager mode, without its dispatch.

Calling a ``torch.library`` custom op that has autograd costs about 80 us of host time per forward and
backward on a CPU (the dispatcher, then the generated autograd wrapper, whose
``torch._library.utils.fill_defaults`` reads the schema once per argument; torch 2.13), several times
what a kernel takes at small sizes. :class:`OpRunner` runs the same implementation, with the same
``setup_context`` and ``backward``, inside a plain ``torch.autograd.Function`` when nothing could see the
difference (see :func:`plain_eager_call`), and calls the op otherwise: torch.compile, export, tracing,
``opcheck``, FakeTensor, vmap and tensor subclasses always meet the custom op.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from torch._library.custom_ops import CustomOpDef

_dispatch_stack_len = getattr(torch._C, "_len_torch_dispatch_stack", None)
_torch_function_mode_on = getattr(torch._C, "_is_torch_function_mode_enabled", None)
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", None)
_tracing_state = getattr(torch._C, "_get_tracing_state", None)
# the direct path needs every probe above; a torch build without one always calls the op
_PROBES = None not in (_dispatch_stack_len, _torch_function_mode_on, _functorch_active, _tracing_state)

_enabled = True


def set_enabled(enabled: bool) -> bool:
    """Allow (True, the default) or forbid the direct eager path; returns the previous setting. For tests
    and debugging: with False every call goes through torch.library."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


@contextlib.contextmanager
def direct_path(enabled: bool) -> Iterator[None]:
    """:func:`set_enabled` inside a ``with`` block; the setting before it comes back after."""
    previous = set_enabled(enabled)
    try:
        yield
    finally:
        set_enabled(previous)


def untraced() -> bool:
    """True when nothing is being compiled or traced and no torch-function or dispatch mode and no functorch
    transform is active: what calls a custom op's Python implementation directly (a forward here, a backward
    op in mmfast/ops/_grad_scaling.py) must know before it skips the op."""
    return (
        _PROBES
        and not torch.compiler.is_compiling()
        and _dispatch_stack_len() == 0
        and not _torch_function_mode_on()
        and not _functorch_active()
        and _tracing_state() is None
    )


def plain_eager_call(args: tuple[Any, ...]) -> bool:
    """True when a call with ``args`` may skip the custom op: the direct path is enabled, :func:`untraced`,
    and every tensor argument is a plain, non-meta ``Tensor``."""
    return (
        _enabled
        and untraced()
        and all(type(a) is Tensor and not a.is_meta for a in args if isinstance(a, Tensor))
    )


class OpRunner:
    """Runs the custom op ``op`` whose implementation is ``impl``, registering ``backward`` and
    ``setup_context`` as its autograd formula (``op.register_autograd``). Calls take every argument
    positionally; trailing ones with defaults may be left out."""

    def __init__(
        self, op: CustomOpDef, impl: Callable[..., Any], *, setup_context: Callable, backward: Callable
    ) -> None:
        op.register_autograd(backward, setup_context=setup_context)
        self.op = op
        self._impl = impl
        defaults = [p.default for p in inspect.signature(impl).parameters.values()]
        self._num_args = len(defaults)
        # the trailing arguments a call may leave out: those after the last one without a default
        self._min_args = max((i + 1 for i, d in enumerate(defaults) if d is inspect.Parameter.empty), default=0)
        self._defaults = tuple(defaults)

        def forward(ctx, *args):
            output = impl(*args)
            setup_context(ctx, args, output)
            return output

        # old-style forward(ctx, ...): Function.apply then binds no signature per call
        self._function = type(
            f"{impl.__name__.strip('_')}_eager",
            (torch.autograd.Function,),
            {"forward": staticmethod(forward), "backward": staticmethod(backward)},
        )

    def __call__(self, *args: Any) -> Any:
        if self._min_args <= len(args) < self._num_args:
            args = args + self._defaults[len(args):]
        if len(args) != self._num_args or not plain_eager_call(args):
            return self.op(*args)
        if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
            return self._function.apply(*args)
        return self._impl(*args)
