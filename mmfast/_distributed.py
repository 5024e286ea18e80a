"""The ``process_group`` helpers shared by every op with a global statistic (docs/distributed.md).

The all-reduce is a functional collective (``torch.ops._c10d_functional``): it needs no host
synchronisation and ``torch.compile(fullgraph=True)`` traces it without a graph break. It returns a new
tensor (never reduces a caller's tensor in place) and is differentiable: its backward sums the incoming
gradients over the ranks.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


def check_process_group(process_group: ProcessGroup | None, reduction: str | None = None) -> ProcessGroup | None:
    """``process_group`` is None, or a ``torch.distributed`` group of an initialised default group;
    ``reduction="none"`` (per row, local) refuses a group."""
    if process_group is None:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group was given but torch.distributed is not initialised (init_process_group)")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            f"process_group must be a torch.distributed.ProcessGroup (e.g. dist.group.WORLD or dist.new_group()), "
            f"got {type(process_group).__name__}"
        )
    if reduction == "none":
        raise ValueError("process_group needs reduction='batchmean' or 'sum' (reduction='none' is per row, local)")
    return process_group


def _sum_over_ranks(t: Tensor, group_name: str) -> Tensor:
    """sum_r t_r on every rank: a functional collective (traceable by torch.compile, no host sync)."""
    out = torch.ops._c10d_functional.all_reduce(t.contiguous(), "sum", group_name)
    return torch.ops._c10d_functional.wait_tensor(out)


class _AllReduceSum(torch.autograd.Function):
    """Forward: sum_r t_r. Backward: the incoming gradients summed over the ranks, i.e. the gradient of
    sum_r L_r with respect to this rank's t_r."""

    @staticmethod
    def forward(ctx, t: Tensor, group_name: str) -> Tensor:
        ctx.group_name = group_name
        return _sum_over_ranks(t, group_name)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _sum_over_ranks(grad, ctx.group_name), None


def all_reduce_sum(t: Tensor, process_group: ProcessGroup | None) -> Tensor:
    """Differentiable sum over the ranks of ``process_group`` (``t`` itself without one); a new tensor.

    Each rank's backward gets d(sum_r L_r)/dt_r: with every L_r equal to the global loss and DDP / FSDP
    averaging the parameter gradients over the ranks, the result is the single-process gradient of
    the global loss (docs/distributed.md).
    """
    if process_group is None:
        return t
    return _AllReduceSum.apply(t, process_group.group_name)


def global_mean(sums: Tensor, count: Tensor | int, process_group: ProcessGroup | None) -> Tensor:
    """(sum_r sums_r) / max(1, sum_r count_r) in float64 with one all-reduce; sums of any shape."""
    flat = sums.double().reshape(-1)
    n = count.double().reshape(1) if isinstance(count, Tensor) else flat.new_full((1,), float(count))
    packed = all_reduce_sum(torch.cat([flat, n]), process_group)
    return (packed[:-1] / packed[-1].clamp_min(1)).reshape(sums.shape)


def deepcopy_sharing_group(module, memo: dict):
    """``copy.deepcopy`` of a module holding ``process_group``: the copy shares the group (a process-wide
    handle, which can be neither copied nor pickled); everything else is copied as usual. Use as the
    class's ``__deepcopy__``."""
    group = getattr(module, "process_group", None)
    if group is not None:
        memo[id(group)] = group
    new = module.__class__.__new__(module.__class__)
    memo[id(module)] = new
    for key, value in module.__dict__.items():
        new.__dict__[key] = copy.deepcopy(value, memo)
    return new
