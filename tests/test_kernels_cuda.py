"""The hand-written CUDA kernels (csrc/cuda) against the reference.

On a GPU with ``mmfast._C`` built with ``MMFAST_WITH_CUDA=ON`` the kernels run on the device; without a GPU
they run on CPU tensors over the CPU emulation of the CUDA runtime (tests/cuda_emu.py: every thread a fiber,
barriers and warp shuffles as on the device). Each output is compared to a float64 ground truth (the reference
evaluated in float64 on the same inputs): the kernel's error must be no worse than the reference's own error
at the input dtype plus a small tolerance, and NaN / inf entries must match exactly.
"""

from __future__ import annotations

import itertools
import math

import cuda_emu
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mmfast import _native
from mmfast._native import cuda_row_team, cuda_sweep_order
from mmfast.reference import mutual_kd as ref_mutual
from mmfast.reference import routed_kd as ref_routed

EMULATED = not torch.cuda.is_available()
if not EMULATED and (_native.load() is None or not getattr(_native.load(), "with_cuda", False)):
    pytest.skip(
        "mmfast._C was built without the CUDA kernels (MMFAST_WITH_CUDA=OFF)", allow_module_level=True
    )
if EMULATED and cuda_emu.unavailable_reason() is not None:
    pytest.skip(f"no GPU, and no CUDA emulation: {cuda_emu.unavailable_reason()}", allow_module_level=True)

DEVICE = torch.device("cpu" if EMULATED else "cuda")


@pytest.fixture(autouse=True)
def _cuda_backend(monkeypatch):
    """Without a GPU, mmfast._native's "cuda" launches run on the emulation. Returns the module of the kernels."""
    if EMULATED:
        return cuda_emu.emulate_cuda_backend(monkeypatch)
    return _native.load()


# mmfast/kernels.h: kCudaRowTeamBlock, kCudaRowTeamThread, kCudaRowTeamCluster
ROW_TEAMS = {"auto": 0, "block_rows": 1, "thread_rows": 2, "cluster_rows": 3}


def pytest_generate_tests(metafunc):
    """Every case runs with a block per row, with a thread per row and with a thread-block cluster per row (the
    kernels' automatic choice is one of them: csrc/cuda/common.cuh; forced clusters cut every routed/mutual-KD row
    of class logits of two chunks or more, the rest run as blocks), except ``long_rows`` cases: rows of more than
    1024 classes never get a thread, and cases marked ``row_teams(...)``, which run with the teams it names."""
    if "row_team" in metafunc.fixturenames and "row_team" not in _parametrized(metafunc):
        teams = ["block_rows", "thread_rows", "cluster_rows"]
        if metafunc.definition.get_closest_marker("long_rows"):
            teams.remove("thread_rows")
        only = metafunc.definition.get_closest_marker("row_teams")
        if only is not None:
            teams = [team for team in teams if team in only.args]
        metafunc.parametrize("row_team", teams, indirect=True)


def _parametrized(metafunc) -> set[str]:
    """The argument names a test's own parametrize marks give."""
    names = set()
    for mark in metafunc.definition.iter_markers("parametrize"):
        argnames = mark.args[0]
        if isinstance(argnames, str):
            argnames = argnames.split(",")
        names.update(name.strip() for name in argnames)
    return names


@pytest.fixture(autouse=True)
def row_team(request, _cuda_backend):
    with cuda_row_team(ROW_TEAMS[request.param]):
        yield request.param


def test_row_team_setting_is_checked(_cuda_backend):
    with pytest.raises(ValueError, match="team must be 0"):
        _cuda_backend.set_cuda_row_team(4)


# (rtol relative to the largest |truth| of the output, atol) on top of the reference's error
TOLERANCES = {torch.float32: (1e-4, 1e-6), torch.bfloat16: (8e-3, 1e-5), torch.float16: (1e-3, 1e-5)}


