"""AV-Digits: a small offline two-modality (image + spoken digit) dataset shipped with mmfast.

Each of the 1,797 pairs is a real 8x8 handwritten digit scan (scikit-learn's digits, values 0..16) and a log-mel
spectrogram (32 mel bands x 32 frames) of the same digit's word spoken by espeak-ng with varied voices, speeds and
pitches under additive noise. The file ``mmfast/data/av_digits.npz`` is made by ``scripts/make_av_digits.py``; the
data card is ``mmfast/data/AV_DIGITS.md``. Loading needs numpy and torch only and never downloads anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["AVDigits", "AVSplit", "load_av_digits"]

FORMAT_VERSION = 1
CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_DEFAULT_PATH = Path(__file__).resolve().parent / "data" / "av_digits.npz"
_N_MELS = 32
_N_FRAMES = 32


@dataclass(frozen=True)
class AVSplit:
    """One split of AV-Digits; sample i is the pair (image[i], audio[i]) of class label[i].

    image: (n, 1, 8, 8) float32, pixel / 16 in [0, 1]. audio: (n, 1, 32, 32) float32 log-mel (mel band, frame),
    (dB - mean_train) / std_train with the train split's scalar mean and std. label: (n,) int64 in 0..9.
    """

    image: Tensor
    audio: Tensor
    label: Tensor

    def __post_init__(self) -> None:
        for name in ("image", "audio", "label"):
            if not isinstance(getattr(self, name), Tensor):
                raise TypeError(f"AVSplit: {name} must be a torch.Tensor, got {type(getattr(self, name)).__name__}")
        n = self.label.shape[0] if self.label.dim() > 0 else -1
        if self.label.dim() != 1 or self.image.shape[:1] != (n,) or self.audio.shape[:1] != (n,):
            raise ValueError(
                "AVSplit: image, audio and label must hold the same number of samples along dim 0 (label 1-D), got "
                f"image {tuple(self.image.shape)}, audio {tuple(self.audio.shape)}, label {tuple(self.label.shape)}"
            )

    def __len__(self) -> int:
        return int(self.label.shape[0])


@dataclass(frozen=True)
class AVDigits:
    """AV-Digits: the fixed stratified train (~75%) and test (~25%) splits and the class names."""

    train: AVSplit
    test: AVSplit
    classes: tuple[str, ...]


def _regen_hint(path: Path) -> str:
    return f"regenerate it with: python scripts/make_av_digits.py --out {path} (needs scikit-learn and espeak-ng)"


def _invalid(path: Path, reason: str) -> ValueError:
    return ValueError(f"invalid AV-Digits file {path}: {reason}; {_regen_hint(path)}")


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of the npz file, read fully (so a truncated or corrupt member fails here, not later)."""
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            return {}
        with data:
            return {key: np.asarray(data[key]) for key in data.files}
    except Exception as exc:  # BadZipFile, EOFError, zlib.error, OSError, ValueError (pickled data, bad header)...
        raise _invalid(path, f"cannot be read as an .npz archive ({type(exc).__name__}: {exc})") from exc


def _check_array(
    path: Path, arrays: dict[str, np.ndarray], key: str, dtype: type, shape: tuple[int, ...]
) -> np.ndarray:
    if key not in arrays:
        raise _invalid(path, f"missing array '{key}'")
    a = arrays[key]
    if a.dtype != dtype:
        raise _invalid(path, f"array '{key}' has dtype {a.dtype}, expected {np.dtype(dtype)}")
    if a.shape != shape:
        raise _invalid(path, f"array '{key}' has shape {a.shape}, expected {shape}")
    return a


def load_av_digits(path: str | os.PathLike | None = None) -> AVDigits:
    """Load AV-Digits from ``path`` (default: the file shipped in ``mmfast/data``) into float32/int64 tensors.

    image = pixel / 16; audio = (dB - mu) / sigma where dB = lo + q / 255 (hi - lo) dequantises the stored uint8
    log-mel q over the file's dB range [lo, hi], and mu, sigma are the mean and standard deviation of dB over all
    elements of the train split. Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a corrupt
    or invalid one; both messages name the file and the command that regenerates it. Never downloads.
    """
    if path is None:
        file = _DEFAULT_PATH
    elif isinstance(path, (str, os.PathLike)):
        file = Path(path)
    else:
        raise TypeError(f"load_av_digits: path must be a str, os.PathLike or None, got {type(path).__name__}")
    if not file.exists():
        raise FileNotFoundError(f"AV-Digits file not found: {file}; {_regen_hint(file)}")
    if not file.is_file():
        raise _invalid(file, "not a regular file")

    arrays = _read_arrays(file)
    if not arrays:
        raise _invalid(file, "not an .npz archive of arrays")
    version = _check_array(file, arrays, "version", np.int64, ())
    if int(version) != FORMAT_VERSION:
        raise _invalid(file, f"format version {int(version)}, this mmfast reads version {FORMAT_VERSION}")
    if "label" not in arrays or arrays["label"].ndim != 1:
        raise _invalid(file, "missing or non-1-D array 'label'")
    n = arrays["label"].shape[0]
    label = _check_array(file, arrays, "label", np.uint8, (n,))
    image = _check_array(file, arrays, "image", np.uint8, (n, 8, 8))
    audio = _check_array(file, arrays, "audio", np.uint8, (n, _N_MELS, _N_FRAMES))
    split = _check_array(file, arrays, "split", np.uint8, (n,))
    word = _check_array(file, arrays, "word", np.uint8, (n,))
    db_range = _check_array(file, arrays, "db_range", np.float64, (2,))
    if "classes" not in arrays or tuple(arrays["classes"].tolist()) != CLASSES:
        raise _invalid(file, f"array 'classes' missing or not {CLASSES}")
    if n == 0 or int(label.max()) >= len(CLASSES):
        raise _invalid(file, f"labels must be in 0..{len(CLASSES) - 1} and n > 0 (n = {n})")
    if int(image.max()) > 16:
        raise _invalid(file, f"image pixels must be in 0..16, max is {int(image.max())}")
    if not np.isin(split, (0, 1)).all() or not (split == 0).any() or not (split == 1).any():
        raise _invalid(file, "split must hold only 0 (train) and 1 (test), both present")
    if not np.array_equal(word, label):
        raise _invalid(file, "the audio clips' words differ from the labels (broken pairing)")
    lo, hi = (float(v) for v in db_range)
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise _invalid(file, f"db_range must be finite with lo < hi, got {db_range.tolist()}")

    db = lo + audio.astype(np.float64) * ((hi - lo) / 255.0)
    train = split == 0
    mean, std = db[train].mean(), db[train].std()
    if not std > 0:
        raise _invalid(file, "the train split's audio is constant")
    audio_std = ((db - mean) / std).astype(np.float32)
    image_f = image.astype(np.float32) / 16.0

    def make(mask: np.ndarray) -> AVSplit:
        return AVSplit(
            image=torch.from_numpy(np.ascontiguousarray(image_f[mask][:, None])),
            audio=torch.from_numpy(np.ascontiguousarray(audio_std[mask][:, None])),
            label=torch.from_numpy(label[mask].astype(np.int64)),
        )

    return AVDigits(train=make(train), test=make(~train), classes=CLASSES)
