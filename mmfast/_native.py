"""Marshalling between tensors and the native kernels' parameter blocks (``mmfast._C``).

The native module is imported lazily, on first use, never at ``import mmfast``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from types import ModuleType

import torch
from torch import Tensor

from mmfast.reference.masked_reconstruction import COSINE_EPS
from mmfast.reference.routed_kd import compute_dtype

DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
CUDA_ROW_TEAM_CLUSTER = 3  # mmfast/kernels.h: kCudaRowTeamCluster


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


@contextlib.contextmanager
def _native_setting(name: str, value: int) -> Iterator[None]:
    """``_C.set_<name>(value)`` within the block, the previous value restored after it."""
    C_ = load()
    if C_ is None:
        raise RuntimeError(f"mmfast._C is not built: {load_error()}")
    previous = getattr(C_, name)()
    getattr(C_, f"set_{name}")(value)
    try:
        yield
    finally:
        getattr(C_, f"set_{name}")(previous)


def cpu_streaming_min_bytes(min_bytes: int) -> contextlib.AbstractContextManager[None]:
    """Within the block, the CPU kernels that move more than ``min_bytes`` (read + written) write their
    large outputs with streaming (non-temporal) stores: 0 always, a huge value never. Outside it the
    threshold is what it was (by default the last-level cache size, at most 64 MiB). For tests and tuning; the
    values written are the same either way."""
    return _native_setting("cpu_streaming_min_bytes", min_bytes)


def cpu_isa_level(level: int) -> contextlib.AbstractContextManager[None]:
    """Within the block, the CPU kernels that write a cache line at a time (f-distill, Uni-Instruct, fake
    score, masked reconstruction) run the code of x86-64 level ``min(level, this CPU's)``: 4 AVX-512, 3 AVX2,
    0 (or 1, 2) the baseline; -1 removes the cap. Outside it the level is what it was. For tests (one machine
    runs every lower level's code); the values agree to rounding."""
    return _native_setting("cpu_isa_level", level)


def cpu_row_tile_max_classes(classes: int) -> contextlib.AbstractContextManager[None]:
    """Within the block, the CPU routed-KD and mutual-KD kernels run rows of at most ``classes`` classes a
    vector of rows at a time (one row per lane) and longer rows one at a time: 0 never tiles, -1 restores
    each kernel's own bound (the default: 63 classes for mix ``loss`` and ``probs``, 40 for ``logits``, 27
    for mutual KD, where the row loop becomes faster). Outside the block the bound is what it was. For
    tests and tuning; both paths compute the same values up to rounding."""
    return _native_setting("cpu_row_tile_max_classes", classes)


def cuda_row_team(team: int) -> contextlib.AbstractContextManager[None]:
    """Within the block, the CUDA routed/mutual KD and masked-reconstruction kernels give each row the team
    ``team`` (mmfast/kernels.h: 0 automatic, 1 a block per row, 2 a thread per row, 3 a thread-block cluster)
    instead of their own choice. For tests and benchmarks; the values agree to rounding."""
    return _native_setting("cuda_row_team", team)


def cuda_sweep_order(order: int) -> contextlib.AbstractContextManager[None]:
    """Within the block, the CUDA routed/mutual KD kernels' block- and thread-per-row launches go over their rows
    after pass 1 in sweep order ``order`` (mmfast/kernels.h: 0 automatic, 1 back and forth with L2 evict-first
    hints, 2 back and forth, 3 forward). For tests and benchmarks; the values agree to rounding."""
    return _native_setting("cuda_sweep_order", order)


_CUDA_SCALE_BLOCK = 4096  # elements of a row per block (kScaleBlock in csrc/cuda/grad_scaling.cu)


def scale_unless_one_cuda(grad: Tensor, factor: Tensor, layout: tuple[int, int, int, int]) -> bool:
    """grad[k, r, d, q] *= factor[r, q] in place on the GPU for grad contiguous [repeat, rows, D, Q] = ``layout``
    and factor contiguous float32 [rows * Q], skipping the blocks whose factors are all 1
    (csrc/cuda/grad_scaling.cu). False (nothing done) when a row is longer than the grid allows."""
    repeat, rows, D, Q = layout
    if -(-D * Q // _CUDA_SCALE_BLOCK) > 65535 or repeat * rows >= 2**31:
        return False
    C_ = load()
    p = C_.GradScaleParams()
    p.repeat, p.rows, p.D, p.Q = repeat, rows, D, Q
    p.grad, p.factor = _ptr(grad), _ptr(factor)
    p.dtype = DTYPE_CODES[grad.dtype]
    _run("cuda", "scale_unless_one", p, grad.device)
    return True


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
    workspace: Tensor | None = None,
):
    """A ``_C.RoutedKDParams`` for x [B, C, S], z [E, B, C, S] (any strides) and contiguous rest; ``workspace``:
    the CUDA kernels' float32 scratch for rows split over several blocks (see :func:`_row_split_workspace`)."""
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
    p.workspace, p.workspace_floats = _ptr(workspace), 0 if workspace is None else workspace.numel()
    return p


def _row_split_workspace(kernel: str, rows: int, classes: int, device: torch.device) -> Tensor | None:
    """Scratch of the CUDA routed-KD and mutual-KD kernels for long rows of class logits cut into pieces
    (csrc/cuda/common.cuh: split mode for fewer rows than the GPU has SMs, cluster mode for more on sm_90+), or
    for any row with the row team forced to clusters (``set_cuda_row_team(3)``, tests); None where they never
    cut rows (the CPU, short rows)."""
    C_ = load()
    if kernel != "cuda" or rows < 1:
        return None
    if classes < C_.row_split_min_classes and not (classes > 1 and C_.cuda_row_team() == CUDA_ROW_TEAM_CLUSTER):
        return None
    return torch.empty(C_.row_split_workspace_floats, dtype=torch.float32, device=device)


def mutual_kd_params(
    logits: Tensor, temperature: float, scale: float, loss: Tensor, grad: Tensor | None,
    workspace: Tensor | None = None,
):
    """A ``_C.MutualKDParams`` for logits [M, N, C] (any strides); ``workspace`` as in :func:`routed_kd_params`."""
    C_ = load()
    p = C_.MutualKDParams()
    p.M, p.N, p.C = logits.shape
    p.s_m, p.s_n, p.s_c = logits.stride()
    p.logits = _ptr(logits)
    p.inv_tau, p.scale, p.dtype = 1.0 / temperature, scale, DTYPE_CODES[logits.dtype]
    p.loss, p.grad = _ptr(loss), _ptr(grad)
    p.workspace, p.workspace_floats = _ptr(workspace), 0 if workspace is None else workspace.numel()
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
        # held until the launch; dense logits (S > 1) are never split
        workspace = _row_split_workspace(kernel, x.shape[0], x.shape[1] if x.shape[2] == 1 else 0, x.device)
        params = routed_kd_params(
            x, z, w, idx, m, temperature, mix, divergence, beta, scale, loss, dx, dw, dz, workspace
        )
        _run(kernel, "routed_kd", params, x.device)
    return loss, dx, dw, dz


def mutual_kd_rows(
    kernel: str, logits: Tensor, temperature: float, scale: float, need_grad: bool
) -> tuple[Tensor, Tensor]:
    """Native mutual KD (``kernel`` is "cpu" or "cuda"); same contract as the reference."""
    M, N, C = logits.shape
    loss = torch.empty(N, dtype=compute_dtype(logits.dtype), device=logits.device)
    grad = torch.empty(M, N, C, dtype=logits.dtype, device=logits.device) if need_grad else logits.new_empty(0)
    if loss.numel() > 0:
        workspace = _row_split_workspace(kernel, N, C, logits.device)  # held until the launch
        _run(kernel, "mutual_kd", mutual_kd_params(logits, temperature, scale, loss, grad, workspace), logits.device)
    return loss, grad


# ---- masked reconstruction ----------------------------------------------------------------------

RECON_MASK_NONE, RECON_MASK_ROWS, RECON_MASK_FLOAT, RECON_MASK_BOOL = 0, 1, 2, 3


def masked_reconstruction_output_shapes(
    pred_shape, row_mask: bool, elem_mask: bool, per_element: bool, need_dp: bool, need_dy: bool, need_dm: bool
) -> tuple[tuple, tuple, tuple, tuple, tuple]:
    """Shapes of the masked-reconstruction forward op's five outputs ((0,) when absent)."""
    A, D, S = pred_shape
    full, rows = (A, D, S), (A * S,)
    loss = full if per_element else rows
    if row_mask and elem_mask and need_dm:
        raise ValueError("masked reconstruction: dM is not defined with both row weights and an element mask")
    msum = rows if (elem_mask and not row_mask and not per_element) else (0,)
    need_dm = need_dm and (row_mask or elem_mask)
    dm = (rows if (row_mask and not per_element) else full) if need_dm else (0,)
    return loss, msum, full if need_dp else (0,), full if need_dy else (0,), dm


def masked_reconstruction_outputs(
    pred: Tensor,
    mask_rows: Tensor | None,
    mask: Tensor | None,
    per_element: bool,
    need_dp: bool,
    need_dy: bool,
    need_dm: bool,
) -> tuple[int, Tensor | None, Tensor | None, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Kernel-ready masks and fresh outputs of a masked-reconstruction launch (shared by the cpu, cuda
    and triton launchers): (mask_kind, mask, row_weights, loss, msum, dp, dy, dm).

    A row mask alone is ``mask`` (kind rows), [R] made contiguous; an element mask keeps its strides (a bool
    one is viewed as uint8, no copy), and a row mask beside it becomes ``row_weights``. Unrequested outputs
    are distinct empty tensors.
    """
    cdt = compute_dtype(pred.dtype)
    row_weights = None
    if mask is not None:
        kind, m = (RECON_MASK_BOOL, mask.view(torch.uint8)) if mask.dtype == torch.bool else (RECON_MASK_FLOAT, mask)
        if mask_rows is not None:
            row_weights = mask_rows.contiguous()
    elif mask_rows is not None:
        kind, m = RECON_MASK_ROWS, mask_rows.contiguous()
    else:
        kind, m = RECON_MASK_NONE, None
    s_loss, s_msum, s_dp, s_dy, s_dm = masked_reconstruction_output_shapes(
        tuple(pred.shape), mask_rows is not None, mask is not None, per_element, need_dp, need_dy, need_dm
    )
    dev = pred.device
    loss = torch.empty(s_loss, dtype=pred.dtype if per_element else cdt, device=dev)
    msum = torch.empty(s_msum, dtype=cdt, device=dev)
    dp = torch.empty(s_dp, dtype=pred.dtype, device=dev)
    dy = torch.empty(s_dy, dtype=pred.dtype, device=dev)
    dm = torch.empty(s_dm, dtype=cdt, device=dev)
    return kind, m, row_weights, loss, msum, dp, dy, dm


def masked_reconstruction_params(
    pred: Tensor,
    target: Tensor,
    mask_kind: int,
    mask: Tensor | None,
    row_weights: Tensor | None,
    loss_kind: int,
    beta: float,
    normalize_target: bool,
    eps: float,
    per_element: bool,
    loss: Tensor,
    msum: Tensor,
    dp: Tensor,
    dy: Tensor,
    dm: Tensor,
):
    """A ``_C.MaskedReconParams`` for pred/target [A, D, S] (any strides); empty outputs become nullptr."""
    C_ = load()
    p = C_.MaskedReconParams()
    p.A, p.D, p.S = pred.shape
    p.sp_a, p.sp_d, p.sp_s = pred.stride()
    p.sy_a, p.sy_d, p.sy_s = target.stride()
    p.pred, p.target = _ptr(pred), _ptr(target)
    p.mask_kind = mask_kind
    p.mask = _ptr(mask)
    if mask is not None and mask.dim() == 3:
        p.sm_a, p.sm_d, p.sm_s = mask.stride()
    p.row_weights = _ptr(row_weights)
    p.loss, p.normalize_target, p.per_element = loss_kind, int(normalize_target), int(per_element)
    p.dtype = DTYPE_CODES[pred.dtype]
    p.beta, p.eps, p.cos_eps = beta, eps, COSINE_EPS
    p.loss_out, p.msum, p.dp, p.dy, p.dm = _ptr(loss), _ptr(msum), _ptr(dp), _ptr(dy), _ptr(dm)
    return p


def masked_reconstruction_rows(
    kernel: str,
    pred: Tensor,
    target: Tensor,
    mask_rows: Tensor | None,
    mask: Tensor | None,
    loss_kind: int,
    beta: float,
    normalize_target: bool,
    eps: float,
    per_element: bool,
    need_dp: bool,
    need_dy: bool,
    need_dm: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Native masked reconstruction (``kernel`` is "cpu" or "cuda"); same contract as the reference."""
    kind, m, rw, loss, msum, dp, dy, dm = masked_reconstruction_outputs(
        pred, mask_rows, mask, per_element, need_dp, need_dy, need_dm
    )
    A, D, S = pred.shape
    if A * S > 0 and D > 0:
        params = masked_reconstruction_params(
            pred, target, kind, m, rw, loss_kind, beta, normalize_target, eps, per_element, loss, msum, dp, dy, dm
        )
        _run(kernel, "masked_reconstruction", params, pred.device)
    return loss, msum, dp, dy, dm


# --- score distillation: f-distill, Uni-Instruct, fake score (row contract: reference/{fdistill,...}.py) ---


def _score_rows(*tensors: Tensor) -> Tensor:
    """Checks the kernels' layout contract on [B, D] row views: one shape, one dtype, one device, unit
    element stride (any row stride). Returns the first tensor."""
    first = tensors[0]
    for t in tensors:
        if t.dim() != 2 or t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
            raise ValueError(
                f"score kernels need [B, D] rows of one shape, dtype and device, got {tuple(t.shape)} {t.dtype} "
                f"{t.device} and {tuple(first.shape)} {first.dtype} {first.device}"
            )
        if t.shape[1] > 1 and t.stride(1) != 1:
            raise ValueError(f"score kernels need unit element stride, got strides {t.stride()}")
    if first.device.type == "cuda" and first.dtype == torch.float64:
        raise TypeError("the cuda backend does not support float64 inputs (use float32, bfloat16 or float16)")
    return first


def _per_sample(t: Tensor, cdt: torch.dtype) -> Tensor:
    return t.to(cdt).contiguous()


def _score_workspace(x: Tensor, kernel: str) -> Tensor:
    """Scratch of the CUDA kernels for rows split over several blocks (empty on the CPU)."""
    if kernel != "cuda":
        return x.new_empty(0, dtype=torch.float32)
    return torch.empty(load().score_workspace_floats, dtype=torch.float32, device=x.device)


def _row_stride(t: Tensor) -> int:
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


def fdistill_params(x: Tensor, a: Tensor, b: Tensor, h: Tensor, scale: float, loss: Tensor, dx: Tensor,
                    workspace: Tensor):
    """A ``_C.FDistillParams`` for [B, D] rows x, a, b (unit element stride) and h [B] contiguous."""
    p = load().FDistillParams()
    p.B, p.D = x.shape
    p.x, p.a, p.b, p.h = _ptr(x), _ptr(a), _ptr(b), _ptr(h)
    p.sx, p.sa, p.sb = _row_stride(x), _row_stride(a), _row_stride(b)
    p.scale, p.dtype = scale, DTYPE_CODES[x.dtype]
    p.loss, p.dx = _ptr(loss), _ptr(dx)
    p.workspace, p.workspace_floats = _ptr(workspace), workspace.numel()
    return p


def fdistill_rows(
    kernel: str, x: Tensor, a: Tensor, b: Tensor, h: Tensor, scale: float, need_dx: bool
) -> tuple[Tensor, Tensor]:
    """Native f-distill rows (``kernel`` is "cpu" or "cuda"); same contract as
    ``mmfast.reference.fdistill.fdistill_rows``: (loss [B] in the compute dtype, dx [B, D] or empty)."""
    _score_rows(x, a, b)
    B, D = x.shape
    cdt = compute_dtype(x.dtype)
    loss = torch.empty(B, dtype=cdt, device=x.device)
    dx = torch.empty(B, D, dtype=x.dtype, device=x.device) if need_dx else x.new_empty(0)
    if B > 0:
        # every tensor whose address the params hold stays referenced here until the launch is enqueued
        ws, h_c = _score_workspace(x, kernel), _per_sample(h, cdt)
        _run(kernel, "fdistill", fdistill_params(x, a, b, h_c, scale, loss, dx, ws), x.device)
    return loss, dx


def uni_instruct_params(x: Tensor, a: Tensor, b: Tensor, coef: Tensor, di_norm: Tensor | None, alpha: float,
                        scale: float, fgm: bool, di: bool, loss: Tensor, dx: Tensor, da: Tensor, db: Tensor,
                        workspace: Tensor):
    """A ``_C.UniInstructParams`` for [B, D] rows x, a, b, coef [B, 3] and di_norm [1] (or None) contiguous."""
    p = load().UniInstructParams()
    p.B, p.D = x.shape
    p.x, p.a, p.b, p.coef, p.di_norm = _ptr(x), _ptr(a), _ptr(b), _ptr(coef), _ptr(di_norm)
    p.sx, p.sa, p.sb = _row_stride(x), _row_stride(a), _row_stride(b)
    p.alpha, p.scale, p.fgm, p.di = alpha, scale, int(fgm), int(di)
    p.dtype = DTYPE_CODES[x.dtype]
    p.loss, p.dx, p.da, p.db = _ptr(loss), _ptr(dx), _ptr(da), _ptr(db)
    p.workspace, p.workspace_floats = _ptr(workspace), workspace.numel()
    return p


def uni_instruct_rows(
    kernel: str,
    x: Tensor,
    a: Tensor,
    b: Tensor,
    coef: Tensor,
    di_norm: Tensor | None,
    alpha: float,
    scale: float,
    fgm: bool,
    di: bool,
    need_dx: bool,
    need_da: bool,
    need_db: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Native Uni-Instruct rows (``kernel`` is "cpu" or "cuda"); same contract as
    ``mmfast.reference.uni_instruct.uni_instruct_rows``: (loss [B], dx, da, db [B, D] or empty)."""
    _score_rows(x, a, b)
    B, D = x.shape
    cdt = compute_dtype(x.dtype)
    loss = torch.empty(B, dtype=cdt, device=x.device)

    def grad(need: bool) -> Tensor:
        return torch.empty(B, D, dtype=x.dtype, device=x.device) if need else x.new_empty(0)

    dx, da, db = grad(need_dx), grad(need_da), grad(need_db)
    if B > 0:
        # every tensor whose address the params hold stays referenced here until the launch is enqueued
        norm = None if di_norm is None or not di else _per_sample(di_norm, cdt).reshape(1)
        coef_c, ws = _per_sample(coef, cdt), _score_workspace(x, kernel)
        params = uni_instruct_params(x, a, b, coef_c, norm, alpha, scale, fgm, di, loss, dx, da, db, ws)
        _run(kernel, "uni_instruct", params, x.device)
    return loss, dx, da, db


def fake_score_params(b: Tensor, x: Tensor, lam: Tensor, scale: float, loss: Tensor, db: Tensor, workspace: Tensor):
    """A ``_C.FakeScoreParams`` for [B, D] rows b, x (unit element stride) and lam [B] contiguous."""
    p = load().FakeScoreParams()
    p.B, p.D = b.shape
    p.b, p.x, p.lam = _ptr(b), _ptr(x), _ptr(lam)
    p.sb, p.sx = _row_stride(b), _row_stride(x)
    p.scale, p.dtype = scale, DTYPE_CODES[b.dtype]
    p.loss, p.db = _ptr(loss), _ptr(db)
    p.workspace, p.workspace_floats = _ptr(workspace), workspace.numel()
    return p


def fake_score_rows(
    kernel: str, b: Tensor, x: Tensor, lam: Tensor, scale: float, need_db: bool
) -> tuple[Tensor, Tensor]:
    """Native fake-score rows (``kernel`` is "cpu" or "cuda"); same contract as
    ``mmfast.reference.fake_score.fake_score_rows``: (loss [B] in the compute dtype, db [B, D] or empty)."""
    _score_rows(b, x)
    B, D = b.shape
    cdt = compute_dtype(b.dtype)
    loss = torch.empty(B, dtype=cdt, device=b.device)
    db = torch.empty(B, D, dtype=b.dtype, device=b.device) if need_db else b.new_empty(0)
    if B > 0:
        # every tensor whose address the params hold stays referenced here until the launch is enqueued
        ws, lam_c = _score_workspace(b, kernel), _per_sample(lam, cdt)
        _run(kernel, "fake_score", fake_score_params(b, x, lam_c, scale, loss, db, ws), b.device)
    return loss, db
