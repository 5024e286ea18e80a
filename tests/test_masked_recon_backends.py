"""masked_reconstruction_loss on every backend against the reference (the torch backend, explicit
backward): value and gradients to pred, target and mask, for every loss x mask kind x reduction x
normalize_target, [N, D] and channel_dim=1 [B, D, H, W] inputs, odd shapes, grad_output != 1;
all-zero masks, row skipping, NaN propagation, no mutation, bf16 accuracy, opcheck of both ops."""

from __future__ import annotations

import itertools

import pytest
import torch
from _utils import assert_scaled_close, backend_params, interpreted, seed_of

import mmfast
from mmfast._native import cuda_row_team
from mmfast.ops import masked_reconstruction as recon_ops
from mmfast.reference.masked_reconstruction import LOSSES

KERNELS = backend_params(("cpu", "triton", "cuda"))
ALL = backend_params(("torch", "cpu", "triton", "cuda"))
MASKS = ("none", "row", "row_bool", "channel", "element", "element_bool")
ROW_MASKS = ("none", "row", "row_bool")
REDUCTIONS = ("mean", "sum", "none")


def make_case(shape, channel_dim, mask_kind, seed, *, device="cpu", dtype=torch.float32):
    """(pred, target, mask) drawn in float64 from ``seed`` and cast. Row masks have at least one
    excluded and one kept row; ``*_bcast`` kinds broadcast over the leading dim."""
    g = torch.Generator().manual_seed(seed)
    P = torch.randn(shape, generator=g, dtype=torch.float64)
    Y = torch.randn(shape, generator=g, dtype=torch.float64) * 0.8 + 0.3
    cd = channel_dim % len(shape)
    row_shape = list(shape)
    row_shape[cd] = 1
    if mask_kind == "none":
        M = None
    elif mask_kind in ("row", "row_bool", "row_zero", "row_bcast"):
        if mask_kind == "row_bcast":
            row_shape[0] = 1
        M = torch.rand(row_shape, generator=g, dtype=torch.float64)
        flat = M.view(-1)
        flat[flat < 0.3] = 0.0
        flat[0] = 0.0
        if flat.numel() > 1:
            flat[-1] = 0.75
        if mask_kind == "row_zero":
            M.zero_()
        if mask_kind == "row_bool":
            M = M > 0
    elif mask_kind == "channel":
        M = torch.rand(shape[cd], generator=g, dtype=torch.float64).reshape((-1,) + (1,) * (len(shape) - cd - 1))
    elif mask_kind in ("element", "element_bool", "element_bcast"):
        el_shape = list(shape)
        if mask_kind == "element_bcast":  # [B, D, 1, 1]: an element mask with zero strides
            el_shape = [shape[0], shape[1]] + [1] * (len(shape) - 2)
        M = torch.rand(el_shape, generator=g, dtype=torch.float64)
        if mask_kind == "element_bool":
            M = M > 0.4
    else:
        raise ValueError(mask_kind)

    def put(t):
        if t is None:
            return None
        return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)

    return put(P), put(Y), put(M)


def run(backend, P, Y, M, grad_out=None, *, target_grad=True, mask_grad=True, **kwargs):
    """(loss, {name: grad}) of masked_reconstruction_loss on ``backend`` (gradients with ``grad_out``)."""
    leaves = {"pred": P.detach().clone().requires_grad_(True)}
    Yl = Y.detach().clone().requires_grad_(target_grad)
    if target_grad:
        leaves["target"] = Yl
    Ml = M
    if M is not None and M.is_floating_point():
        Ml = M.detach().clone().requires_grad_(mask_grad)
        if mask_grad:
            leaves["mask"] = Ml
    with mmfast.use_backend(backend):
        out = mmfast.masked_reconstruction_loss(leaves["pred"], Yl, Ml, **kwargs)
    if grad_out is None:
        go = torch.ones_like(out)
    else:
        gen = torch.Generator().manual_seed(grad_out)
        go = (torch.rand(out.shape, generator=gen, dtype=torch.float64) * 2 + 0.5).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, list(leaves.values()), go)
    return out.detach(), dict(zip(leaves, grads, strict=True))