def _assert_no_worse(out, ref, truth, name: str, dtype: torch.dtype, outliers: int = 0) -> None:
    """`outliers`: entries allowed past the tolerance (TVD gradients jump where sign(q - P) flips)."""
    assert out.shape == truth.shape, f"{name}: shape {tuple(out.shape)}, expected {tuple(truth.shape)}"
    assert out.dtype == ref.dtype, f"{name}: dtype {out.dtype}, expected {ref.dtype}"
    a, r, t = out.double(), ref.double(), truth.double()
    nan_t, inf_t = torch.isnan(t), torch.isinf(t)
    assert torch.equal(torch.isnan(a), nan_t), f"{name}: NaN entries differ from the truth"
    assert torch.equal(torch.isinf(a), inf_t) and torch.equal(a[inf_t], t[inf_t]), (
        f"{name}: inf entries differ"
    )
    finite = ~(nan_t | inf_t)
    if not finite.any():
        return
    errors = (a[finite] - t[finite]).abs()
    ref_err = (r[finite] - t[finite]).abs().nan_to_num(math.inf).max().item()
    scale = t[finite].abs().max().item()
    rtol, atol = TOLERANCES[dtype]
    tol = ref_err + atol + rtol * scale
    worst = errors.topk(min(outliers + 1, errors.numel())).values
    assert worst[-1].item() <= tol, (
        f"{name}: kernel error {worst[0].item():.3g} > reference error {ref_err:.3g} + tolerance "
        f"(|truth| <= {scale:.3g}, {outliers} outliers allowed)"
    )


def _layout(t: torch.Tensor, layout: str, class_dim: int) -> torch.Tensor:
    """The same values in another memory layout."""
    if layout == "contiguous":
        return t
    if layout == "strided":  # class stride 2
        return torch.repeat_interleave(t, 2, dim=class_dim)[
            (slice(None),) * class_dim + (slice(None, None, 2),)
        ]
    if layout in ("transposed", "channels_last"):  # classes outermost / innermost in memory
        rest = [d for d in range(t.dim()) if d != class_dim]
        order = [class_dim, *rest] if layout == "transposed" else [*rest, class_dim]
        inverse = [order.index(d) for d in range(t.dim())]
        return t.permute(order).contiguous().permute(inverse)
    if layout == "misaligned":  # storage offset of one element: rows off the 16-byte grid
        flat = torch.cat([t.new_zeros(1), t.flatten()])
        return flat[1:].view(t.shape)
    raise AssertionError(layout)


