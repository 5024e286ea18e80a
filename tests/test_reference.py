"""The explicit reference (public API, backend ``torch``) against independent oracles.

Oracles: the naive autograd formulas of ``mmfast.reference``, a pure-Python loop formula on tiny
inputs, closed-form numbers, ``torch.autograd.gradcheck`` and MST-Distill's own
``F.kl_div``-based loss. All in float64 unless a test is about float32 underflow.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from _utils import DIVERGENCES, MIXES, make_routed, seed_of, value_and_grads

import mmfast
from mmfast.reference.mutual_kd import mutual_kd_loss_autograd
from mmfast.reference.routed_kd import routed_kd_loss_autograd


@pytest.fixture(autouse=True)
def _torch_backend():
    with mmfast.use_backend("torch"):
        yield


def _close(a, b, what=""):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, equal_nan=True, msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------------------------
# explicit reference == naive autograd formula: every mix x divergence x routing x mask x layout


@pytest.mark.parametrize("class_dim", [-1, 1])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("mix", MIXES)
def test_reference_matches_autograd(mix, divergence, sparse, masked, class_dim):
    seed = seed_of(mix, divergence, sparse, masked, class_dim)
    inputs = make_routed(
        rows=7 if class_dim == -1 else 3,
        C=5,
        E=3,
        spatial=None if class_dim == -1 else (2, 3),
        K=2 if sparse else None,
        mask="random" if masked else None,
        seed=seed,
    )
    kw = dict(temperature=2.0, mix=mix, divergence=divergence, beta=0.3)
    row_shape = inputs["student_logits"].shape[:1] + inputs["student_logits"].shape[2:]
    grad_out = torch.randn(row_shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    rows, grads = value_and_grads(mmfast.routed_kd_loss, inputs, grad_out, reduction="none", **kw)
    rows_ref, grads_ref = value_and_grads(routed_kd_loss_autograd, inputs, grad_out, reduction="none", **kw)
    assert rows.shape == row_shape
    _close(rows, rows_ref, "row loss")
    assert grads.keys() == grads_ref.keys() == {"student_logits", "teacher_logits", "weights"}
    for name in grads:
        _close(grads[name], grads_ref[name], f"grad {name}")
    if masked:
        assert (rows[~inputs["mask"]] == 0).all()
    for reduction in ("batchmean", "sum"):
        _close(
            mmfast.routed_kd_loss(**inputs, reduction=reduction, **kw),
            routed_kd_loss_autograd(**inputs, reduction=reduction, **kw),
            reduction,
        )


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_mutual_reference_matches_autograd(tau):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 6, 7, generator=g, dtype=torch.float64) * 2
    grad_out = torch.randn(6, generator=g, dtype=torch.float64)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    rows = mmfast.mutual_kd_loss(a, temperature=tau, reduction="none")
    rows_ref = mutual_kd_loss_autograd(b, temperature=tau, reduction="none")
    _close(rows, rows_ref, "row loss")
    (rows * grad_out).sum().backward()
    (rows_ref * grad_out).sum().backward()
    _close(a.grad, b.grad, "grad")
    _close(mmfast.mutual_kd_loss(logits, tau), mutual_kd_loss_autograd(logits, tau), "batchmean")
    # by hand: ordered pairs i != j of tau^2 KL(p_j || p_i), batchmean over rows
    lp = torch.log_softmax(logits / tau, -1)
    pairs = [(lp[j].exp() * (lp[j] - lp[i])).sum(-1) for i in range(3) for j in range(3) if i != j]
    _close(mmfast.mutual_kd_loss(list(logits), tau), tau**2 * sum(pairs).mean(), "pairs")


# --------------------------------------------------------------------------------------------
# pure-Python loop formula and closed-form numbers


def _softmax(row, tau):
    m = max(row)
    e = [math.exp((v - m) / tau) for v in row]
    s = sum(e)
    return [v / s for v in e]


def _div(name, p, q, beta):
    if name == "kl":
        return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)
    if name == "reverse_kl":
        return _div("kl", q, p, beta)
    if name == "js":
        m = [beta * a + (1 - beta) * b for a, b in zip(p, q, strict=True)]
        return beta * _div("kl", p, m, beta) + (1 - beta) * _div("kl", q, m, beta)
    return 0.5 * sum(abs(a - b) for a, b in zip(p, q, strict=True))


def _loop_rows(x, zs, w, tau, mix, div, beta):
    """l_n of SPEC section 1 with tau^2 scale, written as plain loops over rows, teachers, classes."""
    out = []
    for n, xrow in enumerate(x):
        q = _softmax(xrow, tau)
        E, C = len(zs), len(xrow)
        if mix == "loss":
            val = sum(w[n][e] * _div(div, _softmax(zs[e][n], tau), q, beta) for e in range(E))
        elif mix == "logits":
            zbar = [sum(w[n][e] * zs[e][n][c] for e in range(E)) for c in range(C)]
            val = _div(div, _softmax(zbar, tau), q, beta)
        else:
            ps = [_softmax(zs[e][n], tau) for e in range(E)]
            val = _div(div, [sum(w[n][e] * ps[e][c] for e in range(E)) for c in range(C)], q, beta)
        out.append(val * tau**2)
    return out


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("mix", MIXES)
def test_loop_formula_2x3(mix, divergence, tau):
    x = [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]
    zs = [[[3.0, 2.0, 1.0], [0.0, math.log(2), math.log(3)]], [[0.0, 0.0, 0.0], [1.0, -1.0, 0.5]]]
    w = [[0.25, 0.75], [1.0, 0.0]]
    beta = 0.3
    expected = _loop_rows(x, zs, w, tau, mix, divergence, beta)
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    rows = mmfast.routed_kd_loss(
        t(x), t(zs), t(w), temperature=tau, mix=mix, divergence=divergence, beta=beta, reduction="none"
    )
    _close(rows, t(expected), "rows")
    unscaled = mmfast.routed_kd_loss(
        t(x),
        t(zs),
        t(w),
        temperature=tau,
        mix=mix,
        divergence=divergence,
        beta=beta,
        t2_scale=False,
        reduction="sum",
    )
    assert unscaled.item() == pytest.approx(sum(expected) / tau**2, rel=1e-12)


def test_closed_form_numbers():
    """q uniform over 3 classes, p = (1/6, 1/3, 1/2): known KL, reverse KL and TVD."""
    x = torch.zeros(1, 3, dtype=torch.float64)
    z = torch.tensor([[[0.0, math.log(2), math.log(3)]]], dtype=torch.float64)
    value = lambda d: mmfast.routed_kd_loss(x, z, divergence=d).item()  # noqa: E731
    assert value("kl") == pytest.approx(0.08720802396075798, rel=1e-13)  # (1/6) ln(1/2) + (1/2) ln(3/2)
    assert value("reverse_kl") == pytest.approx(0.09589402415059362, rel=1e-13)  # (1/3) ln(4/3)
    assert value("tvd") == pytest.approx(1 / 6, rel=1e-13)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("mix", MIXES)
def test_identical_distributions_give_zero(mix, divergence):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64)
    w = torch.rand(4, 3, generator=g, dtype=torch.float64) + 0.1
    w = w / w.sum(1, keepdim=True)  # so that the logit mixture of identical teachers is x itself
    inputs = dict(student_logits=x, teacher_logits=x.expand(3, 4, 6).clone(), weights=w)
    loss, grads = value_and_grads(
        mmfast.routed_kd_loss, inputs, temperature=1.5, mix=mix, divergence=divergence
    )
    assert abs(loss.item()) < 1e-14
    if divergence == "tvd" and mix != "loss":
        return  # |P - q| has no gradient at P == q; P is x only up to rounding here
    for name in ("student_logits", "teacher_logits"):  # a minimum: zero gradient (sign(0) = 0 for tvd)
        assert grads[name].abs().max() < 1e-13, name


def test_one_hot_rows():
    """Disjoint (one-hot up to e^-100) rows: TVD = 1, KL = reverse KL ~ 100, JS = entropy of beta."""
    x = torch.tensor([[100.0, 0.0, 0.0]], dtype=torch.float64)
    z = torch.tensor([[[0.0, 100.0, 0.0]]], dtype=torch.float64)
    value = lambda d, beta=0.5: mmfast.routed_kd_loss(x, z, divergence=d, beta=beta).item()  # noqa: E731
    assert value("tvd") == pytest.approx(1.0, abs=1e-12)
    assert value("kl") == pytest.approx(100.0, abs=1e-9)
    assert value("reverse_kl") == pytest.approx(100.0, abs=1e-9)
    for beta in (0.5, 0.25):
        assert value("js", beta) == pytest.approx(
            -beta * math.log(beta) - (1 - beta) * math.log1p(-beta), abs=1e-12
        )


# --------------------------------------------------------------------------------------------
# gradcheck of the public functions (float64)


@pytest.mark.parametrize(
    "layout",
    ["dense", "sparse", "class_dim1_mask"],
)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("mix", MIXES)
def test_gradcheck_routed(mix, divergence, layout):
    seed = seed_of(mix, divergence, layout)
    inputs = make_routed(
        rows=3 if layout != "class_dim1_mask" else 2,
        C=4,
        E=2 if layout == "dense" else 3,
        K=2 if layout == "sparse" else None,
        spatial=(2,) if layout == "class_dim1_mask" else None,
        mask="random" if layout == "class_dim1_mask" else None,
        seed=seed,
    )
    x, z, w = (inputs[k].requires_grad_(True) for k in ("student_logits", "teacher_logits", "weights"))

    def f(x, z, w):
        return mmfast.routed_kd_loss(
            x,
            z,
            w,
            indices=inputs["indices"],
            mask=inputs["mask"],
            class_dim=inputs["class_dim"],
            temperature=1.7,
            mix=mix,
            divergence=divergence,
            beta=0.3,
            reduction="none",
        )

    # fast mode checks random projections v^T J u of the Jacobian; the full Jacobian once per mix
    assert torch.autograd.gradcheck(f, (x, z, w), fast_mode=not (divergence == "kl" and layout == "dense"))


@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_gradcheck_mutual(tau):
    logits = torch.randn(3, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: mmfast.mutual_kd_loss(t, tau, reduction="none"), (logits,))
    assert torch.autograd.gradcheck(lambda t: mmfast.mutual_kd_loss(t, tau), (logits,))


# --------------------------------------------------------------------------------------------
# MST-Distill semantics


def test_mst_distill_stage3_loss():
    """mix=loss, kl, tau=4, t2 scale, hard top-k (1/k each), batchmean == MST's F.kl_div sum."""
    torch.manual_seed(0)
    N, C, E, k, tau = 6, 10, 4, 2, 4.0
    x = torch.randn(N, C, dtype=torch.float64) * 3
    z = torch.randn(E, N, C, dtype=torch.float64) * 3
    router = mmfast.nn.TeacherRouter(C, E, top_k=k, weighting="hard").double()
    out = router(x)
    assert torch.equal(out.weights, torch.full((N, k), 1 / k, dtype=torch.float64))

    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    rows = torch.arange(N)
    expected = sum(
        (1 / k)
        * tau**2
        * F.kl_div(
            F.log_softmax(xb / tau, -1),
            F.log_softmax(z[out.indices[:, j], rows] / tau, -1),
            log_target=True,
            reduction="batchmean",
        )
        for j in range(k)
    )
    loss = mmfast.nn.RoutedKDLoss(temperature=tau)(xa, z, out.weights, indices=out.indices)
    _close(loss, expected, "loss")
    _close(
        mmfast.routed_kd_loss(x, z, indices=out.indices, temperature=tau), expected.detach(), "default 1/k"
    )
    loss.backward()
    expected.backward()
    _close(xa.grad, xb.grad, "grad x")


