"""Triton routed-KD and mutual-KD kernels against the pure-PyTorch reference.

Without a GPU the kernels run under ``TRITON_INTERPRET=1`` on CPU tensors (float32/float64, small
shapes). The variable must be set before the kernel modules are imported; if another module imported
them first without it, these tests skip and say why.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

import mmfast.triton.mutual_kd as tmk  # noqa: E402
import mmfast.triton.routed_kd as trk  # noqa: E402
from mmfast.reference.mutual_kd import mutual_kd_rows as ref_mutual  # noqa: E402
from mmfast.reference.routed_kd import DIVERGENCES, MIXES  # noqa: E402
from mmfast.reference.routed_kd import routed_kd_rows as ref_routed  # noqa: E402

if not HAS_CUDA and type(trk._routed_kd_kernel).__name__ != "InterpretedFunction":
    pytest.skip(
        "no GPU, and mmfast.triton was imported before TRITON_INTERPRET=1 was set "
        "(set it in tests/conftest.py on CPU-only machines)",
        allow_module_level=True,
    )

DEV = torch.device("cuda" if HAS_CUDA else "cpu")


def small_tiles(monkeypatch, module, elems):
    """Shrink a kernel module's tiles so that short rows take the streaming (multi-block) path."""
    for name in ("ROW_TILES", "PIXEL_TILES"):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, (elems, 16, elems, 16))


TOL = {torch.float32: dict(rtol=2e-4, atol=2e-5), torch.float64: dict(rtol=1e-9, atol=1e-11)}
ALL_GRADS = (True, True, True)


def make_inputs(B, C, S, E, K, sparse, masked, dtype=torch.float32, seed=0, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, S, generator=g, dtype=torch.float64) * spread
    z = torch.randn(E, B, C, S, generator=g, dtype=torch.float64) * spread
    w = torch.rand(B, K, generator=g, dtype=torch.float64)
    idx = None
    if sparse:
        idx = torch.randint(0, E, (B, K), generator=g)
        if K > 1:
            idx[0, 1] = idx[0, 0]  # a teacher selected twice: its dz accumulates
    mask = None
    if masked:
        mask = torch.rand(B, S, generator=g) > 0.3
        mask.view(-1)[0] = True
    cast = lambda t: None if t is None else t.to(DEV)  # noqa: E731
    return x.to(DEV, dtype), z.to(DEV, dtype), w.to(DEV, dtype), cast(idx), cast(mask)


def check_routed(x, z, w, idx, mask, tau, mix, div, beta=0.3, grads=ALL_GRADS, rel_atol=None):
    """Kernel vs reference; ``rel_atol`` sets atol relative to each output's largest entry."""
    scale = tau * tau
    want = ref_routed(x, z, w, idx, mask, tau, mix, div, beta, scale, *grads)
    got = trk.routed_kd_rows(x, z, w, idx, mask, tau, mix, div, beta, scale, *grads)
    for name, g, r in zip(("loss", "dx", "dw", "dz"), got, want, strict=True):
        assert g.dtype == r.dtype and g.shape == r.shape, name
        tol = dict(TOL[r.dtype])
        if rel_atol is not None and r.numel():
            tol["atol"] = max(tol["atol"], rel_atol * r.nan_to_num(0.0, 0.0, 0.0).abs().max().item())
        torch.testing.assert_close(g, r, equal_nan=True, **tol, msg=lambda m, name=name: f"{name}: {m}")
    return got


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("div", list(DIVERGENCES.values()), ids=list(DIVERGENCES))
@pytest.mark.parametrize("mix", list(MIXES.values()), ids=list(MIXES))
def test_routed_every_mix_divergence(mix, div, sparse, masked):
    E = 3
    inputs = make_inputs(4, 11, 1, E, 2 if sparse else E, sparse, masked, seed=mix * 8 + div)
    check_routed(*inputs, tau=(0.5, 1.0, 4.0)[div % 3], mix=mix, div=div)


