"""Shared pieces of the AV-Digits recipes: small CNNs, batching, training, evaluation and result records.

The data are ``mmfast.datasets.AVSplit``-shaped objects: ``image`` (n, 1, 8, 8), ``audio`` (n, 1, 32, 32), float32,
and ``label`` (n,) int64. Everything here runs on the CPU and is deterministic for a fixed seed.

Models:

* :class:`UnimodalNet`: conv(1 -> w, 3x3, stride 1 for images, 2 for spectrograms) + BN + ReLU + 2x2 max-pool,
  conv(w -> 2w, 3x3) + BN + ReLU, adaptive average pool to 4x4, Linear(32w -> F) + ReLU with F = 2w
  (``feature_block``, ``features(x)`` -> (n, F)), and a linear ``head`` F -> C.
* :class:`MultimodalNet`: an image and an audio :class:`UnimodalNet` used as feature extractors, concatenated
  features (n, 2F) -> ``fusion`` Linear(2F -> F) + ReLU (``features(image, audio)`` -> (n, F)) -> ``head`` F -> C.

Training (:func:`train_supervised`) minimises the mean cross-entropy -1/B sum_i log softmax(z_i)_{y_i} with AdamW.
"""

from __future__ import annotations

import math
import random
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

import mmfast

MODALITIES = ("image", "audio")
INPUT_MODALITIES = ("image", "audio", "both")


def set_seed(seed: int) -> torch.Generator:
    """Seed torch's (and Python's) global RNG with ``seed`` and return a CPU ``torch.Generator`` seeded with it."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    torch.manual_seed(seed)
    random.seed(seed)
    return torch.Generator().manual_seed(seed)


def _check_modality(modality: str, allowed: tuple[str, ...] = MODALITIES) -> str:
    if modality not in allowed:
        raise ValueError(f"modality must be one of {allowed}, got {modality!r}")
    return modality


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


class UnimodalNet(nn.Module):
    """Small CNN for one modality: ``features(x)`` (n, F = 2 * width), ``head`` Linear(F, C); logits = head(features).

    Input (n, 1, H, W) (8x8 images, 32x32 spectrograms); see the module docstring. ``stem_stride`` 2 halves the
    input resolution in the first conv (the audio nets use it: 32x32 -> 16x16, a 4x cheaper net). The named layers of
    ``feature_block`` (``conv1 bn1 relu1 pool1 conv2 bn2 relu2 pool flatten fc relu``) are hook points:
    ``feature_block.pool`` gives (n, 2w, 4, 4), ``feature_block`` the features (n, F).
    """

    def __init__(self, num_classes: int = 10, width: int = 32, in_channels: int = 1, stem_stride: int = 1) -> None:
        super().__init__()
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("width", width)
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("stem_stride", stem_stride)
        self.num_classes = num_classes
        self.width = width
        self.feature_dim = 2 * width
        self.feature_block = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(in_channels, width, 3, stride=stem_stride, padding=1, bias=False),
                bn1=nn.BatchNorm2d(width),
                relu1=nn.ReLU(),
                pool1=nn.MaxPool2d(2),
                conv2=nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
                bn2=nn.BatchNorm2d(2 * width),
                relu2=nn.ReLU(),
                pool=nn.AdaptiveAvgPool2d(4),
                flatten=nn.Flatten(),
                fc=nn.Linear(2 * width * 16, self.feature_dim),
                relu=nn.ReLU(),
            )
        )
        self.head = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Features (n, F) of an input batch (n, 1, H, W)."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
        if x.dim() != 4:
            raise ValueError(f"x must be (n, channels, H, W), got shape {tuple(x.shape)}")
        return self.feature_block(x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (n, C) = head(features(x))."""
        return self.head(self.features(x))