def check_routed(
    B: int,
    C: int,
    S: int | tuple[int, int],
    E: int,
    K: int | None,
    mix: int,
    div: int,
    *,
    dtype=torch.float32,
    duplicate=False,
    mask="none",
    tau=2.0,
    beta=0.3,
    layout="contiguous",
    bad_index=False,
    need=(True, True, True),
    seed=0,
    logit_scale=3.0,
    extreme=False,
) -> None:
    """Runs routed KD on the CUDA kernels and checks every output. K=None: dense routing;
    S=(H, W): dense logits [B, C, H, W] seen as [B, C, H * W] (class_dim=1)."""
    g = torch.Generator().manual_seed(seed)
    pixels = S if isinstance(S, tuple) else (S,)
    x = torch.randn(B, C, *pixels, generator=g) * logit_scale
    z = torch.randn(E, B, C, *pixels, generator=g) * logit_scale
    if extreme:  # -inf logits, a zero weight
        x[0, 0].view(-1)[0] = -math.inf
        z[:, 0, min(1, C - 1)].view(E, -1)[:, 0] = -math.inf
    if K is None:
        idx = None
        w = torch.rand(B, E, generator=g)
    else:
        idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(B)])
        if duplicate and K >= 2:
            idx[:, 1] = idx[:, 0]
        if bad_index:
            idx[B // 2, K - 1] = E + 3 if B > 1 else -1
        w = torch.rand(B, K, generator=g)
    if extreme:
        w[0, 0] = 0.0
    rows = (B, math.prod(pixels))
    m = {
        "none": None,
        "some": torch.rand(*rows, generator=g) > 0.3,
        "all": torch.zeros(*rows, dtype=torch.bool),
    }[mask]
    x = _layout(x.to(DEVICE, dtype), layout, 1).flatten(2)  # a view: [B, C, H, W] -> [B, C, H * W]
    z = _layout(z.to(DEVICE, dtype), layout, 2).flatten(3)
    w = w.to(DEVICE)
    idx = None if idx is None else idx.to(DEVICE)
    m = None if m is None else m.to(DEVICE)
    args = (w, idx, m, tau, mix, div, beta, tau * tau, *need)

    out = _native.routed_kd_rows("cuda", x, z, *args)
    ref = ref_routed.routed_kd_rows(x, z, *args)
    truth = ref_routed.routed_kd_rows(x.double(), z.double(), w.double(), *args[1:])
    for o, r, t, name in zip(out, ref, truth, ("loss", "dx", "dw", "dz"), strict=True):
        if t.numel() == 0:
            assert o.numel() == 0, name
            continue
        sign_flips = 2 + t.numel() // 20000 if div == 3 and name in ("dx", "dz") else 0
        _assert_no_worse(o, r, t, name, dtype, sign_flips)
    if mask == "all" and not bad_index:  # a bad index's row is NaN even when masked (never hidden)
        assert not out[0].any() and not out[1].any() and not out[2].any()


def check_mutual(
    M: int, N: int, C: int, *, dtype=torch.float32, tau=2.0, layout="contiguous", need=True, seed=0
):
    g = torch.Generator().manual_seed(seed)
    logits = _layout((torch.randn(M, N, C, generator=g) * 3).to(DEVICE, dtype), layout, 2)
    out = _native.mutual_kd_rows("cuda", logits, tau, tau * tau, need)
    ref = ref_mutual.mutual_kd_rows(logits, tau, tau * tau, need)
    truth = ref_mutual.mutual_kd_rows(logits.double(), tau, tau * tau, need)
    for o, r, t, name in zip(out, ref, truth, ("loss", "grad"), strict=True):
        if t.numel() == 0:
            assert o.numel() == 0, name
            continue
        _assert_no_worse(o, r, t, name, dtype)


MIXES = range(3)  # loss, logits, probs
DIVERGENCES = range(4)  # kl, reverse_kl, js, tvd
ROUTING = {"dense": (None, False), "sparse": (3, False), "sparse_duplicate": (3, True)}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", ["none", "some"])
@pytest.mark.parametrize("routing", list(ROUTING))
@pytest.mark.parametrize("mix,div", list(itertools.product(MIXES, DIVERGENCES)))
def test_routed_matrix(mix, div, routing, mask, dtype):
    K, duplicate = ROUTING[routing]
    tau = (0.5, 1.0, 4.0)[(mix + div) % 3]
    check_routed(5, 37, 1, 4, K, mix, div, dtype=dtype, duplicate=duplicate, mask=mask, tau=tau)


@pytest.mark.parametrize("mix,div", list(itertools.product(MIXES, DIVERGENCES)))
class TestRoutedShapes:
    def test_single_row_class_teacher(self, mix, div):  # N = C = E = 1
        check_routed(1, 1, 1, 1, None, mix, div)

    def test_one_class(self, mix, div):
        check_routed(3, 1, 2, 2, 2, mix, div)

    def test_one_teacher(self, mix, div):
        check_routed(2, 7, 1, 1, 1, mix, div)

    @pytest.mark.long_rows
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_41x1271(self, mix, div, dtype):  # C odd: rows of different alignment
        check_routed(41, 1271, 1, 3, 2, mix, div, dtype=dtype, duplicate=True, mask="some")
        # N % 8 == 0: x, z, dx, dz rows share their alignment, vector accesses with a shift
        check_routed(8, 1271, 1, 2, None, mix, div, dtype=dtype)

    @pytest.mark.long_rows
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_split_rows(self, mix, div, dtype):  # fewer rows than SMs of >= 8192 classes: rows cut into pieces
        check_routed(5, 20000, 1, 3, 2, mix, div, dtype=dtype, duplicate=True, mask="some", bad_index=True)
        check_routed(4, 16411, 1, 3, None, mix, div, dtype=dtype, layout="misaligned", extreme=True)

    @pytest.mark.long_rows
    @pytest.mark.parametrize(
        "need", [(False, False, False), (True, False, False), (False, True, False), (False, False, True)]
    )
    def test_split_rows_requested_gradients(self, mix, div, need):
        check_routed(3, 12289, 1, 3, 2, mix, div, need=need, duplicate=True, mask="some")

    @pytest.mark.long_rows
    def test_large_classes(self, mix, div):
        check_routed(3, 100003, 1, 2, 1, mix, div, tau=1.0)
        check_routed(2, 262144, 1, 2, None, mix, div, dtype=torch.bfloat16, tau=4.0)

    @pytest.mark.row_teams("block_rows", "thread_rows")  # dense logits: cluster mode leaves them to blocks
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_pixels(self, mix, div, dtype):  # class_dim=1: [B, C, H, W] viewed as [B, C, H * W]
        check_routed(2, 13, (3, 5), 3, 2, mix, div, dtype=dtype, duplicate=True, mask="some", tau=0.5)
        check_routed(2, 13, (2, 3), 3, None, mix, div, dtype=dtype, layout="channels_last", tau=4.0)
        check_routed(3, 6, (4, 4), 2, 1, mix, div, dtype=dtype, layout="transposed")

    @pytest.mark.parametrize("layout", ["strided", "transposed", "channels_last", "misaligned"])
    def test_layouts(self, mix, div, layout):
        check_routed(6, 29, 1, 3, 2, mix, div, duplicate=True, layout=layout)
        check_routed(4, 29, 1, 3, None, mix, div, layout=layout, mask="some")

    def test_all_rows_masked(self, mix, div):
        check_routed(4, 19, 1, 3, None, mix, div, mask="all")
        check_routed(4, 19, 2, 3, 2, mix, div, mask="all")

    def test_bad_index_gives_nan_rows(self, mix, div):
        check_routed(5, 23, 1, 3, 2, mix, div, bad_index=True, mask="some")

    def test_extreme_values(self, mix, div):  # -inf logits, zero weights
        check_routed(3, 41, 1, 3, None, mix, div, extreme=True)
        check_routed(3, 41, 1, 3, 3, mix, div, extreme=True, duplicate=True)

    @pytest.mark.parametrize(
        "need", [(False, False, False), (True, False, False), (False, True, False), (False, False, True)]
    )
    def test_requested_gradients(self, mix, div, need):
        check_routed(3, 19, 1, 3, 2, mix, div, need=need, duplicate=True)

    # thread teams of several blocks of 128 rows, rows ending mid-block (grids of many clusters: TestClusterMode)
    @pytest.mark.row_teams("block_rows", "thread_rows")
    def test_many_rows(self, mix, div):
        check_routed(300, 10, 1, 4, None, mix, div, mask="some")
        check_routed(2, 5, (16, 20), 3, 2, mix, div, duplicate=True, mask="some", dtype=torch.bfloat16)

    # per-slot statistics in shared memory cap the block size (clusters: TestClusterMode.test_many_teachers)
    @pytest.mark.row_teams("block_rows", "thread_rows")
    def test_many_teachers(self, mix, div):
        check_routed(3, 300, 1, 64, None, mix, div)
        check_routed(3, 300, 1, 64, 64, mix, div, duplicate=True)
        check_routed(2, 50, 1, 200, None, mix, div)  # past 48 KiB of shared memory: opt-in launch


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 2, 3])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "misaligned"])
def test_mutual(M, dtype, layout):
    check_mutual(M, 5, 37, dtype=dtype, layout=layout, tau=(0.5, 1.0, 4.0)[M - 1])