@pytest.mark.parametrize("tile", [64, 256], ids=["16-class", "64-class"])
@pytest.mark.parametrize("div", list(DIVERGENCES.values()), ids=list(DIVERGENCES))
@pytest.mark.parametrize("mix", list(MIXES.values()), ids=list(MIXES))
def test_routed_multi_block_rows(monkeypatch, mix, div, tile):
    """C = 300 over 16-class blocks (19 per pass), or 64-class ones halved to 32 when a third pass runs."""
    small_tiles(monkeypatch, trk, tile)
    sparse = bool((mix + div) % 2)
    inputs = make_inputs(2, 300, 1, 3, 2 if sparse else 3, sparse, masked=True, seed=mix * 8 + div)
    check_routed(*inputs, tau=2.0, mix=mix, div=div)


@pytest.mark.parametrize("zigzag,hints", [(True, True), (True, False), (False, False)],
                         ids=["zigzag-hints", "zigzag", "forward"])
def test_streamed_rows_every_sweep(monkeypatch, zigzag, hints):
    """Streamed rows (C = 300 over 16-class blocks, a partial last block) with pass 2 swept backward and L2
    evict-first hints (the default), without the hints, or every pass forward (the other arms of
    benchmarks/triton_tiles.py's timing): each matches the reference, for routed KD with and without a third
    pass and for mutual KD with and without its gradient."""
    for module in (trk, tmk):
        small_tiles(monkeypatch, module, 64)
        monkeypatch.setattr(module, "STREAM_ZIGZAG", zigzag)
        monkeypatch.setattr(module, "STREAM_L2_HINTS", hints)
    inputs = make_inputs(2, 300, 1, 3, 2, sparse=True, masked=True, seed=11)
    for mix, div in ((MIXES["loss"], DIVERGENCES["kl"]), (MIXES["probs"], DIVERGENCES["js"])):
        check_routed(*inputs, tau=2.0, mix=mix, div=div)
    x = torch.randn(3, 2, 300, generator=torch.Generator().manual_seed(12)).to(DEV) * 3
    for need_grad in (True, False):
        got, want = tmk.mutual_kd_rows(x, 2.0, 4.0, need_grad), ref_mutual(x, 2.0, 4.0, need_grad)
        for g_, r in zip(got, want, strict=True):
            torch.testing.assert_close(g_, r, **TOL[torch.float32])


@pytest.mark.parametrize(
    "grads", [(True, False, False), (False, True, False), (False, False, True), (True, False, True)]
)
@pytest.mark.parametrize("div", list(DIVERGENCES.values()), ids=list(DIVERGENCES))
def test_routed_gradient_subsets(div, grads):
    """Each gradient alone (early writes in pass 2 vs the third pass) and empty tensors for the rest."""
    for mix in MIXES.values():
        check_routed(*make_inputs(3, 9, 1, 2, 2, sparse=False, masked=False), 1.0, mix, div, grads=grads)


@pytest.mark.parametrize("tile", [8192, 256], ids=["one_block", "blocks"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_routed_dense_logits_layout(monkeypatch, tile, sparse):
    """class_dim=1 logits [B, C, H, W] viewed as [B, C, S] (class stride S), no copy; S is not a
    multiple of the pixel block."""
    small_tiles(monkeypatch, trk, tile)
    B, C, H, W, E = 2, 20, 3, 7, 3
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(B, C, H, W, generator=g) * 3).to(DEV).view(B, C, H * W)
    z = (torch.randn(E, B, C, H, W, generator=g) * 3).to(DEV).view(E, B, C, H * W)
    K = 2 if sparse else E
    w = torch.rand(B, K, generator=g).to(DEV)
    idx = torch.tensor([[2, 2], [0, 1]], device=DEV) if sparse else None
    mask = (torch.rand(B, H * W, generator=g) > 0.25).to(DEV)
    for mix in MIXES.values():
        check_routed(x, z, w, idx, mask, 4.0, mix, DIVERGENCES["kl"])
        check_routed(x, z, w, idx, None, 0.5, mix, DIVERGENCES["js"])


def test_routed_noncontiguous_inputs():
    B, C, S, E = 3, 13, 5, 2
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(B, S, C, generator=g) * 2).to(DEV).permute(0, 2, 1)  # class stride 1, pixel stride C
    z = (torch.randn(B, C, 2 * S, E, generator=g) * 2).to(DEV).permute(3, 0, 1, 2)[..., ::2]
    w = torch.rand(B, E, generator=g).to(DEV)
    assert not x.is_contiguous() and not z.is_contiguous()
    for mix in MIXES.values():
        for div in DIVERGENCES.values():
            check_routed(x, z, w, None, None, 1.0, mix, div)


