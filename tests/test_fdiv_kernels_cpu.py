"""The fused C++ CPU kernels of the score-distillation losses (f-distill, Uni-Instruct, fake score)
against the reference row functions (mmfast/reference/{fdistill,uni_instruct,fake_score}.py).

Every output is checked. In float64 the kernel must equal the reference to ~1e-10 of each row's scale;
in float32, bfloat16 and float16 its error against a float64 ground truth (the reference evaluated in
float64 on the same rounded inputs) must be no worse than the reference's own error at that dtype plus a
small tolerance, row by row. NaN and inf entries must sit exactly where the reference puts them.

The ``check_*`` functions take the kernel name and device, so tests/test_fdiv_kernels_cuda.py reuses them.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from mmfast import _native
from mmfast.reference.fake_score import fake_score_rows as ref_fake_score
from mmfast.reference.fdistill import fdistill_rows as ref_fdistill
from mmfast.reference.uni_instruct import uni_instruct_rows as ref_uni_instruct

pytestmark = pytest.mark.skipif(_native.load() is None, reason=f"mmfast._C not built: {_native.load_error()}")

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# gradient tolerance relative to the row's largest |truth| (one rounding step at the output dtype)
GRAD_RTOL = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}
LOSS_RTOL = 2e-6  # the loss is float32 for float32 / bfloat16 / float16 inputs
F64_RTOL = 1e-10
# odd shapes: one element, one sample, a prime-ish row, more rows than threads, rows split over threads
SHAPES = ((1, 1), (4, 1), (1, 37), (37, 1271), (3, 20000))


def rows(B, D, dtype, device, g, pad=0, offset=0, spread=1.0):
    """[B, D] standard-normal draws (float64, then cast), as a slice of a wider [B, D + pad] tensor when
    pad > 0: row stride D + pad, the first element at column `offset` (pad >= offset)."""
    wide = (torch.randn(B, D + pad, generator=g, dtype=torch.float64) * spread).to(device=device, dtype=dtype)
    return wide[:, offset : offset + D]


def compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def assert_matches(name, got, ref, truth, dtype, tol=None):
    """got (kernel) against ref (reference at the same dtype) and truth (reference in float64). ``tol``:
    {dtype: (loss rtol, gradient rtol)} replacing the defaults (relative to the row's largest |truth|)."""
    assert got.dtype == ref.dtype and got.shape == ref.shape, (
        f"{name}: {got.dtype}{tuple(got.shape)}, reference {ref.dtype}{tuple(ref.shape)}"
    )
    if ref.numel() == 0:
        return
    g, r, t = got.double().cpu(), ref.double().cpu(), truth.double().cpu()
    assert torch.equal(g.isnan(), r.isnan()), f"{name}: NaN entries differ from the reference"
    assert torch.equal(g.isinf(), r.isinf()) and torch.equal(g[g.isinf()], r[r.isinf()]), (
        f"{name}: inf entries differ from the reference"
    )
    finite = torch.isfinite(r) & torch.isfinite(t)
    zero = torch.zeros((), dtype=torch.float64)
    g, r, t = (torch.where(finite, v, zero) for v in (g, r, t))
    if g.dim() == 2:  # per row
        scale = t.abs().amax(dim=1, keepdim=True)
        err, ref_err = (g - t).abs(), (r - t).abs().amax(dim=1, keepdim=True)
    else:  # per-sample losses: against the batch's scale
        scale = t.abs().amax()
        err, ref_err = (g - t).abs(), (r - t).abs().amax()
    if dtype == torch.float64:
        bound = F64_RTOL * scale + 1e-300
        err = (g - r).abs()
    else:
        loss_rtol, grad_rtol = (tol or {}).get(dtype, (LOSS_RTOL, GRAD_RTOL[dtype]))
        rtol = loss_rtol if g.dim() == 1 else grad_rtol
        bound = ref_err + rtol * scale + 1e-30
    worst = (err / bound).amax().item()
    assert worst <= 1.0, f"{name} ({dtype}): error {worst:.3g}x the bound"


class Unchanged:
    """Snapshot of input tensors: values and version counters must be the same after the call."""

    def __init__(self, *tensors):
        self.tensors = tensors
        self.copies = [t.clone() for t in tensors]
        self.versions = [t._version for t in tensors]

    def check(self):
        for i, (t, c, v) in enumerate(zip(self.tensors, self.copies, self.versions, strict=True)):
            assert t._version == v, f"input {i} was written (version counter moved)"
            assert torch.equal(t.isnan(), c.isnan()) and torch.equal(t.nan_to_num(), c.nan_to_num()), (
                f"input {i} changed"
            )


def set_entries(tensors, specials):
    """specials: (tensor index, row, column, value) written into the inputs before the call."""
    for i, r, c, v in specials:
        tensors[i][r, c] = v


def check_fdistill(kernel, device, B, D, dtype, *, seed=0, pads=(0, 0, 0), offsets=(0, 0, 0), need_dx=True,
                   h_zero_rows=(), equal_rows=(), specials=(), scale=0.37, tol=None):
    g = torch.Generator().manual_seed(seed)
    x, a, b = (rows(B, D, dtype, device, g, p, o) for p, o in zip(pads, offsets, strict=True))
    for r in equal_rows:  # x == a: the clamp of the mean |x - a|
        a[r] = x[r]
    set_entries((x, a, b), specials)
    h = (torch.rand(B, generator=g, dtype=torch.float64) + 0.2).to(device, compute_dtype(dtype))
    h[list(h_zero_rows)] = 0.0
    inputs = Unchanged(x, a, b, h)
    got = _native.fdistill_rows(kernel, x, a, b, h, scale, need_dx)
    inputs.check()
    ref = ref_fdistill(x, a, b, h, scale, need_dx)
    truth = ref_fdistill(x.double(), a.double(), b.double(), h.double(), scale, need_dx)
    for name, o, r, t in zip(("loss", "dx"), got, ref, truth, strict=True):
        assert_matches(f"fdistill {name}", o, r, t, dtype, tol)
    if not need_dx:
        assert got[1].numel() == 0
    return got


def check_uni_instruct(kernel, device, B, D, dtype, *, seed=0, pads=(0, 0, 0), offsets=(0, 0, 0), alpha=1.0,
                       fgm=True, di=True, di_norm=None, need=(True, True, True), coef_entries=(),
                       equal_rows=(), specials=(), scale=0.41, tol=None):
    g = torch.Generator().manual_seed(seed)
    x, a, b = (rows(B, D, dtype, device, g, p, o) for p, o in zip(pads, offsets, strict=True))
    for r in equal_rows:
        a[r] = x[r]
    set_entries((x, a, b), specials)
    cdt = compute_dtype(dtype)
    coef = (torch.randn(B, 3, generator=g, dtype=torch.float64) * 2).to(device, cdt)
    for r, k, v in coef_entries:
        coef[r, k] = v
    norm = None if di_norm is None else torch.tensor([di_norm], dtype=cdt, device=device)
    inputs = Unchanged(*(t for t in (x, a, b, coef, norm) if t is not None))
    args = (coef, norm, alpha, scale, fgm, di, *need)
    got = _native.uni_instruct_rows(kernel, x, a, b, *args)
    inputs.check()
    ref = ref_uni_instruct(x, a, b, *args)
    truth = ref_uni_instruct(
        x.double(), a.double(), b.double(), coef.double(), None if norm is None else norm.double(), *args[2:]
    )
    for name, o, r, t in zip(("loss", "dx", "da", "db"), got, ref, truth, strict=True):
        assert_matches(f"uni_instruct {name}", o, r, t, dtype, tol)
    for n, o in zip(need, got[1:], strict=True):
        assert (o.numel() > 0) == (n and B * D > 0)
    return got


def check_fake_score(kernel, device, B, D, dtype, *, seed=0, pads=(0, 0), offsets=(0, 0), need_db=True,
                     lam_zero_rows=(), specials=(), scale=0.29, tol=None):
    g = torch.Generator().manual_seed(seed)
    b, x = (rows(B, D, dtype, device, g, p, o) for p, o in zip(pads, offsets, strict=True))
    set_entries((b, x), specials)
    lam = (torch.rand(B, generator=g, dtype=torch.float64) * 8 + 0.5).to(device, compute_dtype(dtype))
    lam[list(lam_zero_rows)] = 0.0
    inputs = Unchanged(b, x, lam)
    got = _native.fake_score_rows(kernel, b, x, lam, scale, need_db)
    inputs.check()
    ref = ref_fake_score(b, x, lam, scale, need_db)
    truth = ref_fake_score(b.double(), x.double(), lam.double(), scale, need_db)
    for name, o, r, t in zip(("loss", "db"), got, ref, truth, strict=True):
        assert_matches(f"fake_score {name}", o, r, t, dtype, tol)
    if not need_db:
        assert got[1].numel() == 0
    return got


# special values of the NaN/inf tests: (tensor index, row, column, value); rows 0..2 get one each
def specials_for(D, tensors=3):
    col = D // 2
    spec = [(0, 0, col, float("nan")), (1 % tensors, 1, col, float("inf")), (2 % tensors, 2, 0, float("-inf"))]
    return spec


# ---------------------------------------------------------------------------------------------------
# f-distill

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,D", SHAPES)
def test_fdistill(B, D, dtype):
    check_fdistill("cpu", "cpu", B, D, dtype, seed=B * 1000 + D)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fdistill_row_strides(dtype):
    check_fdistill("cpu", "cpu", 6, 301, dtype, pads=(5, 0, 17), offsets=(3, 0, 1))


def test_fdistill_special_rows():
    # x == a (m = 0: w = h / 1e-6), h = 0, and a row where both happen
    check_fdistill("cpu", "cpu", 7, 129, torch.float32, equal_rows=(0, 3), h_zero_rows=(3, 5))
    check_fdistill("cpu", "cpu", 7, 129, torch.float64, equal_rows=(0, 3), h_zero_rows=(3, 5))


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16), ids=str)
def test_fdistill_nonfinite(dtype):
    # NaN in x, inf in a, -inf in b; and the same with h = 0 (inf * 0 = NaN exactly where the reference has it)
    check_fdistill("cpu", "cpu", 5, 64, dtype, specials=specials_for(64))
    check_fdistill("cpu", "cpu", 5, 64, dtype, specials=specials_for(64), h_zero_rows=(1, 2))
    # h = inf: w = inf, 0.5 sum (d w)^2 is NaN when some d == 0 (row 1) and inf otherwise (row 0)
    loss, dx = check_fdistill("cpu", "cpu", 3, 16, dtype, specials=((1, 1, 4, 0.0), (2, 1, 4, 0.0)))
    assert torch.isfinite(loss).all() and torch.isfinite(dx).all()
    g = torch.Generator().manual_seed(3)
    x, a, b = (rows(2, 16, dtype, "cpu", g) for _ in range(3))
    b[1, 4] = a[1, 4]
    h = torch.full((2,), float("inf"), dtype=compute_dtype(dtype))
    got, ref = _native.fdistill_rows("cpu", x, a, b, h, 1.0, True), ref_fdistill(x, a, b, h, 1.0, True)
    assert torch.isinf(got[0][0]) and torch.isnan(got[0][1]) and torch.isnan(ref[0][1])
    assert torch.equal(got[1].isnan(), ref[1].isnan())