def assert_matches(backend, device, dtype, P, Y, M, *, rtol=2e-5, atol=2e-5, grad_out=1, what="", **kwargs):
    """Backend vs the reference (torch backend on the same inputs and dtype)."""
    out, grads = run(backend, P, Y, M, grad_out, **kwargs)
    ref_out, ref_grads = run("torch", P.cpu(), Y.cpu(), None if M is None else M.cpu(), grad_out, **kwargs)
    assert out.dtype == P.dtype and out.shape == ref_out.shape
    assert_scaled_close(out, ref_out, rtol, atol, f"{what} loss")
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert grads[name].dtype == ref_grads[name].dtype, name
        assert_scaled_close(grads[name], ref_grads[name], rtol, atol, f"{what} grad {name}")


def _combos(masks):
    for loss, mask, reduction, normalize in itertools.product(LOSSES, masks, REDUCTIONS, (False, True)):
        if loss == "cosine" and mask not in ROW_MASKS:
            continue
        yield loss, mask, reduction, normalize


FLAT = list(_combos(MASKS))


@pytest.mark.parametrize("loss,mask,reduction,normalize", FLAT)
@pytest.mark.parametrize("backend,device,dtype", ALL)
def test_rows_match_reference(backend, device, dtype, loss, mask, reduction, normalize):
    """[N, D] inputs; the torch backend is checked here against a float64 run of itself."""
    seed = seed_of("flat", loss, mask, reduction, normalize)
    P, Y, M = make_case((5, 37), -1, mask, seed, device=device, dtype=dtype)
    kw = dict(loss=loss, reduction=reduction, normalize_target=normalize, beta=0.6)
    if backend == "torch":  # float32 vs float64 of the same reference
        out, grads = run("torch", P, Y, M, seed, **kw)
        out64, grads64 = run("torch", P.double(), Y.double(), None if M is None else M.double() if
                             M.is_floating_point() else M, seed, **kw)
        assert_scaled_close(out, out64, 1e-5, 1e-5, "loss")
        for name in grads:
            assert_scaled_close(grads[name], grads64[name], 1e-5, 1e-5, name)
        return
    assert_matches(backend, device, dtype, P, Y, M, grad_out=seed, **kw)


DENSE = [c for c in _combos(("none", "row", "row_bool", "row_bcast", "channel", "element", "element_bcast"))
         if c[2] != "sum"]


@pytest.mark.parametrize("loss,mask,reduction,normalize", DENSE)
@pytest.mark.parametrize("backend,device,dtype", KERNELS)
def test_channel_dim_1_matches_reference(backend, device, dtype, loss, mask, reduction, normalize):
    """[B, D, H, W] with channel_dim=1: rows are positions, read through the channel stride."""
    if interpreted(backend) and (normalize or reduction == "none") and mask not in ("row", "element_bcast"):
        pytest.skip("interpreter: a representative subset keeps the run short (the cpu backend runs all)")
    _check_channel_dim_1(backend, device, dtype, loss, mask, reduction, normalize)


@pytest.mark.parametrize("loss,mask,reduction,normalize", DENSE)
@pytest.mark.parametrize("backend,device,dtype", backend_params(("cuda",)))
def test_channel_dim_1_block_rows(backend, device, dtype, loss, mask, reduction, normalize):
    """The CUDA kernel's other row team for channel-strided rows: a block per row (by default a thread)."""
    with cuda_row_team(1):
        _check_channel_dim_1(backend, device, dtype, loss, mask, reduction, normalize)


