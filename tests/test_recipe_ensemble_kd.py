"""The multimodal-teacher ensemble-KD recipe: structure, the loss it trains with, weights, determinism, bad input."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from _utils import av_digits_slice, torch_threads

import mmfast
from mmfast.datasets import AVDigits, load_av_digits
from mmfast.recipes import ensemble_kd as ekd
from mmfast.recipes._common import RecipeResult, build_unimodal

TINY = ekd.EnsembleKDConfig(teacher_epochs=2, student_epochs=2, width=4, batch_size=32)


def small_data(n_train: int = 300, n_test: int = 120) -> AVDigits:
    """A slice of the real AV-Digits data, small enough for second-long runs."""
    return av_digits_slice(load_av_digits(), n_train, n_test)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def data() -> AVDigits:
    return small_data()


@pytest.fixture(scope="module")
def result(data) -> RecipeResult:
    return ekd.run_ensemble_kd(data, config=TINY, progress=False)


def test_rows_structure(result):
    assert result.name == "ensemble_kd"
    methods = [r.method for r in result.rows]
    assert methods == [
        "image teacher (CE)", "audio teacher (CE)", "ensemble (uniform weights)", "ensemble (held-out weights)",
        "CE-only student", "KD student (uniform)", "KD student (softmin)", "KD student (held-out)",
    ]
    roles = [r.role for r in result.rows]
    assert roles == ["teacher"] * 4 + ["baseline"] + ["student"] * 3
    for r in result.rows:
        assert r.recipe == "ensemble_kd"
        assert 0.0 <= r.accuracy <= 1.0 and 0.0 <= r.ece <= 1.0
        if r.role in ("student", "baseline") or "(CE)" in r.method:
            assert r.loss_ms_per_step is not None and r.loss_ms_per_step > 0
        else:
            assert r.loss_ms_per_step is None
    assert all(r.modality == "image" for r in result.rows if r.role in ("student", "baseline"))
    # one curve per trained model, one point per epoch; reliability for the ensembles and every student
    assert set(result.curves) == {"image teacher", "audio teacher", "CE-only student", "KD student (uniform)",
                                  "KD student (softmin)", "KD student (held-out)"}
    assert all(len(c) == 2 for c in result.curves.values())
    assert set(result.reliability) == {"ensemble (uniform)", "ensemble (held-out)", "CE-only student",
                                       "KD student (uniform)", "KD student (softmin)", "KD student (held-out)"}
    assert any("Held-out teacher weights" in n for n in result.notes)


def test_reported_metrics_match_the_logits(result, data):
    """Each row's accuracy and ECE are those of the test logits kept for its reliability diagram."""
    names = {"CE-only student": "CE-only student", "KD student (softmin)": "KD student (softmin)",
             "ensemble (uniform)": "ensemble (uniform weights)"}
    rows = {r.method: r for r in result.rows}
    for key, method in names.items():
        logits, labels = result.reliability[key]
        assert torch.equal(labels, data.test.label)
        acc = float((logits.argmax(1) == labels).double().mean())
        ece = float(mmfast.expected_calibration_error(logits, labels))
        assert rows[method].accuracy == pytest.approx(acc)
        assert rows[method].ece == pytest.approx(ece)


def test_deterministic(data, result):
    again = ekd.run_ensemble_kd(data, config=TINY, progress=False)
    assert [dataclasses.astuple(r)[:5] for r in again.rows] == [dataclasses.astuple(r)[:5] for r in result.rows]
    assert again.curves == result.curves
    other = ekd.run_ensemble_kd(data, config=TINY, weightings=("uniform",), seed=1, progress=False)
    assert [r.method for r in other.rows][-2:] == ["CE-only student", "KD student (uniform)"]
    assert "ensemble (held-out weights)" not in [r.method for r in other.rows]


def test_learns_on_learnable_data(data):
    """A slightly longer run: teachers and students beat chance (10%) by far; the image net learns fastest."""
    config = dataclasses.replace(TINY, teacher_epochs=4, student_epochs=4, width=8)
    res = ekd.run_ensemble_kd(data, config=config, weightings=("softmin",), progress=False)
    rows = {r.method: r for r in res.rows}
    assert rows["image teacher (CE)"].accuracy > 0.6
    assert rows["ensemble (uniform weights)"].accuracy > 0.6
    assert rows["KD student (softmin)"].accuracy > 0.6
    assert rows["CE-only student"].accuracy > 0.6


def _hand_loss(x, z, y, w, tau, kd_weight, ce_weight):
    target = torch.log_softmax((w.t()[:, :, None] * z).sum(0) / tau, dim=1)
    kd = tau**2 * F.kl_div(torch.log_softmax(x / tau, 1), target, log_target=True, reduction="batchmean")
    return kd_weight * kd + ce_weight * F.cross_entropy(x, y)