@pytest.mark.parametrize(
    "B,C,S,E,K",
    [(1, 1, 1, 1, 1), (1, 5, 1, 1, 1), (2, 1, 3, 2, 2), (1, 37, 1, 4, 4), (5, 3, 1, 3, 3)],
)
def test_routed_odd_shapes(B, C, S, E, K):
    for mix in MIXES.values():
        for div in (DIVERGENCES["kl"], DIVERGENCES["tvd"]):
            check_routed(*make_inputs(B, C, S, E, K, sparse=False, masked=False), 0.5, mix, div)


def test_routed_float64_exact():
    """float64 accumulates in float64 (the scalars travel as float32 pairs)."""
    for mix in MIXES.values():
        inputs = make_inputs(3, 17, 2, 3, 3, sparse=False, masked=True, dtype=torch.float64)
        check_routed(*inputs, tau=3.0, mix=mix, div=DIVERGENCES["js"], beta=0.1)


def test_routed_all_rows_masked():
    x, z, w, idx, _ = make_inputs(3, 10, 2, 3, 2, sparse=True, masked=False)
    mask = torch.zeros(3, 2, dtype=torch.bool, device=DEV)
    for mix in MIXES.values():
        loss, dx, dw, dz = check_routed(x, z, w, idx, mask, 1.0, mix, DIVERGENCES["reverse_kl"])
        assert not loss.any() and not dx.any() and not dw.any() and not dz.any()


def test_routed_bad_index_gives_nan_rows():
    x, z, w, _, mask = make_inputs(4, 12, 1, 3, 2, sparse=False, masked=False)
    idx = torch.tensor([[0, 3], [1, 2], [-1, 0], [2, 2]], device=DEV)
    for mix in MIXES.values():
        loss, dx, dw, dz = check_routed(x, z, w, idx, mask, 1.0, mix, DIVERGENCES["kl"])
        assert loss[[0, 2]].isnan().all() and not loss[[1, 3]].isnan().any()
        assert dx[[0, 2]].isnan().all() and dw[[0, 2]].isnan().all()


def test_routed_one_hot_and_zero_weights_underflow():
    """One-hot and zero weights with confident teachers (|z / tau| ~ 500): classes underflow to P == 0
    in float32; log P is formed in log space (probs mix) and P log P terms are 0, never NaN. Such rows
    are ill-conditioned in float32, so the kernel is held to the reference's own error against float64."""
    x, z, _, _, _ = make_inputs(3, 16, 1, 3, 3, sparse=False, masked=False, spread=60.0)
    w = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.5, 0.0]], device=DEV)
    for mix in MIXES.values():
        for div in DIVERGENCES.values():
            args = (None, None, 0.5, mix, div, 0.3, 0.25, *ALL_GRADS)
            truth = ref_routed(x.double(), z.double(), w.double(), *args)
            want = ref_routed(x, z, w, *args)
            got = trk.routed_kd_rows(x, z, w, *args)
            for name, g, r, t in zip(("loss", "dx", "dw", "dz"), got, want, truth, strict=True):
                assert torch.equal(g.isnan(), r.isnan()), (name, mix, div)
                ok = ~r.isnan()
                if ok.any():
                    err_g, err_r = ((a[ok].double() - t[ok]).abs().max().item() for a in (g, r))
                    assert err_g <= 2 * err_r + 1e-6 * (1 + t[ok].abs().max().item()), (name, mix, div)
            # (dz of a zero-weight teacher can be 0 * inf: its dw is -inf where P underflows)
            assert all(not g.isnan().any() for g in got[:3]), (mix, div)