def _check_channel_dim_1(backend, device, dtype, loss, mask, reduction, normalize):
    seed = seed_of("dense", loss, mask, reduction, normalize)
    P, Y, M = make_case((2, 6, 3, 2), 1, mask, seed, device=device, dtype=dtype)
    assert_matches(backend, device, dtype, P, Y, M, grad_out=seed, loss=loss, reduction=reduction,
                   normalize_target=normalize, channel_dim=1, beta=0.6)


ODD = [((1, 1), -1), ((3, 1), -1), ((1, 1271), -1), ((2, 3, 1271), -1), ((1, 1, 1, 1), 1), ((2, 5, 7), 0)]


# The cpu kernel's pixel runs (csrc/cpu/masked_reconstruction.cpp, recon_pixels): channel_dim=1 rows under an
# elementwise loss without normalisation go a channel at a time over runs of up to 4096 pixels, the loss sums in
# blocks of 32 channels when pred's gradient is all that is asked for. Shapes: more channels than a block (70)
# and a sample of more pixels than a run (4160, 4097: two runs; a single sample is split further for the threads).
PIXEL_SHAPES = [(3, 70, 5, 13), (1, 40, 64, 65), (2, 33, 4097)]


@pytest.mark.parametrize("target_grad", [False, True], ids=["pred_grad", "both_grads"])
@pytest.mark.parametrize("mask", ("none", "row", "row_bool", "channel", "element", "element_bool"))
@pytest.mark.parametrize("loss", ["mse", "smooth_l1"])
@pytest.mark.parametrize("shape", PIXEL_SHAPES, ids=["D70", "S4160", "S4097"])
def test_channel_dim_1_pixel_runs(shape, loss, mask, target_grad):
    seed = seed_of("pixels", shape, loss, mask)
    P, Y, M = make_case(shape, 1, mask, seed)
    if mask.startswith("row"):  # excluded pixels are not used: NaN there changes nothing
        P = P.masked_fill(M == 0, float("nan"))
    for reduction in REDUCTIONS:
        assert_matches("cpu", "cpu", torch.float32, P, Y, M, grad_out=seed, loss=loss, reduction=reduction,
                       channel_dim=1, beta=0.6, target_grad=target_grad, mask_grad=False,
                       what=f"{reduction}")


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("backend,device,dtype", KERNELS)
def test_normalized_one_element_rows(backend, device, dtype, loss):
    """D = 1 with normalize_target: the normalised target is the constant 0, so d loss / d target is exactly 0
    (not an ulp of the recomputed gradient times rstd = 1/sqrt(eps)), while a NaN target still gives NaN."""
    P, Y, _ = make_case((4, 1), -1, "none", seed_of("one-element", loss), device=device, dtype=dtype)
    Y = Y.clone()
    Y[2, 0] = float("nan")
    out, grads = run(backend, P, Y, None, 7, loss=loss, normalize_target=True, reduction="none")
    _, ref_grads = run("torch", P.cpu(), Y.cpu(), None, 7, loss=loss, normalize_target=True, reduction="none")
    dy, ref_dy = grads["target"].cpu(), ref_grads["target"]
    assert torch.equal(torch.isnan(dy), torch.isnan(ref_dy)) and bool(torch.isnan(dy[2]).all())
    finite = ~torch.isnan(ref_dy)
    assert bool((dy[finite] == 0).all()), dy


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("shape,channel_dim", ODD)
@pytest.mark.parametrize("backend,device,dtype", KERNELS)
def test_odd_shapes(backend, device, dtype, shape, channel_dim, loss):
    """N = 1, D = 1, D = 1271, [..., D] with extra leading dims, channel_dim=0."""
    seed = seed_of("odd", shape, channel_dim, loss)
    for mask, normalize in (("row", True), ("none", False)):
        P, Y, M = make_case(shape, channel_dim, mask, seed, device=device, dtype=dtype)
        assert_matches(backend, device, dtype, P, Y, M, grad_out=seed, loss=loss, normalize_target=normalize,
                       channel_dim=channel_dim, what=f"{mask} normalize={normalize}")


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("backend,device,dtype", KERNELS)
def test_streamed_rows(backend, device, dtype, loss, monkeypatch):
    """Rows longer than one tile (the Triton kernel streams them; the others see a long row)."""
    import mmfast.triton.masked_reconstruction as triton_recon

    monkeypatch.setattr(triton_recon, "RECON_TILES", (16, 16, 16, 16))
    seed = seed_of("stream", loss)
    for mask, normalize in (("row", True), ("element", False), ("none", True)):
        if loss == "cosine" and mask == "element":
            continue
        P, Y, M = make_case((3, 45), -1, mask, seed, device=device, dtype=dtype)
        assert_matches(backend, device, dtype, P, Y, M, grad_out=seed, loss=loss, normalize_target=normalize,
                       what=f"{mask} normalize={normalize}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend,device,dtype", KERNELS)
