"""MST-Distill recipe on AV-Digits (mmfast.recipes.mst_distill): stages, decay schedule, determinism, learning."""

from __future__ import annotations

import math

import pytest
import torch
from _utils import av_digits_slice

from mmfast.datasets import AVDigits, load_av_digits
from mmfast.nn import ChannelMask
from mmfast.recipes import mst_distill as mst
from mmfast.recipes._common import build_multimodal, build_unimodal, set_seed


@pytest.fixture(scope="module")
def data() -> AVDigits:
    return load_av_digits()


def test_loss_weight_schedule_replays_the_reference_loop():
    w_kl, w_lb = 2.0, 0.5  # the reference: after epoch e, w_lb *= 0.9 if e % 10 == 0; w_kl *= 0.5 if e % 30 == 0
    for epoch in range(95):
        assert mst.mst_loss_weights(epoch, 2.0, 0.5) == pytest.approx((w_kl, w_lb), rel=1e-12), epoch
        w_lb *= 0.9 if epoch % 10 == 0 else 1
        w_kl *= 0.5 if epoch % 30 == 0 else 1
    assert mst.mst_loss_weights(0) == (1.0, 1.0)
    assert mst.mst_loss_weights(1) == pytest.approx((0.5, 0.9))
    assert mst.mst_loss_weights(10) == pytest.approx((0.5, 0.9))
    assert mst.mst_loss_weights(11) == pytest.approx((0.5, 0.81))
    assert mst.mst_loss_weights(31) == pytest.approx((0.25, 0.9**4))
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="epoch"):
            mst.mst_loss_weights(bad)


def test_stage2_trains_only_the_masks(data):
    small = av_digits_slice(data, 96, 32)
    generator = set_seed(0)
    student = build_unimodal("image", width=4)
    cross = mst._freeze(build_unimodal("audio", width=4))
    multimodal = mst._freeze(build_multimodal(width=4))
    teachers = []
    for model, inputs, layer in ((multimodal, "both", "concat"), (cross, "audio", "feature_block.pool")):
        dim, spatial = mst._feature_dim(model, layer, small.train, inputs)
        mask = ChannelMask(dim, heads=2, spatial_reduction="learned" if spatial else "mean")
        teachers.append(mst.SpecializedTeacher(layer, model, inputs, layer, mask))
    assert [t.mask.dim for t in teachers] == [16, 8]  # 2F for the concat, 2w channels of the conv map

    def snapshot(module):
        return {k: v.clone() for k, v in module.state_dict().items()}

    before = {name: snapshot(m) for name, m in (("mm", multimodal), ("cross", cross), ("student", student))}
    masks_before = [snapshot(t.mask) for t in teachers]
    losses = mst.train_masks(teachers, student, "image", small, epochs=2, lr=1e-2, batch_size=32, temperature=4.0,
                             generator=generator, progress=False)
    assert len(losses) == 2 and all(math.isfinite(x) and x >= 0 for x in losses)
    for name, m in (("mm", multimodal), ("cross", cross), ("student", student)):
        after = m.state_dict()
        assert after.keys() == before[name].keys()
        for key, value in before[name].items():
            assert torch.equal(after[key], value), f"{name}.{key} changed in stage 2"
    for t, old in zip(teachers, masks_before, strict=True):
        assert not t.mask.training
        changed = [k for k, v in t.mask.state_dict().items() if not torch.equal(v, old[k])]
        assert "fc.weight" in changed and "qkv.weight" in changed, f"mask of {t.name} did not train: {changed}"
    # an unfrozen teacher is refused
    teachers[0].model.head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen"):
        mst.train_masks(teachers, student, "image", small, epochs=1, lr=1e-2, batch_size=32, temperature=4.0,
                        generator=generator, progress=False)


def _tiny_run(small: AVDigits, **kw):
    return mst.run_mst_distill(small, epochs_s1=1, epochs_s2=1, epochs_s3=2, width=4, batch_size=32, progress=False,
                               **kw)


def test_result_structure_and_determinism(data):
    small = av_digits_slice(data, 96, 40)
    a = _tiny_run(small, student_modality="audio", seed=3)
    b = _tiny_run(small, student_modality="audio", seed=3)
    assert a.name == "mst_distill"
    roles = [r.role for r in a.rows]
    assert roles == ["teacher"] * 6 + ["baseline", "student"]
    for row in a.rows:
        assert row.recipe == "mst_distill"
        assert 0.0 <= row.accuracy <= 1.0 and math.isfinite(row.accuracy)
        assert 0.0 <= row.ece <= 1.0 and math.isfinite(row.ece)
        if row.role == "teacher":
            assert row.loss_ms_per_step is None
        else:
            assert row.modality == "audio" and row.loss_ms_per_step > 0
    assert {r.modality for r in a.rows[:6]} == {"image+audio", "image"}
    assert sorted(len(v) for v in a.curves.values()) == [1, 1, 3, 3]  # teachers: stage 1; students: stages 1 + 3
    assert all(0.0 <= x <= 1.0 for v in a.curves.values() for x in v)
    assert len(a.reliability) == 2
    for logits, labels in a.reliability.values():
        assert logits.shape == (40, 10) and torch.equal(labels, small.test.label) and not logits.requires_grad
    # deterministic for a fixed seed: identical rows, curves and logits
    assert [(r.method, r.accuracy, r.ece) for r in a.rows] == [(r.method, r.accuracy, r.ece) for r in b.rows]
    assert a.curves == b.curves
    for key, (logits, _) in a.reliability.items():
        assert torch.equal(logits, b.reliability[key][0])
    c = _tiny_run(small, student_modality="audio", seed=4)
    assert not torch.equal(c.reliability[key][0], a.reliability[key][0])


def test_bad_arguments(data):
    with pytest.raises(ValueError, match="student_modality"):
        mst.run_mst_distill(data, student_modality="text")
    with pytest.raises(TypeError, match="data"):
        mst.run_mst_distill(object())
    with pytest.raises(ValueError, match="epochs_s1"):
        mst.run_mst_distill(data, epochs_s1=0)
    with pytest.raises(ValueError, match="top_k"):
        mst.run_mst_distill(data, mask_layers=1, top_k=3)
    with pytest.raises(ValueError, match="temperature"):
        mst.run_mst_distill(data, temperature=0.0)


def test_quick_preset_student_learns_on_real_data(data):
    result = mst.run_mst_distill(data, quick=True, progress=False)
    rows = {r.role: r for r in result.rows if r.role != "teacher"}
    assert rows["student"].accuracy > 0.5, result.notes
    assert rows["baseline"].accuracy > 0.5, result.notes
    teachers = [r for r in result.rows if r.role == "teacher"]
    assert teachers[0].method == "multimodal teacher" and teachers[0].accuracy > 0.5
