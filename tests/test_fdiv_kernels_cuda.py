"""The hand-written CUDA kernels of the score-distillation losses (csrc/cuda/{fdistill,uni_instruct,
fake_score}.cu) against the reference row functions, with the checks of tests/test_fdiv_kernels_cpu.py.

On a GPU with ``mmfast._C`` built with ``MMFAST_WITH_CUDA=ON`` the kernels run on the device; without a GPU
they run on CPU tensors over the CPU emulation of the CUDA runtime (tests/cuda_emu.py), which reports 132 SMs
as an H100 does. Both layouts are covered: row mode (one block per row, B >= the number of SMs) and split mode
(few rows, each cut over several blocks with partial sums in a workspace), on vectorized (16-byte aligned
rows) and scalar (misaligned or strided rows) paths.
"""

from __future__ import annotations

import itertools

import cuda_emu
import pytest
import torch
from test_fdiv_kernels_cpu import (
    assert_matches,
    check_fake_score,
    check_fdistill,
    check_uni_instruct,
    rows,
    specials_for,
)

import mmfast
from mmfast import _native
from mmfast.reference.fdistill import fdistill_rows as ref_fdistill
from mmfast.reference.uni_instruct import uni_instruct_rows as ref_uni_instruct

EMULATED = not torch.cuda.is_available()


def _unavailable() -> str | None:
    if EMULATED:
        reason = cuda_emu.unavailable_reason()
        return None if reason is None else f"no GPU, and no CUDA emulation: {reason}"
    return mmfast.backend_info(torch.device("cuda"))["unavailable_reasons"].get("cuda")


pytestmark = pytest.mark.skipif(_unavailable() is not None, reason=str(_unavailable()))
KERNEL = "cuda"
DEV = "cpu" if EMULATED else "cuda"


@pytest.fixture(autouse=True)
def _cuda_backend(monkeypatch):
    """Without a GPU, mmfast._native's "cuda" launches run on the emulation."""
    if EMULATED:
        cuda_emu.emulate_cuda_backend(monkeypatch)


DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# float32 sums on the GPU: per-thread partials and a tree, ordered differently from torch's reductions
TOL = {torch.float32: (1e-5, 1e-5)}
# (B, D): odd shapes (scalar path), aligned rows (vector path), few long rows (split mode), many rows
SHAPES = ((1, 1), (4, 1), (1, 37), (37, 1271), (3, 20000), (2, 40000), (6, 65536), (300, 2048), (200, 999))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,D", SHAPES)
def test_fdistill(B, D, dtype):
    check_fdistill(KERNEL, DEV, B, D, dtype, seed=B * 1000 + D, equal_rows=(B - 1,), tol=TOL)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,D", SHAPES)
def test_uni_instruct(B, D, dtype):
    check_uni_instruct(KERNEL, DEV, B, D, dtype, seed=B * 1000 + D, alpha=0.5, tol=TOL)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,D", SHAPES)
def test_fake_score(B, D, dtype):
    check_fake_score(KERNEL, DEV, B, D, dtype, seed=B * 1000 + D, lam_zero_rows=(0,), tol=TOL)