def test_routed_nan_input_propagates():
    x, z, w, _, _ = make_inputs(2, 8, 1, 2, 2, sparse=False, masked=False)
    x[1, 3, 0] = float("nan")
    for div in DIVERGENCES.values():
        loss, dx, _, _ = check_routed(x, z, w, None, None, 1.0, MIXES["loss"], div)
        assert loss[1].isnan().all() and dx[1].isnan().all()
        assert not loss[0].isnan().any() and not dx[0].isnan().any()


def split_rows(monkeypatch, split, programs=64):
    """Streamed rows split across programs whenever there are fewer than ``programs`` of them (``split``), else
    never (routed KD's SPLIT_BELOW threshold lifted to the whole target)."""
    monkeypatch.setattr(trk, "SPLIT_PROGRAMS_PER_SM", programs if split else 0)
    monkeypatch.setattr(trk, "_sm_count", lambda index: 1)  # the same plans on a GPU
    monkeypatch.setattr(trk, "CPU_SPLIT_PROGRAMS", programs)
    monkeypatch.setattr(trk, "SPLIT_BELOW", 1.0)


def routed_chunks(B, C, S, K):
    """How many chunks each row of routed KD's [B, C, S] logits is cut into (1: not split)."""
    block_c = trk._launch_plan(B, C, S, K, trk.ROW_TILES, trk.PIXEL_TILES, trk.PIXELS_PER_PROGRAM)[2]
    return trk.split_rows_plan(B, C, S, block_c, DEV)[0]


@pytest.mark.parametrize(
    "B,C,K,split",
    [(256, 8192, 4, False), (4096, 32768, 2, False), (256, 131072, 4, False), (132, 262144, 4, False),
     (64, 262144, 4, True), (1, 262144, 2, True), (8, 100000, 1, True), (64, 1000, 4, False)],
)
def test_routed_split_policy_on_an_h100(monkeypatch, B, C, K, split):
    """The launch plan on a 132-SM GPU (no GPU needed): the benchmark shapes keep the one-launch kernel; a
    batch of fewer rows than SMs with rows longer than a block is cut into chunks of whole blocks that give
    about 4 programs per SM (at least 2 after rounding up to blocks); rows that fit one block never split."""
    monkeypatch.setattr(trk, "_sm_count", lambda index: 132)
    gpu = torch.device("cuda", 0)
    block_c = trk._launch_plan(B, C, 1, K, trk.ROW_TILES, trk.PIXEL_TILES, trk.PIXELS_PER_PROGRAM)[2]
    n_split, chunk, split_p2, block = trk.split_rows_plan(B, C, 1, block_c, gpu)
    assert (n_split > 1) == split
    if split:
        assert B * n_split >= 2 * 132 or n_split == trk.cdiv(C, block)  # chunks round up to whole blocks
        assert chunk % block == 0 and (n_split - 1) * chunk < C <= n_split * chunk
        assert split_p2 >= n_split and split_p2 & (split_p2 - 1) == 0
    else:
        assert (n_split, chunk) == (1, C)


