"""The score-distillation ops on every backend: opcheck, values and every gradient against the float64
reference through the public functions (odd shapes, layouts, reductions, flags, grad_output != 1),
no mutation of inputs, bf16 accuracy, and torch.compile(fullgraph) of a distillation step."""

from __future__ import annotations

import math

import pytest
import torch
from _utils import backend_params, check_in_place_backward, interpreted, seed_of

import mmfast
from mmfast.ops import fake_score as fake_score_ops
from mmfast.ops import fdistill as fdistill_ops
from mmfast.ops import uni_instruct as uni_instruct_ops
from mmfast.reference import fdiv as fdiv_ref
from mmfast.reference.routed_kd import compute_dtype

F64 = torch.float64
OPCHECK = backend_params(dtypes={"torch": (F64,), "cpu": (torch.float32, F64)})
BACKENDS = backend_params(dtypes={"cpu": (torch.float32, F64)})
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), F64: dict(rtol=1e-10, atol=1e-12)}


def _t(g, *shape):
    return torch.randn(*shape, generator=g, dtype=F64)


def _ratio(g, B):
    return torch.exp(torch.empty(B, dtype=F64).uniform_(math.log(0.1), math.log(20.0), generator=g))


# ----------------------------------------------------------------------------------------------
# opcheck


@pytest.mark.parametrize("need_dx", [True, False])
@pytest.mark.parametrize("backend,device,dtype", OPCHECK)
def test_opcheck_fdistill(backend, device, dtype, need_dx):
    g = torch.Generator().manual_seed(1)
    x, a, b = (_t(g, 3, 7).to(device, dtype) for _ in range(3))
    x.requires_grad_(need_dx)
    h = _ratio(g, 3).to(device, compute_dtype(dtype))
    with mmfast.use_backend(backend):
        torch.library.opcheck(fdistill_ops.fdistill_fwd, (x, a, b, h, 0.25, need_dx))


UNI_OPCHECK = {
    "all-grads": dict(fgm=True, di=True, norm=False, need=(True, True, True), alpha=0.5),
    "batch-norm-dx": dict(fgm=False, di=True, norm=True, need=(True, False, False), alpha=1.0),
    "no-di-dadb": dict(fgm=True, di=False, norm=False, need=(False, True, True), alpha=0.0),
}


@pytest.mark.parametrize("combo", list(UNI_OPCHECK))
@pytest.mark.parametrize("backend,device,dtype", OPCHECK)
def test_opcheck_uni_instruct(backend, device, dtype, combo):
    c = UNI_OPCHECK[combo]
    g = torch.Generator().manual_seed(2)
    x, a, b = (_t(g, 3, 7).to(device, dtype) for _ in range(3))
    for t, n in zip((x, a, b), c["need"], strict=True):
        t.requires_grad_(n)
    cdt = compute_dtype(dtype)
    coef = torch.stack(fdiv_ref.fdiv_coefficients(_ratio(g, 3), "js"), dim=1).to(device, cdt)
    norm = torch.tensor([1.5], dtype=cdt, device=device) if c["norm"] else None
    args = (x, a, b, coef, norm, c["alpha"], 0.5, c["fgm"], c["di"], uni_instruct_ops.grad_mask(*c["need"]))
    with mmfast.use_backend(backend):
        torch.library.opcheck(uni_instruct_ops.uni_instruct_fwd, args)


@pytest.mark.parametrize("backend,device,dtype", OPCHECK)
def test_opcheck_fake_score(backend, device, dtype):
    g = torch.Generator().manual_seed(3)
    b, x = (_t(g, 4, 5).to(device, dtype) for _ in range(2))
    b.requires_grad_(True)
    lam = fdiv_ref.edm_weight(_ratio(g, 4), 0.5).to(device, compute_dtype(dtype))
    with mmfast.use_backend(backend):
        torch.library.opcheck(fake_score_ops.fake_score_fwd, (b, x, lam, 0.25, True))


@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16])
def test_opcheck_backward_ops(dtype):
    g = torch.Generator().manual_seed(4)
    gl = _t(g, 3).to(compute_dtype(dtype))
    grad = _t(g, 3, 5).to(dtype)
    for op in (fdistill_ops.fdistill_bwd, uni_instruct_ops.uni_instruct_bwd, fake_score_ops.fake_score_bwd):
        torch.library.opcheck(op, (gl, grad))


# ----------------------------------------------------------------------------------------------
# every backend against the float64 reference through the public functions