def test_target_without_grad(backend, device, dtype, reduction):
    """The usual distillation call (detached target): dY is neither computed nor returned."""
    for loss, normalize in (("mse", True), ("smooth_l1", False), ("cosine", True)):
        P, Y, M = make_case((4, 9), -1, "row", seed_of("detached", loss), device=device, dtype=dtype)
        assert_matches(backend, device, dtype, P, Y, M, grad_out=3, target_grad=False, mask_grad=False,
                       loss=loss, normalize_target=normalize, reduction=reduction)


ELEMENT_MASKS = ("channel", "element", "element_bool", "element_bcast")


@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
@pytest.mark.parametrize("loss", ["mse", "smooth_l1"])
@pytest.mark.parametrize("mask", ELEMENT_MASKS)
@pytest.mark.parametrize("backend,device,dtype", ALL)
def test_element_mask_mean_is_prescaled(backend, device, dtype, mask, loss, normalize, monkeypatch):
    """The "mean" under an element or channel mask that needs no gradient: 1 / sum(M) rides as row weights
    beside the mask (both masks in one op call), so the backward of ``loss.backward()`` makes no pass over the
    gradients. Equal to the plain autograd formula, with grad_output 1 and != 1, on [B, D, H, W] inputs."""
    from mmfast.reference.masked_reconstruction import masked_reconstruction_loss_autograd

    calls = []
    fwd = recon_ops.run_masked_reconstruction_fwd
    monkeypatch.setattr(recon_ops, "run_masked_reconstruction_fwd", lambda *a: calls.append(a) or fwd(*a))
    P, Y, M = make_case((3, 6, 4, 5), 1, mask, seed_of("prescaled", mask, loss), device=device, dtype=dtype)
    kw = dict(loss=loss, normalize_target=normalize, channel_dim=1, beta=0.6)
    for grad_out in (None, 7):
        out, grads = run(backend, P, Y, M, grad_out, mask_grad=False, **kw)
        rows, elems = calls[-1][2], calls[-1][3]
        assert rows is not None and elems is not None  # both masks reached the op
        leaves = {n: t.detach().cpu().double().requires_grad_() for n, t in (("pred", P), ("target", Y))}
        want = masked_reconstruction_loss_autograd(leaves["pred"], leaves["target"], M.cpu().double()
                                                   if M.is_floating_point() else M.cpu(), **kw)
        go = torch.ones_like(want) if grad_out is None else (
            torch.rand(want.shape, generator=torch.Generator().manual_seed(grad_out), dtype=torch.float64) * 2 + 0.5)
        want_grads = torch.autograd.grad(want, list(leaves.values()), go)
        assert_scaled_close(out, want, 2e-5, 2e-5, "loss")
        for (name, got), w in zip(grads.items(), want_grads, strict=True):
            assert_scaled_close(got, w, 2e-5, 2e-5, name)