class MultimodalNet(nn.Module):
    """Late-fusion net: image and audio :class:`UnimodalNet` features, concatenated (``concat``, an identity hook
    point giving (n, 2F)) -> ``fusion`` (Linear(2F, F) + ReLU) -> ``head`` Linear(F, C)."""

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.image_net = build_unimodal("image", num_classes, width)
        self.audio_net = build_unimodal("audio", num_classes, width)
        self.num_classes = num_classes
        self.feature_dim = 2 * width
        self.concat = nn.Identity()
        self.fusion = nn.Sequential(nn.Linear(2 * self.feature_dim, self.feature_dim), nn.ReLU())
        self.head = nn.Linear(self.feature_dim, num_classes)

    def features(self, image: Tensor, audio: Tensor) -> Tensor:
        """Fused features (n, F) = fusion([image_net.features(image), audio_net.features(audio)])."""
        both = torch.cat([self.image_net.features(image), self.audio_net.features(audio)], dim=1)
        return self.fusion(self.concat(both))

    def forward(self, image: Tensor, audio: Tensor) -> Tensor:
        """Logits (n, C) = head(features(image, audio))."""
        return self.head(self.features(image, audio))


def build_unimodal(modality: str, num_classes: int = 10, width: int = 32) -> UnimodalNet:
    """A :class:`UnimodalNet` for ``modality``: "image" (8x8, stem stride 1) or "audio" (32x32, stem stride 2)."""
    _check_modality(modality)
    return UnimodalNet(num_classes, width, stem_stride=2 if modality == "audio" else 1)


def build_multimodal(num_classes: int = 10, width: int = 32) -> MultimodalNet:
    """A :class:`MultimodalNet` (image + audio late fusion)."""
    return MultimodalNet(num_classes, width)


def model_inputs(split: Any, modality: str, idx: Tensor | None = None) -> tuple[Tensor, ...]:
    """The model inputs of ``split`` rows ``idx`` (all rows when None): "image" -> (image,), "audio" -> (audio,),
    "both" -> (image, audio)."""
    _check_modality(modality, INPUT_MODALITIES)
    names = MODALITIES if modality == "both" else (modality,)
    out = []
    for name in names:
        x = getattr(split, name, None)
        if not isinstance(x, Tensor):
            raise TypeError(f"split must have a tensor attribute {name!r}, got {type(x).__name__}")
        out.append(x if idx is None else x[idx])
    return tuple(out)