def test_fdistill_no_gradient():
    check_fdistill("cpu", "cpu", 5, 1000, torch.float32, need_dx=False)


# ---------------------------------------------------------------------------------------------------
# Uni-Instruct

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,D", SHAPES)
def test_uni_instruct(B, D, dtype):
    check_uni_instruct("cpu", "cpu", B, D, dtype, seed=B * 1000 + D, alpha=0.5)


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
@pytest.mark.parametrize("alpha", (0.0, 0.5, 1.0))
@pytest.mark.parametrize("fgm,di,di_norm", [(f, d, n) for f, d in itertools.product((False, True), repeat=2)
                                             for n in ((None, 3.7) if d else (None,))])
def test_uni_instruct_terms(fgm, di, di_norm, alpha, dtype):
    check_uni_instruct("cpu", "cpu", 5, 77, dtype, alpha=alpha, fgm=fgm, di=di, di_norm=di_norm)


@pytest.mark.parametrize("need", list(itertools.product((False, True), repeat=3)), ids=str)
def test_uni_instruct_requested_gradients(need):
    check_uni_instruct("cpu", "cpu", 4, 300, torch.float32, need=need, alpha=0.3)


@pytest.mark.parametrize("dtype", (torch.float64, torch.bfloat16, torch.float16), ids=str)
def test_uni_instruct_row_strides(dtype):
    check_uni_instruct("cpu", "cpu", 6, 301, dtype, pads=(5, 2, 17), offsets=(3, 2, 1), alpha=0.5)


