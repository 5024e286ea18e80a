"""Multimodal-teacher ensemble KD on AV-Digits (Radevski et al., "Multimodal Distillation for Egocentric Action
Recognition"; SPEC sections 1 and 4).

Uni-modal teachers, one per modality (image, audio), are trained with cross-entropy on the *fit* part of the training
split; the rest (``holdout_fraction``, stratified by class) is held out. Their logits z_e are combined into a
weighted-logit ensemble z_ens = sum_e w_e z_e (:func:`mmfast.unimodal_ensemble`), and a student that sees one modality
only (``student_modality``) is distilled from it on the whole training split with

    L = ce_weight * CE(x, y) + kd_weight * tau^2 * KL(softmax(z_ens / tau) || softmax(x / tau))

(:func:`mmfast.routed_kd_loss` with ``mix="logits"``: the fused weighted-logit ensemble KD loss). The teacher weights
w come from one of three schemes (the paper's ``None`` / ``per-sample`` / ``full-dataset``):

* ``uniform``: w_e = 1/E;
* ``softmin``: per sample, w_ne = softmin_e(CE(z_ne, y_n) / weight_temperature) (:func:`mmfast.teacher_weights`),
  which needs the label and so exists only while training;
* ``held-out``: one vector w_e = softmin_e(mean_n CE(z_ne, y_n) / weight_temperature) over the held-out rows, which
  the teachers never trained on.

Rows: each teacher, the uniform and the held-out-weighted ensemble (the test-time teachers), the CE-only student (the
same network, initialisation and batch order as the KD students, trained with ``ce_weight`` = 1, ``kd_weight`` = 0),
and one KD student per weighting; every row has test accuracy and ECE, and the training rows the milliseconds per
loss computation (:class:`mmfast.recipes._common.LossTimer`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

import mmfast
from mmfast.recipes._common import (
    MODALITIES,
    LossTimer,
    MethodResult,
    RecipeResult,
    SplitData,
    accuracy_and_ece,
    build_unimodal,
    check_data,
    check_epochs,
    check_number,
    evaluate,
    minibatches,
    model_inputs,
    num_classes_of,
    predict,
    set_seed,
    split_rows,
    stratified_holdout,
    train_supervised,
    train_unimodal_models,
)

NAME = "ensemble_kd"
WEIGHTINGS = ("uniform", "softmin", "held-out")


# ---------------------------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class EnsembleKDConfig:
    """Hyperparameters (the defaults are the demo's default run; :data:`QUICK` is the ``--quick`` preset).

    Attributes:
        teacher_epochs, student_epochs: epochs of teacher and student training.
        width: CNN width of every network (features F = 2 * width).
        temperature: tau of the KD term (scaled by tau^2).
        kd_weight, ce_weight: L = ce_weight * CE + kd_weight * KD for the KD students.
        weight_temperature: temperature of the softmin teacher weights (``softmin`` and ``held-out``).
        holdout_fraction: share of each class of the training split held out from the teachers (for ``held-out``).
        lr, batch_size: AdamW learning rate (weight decay 1e-4) and batch size of every network.
    """

    teacher_epochs: int = 12
    student_epochs: int = 12
    width: int = 32
    temperature: float = 4.0
    kd_weight: float = 1.0
    ce_weight: float = 1.0
    weight_temperature: float = 1.0
    holdout_fraction: float = 0.2
    lr: float = 3e-3
    batch_size: int = 64

    def validate(self) -> EnsembleKDConfig:
        check_epochs("teacher_epochs", self.teacher_epochs)
        check_epochs("student_epochs", self.student_epochs)
        check_epochs("width", self.width)
        check_epochs("batch_size", self.batch_size)
        check_number("temperature", self.temperature, strict=True)
        check_number("weight_temperature", self.weight_temperature, strict=True)
        check_number("kd_weight", self.kd_weight)
        check_number("ce_weight", self.ce_weight)
        check_number("lr", self.lr, strict=True)
        if self.kd_weight == 0 and self.ce_weight == 0:
            raise ValueError("kd_weight and ce_weight must not both be 0")
        check_number("holdout_fraction", self.holdout_fraction, strict=True)
        if not self.holdout_fraction < 1:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        return self


QUICK = EnsembleKDConfig(teacher_epochs=2, student_epochs=2, width=16)


# ---------------------------------------------------------------------------------------------------------------
# training


def ensemble_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    weighting: str,
    fixed_weights: Tensor | None,
    config: EnsembleKDConfig,
) -> Tensor:
    """ce_weight * CE(x, y) + kd_weight * tau^2 KL(softmax(sum_e w_e z_e / tau) || softmax(x / tau)), batch mean.

    x = ``student_logits`` [B, C], z = ``teacher_logits`` [E, B, C], y = ``labels`` [B]; w [B, E] is
    softmin_e(CE(z_e, y) / weight_temperature) per sample for ``weighting="softmin"``, else ``fixed_weights`` [E]
    (summing to 1) for every row.
    """
    if weighting == "softmin":
        w = mmfast.teacher_weights(teacher_logits, labels, temperature=config.weight_temperature, per_sample=True)
    elif weighting in WEIGHTINGS:
        if fixed_weights is None:
            raise ValueError(f"fixed_weights are required for weighting {weighting!r}")
        w = fixed_weights.expand(student_logits.shape[0], teacher_logits.shape[0])
    else:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    loss = config.kd_weight * mmfast.routed_kd_loss(student_logits, teacher_logits, w,
                                                     temperature=config.temperature, mix="logits")
    if config.ce_weight:
        loss = loss + config.ce_weight * F.cross_entropy(student_logits, labels)
    return loss


def distill_student(
    student: nn.Module,
    data: Any,
    modality: str,
    teacher_logits: Tensor,
    weighting: str,
    fixed_weights: Tensor | None,
    config: EnsembleKDConfig,
    *,
    seed: int,
    progress: bool,
    desc: str,
) -> tuple[list[float], float]:
    """Train ``student`` in place on ``data.train`` with ce_weight * CE + kd_weight * weighted-logit-ensemble KD.

    ``teacher_logits`` [E, n_train, C] (detached); ``weighting`` "softmin" computes per-sample weights from each
    batch's labels, otherwise ``fixed_weights`` [E] are used for every row. Minibatches and optimiser match
    :func:`train_supervised` (AdamW, weight decay 1e-4, shuffling from a generator seeded with ``seed``), so with the
    same initialisation the CE-only student differs only by its loss. Returns (per-epoch test accuracy, loss ms per
    step).
    """
    train = data.train
    n = int(train.label.shape[0])
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=1e-4)
    timer = LossTimer()
    curve: list[float] = []
    for _ in tqdm(range(config.student_epochs), desc=desc, disable=not progress, leave=False):
        student.train()
        for idx in minibatches(n, config.batch_size, generator):
            x = student(*model_inputs(train, modality, idx))
            z = teacher_logits[:, idx]
            y = train.label[idx]
            with timer:
                loss = ensemble_kd_loss(x, z, y, weighting, fixed_weights, config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        curve.append(evaluate(student, data.test, modality).accuracy)
    return curve, timer.ms_per_step()


def _label(weighting: str) -> str:
    return f"KD student ({weighting})"


def run_ensemble_kd(
    data: Any,
    *,
    student_modality: str = "image",
    weightings: Sequence[str] = WEIGHTINGS,
    config: EnsembleKDConfig | None = None,
    teacher_epochs: int | None = None,
    student_epochs: int | None = None,
    quick: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> RecipeResult:
    """Ensemble KD from uni-modal teachers to a ``student_modality`` student (see the module docstring).

    Args:
        data: an :class:`mmfast.datasets.AVDigits` (``train``/``test`` splits with image, audio, label).
        student_modality: "image" or "audio": the only input the students see.
        weightings: any of ``uniform``, ``softmin``, ``held-out`` (one KD student each, in this order).
        config: hyperparameters (default :class:`EnsembleKDConfig()`, or :data:`QUICK` with ``quick``).
        teacher_epochs, student_epochs: override the config's epochs.
        seed: teachers are initialised from ``seed`` and ``seed + 1``; every student (CE-only and KD) from
            ``seed + 100`` with the same batch order, so they differ only by their loss.
        progress: tqdm bars over epochs.

    Returns:
        A :class:`RecipeResult` named ``ensemble_kd`` with the rows, per-epoch test-accuracy curves, the test logits
        of the students, the CE-only student and the ensembles (``reliability``), and notes (weights, settings).
    """
    check_data(data)
    if student_modality not in MODALITIES:
        raise ValueError(f"student_modality must be one of {MODALITIES}, got {student_modality!r}")
    if isinstance(weightings, str) or not isinstance(weightings, (list, tuple)):
        raise TypeError(f"weightings must be a sequence of names from {WEIGHTINGS}, got {weightings!r}")
    for w in weightings:
        if w not in WEIGHTINGS:
            raise ValueError(f"weightings: unknown weighting {w!r}; expected any of {WEIGHTINGS}")
    weightings = tuple(dict.fromkeys(weightings))
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    config = config if config is not None else (QUICK if quick else EnsembleKDConfig())
    if not isinstance(config, EnsembleKDConfig):
        raise TypeError(f"config must be an EnsembleKDConfig, got {type(config).__name__}")
    if teacher_epochs is not None:
        config = dataclasses.replace(config, teacher_epochs=teacher_epochs)
    if student_epochs is not None:
        config = dataclasses.replace(config, student_epochs=student_epochs)
    config.validate()

    train, test = data.train, data.test
    num_classes = num_classes_of(data)
    fit_idx, held_idx = stratified_holdout(train.label, config.holdout_fraction,
                                           torch.Generator().manual_seed(seed + 7))
    fit_data = SplitData(train=split_rows(train, fit_idx), test=test)
    held = split_rows(train, held_idx)

    reliability: dict[str, tuple[Tensor, Tensor]] = {}

    # 1. uni-modal teachers (CE on the fit part)
    teachers, rows, curves = train_unimodal_models(
        fit_data, test, what="teacher", recipe=NAME, num_classes=num_classes, width=config.width,
        epochs=config.teacher_epochs, lr=config.lr, batch_size=config.batch_size, seed=seed, progress=progress)
    train_logits = torch.stack([predict(teachers[m], train, m) for m in MODALITIES])  # [E, n_train, C]
    held_logits = torch.stack([predict(teachers[m], held, m) for m in MODALITIES])
    test_logits = [evaluate(teachers[m], test, m).logits for m in MODALITIES]

    # 2. the ensembles that exist at test time: uniform and held-out weights
    held_weights = mmfast.teacher_weights(held_logits, held.label, temperature=config.weight_temperature,
                                          per_sample=False)[0]
    ensembles = {"uniform": None, "held-out": held_weights}
    for name, w in ensembles.items():
        if name != "uniform" and name not in weightings:
            continue
        logits = mmfast.unimodal_ensemble(test_logits, weights=w, combine="logits")
        acc, ece = accuracy_and_ece(logits, test.label)
        rows.append(MethodResult(NAME, f"ensemble ({name} weights)", "+".join(MODALITIES), acc, ece, None, "teacher"))
        reliability[f"ensemble ({name})"] = (logits, test.label)

    # 3. the CE-only student and one KD student per weighting, all from one initialisation and batch order
    student_seed = seed + 100
    set_seed(student_seed)
    initial = build_unimodal(student_modality, num_classes, config.width).state_dict()

    def fresh_student() -> nn.Module:
        student = build_unimodal(student_modality, num_classes, config.width)
        student.load_state_dict(initial)
        return student

    baseline = fresh_student()
    history = train_supervised(baseline, data, student_modality, epochs=config.student_epochs, lr=config.lr,
                               batch_size=config.batch_size, seed=student_seed, progress=progress,
                               desc=f"{NAME}: CE-only student")
    ev = evaluate(baseline, test, student_modality)
    rows.append(MethodResult(NAME, "CE-only student", student_modality, ev.accuracy, ev.ece,
                             history.loss_ms_per_step, "baseline"))
    curves["CE-only student"] = history.test_accuracy
    reliability["CE-only student"] = (ev.logits, test.label)

    E = len(MODALITIES)
    fixed = {"uniform": torch.full((E,), 1.0 / E), "held-out": held_weights, "softmin": None}
    for weighting in weightings:
        student = fresh_student()
        curve, ms = distill_student(student, data, student_modality, train_logits, weighting, fixed[weighting],
                                    config, seed=student_seed, progress=progress, desc=f"{NAME}: {_label(weighting)}")
        ev = evaluate(student, test, student_modality)
        rows.append(MethodResult(NAME, _label(weighting), student_modality, ev.accuracy, ev.ece, ms, "student"))
        curves[_label(weighting)] = curve
        reliability[_label(weighting)] = (ev.logits, test.label)

    # 4. notes
    softmin_mean = mmfast.teacher_weights(train_logits, train.label, temperature=config.weight_temperature).mean(0)
    names = ", ".join(MODALITIES)
    notes = [
        f"Teachers ({names}) trained with CE on {len(fit_idx)} of {len(train.label)} training rows; "
        f"{len(held_idx)} rows (stratified, {config.holdout_fraction:.0%}) held out for the held-out weights. "
        f"Students ({student_modality} only) trained on all {len(train.label)} training rows.",
        f"Held-out teacher weights ({names}): {_fmt(held_weights)}; mean per-sample softmin weights on the "
        f"training rows: {_fmt(softmin_mean)} (softmin needs the label, so it has no test-time ensemble).",
        f"KD loss: {config.ce_weight:g} * CE + {config.kd_weight:g} * tau^2 KL(softmax(sum_e w_e z_e / tau) || "
        f"softmax(x / tau)), tau = {config.temperature:g}, weight temperature {config.weight_temperature:g} "
        f"(mmfast.routed_kd_loss, mix='logits'); {config.teacher_epochs} teacher / {config.student_epochs} "
        f"student epochs, width {config.width}, AdamW lr {config.lr:g}, batch {config.batch_size}, seed {seed}.",
    ]
    base = next(r for r in rows if r.role == "baseline")
    students = [r for r in rows if r.role == "student"]
    if students:
        best = max(students, key=lambda r: r.accuracy)
        stderr = math.sqrt(max(base.accuracy * (1 - base.accuracy), 1e-12) / len(test.label))
        notes.append(
            f"Best KD student: {best.method}, test accuracy {100 * best.accuracy:.1f}% vs {100 * base.accuracy:.1f}% "
            f"for the CE-only student ({100 * (best.accuracy - base.accuracy):+.1f} pts; the binomial standard error "
            f"of one accuracy on {len(test.label)} test rows is {100 * stderr:.1f} pts); ECE "
            f"{100 * best.ece:.1f}% vs {100 * base.ece:.1f}%."
        )
    return RecipeResult(NAME, rows, curves, reliability, notes)


def _fmt(weights: Tensor) -> str:
    return "[" + ", ".join(f"{float(v):.3f}" for v in weights) + "]"
