"""AV-Digits (mmfast/data/av_digits.npz) and its loader :func:`mmfast.load_av_digits`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import mmfast
from mmfast.datasets import CLASSES, FORMAT_VERSION

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "mmfast" / "data" / "av_digits.npz"
REGEN = "python scripts/make_av_digits.py --out"


@pytest.fixture(scope="module")
def raw() -> dict[str, np.ndarray]:
    with np.load(DATA, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def ds() -> mmfast.AVDigits:
    return mmfast.load_av_digits()


def test_shapes_dtypes_ranges(ds):
    assert ds.classes == CLASSES == ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    assert len(ds.train) + len(ds.test) == 1797
    for split in (ds.train, ds.test):
        n = len(split)
        assert split.image.shape == (n, 1, 8, 8) and split.image.dtype == torch.float32
        assert split.audio.shape == (n, 1, 32, 32) and split.audio.dtype == torch.float32
        assert split.label.shape == (n,) and split.label.dtype == torch.int64
        assert 0.0 <= split.image.min() and split.image.max() <= 1.0
        assert torch.all((split.image * 16).round() == split.image * 16)  # pixel / 16 of integer pixels
        assert torch.isfinite(split.audio).all()
        assert set(split.label.tolist()) == set(range(10))  # every class in both splits


def test_stratified_split(ds):
    assert len(ds.test) == 450
    n_train = torch.bincount(ds.train.label, minlength=10)
    n_test = torch.bincount(ds.test.label, minlength=10)
    assert torch.all((n_test - 0.25 * (n_train + n_test)).abs() <= 0.5)


def test_train_audio_standardised(ds):
    a = ds.train.audio.double()
    assert abs(a.mean().item()) < 1e-4 and abs(a.std(unbiased=False).item() - 1.0) < 1e-4
    assert abs(ds.test.audio.double().mean().item()) < 0.1  # same statistics, not re-standardised on test
    assert abs(ds.test.audio.double().std().item() - 1.0) < 0.1


def test_file_metadata_and_pairing(raw, ds):
    n = 1797
    assert int(raw["version"]) == FORMAT_VERSION
    assert raw["label"].shape == (n,) and raw["label"].dtype == np.uint8
    # the pairing: each image's audio clip speaks the image's class
    np.testing.assert_array_equal(raw["word"], raw["label"])
    for key, table in (("voice", "voices"), ("speed", "speeds_wpm"), ("pitch", "pitches"), ("snr", "snrs_db"),
                       ("noise", "noise_kinds")):
        assert raw[key].shape == (n,) and int(raw[key].max()) < len(raw[table])
        assert len(np.unique(raw[key])) == len(raw[table]) > 1, key  # the variety is actually used
    assert tuple(raw["classes"].tolist()) == CLASSES
    lo, hi = raw["db_range"]
    assert lo < hi
    # the loader keeps the file's order within each split and dequantises then standardises the audio
    train = raw["split"] == 0
    np.testing.assert_array_equal(ds.train.label.numpy(), raw["label"][train])
    np.testing.assert_array_equal(ds.test.label.numpy(), raw["label"][~train])
    np.testing.assert_array_equal(ds.test.image[:, 0].numpy() * 16, raw["image"][~train])
    db = lo + raw["audio"].astype(np.float64) * (hi - lo) / 255
    expected = (db[~train] - db[train].mean()) / db[train].std()
    np.testing.assert_allclose(ds.test.audio[:, 0].numpy(), expected, rtol=0, atol=1e-5)


def test_images_are_sklearn_digits(raw, ds):
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    np.testing.assert_array_equal(raw["image"], digits.images.astype(np.uint8))
    np.testing.assert_array_equal(raw["image"], digits.images)  # integers 0..16, nothing lost
    np.testing.assert_array_equal(raw["label"], digits.target)
    train = raw["split"] == 0
    np.testing.assert_array_equal(ds.train.image[:, 0].numpy() * 16, digits.images[train])


def _ncm_accuracy(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> float:
    """Nearest class mean (Euclidean) on flattened features."""
    x_train, x_test = x_train.reshape(len(x_train), -1), x_test.reshape(len(x_test), -1)
    means = np.stack([x_train[y_train == c].mean(0) for c in range(10)])
    pred = ((x_test[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    return float((pred == y_test).mean())


def test_each_modality_is_informative(ds):
    y_tr, y_te = ds.train.label.numpy(), ds.test.label.numpy()
    acc_image = _ncm_accuracy(ds.train.image.numpy(), y_tr, ds.test.image.numpy(), y_te)
    # the words sit at random offsets in the clip: per-band maximum over time is a shift-invariant feature
    acc_audio = _ncm_accuracy(ds.train.audio.amax(-1).numpy(), y_tr, ds.test.audio.amax(-1).numpy(), y_te)
    assert acc_image > 0.8, acc_image  # chance is 0.1; measured 0.88
    assert acc_audio > 0.5, acc_audio  # measured 0.68


def test_loads_fresh_tensors(ds):
    again = mmfast.load_av_digits(str(DATA))  # str path works too
    again.train.audio.zero_()
    assert ds.train.audio.abs().sum() > 0
    assert torch.equal(mmfast.load_av_digits(DATA).train.audio, ds.train.audio)


def test_av_split_checks_its_fields():
    ok = mmfast.AVSplit(torch.zeros(3, 1, 8, 8), torch.zeros(3, 1, 32, 32), torch.zeros(3, dtype=torch.int64))
    assert len(ok) == 3
    with pytest.raises(ValueError, match="same number of samples"):
        mmfast.AVSplit(torch.zeros(3, 1, 8, 8), torch.zeros(2, 1, 32, 32), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="label"):
        mmfast.AVSplit(torch.zeros(3, 1, 8, 8), torch.zeros(3, 1, 32, 32), np.zeros(3))


# ---- error paths: every message names the file and the command that regenerates it ----


def _assert_names_file_and_fix(message: str, path: Path) -> None:
    assert str(path) in message, message
    assert f"{REGEN} {path}" in message, message
    assert "scikit-learn" in message and "espeak-ng" in message, message


def _write(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def test_missing_file(tmp_path):
    path = tmp_path / "nope.npz"
    with pytest.raises(FileNotFoundError) as info:
        mmfast.load_av_digits(path)
    _assert_names_file_and_fix(str(info.value), path)


def test_bad_path_type():
    with pytest.raises(TypeError, match="path"):
        mmfast.load_av_digits(3)


@pytest.mark.parametrize("kind", ["truncated", "garbage", "npy", "directory"])
def test_unreadable_file(tmp_path, kind):
    path = tmp_path / "bad.npz"
    if kind == "truncated":
        path.write_bytes(DATA.read_bytes()[: DATA.stat().st_size // 2])
    elif kind == "garbage":
        path.write_bytes(b"not a zip file at all" * 10)
    elif kind == "npy":
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
    else:
        path.mkdir()
    with pytest.raises(ValueError) as info:
        mmfast.load_av_digits(path)
    _assert_names_file_and_fix(str(info.value), path)


def _corrupt(raw: dict[str, np.ndarray], how: str) -> dict[str, np.ndarray]:
    arrays = dict(raw)
    if how == "audio_shape":
        arrays["audio"] = arrays["audio"][:, :, :31]
    elif how == "image_dtype":
        arrays["image"] = arrays["image"].astype(np.float32)
    elif how == "missing_label":
        del arrays["label"]
    elif how == "label_range":
        arrays["label"] = arrays["label"].copy()
        arrays["label"][0] = 10
        arrays["word"] = arrays["label"]
    elif how == "version":
        arrays["version"] = np.array(FORMAT_VERSION + 1, dtype=np.int64)
    elif how == "pairing":
        arrays["word"] = (arrays["word"] + 1) % 10
    elif how == "split_values":
        arrays["split"] = arrays["split"] * 2
    return arrays


@pytest.mark.parametrize(
    "how,words",
    [
        ("audio_shape", "'audio' has shape"),
        ("image_dtype", "'image' has dtype"),
        ("missing_label", "'label'"),
        ("label_range", "labels must be in 0..9"),
        ("version", "format version"),
        ("pairing", "pairing"),
        ("split_values", "split"),
    ],
)
def test_invalid_contents(tmp_path, raw, how, words):
    path = _write(tmp_path / f"{how}.npz", _corrupt(raw, how))
    with pytest.raises(ValueError) as info:
        mmfast.load_av_digits(path)
    assert words in str(info.value), str(info.value)
    _assert_names_file_and_fix(str(info.value), path)


def test_a_valid_rewrite_loads(tmp_path, raw, ds):
    """The corruption tests fail for the corruption, not for the rewrite: an untouched rewrite loads the same."""
    path = _write(tmp_path / "copy.npz", dict(raw))
    assert torch.equal(mmfast.load_av_digits(path).test.audio, ds.test.audio)


# ---- the generator's signal processing (numpy only; no espeak-ng or scikit-learn needed) ----


def _generator_module():
    spec = importlib.util.spec_from_file_location("make_av_digits", ROOT / "scripts" / "make_av_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_log_mel_of_a_tone_peaks_in_its_band():
    m = _generator_module()
    fb = m.mel_filterbank()
    assert fb.shape == (m.N_MELS, m.N_FFT // 2 + 1) and (fb >= 0).all()
    centres = m.mel_to_hz(np.linspace(m.hz_to_mel(m.F_MIN), m.hz_to_mel(m.F_MAX), m.N_MELS + 2))[1:-1]
    t = np.arange(m.CLIP_SAMPLES) / m.SAMPLE_RATE
    for f in (300.0, 1000.0, 4000.0):
        db = m.log_mel(np.sin(2 * np.pi * f * t), fb)
        assert db.shape == (m.N_MELS, m.N_FRAMES)
        peak = db.mean(1).argmax()
        assert abs(int(peak) - int(np.abs(centres - f).argmin())) <= 1, (f, centres[peak])
        assert np.ptp(db[peak]) < 0.5  # a stationary tone: every frame the same
    np.testing.assert_allclose(m.mel_to_hz(m.hz_to_mel(np.array([50.0, 1000.0, 8000.0]))), [50.0, 1000.0, 8000.0])
