"""Expected calibration error, its accumulator and the reliability diagram (the accumulator over a 2-process
gloo group: tests/test_distributed.py)."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from _utils import seed_of

import mmfast
from mmfast.calibration import CalibrationStats, bin_stats, confidences


def _logits_with_confidence(conf: list[float], correct: list[bool], C: int = 4, dtype=torch.float64):
    """Logits whose max softmax is ``conf[n]`` (on class 0; the rest share 1 - conf evenly) and labels
    that agree with the argmax where ``correct[n]``."""
    rows = []
    for c in conf:
        rest = (1.0 - c) / (C - 1)
        assert c > rest
        rows.append([math.log(c)] + [math.log(rest)] * (C - 1))
    labels = torch.tensor([0 if ok else 1 for ok in correct])
    return torch.tensor(rows, dtype=dtype), labels


def _naive_ece(logits: torch.Tensor, labels: torch.Tensor, n_bins: int) -> float:
    """ECE by the textbook loop over bins (lo, hi], float64."""
    p = torch.softmax(logits.double(), 1)
    conf, pred = p.max(1)
    correct = (pred == labels).double()
    ece = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += abs(correct[inside].mean() - conf[inside].mean()).item() * inside.sum().item() / len(conf)
    return ece


def test_perfectly_calibrated_is_zero():
    # 10 samples at confidence 0.8 of which 8 right, 4 at 0.5 of which 2 right
    logits, labels = _logits_with_confidence([0.8] * 10 + [0.5] * 4, [True] * 8 + [False] * 2 + [True, False] * 2)
    ece = mmfast.expected_calibration_error(logits, labels)
    assert ece.dim() == 0 and ece.dtype == torch.float64
    assert float(ece) == pytest.approx(0.0, abs=1e-12)


def test_all_confident_and_wrong_is_the_mean_confidence():
    conf = [0.9, 0.95, 0.99, 0.7]
    logits, labels = _logits_with_confidence(conf, [False] * 4)
    assert float(mmfast.expected_calibration_error(logits, labels)) == pytest.approx(sum(conf) / 4, abs=1e-12)


def test_hand_computed_two_bin_case():
    # bin (0, .5]: conf .3 (right), .4 (wrong): acc .5, conf .35, n 2 -> .15 * 2/5 = .06
    # bin (.5, 1]: conf .9, .6 (right), .7 (wrong): acc 2/3, conf 2.2/3, n 3 -> (.2/3) * 3/5 = .04
    logits, labels = _logits_with_confidence([0.3, 0.4, 0.9, 0.6, 0.7], [True, False, True, True, False])
    ece = mmfast.expected_calibration_error(logits, labels, n_bins=2)
    assert float(ece) == pytest.approx(0.10, abs=1e-12)
    assert float(ece) == pytest.approx(_naive_ece(logits, labels, 2), abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bins_are_left_open_right_closed(dtype):
    conf = torch.tensor([0.0, 0.25, 0.2500001, 0.5, 0.75, 0.7500001, 1.0, 0.3], dtype=dtype)
    counts = bin_stats(conf, torch.ones_like(conf, dtype=torch.bool), n_bins=4)[0]
    # (0, .25]: 0 (joins the first bin) and .25; (.25, .5]: .2500001, .5, .3; (.5, .75]: .75; (.75, 1]: the rest
    assert counts.tolist() == [2.0, 3.0, 1.0, 2.0]
    ten = bin_stats(torch.tensor([0.3, 0.1, 0.7, 0.30001], dtype=dtype), torch.ones(4, dtype=torch.bool), 10)[0]
    assert ten.nonzero().flatten().tolist() == [0, 2, 3, 6] and ten[2] == 1


@pytest.mark.parametrize("n_bins", [1, 3, 15])
def test_random_logits_match_the_textbook_loop(n_bins):
    g = torch.Generator().manual_seed(seed_of("ece", n_bins))
    logits = torch.randn(200, 7, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, 7, (200,), generator=g)
    ece = mmfast.expected_calibration_error(logits, labels, n_bins)
    assert float(ece) == pytest.approx(_naive_ece(logits, labels, n_bins), abs=1e-12)
    ece32 = mmfast.expected_calibration_error(logits.float(), labels, n_bins)
    assert ece32.dtype == torch.float32 and float(ece32) == pytest.approx(float(ece), abs=1e-5)
    bf = logits.to(torch.bfloat16)
    ece_bf = mmfast.expected_calibration_error(bf, labels, n_bins)
    assert ece_bf.dtype == torch.float32
    assert float(ece_bf) == pytest.approx(_naive_ece(bf.double(), labels, n_bins), abs=1e-5)


def test_nan_logits_propagate_and_inputs_are_untouched():
    logits = torch.randn(5, 3)
    labels = torch.tensor([0, 1, 2, 0, 1])
    versions = (logits._version, labels._version)
    mmfast.expected_calibration_error(logits, labels)
    assert (logits._version, labels._version) == versions
    logits[2, 1] = float("nan")
    assert mmfast.expected_calibration_error(logits, labels).isnan()


def test_compiles_fullgraph():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(64, 10, generator=g)
    labels = torch.randint(0, 10, (64,), generator=g)
    compiled = torch.compile(mmfast.expected_calibration_error, fullgraph=True)
    torch.testing.assert_close(compiled(logits, labels, 15), mmfast.expected_calibration_error(logits, labels))


def test_accumulator_equals_one_shot_over_the_concatenation():
    g = torch.Generator().manual_seed(6)
    batches = [(torch.randn(n, 6, generator=g) * 3, torch.randint(0, 6, (n,), generator=g)) for n in (17, 1, 0, 40)]
    acc = mmfast.CalibrationAccumulator(n_bins=10)
    for logits, labels in batches:
        acc.update(logits, labels)
    all_logits = torch.cat([b[0] for b in batches])
    all_labels = torch.cat([b[1] for b in batches])
    one_shot = mmfast.expected_calibration_error(all_logits, all_labels, n_bins=10)
    assert acc.local_count == 58
    torch.testing.assert_close(acc.compute().float(), one_shot)
    torch.testing.assert_close(acc.compute().float(), one_shot)  # compute does not change the state
    stats = acc.stats()
    assert stats.n_bins == 10 and float(stats.total) == 58
    torch.testing.assert_close(stats.ece(), acc.compute())
    one = CalibrationStats.from_logits(all_logits, all_labels, 10)
    torch.testing.assert_close(stats.counts, one.counts)
    torch.testing.assert_close(stats.correct_sum, one.correct_sum)
    empty = stats.counts == 0
    assert stats.accuracy[empty].isnan().all() and not stats.accuracy[~empty].isnan().any()
    assert ((stats.accuracy[~empty] >= 0) & (stats.accuracy[~empty] <= 1)).all()
    assert torch.equal(stats.edges, torch.arange(11, dtype=torch.float64) / 10)
    acc.reset()
    assert acc.local_count == 0
    with pytest.raises(ValueError, match="update"):
        acc.compute()
    acc.update_confidences(torch.tensor([0.9, 0.6]), torch.tensor([False, True]))
    assert float(acc.compute()) == pytest.approx((0.9 + 0.4) / 2, abs=1e-6)


def _is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_reliability_diagram_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib (optional extra 'plot') is not installed")
    from mmfast.plot import reliability_diagram

    g = torch.Generator().manual_seed(7)
    logits = torch.randn(300, 5, generator=g) * 2
    labels = torch.randint(0, 5, (300,), generator=g)
    out = reliability_diagram(logits, tmp_path / "a" / "from_logits.png", labels, n_bins=10, title="test")
    assert out.exists() and out.stat().st_size > 1000 and _is_png(out)
    acc = mmfast.CalibrationAccumulator()
    acc.update(logits, labels)
    assert _is_png(reliability_diagram(acc, tmp_path / "acc.png"))
    assert _is_png(reliability_diagram(acc.stats(), str(tmp_path / "stats.png")))
    with pytest.raises(ValueError, match="labels"):
        reliability_diagram(logits, tmp_path / "x.png")
    with pytest.raises(ValueError, match="path"):
        reliability_diagram(acc, tmp_path / "x.pdf")
    with pytest.raises(TypeError, match="source"):
        reliability_diagram([0.5], tmp_path / "x.png")


def test_reliability_diagram_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    from mmfast.plot import reliability_diagram

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    acc = mmfast.CalibrationAccumulator()
    acc.update(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ImportError, match="pip install matplotlib"):
        reliability_diagram(acc, tmp_path / "x.png")


def test_calibration_bad_input():
    logits, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    ece = mmfast.expected_calibration_error
    with pytest.raises(ValueError, match="n_bins"):
        ece(logits, labels, n_bins=0)
    with pytest.raises(TypeError, match="n_bins"):
        ece(logits, labels, n_bins=2.5)
    with pytest.raises(ValueError, match="n_bins"):
        mmfast.CalibrationAccumulator(n_bins=0)
    with pytest.raises(ValueError, match="labels"):
        ece(logits, torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ValueError, match="labels"):
        ece(logits, torch.tensor([0, -1, 2, 0]))
    with pytest.raises(TypeError, match="labels"):
        ece(logits, labels.float())
    with pytest.raises(TypeError, match="labels"):
        ece(logits, labels.bool())
    with pytest.raises(ValueError, match="labels"):
        ece(logits, labels[:3])
    with pytest.raises(ValueError, match="logits"):
        ece(logits.unsqueeze(0), labels)
    with pytest.raises(ValueError, match="logits"):
        ece(logits[:0], labels[:0])
    with pytest.raises(TypeError, match="logits"):
        ece(logits.long(), labels)
    with pytest.raises(TypeError, match="logits"):
        ece(logits.tolist(), labels)
    with pytest.raises(ValueError, match="confidence"):
        bin_stats(torch.rand(3), torch.ones(4, dtype=torch.bool))
    acc = mmfast.CalibrationAccumulator()
    with pytest.raises(ValueError, match="labels"):
        acc.update(logits, torch.tensor([0, 1, 5, 0]))
    assert confidences(logits, labels)[0].shape == (4,)
