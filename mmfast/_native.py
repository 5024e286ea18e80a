"""Marshalling between tensors and the native kernels' parameter blocks (``mmfast._C``).

The native module is imported lazily, on first use, never at ``import mmfast``.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch
from torch import Tensor

DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}


@functools.cache
def load() -> ModuleType | None:
    """The native module, or None when the package was installed without it."""
    try:
        from mmfast import _C
    except ImportError:
        return None
    return _C


def load_error() -> str | None:
    """Why the native module cannot be imported (None when it can)."""
    try:
        from mmfast import _C  # noqa: F401
    except ImportError as e:
        return str(e)
    return None


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None or t.numel() == 0 else t.data_ptr()


def routed_kd_params(
    x: Tensor,
    z: Tensor,
    w: Tensor,
    idx: Tensor | None,
    mask: Tensor | None,
    temperature: float,
    mix: int,
    divergence: int,
    beta: float,
    scale: float,
    loss: Tensor,
    dx: Tensor | None,
    dw: Tensor | None,
    dz: Tensor | None,
):
    """A ``_C.RoutedKDParams`` for x [B, C, S], z [E, B, C, S] (any strides) and contiguous rest."""
    C_ = load()
    p = C_.RoutedKDParams()
    p.B, p.C, p.S = x.shape
    p.E = z.shape[0]
    p.K = w.shape[1]
    p.sx_b, p.sx_c, p.sx_s = x.stride()
    p.sz_e, p.sz_b, p.sz_c, p.sz_s = z.stride()
    p.x, p.z, p.w = _ptr(x), _ptr(z), _ptr(w)
    p.idx, p.mask = _ptr(idx), _ptr(mask)
    p.inv_tau, p.beta, p.scale = 1.0 / temperature, beta, scale
    p.mix, p.div, p.dtype = mix, divergence, DTYPE_CODES[x.dtype]
    p.loss, p.dx, p.dw, p.dz = _ptr(loss), _ptr(dx), _ptr(dw), _ptr(dz)
    return p


def mutual_kd_params(logits: Tensor, temperature: float, scale: float, loss: Tensor, grad: Tensor | None):
    """A ``_C.MutualKDParams`` for logits [M, N, C] (any strides)."""
    C_ = load()
    p = C_.MutualKDParams()
    p.M, p.N, p.C = logits.shape
    p.s_m, p.s_n, p.s_c = logits.stride()
    p.logits = _ptr(logits)
    p.inv_tau, p.scale, p.dtype = 1.0 / temperature, scale, DTYPE_CODES[logits.dtype]
    p.loss, p.grad = _ptr(loss), _ptr(grad)
    return p


def _run(kernel: str, fn_name: str, params, device: torch.device) -> None:
    C_ = load()
    if kernel == "cpu":
        getattr(C_, f"{fn_name}_cpu")(params, torch.get_num_threads())
    else:
        with torch.cuda.device(device):  # launch on the tensors' device, on its current stream
            getattr(C_, f"{fn_name}_cuda")(params, torch.cuda.current_stream(device).cuda_stream)


def routed_kd_outputs(
    x: Tensor,
    z: Tensor,
    weights: Tensor,
    indices: Tensor | None,
    mask: Tensor | None,
    need_dx: bool,
    need_dw: bool,
    need_dz: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor, Tensor, Tensor, Tensor]:
    """Kernel-ready inputs and fresh outputs of a routed-KD launch (shared by the cpu, cuda and triton
    launchers): (w, idx, mask_u8, loss, dx, dw, dz).

    Weights become contiguous in the compute dtype, indices contiguous int64, the mask contiguous
    uint8. Unrequested gradients are distinct empty tensors (op outputs must not alias each other);
    with sparse routing dz is zero-filled, because kernels add into the selected teachers only.
    """
    from mmfast.reference.routed_kd import compute_dtype

    B, C, S = x.shape
    E, K = z.shape[0], weights.shape[1]
    cdt = compute_dtype(x.dtype)
    w = weights.to(cdt).contiguous()
    idx = None if indices is None else indices.to(torch.int64).contiguous()
    m = None if mask is None else mask.to(torch.bool).contiguous().view(torch.uint8)
    loss = torch.empty(B, S, dtype=cdt, device=x.device)
    dx = torch.empty(B, C, S, dtype=x.dtype, device=x.device) if need_dx else x.new_empty(0)
    dw = torch.empty(B, S, K, dtype=cdt, device=x.device) if need_dw else x.new_empty(0)
    if need_dz:
        alloc = torch.zeros if idx is not None else torch.empty
        dz = alloc(E, B, C, S, dtype=z.dtype, device=x.device)
    else:
        dz = x.new_empty(0)
    return w, idx, m, loss, dx, dw, dz


def routed_kd_rows(
    kernel: str,
    x: Tensor,
    z: Tensor,
    weights: Tensor,
    indices: Tensor | None,
    mask: Tensor | None,
    temperature: float,
    mix: int,
    divergence: int,
    beta: float,
    scale: float,
    need_dx: bool,
    need_dw: bool,
    need_dz: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Native routed KD (``kernel`` is "cpu" or "cuda"); same contract as the reference."""
    w, idx, m, loss, dx, dw, dz = routed_kd_outputs(x, z, weights, indices, mask, need_dx, need_dw, need_dz)
    if loss.numel() > 0:
        params = routed_kd_params(
            x, z, w, idx, m, temperature, mix, divergence, beta, scale, loss, dx, dw, dz
        )
        _run(kernel, "routed_kd", params, x.device)
    return loss, dx, dw, dz


def mutual_kd_rows(
    kernel: str, logits: Tensor, temperature: float, scale: float, need_grad: bool
) -> tuple[Tensor, Tensor]:
    """Native mutual KD (``kernel`` is "cpu" or "cuda"); same contract as the reference."""
    from mmfast.reference.routed_kd import compute_dtype

    M, N, C = logits.shape
    loss = torch.empty(N, dtype=compute_dtype(logits.dtype), device=logits.device)
    grad = torch.empty(M, N, C, dtype=logits.dtype, device=logits.device) if need_grad else logits.new_empty(0)
    if loss.numel() > 0:
        _run(kernel, "mutual_kd", mutual_kd_params(logits, temperature, scale, loss, grad), logits.device)
    return loss, grad