@pytest.mark.parametrize("backend,device,dtype", ALL)
def test_all_zero_element_mask_is_not_read(backend, device, dtype):
    """An all-zero element mask (no gradient) excludes every row: 0 and zero gradients even where the data is
    NaN (the rows are not read), as for row masks."""
    P, Y, _ = make_case((4, 6), -1, "none", 12, device=device, dtype=dtype)
    P[1, 2] = float("nan")
    Y[3, 0] = float("inf")
    for M in (torch.zeros(4, 6, device=device, dtype=torch.bool), torch.zeros(1, 6, device=device, dtype=dtype)):
        out, grads = run(backend, P, Y, M, 2, mask_grad=False)
        assert out.item() == 0.0
        for name, grad in grads.items():
            assert torch.equal(grad, torch.zeros_like(grad)), name


@pytest.mark.parametrize("mask", ["row_zero", "row_bool_zero", "element_zero"])
@pytest.mark.parametrize("backend,device,dtype", ALL)
def test_all_zero_mask_gives_zero_and_zero_grads(backend, device, dtype, mask):
    P, Y, _ = make_case((4, 6), -1, "none", 11, device=device, dtype=dtype)
    M = {
        "row_zero": torch.zeros(4, 1, device=device, dtype=dtype),
        "row_bool_zero": torch.zeros(4, 1, device=device, dtype=torch.bool),
        "element_zero": torch.zeros(4, 6, device=device, dtype=dtype),
    }[mask]
    for loss in LOSSES:
        if loss == "cosine" and mask == "element_zero":
            continue
        for normalize in (False, True):
            out, grads = run(backend, P, Y, M, 2, loss=loss, normalize_target=normalize)
            assert out.item() == 0.0
            for name, grad in grads.items():
                assert torch.equal(grad, torch.zeros_like(grad)), f"{loss} {name}: {grad}"


@pytest.mark.parametrize("backend,device,dtype", ALL)
def test_excluded_rows_are_not_read(backend, device, dtype):
    """NaN / inf in the rows a row mask excludes never reach the loss or the gradients (they are not
    read); only d loss / d mask of such a row, which is the row's own loss, sees them."""
    P, Y, _ = make_case((5, 8), -1, "none", 5, device=device, dtype=dtype)
    P[1] = float("nan")
    Y[3, 2] = float("inf")
    M = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0], device=device, dtype=dtype)[:, None]
    for loss, normalize, reduction in itertools.product(LOSSES, (False, True), REDUCTIONS):
        kw = dict(loss=loss, normalize_target=normalize, reduction=reduction)
        out, grads = run(backend, P, Y, M, 4, mask_grad=False, **kw)
        assert torch.isfinite(out).all(), kw
        for name, grad in grads.items():
            assert torch.isfinite(grad).all(), (kw, name)
            assert torch.equal(grad[[1, 3]], torch.zeros_like(grad[[1, 3]])), (kw, name)
        if backend != "torch":
            assert_matches(backend, device, dtype, P, Y, M, grad_out=4, mask_grad=False, **kw)
        # a mask that requires grad: the excluded rows' mask gradients read them (NaN there), nothing else
        # changes (up to rounding: "mean" then divides by sum(M) last instead of weighting the rows by M / sum(M))
        out_m, grads_m = run(backend, P, Y, M, 4, **kw)
        assert_scaled_close(out_m, out, 1e-6, 1e-6, f"{kw} loss")
        assert torch.isnan(grads_m["mask"][1]).all() and torch.isfinite(grads_m["mask"][[0, 2, 4]]).all()
        assert_scaled_close(grads_m["pred"], grads["pred"], 1e-6, 1e-6, f"{kw} grad pred")


