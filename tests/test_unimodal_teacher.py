"""UMT loss (``mmfast.nn.UniModalTeacherLoss`` / ``mmfast.unimodal_teacher_loss``) against plain PyTorch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _utils import backend_params, seed_of

import mmfast
from mmfast.nn import UMTLoss, UniModalTeacherLoss

FEATURE_SHAPES = [(5,), (3,), (2, 3, 3)]  # per modality, after the batch dim: different widths, one spatial


def _inputs(N=4, C=6, dtype=torch.float32, seed=0, shapes=FEATURE_SHAPES):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, C, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, C, (N,), generator=g)
    students = [torch.randn(N, *s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    teachers = [torch.randn(N, *s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    return logits, labels, students, teachers


def _plain(logits, labels, students, teachers, weight):
    return F.cross_entropy(logits, labels) + weight * sum(
        F.mse_loss(s, t.detach()) for s, t in zip(students, teachers, strict=True)
    )


@pytest.mark.parametrize(("backend", "device", "dtype"), backend_params(("torch", "cpu", "triton")))
@pytest.mark.parametrize("weight", [10.0, 0.5])
def test_value_and_gradients_match_plain_torch(backend, device, dtype, weight):
    logits, labels, students, teachers = _inputs(seed=seed_of("umt", backend, weight), dtype=dtype)
    if device != "cpu":
        logits, labels = logits.to(device), labels.to(device)
        students, teachers = [s.to(device) for s in students], [t.to(device) for t in teachers]
    leaves = [logits.clone().requires_grad_(), *[s.clone().requires_grad_() for s in students]]
    teacher_leaves = [t.clone().requires_grad_() for t in teachers]
    ref_leaves = [x.detach().clone().double().requires_grad_() for x in leaves]
    grad_out = torch.tensor(1.7, dtype=dtype, device=device)

    with mmfast.use_backend(backend):
        out = UniModalTeacherLoss(weight)(leaves[0], labels, leaves[1:], teacher_leaves)
    got = torch.autograd.grad(out, leaves, grad_out)
    want_value = _plain(ref_leaves[0], labels, ref_leaves[1:], [t.double() for t in teachers], weight)
    want = torch.autograd.grad(want_value, ref_leaves, grad_out.double())
    tol = {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(out.double(), want_value.detach(), **tol)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), b, **tol)
    # the teachers are stop-gradient: nothing reaches them even when they require grad
    with mmfast.use_backend(backend):
        out = mmfast.unimodal_teacher_loss(leaves[0], labels, leaves[1:], teacher_leaves, weight=weight)
    out.backward()
    assert all(t.grad is None for t in teacher_leaves)


def test_parts_module_and_weight_zero():
    logits, labels, students, teachers = _inputs(seed=1, dtype=torch.float64)
    parts = mmfast.unimodal_teacher_loss(logits, labels, students, teachers, return_parts=True)
    assert isinstance(parts, UMTLoss)
    torch.testing.assert_close(parts.cross_entropy, F.cross_entropy(logits, labels))
    torch.testing.assert_close(parts.distill, sum(F.mse_loss(s, t) for s, t in zip(students, teachers, strict=True)))
    torch.testing.assert_close(parts.total, parts.cross_entropy + 10.0 * parts.distill)
    module = UniModalTeacherLoss()
    assert module.weight == 10.0 and "weight=10.0" in repr(module)
    torch.testing.assert_close(module(logits, labels, students, teachers), parts.total)
    torch.testing.assert_close(module(logits, labels, students, teachers, return_parts=True).distill, parts.distill)
    zero = mmfast.unimodal_teacher_loss(logits, labels, students, teachers, weight=0.0)
    torch.testing.assert_close(zero, F.cross_entropy(logits, labels))
    one = mmfast.unimodal_teacher_loss(logits, labels, students[:1], teachers[:1], weight=2.0)
    torch.testing.assert_close(one, F.cross_entropy(logits, labels) + 2.0 * F.mse_loss(students[0], teachers[0]))


def test_inputs_are_not_written():
    logits, labels, students, teachers = _inputs(seed=2)
    tensors = [logits, labels, *students, *teachers]
    versions = [t._version for t in tensors]
    copies = [t.clone() for t in tensors]
    leaves = [s.requires_grad_() for s in students]
    mmfast.unimodal_teacher_loss(logits, labels, leaves, teachers).backward()
    assert [t._version for t in tensors] == versions
    assert all(torch.equal(a, b) for a, b in zip(tensors, copies, strict=True))


def test_nan_in_a_feature_propagates():
    logits, labels, students, teachers = _inputs(seed=3)
    teachers[1][0, 0] = float("nan")
    assert mmfast.unimodal_teacher_loss(logits, labels, students, teachers).isnan()


def test_forward_compiles_fullgraph():
    logits, labels, students, teachers = _inputs(seed=4)
    module = UniModalTeacherLoss(weight=3.0)
    compiled = torch.compile(module, fullgraph=True)
    torch.testing.assert_close(compiled(logits, labels, students, teachers), module(logits, labels, students, teachers))


def test_unimodal_teacher_bad_input():
    logits, labels, students, teachers = _inputs(seed=5)
    umt = mmfast.unimodal_teacher_loss
    with pytest.raises(ValueError, match="same modalities"):
        umt(logits, labels, students, teachers[:2])
    with pytest.raises(ValueError, match=r"teacher_features\[1\]"):
        umt(logits, labels, students, [teachers[0], teachers[1][:, :2], teachers[2]])
    with pytest.raises(TypeError, match=r"teacher_features\[0\]"):
        umt(logits, labels, students, [teachers[0].double(), *teachers[1:]])
    with pytest.raises(TypeError, match="student_features"):
        umt(logits, labels, students[0], teachers[0])
    with pytest.raises(ValueError, match="student_features"):
        umt(logits, labels, [], [])
    with pytest.raises(TypeError, match=r"student_features\[0\]"):
        umt(logits, labels, [students[0].long(), *students[1:]], teachers)
    with pytest.raises(ValueError, match=r"student_features\[0\]"):
        umt(logits, labels, [students[0][:3], *students[1:]], [teachers[0][:3], *teachers[1:]])
    with pytest.raises(TypeError, match="labels"):
        umt(logits, labels.float(), students, teachers)
    with pytest.raises(ValueError, match="labels"):
        umt(logits, labels[:2], students, teachers)
    with pytest.raises(ValueError, match="labels"):
        umt(logits, torch.full_like(labels, 6), students, teachers)
    with pytest.raises(ValueError, match="fused_logits"):
        umt(logits[0], labels, students, teachers)
    with pytest.raises(ValueError, match="weight"):
        umt(logits, labels, students, teachers, weight=-1.0)
    with pytest.raises(ValueError, match="weight"):
        UniModalTeacherLoss(weight=float("inf"))
