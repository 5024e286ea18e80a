"""masked_reconstruction_loss: the reference against PyTorch's own losses and the naive autograd loss,
float64 gradcheck (reference backward and native op), the documented reductions, torch.compile,
and bad input (errors name the argument)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from _utils import assert_scaled_close, backend_params, seed_of
from test_masked_recon_backends import make_case, run

import mmfast
from mmfast.reference.masked_reconstruction import LOSSES, masked_reconstruction_loss_autograd

CPU_BUILT = mmfast.backend_info("cpu")["available"]["cpu"]
GRADCHECK = backend_params(("torch", "cpu"), dtypes={"torch": (torch.float64,), "cpu": (torch.float64,)})


def test_without_mask_equals_pytorch_losses():
    P, Y, _ = make_case((6, 13), -1, "none", 1, dtype=torch.float64)
    with mmfast.use_backend("torch"):
        got = {
            "mse": mmfast.masked_reconstruction_loss(P, Y),
            "smooth_l1": mmfast.masked_reconstruction_loss(P, Y, loss="smooth_l1", beta=0.4),
            "cosine": mmfast.masked_reconstruction_loss(P, Y, loss="cosine"),
            "sum": mmfast.masked_reconstruction_loss(P, Y, reduction="sum"),
            "none": mmfast.masked_reconstruction_loss(P, Y, loss="smooth_l1", reduction="none"),
        }
    torch.testing.assert_close(got["mse"], F.mse_loss(P, Y))
    torch.testing.assert_close(got["smooth_l1"], F.smooth_l1_loss(P, Y, beta=0.4))
    torch.testing.assert_close(got["cosine"], (1 - F.cosine_similarity(P, Y, dim=-1)).mean())
    torch.testing.assert_close(got["sum"], F.mse_loss(P, Y, reduction="sum"))
    torch.testing.assert_close(got["none"], F.smooth_l1_loss(P, Y, reduction="none"))


def test_reductions_on_a_hand_built_case():
    """mean = sum(M e) / sum(M) with sum(M) over the broadcast mask: a row mask counts rows * D."""
    P = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 2.0]])
    Y = torch.zeros(3, 2)
    row = torch.tensor([[1.0], [0.0], [0.5]])
    chan = torch.tensor([1.0, 0.0])
    elem = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    loss = mmfast.masked_reconstruction_loss
    assert loss(P, Y, row).item() == pytest.approx((1 + 4 + 0.5 * 4) / (1.5 * 2))
    assert loss(P, Y, row, reduction="sum").item() == pytest.approx(7.0)
    assert loss(P, Y, chan).item() == pytest.approx((1 + 9 + 0) / 3)
    assert loss(P, Y, elem).item() == pytest.approx((1 + 16) / 2)
    none = loss(P, Y, row, reduction="none")
    torch.testing.assert_close(none, torch.tensor([[1.0, 4.0], [0.0, 0.0], [0.0, 2.0]]))
    # cosine: mean over rows weighted by the row mask
    Yc = torch.tensor([[1.0, 2.0], [-3.0, -4.0], [2.0, 0.0]])
    cos = F.cosine_similarity(P, Yc, dim=-1)
    expect = ((1 - cos[0]) + 0.5 * (1 - cos[2])) / 1.5
    assert loss(P, Yc, row, loss="cosine").item() == pytest.approx(expect.item(), abs=1e-6)
    torch.testing.assert_close(loss(P, Yc, row, loss="cosine", reduction="none"),
                               torch.stack([1 - cos[0], torch.tensor(0.0), 0.5 * (1 - cos[2])]))


def test_none_shapes_with_channel_dim_1():
    P, Y, M = make_case((2, 4, 3, 5), 1, "row", 3)
    assert mmfast.masked_reconstruction_loss(P, Y, M, channel_dim=1, reduction="none").shape == (2, 4, 3, 5)
    assert mmfast.masked_reconstruction_loss(P, Y, M, channel_dim=1, reduction="none", loss="cosine").shape == (2, 3, 5)
    # a row of P is a position: channel_dim=1 equals the channels-last loss on the permuted tensors
    ref = mmfast.masked_reconstruction_loss(P.permute(0, 2, 3, 1), Y.permute(0, 2, 3, 1), M.permute(0, 2, 3, 1),
                                            normalize_target=True)
    got = mmfast.masked_reconstruction_loss(P, Y, M, channel_dim=1, normalize_target=True)
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("loss", LOSSES)
def test_reference_matches_naive_autograd(loss):
    """The reference's explicit backward against autograd of the loss as a user writes it (float64,
    finite data, where the two definitions agree)."""
    for mask, normalize, reduction, (shape, cd) in itertools.product(
        ("none", "row", "row_bool", "channel", "element", "element_bool"), (False, True), ("mean", "sum", "none"),
        (((5, 9), -1), ((2, 6, 3, 2), 1)),
    ):
        if loss == "cosine" and mask not in ("none", "row", "row_bool"):
            continue
        P, Y, M = make_case(shape, cd, mask, seed_of(loss, mask, cd), dtype=torch.float64)
        kw = dict(loss=loss, normalize_target=normalize, reduction=reduction, channel_dim=cd, beta=0.6)
        out, grads = run("torch", P, Y, M, 5, **kw)

        leaves = [t.clone().requires_grad_(True) for t in (P, Y)]
        Ml = M.clone().requires_grad_(True) if (M is not None and M.is_floating_point()) else M
        naive = masked_reconstruction_loss_autograd(*leaves, Ml, **kw)
        go = torch.rand(naive.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2 + 0.5
        wrt = leaves + ([Ml] if Ml is not None and Ml.requires_grad else [])
        naive_grads = torch.autograd.grad(naive, wrt, go)
        what = f"{mask} {normalize} {reduction} {cd}"
        assert_scaled_close(out, naive.detach(), 1e-10, 1e-10, what)
        for name, g in zip(("pred", "target", "mask"), naive_grads, strict=False):
            assert_scaled_close(grads[name], g, 1e-9, 1e-9, f"{what} {name}")


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("backend,device,dtype", GRADCHECK)
def test_gradcheck_float64(backend, device, dtype, loss):
    """gradcheck of the explicit backward (torch backend = the reference) and of the C++ kernel."""
    for mask, normalize, reduction, (shape, cd) in (
        ("row", True, "mean", ((3, 4), -1)),
        ("row", False, "none", ((2, 3, 2, 2), 1)),
        ("none", True, "none", ((3, 4), -1)),
        ("element", True, "mean", ((3, 4), -1)),
        ("channel", False, "sum", ((2, 3, 2, 2), 1)),
        ("element_bcast", True, "none", ((2, 3, 2, 2), 1)),
    ):
        if loss == "cosine" and mask not in ("none", "row"):
            continue
        P, Y, M = make_case(shape, cd, mask, seed_of("gc", loss, mask), dtype=torch.float64)
        leaves = [P.requires_grad_(), Y.requires_grad_()] + ([M.requires_grad_()] if M is not None else [])

        kw = dict(loss=loss, normalize_target=normalize, reduction=reduction, channel_dim=cd, beta=0.7)

        def fn(*args, kw=kw):
            with mmfast.use_backend(backend):
                return mmfast.masked_reconstruction_loss(args[0], args[1], args[2] if len(args) > 2 else None, **kw)

        mmfast.set_value_checks(False)  # gradcheck nudges mask values of 0 below 0
        try:
            assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-5), (mask, normalize, reduction)
        finally:
            mmfast.set_value_checks(True)


def test_mask_gradient_is_e_minus_mean_over_count():
    """d mean / d M_i = (e_i - L) / sum(M), summed over the broadcast dims (SPEC section 2)."""
    P, Y, M = make_case((4, 5), -1, "channel", 8, dtype=torch.float64)
    M = M.requires_grad_()
    L = mmfast.masked_reconstruction_loss(P, Y, M)
    (g,) = torch.autograd.grad(L, M)
    e = (P - Y) ** 2
    count = M.detach().expand(4, 5).sum()
    torch.testing.assert_close(g, ((e - L.detach()) / count).sum(0))


@pytest.mark.skipif(not CPU_BUILT, reason="mmfast._C is not built")
def test_compile_fullgraph_training_step():
    """torch.compile(fullgraph, aot_eager) of a step: same value and gradients as eager; the [0, 1] value check on
    a float mask is skipped under compile (it would read data on the host)."""
    P, Y, M = make_case((6, 10), -1, "row", 4)
    M_bad = M * 3  # outside [0, 1]: an eager-only check

    def step(p, y, m):
        return mmfast.masked_reconstruction_loss(p, y, m, loss="smooth_l1", normalize_target=True)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")  # dynamo + AOT autograd, no codegen
    for mask in (M, M_bad):
        leaves = [t.clone().requires_grad_() for t in (P, Y, mask)]
        out = compiled(*leaves)
        grads = torch.autograd.grad(out, leaves)
        eager_leaves = [t.clone().requires_grad_() for t in (P, Y, mask)]
        mmfast.set_value_checks(False)
        try:
            eager = step(*eager_leaves)
        finally:
            mmfast.set_value_checks(True)
        eager_grads = torch.autograd.grad(eager, eager_leaves)
        torch.testing.assert_close(out, eager)
        for a, b in zip(grads, eager_grads, strict=True):
            torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="mask"):
        step(P, Y, M_bad)


_P, _Y = torch.randn(4, 5), torch.randn(4, 5)
_meta = torch.device("meta")
BAD = {
    "pred not a tensor": (lambda: mmfast.masked_reconstruction_loss([1.0], _Y), TypeError, "pred"),
    "integer target": (lambda: mmfast.masked_reconstruction_loss(_P, _Y.long()), TypeError, "target"),
    "dtype mismatch": (lambda: mmfast.masked_reconstruction_loss(_P, _Y.double()), TypeError, "target"),
    "shape mismatch": (lambda: mmfast.masked_reconstruction_loss(_P, _Y[:3]), ValueError, "target"),
    "device mismatch": (lambda: mmfast.masked_reconstruction_loss(_P, _Y.to(_meta)), ValueError, "target"),
    "mask device": (lambda: mmfast.masked_reconstruction_loss(_P, _Y, torch.ones(4, 1, device=_meta)), ValueError,
                    "mask"),
    "mask not broadcasting": (lambda: mmfast.masked_reconstruction_loss(_P, _Y, torch.ones(3, 1)), ValueError, "mask"),
    "row mask without the channel dim": (lambda: mmfast.masked_reconstruction_loss(_P, _Y, torch.ones(4)), ValueError,
                                         r"mask.*unsqueeze\(-1\)"),
    "mask larger than pred": (lambda: mmfast.masked_reconstruction_loss(_P, _Y, torch.ones(2, 4, 5)), ValueError,
                              "mask"),
    "integer mask": (lambda: mmfast.masked_reconstruction_loss(_P, _Y, torch.ones(4, 1, dtype=torch.long)), TypeError,
                     "mask"),
    "mask above 1": (lambda: mmfast.masked_reconstruction_loss(_P, _Y, torch.full((4, 1), 1.5)), ValueError, "mask"),
    "negative mask": (lambda: mmfast.masked_reconstruction_loss(_P, _Y, torch.full((5,), -0.1)), ValueError, "mask"),
    "NaN mask": (lambda: mmfast.masked_reconstruction_loss(_P, _Y, torch.full((4, 5), float("nan"))), ValueError,
                 "mask"),
    "unknown loss": (lambda: mmfast.masked_reconstruction_loss(_P, _Y, loss="l1"), ValueError, "loss"),
    "unknown reduction": (lambda: mmfast.masked_reconstruction_loss(_P, _Y, reduction="batchmean"), ValueError,
                          "reduction"),
    "beta zero": (lambda: mmfast.masked_reconstruction_loss(_P, _Y, loss="smooth_l1", beta=0.0), ValueError, "beta"),
    "beta negative": (lambda: mmfast.masked_reconstruction_loss(_P, _Y, beta=-1.0), ValueError, "beta"),
    "eps zero": (lambda: mmfast.masked_reconstruction_loss(_P, _Y, normalize_target=True, eps=0.0), ValueError, "eps"),
    "channel_dim out of range": (lambda: mmfast.masked_reconstruction_loss(_P, _Y, channel_dim=2), ValueError,
                                 "channel_dim"),
    "normalize_target not bool": (lambda: mmfast.masked_reconstruction_loss(_P, _Y, normalize_target=1), TypeError,
                                  "normalize_target"),
    "cosine with element mask": (lambda: mmfast.masked_reconstruction_loss(_P, _Y, torch.ones(4, 5), loss="cosine"),
                                 ValueError, "mask"),
    "cosine with channel mask": (lambda: mmfast.masked_reconstruction_loss(_P, _Y, torch.ones(5), loss="cosine"),
                                 ValueError, "mask"),
    "no channels": (lambda: mmfast.masked_reconstruction_loss(torch.ones(3, 0), torch.ones(3, 0)), ValueError, "pred"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_naming_the_argument(case):
    fn, error, name = BAD[case]
    with pytest.raises(error, match=name):
        fn()


def test_value_checks_off_lets_an_out_of_range_mask_through():
    mmfast.set_value_checks(False)
    try:
        out = mmfast.masked_reconstruction_loss(_P, _Y, torch.full((4, 1), 2.0))
    finally:
        mmfast.set_value_checks(True)
    torch.testing.assert_close(out, F.mse_loss(_P, _Y))  # sum(2 e) / sum(2) over the broadcast mask


def test_no_rows_gives_zero():
    P = torch.ones(0, 4, requires_grad=True)
    out = mmfast.masked_reconstruction_loss(P, torch.ones(0, 4))
    assert out.item() == 0.0
    out.backward()
    assert P.grad.shape == (0, 4)
