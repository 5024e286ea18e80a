"""The fused C++ CPU kernels (``mmfast._C``) against the pure-PyTorch reference, row by row.

Every output (loss, dx, dw, dz; mutual loss and grad) is compared to the reference on the same
inputs: in float64 to ~1e-10, in float32 to fp32 rounding relative to each row's scale, and in
bf16/fp16 by error against a float64 ground truth that must be no worse than the reference's own
error at that precision. NaN and inf positions must match exactly.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from _utils import torch_threads

from mmfast import _native
from mmfast.reference.mutual_kd import mutual_kd_rows as ref_mutual
from mmfast.reference.routed_kd import routed_kd_rows as ref_routed

pytestmark = pytest.mark.skipif(_native.load() is None, reason=f"mmfast._C not built: {_native.load_error()}")

RTOL = {torch.float64: 1e-10, torch.float32: 2e-5}
LOW_PRECISION = (torch.bfloat16, torch.float16)
OUTPUTS = ("loss", "dx", "dw", "dz")
# the class dimension of each output (None: compare against the whole tensor's scale)
CLASS_DIM = {"loss": None, "dx": 1, "dw": None, "dz": 2}


def assert_rows_close(got, ref, class_dim, rtol, what="", unit=0.0):
    """|got - ref| <= rtol * max(max |ref| over the row, unit), with NaN/inf at exactly the same
    places. ``unit`` is the size of the output for a divergence of order 1 (a row whose exact value
    is 0, e.g. C == 1, holds rounding noise only)."""
    assert got.dtype == ref.dtype and got.shape == ref.shape, f"{what}: {got.dtype}{tuple(got.shape)}"
    if ref.numel() == 0:
        return
    g, r = got.double(), ref.double()
    finite = torch.isfinite(r)
    assert torch.equal(torch.isfinite(g), finite), f"{what}: non-finite entries differ"
    assert torch.equal(g[~finite].nan_to_num(0.0), r[~finite].nan_to_num(0.0)), f"{what}: NaN/inf differ"
    rf = torch.where(finite, r, 0.0)
    gf = torch.where(finite, g, 0.0)
    if class_dim is None:
        scale = rf.abs().amax()
    else:
        scale = rf.abs().amax(dim=class_dim, keepdim=True)
    scale = scale.clamp_min(unit)
    err = (gf - rf).abs()
    bound = rtol * scale + 1e-30
    worst = (err / bound).amax().item()
    assert worst <= 1.0, f"{what}: error {worst:.3g}x the bound rtol={rtol:g} x row scale"


def assert_no_worse_than_reference(got, ref, truth, dtype, names, factor=1.0):
    """Each output's max error against the float64 ``truth`` is at most ``factor`` times the reference's own
    error at ``dtype`` plus one ulp of the output's scale. Non-finite entries: the reference's, exactly (the
    errors are taken over the finite ones)."""
    for name, g, r, t in zip(names, got, ref, truth, strict=True):
        assert g.dtype == r.dtype and g.shape == r.shape, name
        if t.numel() == 0:  # an output not requested
            assert g.numel() == 0, name
            continue
        g, r = g.double(), r.double()
        finite = torch.isfinite(r)
        assert torch.equal(torch.isfinite(g), finite), f"{name}: non-finite entries differ"
        assert torch.equal(g[~finite].nan_to_num(0.0), r[~finite].nan_to_num(0.0)), f"{name}: NaN/inf differ"
        finite &= torch.isfinite(t)
        err_ref = (r - t).abs()[finite].amax().item() if finite.any() else 0.0
        err_got = (g - t).abs()[finite].amax().item() if finite.any() else 0.0
        tol = torch.finfo(dtype).eps * (t.abs()[finite].amax().item() if finite.any() else 0.0)
        assert err_got <= factor * err_ref + tol, f"{name}: kernel error {err_got:.3g} vs reference {err_ref:.3g}"


def run_routed(
    x, z, w, idx=None, mask=None, tau=2.0, mix=0, div=0, beta=0.3, scale=None, needs=(True, True, True)
):
    args = (x, z, w, idx, mask, tau, mix, div, beta, tau * tau if scale is None else scale, *needs)
    return ref_routed(*args), _native.routed_kd_rows("cpu", *args)


def check_routed(*args, rtol=None, **kwargs):
    x = args[0]
    tau = kwargs.get("tau", 2.0)
    scale = kwargs.get("scale") or tau * tau
    ref, got = run_routed(*args, **kwargs)
    for name, r, g in zip(OUTPUTS, ref, got, strict=True):
        unit = scale if name in ("loss", "dw") else scale / tau
        assert_rows_close(g, r, CLASS_DIM[name], rtol or RTOL[x.dtype], name, unit)
    return ref, got


def make_inputs(B=5, C=37, E=3, S=1, K=None, sparse=False, dtype=torch.float64, seed=0, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, C, S, generator=g, dtype=torch.float64) * spread).to(dtype)
    z = (torch.randn(E, B, C, S, generator=g, dtype=torch.float64) * spread).to(dtype)
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    if sparse:
        K = K or 2
        idx = torch.randint(0, E, (B, K), generator=g)
        if K > 1:
            idx[0, 1] = idx[0, 0]  # a teacher selected twice: its gradients accumulate
        w = torch.rand(B, K, generator=g, dtype=torch.float64).to(cdt)
    else:
        idx = None
        w = torch.rand(B, E, generator=g, dtype=torch.float64).to(cdt)
    return x, z, w, idx


MIX_DIV = list(itertools.product(range(3), range(4)))
# the gradients requested: (dx, dw, dz); without dz (frozen teachers) mix "loss" with KL takes its own path
ALL_GRADS = (True, True, True)
NO_DZ = (True, True, False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("masked", [False, True], ids=["all", "mask"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("mix,div", MIX_DIV, ids=[f"mix{m}-div{d}" for m, d in MIX_DIV])
def test_routed_matches_reference(mix, div, sparse, masked, dtype):
    x, z, w, idx = make_inputs(B=6, C=53, E=3, sparse=sparse, dtype=dtype, seed=mix * 8 + div)
    mask = torch.tensor([[True], [False], [True], [True], [False], [True]]) if masked else None
    check_routed(x, z, w, idx, mask, mix=mix, div=div)


@pytest.mark.parametrize(
    "needs", [(False, False, False), (True, False, False), (False, True, False), (False, False, True)]
)
@pytest.mark.parametrize("mix", range(3))
def test_routed_optional_gradients(mix, needs):
    x, z, w, idx = make_inputs(B=4, C=19, E=3, sparse=True, dtype=torch.float32)
    check_routed(x, z, w, idx, mix=mix, div=0, needs=needs)


@pytest.mark.parametrize(
    "B,C,E,K,sparse",
    [
        (1, 7, 2, None, False),
        (3, 1, 2, None, False),
        (3, 9, 1, None, False),
        (3, 9, 1, 1, True),
        (41, 1271, 3, None, False),
        (41, 1271, 4, 2, True),
    ],
)
@pytest.mark.parametrize("mix", range(3))
def test_routed_odd_shapes(B, C, E, K, sparse, mix):
    x, z, w, idx = make_inputs(B=B, C=C, E=E, K=K, sparse=sparse, dtype=torch.float32, seed=B + C)
    for div in (0, 2, 3) if B * C < 1000 else (0,):
        check_routed(x, z, w, idx, mix=mix, div=div)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("mix,div", [(0, 0), (1, 1), (2, 2), (0, 3)])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_routed_dense_logits_layout(layout, mix, div, sparse):
    """class_dim=1 logits [B, C, H, W] viewed as [B, C, S] without a copy (S > 1)."""
    g = torch.Generator().manual_seed(mix * 4 + div)
    B, C, H, W, E = 2, 11, 3, 5, 3
    if layout == "nchw":
        x = torch.randn(B, C, H, W, generator=g).flatten(2)
        z = torch.randn(E, B, C, H, W, generator=g).flatten(3)
    else:  # channels last: class stride 1, pixel stride C
        x = torch.randn(B, H, W, C, generator=g).permute(0, 3, 1, 2).flatten(2)
        z = torch.randn(E, B, H, W, C, generator=g).permute(0, 1, 4, 2, 3).flatten(3)
        assert x.stride(1) == 1 and z.stride(2) == 1
    _, _, w, idx = make_inputs(B=B, E=E, sparse=sparse, dtype=torch.float32)
    mask = torch.rand(B, H * W, generator=g) > 0.3
    check_routed(x, z, w, idx, mask, mix=mix, div=div)


def test_routed_non_contiguous_inputs():
    g = torch.Generator().manual_seed(3)
    B, C, E = 6, 29, 3
    x_t = torch.randn(C, B, generator=g).t().unsqueeze(-1)  # transposed: class stride B
    z_t = torch.randn(B, E, C, generator=g).permute(1, 0, 2).unsqueeze(-1)
    x_s = torch.randn(B, 2 * C, generator=g)[:, ::2].unsqueeze(-1)  # sliced: class stride 2
    z_s = torch.randn(E, B, C, 3, generator=g)[..., 1:2]
    w = torch.rand(B, E, generator=g)
    for x, z in ((x_t, z_t), (x_s, z_s), (x_t, z_s)):
        assert not x.is_contiguous()
        for mix, div in ((0, 0), (1, 2), (2, 3)):
            check_routed(x, z, w, mix=mix, div=div)


@pytest.mark.parametrize("tau", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("mix,div", [(0, 0), (0, 1), (1, 2), (2, 3), (2, 1)])
def test_routed_temperatures(tau, mix, div):
    x, z, w, idx = make_inputs(B=5, C=40, E=3, sparse=True, K=3, dtype=torch.float32, seed=7)
    check_routed(x, z, w, idx, tau=tau, mix=mix, div=div, scale=1.0 if tau == 1.0 else None)


@pytest.mark.parametrize("mix,div", MIX_DIV, ids=[f"mix{m}-div{d}" for m, d in MIX_DIV])
def test_routed_zero_and_one_hot_weights(mix, div):
    x, z, w, _ = make_inputs(B=4, C=23, E=3, dtype=torch.float32, seed=11)
    w = torch.zeros_like(w)
    w[1, 0] = 1.0  # one-hot row
    w[2, 2] = 1.0
    w[3] = torch.tensor([0.0, 0.5, 0.5])  # row 0 stays all-zero
    check_routed(x, z, w, mix=mix, div=div)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("mix", range(3))
def test_routed_all_rows_masked_reads_nothing(mix, sparse):
    x, z, w, idx = make_inputs(B=3, C=8, E=2, S=4, sparse=sparse, dtype=torch.float32)
    x.fill_(float("nan"))  # never read: outputs are exact zeros
    z.fill_(float("nan"))
    mask = torch.zeros(3, 4, dtype=torch.bool)
    ref, got = check_routed(x, z, w, idx, mask, mix=mix, div=2)
    for t in got:
        assert torch.equal(t, torch.zeros_like(t))


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bf16", "f16"])
@pytest.mark.parametrize("mix,div", [(0, 0), (0, 1), (0, 3), (1, 2), (2, 0), (2, 3)])
def test_routed_low_precision(dtype, mix, div):
    """Error against a float64 ground truth no worse than the reference's at the same dtype."""
    x, z, w, idx = make_inputs(B=8, C=301, E=3, sparse=True, K=3, dtype=dtype, seed=5, spread=2.0)
    ref, got = run_routed(x, z, w, idx, mix=mix, div=div)
    truth = ref_routed(
        x.double(), z.double(), w.double(), idx, None, 2.0, mix, div, 0.3, 4.0, True, True, True
    )
    assert_no_worse_than_reference(got, ref, truth, dtype, OUTPUTS)