@pytest.mark.parametrize("weighting", ["uniform", "held-out", "softmin"])
def test_ensemble_kd_loss_matches_hand_written(weighting):
    """ce_weight * CE + kd_weight * tau^2 KL(softmax(sum_e w_e z_e / tau) || softmax(x / tau)), value and gradient."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 10, generator=g, dtype=torch.float64, requires_grad=True)
    z = 3 * torch.randn(2, 7, 10, generator=g, dtype=torch.float64)
    y = torch.randint(10, (7,), generator=g)
    config = dataclasses.replace(TINY, temperature=3.0, kd_weight=0.7, ce_weight=0.4, weight_temperature=0.5)
    fixed = {"uniform": torch.tensor([0.5, 0.5]), "held-out": torch.tensor([0.8, 0.2]), "softmin": None}[weighting]
    if fixed is None:
        ce = torch.stack([F.cross_entropy(z[e], y, reduction="none") for e in range(2)], 1)
        w = torch.softmax(-ce / 0.5, dim=1)
    else:
        w = fixed.to(torch.float64).expand(7, 2)
    loss = ekd.ensemble_kd_loss(x, z, y, weighting, None if fixed is None else fixed.double(), config)
    expected = _hand_loss(x, z, y, w, 3.0, 0.7, 0.4)
    torch.testing.assert_close(loss, expected)
    (grad,) = torch.autograd.grad(loss, x)
    (grad_expected,) = torch.autograd.grad(expected, x)
    torch.testing.assert_close(grad, grad_expected)
    with pytest.raises(ValueError, match="weighting"):
        ekd.ensemble_kd_loss(x, z, y, "best", None, config)


def test_distill_student_steps_on_that_loss(data):
    """One epoch of distill_student (one full batch) is one AdamW step on ensemble_kd_loss, batches from the seed."""
    torch.manual_seed(0)
    n = len(data.train)
    config = dataclasses.replace(TINY, student_epochs=1, batch_size=n, temperature=3.0, kd_weight=0.7, ce_weight=0.4)
    teacher_logits = torch.randn(2, n, 10, generator=torch.Generator().manual_seed(5))
    student = build_unimodal("image", 10, 4)
    reference = build_unimodal("image", 10, 4)
    reference.load_state_dict(student.state_dict())
    fixed = torch.tensor([0.8, 0.2])
    ekd.distill_student(student, data, "image", teacher_logits, "held-out", fixed, config, seed=3, progress=False,
                        desc="")
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(3))
    reference.train()
    x = reference(data.train.image[idx])
    loss = _hand_loss(x, teacher_logits[:, idx], data.train.label[idx], fixed.expand(n, 2), 3.0, 0.7, 0.4)
    opt = torch.optim.AdamW(reference.parameters(), lr=config.lr, weight_decay=1e-4)
    loss.backward()
    opt.step()
    for (name, a), b in zip(student.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_stratified_holdout():
    labels = torch.arange(100) % 10
    fit, held = ekd.stratified_holdout(labels, 0.2, torch.Generator().manual_seed(0))
    assert fit.numel() == 80 and held.numel() == 20
    assert set(fit.tolist()).isdisjoint(held.tolist()) and set(fit.tolist()) | set(held.tolist()) == set(range(100))
    assert torch.equal(torch.bincount(labels[held], minlength=10), torch.full((10,), 2))
    with pytest.raises(ValueError, match="holdout fraction"):
        ekd.stratified_holdout(labels, 1.0, torch.Generator())


def test_does_not_modify_the_data(data):
    before = [t.clone() for t in (data.train.image, data.train.audio, data.train.label, data.test.label)]
    ekd.run_ensemble_kd(data, config=dataclasses.replace(TINY, teacher_epochs=1, student_epochs=1),
                        weightings=("uniform",), progress=False)
    after = (data.train.image, data.train.audio, data.train.label, data.test.label)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"student_modality": "video"}, ValueError, "student_modality"),
        ({"weightings": ("uniform", "best")}, ValueError, "weightings"),
        ({"weightings": "uniform"}, TypeError, "weightings"),
        ({"config": dataclasses.replace(TINY, temperature=0.0)}, ValueError, "temperature"),
        ({"config": dataclasses.replace(TINY, kd_weight=-1.0)}, ValueError, "kd_weight"),
        ({"config": dataclasses.replace(TINY, holdout_fraction=1.5)}, ValueError, "holdout_fraction"),
        ({"teacher_epochs": 0}, ValueError, "teacher_epochs"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"config": {"teacher_epochs": 1}}, TypeError, "config"),
    ],
)
def test_bad_arguments(data, kwargs, error, match):
    with pytest.raises(error, match=match):
        ekd.run_ensemble_kd(data, **({"config": TINY} | kwargs), progress=False)


def test_bad_data():
    with pytest.raises(TypeError, match="train"):
        ekd.run_ensemble_kd(object(), config=TINY, progress=False)


def test_quick_preset_is_small():
    assert ekd.QUICK.teacher_epochs <= 3 and ekd.QUICK.student_epochs <= 3
    default = ekd.EnsembleKDConfig()
    assert default.teacher_epochs > ekd.QUICK.teacher_epochs
    assert math.isclose(default.holdout_fraction, 0.2)