@pytest.mark.parametrize("backend,device,dtype", ALL)
def test_nan_propagates_as_in_the_reference(backend, device, dtype):
    """A NaN in a kept row (or under an element-mask zero: 0 * NaN) reaches the loss and the
    gradients exactly where the reference puts it; an inf in pred gives inf/NaN as the reference."""
    for mask_kind, loss in (("none", "mse"), ("element", "smooth_l1"), ("row", "cosine"), ("channel", "mse")):
        P, Y, M = make_case((4, 7), -1, mask_kind, 9, device=device, dtype=dtype)
        P[2, 3] = float("nan")
        Y[0, 1] = float("inf")
        if mask_kind == "row":  # keep the rows holding the NaN and the inf
            M[[0, 2]] = 1.0
        for normalize, reduction in itertools.product((False, True), ("sum", "none")):
            kw = dict(loss=loss, normalize_target=normalize, reduction=reduction)
            out, grads = run(backend, P, Y, M, 1, **kw)
            ref_out, ref_grads = run("torch", P.cpu(), Y.cpu(), None if M is None else M.cpu(), 1, **kw)
            assert torch.isnan(out).any() or torch.isinf(out).any()
            assert_scaled_close(out, ref_out, 2e-5, 2e-5, f"{kw} loss")
            for name in grads:
                assert_scaled_close(grads[name], ref_grads[name], 2e-5, 2e-5, f"{kw} {name}")


@pytest.mark.parametrize("backend,device,dtype", ALL)
def test_no_input_is_mutated(backend, device, dtype):
    cases = (("row", "mse", "mean"), ("element", "smooth_l1", "none"), ("row", "cosine", "sum"))
    for mask_kind, loss, reduction in cases:
        P, Y, M = make_case((3, 10), -1, mask_kind, 2, device=device, dtype=dtype)
        P, Y, M = P.requires_grad_(), Y.requires_grad_(), M.requires_grad_()
        before = [(t._version, t.detach().clone()) for t in (P, Y, M)]
        with mmfast.use_backend(backend):
            out = mmfast.masked_reconstruction_loss(P, Y, M, loss=loss, reduction=reduction, normalize_target=True)
        out.sum().backward()
        for t, (version, value) in zip((P, Y, M), before, strict=True):
            assert t._version == version
            assert torch.equal(t.detach(), value)


@pytest.mark.parametrize("backend,device,dtype", ALL)
def test_backward_with_retain_graph(backend, device, dtype):
    """The saved gradients are scaled in place only by a backward that frees the graph: with a
    retained graph every backward gives the same gradients."""
    for mask_kind, reduction in (("element", "none"), ("row", "mean"), ("element", "mean")):
        P, Y, M = make_case((4, 9), -1, mask_kind, 1, device=device, dtype=dtype)
        leaves = [P.requires_grad_(), Y.requires_grad_(), M.requires_grad_()]
        with mmfast.use_backend(backend):
            out = mmfast.masked_reconstruction_loss(P, Y, M, reduction=reduction, normalize_target=True)
        go = torch.rand(out.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype) + 0.5
        first = torch.autograd.grad(out, leaves, go, retain_graph=True)
        second = torch.autograd.grad(out, leaves, go, retain_graph=True)
        last = torch.autograd.grad(out, leaves, go)  # frees the graph: scales in place
        for a, b, c in zip(first, second, last, strict=True):
            assert torch.equal(a, b) and torch.equal(a, c)


def _bf16_error(backend, P64, Y64, M64, kw):
    """Largest |loss - truth| and |grad - truth| of a bf16 run on ``backend``, truth = the float64
    reference on the same (bf16-rounded) inputs."""
    P, Y = P64.to(torch.bfloat16), Y64.to(torch.bfloat16)
    M = None if M64 is None else M64.to(torch.bfloat16)
    out, grads = run(backend, P, Y, M, 7, **kw)
    truth, truth_grads = run("torch", P.double(), Y.double(), None if M is None else M.double(), 7, **kw)
    errs = [(out.double() - truth).abs().max().item()]
    errs += [(grads[k].double() - truth_grads[k]).abs().max().item() for k in ("pred", "target", "mask") if k in grads]
    return errs