@pytest.mark.long_rows
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mutual_split_rows(dtype):  # fewer rows than SMs of >= 8192 classes: rows cut into pieces
    check_mutual(3, 5, 20000, dtype=dtype)
    check_mutual(2, 3, 16411, dtype=dtype, layout="misaligned", need=False)
    check_mutual(1, 2, 12289, dtype=dtype, layout="transposed")


def test_mutual_shapes():
    check_mutual(2, 1, 1)
    check_mutual(3, 2, 262144, dtype=torch.bfloat16)
    check_mutual(3, 41, 1271, need=False)
    check_mutual(40, 3, 100)
    check_mutual(3, 300, 10)
    check_mutual(2, 261, 9, layout="transposed")  # class-strided rows: a thread per row in the automatic choice


def test_float64_is_refused():
    x = torch.randn(2, 5, 1, device=DEVICE, dtype=torch.float64)
    z = torch.randn(2, 2, 5, 1, device=DEVICE, dtype=torch.float64)
    w = torch.rand(2, 2, device=DEVICE, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="routed_kd_cuda"):
        _native.routed_kd_rows("cuda", x, z, w, None, None, 1.0, 0, 0, 0.5, 1.0, True, False, False)


@pytest.mark.skipif(EMULATED, reason="CUDA graphs need a GPU")
def test_cuda_graph_capture():
    """One launch per call, no host synchronisation: the kernel replays inside a CUDA graph."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(256, 1000, 1, generator=g) * 3).to(DEVICE)
    z = (torch.randn(4, 256, 1000, 1, generator=g) * 3).to(DEVICE)
    idx = torch.randint(0, 4, (256, 2), generator=g).to(DEVICE)
    w = torch.full((256, 2), 0.5, device=DEVICE)
    args = (w, idx, None, 4.0, 0, 0, 0.5, 16.0, True, True, True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _native.routed_kd_rows("cuda", x, z, *args)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _native.routed_kd_rows("cuda", x, z, *args)
    x.mul_(0.5)  # new inputs, same buffers
    graph.replay()
    torch.cuda.synchronize()
    expected = ref_routed.routed_kd_rows(x, z, *args)
    for o, e in zip(out, expected, strict=True):
        torch.testing.assert_close(o, e, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# fuzz: random problems across the cases above, each with both row teams (cases per test: the hypothesis
# profile, "ci" or "nightly"; tests/conftest.py). Class counts straddle the automatic thread team's limit (32 classes)
# and reach past the forced one's (1024, beyond which rows always get blocks).


@given(data=st.data())
def test_fuzz_routed(data):
    E = data.draw(st.integers(1, 5), label="E")
    K = data.draw(st.none() | st.integers(1, E), label="K")
    pixels = data.draw(st.sampled_from([1, (2, 3), (1, 5), (3, 1)]), label="S")
    check_routed(
        data.draw(st.integers(1, 6), label="B"),
        data.draw(st.integers(1, 70) | st.integers(71, 1100), label="C"),
        pixels,
        E,
        K,
        data.draw(st.sampled_from(MIXES), label="mix"),
        data.draw(st.sampled_from(DIVERGENCES), label="div"),
        dtype=data.draw(st.sampled_from(DTYPES), label="dtype"),
        duplicate=data.draw(st.booleans(), label="duplicate"),
        mask=data.draw(st.sampled_from(["none", "some", "all"]), label="mask"),
        tau=data.draw(st.sampled_from([0.5, 1.0, 4.0]) | st.floats(0.3, 6.0), label="tau"),
        beta=data.draw(st.floats(0.05, 0.95), label="beta"),
        layout=data.draw(
            st.sampled_from(["contiguous", "strided", "transposed", "channels_last", "misaligned"]), label="layout"
        ),
        bad_index=K is not None and data.draw(st.booleans(), label="bad_index"),
        need=data.draw(st.tuples(st.booleans(), st.booleans(), st.booleans()), label="need"),
        seed=data.draw(st.integers(0, 2**31 - 1), label="seed"),
        extreme=data.draw(st.booleans(), label="extreme"),
    )


@given(
    M=st.integers(1, 4),
    N=st.integers(1, 8),
    C=st.integers(1, 70) | st.integers(71, 1100),
    dtype=st.sampled_from(DTYPES),
    tau=st.floats(0.3, 6.0),
    layout=st.sampled_from(["contiguous", "transposed", "misaligned"]),
    need=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_mutual(M, N, C, dtype, tau, layout, need, seed):
    check_mutual(M, N, C, dtype=dtype, tau=tau, layout=layout, need=need, seed=seed)


# mmfast/kernels.h: kCudaSweepBackHints, kCudaSweepBack, kCudaSweepForward
SWEEP_ORDERS = {"back_hints": 1, "back": 2, "forward": 3}


def test_sweep_order_setting_is_checked(_cuda_backend):
    with pytest.raises(ValueError, match="order must be 0"):
        _cuda_backend.set_cuda_sweep_order(4)


@pytest.mark.row_teams("block_rows", "thread_rows")  # pieces of rows (clusters) sweep forward regardless
class TestSweepOrder:
    """Passes 2 and 3 of a row (csrc/cuda/common.cuh: RowSweep) back and forth with the L2 evict-first hints, back
    and forth without them, and forward, forced on the block- and thread-per-row launches: the same outputs to
    rounding.
    Rows of 40 classes are one chunk per thread; rows of 4200 give the first threads of a block two chunks, so
    that a thread's chunks come in the other order; misaligned rows take element-wise loads at their ends."""

    @pytest.mark.parametrize("order", list(SWEEP_ORDERS))
    @pytest.mark.parametrize("mix,div", list(itertools.product(MIXES, DIVERGENCES)))
    def test_routed(self, order, mix, div):
        with cuda_sweep_order(SWEEP_ORDERS[order]):
            check_routed(5, 40, 1, 4, 3, mix, div, duplicate=True, mask="some", bad_index=True)
            check_routed(3, 40, 1, 3, None, mix, div, need=(True, False, False))  # KL: dx in pass 2 only
            check_routed(2, 301, 1, 2, None, mix, div, layout="misaligned", dtype=torch.bfloat16)

    @pytest.mark.long_rows
    @pytest.mark.parametrize("order", list(SWEEP_ORDERS))
    @pytest.mark.parametrize("mix,div", [(0, 2), (1, 0), (2, 1)])
    def test_routed_long_rows(self, order, mix, div):
        with cuda_sweep_order(SWEEP_ORDERS[order]):
            check_routed(2, 4200, 1, 2, None, mix, div)

    @pytest.mark.parametrize("order", list(SWEEP_ORDERS))
    @pytest.mark.parametrize("need", [True, False])
    def test_mutual(self, order, need):
        with cuda_sweep_order(SWEEP_ORDERS[order]):
            check_mutual(3, 5, 40, need=need)
            check_mutual(2, 3, 301, layout="misaligned", dtype=torch.bfloat16, need=need)
            check_mutual(2, 2, 4200, need=need)