@pytest.mark.parametrize("B,D", ((5, 301), (2, 40000), (300, 2048)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_row_strides_and_misalignment(dtype, B, D):
    # slices of wider tensors: row strides D + pad, first element at column `offset` (off the 16-byte grid)
    check_fdistill(KERNEL, DEV, B, D, dtype, pads=(8, 0, 17), offsets=(0, 0, 1), tol=TOL)
    check_uni_instruct(KERNEL, DEV, B, D, dtype, pads=(8, 8, 0), offsets=(8, 1, 0), alpha=0.5, tol=TOL)
    check_fake_score(KERNEL, DEV, B, D, dtype, pads=(16, 8), offsets=(8, 0), tol=TOL)


@pytest.mark.parametrize("B,D", ((5, 77), (2, 40000)))
@pytest.mark.parametrize("alpha", (0.0, 0.5, 1.0))
@pytest.mark.parametrize("fgm,di,di_norm", [(f, d, n) for f, d in itertools.product((False, True), repeat=2)
                                             for n in ((None, 3.7) if d else (None,))])
def test_uni_instruct_terms(fgm, di, di_norm, alpha, B, D):
    check_uni_instruct(KERNEL, DEV, B, D, torch.float32, alpha=alpha, fgm=fgm, di=di, di_norm=di_norm, tol=TOL)


@pytest.mark.parametrize("need", list(itertools.product((False, True), repeat=3)), ids=str)
@pytest.mark.parametrize("B,D", ((4, 300), (2, 40000)))
def test_uni_instruct_requested_gradients(need, B, D):
    check_uni_instruct(KERNEL, DEV, B, D, torch.float32, need=need, alpha=0.3, tol=TOL)


@pytest.mark.parametrize("B,D", ((5, 64), (3, 40000)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nonfinite(dtype, B, D):
    spec = specials_for(D)
    check_fdistill(KERNEL, DEV, B, D, dtype, specials=spec, tol=TOL)
    check_fdistill(KERNEL, DEV, B, D, dtype, specials=spec, h_zero_rows=(1, 2), tol=TOL)
    for fgm, di in itertools.product((False, True), repeat=2):
        check_uni_instruct(KERNEL, DEV, B, D, dtype, specials=spec, fgm=fgm, di=di, alpha=0.5, tol=TOL)
    check_uni_instruct(KERNEL, DEV, B, D, dtype, specials=spec, coef_entries=((1, 0, 0.0),), tol=TOL)
    check_fake_score(KERNEL, DEV, B, D, dtype, specials=specials_for(D, tensors=2), lam_zero_rows=(1,), tol=TOL)
    # a switched-off term's coefficient is never evaluated
    out = check_uni_instruct(KERNEL, DEV, 3, D, dtype, fgm=False, di=False, tol=TOL,
                             coef_entries=((0, 1, float("nan")), (1, 1, float("inf")), (2, 2, float("nan"))))
    assert all(torch.isfinite(t).all() for t in out)


def test_fdistill_infinite_weight():
    g = torch.Generator().manual_seed(3)
    x, a, b = (rows(2, 16, torch.float32, DEV, g) for _ in range(3))
    b[1, 4] = a[1, 4]
    h = torch.full((2,), float("inf"), device=DEV)
    got, ref = _native.fdistill_rows(KERNEL, x, a, b, h, 1.0, True), ref_fdistill(x, a, b, h, 1.0, True)
    assert torch.isinf(got[0][0]) and torch.isnan(got[0][1]) and torch.isnan(ref[0][1])
    assert torch.equal(got[1].isnan(), ref[1].isnan())


@pytest.mark.parametrize("op", ("fdistill", "uni_instruct", "fake_score"))
def test_split_and_row_mode_agree(op):
    """Few long rows run split over blocks; without a workspace the same rows run in row mode."""
    g = torch.Generator().manual_seed(5)
    B, D = 3, 50000
    x, a, b = (rows(B, D, torch.float32, DEV, g) for _ in range(3))
    h = torch.rand(B, generator=g).to(DEV) + 0.5
    coef = torch.randn(B, 3, generator=g).to(DEV)
    C = _native.load()
    outs = []
    for ws_floats in (C.score_workspace_floats, 0):
        ws = torch.empty(ws_floats, device=DEV)
        loss = torch.empty(B, device=DEV)
        grads = [torch.empty(B, D, device=DEV) for _ in range(3)]
        if op == "fdistill":
            p = _native.fdistill_params(x, a, b, h, 1.0, loss, grads[0], ws)
        elif op == "uni_instruct":
            p = _native.uni_instruct_params(x, a, b, coef, None, 0.5, 1.0, True, True, loss, *grads, ws)
        else:
            p = _native.fake_score_params(b, x, h, 1.0, loss, grads[0], ws)
        _native._run(KERNEL, op, p, torch.device(DEV))
        outs.append([loss, *grads[: 3 if op == "uni_instruct" else 1]])
    for split, row in zip(*outs, strict=True):
        torch.testing.assert_close(split, row, rtol=1e-5, atol=1e-6 * row.abs().max().item())


def test_float64_is_refused():
    x = torch.randn(2, 8, dtype=torch.float64, device=DEV)
    # on a GPU the launcher refuses it; on the emulation's CPU tensors the kernel's dtype switch does
    with pytest.raises(TypeError if not EMULATED else RuntimeError, match="float64" if not EMULATED else "supported"):
        _native.fdistill_rows(KERNEL, x, x, x, torch.ones(2, dtype=torch.float64, device=DEV), 1.0, True)


@pytest.mark.skipif(EMULATED, reason="CUDA graphs need a GPU")
def test_matches_reference_under_graph_capture():
    """Split mode (two launches, a workspace) and row mode replay correctly from a CUDA graph."""
    g = torch.Generator().manual_seed(9)
    for B, D in ((2, 40000), (300, 256)):
        x, a, b = (rows(B, D, torch.float32, DEV, g) for _ in range(3))
        coef = torch.randn(B, 3, generator=g).to(DEV)
        args = (coef, None, 0.5, 0.7, True, True, True, True, True)
        _native.uni_instruct_rows(KERNEL, x, a, b, *args)  # warm up outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = _native.uni_instruct_rows(KERNEL, x, a, b, *args)
        x.add_(0.25)  # new values, replayed
        graph.replay()
        torch.cuda.synchronize()
        ref = ref_uni_instruct(x, a, b, *args)
        truth = ref_uni_instruct(x.double(), a.double(), b.double(), coef.double(), *args[1:])
        for name, o, r, t in zip(("loss", "dx", "da", "db"), out, ref, truth, strict=True):
            assert_matches(name, o, r, t, torch.float32, TOL)