@pytest.mark.parametrize("loss", LOSSES)
def test_bf16_accumulates_in_fp32(loss):
    """cpu kernel in bf16: error vs the float64 truth no worse than the torch reference's own bf16 error
    (plus a small tolerance); D = 1271 so that a bf16 accumulator would show."""
    if mmfast.backend_info("cpu")["unavailable_reasons"].get("cpu"):
        pytest.skip("mmfast._C is not built")
    for mask_kind, normalize in (("row", True), ("element" if loss != "cosine" else "row_bool", False)):
        P, Y, M = make_case((6, 1271), -1, mask_kind, seed_of("bf16", loss), dtype=torch.float64)
        kw = dict(loss=loss, normalize_target=normalize, beta=0.5)
        kernel = _bf16_error("cpu", P, Y, M, kw)
        ref = _bf16_error("torch", P, Y, M, kw)
        for k, r in zip(kernel, ref, strict=True):
            assert k <= r * 1.5 + 1e-3, (mask_kind, kernel, ref)


@pytest.mark.parametrize("backend,device,dtype", KERNELS)
def test_half_dtypes_close_to_reference(backend, device, dtype):
    if interpreted(backend):
        pytest.skip("the Triton interpreter runs float32 only")
    for half in (torch.bfloat16, torch.float16):
        for loss, mask_kind in (("mse", "element"), ("smooth_l1", "row"), ("cosine", "row")):
            P, Y, M = make_case((4, 33), -1, mask_kind, 3, device=device, dtype=half)
            assert_matches(backend, device, half, P, Y, M, rtol=2e-2, atol=2e-2, grad_out=1, loss=loss,
                           normalize_target=True)


# opcheck: float64 for torch and cpu, float32 for the kernels
OPCHECK = backend_params(dtypes={"torch": (torch.float64,), "cpu": (torch.float32, torch.float64)})