@pytest.mark.parametrize("mix,div", MIX_DIV, ids=[f"mix{m}-div{d}" for m, d in MIX_DIV])
def test_routed_nan_and_inf_inputs(mix, div):
    x, z, w, idx = make_inputs(B=5, C=16, E=3, sparse=True, K=2, dtype=torch.float32, seed=13)
    x[0, 3, 0] = float("nan")  # NaN student logit
    z[:, 1, 5, 0] = float("nan")  # NaN teacher logit (every teacher)
    x[2, :4, 0] = float("-inf")  # -inf logits: q == 0 entries
    z[:, 3, 2:6, 0] = float("-inf")  # P == 0 entries: 0 * log 0 terms are 0, never NaN
    x[4, 7, 0] = float("-inf")
    z[:, 4, 7, 0] = float("-inf")  # both zero at the same class
    check_routed(x, z, w, idx, mix=mix, div=div)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("mix,div", MIX_DIV, ids=[f"mix{m}-div{d}" for m, d in MIX_DIV])
def test_routed_underflowing_probabilities(mix, div, dtype):
    """Logits spread over hundreds: most probabilities underflow to 0 (P == 0 and q == 0 entries,
    a mixture P that underflows where log P does not) and must give the reference's zeros/infs."""
    x, z, w, idx = make_inputs(B=6, C=41, E=3, sparse=True, K=3, dtype=dtype, seed=31, spread=150.0)
    if dtype == torch.float64:
        check_routed(x, z, w, idx, tau=0.5, mix=mix, div=div)
        return
    # fp32: log-probabilities of size ~1e3 cancel down to outputs of size ~1, so rounding errors
    # are ~eps * max|log p| relative to each output; the NaN/inf pattern must match exactly
    ref, got = run_routed(x, z, w, idx, tau=0.5, mix=mix, div=div)
    truth = ref_routed(
        x.double(), z.double(), w.double(), idx, None, 0.5, mix, div, 0.3, 0.25, True, True, True
    )
    condition = 2 * max(x.abs().max().item(), z.abs().max().item()) / 0.5
    for name, r, g, t in zip(OUTPUTS, ref, got, truth, strict=True):
        assert torch.equal(torch.isfinite(g), torch.isfinite(r)), name
        finite = torch.isfinite(t) & torch.isfinite(r)
        err = (g.double() - t).abs()[finite].amax().item()
        unit = 0.25 if name in ("loss", "dw") else 0.25 / 0.5  # scale, scale / tau
        tol = 8 * torch.finfo(torch.float32).eps * condition * max(t[finite].abs().amax().item(), unit)
        assert err <= tol, f"{name}: error {err:.3g} > {tol:.3g}"