def minibatches(n: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """A random permutation of range(n) (drawn from ``generator``) cut into index batches of ``batch_size``
    (the last one may be smaller)."""
    _check_positive_int("n", n)
    _check_positive_int("batch_size", batch_size)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return list(torch.randperm(n, generator=generator).split(batch_size))


@dataclass
class Evaluation:
    """Test metrics: accuracy and ECE (fractions) and the detached test logits (n, C)."""

    accuracy: float
    ece: float
    logits: Tensor


@torch.no_grad()
def evaluate(model: nn.Module, split: Any, modality: str) -> Evaluation:
    """Accuracy, ECE (:func:`mmfast.expected_calibration_error`, 15 bins) and logits of ``model`` on ``split``,
    in eval mode without gradients (the model's train/eval mode is restored afterwards)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    was_training = model.training
    model.eval()
    try:
        logits = model(*model_inputs(split, modality)).detach()
    finally:
        model.train(was_training)
    labels = split.label
    accuracy = (logits.argmax(-1) == labels).double().mean().item()
    ece = mmfast.expected_calibration_error(logits, labels).item()
    return Evaluation(accuracy=accuracy, ece=ece, logits=logits)


class LossTimer:
    """``with timer: loss = ...`` adds the wall seconds of the block to ``seconds`` and counts ``calls``."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._start: float | None = None

    def __enter__(self) -> LossTimer:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self.calls += 1
            self._start = None

    def ms_per_step(self) -> float:
        """Mean milliseconds per timed block (0.0 before the first one)."""
        return 1000.0 * self.seconds / self.calls if self.calls else 0.0


@dataclass
class TrainHistory:
    """Per-epoch mean train loss and test accuracy, and the mean milliseconds per loss computation."""

    loss: list[float]
    test_accuracy: list[float]
    loss_ms_per_step: float


def _test_split(data: Any) -> Any:
    for name in ("train", "test"):
        if not hasattr(data, name):
            raise TypeError(f"data must have .train and .test splits (an AVDigits), got {type(data).__name__}")
    return data.test


def train_supervised(
    model: nn.Module,
    data: Any,
    modality: str,
    *,
    epochs: int,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    desc: str = "",
) -> TrainHistory:
    """Train ``model`` in place with mean cross-entropy CE = -1/B sum_i log softmax(z_i)_{y_i} and AdamW
    (weight decay 1e-4) on ``data.train`` for ``epochs`` epochs of shuffled minibatches (shuffling from a generator
    seeded with ``seed``); ``modality`` "image" / "audio" / "both" picks the inputs. Returns per-epoch train loss
    and test accuracy, and the milliseconds per CE call (:class:`LossTimer`)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_modality(modality, INPUT_MODALITIES)
    _check_positive_int("epochs", epochs)
    _check_positive_int("batch_size", batch_size)
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    test = _test_split(data)
    train = data.train
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    timer = LossTimer()
    history = TrainHistory(loss=[], test_accuracy=[], loss_ms_per_step=0.0)
    for _ in tqdm(range(epochs), desc=desc or f"CE {modality}", disable=not progress, leave=False):
        model.train()
        total, count = 0.0, 0
        for idx in minibatches(len(train.label), batch_size, generator):
            logits = model(*model_inputs(train, modality, idx))
            with timer:
                loss = F.cross_entropy(logits, train.label[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
            count += len(idx)
        history.loss.append(total / count)
        history.test_accuracy.append(evaluate(model, test, modality).accuracy)
    history.loss_ms_per_step = timer.ms_per_step()
    return history


@dataclass
class MethodResult:
    """One row of the demo's table; ``role`` is "teacher", "student" or "baseline"."""

    recipe: str
    method: str
    modality: str
    accuracy: float
    ece: float
    loss_ms_per_step: float | None
    role: str


@dataclass
class RecipeResult:
    """A recipe's rows, per-epoch test-accuracy curves (label -> list), reliability data
    (label -> (test logits, test labels)) and free-text notes."""

    name: str
    rows: list[MethodResult]
    curves: dict[str, list[float]] = field(default_factory=dict)
    reliability: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# data helpers and shared steps of the ensemble-KD and UME/UMT recipes


@dataclass
class Rows:
    """A subset of an AV-Digits split: ``image`` (n, 1, 8, 8), ``audio`` (n, 1, 32, 32), ``label`` (n,)."""

    image: Tensor
    audio: Tensor
    label: Tensor

    def __len__(self) -> int:
        return int(self.label.shape[0])


@dataclass
class SplitData:
    """A train/test pair shaped like :class:`mmfast.datasets.AVDigits` (what ``train_supervised`` reads)."""

    train: Any
    test: Any


def split_rows(split: Any, idx: Tensor) -> Rows:
    """Rows ``idx`` of ``split`` (new tensors; the split is not modified)."""
    return Rows(image=split.image[idx], audio=split.audio[idx], label=split.label[idx])


def check_data(data: Any) -> None:
    """Raise ``TypeError`` unless ``data`` has ``train``/``test`` splits with image, audio and label tensors."""
    for split_name in ("train", "test"):
        split = getattr(data, split_name, None)
        if split is None:
            raise TypeError(f"data must have .train and .test splits (an AVDigits), got {type(data).__name__}")
        for name in ("image", "audio", "label"):
            if not isinstance(getattr(split, name, None), Tensor):
                raise TypeError(f"data.{split_name}.{name} must be a tensor")
        if split.label.dim() != 1 or len({split.image.shape[0], split.audio.shape[0], split.label.shape[0]}) != 1:
            raise ValueError(f"data.{split_name}: image, audio and label must have one row per sample")


def num_classes_of(data: Any) -> int:
    """``len(data.classes)`` when the data names its classes, else the largest label + 1."""
    classes = getattr(data, "classes", None)
    if classes is not None:
        return len(classes)
    return int(max(int(data.train.label.max()), int(data.test.label.max())) + 1)


def stratified_holdout(labels: Tensor, fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Split row ids 0..n-1 into (fit, held_out): per class, round(fraction * n_class) random rows are held out
    (at least one per class with two or more rows when fraction > 0, and never a whole class). Both sorted."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must be a number in (0, 1), got {fraction!r}")
    held = []
    for c in torch.unique(labels).tolist():
        rows = torch.nonzero(labels == c).flatten()
        rows = rows[torch.randperm(rows.numel(), generator=generator)]
        k = min(max(round(fraction * rows.numel()), 1), rows.numel() - 1)
        held.append(rows[:k])
    held_out = torch.cat(held).sort().values if held else labels.new_zeros(0)
    mask = torch.ones(labels.shape[0], dtype=torch.bool)
    mask[held_out] = False
    fit = torch.nonzero(mask).flatten()
    if fit.numel() == 0 or held_out.numel() == 0:
        raise ValueError(f"cannot hold out {fraction} of {labels.shape[0]} rows: one part would be empty")
    return fit, held_out


@torch.no_grad()
def predict(model: nn.Module, split: Any, modality: str, batch_size: int = 512) -> Tensor:
    """Logits (n, C) of ``model`` in eval mode on all rows of ``split`` (mode restored afterwards)."""
    was_training = model.training
    model.eval()
    try:
        n = int(split.label.shape[0])
        out = [model(*model_inputs(split, modality, torch.arange(i, min(i + batch_size, n))))
               for i in range(0, n, batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out).detach()


def accuracy_and_ece(logits: Tensor, labels: Tensor) -> tuple[float, float]:
    """(top-1 accuracy, ECE with 15 bins) of logits (n, C) against integer labels (n,), as fractions."""
    accuracy = float((logits.argmax(-1) == labels).double().mean())
    return accuracy, float(mmfast.expected_calibration_error(logits, labels))


def check_epochs(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def check_number(name: str, value: Any, *, minimum: float = 0.0, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {minimum:g}, got {value}")
    return value


def train_unimodal_models(
    fit_data: Any, test: Any, *, what: str, recipe: str, num_classes: int, width: int, epochs: int, lr: float,
    batch_size: int, seed: int, progress: bool,
) -> tuple[dict[str, nn.Module], list[MethodResult], dict[str, list[float]]]:
    """One :class:`UnimodalNet` per modality trained with cross-entropy on ``fit_data.train`` (modality k with seed
    ``seed + k``) and evaluated on ``test``. Returns the models, their table rows (method "<modality> <what> (CE)",
    role "teacher") and their per-epoch test-accuracy curves (keyed "<modality> <what>")."""
    models: dict[str, nn.Module] = {}
    rows: list[MethodResult] = []
    curves: dict[str, list[float]] = {}
    for k, modality in enumerate(MODALITIES):
        set_seed(seed + k)
        model = build_unimodal(modality, num_classes, width)
        history = train_supervised(model, fit_data, modality, epochs=epochs, lr=lr, batch_size=batch_size,
                                   seed=seed + k, progress=progress, desc=f"{recipe}: {modality} {what}")
        models[modality] = model
        ev = evaluate(model, test, modality)
        rows.append(MethodResult(recipe, f"{modality} {what} (CE)", modality, ev.accuracy, ev.ece,
                                 history.loss_ms_per_step, "teacher"))
        curves[f"{modality} {what}"] = history.test_accuracy
    return models, rows, curves
