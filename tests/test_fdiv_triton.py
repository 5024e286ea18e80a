"""Triton f-distill, Uni-Instruct and fake-score kernels against the pure-PyTorch reference rows.

Without a GPU the kernels run under ``TRITON_INTERPRET=1`` on CPU tensors (float32, tiny shapes); small
tiles send short rows down the streaming (multi-block) path and pack several short rows per program.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

import mmfast.triton.fake_score as tfs  # noqa: E402
import mmfast.triton.fdistill as tfd  # noqa: E402
import mmfast.triton.routed_kd as trk  # noqa: E402
import mmfast.triton.uni_instruct as tui  # noqa: E402
from mmfast.reference import fdiv as fdiv_ref  # noqa: E402
from mmfast.reference.fake_score import fake_score_rows as ref_fake_score  # noqa: E402
from mmfast.reference.fdistill import fdistill_rows as ref_fdistill  # noqa: E402
from mmfast.reference.uni_instruct import uni_instruct_rows as ref_uni_instruct  # noqa: E402

if not HAS_CUDA and type(tfd._fdistill_kernel).__name__ != "InterpretedFunction":
    pytest.skip(
        "no GPU, and mmfast.triton was imported before TRITON_INTERPRET=1 was set "
        "(set it in tests/conftest.py on CPU-only machines)",
        allow_module_level=True,
    )

pytestmark = pytest.mark.interpreter if not HAS_CUDA else pytest.mark.gpu
DEV = torch.device("cuda" if HAS_CUDA else "cpu")
RTOL, ATOL = 2e-5, 2e-6


def tiles(monkeypatch, tile, split=False):
    """Use ``tile``-element whole-row and packing tiles and half-tile streaming blocks in the three kernel modules;
    ``split``: streamed rows are split across programs whenever there are fewer than 64 of them (else never)."""
    monkeypatch.setattr(tfd, "ROW_TILES", (tile, 4, max(tile // 2, 1), 4, tile, 4))  # read by all three kernels
    monkeypatch.setattr(trk, "SPLIT_PROGRAMS_PER_SM", 64 if split else 0)
    monkeypatch.setattr(trk, "CPU_SPLIT_PROGRAMS", 64)


def split_chunks(B, D, tile):
    """How many chunks each streamed row of the test's shape is cut into (1: not split)."""
    block, _, single, _, _ = tfd.row_plan(B, D, tfd.ROW_TILES)
    return 1 if single else trk.split_plan(B, D, block, DEV)[0]


def inputs(B, D, seed, row_stride=None):
    """x, a, b [B, D] float32 (rows padded to ``row_stride`` when given), ratio [B] in [0.1, 20]."""
    g = torch.Generator().manual_seed(seed)
    W = row_stride or D
    x, a, b = (torch.randn(B, W, generator=g)[:, :D].to(DEV) for _ in range(3))
    r = torch.exp(torch.empty(B).uniform_(-2.3, 3.0, generator=g)).to(DEV)
    return x, a, b, r


def close(got, want, what):
    assert got.shape == want.shape and got.dtype == want.dtype, what
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL * scale, equal_nan=True, msg=lambda m: f"{what}: {m}")


# (B, D, tile): several rows per program, one row per program, streamed rows
SHAPES = [(3, 7, 64), (1, 1, 64), (2, 37, 16), (5, 33, 64), (4, 10, 8)]


@pytest.mark.parametrize("split", [False, True], ids=["one-launch", "split"])
@pytest.mark.parametrize("B,D,tile", SHAPES)
def test_fdistill(monkeypatch, B, D, tile, split):
    tiles(monkeypatch, tile, split)
    assert (split_chunks(B, D, tile) > 1) == (split and D > tile)
    x, a, b, r = inputs(B, D, seed=B * 100 + D, row_stride=D + 3)
    h = fdiv_ref.fdiv_weight(r, "js")
    for need in (True, False):
        got, want = tfd.fdistill_rows(x, a, b, h, 0.37, need), ref_fdistill(x, a, b, h, 0.37, need)
        for name, g_, w_ in zip(("loss", "dx"), got, want, strict=True):
            close(g_, w_, f"{name} need={need}")


# (fgm, di, batch norm, alpha): every switch, both norms, the three alphas
FLAGS = [(False, False, False, 0.0), (True, False, False, 0.5), (False, True, False, 1.0), (True, True, False, 0.5),
         (False, True, True, 0.0), (True, True, True, 1.0)]