def _op_args(dtype, device, *, loss, mask, per_element, normalize, need):
    g = torch.Generator().manual_seed(3)
    A, D, S = 2, 5, 3
    P = torch.randn(A, D, S, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_(need[0])
    Y = torch.randn(A, D, S, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_(need[1])
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    rows = elems = None
    if mask == "rows":
        rows = torch.tensor([0.0, 1.0, 0.5, 0.0, 1.0, 0.25], dtype=cdt, device=device).requires_grad_(need[2])
    elif mask == "float":
        elems = torch.rand(A, D, S, generator=g, dtype=torch.float64).to(device, cdt).requires_grad_(need[2])
    elif mask == "bool":
        elems = (torch.rand(1, D, 1, generator=g) > 0.3).to(device).expand(A, D, S)
    elif mask == "rows+bool":  # row weights beside an element mask (a prescaled mean)
        rows = torch.tensor([0.5, 0.0, 0.25, 1.0, 0.5, 0.125], dtype=cdt, device=device)
        elems = torch.rand(A, D, S, generator=g).to(device) > 0.4
    elif mask == "rows+float":
        rows = torch.full((A * S,), 0.1, dtype=cdt, device=device)
        elems = torch.rand(A, D, S, generator=g, dtype=torch.float64).to(device, cdt)
    return (P, Y, rows, elems, LOSSES[loss], 0.5, normalize, 1e-6, per_element,
            recon_ops.grad_mask(need[0], need[1], need[2] and mask in ("rows", "float")))


OP_COMBOS = {
    "mse-none": dict(loss="mse", mask="none", per_element=False, normalize=False, need=(True, True, False)),
    "mse-rows-norm": dict(loss="mse", mask="rows", per_element=False, normalize=True, need=(True, True, True)),
    "smooth-float-elem": dict(loss="smooth_l1", mask="float", per_element=True, normalize=False,
                              need=(True, True, True)),
    "smooth-float": dict(loss="smooth_l1", mask="float", per_element=False, normalize=True, need=(True, False, True)),
    "mse-bool-bcast": dict(loss="mse", mask="bool", per_element=False, normalize=False, need=(True, True, False)),
    "cosine-rows": dict(loss="cosine", mask="rows", per_element=False, normalize=True, need=(True, True, True)),
    "rows-per-element": dict(loss="mse", mask="rows", per_element=True, normalize=False, need=(True, True, True)),
    "no-grad": dict(loss="mse", mask="rows", per_element=False, normalize=False, need=(False, False, False)),
    "rows-beside-bool": dict(loss="mse", mask="rows+bool", per_element=False, normalize=True, need=(True, True, False)),
    "rows-beside-float-elem": dict(loss="smooth_l1", mask="rows+float", per_element=True, normalize=False,
                                   need=(True, True, False)),
}


@pytest.mark.parametrize("backend,device,dtype", ALL)
def test_both_masks_at_the_op(backend, device, dtype):
    """Row weights beside an element mask weight w_r m_i (the reference's own w * m), give no mask sums, and
    refuse a mask gradient (dM has no single meaning then)."""
    args = _op_args(dtype, device, loss="smooth_l1", mask="rows+bool", per_element=False, normalize=False,
                    need=(True, True, False))
    P, Y, rows, elems = args[:4]
    with mmfast.use_backend(backend):
        loss, msum, dp, dy, dm = recon_ops.masked_reconstruction_fwd(*args)
        alone, _, dp_alone, _, _ = recon_ops.masked_reconstruction_fwd(P, Y, None, elems, *args[4:])
    assert msum.numel() == 0 and dm.numel() == 0
    w = rows.reshape(P.shape[0], 1, P.shape[2])
    torch.testing.assert_close(loss, torch.where(rows == 0, 0.0, rows * alone))
    torch.testing.assert_close(dp, torch.where(w == 0, 0.0, w * dp_alone).to(dp.dtype))
    with pytest.raises(ValueError, match="dM cannot be requested"), mmfast.use_backend(backend):
        recon_ops.masked_reconstruction_fwd(P, Y, rows, elems.float(), *args[4:9],
                                            recon_ops.grad_mask(True, True, True))


@pytest.mark.parametrize("combo", list(OP_COMBOS))
@pytest.mark.parametrize("backend,device,dtype", OPCHECK)
def test_opcheck_fwd(backend, device, dtype, combo):
    if interpreted(backend) and combo not in ("mse-rows-norm", "smooth-float-elem", "cosine-rows"):
        pytest.skip("interpreter: three representative combos")
    args = _op_args(dtype, device, **OP_COMBOS[combo])
    with mmfast.use_backend(backend):
        torch.library.opcheck(recon_ops.masked_reconstruction_fwd, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck_bwd(dtype):
    """The backward op is pure PyTorch (no backend dispatch)."""
    A, D, S = 2, 4, 3
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    full, rows, empty = (A, D, S), (A * S,), torch.empty(0, dtype=cdt)
    dp, dy = torch.randn(full).to(dtype), torch.randn(full).to(dtype)
    cases = [
        (torch.randn(rows, dtype=cdt), empty, dp, dy, torch.randn(rows, dtype=cdt), True),  # row mask
        (torch.randn(rows, dtype=cdt), torch.randn(rows, dtype=cdt), dp, empty.to(dtype), torch.randn(full, dtype=cdt),
         False),  # element mask with its mask sums
        (torch.randn(full).to(dtype), empty, dp, dy, torch.randn(full, dtype=cdt), True),  # per element, row mask
        (torch.randn(full).to(dtype), empty, dp, dy, empty, False),  # per element, no mask
    ]
    for grad_loss, grad_msum, p, y, m, row_mask in cases:
        args = (grad_loss, grad_msum, p, y, m, list(full), row_mask)
        torch.library.opcheck(recon_ops.masked_reconstruction_bwd, args)