def test_mst_distill_dense_nyu_per_pixel_mean():
    """Dense (NYU) variant: class_dim=1 on [B, C, H, W], routing per sample, mean over pixels."""
    torch.manual_seed(1)
    B, C, H, W, E, k, tau = 2, 5, 3, 4, 3, 2, 4.0
    x = torch.randn(B, C, H, W, dtype=torch.float64) * 3
    z = torch.randn(E, B, C, H, W, dtype=torch.float64) * 3
    idx = torch.tensor([[0, 2], [1, 0]])
    samples = torch.arange(B)
    expected = sum(
        (1 / k)
        * tau**2
        * F.kl_div(
            F.log_softmax(x / tau, 1),
            F.log_softmax(z[idx[:, j], samples] / tau, 1),
            log_target=True,
            reduction="sum",
        )
        for j in range(k)
    ) / (B * H * W)
    loss = mmfast.routed_kd_loss(x, list(z), indices=idx, temperature=tau, class_dim=1)
    _close(loss, expected, "loss")
    # the same loss from the [N, C] form of the pixels (a transposed copy, which class_dim=1 avoids)
    x2 = x.permute(0, 2, 3, 1).reshape(-1, C)
    z2 = z.permute(0, 1, 3, 4, 2).reshape(E, -1, C)
    _close(
        mmfast.routed_kd_loss(x2, z2, indices=idx.repeat_interleave(H * W, 0), temperature=tau),
        expected,
        "rows",
    )