# Rows of at least 64 classes with unit stride take each row's max in the exp sweep of the row loaded before it
# (csrc/cpu/row_ops.h, RowSequence): a teacher's during the row before it, a row's student during the previous
# row's last teacher (or model) when one thread computes both rows. A max taken from the wrong row would still give
# a softmax up to rounding, unless rows differ in scale by more than exp's range: then it overflows or underflows.
# The tests run 40 rows on 1 and 2 threads: each thread's chunks then hold several rows (parallel_rows: rows / (threads
# * 8) per chunk), so that rows follow each other in one thread.
OFFSETS = (0.0, 900.0, -700.0, 350.0, -1000.0, 60.0)


def offset_rows(t: torch.Tensor, row_dim: int) -> torch.Tensor:
    """t with row i (along row_dim) shifted by OFFSETS[i % 6] (+ 13 per repetition), each tensor its own."""
    shape = [1] * t.dim()
    shape[row_dim] = t.shape[row_dim]
    offsets = torch.tensor([OFFSETS[i % 6] + 13.0 * (i // 6) for i in range(t.shape[row_dim])], dtype=t.dtype)
    return t + offsets.reshape(shape)


# mix logits sums its teachers' logits (no row sequence among them; with KL its mixture's sweep takes the next row's
# student max ahead: test_routed_mix_logits_kl_rows_far_apart_in_scale)
AHEAD_MIX_DIV = [(m, d) for m, d in MIX_DIV if m != 1]


@pytest.mark.parametrize("needs", [ALL_GRADS, NO_DZ], ids=["dz", "no-dz"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("mix,div", AHEAD_MIX_DIV, ids=[f"mix{m}-div{d}" for m, d in AHEAD_MIX_DIV])
def test_routed_rows_far_apart_in_scale(mix, div, sparse, needs):
    """Student and teacher rows each shifted by up to +-2000 (tau = 2): every row's max is its own, with masked
    rows between them (never read ahead) and rows that follow each other in one thread."""
    x, z, w, idx = make_inputs(B=40, C=97, E=4, K=3, sparse=sparse, dtype=torch.float32, seed=41 + mix)
    x = offset_rows(x, 0)
    z = offset_rows(offset_rows(z, 1), 0)  # each teacher's row: its row's offset plus its teacher's
    mask = torch.ones(40, 1, dtype=torch.bool)
    mask[[3, 4, 9, 38]] = False  # a masked row after an unmasked one, two in a row, one before the last row
    for threads, m in itertools.product((1, 2), (None, mask)):
        with torch_threads(threads):
            ref, got = check_routed(x, z, w, idx, m, mix=mix, div=div, needs=needs)
        assert all(torch.isfinite(t).all() for t in got), "a row's max was taken from another row"


@pytest.mark.parametrize("needs", [ALL_GRADS, NO_DZ], ids=["dz", "no-dz"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_routed_mix_logits_kl_rows_far_apart_in_scale(sparse, needs):
    """Mix logits with KL, rows as in test_routed_rows_far_apart_in_scale: the mixture's sweep takes the next row's
    student max ahead. Mixing logits hundreds apart loses digits in fp32 (there the general path and the reference
    differ by up to 3.4x the 2e-5 row bound of the other tests, dw the most: a dot with such logits), so the values
    are held to the float64 truth: no worse than twice the reference's fp32 error (flash-attention's criterion)."""
    x, z, w, idx = make_inputs(B=40, C=97, E=4, K=3, sparse=sparse, dtype=torch.float32, seed=42)
    x = offset_rows(x, 0)
    z = offset_rows(offset_rows(z, 1), 0)
    mask = torch.ones(40, 1, dtype=torch.bool)
    mask[[3, 4, 9, 38]] = False
    for threads, m in itertools.product((1, 2), (None, mask)):
        with torch_threads(threads):
            ref, got = run_routed(x, z, w, idx, m, mix=1, needs=needs)
        truth = ref_routed(x.double(), z.double(), w.double(), idx, m, 2.0, 1, 0, 0.3, 4.0, *needs)
        assert all(torch.isfinite(t).all() for t in got), "a row's max was taken from another row"
        assert_no_worse_than_reference(got, ref, truth, torch.float32, OUTPUTS, factor=2.0)


@pytest.mark.parametrize("needs", [ALL_GRADS, NO_DZ], ids=["dz", "no-dz"])
@pytest.mark.parametrize("mix", range(3))
def test_routed_masked_rows_are_not_read_ahead(mix, needs):
    """The row after a row is read ahead only when it is not masked: masked rows full of NaN leave every
    output finite (the reference never reads them either)."""
    x, z, w, idx = make_inputs(B=40, C=130, E=3, sparse=True, K=2, dtype=torch.float32, seed=7)
    mask = (torch.arange(40) % 3 != 1).reshape(40, 1)
    mask[20:23] = False
    x[~mask[:, 0]] = float("nan")
    z[:, ~mask[:, 0]] = float("nan")
    for threads in (1, 2):
        with torch_threads(threads):
            ref, got = check_routed(x, z, w, idx, mask, mix=mix, div=0, needs=needs)
        assert all(torch.isfinite(t).all() for t in got)


@pytest.mark.parametrize("needs", [ALL_GRADS, NO_DZ], ids=["dz", "no-dz"])
@pytest.mark.parametrize("mix,div", [(0, 0), (2, 1), (2, 2), (0, 3)])
def test_routed_dense_logits_channels_last_rows_far_apart(mix, div, needs):
    """Channels-last dense logits: a row (b, s) has unit class stride, and the next row is pixel s + 1."""
    g = torch.Generator().manual_seed(mix * 4 + div)
    B, C, H, W, E = 2, 80, 4, 5, 3
    x = offset_rows(torch.randn(B, H * W, C, generator=g), 1).transpose(1, 2)
    z = offset_rows(torch.randn(E, B, H * W, C, generator=g), 2).transpose(2, 3)
    assert x.stride(1) == 1 and z.stride(2) == 1
    _, _, w, idx = make_inputs(B=B, E=E, dtype=torch.float32)
    mask = torch.ones(B, H * W, dtype=torch.bool)
    mask[0, 2] = mask[1, 1] = mask[1, 7] = False
    with torch_threads(1):
        ref, got = check_routed(x, z, w, idx, mask, mix=mix, div=div, needs=needs)
    assert all(torch.isfinite(t).all() for t in got)


# Mix "loss" with KL reads each teacher row in one sweep that keeps its exp row and sums (csrc/cpu/routed_kd.cpp,
# mix_loss_kl): rows the row loop does not pad (64 classes or more, or a multiple of 16 below that: the rows after
# the last whole row tile) whose teacher rows have unit class stride. Its sums run over blocks of 1024 classes; dx
# combines up to four exp rows per pass; with teacher gradients (dz) the sweep also keeps the shifted logits.
# Mix "logits" with KL takes the same sweep over its mixed logits (mix_logits_kl), after one pass that adds up to
# four slots' teacher rows (more: one pass each); with dw or dz it keeps the shifted logits for g. Mix "probs" with
# KL (mix_probs_kl: no dz, at most four distinct teachers in the row; E6 takes the general path) keeps each
# teacher's exps and forms P in one pass, log space where P is not a normal float.
KL_SWEEP_MIXES = pytest.mark.parametrize("mix", [0, 1, 2], ids=["loss", "logits", "probs"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(
    "E,K,sparse",
    [(1, None, False), (2, None, False), (3, None, False), (4, None, False), (6, None, False), (5, 5, True),
     (4, 3, True)],
    ids=["E1", "E2", "E3", "E4", "E6", "top5-of-5", "top3-of-4"],
)
@pytest.mark.parametrize("C", [32, 64, 1000, 2500])
@KL_SWEEP_MIXES
def test_routed_kl_single_sweep(mix, C, E, K, sparse, dtype):
    x, z, w, idx = make_inputs(B=7, C=C, E=E, K=K, sparse=sparse, dtype=dtype, seed=C + E)
    mask = torch.tensor([True, True, False, True, True, False, True]).reshape(7, 1)
    for m, needs, tau in ((None, NO_DZ, 2.0), (mask, NO_DZ, 0.5), (None, (True, False, False), 4.0),
                          (None, (False, True, False), 1.0), (None, (False, False, False), 2.0),
                          (None, ALL_GRADS, 2.0), (mask, ALL_GRADS, 0.5), (None, (False, False, True), 1.0)):
        check_routed(x, z, w, idx, m, tau=tau, mix=mix, needs=needs)


@pytest.mark.parametrize("needs", [ALL_GRADS, NO_DZ], ids=["dz", "no-dz"])
@pytest.mark.parametrize("threads", [1, 2])
@KL_SWEEP_MIXES
def test_routed_kl_single_sweep_nan_inf_and_underflow(mix, threads, needs):
    """NaN, -inf (P == 0, q == 0, both) and probabilities that underflow in rows of the single-sweep path: the
    reference's NaN / inf pattern exactly and its finite values."""
    x, z, w, idx = make_inputs(B=8, C=80, E=3, sparse=True, K=2, dtype=torch.float32, seed=13)
    x[0, 3, 0] = float("nan")
    z[:, 1, 5, 0] = float("nan")
    x[2, :4, 0] = float("-inf")  # q == 0 where P > 0: an infinite divergence
    z[:, 3, 2:6, 0] = float("-inf")  # P == 0: 0 log 0 terms are 0
    x[4, 7, 0] = float("-inf")
    z[:, 4, 7, 0] = float("-inf")  # both zero at the same class
    z[:, 5, 10:, 0] = float("-inf")  # P == 0 from class 10 on, q == 0 from class 40 on: finite
    x[5, 40:, 0] = float("-inf")
    x[6] *= 60.0  # most probabilities of rows 6 and 7 underflow
    z[:, 7] *= 60.0
    with torch_threads(threads):
        if mix == 0:
            ref, got = check_routed(x, z, w, idx, tau=1.0, scale=1.0, needs=needs)
        else:  # rows 6 and 7 are ill-conditioned for the mixture (fp32 dw off by 2e-5 of its scale in the reference)
            ref, got = run_routed(x, z, w, idx, tau=1.0, scale=1.0, mix=mix, needs=needs)
            truth = ref_routed(x.double(), z.double(), w.double(), idx, None, 1.0, mix, 0, 0.3, 1.0, *needs)
            assert_no_worse_than_reference(got, ref, truth, torch.float32, OUTPUTS, factor=2.0)
    loss = got[0].flatten()
    assert torch.isnan(loss[[0, 1]]).all() and torch.isinf(loss[2]) and torch.isfinite(loss[3:]).all()


@pytest.mark.parametrize("needs", [ALL_GRADS, NO_DZ], ids=["dz", "no-dz"])
@pytest.mark.parametrize("mix", [0, 1], ids=["loss", "logits"])  # mix probs: P = sum_k w_k, 1 only up to rounding
def test_routed_kl_single_sweep_one_hot_rows_give_zero_gradient(mix, needs):
    """Student and teachers all one-hot at the same class (every other probability underflows; weights that sum to
    one keep the mixed logits one-hot too): the loss, dx and dz are exactly 0, as the sums cancel exactly
    (q W - sum_k (w_k / Z_k) e_k with Z_k = 1; B_k - p_k (D_k + 1) with B_k = p_k = 1 and D_k = 0)."""
    B, C, E = 3, 100, 4
    x = torch.full((B, C, 1), -200.0)
    z = torch.full((E, B, C, 1), -200.0)
    for b in range(B):
        x[b, 7 * b] = 0.0
        z[:, b, 7 * b] = 0.0
    w = torch.rand(B, E, generator=torch.Generator().manual_seed(0))
    ref, got = check_routed(x, z, w / w.sum(1, keepdim=True), tau=1.0, scale=1.0, mix=mix, needs=needs)
    for name, t in zip(OUTPUTS, got, strict=True):
        if name != "dw":  # dw_k = D_k = 0 too, but it is checked against the reference only
            assert torch.equal(t, torch.zeros_like(t)), name


@pytest.mark.parametrize("needs", [ALL_GRADS, NO_DZ], ids=["dz", "no-dz"])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bf16", "f16"])
@KL_SWEEP_MIXES
def test_routed_kl_single_sweep_low_precision(mix, dtype, needs):
    x, z, w, idx = make_inputs(B=8, C=301, E=3, dtype=dtype, seed=5, spread=2.0)
    ref, got = run_routed(x, z, w, idx, mix=mix, needs=needs)
    truth = ref_routed(x.double(), z.double(), w.double(), idx, None, 2.0, mix, 0, 0.3, 4.0, *needs)
    assert_no_worse_than_reference(got, ref, truth, dtype, OUTPUTS)


# exp of a softmax's shifted logits (csrc/cpu/vec_math.h, exp_nonpos) gives 0 below the smallest normal float,
# exp(t) < 2^-126 for t < -87.34, as the GPU kernels' fast exp does; the reference keeps those subnormals.
@pytest.mark.parametrize("needs", [ALL_GRADS, NO_DZ], ids=["dz", "no-dz"])
@pytest.mark.parametrize("mix,div", MIX_DIV, ids=[f"mix{m}-div{d}" for m, d in MIX_DIV])
def test_routed_probabilities_below_the_normal_range(mix, div, needs):
    """Shifted logits in [-104, -87] (the subnormal band), beyond it, exactly -inf and at the max: values and
    gradients stay within fp32 rounding of the float64 truth, and the zero / inf / NaN pattern is the reference's."""
    g = torch.Generator().manual_seed(mix * 4 + div)
    B, C, E = 4, 96, 2
    band = -torch.linspace(86.0, 106.0, C, dtype=torch.float64)
    x = (band + torch.randn(B, C, generator=g, dtype=torch.float64) * 0.5).float()
    z = (band.flip(0) + torch.randn(E, B, C, generator=g, dtype=torch.float64) * 0.5).float()
    x[:, 0] = z[:, :, 0] = 0.0  # the row max: every other entry's probability is below 2^-126 .. 2^-150
    x[1, 5] = z[:, 1, 5] = float("-inf")
    x, z = x.unsqueeze(-1), z.unsqueeze(-1)
    w = torch.rand(B, E, generator=g)
    ref, got = check_routed(x, z, w, tau=1.0, mix=mix, div=div, needs=needs)
    truth = ref_routed(x.double(), z.double(), w.double(), None, None, 1.0, mix, div, 0.3, 1.0, *needs)
    for name, r, k, t in zip(OUTPUTS, ref, got, truth, strict=True):
        assert torch.equal(torch.isfinite(k), torch.isfinite(r)), name
        if t.numel() == 0:  # an output not requested
            continue
        finite = torch.isfinite(t)
        err = (k.double() - t).abs()[finite].amax().item()
        assert err <= 64 * torch.finfo(torch.float32).eps * max(t[finite].abs().amax().item(), 1.0), name


def test_mutual_probabilities_below_the_normal_range():
    g = torch.Generator().manual_seed(5)
    band = -torch.linspace(86.0, 106.0, 96)
    logits = band + torch.randn(3, 4, 96, generator=g) * 0.5
    logits[:, :, 0] = 0.0
    logits[:, 2, 7] = float("-inf")
    check_mutual(logits, tau=1.0)


@pytest.mark.parametrize("M", [2, 3, 4, 5])
def test_mutual_rows_far_apart_in_scale(M):
    """Each model's row shifted by up to +-2000 (tau = 2), rows of 100 classes: every row's max is its own."""
    g = torch.Generator().manual_seed(11)
    logits = offset_rows(offset_rows(torch.randn(M, 40, 100, generator=g), 1), 0)
    for threads in (1, 2):
        with torch_threads(threads):
            ref, got = check_mutual(logits)
        assert all(torch.isfinite(t).all() for t in got)


@pytest.mark.parametrize("mix", range(3))
def test_routed_bad_index_gives_nan_row(mix):
    x, z, w, idx = make_inputs(B=4, C=12, E=3, sparse=True, K=2, dtype=torch.float32, seed=17)
    idx[1, 0] = 3  # == E
    idx[2, 1] = -1
    idx[3, 0] = 10**12  # would crash if it were dereferenced
    mask = torch.tensor([[True], [True], [False], [True]])  # a bad index wins over the mask
    ref, got = check_routed(x, z, w, idx, mask, mix=mix, div=0)
    loss, dx, dw, dz = got
    assert not loss[0].isnan().any() and loss[1:].isnan().all()
    assert dx[1:].isnan().all() and dw[1:].isnan().all() and not dx[0].isnan().any()


# Row tiles: short rows run a vector of rows at a time (16 rows in fp32, 8 in
# fp64); a tile with a masked row or a bad index runs row by row. Every case runs both ways (tiles
# forced for any C, then never), each against the reference.
ALWAYS_TILE = 1 << 40


def check_both_paths(*args, **kwargs):
    with _native.cpu_row_tile_max_classes(ALWAYS_TILE):
        ref, tiled = check_routed(*args, **kwargs)
    with _native.cpu_row_tile_max_classes(0):
        _, rows = check_routed(*args, **kwargs)
    return ref, tiled, rows


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("C", [1, 10, 63])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("mix,div", MIX_DIV, ids=[f"mix{m}-div{d}" for m, d in MIX_DIV])
def test_routed_row_tiles_match_reference(mix, div, sparse, C, dtype):
    # 37 rows: whole tiles and a remainder; row 20 masked: its tile runs row by row
    x, z, w, idx = make_inputs(B=37, C=C, E=3, sparse=sparse, K=3, dtype=dtype, seed=C * 8 + div)
    mask = torch.ones(37, 1, dtype=torch.bool)
    mask[20] = False
    check_both_paths(x, z, w, idx, mask, mix=mix, div=div)
    check_both_paths(x, z, w, idx, mix=mix, div=div, needs=(True, False, False))
    check_both_paths(x, z, w, idx, mix=mix, div=div, needs=(False, True, True))


def test_row_tile_knob_is_restored():
    from mmfast import _C

    assert _C.cpu_row_tile_max_classes() == -1  # each kernel's own bound
    with _native.cpu_row_tile_max_classes(5):
        assert _C.cpu_row_tile_max_classes() == 5
        with pytest.raises(RuntimeError, match="inner"), _native.cpu_row_tile_max_classes(0):
            assert _C.cpu_row_tile_max_classes() == 0
            raise RuntimeError("inner")
        assert _C.cpu_row_tile_max_classes() == 5
    assert _C.cpu_row_tile_max_classes() == -1


@pytest.mark.parametrize("mix", range(3))
def test_routed_row_tiles_are_taken(mix):
    """The two paths round differently (the tiles take a vectorized log of each softmax sum), so
    identical bits would mean the tiles never ran; by default 10-class rows are tiled."""
    x, z, w, idx = make_inputs(B=256, C=10, E=3, dtype=torch.float32, seed=2)
    _, tiled, rows = check_both_paths(x, z, w, idx, mix=mix, div=0)
    assert not torch.equal(tiled[0], rows[0])  # the loss (dx does not depend on the log)
    _, default = run_routed(x, z, w, idx, mix=mix, div=0)
    assert all(torch.equal(a, b) for a, b in zip(default, tiled, strict=True))


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("mix,div", [(0, 0), (1, 1), (0, 2), (1, 3), (2, 0), (2, 1)])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_routed_row_tiles_dense_logits(layout, mix, div, sparse):
    """class_dim=1 logits with 21 pixels per sample: tiles straddle samples, pixel stride 1 or C."""
    g = torch.Generator().manual_seed(mix * 4 + div)
    B, C, H, W, E = 3, 7, 3, 7, 3
    if layout == "nchw":
        x = torch.randn(B, C, H, W, generator=g).flatten(2)
        z = torch.randn(E, B, C, H, W, generator=g).flatten(3)
    else:
        x = torch.randn(B, H, W, C, generator=g).permute(0, 3, 1, 2).flatten(2)
        z = torch.randn(E, B, H, W, C, generator=g).permute(0, 1, 4, 2, 3).flatten(3)
    _, _, w, idx = make_inputs(B=B, E=E, sparse=sparse, dtype=torch.float32)
    check_both_paths(x, z, w, idx, mix=mix, div=div)
    mask = torch.rand(B, H * W, generator=g) > 0.1
    check_both_paths(x, z, w, idx, mask, mix=mix, div=div)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("mix,div", [(0, 0), (1, 1), (2, 2), (0, 3), (2, 0)])
def test_routed_row_tiles_nchw_whole_tiles(mix, div, sparse, dtype):
    """NCHW dense logits with 48 pixels per sample: every tile holds 16 (8 in float64) neighbouring pixels of one
    sample, so each class is loaded and its gradients (dx, dw, and dz, added into with sparse routing) stored as
    whole vectors (row_tiles.h, consecutive_lanes); a masked pixel sends its tile to the row path."""
    g = torch.Generator().manual_seed(mix * 4 + div)
    B, C, H, W, E = 2, 9, 4, 12, 3
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64).flatten(2).to(dtype)
    z = torch.randn(E, B, C, H, W, generator=g, dtype=torch.float64).flatten(3).to(dtype)
    wdtype = torch.float64 if dtype == torch.float64 else torch.float32
    _, _, w, idx = make_inputs(B=B, E=E, sparse=sparse, dtype=wdtype)
    mask = torch.ones(B, H * W, dtype=torch.bool)
    mask[1, 20] = False
    for m in (None, mask):
        if dtype == torch.bfloat16:
            with _native.cpu_row_tile_max_classes(ALWAYS_TILE):
                ref, got = run_routed(x, z, w, idx, m, mix=mix, div=div)
            truth = ref_routed(x.double(), z.double(), w.double(), idx, m, 2.0, mix, div, 0.3, 4.0, True, True, True)
            assert_no_worse_than_reference(got, ref, truth, dtype, OUTPUTS)
        else:
            check_both_paths(x, z, w, idx, m, mix=mix, div=div)


@pytest.mark.parametrize("mix,div", MIX_DIV, ids=[f"mix{m}-div{d}" for m, d in MIX_DIV])
def test_routed_row_tiles_nan_inf_and_underflow(mix, div):
    """A NaN, inf or underflowing entry affects its own lane only, as in the row path."""
    x, z, w, idx = make_inputs(B=32, C=12, E=3, sparse=True, K=2, dtype=torch.float32, seed=13)
    x[0, 3, 0] = float("nan")
    z[:, 5, 5, 0] = float("nan")
    x[9, :4, 0] = float("-inf")
    z[:, 17, 2:6, 0] = float("-inf")
    x[20, 7, 0] = float("-inf")
    z[:, 20, 7, 0] = float("-inf")
    check_both_paths(x, z, w, idx, mix=mix, div=div)
    x, z, w, idx = make_inputs(B=32, C=12, E=3, sparse=True, K=3, dtype=torch.float64, seed=31, spread=150.0)
    check_both_paths(x, z, w, idx, tau=0.5, mix=mix, div=div)


@pytest.mark.parametrize("mix", range(3))
def test_routed_row_tiles_bad_index(mix):
    x, z, w, idx = make_inputs(B=48, C=9, E=3, sparse=True, K=2, dtype=torch.float32, seed=17)
    idx[18, 0] = 3  # the second tile runs row by row: row 18 is NaN, its neighbours are not
    idx[40, 1] = 10**12
    ref, tiled, rows = check_both_paths(x, z, w, idx, mix=mix, div=0)
    loss = tiled[0].flatten()
    assert loss[[18, 40]].isnan().all() and not loss[:18].isnan().any() and not loss[19:40].isnan().any()


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bf16", "f16"])
@pytest.mark.parametrize("mix,div", [(0, 0), (0, 1), (1, 2), (1, 3), (2, 0), (2, 1)])
def test_routed_row_tiles_low_precision(dtype, mix, div):
    x, z, w, idx = make_inputs(B=40, C=21, E=3, sparse=True, K=3, dtype=dtype, seed=5, spread=2.0)
    truth = ref_routed(x.double(), z.double(), w.double(), idx, None, 2.0, mix, div, 0.3, 4.0, True, True, True)
    ref, got = run_routed(x, z, w, idx, mix=mix, div=div)
    assert_no_worse_than_reference(got, ref, truth, dtype, OUTPUTS)


# Packed tiles (row_tiles.h, packed_rows): a tile's rows side by side in memory go through R x R transposes,
# R classes at a time (R = 16 in fp32, bf16 and fp16, 8 in fp64); a partial chunk's row vectors are stored whole
# where they stay inside the tile, spilling onto the next rows' first classes (stored again after), and only the
# last rows store their own classes alone. Class counts around the chunk boundaries; batches that end on a
# whole tile (its last row ends the tensor) and that do not.
PACKED_TILE_CLASSES = [2, 5, 7, 8, 9, 15, 16, 17, 20, 33, 40, 64, 100]


@pytest.mark.parametrize("B", [32, 37])
@pytest.mark.parametrize("C", PACKED_TILE_CLASSES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_routed_packed_tiles(dtype, C, B):
    x, z, w, idx = make_inputs(B=B, C=C, E=2, dtype=dtype, seed=C + B)
    for mix in range(3):
        check_both_paths(x, z, w, idx, mix=mix, div=0)  # dense routing: dz stored packed too
        check_both_paths(x, z, w, idx, mix=mix, div=0, needs=NO_DZ)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bf16", "f16"])
@pytest.mark.parametrize("C", [5, 16, 20, 40])
def test_routed_packed_tiles_low_precision(dtype, C):
    x, z, w, idx = make_inputs(B=32, C=C, E=2, dtype=dtype, seed=C, spread=2.0)
    for mix in range(3):
        truth = ref_routed(x.double(), z.double(), w.double(), idx, None, 2.0, mix, 0, 0.3, 4.0, True, True, True)
        with _native.cpu_row_tile_max_classes(ALWAYS_TILE):
            ref, got = run_routed(x, z, w, idx, mix=mix, div=0)
        assert_no_worse_than_reference(got, ref, truth, dtype, OUTPUTS)


@pytest.mark.parametrize("C", [1, 5, 9, 17])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
def test_routed_packed_tiles_write_only_their_rows(dtype, C):
    """dx and dz as the leading elements of larger buffers: the stores of the last tile (whose last row ends
    the tensor) leave the elements after it as they were, and write what the kernel writes into buffers of
    their own size."""
    from mmfast import _C

    B, E = 32, 2
    x, z, w, _ = make_inputs(B=B, C=C, E=E, dtype=dtype, seed=3)
    sentinel = 7.0
    dx_buf = torch.full((B * C + 64,), sentinel, dtype=dtype)
    dz_buf = torch.full((E * B * C + 64,), sentinel, dtype=dtype)
    dx, dz = dx_buf[: B * C].view(B, C, 1), dz_buf[: E * B * C].view(E, B, C, 1)
    loss = torch.empty(B, 1, dtype=w.dtype)
    dw = torch.empty(B, 1, E, dtype=w.dtype)
    with _native.cpu_row_tile_max_classes(ALWAYS_TILE):
        _C.routed_kd_cpu(_native.routed_kd_params(x, z, w, None, None, 2.0, 0, 0, 0.3, 4.0, loss, dx, dw, dz), 2)
        _, own = run_routed(x, z, w)  # the same kernel into buffers of its own
    assert torch.equal(dx_buf[B * C :], torch.full((64,), sentinel, dtype=dtype))
    assert torch.equal(dz_buf[E * B * C :], torch.full((64,), sentinel, dtype=dtype))
    assert torch.equal(dx, own[1]) and torch.equal(dz, own[3])


@pytest.mark.parametrize("B,C", [(37, 300), (517, 10)], ids=["rows", "tiles"])
@pytest.mark.parametrize("mix", range(3))
def test_routed_thread_count_does_not_change_results(B, C, mix):
    """Rows are independent, and a row's path (row tile or row loop) depends on its index only: any
    partition over threads gives the same bits."""
    from mmfast import _C

    x, z, w, idx = make_inputs(B=B, C=C, E=3, sparse=True, K=2, dtype=torch.float32, seed=19)
    mask = torch.rand(B, 1, generator=torch.Generator().manual_seed(5)) > 0.05
    results = []
    for threads in (1, 2, 3, 7, 0):
        loss = torch.empty(B, 1)
        dx = torch.empty_like(x)
        dw = torch.empty(B, 1, 2)
        dz = torch.zeros_like(z)
        params = _native.routed_kd_params(x, z, w, idx, mask, 2.0, mix, 0, 0.3, 4.0, loss, dx, dw, dz)
        _C.routed_kd_cpu(params, threads)
        results.append((loss, dx, dw, dz))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


def test_mutual_thread_count_does_not_change_results():
    from mmfast import _C

    logits = torch.randn(3, 517, 10, generator=torch.Generator().manual_seed(3))
    results = []
    for threads in (1, 2, 3, 7, 0):
        loss = torch.empty(517)
        grad = torch.empty_like(logits)
        _C.mutual_kd_cpu(_native.mutual_kd_params(logits, 2.0, 4.0, loss, grad), threads)
        results.append((loss, grad))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


def test_routed_rejects_unknown_codes():
    from mmfast import _C

    x, z, w, _ = make_inputs(B=2, C=4, E=2, dtype=torch.float32)
    loss = torch.empty(2, 1)
    for mix, div in ((3, 0), (0, 4)):
        params = _native.routed_kd_params(
            x, z, w, None, None, 1.0, mix, div, 0.5, 1.0, loss, None, None, None
        )
        with pytest.raises(ValueError, match="unknown"):
            _C.routed_kd_cpu(params, 1)


def check_mutual(logits, tau=2.0, scale=None, need_grad=True, rtol=None):
    scale = tau * tau if scale is None else scale
    ref = ref_mutual(logits, tau, scale, need_grad)
    got = _native.mutual_kd_rows("cpu", logits, tau, scale, need_grad)
    assert_rows_close(got[0], ref[0], None, rtol or RTOL[logits.dtype], "loss", scale)
    assert_rows_close(got[1], ref[1], 2, rtol or RTOL[logits.dtype], "grad", scale / tau)
    return ref, got


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("M,N,C", [(1, 3, 5), (2, 7, 33), (3, 41, 1271), (4, 1, 1), (2, 5, 1)])
@pytest.mark.parametrize("tau", [0.5, 1.0, 4.0])
def test_mutual_matches_reference(M, N, C, tau, dtype):
    g = torch.Generator().manual_seed(M * 100 + C)
    logits = (torch.randn(M, N, C, generator=g, dtype=torch.float64) * 3).to(dtype)
    check_mutual(logits, tau=tau)
    check_mutual(logits, tau=tau, need_grad=False)


def test_mutual_strides_and_edge_values():
    g = torch.Generator().manual_seed(23)
    logits = torch.randn(6, 3, 40, generator=g).permute(1, 2, 0)[..., ::2]  # [3, 40, 3], strided
    assert not logits.is_contiguous()
    check_mutual(logits)
    edge = torch.randn(3, 4, 9, generator=g)
    edge[0, 0, 2] = float("nan")
    edge[:, 1, :3] = float("-inf")  # p == 0 in every model
    edge[1, 2, 4] = float("-inf")  # p == 0 in one model only: its loss is +inf
    check_mutual(edge)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bf16", "f16"])
@pytest.mark.parametrize("M,N,C", [(3, 16, 257), (2, 16, 257), (4, 16, 257), (3, 48, 21)],
                         ids=["rows", "rows-M2", "rows-M4", "tiles"])
def test_mutual_low_precision(dtype, M, N, C):
    g = torch.Generator().manual_seed(29)
    logits = (torch.randn(M, N, C, generator=g, dtype=torch.float64) * 2).to(dtype)
    ref = ref_mutual(logits, 2.0, 4.0, True)
    got = _native.mutual_kd_rows("cpu", logits, 2.0, 4.0, True)
    truth = ref_mutual(logits.double(), 2.0, 4.0, True)
    assert_no_worse_than_reference(got, ref, truth, dtype, ("loss", "grad"))


# Unpadded rows (64 classes or more, or a multiple of 16 outside row tiles) of 2 to 4 models with unit class stride
# take a path of their own (csrc/cpu/mutual_kd.cpp, mutual_row_fixed): the last model's sweep also forms every R_i,
# and one pass writes all the models' gradients.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("C", [32, 64, 1000, 2500])
def test_mutual_fixed_model_counts(C, M, dtype):
    g = torch.Generator().manual_seed(M * 10 + C)
    logits = (torch.randn(M, 9, C, generator=g, dtype=torch.float64) * 3).to(dtype)
    for tau in (0.5, 4.0):
        check_mutual(logits, tau=tau)
    check_mutual(logits, need_grad=False)
    strided = (torch.randn(M, 9, 2 * C, generator=g, dtype=torch.float64) * 3).to(dtype)[..., ::2]
    check_mutual(strided)  # class stride 2: the general row loop


@pytest.mark.parametrize("M", [2, 3, 4])
def test_mutual_fixed_edge_values(M):
    """NaN, -inf in every model (p == 0 everywhere there), in one model only (an infinite divergence), and rows
    whose probabilities mostly underflow: the reference's NaN / inf pattern exactly and its finite values."""
    g = torch.Generator().manual_seed(M)
    logits = torch.randn(M, 6, 80, generator=g)
    logits[0, 0, 2] = float("nan")
    logits[:, 1, :3] = float("-inf")
    logits[M - 1, 2, 4] = float("-inf")
    logits[:, 3, 40:] = float("-inf")
    logits[:, 4] *= 60.0
    ref, got = check_mutual(logits, tau=1.0)
    loss = got[0]
    assert torch.isnan(loss[0]) and torch.isinf(loss[2]) and torch.isfinite(loss[[1, 3, 4, 5]]).all()


def check_mutual_both_paths(logits, **kwargs):
    with _native.cpu_row_tile_max_classes(ALWAYS_TILE):
        ref, tiled = check_mutual(logits, **kwargs)
    with _native.cpu_row_tile_max_classes(0):
        _, rows = check_mutual(logits, **kwargs)
    return ref, tiled, rows


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("M,N,C", [(2, 37, 1), (3, 37, 10), (2, 40, 63), (1, 17, 5)])
def test_mutual_row_tiles(M, N, C, dtype):
    """Row tiles (16 rows in fp32, 8 in fp64) and the remainder rows, both paths vs the reference."""
    g = torch.Generator().manual_seed(M * 100 + C)
    logits = (torch.randn(M, N, C, generator=g, dtype=torch.float64) * 3).to(dtype)
    check_mutual_both_paths(logits)
    check_mutual_both_paths(logits, need_grad=False)
    strided = (torch.randn(N, 2 * C, M, generator=g, dtype=torch.float64) * 3).to(dtype).permute(2, 0, 1)[..., ::2]
    check_mutual_both_paths(strided, tau=0.5)


@pytest.mark.parametrize("N", [32, 37])
@pytest.mark.parametrize("C", PACKED_TILE_CLASSES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_mutual_packed_tiles(dtype, C, N):
    """Row-major logits: packed tiles (see test_routed_packed_tiles), both paths vs the reference."""
    logits = (torch.randn(3, N, C, generator=torch.Generator().manual_seed(C + N), dtype=torch.float64) * 3).to(dtype)
    check_mutual_both_paths(logits)


def test_mutual_row_tiles_are_taken():
    """The paths round differently (a vectorized log per softmax sum): identical bits would mean the
    tiles never ran."""
    logits = torch.randn(3, 512, 10, generator=torch.Generator().manual_seed(1)) * 3
    _, tiled, rows = check_mutual_both_paths(logits)
    assert not torch.equal(tiled[0], rows[0])
    default = _native.mutual_kd_rows("cpu", logits, 2.0, 4.0, True)
    assert all(torch.equal(a, b) for a, b in zip(default, tiled, strict=True))


def test_mutual_row_tiles_edge_values():
    g = torch.Generator().manual_seed(23)
    edge = torch.randn(3, 32, 9, generator=g)
    edge[0, 0, 2] = float("nan")
    edge[:, 17, :3] = float("-inf")
    edge[1, 20, 4] = float("-inf")
    check_mutual_both_paths(edge)