# shape, layout of (x, teacher_x0, fake_x0): "contiguous", "channels_last", "mixed" (x channels_last, the
# others contiguous), "rowpad" (rows of a wider buffer), "sliced" (not dense: copied)
CASES = {
    "B1-D1": ((1, 1), "contiguous"),
    "B1-3d": ((1, 2, 3), "contiguous"),
    "D1271": ((3, 1271), "contiguous"),
    "channels_last": ((2, 3, 4, 5), "channels_last"),
    "mixed-layouts": ((3, 2, 3, 3), "mixed"),
    "row-padding": ((4, 9), "rowpad"),
    "non-dense": ((2, 3, 8), "sliced"),
}


def _samples(case, seed, device, dtype, n=3):
    shape, layout = CASES[case]
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        if layout == "rowpad":
            t = _t(g, shape[0], shape[1] + 5)[:, 2 : 2 + shape[1]]
        elif layout == "sliced":
            t = _t(g, *shape[:-1], 2 * shape[-1])[..., ::2]
        else:
            t = _t(g, *shape)
        t = t.to(device, dtype)
        if layout == "channels_last" or (layout == "mixed" and i == 0):
            t = t.to(memory_format=torch.channels_last)
        out.append(t)
    return out


def _run(fn, tensors, wants_grad, grad_out):
    """Value and gradients of ``fn(*leaves)`` for the tensors flagged in ``wants_grad``."""
    leaves = [t.detach().clone(memory_format=torch.preserve_format).requires_grad_(w)
              for t, w in zip(tensors, wants_grad, strict=True)]
    out = fn(*leaves)
    go = torch.full_like(out, grad_out) if out.dim() == 0 else torch.linspace(-1.5, 2.0, out.numel()).to(out)
    targets = [leaf for leaf, w in zip(leaves, wants_grad, strict=True) if w]
    grads = torch.autograd.grad(out, targets, go) if targets else ()
    return out.detach(), grads


def _compare(backend, device, dtype, fn, tensors, wants_grad, what, grad_out=1.7):
    got, ggot = None, None
    with mmfast.use_backend(backend):
        got, ggot = _run(fn, [t.to(device, dtype) for t in tensors], wants_grad, grad_out)
    with mmfast.use_backend("torch"):
        want, gwant = _run(fn, [t.to("cpu", F64) for t in tensors], wants_grad, grad_out)
    tol = TOL[dtype]
    assert got.dtype == dtype, what
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.cpu().double(), want, rtol=tol["rtol"], atol=tol["atol"] * scale,
                               equal_nan=True, msg=lambda m: f"{what} loss: {m}")
    for i, (g_, w_) in enumerate(zip(ggot, gwant, strict=True)):
        assert g_.shape == w_.shape and g_.dtype == dtype, (what, i)
        s = max(1.0, w_.abs().max().item())
        torch.testing.assert_close(g_.cpu().double(), w_, rtol=tol["rtol"], atol=tol["atol"] * s,
                                   msg=lambda m, i=i: f"{what} grad {i}: {m}")
    return ggot


def _keep_cases(backend):
    """Under the Triton interpreter skip the wide row (slow); every other backend runs all cases."""
    return [c for c in CASES if not (interpreted(backend) and c == "D1271")]


@pytest.mark.parametrize("backend,device,dtype", BACKENDS)
def test_fdistill_matches_reference(backend, device, dtype):
    for case in _keep_cases(backend):
        x, a, b = _samples(case, seed_of("fd", case), "cpu", F64)
        h = _ratio(torch.Generator().manual_seed(seed_of("h", case)), x.shape[0])
        for reduction in ("mean", "sum", "none"):
            grads = _compare(
                backend, device, dtype,
                lambda x_, a_, b_, r=reduction, h=h: mmfast.fdistill_loss(x_, a_, b_, h.to(x_.device), reduction=r),
                (x, a, b), (True, False, False), f"fdistill {case} {reduction}",
            )
            if CASES[case][1] in ("channels_last", "mixed"):  # gradient in x's layout
                assert grads[0].is_contiguous(memory_format=torch.channels_last)


# (fgm, di, di_norm, alpha, reduction, wants_grad of x, teacher_x0, fake_x0)
UNI_CASES = [
    (False, True, "sample", 1.0, "mean", (True, True, True)),
    (True, True, "batch", 0.5, "none", (True, True, True)),
    (True, False, "sample", 0.0, "sum", (True, False, True)),
    (False, False, "sample", 0.5, "none", (False, True, False)),
    (True, True, "sample", 0.0, "mean", (True, False, False)),
]