@pytest.mark.parametrize("programs", [32, 8], ids=["block-chunks", "multi-block-chunks"])
@pytest.mark.parametrize("div", list(DIVERGENCES.values()), ids=list(DIVERGENCES))
@pytest.mark.parametrize("mix", list(MIXES.values()), ids=list(MIXES))
def test_routed_split_rows(monkeypatch, mix, div, programs):
    """A few long rows cut into chunks across programs (three launches): C = 150 in 16-class blocks, in chunks of
    one block (10 chunks, the last one partial) or of four blocks (3 chunks, the last one of two blocks, partial)."""
    small_tiles(monkeypatch, trk, 64)
    split_rows(monkeypatch, True, programs)
    sparse = bool((mix + div) % 2)
    B, C, E = 3, 150, 3
    K = 2 if sparse else E
    assert routed_chunks(B, C, 1, K) == (10 if programs == 32 else 3)
    inputs = make_inputs(B, C, 1, E, K, sparse, masked=True, seed=mix * 8 + div)
    check_routed(*inputs, tau=(0.5, 1.0, 4.0)[div % 3], mix=mix, div=div)


@pytest.mark.parametrize(
    "grads", [(True, False, False), (False, True, False), (False, False, True), (True, False, True)]
)
@pytest.mark.parametrize("div", list(DIVERGENCES.values()), ids=list(DIVERGENCES))
def test_routed_split_gradient_subsets(monkeypatch, div, grads):
    """Split rows with each gradient alone (early writes in phase 2, phase 3 with and without a third pass)."""
    small_tiles(monkeypatch, trk, 64)
    split_rows(monkeypatch, True, 8)
    assert routed_chunks(2, 70, 1, 2) > 1
    for mix in MIXES.values():
        check_routed(*make_inputs(2, 70, 1, 2, 2, sparse=False, masked=False), 1.0, mix, div, grads=grads)


# the interpreter reduces the NaN rows' padded lanes with numpy, which warns
@pytest.mark.filterwarnings("ignore:invalid value encountered in reduce:RuntimeWarning")
def test_routed_split_special_rows(monkeypatch):
    """Split rows in float64, with a NaN (its row only), a masked row, a bad index (NaN row) and a chunk the
    student rules out entirely (-inf logits); and dense logits (S > 1), whose rows are not split."""
    small_tiles(monkeypatch, trk, 64)
    split_rows(monkeypatch, True, 8)
    x, z, w, _, _ = make_inputs(4, 90, 1, 3, 2, sparse=False, masked=False, dtype=torch.float64)
    idx = torch.tensor([[0, 2], [1, 1], [3, 0], [2, 1]], device=DEV)
    mask = torch.tensor([[True], [False], [True], [True]], device=DEV)
    x[3, :64] = float("-inf")  # the whole first chunk
    x[0, 77] = float("nan")
    assert routed_chunks(4, 90, 1, 2) == 2 and routed_chunks(4, 90, 2, 2) == 1
    for mix in MIXES.values():
        for div in DIVERGENCES.values():
            loss, dx, _, _ = check_routed(x, z, w, idx, mask, 2.0, mix, div)
            assert loss[0].isnan() and loss[2].isnan() and loss[1] == 0 and not loss[3].isnan()
            assert dx[1].eq(0).all() and dx[0].isnan().all()
    check_routed(*make_inputs(2, 90, 2, 3, 3, sparse=False, masked=True), 1.0, MIXES["loss"], DIVERGENCES["js"])


def mutual_chunks(M, N, C):
    """How many chunks each row of mutual KD's [M, N, C] logits is cut into (1: not split)."""
    return tmk.launch_plan(M, N, C, DEV)[3]


@pytest.mark.parametrize("split", [False, True], ids=["one-launch", "split"])
@pytest.mark.parametrize("tile", [8192, 16], ids=["one_block", "blocks"])
@pytest.mark.parametrize("M,N,C", [(2, 5, 7), (3, 4, 37), (1, 3, 5), (4, 1, 1), (2, 2, 100)])
def test_mutual_kd(monkeypatch, tile, M, N, C, split):
    small_tiles(monkeypatch, tmk, tile)
    split_rows(monkeypatch, split)
    assert (mutual_chunks(M, N, C) > 1) == (split and tile == 16 and C > 16)
    g = torch.Generator().manual_seed(M * 100 + C)
    logits = (torch.randn(N, C, M, generator=g) * 3).to(DEV)
    for x in (logits.permute(2, 0, 1).contiguous(), logits.permute(2, 0, 1)):  # and model stride 1
        for tau, need_grad in ((0.5, True), (4.0, True), (1.0, False)):
            want = ref_mutual(x, tau, tau * tau, need_grad)
            got = tmk.mutual_kd_rows(x, tau, tau * tau, need_grad)
            for g_, r in zip(got, want, strict=True):
                assert g_.dtype == r.dtype and g_.shape == r.shape
                torch.testing.assert_close(g_, r, **TOL[torch.float32])


