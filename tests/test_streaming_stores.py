"""The CPU kernels' streaming-store paths (csrc/cpu/streaming_stores.h) against their plain-store paths.

Large outputs (more bytes moved than the last-level cache holds, or 64 MiB) are written with non-temporal stores,
a cache line at a time from registers, with the elements before the first line boundary and after the last
one written plainly. The plain path is checked
against the reference elsewhere; here each kernel runs twice on the same inputs, with streaming forced on
(threshold 0) and off, and every output must be bit-identical: odd row lengths (every alignment of a
row's start), all four dtypes, padded row strides, masks that exclude rows (zero rows streamed out).

Those loops are built once per x86-64 level (AVX-512, AVX2, baseline) and run at the CPU's; each test runs at
every level up to this CPU's (``_native.cpu_isa_level``), so an AVX-512 runner also runs the AVX2 and baseline
code, and the levels agree with each other to rounding.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from mmfast import _native
from mmfast.reference.masked_reconstruction import COSINE, MSE, SMOOTH_L1

pytestmark = pytest.mark.skipif(_native.load() is None, reason=f"mmfast._C not built: {_native.load_error()}")

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
NEVER = 1 << 62


def _isa_levels() -> list[int]:
    """The x86-64 levels this CPU runs (4 AVX-512, 3 AVX2, 0 baseline), highest first."""
    C = _native.load()
    top = C.cpu_isa_level() if C is not None else 0
    return [level for level in (4, 3, 0) if level <= top]


LEVELS = _isa_levels()


@pytest.fixture(params=LEVELS, ids=lambda level: f"isa{level}")
def isa_level(request):
    """The test runs with the line-store kernels at this x86-64 level."""
    with _native.cpu_isa_level(request.param):
        yield request.param


def assert_identical(streamed, plain, what):
    assert len(streamed) == len(plain)
    for i, (s, p) in enumerate(zip(streamed, plain, strict=True)):
        assert s.dtype == p.dtype and s.shape == p.shape, f"{what}: output {i}"
        torch.testing.assert_close(s, p, rtol=0, atol=0, equal_nan=True, msg=lambda m, i=i: f"{what}: output {i}: {m}")


def both_ways(fn, *args):
    """fn(*args) with streaming stores forced on, then off: (streamed outputs, plain outputs)."""
    with _native.cpu_streaming_min_bytes(0):
        streamed = fn(*args)
    with _native.cpu_streaming_min_bytes(NEVER):
        plain = fn(*args)
    return streamed, plain


def test_isa_level_is_capped_and_restored():
    C = _native.load()
    top = C.cpu_isa_level()
    assert top in (0, 3, 4)
    with _native.cpu_isa_level(0):
        assert C.cpu_isa_level() == 0
        with _native.cpu_isa_level(2):  # no level between the baseline and AVX2
            assert C.cpu_isa_level() == 0
    with _native.cpu_isa_level(3):
        assert C.cpu_isa_level() == min(top, 3)
    with _native.cpu_isa_level(9):  # a cap above this CPU's level is no cap
        assert C.cpu_isa_level() == top
    assert C.cpu_isa_level() == top


def test_threshold_is_restored():
    C = _native.load()
    before = C.cpu_streaming_min_bytes()
    assert 0 < before <= 64 << 20  # the last-level cache, capped at 64 MiB (streaming_stores.cpp)
    with _native.cpu_streaming_min_bytes(0):
        assert C.cpu_streaming_min_bytes() == 0
    assert C.cpu_streaming_min_bytes() == before


def _rows(B, D, dtype, g, pad=0):
    """[B, D] normal draws as a slice of [B, D + pad] (row stride D + pad)."""
    return torch.randn(B, D + pad, generator=g, dtype=torch.float64).to(dtype)[:, :D]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", (1, 7, 517, 1271))
@pytest.mark.parametrize("mask_kind", ("none", "rows", "bool", "float"))
def test_masked_reconstruction(dtype, D, mask_kind, isa_level):
    g = torch.Generator().manual_seed(D)
    A = 9
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    P = torch.randn(A, D, 1, generator=g, dtype=torch.float64).to(dtype)
    Y = torch.randn(A, D, 1, generator=g, dtype=torch.float64).to(dtype)
    P[4, 0, 0] = float("nan")  # a NaN row: kept, or excluded by the row mask
    rows = mask = None
    if mask_kind == "rows":
        rows = torch.tensor([1, 0, 0.5, 0, 0, 1, 1, 0, 0.25], dtype=cdt)
    elif mask_kind == "bool":
        mask = torch.rand(A, D, 1, generator=g) < 0.6
    elif mask_kind == "float":
        mask = torch.rand(A, D, 1, generator=g, dtype=torch.float64).to(cdt)
    losses = (MSE, SMOOTH_L1) + ((COSINE,) if mask_kind in ("none", "rows") else ())
    for loss, need_dy, normalize in itertools.product(losses, (False, True), (False, True)):
        args = ("cpu", P, Y, rows, mask, loss, 0.5, normalize, 1e-6, False, True, need_dy, False)
        streamed, plain = both_ways(_native.masked_reconstruction_rows, *args)
        assert_identical(streamed, plain, f"loss {loss} dy {need_dy} normalize {normalize}")


def test_masked_reconstruction_strided_rows():
    """[A, D, S] with S > 1 (channel_dim=1): rows are strided, written plainly either way."""
    g = torch.Generator().manual_seed(1)
    P = torch.randn(3, 5, 11, generator=g)
    Y = torch.randn(3, 5, 11, generator=g)
    rows = (torch.rand(33, generator=g) < 0.5).float()

    args = ("cpu", P, Y, rows, None, MSE, 1.0, False, 1e-6, False, True, True, False)
    assert_identical(*both_ways(_native.masked_reconstruction_rows, *args), "strided")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,D,pad", ((1, 1, 0), (5, 7, 3), (3, 1271, 1), (2, 20000, 5), (33, 517, 0)))
def test_fdistill(dtype, B, D, pad, isa_level):
    g = torch.Generator().manual_seed(B * D)
    x, a, b = (_rows(B, D, dtype, g, pad) for _ in range(3))
    x[-1, 0] = float("nan")
    h = torch.rand(B, generator=g, dtype=torch.float64).to(torch.float64 if dtype == torch.float64 else torch.float32)

    assert_identical(*both_ways(_native.fdistill_rows, "cpu", x, a, b, h, 1.0 / (B * D), True), "fdistill")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,D,pad", ((1, 1, 0), (5, 7, 3), (3, 1271, 1), (2, 20000, 5), (33, 517, 0)))
def test_uni_instruct(dtype, B, D, pad, isa_level):
    g = torch.Generator().manual_seed(B + D)
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    x, a, b = (_rows(B, D, dtype, g, pad) for _ in range(3))
    coef = torch.randn(B, 3, generator=g, dtype=torch.float64).to(cdt)
    for fgm, di, grads in itertools.product((False, True), (False, True), ((1, 0, 0), (0, 1, 1), (1, 1, 1))):
        args = ("cpu", x, a, b, coef, None, 0.7, 1.0 / B, fgm, di, *map(bool, grads))
        assert_identical(*both_ways(_native.uni_instruct_rows, *args), f"fgm {fgm} di {di} grads {grads}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,D,pad", ((1, 1, 0), (5, 7, 3), (3, 1271, 1), (2, 20000, 5), (33, 517, 0)))
def test_fake_score(dtype, B, D, pad, isa_level):
    g = torch.Generator().manual_seed(3 * B + D)
    b, x = (_rows(B, D, dtype, g, pad) for _ in range(2))
    b[0, -1] = float("inf")
    lam = torch.rand(B, generator=g, dtype=torch.float64).to(torch.float64 if dtype == torch.float64 else torch.float32)
    assert_identical(*both_ways(_native.fake_score_rows, "cpu", b, x, lam, 0.5, True), "fake_score")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lower_isa_levels_agree_with_the_top(dtype):
    """Each kernel's outputs at every lower x86-64 level match the top level's to rounding (the levels differ
    in FMA contraction and vector width, not in the math), with streaming stores on."""
    g = torch.Generator().manual_seed(11)
    B, D = 6, 1271
    x, a, b = (_rows(B, D, dtype, g, pad=3) for _ in range(3))
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    h = torch.rand(B, generator=g, dtype=torch.float64).to(cdt)
    coef = torch.randn(B, 3, generator=g, dtype=torch.float64).to(cdt)
    P, Y = (torch.randn(B, D, 1, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    runs = {
        "fdistill": lambda: _native.fdistill_rows("cpu", x, a, b, h, 1.0 / (B * D), True),
        "uni_instruct": lambda: _native.uni_instruct_rows("cpu", x, a, b, coef, None, 0.7, 1.0 / B, True, True,
                                                          True, True, True),
        "fake_score": lambda: _native.fake_score_rows("cpu", b, x, h, 0.5, True),
        "masked_reconstruction": lambda: _native.masked_reconstruction_rows(
            "cpu", P, Y, None, None, SMOOTH_L1, 0.5, True, 1e-6, False, True, True, False),
    }
    with _native.cpu_streaming_min_bytes(0):
        for name, run in runs.items():
            with _native.cpu_isa_level(LEVELS[0]):
                top = run()
            for level in LEVELS[1:]:
                with _native.cpu_isa_level(level):
                    lower = run()
                for i, (lo, hi) in enumerate(zip(lower, top, strict=True)):
                    where = f"{name} isa{level} output {i}"
                    torch.testing.assert_close(lo, hi, equal_nan=True, msg=lambda m, where=where: f"{where}: {m}")
