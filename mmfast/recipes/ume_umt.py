"""UME vs UMT on AV-Digits (Du et al., "On Uni-Modal Feature Learning in Supervised Multi-Modal Learning"; SPEC
sections 2 and 4).

The training split is cut (stratified by class) into a *fit* part and a validation part (``val_fraction``).
On the fit part:

* uni-modal models, one per modality (image, audio), are trained with cross-entropy on their modality alone;
* UME (uni-modal ensemble) late-fuses their predictions: z = sum_m w_m z_m with w_m = 1/M
  (:func:`mmfast.unimodal_ensemble`, ``combine="logits"``; ``"probs"`` averages probabilities instead);
* naive joint late-fusion training: a :class:`MultimodalNet` (image and audio encoders, fusion head) trained with CE;
* UMT (uni-modal teacher): the same network from the same initialisation, trained with
  L = CE(z_fused, y) + lambda * sum_m MSE(f_m, sg f_m^teacher) (:func:`mmfast.unimodal_teacher_loss`), f_m the
  network's encoder feature of modality m and f_m^teacher that of the uni-modal model of modality m.

The guiding strategy (:func:`mmfast.choose_late_fusion`) compares UME with naive joint training on the validation
part: UME when the uni-modal ensemble is at least as good (the paired, cross-modal features matter little), UMT
otherwise. Rows (test accuracy, ECE): the uni-modal models (role ``teacher``: they are UMT's teachers and UME's
members), joint training (``baseline``), and the two candidate methods UME and UMT (``student``), the chosen one
marked; the notes give the validation scores and the rule.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import mmfast
from mmfast.recipes._common import (
    MODALITIES,
    LossTimer,
    MethodResult,
    MultimodalNet,
    RecipeResult,
    SplitData,
    accuracy_and_ece,
    build_multimodal,
    check_data,
    check_epochs,
    check_number,
    evaluate,
    minibatches,
    model_inputs,
    num_classes_of,
    set_seed,
    split_rows,
    stratified_holdout,
    train_supervised,
    train_unimodal_models,
)

NAME = "ume_umt"
COMBINES = ("logits", "probs")


@dataclass(frozen=True)
class UmeUmtConfig:
    """Hyperparameters (the defaults are the demo's default run; :data:`QUICK` is the ``--quick`` preset).

    Attributes:
        epochs: epochs of every network (uni-modal models, joint late fusion, UMT).
        width: CNN width (encoder features F = 2 * width, the same for teachers and the fused net's encoders).
        umt_weight: lambda of the UMT feature-distillation term (mmfast's default 10).
        val_fraction: share of each class of the training split held out for the guiding strategy.
        tolerance: ``choose_late_fusion`` tolerance (UME if val acc(UME) >= val acc(joint) - tolerance).
        combine: how UME combines the uni-modal predictions, "logits" or "probs".
        lr, batch_size: AdamW learning rate (weight decay 1e-4) and batch size.
    """

    epochs: int = 12
    width: int = 32
    umt_weight: float = 10.0
    val_fraction: float = 0.2
    tolerance: float = 0.0
    combine: str = "logits"
    lr: float = 3e-3
    batch_size: int = 64

    def validate(self) -> UmeUmtConfig:
        check_epochs("epochs", self.epochs)
        check_epochs("width", self.width)
        check_epochs("batch_size", self.batch_size)
        check_number("umt_weight", self.umt_weight)
        check_number("tolerance", self.tolerance)
        check_number("lr", self.lr, strict=True)
        check_number("val_fraction", self.val_fraction, strict=True)
        if not self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {self.combine!r}")
        return self


QUICK = UmeUmtConfig(epochs=3, width=16)


def fused_forward(model: MultimodalNet, image: Tensor, audio: Tensor) -> tuple[Tensor, list[Tensor]]:
    """(logits (n, C), [image feature (n, F), audio feature (n, F)]) of a late-fusion net: the same logits as
    ``model(image, audio)``, plus the per-modality encoder features that UMT distils."""
    features = [model.image_net.features(image), model.audio_net.features(audio)]
    logits = model.head(model.fusion(model.concat(torch.cat(features, dim=1))))
    return logits, features


@torch.no_grad()
def encoder_features(model: nn.Module, split: Any, modality: str) -> Tensor:
    """Features (n, F) of a uni-modal model (eval mode, no grad; mode restored) on every row of ``split``."""
    was_training = model.training
    model.eval()
    try:
        return model.features(*model_inputs(split, modality)).detach()
    finally:
        model.train(was_training)


def train_umt(
    model: MultimodalNet,
    data: Any,
    teachers: dict[str, nn.Module],
    config: UmeUmtConfig,
    *,
    seed: int,
    progress: bool,
    desc: str,
) -> tuple[list[float], float]:
    """Train ``model`` in place on ``data.train`` with CE + umt_weight * sum_m MSE(f_m, sg f_m^teacher).

    The teachers' features are computed once (eval mode). Optimiser and batch order as in ``train_supervised``
    (AdamW, weight decay 1e-4, shuffling seeded with ``seed``). Returns (per-epoch test accuracy, loss ms per step).
    """
    train = data.train
    targets = [encoder_features(teachers[m], train, m) for m in MODALITIES]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    timer = LossTimer()
    curve: list[float] = []
    for _ in tqdm(range(config.epochs), desc=desc, disable=not progress, leave=False):
        model.train()
        for idx in minibatches(int(train.label.shape[0]), config.batch_size, generator):
            logits, features = fused_forward(model, *model_inputs(train, "both", idx))
            with timer:
                loss = mmfast.unimodal_teacher_loss(logits, train.label[idx], features, [t[idx] for t in targets],
                                                    weight=config.umt_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        curve.append(evaluate(model, data.test, "both").accuracy)
    return curve, timer.ms_per_step()


def run_ume_umt(
    data: Any,
    *,
    config: UmeUmtConfig | None = None,
    epochs: int | None = None,
    quick: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> RecipeResult:
    """UME vs UMT with the guiding strategy that picks one of them (see the module docstring).

    Args:
        data: an :class:`mmfast.datasets.AVDigits` (``train``/``test`` splits with image, audio, label).
        config: hyperparameters (default :class:`UmeUmtConfig()`, or :data:`QUICK` with ``quick``).
        epochs: overrides ``config.epochs``.
        seed: the uni-modal models start from ``seed`` and ``seed + 1``; joint training and UMT both from
            ``seed + 100`` with the same batch order (they differ only by the loss).
        progress: tqdm bars over epochs.

    Returns:
        A :class:`RecipeResult` named ``ume_umt``: rows, per-epoch test-accuracy curves, test logits of UME, joint
        training and UMT (``reliability``), and notes with the validation scores and the choice.
    """
    check_data(data)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    config = config if config is not None else (QUICK if quick else UmeUmtConfig())
    if not isinstance(config, UmeUmtConfig):
        raise TypeError(f"config must be an UmeUmtConfig, got {type(config).__name__}")
    if epochs is not None:
        config = dataclasses.replace(config, epochs=epochs)
    config.validate()

    train, test = data.train, data.test
    num_classes = num_classes_of(data)
    fit_idx, val_idx = stratified_holdout(train.label, config.val_fraction, torch.Generator().manual_seed(seed + 11))
    fit_data = SplitData(train=split_rows(train, fit_idx), test=test)
    val = split_rows(train, val_idx)

    reliability: dict[str, tuple[Tensor, Tensor]] = {}

    # uni-modal models: UME's members and UMT's teachers
    unimodal, rows, curves = train_unimodal_models(
        fit_data, test, what="uni-modal", recipe=NAME, num_classes=num_classes, width=config.width,
        epochs=config.epochs, lr=config.lr, batch_size=config.batch_size, seed=seed, progress=progress)

    def ume_logits(split: Any) -> Tensor:
        return mmfast.unimodal_ensemble([evaluate(unimodal[m], split, m).logits for m in MODALITIES],
                                        combine=config.combine)

    # UME: late fusion of the uni-modal predictions
    ume_test = ume_logits(test)
    ume_val_acc, _ = accuracy_and_ece(ume_logits(val), val.label)
    ume_acc, ume_ece = accuracy_and_ece(ume_test, test.label)

    # naive joint late-fusion training and UMT, from one initialisation and batch order
    fused_seed = seed + 100
    set_seed(fused_seed)
    initial = build_multimodal(num_classes, config.width).state_dict()

    def fresh_fused() -> MultimodalNet:
        model = build_multimodal(num_classes, config.width)
        model.load_state_dict(initial)
        return model

    joint = fresh_fused()
    joint_history = train_supervised(joint, fit_data, "both", epochs=config.epochs, lr=config.lr,
                                     batch_size=config.batch_size, seed=fused_seed, progress=progress,
                                     desc=f"{NAME}: joint late fusion")
    joint_val_acc = evaluate(joint, val, "both").accuracy
    joint_ev = evaluate(joint, test, "both")

    umt = fresh_fused()
    umt_curve, umt_ms = train_umt(umt, fit_data, unimodal, config, seed=fused_seed, progress=progress,
                                  desc=f"{NAME}: UMT")
    umt_val_acc = evaluate(umt, val, "both").accuracy
    umt_ev = evaluate(umt, test, "both")

    # the guiding strategy: UME vs naive joint training on validation data
    choice = mmfast.choose_late_fusion(ume_val_acc, joint_val_acc, tolerance=config.tolerance)
    mark = {"ume": "", "umt": ""}
    mark[choice.choice] = " [chosen]"
    both = "+".join(MODALITIES)
    rows.append(MethodResult(NAME, "joint late fusion (CE)", both, joint_ev.accuracy, joint_ev.ece,
                             joint_history.loss_ms_per_step, "baseline"))
    rows.append(MethodResult(NAME, f"UME ({config.combine} average){mark['ume']}", both, ume_acc, ume_ece, None,
                             "student"))
    rows.append(MethodResult(NAME, f"UMT (lambda {config.umt_weight:g}){mark['umt']}", both, umt_ev.accuracy,
                             umt_ev.ece, umt_ms, "student"))
    curves["joint late fusion"] = joint_history.test_accuracy
    curves["UMT"] = umt_curve
    reliability["joint late fusion"] = (joint_ev.logits, test.label)
    reliability["UME"] = (ume_test, test.label)
    reliability["UMT"] = (umt_ev.logits, test.label)

    chosen_acc, other_acc = (ume_acc, umt_ev.accuracy) if choice.choice == "ume" else (umt_ev.accuracy, ume_acc)
    other = "UMT" if choice.choice == "ume" else "UME"
    reason = ("the uni-modal ensemble is at least as good as joint training, so the paired (cross-modal) features add "
              "little and the uni-modal features are best learnt separately" if choice.choice == "ume" else
              "joint training beats the uni-modal ensemble, so paired (cross-modal) features matter and the fused "
              "model is kept, with its encoders distilled from the uni-modal teachers")
    notes = [
        f"Chosen: {choice.choice.upper()}: {reason}. Rule: {choice.rule}.",
        f"Validation accuracy ({len(val_idx)} held-out training rows): UME {100 * ume_val_acc:.1f}%, joint late "
        f"fusion {100 * joint_val_acc:.1f}%, UMT {100 * umt_val_acc:.1f}% (UMT is not part of the rule).",
        f"On test the chosen {choice.choice.upper()} scores {100 * chosen_acc:.1f}% vs {100 * other_acc:.1f}% for "
        f"{other} ({100 * (chosen_acc - other_acc):+.1f} pts).",
        f"All models trained on {len(fit_idx)} of {len(train.label)} training rows, {config.epochs} epochs, width "
        f"{config.width}, AdamW lr {config.lr:g}, batch {config.batch_size}, seed {seed}; UMT loss CE + "
        f"{config.umt_weight:g} * sum_m MSE(f_m, sg f_m^teacher) (mmfast.unimodal_teacher_loss).",
    ]
    return RecipeResult(NAME, rows, curves, reliability, notes)