# --------------------------------------------------------------------------------------------
# underflow, NaN, entries that must not be read


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mix", MIXES)
def test_js_underflow_is_finite(mix, dtype):
    """Class 1 underflows to 0 in both q and every p: JS gives finite values and gradients, equal to
    JS over the other two classes."""
    x = torch.tensor([[0.0, -1e4, 1.0], [2.0, -1e4, 0.0]], dtype=dtype)
    z = torch.tensor(
        [[[0.5, -1e4, 0.0], [0.0, -1e4, 1.0]], [[1.0, -1e4, -1.0], [0.3, -1e4, 0.2]]], dtype=dtype
    )
    w = torch.tensor([[0.4, 0.6], [0.5, 0.5]], dtype=dtype)
    inputs = dict(student_logits=x, teacher_logits=z, weights=w)
    for beta in (0.5, 0.2):
        loss, grads = value_and_grads(
            mmfast.routed_kd_loss, inputs, mix=mix, divergence="js", beta=beta, reduction="none"
        )
        assert torch.isfinite(loss).all()
        for name, g in grads.items():
            assert torch.isfinite(g).all(), name
        keep = [0, 2]
        expected = _loop_rows(x[:, keep].tolist(), z[:, :, keep].tolist(), w.tolist(), 1.0, mix, "js", beta)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(
            loss.double(), torch.tensor(expected, dtype=torch.float64), rtol=tol, atol=tol
        )


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_nan_in_logits_propagates(where, mix, divergence):
    """A NaN logit makes its row's loss NaN (SPEC 6: NaN propagates, never hidden); other rows are
    unaffected."""
    inputs = make_routed(rows=4, C=5, E=2)
    if where == "student":
        inputs["student_logits"][1, 2] = float("nan")
    else:
        inputs["teacher_logits"][0, 1, 0] = float("nan")
    rows, grads = value_and_grads(
        mmfast.routed_kd_loss, inputs, mix=mix, divergence=divergence, reduction="none"
    )
    assert rows[1].isnan(), f"row loss {rows[1].item()} with a NaN {where} logit"
    assert torch.isfinite(rows[[0, 2, 3]]).all()
    assert mmfast.routed_kd_loss(**inputs, mix=mix, divergence=divergence).isnan()
    if where == "student":
        assert grads["student_logits"][1].isnan().any()
    for g in grads.values():
        assert torch.isfinite(g[..., [0, 2, 3], :] if g.dim() == 3 else g[[0, 2, 3]]).all()


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("mix", MIXES)
def test_teacher_entry_underflow_in_float32(mix, divergence):
    """Class 1 underflows in float32 (e^-105 .. e^-120) but not in float64 in every teacher, and
    not in the student: float32 values and gradients are finite and match float64."""
    x = torch.tensor([[0.0, -3.0, 1.0], [1.0, 0.0, -1.0]], dtype=torch.float64)
    z = torch.tensor(
        [[[0.0, -110.0, 5.0], [0.5, -120.0, 0.0]], [[1.0, -105.0, 2.0], [0.0, -108.0, 1.0]]],
        dtype=torch.float64,
    )
    w = torch.tensor([[0.3, 0.7], [1.0, 0.5]], dtype=torch.float64)
    inputs = dict(student_logits=x, teacher_logits=z, weights=w)
    kw = dict(mix=mix, divergence=divergence, reduction="none")
    rows64, grads64 = value_and_grads(mmfast.routed_kd_loss, inputs, torch.tensor([1.0, -2.0]), **kw)
    rows32, grads32 = value_and_grads(
        mmfast.routed_kd_loss, {k: v.float() for k, v in inputs.items()}, torch.tensor([1.0, -2.0]), **kw
    )
    torch.testing.assert_close(rows32.double(), rows64, rtol=1e-5, atol=1e-6)
    for name in grads64:
        assert torch.isfinite(grads32[name]).all(), f"float32 grad {name}: {grads32[name]}"
        torch.testing.assert_close(grads32[name].double(), grads64[name], rtol=1e-5, atol=1e-6, msg=name)