@pytest.mark.skipif(not EMULATED, reason="counts the emulation's evict-first accesses")
@pytest.mark.parametrize("row_team", ["block_rows"], indirect=True)
class TestEvictFirstHints:
    """Which accesses carry the L2 evict-first hint (the emulation counts __ldcs and __stcs): a row's last read and
    its gradient stores, as vector words, in block-per-row launches whose rows in flight exceed the L2 (here made
    small) or with the hints forced; none otherwise. Rows of 40 fp32 classes, 16-byte aligned: 10 vector words per
    row and source."""

    @staticmethod
    def hinted(backend, run) -> int:
        before = backend.evict_first_accesses()
        run()
        return backend.evict_first_accesses() - before

    @pytest.mark.parametrize("order,l2_bytes,hints", [(0, 1024, True), (0, 50 * 2**20, False), (1, 50 * 2**20, True),
                                                      (2, 1024, False), (3, 1024, False)])
    def test_routed(self, _cuda_backend, row_team, order, l2_bytes, hints):
        _cuda_backend.set_l2_cache_bytes(l2_bytes)
        try:
            with cuda_sweep_order(order):
                # KL, mix "loss", dx only: no pass 3; pass 2 reads x and 3 teachers a last time and stores dx
                only_pass2 = self.hinted(_cuda_backend, lambda: check_routed(5, 40, 1, 3, None, 0, 0,
                                                                             need=(True, False, False)))
                # JS, every gradient: pass 3 reads x and 3 teachers a last time and stores dx and 3 dz
                with_pass3 = self.hinted(_cuda_backend, lambda: check_routed(5, 40, 1, 3, None, 0, 2))
        finally:
            _cuda_backend.set_l2_cache_bytes(50 * 1024 * 1024)
        assert (only_pass2, with_pass3) == ((5 * 10 * 5, 5 * 10 * 8) if hints else (0, 0))

    def test_mutual(self, _cuda_backend, row_team):
        with cuda_sweep_order(1):
            # pass 2 reads each of 3 models twice per chunk, the second time the last without a gradient
            assert self.hinted(_cuda_backend, lambda: check_mutual(3, 4, 40, need=False)) == 4 * 3 * 10
            # with it pass 3 is the last read (the second per chunk), and the gradient is stored
            assert self.hinted(_cuda_backend, lambda: check_mutual(3, 4, 40)) == 4 * 3 * 10 * 2


