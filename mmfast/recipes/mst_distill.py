"""MST-Distill (mixture of specialized teachers, cross-modal KD) on AV-Digits, all three stages.

A uni-modal student (``student_modality`` "image" or "audio") learns from a multimodal teacher
(:class:`~mmfast.recipes._common.MultimodalNet`, image + audio) and a cross-modal teacher (a
:class:`~mmfast.recipes._common.UnimodalNet` on the *other* modality), following the reference implementation
(github.com/Gray-OREO/MST-Distill, ``main-MST-Distill.py``). Notation: tau the temperature (4, as the reference),
p = softmax(z / tau), KL(p || q) = sum_c p_c (log p_c - log q_c), batchmean = mean over the batch's rows.

Stage 1, collaborative training (``epochs_s1``). The multimodal teacher, the cross-modal teacher and the student
network itself (the uni-modal model of the student's modality; the reference co-trains it, so stage 1 is also the
student's warm start) are trained together, nothing detached, with one AdamW over all three:

    L1 = sum_m CE(z_m, y) + sum over ordered pairs i != j of tau^2 KL(p_j || p_i)     (:func:`mmfast.mutual_kd_loss`)

Stage 2, specialized teachers (``epochs_s2``). The teachers are frozen (eval mode, ``requires_grad`` off). Each gets
``mask_layers`` :class:`mmfast.nn.ChannelMask` modules (3 heads, the factorized O(D h) parameterization), each hooked
onto one feature layer with :func:`mmfast.nn.attach_channel_mask`, which makes one specialized teacher per mask
(E = 2 * mask_layers teachers). Layers, in order: multimodal teacher ``fusion`` (the fused features, F) and
``concat`` (the concatenated uni-modal features, 2F); cross-modal teacher ``feature_block`` (its features, F) and
``feature_block.pool`` (the last conv map, 2w x 4 x 4, reduced by MST's learned spatial reduction) -- the
reference's two layers per teacher (``mask_layers=1`` keeps the feature blocks). Only the masks train (Adam),
towards the stage-1 student, frozen and in eval mode (SPEC section 2 and the reference: the student is the target):

    L2 = sum over masks k of tau^2 KL(sg(p_student) || p_teacher_k^masked)            (:func:`mmfast.routed_kd_loss`,
                                                                                     E = 1, the masked teacher in
                                                                                     the "student" slot)

The masks are independent, so one Adam over all of them equals the reference's one optimizer per mask.

Stage 3, routed distillation (``epochs_s3``). A :class:`mmfast.nn.TeacherRouter` maps the student's logits
(not detached, as the reference) to E teacher scores pi (Linear(C, 2C) -> Linear(2C, E) -> softmax), picks the
top-k (k = 1) specialized teachers with weight 1/k each ("hard", the reference), and the student + router train
(fresh AdamW) in epoch e with

    L3 = CE(z_s, y) + w_kl(e) * sum_{j in topk} (1/k) tau^2 KL(p_j || p_s)           (:func:`mmfast.routed_kd_loss`)
                    + w_lb(e) * (1/E) KL(u || mean_n pi_n)                            (:func:`mmfast.load_balance_loss`)

The weights decay as the reference's loop does after every epoch e (0-based): ``w_lb *= 0.9 if e % 10 == 0`` and
``w_kl *= 0.5 if e % 30 == 0``, so during epoch e, w_lb(e) = w_lb * 0.9^ceil(e/10) and w_kl(e) = w_kl *
0.5^ceil(e/30) (:func:`mst_loss_weights`; note the reference already decays both after epoch 0). The frozen masked
teachers see no augmentation, so their train-set logits are computed once before stage 3 (the same values the
reference recomputes per batch).

Baseline: a CE-only student of the same modality, from the same initial weights, trained with
:func:`~mmfast.recipes._common.train_supervised` for ``epochs_s1 + epochs_s3`` epochs (as many student updates as
the MST student) with the same seed. The reference keeps the best-validation checkpoints; AV-Digits has no
validation split here, so every model is evaluated at its last epoch.

Defaults (about 1-1.5 minutes on 2 CPU cores, measured 64-77 s with one thread on a shared machine):
``epochs_s1=20, epochs_s2=4, epochs_s3=20``, width 32, batch 64, AdamW lr 3e-3 (weight decay 1e-4) for stages 1
and 3, Adam lr 1e-3 for the masks, tau = 4, top-1 routing, ``mask_layers=2``, w_kl = w_lb = 1. ``quick=True``:
``epochs_s1=3, epochs_s2=1, epochs_s3=3`` and width 16 (about 3-12 s). Stage 2 is the costliest per epoch (four
masked-teacher forwards and four channel-attention masks per batch). Rows of the result: the two co-trained teachers
and the E specialized (masked) teachers (role "teacher"), the CE baseline ("baseline") and the MST student
("student"); ``loss_ms_per_step`` of the student is the time in the router + routed-KD + load-balance calls, of the
baseline the time in the CE call. Results are deterministic for a fixed seed and thread count (the CPU convolution
kernels reduce in a thread-count-dependent order).

Command line: ``python -m mmfast.recipes.mst_distill [--quick] [--student image|audio] [--seed N]``.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

import mmfast
from mmfast.nn import ChannelMask, TeacherRouter, attach_channel_mask
from mmfast.recipes._common import (
    MODALITIES,
    LossTimer,
    MethodResult,
    RecipeResult,
    build_multimodal,
    build_unimodal,
    evaluate,
    minibatches,
    model_inputs,
    set_seed,
    train_supervised,
)

NAME = "mst_distill"
DEFAULT_EPOCHS = (20, 4, 20)  # stage 1, stage 2, stage 3
QUICK_EPOCHS = (3, 1, 3)
DEFAULT_WIDTH = 32
QUICK_WIDTH = 16
MULTIMODAL_LAYERS = ("fusion", "concat")
UNIMODAL_LAYERS = ("feature_block", "feature_block.pool")


def mst_loss_weights(epoch: int, w_kl: float = 1.0, w_lb: float = 1.0) -> tuple[float, float]:
    """The (KD, load-balance) weights in force during stage-3 epoch ``epoch`` (0-based), as MST-Distill's loop
    decays them after every epoch e: w_lb *= 0.9 if e % 10 == 0, w_kl *= 0.5 if e % 30 == 0. Closed form:
    (w_kl * 0.5^ceil(epoch / 30), w_lb * 0.9^ceil(epoch / 10))."""
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
    return w_kl * 0.5 ** math.ceil(epoch / 30), w_lb * 0.9 ** math.ceil(epoch / 10)


@dataclass
class SpecializedTeacher:
    """A frozen teacher with a :class:`ChannelMask` on one of its layers (``layer``, a submodule name)."""

    name: str
    model: nn.Module
    inputs: str  # "both" or a modality: what model_inputs feeds it
    layer: str
    mask: ChannelMask

    def logits(self, split: Any, idx: Tensor | None = None) -> Tensor:
        """Masked-teacher logits (n, C) on rows ``idx`` of ``split`` (gradients reach the mask only)."""
        with attach_channel_mask(self.model.get_submodule(self.layer), self.mask):
            return self.model(*model_inputs(split, self.inputs, idx))


def _check_data(data: Any) -> None:
    for split_name in ("train", "test"):
        split = getattr(data, split_name, None)
        for attr in ("image", "audio", "label"):
            if not isinstance(getattr(split, attr, None), Tensor):
                raise TypeError(
                    f"data must be an AVDigits (.train/.test splits with tensors image, audio, label); "
                    f"data.{split_name}.{attr} is missing"
                )


def _epochs(name: str, value: Any, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _feature_dim(model: nn.Module, layer: str, split: Any, inputs: str) -> tuple[int, bool]:
    """(channels, is_spatial) of ``model.layer``'s output, from a forward of two training rows."""
    seen: list[Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with torch.no_grad():
            model(*model_inputs(split, inputs, torch.arange(2)))
    finally:
        handle.remove()
    return seen[0].shape[1], seen[0].dim() > 2


def cotrain(
    models: Sequence[nn.Module],
    inputs: Sequence[str],
    data: Any,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    temperature: float,
    generator: torch.Generator,
    progress: bool = True,
    names: Sequence[str] | None = None,
) -> tuple[dict[str, list[float]], LossTimer]:
    """Stage 1: train ``models`` (fed ``inputs``: "both" / "image" / "audio") in place with
    sum_m CE(z_m, y) + mutual_kd_loss(z_1..z_M, tau) (tau^2 KL over ordered pairs, nothing detached) and one AdamW.
    Returns per-model per-epoch test accuracy (keyed by ``names``) and the timer of the mutual-KD calls."""
    names = list(names) if names is not None else [f"model{i}" for i in range(len(models))]
    params = [p for m in models for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    train, test = data.train, data.test
    curves: dict[str, list[float]] = {name: [] for name in names}
    timer = LossTimer()
    for _ in tqdm(range(epochs), desc="MST stage 1 (co-training)", disable=not progress, leave=False):
        for m in models:
            m.train()
        for idx in minibatches(len(train.label), batch_size, generator):
            y = train.label[idx]
            logits = [m(*model_inputs(train, inp, idx)) for m, inp in zip(models, inputs, strict=True)]
            with timer:
                mutual = mmfast.mutual_kd_loss(logits, temperature=temperature)
            loss = sum(F.cross_entropy(z, y) for z in logits) + mutual
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        for name, m, inp in zip(names, models, inputs, strict=True):
            curves[name].append(evaluate(m, test, inp).accuracy)
    return curves, timer


def train_masks(
    teachers: Sequence[SpecializedTeacher],
    student: nn.Module,
    student_modality: str,
    data: Any,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    temperature: float,
    generator: torch.Generator,
    progress: bool = True,
) -> list[float]:
    """Stage 2: train only the masks of ``teachers`` (their models must be frozen) with
    sum_k tau^2 KL(sg(p_student) || p_k^masked), the student frozen in eval mode. Returns the per-epoch mean loss
    per mask. Raises ``ValueError`` if a teacher model still has trainable parameters."""
    for t in teachers:
        if any(p.requires_grad for p in t.model.parameters()):
            raise ValueError(f"teacher {t.name!r} must be frozen (requires_grad off) before its mask trains")
    train = data.train
    student_was_training = student.training
    student.eval()
    with torch.no_grad():  # the frozen student's targets, once
        targets = student(*model_inputs(train, student_modality)).detach()
    student.train(student_was_training)
    masks = [t.mask for t in teachers]
    optimizer = torch.optim.Adam([p for m in masks for p in m.parameters()], lr=lr)
    history: list[float] = []
    for _ in tqdm(range(epochs), desc="MST stage 2 (masks)", disable=not progress, leave=False):
        for t in teachers:
            t.model.eval()
            t.mask.train()
        total, count = 0.0, 0
        for idx in minibatches(len(train.label), batch_size, generator):
            target = targets[idx].unsqueeze(0)  # [1, B, C]: the one "teacher" of the KL is the student
            loss = sum(
                mmfast.routed_kd_loss(t.logits(train, idx), target, temperature=temperature) for t in teachers
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
            count += len(idx)
        history.append(total / count / len(teachers))
    for m in masks:
        m.eval()
    return history


def distill(
    student: nn.Module,
    student_modality: str,
    teacher_logits: Tensor,
    data: Any,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    temperature: float,
    top_k: int,
    w_kl: float,
    w_lb: float,
    generator: torch.Generator,
    progress: bool = True,
) -> tuple[list[float], LossTimer, Tensor]:
    """Stage 3: train ``student`` and a :class:`TeacherRouter` with CE + w_kl(e) routed KD (top-k, hard, over the
    precomputed ``teacher_logits`` [E, n_train, C]) + w_lb(e) load balance (:func:`mst_loss_weights`).
    Returns the per-epoch test accuracy, the timer of the router + KD + LB calls and the routing counts [E]."""
    train, test = data.train, data.test
    num_teachers, n, num_classes = teacher_logits.shape
    if n != len(train.label):
        raise ValueError(f"teacher_logits must be [E, {len(train.label)}, C], got {tuple(teacher_logits.shape)}")
    router = TeacherRouter(num_classes, num_teachers, top_k=top_k, weighting="hard")
    optimizer = torch.optim.AdamW([*student.parameters(), *router.parameters()], lr=lr, weight_decay=1e-4)
    timer = LossTimer()
    routed = torch.zeros(num_teachers, dtype=torch.int64)
    accuracy: list[float] = []
    for epoch in tqdm(range(epochs), desc="MST stage 3 (routed KD)", disable=not progress, leave=False):
        kd_weight, lb_weight = mst_loss_weights(epoch, w_kl, w_lb)
        student.train()
        router.train()
        for idx in minibatches(n, batch_size, generator):
            logits = student(*model_inputs(train, student_modality, idx))
            teachers = teacher_logits[:, idx]
            with timer:
                r = router(logits)
                kd = mmfast.routed_kd_loss(logits, teachers, r.weights, indices=r.indices, temperature=temperature)
            loss = F.cross_entropy(logits, train.label[idx]) + kd_weight * kd + lb_weight * r.load_balance_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            routed += torch.bincount(r.indices.reshape(-1), minlength=num_teachers)
        accuracy.append(evaluate(student, test, student_modality).accuracy)
    return accuracy, timer, routed


def run_mst_distill(
    data: Any,
    *,
    student_modality: str = "image",
    epochs_s1: int | None = None,
    epochs_s2: int | None = None,
    epochs_s3: int | None = None,
    quick: bool = False,
    width: int | None = None,
    lr: float = 3e-3,
    mask_lr: float = 1e-3,
    batch_size: int = 64,
    temperature: float = 4.0,
    top_k: int = 1,
    mask_layers: int = 2,
    w_kl: float = 1.0,
    w_lb: float = 1.0,
    seed: int = 0,
    progress: bool = True,
) -> RecipeResult:
    """Run MST-Distill's three stages and the CE baseline on ``data`` (an ``AVDigits``); see the module docstring.

    Epoch counts and ``width`` left ``None`` come from the preset: ``quick`` (3, 1, 3 epochs, width 16) or the
    default (20, 4, 20 epochs, width 32).
    Deterministic for a fixed ``seed`` on the CPU.
    """
    _check_data(data)
    if student_modality not in MODALITIES:
        raise ValueError(f"student_modality must be one of {MODALITIES}, got {student_modality!r}")
    preset = QUICK_EPOCHS if quick else DEFAULT_EPOCHS
    e1 = _epochs("epochs_s1", preset[0] if epochs_s1 is None else epochs_s1)
    e2 = _epochs("epochs_s2", preset[1] if epochs_s2 is None else epochs_s2, allow_zero=True)
    e3 = _epochs("epochs_s3", preset[2] if epochs_s3 is None else epochs_s3, allow_zero=True)
    width = (QUICK_WIDTH if quick else DEFAULT_WIDTH) if width is None else width
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be an int >= 1, got {width!r}")
    if mask_layers not in (1, 2):
        raise ValueError(f"mask_layers must be 1 or 2, got {mask_layers!r}")
    if not 1 <= top_k <= 2 * mask_layers:
        raise ValueError(f"top_k must be in [1, 2 * mask_layers = {2 * mask_layers}], got {top_k!r}")
    for name, value in (("lr", lr), ("mask_lr", mask_lr), ("temperature", temperature)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")
    for name, value in (("w_kl", w_kl), ("w_lb", w_lb)):
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")

    cross_modality = "audio" if student_modality == "image" else "image"
    generator = set_seed(seed)
    student = build_unimodal(student_modality, width=width)
    baseline = copy.deepcopy(student)  # the same initial weights
    cross = build_unimodal(cross_modality, width=width)
    multimodal = build_multimodal(width=width)
    labels = data.test.label
    names = {
        "mm": "multimodal teacher",
        "cross": f"cross-modal teacher ({cross_modality})",
        "student": f"MST-Distill student ({student_modality})",
        "baseline": f"CE baseline ({student_modality})",
    }
    notes: list[str] = []
    seconds: dict[str, float] = {}

    # stage 1: collaborative training
    start = time.perf_counter()
    stage1_curves, mutual_timer = cotrain(
        [multimodal, cross, student], ["both", cross_modality, student_modality], data, epochs=e1, lr=lr,
        batch_size=batch_size, temperature=temperature, generator=generator, progress=progress,
        names=[names["mm"], names["cross"], names["student"]],
    )
    seconds["stage 1"] = time.perf_counter() - start
    stage1_student = evaluate(student, data.test, student_modality)

    # stage 2: specialized teachers
    start = time.perf_counter()
    _freeze(multimodal)
    _freeze(cross)
    specs = [(names["mm"], multimodal, "both", MULTIMODAL_LAYERS[i]) for i in range(mask_layers)]
    specs += [(names["cross"], cross, cross_modality, UNIMODAL_LAYERS[i]) for i in range(mask_layers)]
    teachers = []
    for name, model, inputs, layer in specs:
        dim, spatial = _feature_dim(model, layer, data.train, inputs)
        mask = ChannelMask(dim, heads=3, spatial_reduction="learned" if spatial else "mean")
        teachers.append(SpecializedTeacher(f"{name} + mask@{layer}", model, inputs, layer, mask))
    mask_loss = train_masks(
        teachers, student, student_modality, data, epochs=e2, lr=mask_lr, batch_size=batch_size,
        temperature=temperature, generator=generator, progress=progress,
    ) if e2 else []
    with torch.no_grad():
        for t in teachers:
            t.mask.eval()
        teacher_logits = torch.stack([t.logits(data.train) for t in teachers])  # [E, n_train, C]
    seconds["stage 2"] = time.perf_counter() - start

    # stage 3: routed distillation
    start = time.perf_counter()
    stage3_accuracy, kd_timer, routed = distill(
        student, student_modality, teacher_logits, data, epochs=e3, lr=lr, batch_size=batch_size,
        temperature=temperature, top_k=top_k, w_kl=w_kl, w_lb=w_lb, generator=generator, progress=progress,
    ) if e3 else ([], LossTimer(), torch.zeros(len(teachers), dtype=torch.int64))
    seconds["stage 3"] = time.perf_counter() - start

    # baseline: CE only, same initial weights, as many epochs as the MST student
    start = time.perf_counter()
    base_history = train_supervised(
        baseline, data, student_modality, epochs=e1 + e3, lr=lr, batch_size=batch_size, seed=seed,
        progress=progress, desc=f"CE baseline ({student_modality})",
    )
    seconds["baseline"] = time.perf_counter() - start

    # results
    rows: list[MethodResult] = []
    mm_eval = evaluate(multimodal, data.test, "both")
    cross_eval = evaluate(cross, data.test, cross_modality)
    rows.append(MethodResult(NAME, names["mm"], "image+audio", mm_eval.accuracy, mm_eval.ece, None, "teacher"))
    rows.append(MethodResult(NAME, names["cross"], cross_modality, cross_eval.accuracy, cross_eval.ece, None,
                             "teacher"))
    with torch.no_grad():
        for t in teachers:
            z = t.logits(data.test)
            acc = (z.argmax(-1) == labels).double().mean().item()
            ece = mmfast.expected_calibration_error(z, labels).item()
            modality = "image+audio" if t.inputs == "both" else t.inputs
            rows.append(MethodResult(NAME, f"specialized: {t.name}", modality, acc, ece, None, "teacher"))
    base_eval = evaluate(baseline, data.test, student_modality)
    student_eval = evaluate(student, data.test, student_modality)
    rows.append(MethodResult(NAME, names["baseline"], student_modality, base_eval.accuracy, base_eval.ece,
                             base_history.loss_ms_per_step, "baseline"))
    rows.append(MethodResult(NAME, names["student"], student_modality, student_eval.accuracy, student_eval.ece,
                             kd_timer.ms_per_step(), "student"))

    curves = {
        names["mm"]: stage1_curves[names["mm"]],
        names["cross"]: stage1_curves[names["cross"]],
        names["baseline"]: base_history.test_accuracy,
        names["student"]: stage1_curves[names["student"]] + stage3_accuracy,
    }
    reliability = {
        names["baseline"]: (base_eval.logits, labels),
        names["student"]: (student_eval.logits, labels),
    }
    share = (routed.double() / routed.sum().clamp_min(1)).tolist()
    notes.append(f"epochs: stage 1 {e1}, stage 2 {e2}, stage 3 {e3}; baseline {e1 + e3}; width {width}, "
                 f"batch {batch_size}, tau {temperature}, top-{top_k} of {len(teachers)} specialized teachers")
    notes.append(f"student after stage 1 (co-training only): accuracy {stage1_student.accuracy:.4f}; "
                 f"after stage 3: {student_eval.accuracy:.4f}")
    if mask_loss:
        notes.append(f"stage-2 mask loss tau^2 KL(student || masked teacher), mean per mask: "
                     f"{mask_loss[0]:.4f} (epoch 1) -> {mask_loss[-1]:.4f} (epoch {len(mask_loss)})")
    shares = ", ".join(f"{t.name}: {s:.2f}" for t, s in zip(teachers, share, strict=True))
    notes.append(f"stage-3 routing share: {shares}")
    notes.append(f"stage-1 mutual-KD loss: {mutual_timer.ms_per_step():.3f} ms/step")
    notes.append("wall seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    return RecipeResult(NAME, rows, curves, reliability, notes)


def main(argv: list[str] | None = None) -> int:
    """Command line: run the recipe on AV-Digits and print its table and notes."""
    parser = argparse.ArgumentParser(prog="python -m mmfast.recipes.mst_distill", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the quick preset (a few epochs per stage)")
    parser.add_argument("--student", choices=MODALITIES, default="image", help="the student's modality")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from mmfast.datasets import load_av_digits

    result = run_mst_distill(load_av_digits(), student_modality=args.student, quick=args.quick, seed=args.seed)
    print(f"{'method':<60} {'role':<9} {'acc':>7} {'ECE':>7} {'loss ms/step':>13}")
    for row in result.rows:
        ms = "" if row.loss_ms_per_step is None else f"{row.loss_ms_per_step:.3f}"
        print(f"{row.method:<60} {row.role:<9} {row.accuracy:7.4f} {row.ece:7.4f} {ms:>13}")
    for note in result.notes:
        print("-", note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
