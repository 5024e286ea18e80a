"""Bad input gets a ValueError / TypeError whose message names the argument (SPEC section 6)."""

from __future__ import annotations

import math

import pytest
import torch
from _utils import make_routed

import mmfast

N, C, E = 4, 5, 3


def _base(**overrides):
    inputs = make_routed(rows=N, C=C, E=E, dtype=torch.float32)
    inputs.pop("indices")
    inputs.update(overrides)
    return inputs


def _routed(**overrides):
    return lambda: mmfast.routed_kd_loss(**_base(**overrides))


def _dense(**overrides):
    """Dense logits [2, C, 3, 2] with class_dim=1 and per-sample weights [2, E]."""
    inputs = make_routed(rows=2, C=C, E=E, spatial=(3, 2), dtype=torch.float32)
    inputs.pop("indices")
    inputs.update(overrides)
    return lambda: mmfast.routed_kd_loss(**inputs)


_idx = torch.tensor([[0, 2], [1, 1], [2, 0], [0, 1]])
_w2 = torch.full((N, 2), 0.5)
_meta = torch.device("meta")
_x, _z = torch.randn(N, C), torch.randn(E, N, C)

BAD = {
    # shapes: student vs teachers
    "N-mismatch": (_routed(teacher_logits=torch.randn(E, N + 1, C)), ValueError, r"teacher_logits.*N or C"),
    "C-mismatch": (_routed(teacher_logits=torch.randn(E, N, C + 1)), ValueError, r"teacher_logits.*N or C"),
    "teacher-rank": (_routed(teacher_logits=torch.randn(N, C)), ValueError, r"teacher_logits"),
    "teacher-list-shapes": (
        _routed(teacher_logits=[torch.randn(N, C), torch.randn(N, C + 1)]),
        ValueError,
        r"teacher_logits",
    ),
    "teacher-empty-list": (_routed(teacher_logits=[]), TypeError, r"teacher_logits"),
    "dense-spatial-mismatch": (
        _dense(teacher_logits=torch.randn(E, 2, C, 3, 3)),
        ValueError,
        r"teacher_logits",
    ),
    # weights
    "weights-not-NxE": (_routed(weights=torch.rand(N, E + 1)), ValueError, r"weights must be \[4, 3\]"),
    "weights-transposed": (_routed(weights=torch.rand(E, N)), ValueError, r"weights"),
    "weights-1d": (_routed(weights=torch.rand(N)), ValueError, r"weights"),
    "dense-weights-per-pixel": (_dense(weights=torch.rand(12, E)), ValueError, r"weights must be \[2, 3\]"),
    "weights-int": (_routed(weights=torch.ones(N, E, dtype=torch.int64)), TypeError, r"weights"),
    "weights-not-tensor": (_routed(weights=[[1.0] * E] * N), TypeError, r"weights"),
    "weights-negative": (_routed(weights=torch.tensor([[0.5, -0.1, 0.6]] * N)), ValueError, r"weights.*>= 0"),
    # sparse routing
    "indices-weights-mismatch": (
        _routed(indices=_idx, weights=torch.rand(N, 1)),
        ValueError,
        r"weights.*shape of indices",
    ),
    "indices-wrong-rows": (_routed(indices=_idx[:3], weights=None), ValueError, r"indices must be \[4, K\]"),
    "indices-1d": (_routed(indices=_idx[:, 0], weights=None), ValueError, r"indices"),
    "indices-float": (_routed(indices=_idx.float(), weights=_w2), TypeError, r"indices"),
    "indices-bool": (_routed(indices=_idx > 0, weights=_w2), TypeError, r"indices"),
    "indices-too-large": (
        _routed(indices=torch.tensor([[0, 3]] * N), weights=_w2),
        ValueError,
        r"indices must be in \[0, 3\)",
    ),
    "indices-negative": (
        _routed(indices=torch.tensor([[0, -1]] * N), weights=_w2),
        ValueError,
        r"indices must be in \[0, 3\)",
    ),
    "indices-empty-K": (
        _routed(indices=torch.zeros(N, 0, dtype=torch.int64), weights=None),
        ValueError,
        r"indices",
    ),
    # logits dtypes
    "student-int": (
        _routed(student_logits=torch.ones(N, C, dtype=torch.int64)),
        TypeError,
        r"student_logits",
    ),
    "teacher-int": (
        _routed(teacher_logits=torch.ones(E, N, C, dtype=torch.int32)),
        TypeError,
        r"teacher_logits",
    ),
    "student-not-tensor": (_routed(student_logits=[[0.0] * C] * N), TypeError, r"student_logits"),
    "teacher-dtype-mismatch": (_routed(teacher_logits=_z.double()), TypeError, r"teacher_logits.*float64"),
    # devices (meta stands in for a second device)
    "teacher-device": (_routed(teacher_logits=_z.to(_meta)), ValueError, r"teacher_logits is on meta"),
    "weights-device": (_routed(weights=torch.rand(N, E, device=_meta)), ValueError, r"weights is on meta"),
    "indices-device": (_routed(indices=_idx.to(_meta), weights=_w2), ValueError, r"indices is on meta"),
    "mask-device": (
        _routed(mask=torch.ones(N, dtype=torch.bool, device=_meta)),
        ValueError,
        r"mask is on meta",
    ),
    # mask
    "mask-shape": (
        _routed(mask=torch.ones(N + 1, dtype=torch.bool)),
        ValueError,
        r"mask must have shape \(4,\)",
    ),
    "mask-2d": (_routed(mask=torch.ones(N, 1, dtype=torch.bool)), ValueError, r"mask must have shape"),
    "mask-float": (_routed(mask=torch.ones(N)), TypeError, r"mask must be a bool"),
    "mask-uint8": (_routed(mask=torch.ones(N, dtype=torch.uint8)), TypeError, r"mask must be a bool"),
    "dense-mask-shape": (
        _dense(mask=torch.ones(2, 6, dtype=torch.bool)),
        ValueError,
        r"mask must have shape \(2, 3, 2\)",
    ),
    # class_dim
    "class-dim-0": (_routed(class_dim=0), ValueError, r"class_dim"),
    "class-dim-2-on-4d": (_dense(class_dim=2), ValueError, r"class_dim"),
    "class-dim-last-on-4d": (_dense(class_dim=-1), ValueError, r"class_dim"),
    "student-1d": (
        _routed(student_logits=torch.randn(C), teacher_logits=torch.randn(E, C), weights=None),
        ValueError,
        r"student_logits must be \[N, C\]",
    ),
    # class_dim=1 is valid; the 1-D student is what is wrong, so the message must name it
    "class-dim-1-on-1d": (
        _routed(student_logits=torch.randn(C), teacher_logits=torch.randn(E, C), weights=None, class_dim=1),
        ValueError,
        r"student_logits",
    ),
    # beta, choices
    **{
        f"beta-{b}": (_routed(divergence="js", beta=b), ValueError, r"beta")
        for b in (0.0, 1.0, -0.5, 1.5, math.nan)
    },
    "mix-unknown": (
        _routed(mix="average"),
        ValueError,
        r"mix must be one of 'loss', 'logits', 'probs'; got 'average'",
    ),
    "divergence-unknown": (
        _routed(divergence="jsd"),
        ValueError,
        r"divergence must be one of 'kl', 'reverse_kl', 'js', 'tvd'; got 'jsd'",
    ),
    "reduction-unknown": (
        _routed(reduction="mean"),
        ValueError,
        r"reduction must be one of 'batchmean', 'sum', 'none'; got 'mean'",
    ),
    # temperature
    **{
        f"temperature-{t}": (_routed(temperature=t), ValueError, r"temperature must be a finite number > 0")
        for t in (0, -1, math.nan, math.inf)
    },
    "temperature-tensor": (_routed(temperature=torch.tensor(2.0)), TypeError, r"temperature"),
    # mutual KD
    "mutual-rank-2": (lambda: mmfast.mutual_kd_loss(_x), ValueError, r"logits must be \[M, N, C\]"),
    "mutual-rank-4": (
        lambda: mmfast.mutual_kd_loss(torch.randn(2, 3, 4, 5)),
        ValueError,
        r"logits must be \[M, N, C\]",
    ),
    "mutual-list-shapes": (lambda: mmfast.mutual_kd_loss([_x, _x[:, :2]]), ValueError, r"logits"),
    "mutual-int": (
        lambda: mmfast.mutual_kd_loss(torch.ones(2, N, C, dtype=torch.int64)),
        TypeError,
        r"logits",
    ),
    "mutual-empty": (lambda: mmfast.mutual_kd_loss(torch.randn(2, 0, C)), ValueError, r"logits"),
    **{
        f"mutual-temperature-{t}": (lambda t=t: mmfast.mutual_kd_loss(_z, t), ValueError, r"temperature")
        for t in (0, -1, math.nan, math.inf)
    },
    "mutual-reduction": (
        lambda: mmfast.mutual_kd_loss(_z, reduction="avg"),
        ValueError,
        r"reduction must be one of 'batchmean', 'sum', 'none'",
    ),
    # teacher weights
    "labels-too-large": (
        lambda: mmfast.teacher_weights(_z, torch.tensor([0, 1, 2, C])),
        ValueError,
        r"labels must be in \[0, 5\)",
    ),
    "labels-negative": (
        lambda: mmfast.teacher_weights(_z, torch.tensor([0, -1, 2, 3])),
        ValueError,
        r"labels",
    ),
    "labels-float": (lambda: mmfast.teacher_weights(_z, torch.zeros(N)), TypeError, r"labels"),
    "labels-bool": (
        lambda: mmfast.teacher_weights(_z, torch.zeros(N, dtype=torch.bool)),
        TypeError,
        r"labels",
    ),
    "labels-shape": (
        lambda: mmfast.teacher_weights(_z, torch.zeros(N + 1, dtype=torch.int64)),
        ValueError,
        r"labels",
    ),
    "labels-device": (
        lambda: mmfast.teacher_weights(_z, torch.zeros(N, dtype=torch.int64, device=_meta)),
        ValueError,
        r"labels is on meta",
    ),
    "teacher-weights-rank": (
        lambda: mmfast.teacher_weights(_x, torch.zeros(N, dtype=torch.int64)),
        ValueError,
        r"teacher_logits",
    ),
    "teacher-weights-temperature": (
        lambda: mmfast.teacher_weights(_z, torch.zeros(N, dtype=torch.int64), 0.0),
        ValueError,
        r"temperature",
    ),
    # load balance and router
    "load-balance-mode": (
        lambda: mmfast.load_balance_loss(torch.rand(N, E), "entropy"),
        ValueError,
        r"mode must be one of 'kl', 'cv'",
    ),
    "load-balance-rank": (
        lambda: mmfast.load_balance_loss(torch.rand(N)),
        ValueError,
        r"probs must be \[N, E\]",
    ),
    "load-balance-int": (
        lambda: mmfast.load_balance_loss(torch.ones(N, E, dtype=torch.int64)),
        TypeError,
        r"probs",
    ),
    "load-balance-cv-one-teacher": (
        lambda: mmfast.load_balance_loss(torch.ones(N, 1), "cv"),
        ValueError,
        r"probs.shape\[1\] >= 2",
    ),
    "router-top-k": (lambda: mmfast.nn.TeacherRouter(C, E, top_k=E + 1), ValueError, r"top_k"),
    "router-weighting": (
        lambda: mmfast.nn.TeacherRouter(C, E, weighting="sparse"),
        ValueError,
        r"weighting must be one of 'hard', 'soft'",
    ),
    "router-input": (
        lambda: mmfast.nn.TeacherRouter(C, E)(torch.randn(N, C + 1)),
        ValueError,
        r"student_logits",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_naming_the_argument(case):
    fn, exc, match = BAD[case]
    with pytest.raises(exc, match=match):
        fn()


def test_good_inputs_of_the_table_pass():
    """The base inputs the table perturbs are valid (each case fails for its own reason)."""
    _routed()()
    _dense()()
    _routed(indices=_idx, weights=_w2)()
    mmfast.mutual_kd_loss(_z)
    mmfast.teacher_weights(_z, torch.tensor([0, 1, 2, 4]))


@pytest.fixture
def value_checks_off():
    mmfast.set_value_checks(False)
    try:
        yield
    finally:
        mmfast.set_value_checks(True)


def test_value_checks_off_gives_nan_row_instead_of_error(value_checks_off):
    inputs = make_routed(rows=N, C=C, E=E, K=2, seed=3)
    good = inputs["indices"].clone()
    inputs["indices"][1, 0] = E  # out of range
    inputs["indices"][2, 1] = -1
    with mmfast.use_backend("torch"):
        rows = mmfast.routed_kd_loss(**inputs, reduction="none")
        x = inputs["student_logits"].clone().requires_grad_(True)
        mmfast.routed_kd_loss(
            x, inputs["teacher_logits"], inputs["weights"], indices=inputs["indices"], reduction="sum"
        ).backward()
        # negative weights are not checked either: the formula is applied as is
        mmfast.routed_kd_loss(
            inputs["student_logits"], inputs["teacher_logits"], -inputs["weights"], indices=good
        )
    assert rows[1].isnan() and rows[2].isnan()
    assert torch.isfinite(rows[[0, 3]]).all()
    assert x.grad[1:3].isnan().all() and torch.isfinite(x.grad[[0, 3]]).all()
    with mmfast.use_backend("torch"):
        valid = mmfast.routed_kd_loss(**{**inputs, "indices": good}, reduction="none")
    assert torch.equal(rows[[0, 3]], valid[[0, 3]])
    mmfast.set_value_checks(True)
    with pytest.raises(ValueError, match="indices"):
        mmfast.routed_kd_loss(**inputs)