def test_nan_in_logits_propagates_mutual():
    logits = torch.randn(2, 3, 4, dtype=torch.float64)
    logits[1, 1, 1] = float("nan")
    rows = mmfast.mutual_kd_loss(logits, reduction="none")
    assert rows[1].isnan() and torch.isfinite(rows[[0, 2]]).all()


def test_masked_rows_and_unselected_teachers_are_not_read():
    """NaN in masked rows, and in teachers that sparse routing does not select, stays out."""
    inputs = make_routed(rows=5, C=4, E=3, K=2, mask="random", seed=4)
    x, z, idx, m = (inputs[k] for k in ("student_logits", "teacher_logits", "indices", "mask"))
    x[~m] = float("nan")
    z[:, ~m] = float("nan")
    for n in range(5):
        for e in set(range(3)) - set(idx[n].tolist()):
            z[e, n] = float("nan")
    for mix, div in itertools.product(MIXES, DIVERGENCES):
        rows, grads = value_and_grads(
            mmfast.routed_kd_loss, inputs, mix=mix, divergence=div, reduction="none"
        )
        assert torch.isfinite(rows).all() and (rows[~m] == 0).all(), (mix, div)
        for name, g in grads.items():
            assert torch.isfinite(g).all(), (mix, div, name)
        assert (grads["student_logits"][~m] == 0).all()
        assert (grads["teacher_logits"][:, ~m] == 0).all()