@pytest.mark.parametrize("split", [False, True], ids=["one-launch", "split"])
def test_mutual_kd_float64(monkeypatch, split):
    small_tiles(monkeypatch, tmk, 16)
    split_rows(monkeypatch, split)
    x = torch.randn(3, 4, 41, dtype=torch.float64, device=DEV) * 3
    assert (mutual_chunks(3, 4, 41) > 1) == split
    for g_, r in zip(tmk.mutual_kd_rows(x, 3.0, 9.0, True), ref_mutual(x, 3.0, 9.0, True), strict=True):
        torch.testing.assert_close(g_, r, **TOL[torch.float64])


@pytest.mark.parametrize("split", [False, True], ids=["one-launch", "split"])
def test_mutual_kd_nan_and_masked_classes(monkeypatch, split):
    """A NaN stays in its row; classes every model rules out (-inf logits, a whole chunk of them when the row is
    split) leave the loss finite, as in the reference."""
    small_tiles(monkeypatch, tmk, 16)
    split_rows(monkeypatch, split)
    x = torch.randn(2, 3, 40, device=DEV) * 3
    x[:, 1, :20] = float("-inf")
    x[1, 2, 7] = float("nan")
    got, want = tmk.mutual_kd_rows(x, 2.0, 4.0, True), ref_mutual(x, 2.0, 4.0, True)
    for g_, r in zip(got, want, strict=True):
        torch.testing.assert_close(g_, r, equal_nan=True, **TOL[torch.float32])
    assert got[0][2].isnan() and got[0][:2].isfinite().all()


# ---- GPU only: low precision against a float64 truth ------------------------------------------


def _max_err(t, truth):
    return (t.double() - truth).abs().max().item() if t.numel() else 0.0


@pytest.mark.skipif(not HAS_CUDA, reason="bf16/fp16 arithmetic is not faithful under TRITON_INTERPRET")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("C,S", [(1000, 1), (40, 64), (33000, 1)])
def test_low_precision_no_worse_than_reference(dtype, C, S):
    E, B = 3, 8
    for mix in MIXES.values():
        for div in DIVERGENCES.values():
            x, z, w, idx, mask = make_inputs(B, C, S, E, 2, sparse=True, masked=True, dtype=dtype, seed=div)
            args = (idx, mask, 2.0, mix, div, 0.3, 4.0, *ALL_GRADS)
            truth = ref_routed(x.double(), z.double(), w.double(), *args)
            low = ref_routed(x, z, w, *args)
            got = trk.routed_kd_rows(x, z, w, *args)
            for name, g_, l_, t_ in zip(("loss", "dx", "dw", "dz"), got, low, truth, strict=True):
                assert g_.dtype == l_.dtype, name
                bound = _max_err(l_, t_) + 1e-3 * (1.0 + t_.abs().max().item())
                assert _max_err(g_, t_) <= bound, (name, mix, div, _max_err(g_, t_), bound)
    x = (torch.randn(3, B * S, C, device=DEV) * 3).to(dtype)
    truth = ref_mutual(x.double(), 2.0, 4.0, True)
    for g_, l_, t_ in zip(
        tmk.mutual_kd_rows(x, 2.0, 4.0, True), ref_mutual(x, 2.0, 4.0, True), truth, strict=True
    ):
        assert _max_err(g_, t_) <= _max_err(l_, t_) + 1e-3 * (1.0 + t_.abs().max().item())