@pytest.mark.skipif(not EMULATED, reason="reads the emulation's record of the last launch")
class TestClusterMode:
    """Cluster mode (csrc/cuda/common.cuh): the pieces of a row are the blocks of a thread-block cluster, on devices
    of compute capability 9.0+. The emulation records each launch's cluster size, so these check that the mode the
    other tests name is the one that ran, as well as the outputs."""

    @pytest.mark.parametrize("row_team", ["cluster_rows"], indirect=True)
    def test_forced_clusters_launch_clusters(self, _cuda_backend, row_team):
        check_routed(5, 37, 1, 4, 3, 0, 0, duplicate=True, mask="some")
        blocks, threads, cluster = _cuda_backend.last_launch()
        assert cluster == 4 and blocks % cluster == 0, (blocks, threads, cluster)  # 10 chunks: 4 pieces
        check_mutual(3, 5, 37)
        assert _cuda_backend.last_launch()[2] == 4

    @pytest.mark.parametrize("row_team", ["cluster_rows"], indirect=True)
    @pytest.mark.parametrize("mix,div", [(0, 1), (1, 0), (2, 3)])
    def test_many_teachers(self, _cuda_backend, row_team, mix, div):
        """Per-slot tables of 200 teachers pass the default 48 KiB of shared memory: the cluster launch opts in."""
        check_routed(2, 50, 1, 200, None, mix, div)
        assert _cuda_backend.last_launch()[2] == 4
        check_routed(3, 300, 1, 64, 64, mix, div, duplicate=True)
        assert _cuda_backend.last_launch()[2] == 4

    @pytest.mark.parametrize("row_team", ["cluster_rows"], indirect=True)
    def test_no_clusters_before_sm90(self, _cuda_backend, row_team):
        _cuda_backend.set_compute_capability_major(8)
        try:
            check_routed(5, 37, 1, 4, 3, 1, 2, mask="some")
            assert _cuda_backend.last_launch()[2] == 1
        finally:
            _cuda_backend.set_compute_capability_major(9)

    @pytest.mark.parametrize("row_team", ["cluster_rows"], indirect=True)
    def test_clusters_take_several_rows(self, _cuda_backend, row_team, monkeypatch):
        """With a workspace of two clusters' slots, two clusters take 7 rows in turn (grid-stride): each row's
        phase 1 writes the slot the cluster's previous row did not use, while a slower block may still read that
        row's records."""
        monkeypatch.setattr(_native, "_row_split_workspace", lambda *args: torch.empty(256, device=DEVICE))
        for mix, div in [(0, 0), (1, 3), (2, 2)]:
            check_routed(7, 37, 1, 4, 3, mix, div, duplicate=True, mask="some", bad_index=True)
            assert _cuda_backend.last_launch()[::2] == (8, 4)  # 2 clusters of 4 (slots of 2 * 4 * 2 * 8 floats)
        check_mutual(3, 7, 37)
        assert _cuda_backend.last_launch()[::2] == (8, 4)  # 2 clusters (slots of 2 * 4 * 2 * 6 floats)

    @pytest.mark.long_rows
    @pytest.mark.parametrize("row_team", ["auto"], indirect=True)
    @pytest.mark.parametrize("mix,div", [(0, 0), (1, 2), (2, 1)])
    def test_automatic_clusters_of_eight(self, _cuda_backend, row_team, mix, div):
        """As many rows as SMs (here 3) of 8 * 2048 classes or more, more of them than the L2 (here 256 KiB) holds
        with a block per row: clusters of 8, one cluster per row while the workspace holds their slots; a row mask
        and a bad index on the way. With the L2 of an H100 the same rows stay whole (a block each)."""
        _cuda_backend.set_sm_count(3)
        _cuda_backend.set_l2_cache_bytes(256 * 1024)
        try:
            check_routed(4, 16411, 1, 3, 2, mix, div, duplicate=True, mask="some", bad_index=True)
            assert _cuda_backend.last_launch()[2] == 8
            check_mutual(2, 3, 16400, layout="misaligned")
            assert _cuda_backend.last_launch()[2] == 8
            _cuda_backend.set_l2_cache_bytes(50 * 1024 * 1024)
            check_routed(4, 16411, 1, 3, 2, mix, div)
            assert _cuda_backend.last_launch()[1:] == (512, 1)  # 4 rows of ~200 KiB fit: a block per row
        finally:
            _cuda_backend.set_sm_count(132)
            _cuda_backend.set_l2_cache_bytes(50 * 1024 * 1024)
