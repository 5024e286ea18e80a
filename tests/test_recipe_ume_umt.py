"""The UME-vs-UMT recipe: structure, the guiding strategy's choice, the UMT loss and forward, determinism, bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from _utils import av_digits_slice, torch_threads

import mmfast
from mmfast.datasets import AVDigits, load_av_digits
from mmfast.recipes import ume_umt
from mmfast.recipes._common import RecipeResult, build_multimodal, build_unimodal

TINY = ume_umt.UmeUmtConfig(epochs=2, width=4, batch_size=32)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def data() -> AVDigits:
    """A slice of the real AV-Digits data (the shipped splits are shuffled, so every class is there)."""
    full = load_av_digits()
    return av_digits_slice(full, 300, 120)


@pytest.fixture(scope="module")
def result(data) -> RecipeResult:
    return ume_umt.run_ume_umt(data, config=TINY, progress=False)


def _val_scores(result: RecipeResult) -> tuple[float, float]:
    note = next(n for n in result.notes if n.startswith("Validation accuracy"))
    ume = float(note.split("UME ")[1].split("%")[0]) / 100
    joint = float(note.split("joint late fusion ")[1].split("%")[0]) / 100
    return ume, joint


def test_rows_structure(result):
    assert result.name == "ume_umt"
    rows = result.rows
    assert [r.role for r in rows] == ["teacher", "teacher", "baseline", "student", "student"]
    assert [r.modality for r in rows] == ["image", "audio", "image+audio", "image+audio", "image+audio"]
    assert rows[0].method == "image uni-modal (CE)" and rows[1].method == "audio uni-modal (CE)"
    assert rows[2].method == "joint late fusion (CE)"
    assert rows[3].method.startswith("UME (logits average)") and rows[4].method.startswith("UMT (lambda 10)")
    for r in rows:
        assert r.recipe == "ume_umt" and 0 <= r.accuracy <= 1 and 0 <= r.ece <= 1
    assert rows[3].loss_ms_per_step is None  # UME trains nothing of its own
    assert all(r.loss_ms_per_step > 0 for r in rows if r is not rows[3])
    assert set(result.curves) == {"image uni-modal", "audio uni-modal", "joint late fusion", "UMT"}
    assert all(len(c) == 2 for c in result.curves.values())
    assert set(result.reliability) == {"joint late fusion", "UME", "UMT"}


def test_exactly_one_choice_and_it_follows_the_rule(result):
    chosen = [r.method for r in result.rows if r.method.endswith("[chosen]")]
    assert len(chosen) == 1
    ume_val, joint_val = _val_scores(result)
    expected = mmfast.choose_late_fusion(ume_val, joint_val).choice  # the note rounds to 0.1%: avoid exact ties
    if abs(ume_val - joint_val) > 0.002:
        assert chosen[0].startswith(expected.upper())
    assert result.notes[0].startswith(f"Chosen: {chosen[0][:3]}")
    assert "Rule: UME if ume_score >= joint_score" in result.notes[0]


def test_tolerance_flips_the_choice(data, result):
    """With a huge tolerance UME always wins the rule (UME if val(UME) >= val(joint) - tolerance)."""
    res = ume_umt.run_ume_umt(data, config=dataclasses.replace(TINY, epochs=1, tolerance=1.0), progress=False)
    assert res.rows[3].method.endswith("[chosen]") and not res.rows[4].method.endswith("[chosen]")


def test_ume_is_the_average_of_the_unimodal_logits(result, data):
    logits, labels = result.reliability["UME"]
    assert torch.equal(labels, data.test.label)
    acc = float((logits.argmax(1) == labels).double().mean())
    assert result.rows[3].accuracy == pytest.approx(acc)
    assert result.rows[3].ece == pytest.approx(float(mmfast.expected_calibration_error(logits, labels)))


def test_fused_forward_matches_the_model():
    torch.manual_seed(0)
    model = build_multimodal(10, 4).eval()
    image, audio = torch.rand(5, 1, 8, 8), torch.randn(5, 1, 32, 32)
    logits, features = ume_umt.fused_forward(model, image, audio)
    torch.testing.assert_close(logits, model(image, audio))
    torch.testing.assert_close(features[0], model.image_net.features(image))
    torch.testing.assert_close(features[1], model.audio_net.features(audio))


def test_train_umt_steps_on_the_umt_loss(data):
    """One full-batch epoch of train_umt is one AdamW step on CE + lambda * sum_m MSE(f_m, sg f_m^teacher)."""
    torch.manual_seed(1)
    n = len(data.train)
    config = dataclasses.replace(TINY, epochs=1, batch_size=n, umt_weight=3.0)
    teachers = {m: build_unimodal(m, 10, 4) for m in ("image", "audio")}
    model = build_multimodal(10, 4)
    reference = build_multimodal(10, 4)
    reference.load_state_dict(model.state_dict())
    ume_umt.train_umt(model, ume_umt.SplitData(data.train, data.test), teachers, config, seed=4, progress=False,
                      desc="")
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(4))
    image, audio, y = data.train.image[idx], data.train.audio[idx], data.train.label[idx]
    with torch.no_grad():
        targets = [teachers["image"].eval().features(image), teachers["audio"].eval().features(audio)]
    reference.train()
    f_img, f_aud = reference.image_net.features(image), reference.audio_net.features(audio)
    logits = reference.head(reference.fusion(torch.cat([f_img, f_aud], 1)))
    loss = F.cross_entropy(logits, y) + 3.0 * (F.mse_loss(f_img, targets[0]) + F.mse_loss(f_aud, targets[1]))
    opt = torch.optim.AdamW(reference.parameters(), lr=config.lr, weight_decay=1e-4)
    loss.backward()
    opt.step()
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    assert all(not p.requires_grad or p.grad is None for t in teachers.values() for p in t.parameters())


def test_deterministic_and_learns(data, result):
    again = ume_umt.run_ume_umt(data, config=TINY, progress=False)
    assert [dataclasses.astuple(r)[:5] for r in again.rows] == [dataclasses.astuple(r)[:5] for r in result.rows]
    assert again.notes[:3] == result.notes[:3]
    longer = ume_umt.run_ume_umt(data, config=dataclasses.replace(TINY, epochs=4, width=8), progress=False)
    rows = {r.method.split(" [")[0]: r for r in longer.rows}
    for method in ("image uni-modal (CE)", "joint late fusion (CE)", "UME (logits average)"):
        assert rows[method].accuracy > 0.5, method  # chance is 0.1 (UMT's feature term slows its start)


def test_combine_probs(data):
    res = ume_umt.run_ume_umt(data, config=dataclasses.replace(TINY, epochs=1, combine="probs"), progress=False)
    assert res.rows[3].method.startswith("UME (probs average)")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"config": dataclasses.replace(TINY, umt_weight=-1.0)}, ValueError, "umt_weight"),
        ({"config": dataclasses.replace(TINY, val_fraction=0.0)}, ValueError, "val_fraction"),
        ({"config": dataclasses.replace(TINY, combine="max")}, ValueError, "combine"),
        ({"config": dataclasses.replace(TINY, tolerance=float("nan"))}, ValueError, "tolerance"),
        ({"epochs": 0}, ValueError, "epochs"),
        ({"seed": "0"}, TypeError, "seed"),
        ({"config": "quick"}, TypeError, "config"),
    ],
)
def test_bad_arguments(data, kwargs, error, match):
    with pytest.raises(error, match=match):
        ume_umt.run_ume_umt(data, **({"config": TINY} | kwargs), progress=False)


def test_bad_data(data):
    with pytest.raises(TypeError, match="train"):
        ume_umt.run_ume_umt({"train": data.train}, config=TINY, progress=False)
