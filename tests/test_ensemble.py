"""UME (``mmfast.unimodal_ensemble``) and the guiding strategy (``mmfast.choose_late_fusion``)."""

from __future__ import annotations

import math

import pytest
import torch
from _utils import seed_of

import mmfast


def _logits(M=3, N=6, C=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(N, C, generator=g, dtype=torch.float64) * 3).to(dtype) for _ in range(M)]


def _naive_probs(zs, w):
    """log(sum_m w_m softmax(z_m)) formed in probability space, float64."""
    mix = sum(wm * torch.softmax(z.double(), -1) for wm, z in zip(w, zs, strict=True))
    return torch.log(mix)


@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 5.0], [0.0, 1.0, 3.0]])
def test_logits_combine_is_the_weighted_mean(weights):
    zs = _logits(seed=seed_of("logits", weights))
    out = mmfast.unimodal_ensemble(zs, weights)
    w = torch.tensor(weights or [1.0, 1.0, 1.0], dtype=torch.float64)
    w = w / w.sum()
    torch.testing.assert_close(out, sum(wm * z for wm, z in zip(w, zs, strict=True)))
    torch.testing.assert_close(mmfast.unimodal_ensemble(torch.stack(zs), weights), out)


@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 5.0], [0.0, 1.0, 3.0]])
def test_probs_combine_returns_log_of_the_probability_mixture(weights):
    zs = _logits(seed=seed_of("probs", weights))
    out = mmfast.unimodal_ensemble(zs, weights, combine="probs")
    w = torch.tensor(weights or [1.0, 1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(out, _naive_probs(zs, w / w.sum()))
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(out.shape[0], dtype=torch.float64))


def test_weights_are_normalised():
    zs = _logits(M=2, seed=1)
    for combine in ("logits", "probs"):
        a = mmfast.unimodal_ensemble(zs, [2.0, 6.0], combine)
        b = mmfast.unimodal_ensemble(zs, torch.tensor([0.25, 0.75], dtype=torch.float64), combine)
        torch.testing.assert_close(a, b)


def test_probs_combine_stays_finite_where_every_model_underflows():
    zs = [torch.tensor([[0.0, -2000.0, 1.0]]), torch.tensor([[1.0, -1500.0, 0.0]])]
    out = mmfast.unimodal_ensemble(zs, combine="probs")
    assert torch.isfinite(out).all()
    # log(0.5 e^{-1500 - lse_2} + 0.5 e^{-2000 - lse_1}) ~= -1500 - lse_2 + log 0.5
    lse2 = torch.logsumexp(zs[1], -1)
    torch.testing.assert_close(out[0, 1], (-1500.0 - lse2[0]) + math.log(0.5))


def test_gradients_match_the_naive_mixture_and_zero_weights_give_no_nan():
    zs = [z.requires_grad_(True) for z in _logits(M=3, seed=2)]
    w = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64, requires_grad=True)
    g = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = mmfast.unimodal_ensemble(zs, w, combine="probs")
    got = torch.autograd.grad(out, [*zs, w], g)
    want = torch.autograd.grad(_naive_probs(zs, w / w.sum()), [*zs, w], g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(
        lambda a, b, ww: mmfast.unimodal_ensemble([a, b], ww, combine="probs"),
        (zs[0].detach()[:2].requires_grad_(), zs[1].detach()[:2].requires_grad_(), w.detach()[:2].requires_grad_()),
    )
    # a zero weight drops its model from the value but keeps its exact gradient
    w0 = torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64, requires_grad=True)
    out = mmfast.unimodal_ensemble(zs, w0, combine="probs")
    torch.testing.assert_close(out, mmfast.unimodal_ensemble(zs[1:], combine="probs"))
    got = torch.autograd.grad(out, [*zs, w0], g)
    want = torch.autograd.grad(_naive_probs(zs, w0 / w0.sum()), [*zs, w0], g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    assert got[3][0] != 0


def test_non_finite_logits():
    z = torch.tensor([[0.0, 1.0, -math.inf], [2.0, -1.0, -math.inf]], dtype=torch.float64)
    other = torch.tensor([[1.0, 0.0, -math.inf], [0.0, 0.0, -math.inf]], dtype=torch.float64)
    z.requires_grad_(True)
    out = mmfast.unimodal_ensemble([z, other], combine="probs")
    assert torch.isfinite(out[:, :2]).all() and (out[:, 2] == -math.inf).all()
    (gz,) = torch.autograd.grad(torch.log_softmax(out, -1)[:, :2].sum(), [z])
    assert torch.isfinite(gz).all()
    # a dropped model's inf / NaN logits are ignored; a kept model's NaN propagates
    bad = torch.tensor([[math.nan, math.inf, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    for combine in ("logits", "probs"):
        kept = mmfast.unimodal_ensemble([z.detach()[:, :2] + 0, other[:, :2]], [1.0, 1.0], combine)
        out = mmfast.unimodal_ensemble([z.detach()[:, :2] + 0, other[:, :2], bad[:, :2]], [1.0, 1.0, 0.0], combine)
        torch.testing.assert_close(out, kept)
        out = mmfast.unimodal_ensemble([other[:, :2], bad[:, :2]], [1.0, 1.0], combine)
        assert out[0].isnan().any() and not out[1].isnan().any()


def test_low_precision_is_combined_in_fp32_and_returned_in_the_input_dtype():
    zs64 = _logits(M=2, seed=4)
    zs = [z.to(torch.bfloat16) for z in zs64]
    for combine in ("logits", "probs"):
        out = mmfast.unimodal_ensemble(zs, [1.0, 3.0], combine)
        assert out.dtype == torch.bfloat16
        exact = mmfast.unimodal_ensemble([z.double() for z in zs], [1.0, 3.0], combine)
        torch.testing.assert_close(out.double(), exact, rtol=1e-2, atol=1e-2)


def test_ensemble_bad_input():
    zs = _logits(M=2)
    with pytest.raises(ValueError, match="combine"):
        mmfast.unimodal_ensemble(zs, combine="mean")
    with pytest.raises(ValueError, match="weights"):
        mmfast.unimodal_ensemble(zs, [1.0, -1.0])
    with pytest.raises(ValueError, match="weights"):
        mmfast.unimodal_ensemble(zs, [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="weights"):
        mmfast.unimodal_ensemble(zs, [0.0, 0.0])
    with pytest.raises(ValueError, match="weights"):
        mmfast.unimodal_ensemble(zs, torch.tensor([1.0, -0.5]))
    with pytest.raises(ValueError, match="weights"):
        mmfast.unimodal_ensemble(zs, torch.ones(3))
    with pytest.raises(TypeError, match="weights"):
        mmfast.unimodal_ensemble(zs, "uniform")
    with pytest.raises(TypeError, match="weights"):
        mmfast.unimodal_ensemble(zs, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="logits_list"):
        mmfast.unimodal_ensemble([zs[0], zs[1][:, :3]])
    with pytest.raises(TypeError, match="logits_list"):
        mmfast.unimodal_ensemble([torch.ones(2, 3, dtype=torch.long)] * 2)
    with pytest.raises(TypeError, match="logits_list"):
        mmfast.unimodal_ensemble([])


@pytest.mark.parametrize(
    ("ume", "joint", "higher", "tol", "choice"),
    [
        (0.81, 0.80, True, 0.0, "ume"),
        (0.80, 0.80, True, 0.0, "ume"),  # a tie picks UME
        (0.78, 0.80, True, 0.0, "umt"),
        (0.78, 0.80, True, 0.025, "ume"),
        (0.40, 0.45, False, 0.0, "ume"),  # a lower loss is better
        (0.50, 0.45, False, 0.0, "umt"),
    ],
)
def test_choose_late_fusion(ume, joint, higher, tol, choice):
    out = mmfast.choose_late_fusion(ume, joint, higher_is_better=higher, tolerance=tol)
    assert isinstance(out, mmfast.LateFusionChoice)
    assert out.choice == choice
    assert (out.ume_score, out.joint_score, out.tolerance, out.higher_is_better) == (ume, joint, tol, higher)
    assert out.margin == pytest.approx(ume - joint if higher else joint - ume)
    assert f"{ume:g}" in out.rule and f"{joint:g}" in out.rule and choice.upper() in out.rule


def test_choose_late_fusion_takes_tensor_scores_and_rejects_bad_ones():
    out = mmfast.choose_late_fusion(torch.tensor(0.7), torch.tensor([0.9]))
    assert out.choice == "umt" and out.margin == pytest.approx(-0.2)
    with pytest.raises(ValueError, match="ume_score"):
        mmfast.choose_late_fusion(float("nan"), 0.5)
    with pytest.raises(ValueError, match="joint_score"):
        mmfast.choose_late_fusion(0.5, torch.ones(2))
    with pytest.raises(TypeError, match="joint_score"):
        mmfast.choose_late_fusion(0.5, "0.4")
    with pytest.raises(ValueError, match="tolerance"):
        mmfast.choose_late_fusion(0.5, 0.4, tolerance=-0.1)
    with pytest.raises(TypeError, match="higher_is_better"):
        mmfast.choose_late_fusion(0.5, 0.4, higher_is_better="yes")
