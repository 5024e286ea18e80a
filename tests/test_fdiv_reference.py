"""The f-divergence score-distillation references: explicit backward vs autograd of the naive loss, the
closed-form coefficients vs autograd derivatives of h, the density ratio, and float64 gradchecks."""

from __future__ import annotations

import math

import pytest
import torch
from _utils import seed_of

import mmfast
from mmfast.ops import fake_score as fake_score_ops
from mmfast.ops import fdistill as fdistill_ops
from mmfast.ops import uni_instruct as uni_instruct_ops
from mmfast.reference import fdiv as fdiv_ref
from mmfast.reference.fake_score import fake_score_loss_autograd, fake_score_rows
from mmfast.reference.fdistill import fdistill_loss_autograd, fdistill_rows
from mmfast.reference.uni_instruct import uni_instruct_loss_autograd, uni_instruct_rows

DIVS = tuple(fdiv_ref.DIVERGENCES)
F64 = torch.float64


def _samples(B, shape, seed, n=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, *shape, generator=g, dtype=F64) for _ in range(n)]


def _ratio(B, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.exp(torch.empty(B, dtype=F64).uniform_(math.log(0.1), math.log(20.0), generator=g))


def test_eight_divergences_in_spec_order():
    assert DIVS == ("reverse_kl", "softened_reverse_kl", "js", "squared_hellinger", "kl", "jeffreys",
                    "neyman_chi2", "pearson_chi2")
    assert mmfast.fdiv.DIVERGENCES == DIVS


def test_weight_table_constants():
    r = torch.tensor([0.25, 1.0, 4.0], dtype=F64)
    expect = {
        "reverse_kl": [1.0, 1.0, 1.0],
        "softened_reverse_kl": [0.8, 0.5, 0.2],
        "js": [0.2, 0.5, 0.8],
        "squared_hellinger": [0.25, 0.5, 1.0],
        "kl": [0.25, 1.0, 4.0],
        "jeffreys": [1.25, 2.0, 5.0],
        "neyman_chi2": [8.0, 2.0, 0.5],
        "pearson_chi2": [0.125, 2.0, 32.0],
    }
    for div, values in expect.items():
        torch.testing.assert_close(mmfast.fdiv_weight(r, div), torch.tensor(values, dtype=F64), rtol=1e-15, atol=0)


def _f(div, r):
    """f(r) of the SPEC table."""
    return {
        "reverse_kl": lambda: -torch.log(r),
        "softened_reverse_kl": lambda: (r + 1) * torch.log((r + 1) / (2 * r)),
        "js": lambda: r * torch.log(r) - (r + 1) * torch.log((r + 1) / 2),
        "squared_hellinger": lambda: (torch.sqrt(r) - 1) ** 2,
        "kl": lambda: r * torch.log(r),
        "jeffreys": lambda: (r - 1) * torch.log(r),
        "neyman_chi2": lambda: (1 - r) ** 2 / r,
        "pearson_chi2": lambda: (r - 1) ** 2,
    }[div]()


@pytest.mark.parametrize("div", DIVS)
def test_weight_is_r2_f_second_derivative(div):
    r = torch.linspace(0.1, 20.0, 37, dtype=F64)
    f2 = torch.vmap(torch.func.grad(torch.func.grad(lambda s: _f(div, s))))(r)
    torch.testing.assert_close(mmfast.fdiv_weight(r, div), r * r * f2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("div", DIVS)
def test_coefficients_match_autograd_derivatives_of_h(div):
    r = torch.cat([torch.linspace(0.1, 20.0, 41, dtype=F64), torch.tensor([1.0, 0.1, 20.0], dtype=F64)])

    def h(s):
        return fdiv_ref.fdiv_weight(s, div)

    dh = torch.vmap(torch.func.grad(h))(r)
    d2h = torch.vmap(torch.func.grad(torch.func.grad(h)))(r)
    lam_sim, lam_fgm, lam_di = mmfast.fdiv_coefficients(r, div)
    torch.testing.assert_close(lam_sim, h(r), rtol=1e-14, atol=0)
    torch.testing.assert_close(lam_fgm, h(r) - r * dh, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lam_di, -r * r * d2h, rtol=1e-12, atol=1e-12)
    for c in (lam_sim, lam_fgm, lam_di):
        assert c.shape == r.shape and c.dtype == F64


def test_density_ratio_clamps_and_mean():
    z = torch.tensor([50.0, -50.0, 0.0, 10.0, -10.0, math.log(3.0)])
    r = mmfast.density_ratio(z)
    assert r[0].item() == 20.0 and r[1] == torch.tensor(0.1)  # exactly the clamps (0.1 in float32)
    r64 = mmfast.density_ratio(z.double())
    assert r64[0].item() == 20.0 and r64[1].item() == 0.1
    torch.testing.assert_close(r[2:], torch.tensor([1.0, 20.0, 0.1, 3.0]))
    # [B, K]: mean over K before the clamps
    zk = torch.tensor([[1.0, 3.0], [50.0, -50.0], [-60.0, -40.0]], dtype=F64)
    torch.testing.assert_close(mmfast.density_ratio(zk), torch.tensor([math.exp(2.0), 1.0, 0.1], dtype=F64))
    # custom clamps
    torch.testing.assert_close(
        mmfast.density_ratio(torch.tensor([5.0, -5.0]), logit_clamp=1.0, ratio_min=0.5, ratio_max=2.0),
        torch.tensor([2.0, 0.5]),
    )


def test_density_ratio_nan_detached_and_dtype():
    z = torch.tensor([[float("nan"), 1.0], [0.0, 0.0]], requires_grad=True)
    r = mmfast.density_ratio(z)
    assert torch.isnan(r[0]) and r[1].item() == 1.0
    assert not r.requires_grad
    assert mmfast.density_ratio(torch.zeros(3, dtype=torch.bfloat16)).dtype == torch.float32
    assert mmfast.density_ratio(torch.zeros(3, dtype=F64)).dtype == F64


# ----------------------------------------------------------------------------------------------
# explicit backward == autograd of the naive loss (float64)


@pytest.mark.parametrize("shape", [(1,), (3, 5, 4), (1271,)])
@pytest.mark.parametrize("B", [1, 4])
def test_fdistill_rows_match_autograd(B, shape):
    x, a, b = _samples(B, shape, seed_of("fd", B, shape))
    h = mmfast.fdiv_weight(_ratio(B, 1), "js")
    xl = x.clone().requires_grad_(True)
    loss = fdistill_loss_autograd(xl, a, b, h)
    (gx,) = torch.autograd.grad(loss, xl)
    D = math.prod(shape)
    rows, dx = fdistill_rows(x.reshape(B, D), a.reshape(B, D), b.reshape(B, D), h, 1.0 / (B * D), True)
    torch.testing.assert_close(rows.sum(), loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(dx.reshape(gx.shape), gx, rtol=1e-12, atol=1e-16)
    _, empty = fdistill_rows(x.reshape(B, D), a.reshape(B, D), b.reshape(B, D), h, 1.0, False)
    assert empty.numel() == 0


@pytest.mark.parametrize("div", DIVS)
def test_uni_instruct_rows_match_autograd(div):
    B, shape = 3, (2, 3, 5)
    D = math.prod(shape)
    x, a, b = _samples(B, shape, seed_of("ui", div))
    r = _ratio(B, seed_of("r", div))
    coef = torch.stack(fdiv_ref.fdiv_coefficients(r, div), dim=1)
    for fgm in (False, True):
        for di in (False, True):
            for alpha in (0.0, 0.5, 1.0):
                for di_norm in ("sample", "batch"):
                    leaves = [t.clone().requires_grad_(True) for t in (x, a, b)]
                    loss = uni_instruct_loss_autograd(*leaves, r, div, alpha, fgm, di, di_norm, "none")
                    go = torch.linspace(-1.0, 2.0, B, dtype=F64)
                    grads = torch.autograd.grad(loss, leaves, go)
                    norm = None if di_norm == "sample" else torch.linalg.vector_norm(a - b).reshape(1)
                    rows, dx, da, db = uni_instruct_rows(
                        x.reshape(B, D), a.reshape(B, D), b.reshape(B, D), coef, norm, alpha, 1.0, fgm, di,
                        True, True, True,
                    )
                    what = f"{div} fgm={fgm} di={di} alpha={alpha} {di_norm}"
                    torch.testing.assert_close(rows, loss.detach(), rtol=1e-12, atol=1e-12, msg=what)
                    for name, mine, ref in zip(("dx", "da", "db"), (dx, da, db), grads, strict=True):
                        torch.testing.assert_close(
                            (mine * go[:, None]).reshape(ref.shape), ref, rtol=1e-12, atol=1e-12,
                            msg=lambda m, n=name, w=what: f"{n} {w}: {m}",
                        )


def test_uni_instruct_rows_gradient_subsets_are_empty():
    x, a, b = (t.reshape(2, 6) for t in _samples(2, (6,), 3))
    coef = torch.stack(fdiv_ref.fdiv_coefficients(_ratio(2, 3), "kl"), dim=1)
    out = uni_instruct_rows(x, a, b, coef, None, 1.0, 1.0, True, True, False, True, False)
    assert out[1].numel() == 0 and out[3].numel() == 0 and out[2].shape == (2, 6)


def test_fake_score_rows_match_autograd():
    B, shape = 5, (3, 4)
    b, x = _samples(B, shape, 9, n=2)
    sigma = torch.linspace(0.002, 80.0, B, dtype=F64)
    leaves = [t.clone().requires_grad_(True) for t in (b, x)]
    loss = fake_score_loss_autograd(*leaves, sigma, 0.5)
    gb, gx = torch.autograd.grad(loss, leaves, allow_unused=True)
    lam = fdiv_ref.edm_weight(sigma, 0.5)
    rows, db = fake_score_rows(b.reshape(B, -1), x.reshape(B, -1), lam, 1.0 / B, True)
    torch.testing.assert_close(rows.sum(), loss.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(db.reshape(gb.shape), gb, rtol=1e-12, atol=0)
    assert gx is None  # x is stop-gradient
    torch.testing.assert_close(lam, (sigma**2 + 0.25) / (sigma * 0.5) ** 2, rtol=1e-15, atol=0)


# ----------------------------------------------------------------------------------------------
# float64 gradcheck of the ops with the reference backward (where the loss is a true function of the
# differentiable inputs: the detached wf is held constant by its clamp, the DI norm is an input)


def test_gradcheck_uni_instruct_op():
    B, D = 2, 5
    g = torch.Generator().manual_seed(11)
    a = torch.randn(B, D, generator=g, dtype=F64)
    x = a + 1e-9 * torch.randn(B, D, generator=g, dtype=F64)  # mean |x - a| < 1e-5 under eps: wf is the clamp
    b = torch.randn(B, D, generator=g, dtype=F64)
    coef = torch.stack(fdiv_ref.fdiv_coefficients(_ratio(B, 4), "js"), dim=1)
    norm = torch.tensor([1.7], dtype=F64)
    with mmfast.use_backend("torch"):
        for alpha, fgm in ((1.0, True), (0.5, False), (0.0, True)):

            def f(x_, a_, b_, alpha=alpha, fgm=fgm):
                return uni_instruct_ops.uni_instruct_fwd(x_, a_, b_, coef, None, alpha, 1e-5, fgm, False,
                                                         uni_instruct_ops.grad_mask(True, True, True))[0]

            leaves = [t.clone().requires_grad_(True) for t in (x, a, b)]
            assert torch.autograd.gradcheck(f, leaves, eps=1e-6)

        def f_di(x_):  # DI term: gradient to x only, with a given norm
            return uni_instruct_ops.uni_instruct_fwd(x_, a, b, coef, norm, 1.0, 1e-5, True, True,
                                                     uni_instruct_ops.grad_mask(True, False, False))[0]

        assert torch.autograd.gradcheck(f_di, [x.clone().requires_grad_(True)], eps=1e-6)


def test_gradcheck_fake_score_op():
    B, D = 3, 4
    b, x = (t.reshape(B, D) for t in _samples(B, (D,), 12, n=2))
    lam = fdiv_ref.edm_weight(torch.tensor([0.1, 1.0, 5.0], dtype=F64), 0.5)
    with mmfast.use_backend("torch"):
        assert torch.autograd.gradcheck(
            lambda b_: fake_score_ops.fake_score_fwd(b_, x, lam, 0.25, True)[0], [b.clone().requires_grad_(True)]
        )


def test_backward_ops_scale_each_row():
    g = torch.Generator().manual_seed(13)
    gl = torch.randn(3, generator=g)
    for dtype in (torch.float32, torch.bfloat16, F64):
        grad = torch.randn(3, 4, generator=g).to(dtype)
        for op in (fdistill_ops.fdistill_bwd, uni_instruct_ops.uni_instruct_bwd, fake_score_ops.fake_score_bwd):
            out = op(gl, grad)
            assert out.dtype == dtype and out.shape == grad.shape
            torch.testing.assert_close(out, (grad.double() * gl.double()[:, None]).to(dtype))


def test_fdistill_gradient_is_the_dmd_surrogate():
    """d loss / dx = g / numel exactly (the surrogate's gradient, not the derivative of 0.5 mean g^2)."""
    B, D = 2, 6
    x, a, b = (t.reshape(B, D) for t in _samples(B, (D,), 14))
    h = torch.tensor([0.5, 2.0], dtype=F64)
    with mmfast.use_backend("torch"):
        xl = x.clone().requires_grad_(True)
        (gx,) = torch.autograd.grad(mmfast.fdistill_loss(xl, a, b, h), xl)
    m = (x - a).abs().mean(1, keepdim=True)
    g = (b - a) * h[:, None] / (m + 1e-6)
    torch.testing.assert_close(gx, g / (B * D), rtol=1e-14, atol=0)