@pytest.mark.parametrize("backend,device,dtype", BACKENDS)
def test_uni_instruct_matches_reference(backend, device, dtype):
    for k, case in enumerate(_keep_cases(backend)):
        x, a, b = _samples(case, seed_of("ui", case), "cpu", F64)
        r = _ratio(torch.Generator().manual_seed(seed_of("r", case)), x.shape[0])
        for j, (fgm, di, di_norm, alpha, reduction, wants) in enumerate(UNI_CASES):
            div = tuple(fdiv_ref.DIVERGENCES)[(k + j) % 8]

            def fn(x_, a_, b_, r=r, div=div, fgm=fgm, di=di, di_norm=di_norm, alpha=alpha, reduction=reduction):
                return mmfast.uni_instruct_loss(x_, a_, b_, r.to(x_.device), div, alpha, fgm, di, di_norm, reduction)

            grads = _compare(backend, device, dtype, fn, (x, a, b), wants,
                             f"uni_instruct {case} {div} fgm={fgm} di={di} {di_norm} alpha={alpha} {reduction}")
            if CASES[case][1] == "channels_last" and wants[0]:
                assert grads[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend,device,dtype", BACKENDS)
def test_fake_score_matches_reference(backend, device, dtype):
    for case in _keep_cases(backend):
        b, x = _samples(case, seed_of("fs", case), "cpu", F64, n=2)
        sigma = _ratio(torch.Generator().manual_seed(seed_of("s", case)), b.shape[0])
        for reduction in ("mean", "sum", "none"):
            _compare(
                backend, device, dtype,
                lambda b_, x_, r=reduction, s=sigma: mmfast.fake_score_loss(b_, x_, s.to(b_.device), 0.7, reduction=r),
                (b, x), (True, False), f"fake_score {case} {reduction}",
            )


# ----------------------------------------------------------------------------------------------
# no op writes into a caller's tensor


@pytest.mark.parametrize("backend,device,dtype", BACKENDS)
def test_no_mutation(backend, device, dtype):
    g = torch.Generator().manual_seed(7)
    x, a, b = (_t(g, 3, 2, 4).to(device, dtype).requires_grad_(True) for _ in range(3))
    r = _ratio(g, 3).to(device, dtype)
    sigma = _ratio(g, 3).to(device, dtype)
    logits = _t(g, 3, 2).to(device, dtype)
    tensors = (x, a, b, r, sigma, logits)
    before = [(t.detach().clone(), t._version) for t in tensors]
    with mmfast.use_backend(backend):
        h = mmfast.fdiv_weight(mmfast.density_ratio(logits), "js")
        loss = (mmfast.fdistill_loss(x, a, b, h) + mmfast.uni_instruct_loss(x, a, b, r, "jeffreys", fgm=True)
                + mmfast.uni_instruct_loss(x, a, b, r, di_norm="batch", reduction="sum")
                + mmfast.fake_score_loss(b, x, sigma) + mmfast.discriminator_loss(logits, -logits))
        loss.backward()
    for t, (copy, version) in zip(tensors, before, strict=True):
        assert t._version == version
        torch.testing.assert_close(t.detach(), copy, rtol=0, atol=0)
    assert all(t.grad is not None and t.grad.shape == t.shape and t.grad.dtype == dtype for t in (x, a, b))


# ----------------------------------------------------------------------------------------------
# bf16: fp32 accumulation, error vs fp64 no worse than the reference's at bf16


def _err(t, truth):
    return (t.double().cpu() - truth).abs().max().item() if t.numel() else 0.0


BF16 = backend_params(("torch", "cpu"), dtypes={"torch": (torch.bfloat16,), "cpu": (torch.bfloat16,)})


@pytest.mark.parametrize("backend,device,dtype", BF16)
def test_bf16_no_worse_than_reference(backend, device, dtype):
    g = torch.Generator().manual_seed(9)
    B, D = 4, 3000
    x, a, b = (_t(g, B, D) for _ in range(3))
    r = _ratio(g, B)
    lows = [t.to(torch.bfloat16) for t in (x, a, b)]
    exact = [t.double() for t in lows]  # ground truth on the same (rounded) inputs, in float64

    def rows(bk, ts, rr):
        with mmfast.use_backend(bk):
            out = []
            for fn, wants in (
                (lambda x_, a_, b_: mmfast.fdistill_loss(x_, a_, b_, rr, reduction="none"), (True, False, False)),
                (lambda x_, a_, b_: mmfast.uni_instruct_loss(x_, a_, b_, rr, "js", 0.5, True, True, "sample", "none"),
                 (True, True, True)),
                (lambda x_, a_, b_: mmfast.fake_score_loss(b_, x_, rr, reduction="none"), (False, False, True)),
            ):
                value, grads = _run(fn, [t.to(device) for t in ts], wants, 1.0)
                out.append((value, grads))
            return out

    truth = rows("torch", exact, r)
    ref = rows("torch", lows, r.float())
    got = rows(backend, lows, r.float().to(device))
    for (tv, tg), (rv, rg), (gv, gg) in zip(truth, ref, got, strict=True):
        assert gv.dtype == torch.bfloat16
        assert _err(gv, tv) <= _err(rv, tv) + 1e-2 * max(1.0, tv.abs().max().item())
        for t_, r_, g_ in zip(tg, rg, gg, strict=True):
            assert g_.dtype == torch.bfloat16
            assert _err(g_, t_) <= _err(r_, t_) + 1e-3 * max(1.0, t_.abs().max().item())
        # the reference itself accumulates in fp32: per-sample loss within bf16 output rounding
        assert _err(rv, tv) <= 1e-2 * tv.abs().max().item()


# ----------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) of a distillation step == eager


def test_compile_distillation_step_matches_eager():
    """With the backend ``auto`` picks on the CPU (the C++ kernels when built). ``aot_eager`` checks the
    fullgraph trace and the AOT-autograd graph of the custom ops without inductor's C++ codegen (slow here)."""
    g = torch.Generator().manual_seed(10)
    B = 4
    data = dict(x=_t(g, B, 3, 2, 2), a=_t(g, B, 3, 2, 2), b=_t(g, B, 3, 2, 2), logits=_t(g, B, 2),
                sigma=_ratio(g, B))
    norm = mmfast.nn.DensityRatioNormalizer(num_bins=4, t_min=0.0, t_max=20.0).double()
    uni = mmfast.nn.UniInstructLoss("js", fgm=True, di_norm="batch")

    def step(x, a, b, logits, sigma):
        r = norm(mmfast.density_ratio(logits), sigma)
        h = mmfast.fdiv_weight(r, "kl")
        return (mmfast.fdistill_loss(x, a, b, h / h.mean()) + uni(x, a, b, r)
                + mmfast.fake_score_loss(b, x, sigma) + mmfast.discriminator_loss(logits, logits.flip(0)))

    def run(fn):
        norm.bin_mean.fill_(1.0)
        norm.bin_seen.fill_(False)
        leaves = {k: v.clone().requires_grad_(k in ("x", "a", "b", "logits")) for k, v in data.items()}
        loss = fn(**leaves)
        grads = torch.autograd.grad(loss, [leaves[k] for k in ("x", "a", "b", "logits")])
        return loss.detach(), grads, norm.bin_mean.clone()

    eager = run(step)
    compiled = run(torch.compile(step, fullgraph=True, backend="aot_eager"))  # tracing + AOT autograd, no codegen
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-10, atol=1e-12)
    for ge, gc in zip(eager[1], compiled[1], strict=True):
        torch.testing.assert_close(gc, ge, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(compiled[2], eager[2])
    assert all(g_.abs().sum() > 0 for g_ in eager[1])


# ----------------------------------------------------------------------------------------------
# the backward that scales the forward-written gradient in place (mmfast/ops/_grad_scaling.py)


def _score_losses(x, a, b, r, sigma):
    return {
        "fdistill": lambda: mmfast.fdistill_loss(x, a, b, mmfast.fdiv_weight(r, "jeffreys")),
        "uni_instruct": lambda: mmfast.uni_instruct_loss(x, a, b, r, "js", alpha=0.5, fgm=True),
        "fake_score": lambda: mmfast.fake_score_loss(b, x.detach(), sigma),
    }


_OP_MODULES = {"fdistill": fdistill_ops, "uni_instruct": uni_instruct_ops, "fake_score": fake_score_ops}


@pytest.mark.parametrize("factor", [1.0, 3.0])  # 1: the CPU path that returns the saved buffer as is
@pytest.mark.parametrize("name", ["fdistill", "uni_instruct", "fake_score"])
@pytest.mark.parametrize("backend,device,dtype", backend_params(("torch", "cpu")))
def test_in_place_backward_scaling_equals_out_of_place(backend, device, dtype, name, factor, monkeypatch):
    """A graph-freeing eager backward scales the saved gradient in place; with retain_graph the
    out-of-place op runs and leaves the saved gradient untouched: all give the same gradients."""
    g = torch.Generator().manual_seed(seed_of("in-place", name))
    B, D = 5, 37
    x, a, b = (_t(g, B, D).to(dtype).requires_grad_() for _ in range(3))
    r, sigma = _ratio(g, B).to(dtype), torch.rand(B, generator=g, dtype=F64).to(dtype) + 0.1
    with mmfast.use_backend(backend):
        loss_fn = _score_losses(x, a, b, r, sigma)[name]
        check_in_place_backward(loss_fn, (x, a, b), factor, _OP_MODULES[name], "scale_rows_", monkeypatch)