@pytest.mark.parametrize("split", [False, True], ids=["one-launch", "split"])
@pytest.mark.parametrize("B,D,tile", SHAPES)
def test_uni_instruct_every_flag(monkeypatch, B, D, tile, split):
    tiles(monkeypatch, tile, split)
    assert (split_chunks(B, D, tile) > 1) == (split and D > tile)
    x, a, b, r = inputs(B, D, seed=B * 10 + D)
    div = "softened_reverse_kl" if D % 2 else "pearson_chi2"
    coef = torch.stack(fdiv_ref.fdiv_coefficients(r, div), dim=1)
    for fgm, di, batch_norm, alpha in FLAGS:
        norm = torch.tensor([2.5], device=DEV) if batch_norm else None
        args = (x, a, b, coef, norm, alpha, 0.7, fgm, di, True, True, True)
        got, want = tui.uni_instruct_rows(*args), ref_uni_instruct(*args)
        for name, g_, w_ in zip(("loss", "dx", "da", "db"), got, want, strict=True):
            close(g_, w_, f"{name} {div} fgm={fgm} di={di} batch_norm={batch_norm} alpha={alpha}")


@pytest.mark.parametrize("split", [False, True], ids=["one-launch", "split"])
@pytest.mark.parametrize("need", [(True, False, False), (False, True, True), (False, False, False)])
def test_uni_instruct_gradient_subsets(monkeypatch, need, split):
    tiles(monkeypatch, 16, split)
    x, a, b, r = inputs(3, 21, seed=5, row_stride=25)
    coef = torch.stack(fdiv_ref.fdiv_coefficients(r, "kl"), dim=1)
    args = (x, a, b, coef, None, 1.0, 1.0, True, True, *need)
    got, want = tui.uni_instruct_rows(*args), ref_uni_instruct(*args)
    for i, (g_, w_) in enumerate(zip(got, want, strict=True)):
        close(g_, w_, f"output {i}")
    for g_, n in zip(got[1:], need, strict=True):
        assert (g_.numel() > 0) == n


@pytest.mark.parametrize("split", [False, True], ids=["one-launch", "split"])
@pytest.mark.parametrize("B,D,tile", SHAPES)
def test_fake_score(monkeypatch, B, D, tile, split):
    tiles(monkeypatch, tile, split)
    assert (split_chunks(B, D, tile) > 1) == (split and D > tile)
    x, b, _, r = inputs(B, D, seed=D)
    lam = fdiv_ref.edm_weight(r, 0.5)
    for need in (True, False):
        got, want = tfs.fake_score_rows(b, x, lam, 0.25, need), ref_fake_score(b, x, lam, 0.25, need)
        for name, g_, w_ in zip(("loss", "db"), got, want, strict=True):
            close(g_, w_, f"{name} need={need}")


@pytest.mark.parametrize("D,split", [(12, False), (40, False), (40, True)], ids=["whole", "streamed", "split"])
def test_nan_and_zero_distance(monkeypatch, D, split):
    """A NaN in one sample stays in that sample (also when its row is split across programs); x == a gives finite
    values (the wf / m clamps)."""
    tiles(monkeypatch, 16, split)
    assert (split_chunks(3, D, 16) > 1) == split
    x, a, b, r = inputs(3, D, seed=8)
    x[0, 5] = float("nan")
    x[1] = a[1]
    coef = torch.stack(fdiv_ref.fdiv_coefficients(r, "jeffreys"), dim=1)
    args = (x, a, b, coef, None, 1.0, 1.0, True, True, True, True, True)
    got, want = tui.uni_instruct_rows(*args), ref_uni_instruct(*args)
    for i, (g_, w_) in enumerate(zip(got, want, strict=True)):
        close(g_, w_, f"uni_instruct output {i}")
        assert torch.isnan(g_[0]).any() and torch.isfinite(g_[1:]).all()
    h = fdiv_ref.fdiv_weight(r, "js")
    for i, (g_, w_) in enumerate(zip(tfd.fdistill_rows(x, a, b, h, 1.0, True), ref_fdistill(x, a, b, h, 1.0, True),
                                     strict=True)):
        close(g_, w_, f"fdistill output {i}")
        assert torch.isfinite(g_[1:]).all()