def test_uni_instruct_special_rows():
    # x == a rows (wf clamped at 1e-5), lambda = 0 entries, a zero norm for every row
    zeros = ((0, 0, 0.0), (1, 1, 0.0), (2, 2, 0.0), (3, 0, 0.0), (3, 1, 0.0), (3, 2, 0.0))
    check_uni_instruct("cpu", "cpu", 6, 129, torch.float32, equal_rows=(0, 4), coef_entries=zeros)
    check_uni_instruct("cpu", "cpu", 6, 129, torch.float64, equal_rows=(0, 4), coef_entries=zeros, di_norm=0.0)


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.float16), ids=str)
def test_uni_instruct_nonfinite(dtype):
    for fgm, di in itertools.product((False, True), repeat=2):
        check_uni_instruct("cpu", "cpu", 5, 64, dtype, specials=specials_for(64), fgm=fgm, di=di, alpha=0.5)
    # lambda = 0 next to an inf input: 0 * inf = NaN where the reference has it
    check_uni_instruct("cpu", "cpu", 5, 64, dtype, specials=specials_for(64), coef_entries=((1, 0, 0.0),))
    # a switched-off term's coefficient is never evaluated: NaN / inf lambda_fgm with fgm off, lambda_di with di off
    loss, dx, da, db = check_uni_instruct(
        "cpu", "cpu", 3, 64, dtype, fgm=False, di=False,
        coef_entries=((0, 1, float("nan")), (1, 1, float("inf")), (2, 2, float("nan"))),
    )
    assert all(torch.isfinite(t).all() for t in (loss, dx, da, db))


# ---------------------------------------------------------------------------------------------------
# fake score

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,D", SHAPES)
def test_fake_score(B, D, dtype):
    check_fake_score("cpu", "cpu", B, D, dtype, seed=B * 1000 + D)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_fake_score_row_strides_and_zero_lambda(dtype):
    check_fake_score("cpu", "cpu", 6, 301, dtype, pads=(5, 17), offsets=(3, 1), lam_zero_rows=(0, 4))


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16), ids=str)
def test_fake_score_nonfinite(dtype):
    check_fake_score("cpu", "cpu", 5, 64, dtype, specials=specials_for(64, tensors=2))
    check_fake_score("cpu", "cpu", 5, 64, dtype, specials=specials_for(64, tensors=2), lam_zero_rows=(1, 2))


def test_fake_score_no_gradient():
    check_fake_score("cpu", "cpu", 5, 1000, torch.float32, need_db=False)


# ---------------------------------------------------------------------------------------------------
# long rows: with fewer than 4 rows per thread, the intra-row split (rows cut into chunks summed by
# different threads, in groups of rows: (5, 20000) runs a group of 4 rows and one of 1); with more, row
# mode on rows longer than the L2 cache budget (9, 50000)

LONG = ((1, 70000), (2, 40000), (5, 20000), (9, 50000))


@pytest.mark.parametrize("B,D", LONG)
def test_long_rows_split(B, D):
    check_fdistill("cpu", "cpu", B, D, torch.float32, seed=D, equal_rows=(B - 1,))
    check_uni_instruct("cpu", "cpu", B, D, torch.float32, seed=D, alpha=0.5, pads=(0, 64, 0))
    check_fake_score("cpu", "cpu", B, D, torch.float32, seed=D)


@pytest.mark.parametrize("dtype", (torch.float64, torch.bfloat16), ids=str)
def test_long_rows_split_dtypes(dtype):
    check_fdistill("cpu", "cpu", 2, 30000, dtype, specials=((1, 1, 29999, float("inf")),))
    check_uni_instruct("cpu", "cpu", 2, 30000, dtype, specials=((0, 0, 12345, float("nan")),))
    check_fake_score("cpu", "cpu", 2, 30000, dtype)


def test_thread_count_does_not_change_results():
    """One thread (row mode) and two threads (split rows) give the same values up to summation order."""
    g = torch.Generator().manual_seed(11)
    x, a, b = (rows(3, 30000, torch.float64, "cpu", g) for _ in range(3))
    h, coef, lam = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, 3, dtype=torch.float64), torch.rand(3)
    threads = torch.get_num_threads()
    outputs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outputs.append(
                _native.fdistill_rows("cpu", x, a, b, h, 1.0, True)
                + _native.uni_instruct_rows("cpu", x, a, b, coef, None, 0.5, 1.0, True, True, True, True, True)
                + _native.fake_score_rows("cpu", b, x, lam.double(), 1.0, True)
            )
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*outputs, strict=True):
        torch.testing.assert_close(one, two, rtol=1e-10, atol=1e-13 * one.abs().max().item())
