"""Table-driven sweep over every public function and module (SPEC section 6, issue 6):

* bad input -> ``ValueError`` / ``TypeError`` whose message names the argument: generic variants derived
  from each entry's argument kinds (not a tensor, wrong dtype, an extra dimension, another device,
  bad temperature, unknown choice, a process group without torch.distributed) plus each entry's own cases;
* value checks (which read data: negative weights, ids out of range) raise in eager mode, can be turned
  off (``mmfast.set_value_checks(False)``, ``MMFAST_CHECK_VALUES=0``) and are skipped under compile;
* no mutation: each entry's valid call, on every backend, leaves its inputs' version counters and data
  unchanged (forward and backward; ``assert_inputs_unchanged``), and the backward reaches exactly the
  floating inputs that the contract differentiates (``grad_free``: stop-gradient inputs).

Messages must name the argument as a word of its own (``x`` in "x is on meta", not in "teacher_x0").

A new public function adds one :class:`Api` entry to ``APIS``. Hand-written cases with exact messages for
the KD losses live in tests/test_bad_input.py.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from _utils import assert_inputs_unchanged, backend_params

import mmfast

N, C, E = 4, 5, 3
SAMPLE = (2, 3)  # the non-batch shape of the f-divergence losses' samples [N, 2, 3]

# argument kinds: tensors ("float", "int", "bool", "mask": bool or float, "float-seq": a tensor or a sequence
# of tensors) and scalars ("positive": > 0, "nonneg": >= 0, "choice", "flag": a bool, "group")
TENSOR_KINDS = ("float", "float-seq", "int", "bool", "mask")


@dataclass(frozen=True)
class Bad:
    """One bad input: ``change(kwargs)`` edits a valid call's kwargs in place."""

    label: str
    change: Callable[[dict], None]
    exc: type[Exception]
    names: str  # the argument the message must name
    value_check: bool = False  # found only by reading data (eager value checks)
    # value checks off: "returns" (NaN rows are fine), "nan" (must be NaN) or "raises" (PyTorch's own error,
    # e.g. cross_entropy's target out of bounds)
    when_unchecked: str = "returns"


@dataclass(frozen=True)
class Api:
    """A public entry point: ``call(**kwargs)``, a valid ``kwargs(device, dtype)`` and its arguments' kinds."""

    call: Callable
    kwargs: Callable[[str, torch.dtype], dict]
    kinds: dict[str, str]
    bad: tuple[Bad, ...] = ()
    # argument -> generic variants to skip ("list", "dtype", "rank", "device": a valid input there)
    skip: dict[str, tuple[str, ...]] = field(default_factory=dict)
    grad_free: tuple[str, ...] = ()  # floating inputs that get no gradient by contract (stop-gradient)


def _randn(device, dtype, *shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * 2).to(device, dtype)


def _weights(device, dtype, k=E):
    return (torch.rand(N, k, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.1).to(device, dtype)


def _routed_dense(device, dtype):
    return dict(
        student_logits=_randn(device, dtype, N, C, seed=1),
        teacher_logits=_randn(device, dtype, E, N, C, seed=2),
        weights=_weights(device, dtype),
        mask=torch.tensor([True, False, True, True], device=device),
        temperature=2.0,
        mix="loss",
        divergence="js",
        reduction="batchmean",
    )


def _routed_sparse(device, dtype):
    return dict(
        student_logits=_randn(device, dtype, N, C, seed=1),
        teacher_logits=[_randn(device, dtype, N, C, seed=10 + e) for e in range(E)],
        weights=_weights(device, dtype, 2),
        indices=torch.tensor([[0, 2], [1, 1], [2, 0], [0, 1]], device=device),
        mask=torch.tensor([True, True, False, True], device=device),
        temperature=1.5,
        mix="logits",
        divergence="kl",
        reduction="sum",
    )


def _routed_dense_logits(device, dtype):
    return dict(
        student_logits=_randn(device, dtype, 2, C, 3, seed=1),
        teacher_logits=list(_randn(device, dtype, E, 2, C, 3, seed=2)),
        weights=_weights(device, dtype)[:2].contiguous(),
        mask=torch.tensor([[True, False, True], [True, True, False]], device=device),
        class_dim=1,
        mix="probs",
        divergence="reverse_kl",
        reduction="none",
    )


def _module_call(student_logits, teacher_logits, weights=None, indices=None, mask=None, **config):
    return mmfast.nn.RoutedKDLoss(**config)(student_logits, teacher_logits, weights, indices=indices, mask=mask)


def _router_call(student_logits, **config):
    router = mmfast.nn.TeacherRouter(**config).to(getattr(student_logits, "device", "cpu"))
    return router(student_logits)


def _set(name, value):
    def change(kw):
        kw[name] = value

    return change


def _negative_weight(kw):
    kw["weights"] = kw["weights"].clone()
    kw["weights"][1, 0] = -0.25


def _index(value):
    def change(kw):
        kw["indices"] = kw["indices"].clone()
        kw["indices"][2, 1] = value

    return change


def _label(value):
    def change(kw):
        kw["labels"] = kw["labels"].clone()
        kw["labels"][1] = value

    return change


ROUTED_KINDS = dict(
    student_logits="float",
    teacher_logits="float-seq",
    weights="float",
    temperature="positive",
    mix="choice",
    divergence="choice",
    reduction="choice",
    process_group="group",
)

APIS: dict[str, Api] = {
    "routed_kd_loss-dense-mask": Api(
        mmfast.routed_kd_loss,
        _routed_dense,
        {**ROUTED_KINDS, "mask": "bool"},
        (
            Bad("negative-weight", _negative_weight, ValueError, "weights", value_check=True),
            Bad("beta-out-of-(0,1)", _set("beta", 1.0), ValueError, "beta"),
            Bad("class_dim-2", _set("class_dim", 2), ValueError, "class_dim"),
        ),
    ),
    "routed_kd_loss-sparse": Api(
        mmfast.routed_kd_loss,
        _routed_sparse,
        {**ROUTED_KINDS, "indices": "int", "mask": "bool"},
        (
            Bad("index-E", _index(E), ValueError, "indices", value_check=True, when_unchecked="nan"),
            Bad("index-negative", _index(-1), ValueError, "indices", value_check=True, when_unchecked="nan"),
            Bad("weights-E-wide", _set("weights", torch.rand(N, E)), ValueError, "weights"),
        ),
    ),
    "routed_kd_loss-class_dim1": Api(
        mmfast.routed_kd_loss,
        _routed_dense_logits,
        {**ROUTED_KINDS, "mask": "bool"},
        (Bad("weights-per-pixel", _set("weights", torch.rand(6, E)), ValueError, "weights"),),
        # [2, C, 3] -> [1, 2, C, 3] is valid dense logits of another shape: the teachers then mismatch
        skip={"student_logits": ("rank",)},
    ),
    "RoutedKDLoss": Api(
        _module_call,
        _routed_dense,
        {**ROUTED_KINDS, "mask": "bool", "class_dim": "skip"},
        (
            Bad("class_dim-0", _set("class_dim", 0), ValueError, "class_dim"),
            Bad("beta-0", _set("beta", 0.0), ValueError, "beta"),
            Bad("negative-weight", _negative_weight, ValueError, "weights", value_check=True),
        ),
    ),
    "mutual_kd_loss": Api(
        mmfast.mutual_kd_loss,
        lambda device, dtype: dict(logits=_randn(device, dtype, 3, N, C), temperature=2.0, reduction="batchmean"),
        dict(logits="float-seq", temperature="positive", reduction="choice", process_group="group"),
        (Bad("empty-rows", _set("logits", torch.randn(2, 0, C)), ValueError, "logits"),),
    ),
    "load_balance_loss": Api(
        mmfast.load_balance_loss,
        lambda device, dtype: dict(probs=_randn(device, dtype, N, E).softmax(-1), mode="cv"),
        dict(probs="float", mode="choice", process_group="group"),
        (Bad("cv-one-teacher", _set("probs", torch.ones(N, 1)), ValueError, "probs"),),
    ),
    "teacher_weights": Api(
        mmfast.teacher_weights,
        lambda device, dtype: dict(
            teacher_logits=_randn(device, dtype, E, N, C),
            labels=torch.tensor([0, 4, 2, 1], device=device),
            temperature=0.5,
            per_sample=False,
        ),
        dict(teacher_logits="float-seq", labels="int", temperature="positive", process_group="group"),
        (
            Bad("label-C", _label(C), ValueError, "labels", value_check=True, when_unchecked="nan"),
            Bad("label-negative", _label(-1), ValueError, "labels", value_check=True, when_unchecked="nan"),
        ),
    ),
    "TeacherRouter": Api(
        _router_call,
        lambda device, dtype: dict(
            student_logits=_randn(device, dtype, N, C), num_classes=C, num_teachers=E, top_k=2, weighting="soft"
        ),
        dict(student_logits="float", weighting="choice", load_balance="choice", process_group="group"),
        (
            Bad("top_k-0", _set("top_k", 0), ValueError, "top_k"),
            Bad("top_k>E", _set("top_k", E + 1), ValueError, "top_k"),
            Bad("no-teachers", _set("num_teachers", 0), ValueError, "num_teachers"),
            Bad("C-mismatch", _set("num_classes", C + 1), ValueError, "student_logits"),
        ),
    ),
}


# --------------------------------------------------------------------------------------------
# f-divergence distillation, reconstruction, calibration, ensembles, UMT, masks (issues 3 and 4)


def _samples(device, dtype, *names, seed=20):
    return {name: _randn(device, dtype, N, *SAMPLE, seed=seed + i) for i, name in enumerate(names)}


def _positive(device, dtype, seed=30):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(N, generator=g, dtype=torch.float64) * 3 + 0.2).to(device, dtype)


def _non_positive(name, value):
    def change(kw):
        kw[name] = kw[name].detach().clone()
        kw[name][1] = value

    return change


def _per_sample_bad(name: str) -> tuple[Bad, ...]:
    """A [B] tensor > 0 (h, ratio, sigma): the wrong length, and the value checks 0 and < 0."""
    return (
        Bad(f"{name}-length-B+1", lambda kw: kw.update({name: torch.ones(N + 1)}), ValueError, name),
        Bad(f"{name}-zero", _non_positive(name, 0.0), ValueError, name, value_check=True),
        Bad(f"{name}-negative", _non_positive(name, -0.5), ValueError, name, value_check=True),
    )


FDIV_SAMPLES = dict(x="float", teacher_x0="float", fake_x0="float")
UNKNOWN_DIVERGENCE = Bad("divergence-lists-the-eight", _set("divergence", "forward_kl"), ValueError, "pearson_chi2")


def _fdistill(device, dtype):
    return {**_samples(device, dtype, "x", "teacher_x0", "fake_x0"), "h": _positive(device, dtype), "reduction": "mean"}


def _uni_instruct(device, dtype):
    return {
        **_samples(device, dtype, "x", "teacher_x0", "fake_x0"),
        "ratio": _positive(device, dtype),
        "divergence": "js",
        "alpha": 0.7,
        "fgm": True,
        "di": True,
        "di_norm": "sample",
        "reduction": "sum",
    }


def _fdistill_module_call(x, teacher_x0, fake_x0, ratio, **config):
    return mmfast.nn.FDistillLoss(**config)(x, teacher_x0, fake_x0, ratio)


def _uni_instruct_module_call(x, teacher_x0, fake_x0, ratio, **config):
    return mmfast.nn.UniInstructLoss(**config)(x, teacher_x0, fake_x0, ratio)


def _normalizer_call(ratio, t, normalizer=None, **config):
    """``normalizer(ratio, t)``; with configuration arguments a new normaliser built from them instead
    (built outside a compiled region otherwise: torch.compile traces a module, not its construction)."""
    if config or normalizer is None:
        normalizer = mmfast.nn.DensityRatioNormalizer(**{"num_bins": 3, **config})
    return normalizer.to(ratio.device)(ratio, t) if isinstance(ratio, torch.Tensor) else normalizer(ratio, t)


def _normalizer_kwargs(device, dtype):
    return dict(
        ratio=_positive(device, dtype),
        t=_positive(device, dtype, seed=31) / 3.5,
        normalizer=mmfast.nn.DensityRatioNormalizer(num_bins=3, momentum=0.5, eps=1e-4).to(device),
    )


def _recon_row_mask(device, dtype):
    return dict(
        pred=_randn(device, dtype, N, 6, seed=40),
        target=_randn(device, dtype, N, 6, seed=41),
        mask=torch.tensor([[True], [False], [True], [True]], device=device),
        loss="smooth_l1",
        beta=0.5,
        normalize_target=True,
        eps=1e-5,
        reduction="mean",
    )


def _recon_element_mask(device, dtype):
    g = torch.Generator().manual_seed(42)
    return dict(
        pred=_randn(device, dtype, 2, 3, 4, seed=43),
        target=_randn(device, dtype, 2, 3, 4, seed=44),
        mask=torch.rand(2, 3, 4, generator=g, dtype=torch.float64).to(device, dtype),
        channel_dim=1,
        loss="mse",
        reduction="none",
    )


def _recon_mask_value(value):
    def change(kw):
        kw["mask"] = kw["mask"].detach().clone()
        kw["mask"][0, 1, 2] = value

    return change


def _ragged_logits(kw):
    kw["logits_list"] = [t[: 2 + i] for i, t in enumerate(kw["logits_list"])]


def _labels(device):
    return torch.tensor([0, 4, 2, 1], device=device)


def _calibration_call(logits, labels, n_bins=15, process_group=None):
    acc = mmfast.CalibrationAccumulator(n_bins)
    acc.update(logits, labels)
    return acc.compute(process_group)


def _umt(device, dtype):
    return dict(
        fused_logits=_randn(device, dtype, N, C, seed=50),
        labels=_labels(device),
        student_features=[_randn(device, dtype, N, 6, seed=51), _randn(device, dtype, N, 3, 2, 2, seed=52)],
        teacher_features=[_randn(device, dtype, N, 6, seed=53), _randn(device, dtype, N, 3, 2, 2, seed=54)],
        weight=2.5,
    )


def _umt_module_call(fused_logits, labels, student_features, teacher_features, weight=10.0):
    return mmfast.nn.UniModalTeacherLoss(weight)(fused_logits, labels, student_features, teacher_features)


def _channel_mask_call(feature, **config):
    torch.manual_seed(0)
    mask = mmfast.nn.ChannelMask(**config)
    if isinstance(feature, torch.Tensor) and feature.is_floating_point():
        mask = mask.to(feature.device, feature.dtype)
    return mask(feature)


def _attach_call(feature, module="linear", mask="channel_mask"):
    """A ChannelMask attached to a Linear's output: the forward through it, the hook removed after."""
    torch.manual_seed(0)
    D = feature.shape[1]
    if module == "linear":
        module = torch.nn.Linear(D, D).to(feature.device, feature.dtype)
    if mask == "channel_mask":
        mask = mmfast.nn.ChannelMask(D).to(feature.device, feature.dtype)
    with mmfast.nn.attach_channel_mask(module, mask) as handle:
        out = module(feature)
    assert not handle.attached and not module._forward_hooks, "the hook must be removed"
    return out


def _reliability_call(source, labels=None, n_bins=15, suffix=".png"):
    """mmfast.plot.reliability_diagram into a temporary file (removed after)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = mmfast.plot.reliability_diagram(source, os.path.join(tmp, "diagram" + suffix), labels, n_bins=n_bins)
        assert path.stat().st_size > 0
    return path


def _label_value(name, value):
    def change(kw):
        kw[name] = kw[name].clone()
        kw[name][1] = value

    return change


LABEL_BAD = (
    Bad("label-C", _label_value("labels", C), ValueError, "labels", value_check=True),
    Bad("label-negative", _label_value("labels", -1), ValueError, "labels", value_check=True),
    Bad("labels-length", lambda kw: kw.update(labels=kw["labels"][:2]), ValueError, "labels"),
)
UMT_KINDS = dict(
    fused_logits="float", labels="int", student_features="float-seq", teacher_features="float-seq", weight="nonneg"
)
UMT_BAD = (
    Bad("label-C", _label_value("labels", C), ValueError, "labels", value_check=True, when_unchecked="raises"),
    Bad("teacher_features-one-modality", lambda kw: kw.update(teacher_features=kw["teacher_features"][:1]),
        ValueError, "teacher_features"),
    Bad("student_features-empty", _set("student_features", []), ValueError, "student_features"),
    Bad("fused_logits-rows", lambda kw: kw.update(fused_logits=kw["fused_logits"][:3]), ValueError, "labels"),
)
FDIV_MODULE_CONFIG_BAD = (UNKNOWN_DIVERGENCE, *_per_sample_bad("ratio"))

APIS.update({
    "density_ratio": Api(
        mmfast.density_ratio,
        lambda device, dtype: dict(logits=_randn(device, dtype, N, 2, seed=60), logit_clamp=3.0, ratio_min=0.2,
                                   ratio_max=5.0),
        dict(logits="float", logit_clamp="positive", ratio_min="positive", ratio_max="positive"),
        (
            Bad("ratio_max<ratio_min", _set("ratio_max", 0.1), ValueError, "ratio_max"),
            Bad("logits-0-d", _set("logits", torch.tensor(1.0)), ValueError, "logits"),
            Bad("logits-no-samples", _set("logits", torch.ones(0, 2)), ValueError, "logits"),
        ),
        grad_free=("logits",),
    ),
    **{
        name: Api(
            fn,
            lambda device, dtype: dict(r=_positive(device, dtype), divergence="squared_hellinger"),
            dict(r="float", divergence="choice"),
            (UNKNOWN_DIVERGENCE, Bad("r-zero", _non_positive("r", 0.0), ValueError, "r", value_check=True),
             Bad("r-negative", _non_positive("r", -1.0), ValueError, "r", value_check=True, when_unchecked="nan")),
            skip={"r": ("rank",)},  # elementwise: any shape
        )
        for name, fn in (("fdiv_weight", mmfast.fdiv_weight), ("fdiv_coefficients", mmfast.fdiv_coefficients))
    },
    "fdistill_loss": Api(
        mmfast.fdistill_loss,
        _fdistill,
        {**FDIV_SAMPLES, "h": "float", "reduction": "choice"},
        (
            *_per_sample_bad("h"),
            Bad("teacher_x0-dtype", lambda kw: kw.update(teacher_x0=kw["teacher_x0"].double()), TypeError,
                "teacher_x0"),
            Bad("x-0-d", lambda kw: kw.update(x=torch.tensor(1.0), teacher_x0=torch.tensor(1.0),
                                              fake_x0=torch.tensor(1.0)), ValueError, "x"),
        ),
        grad_free=("teacher_x0", "fake_x0", "h"),
    ),
    "uni_instruct_loss": Api(
        mmfast.uni_instruct_loss,
        _uni_instruct,
        {**FDIV_SAMPLES, "ratio": "float", "divergence": "choice", "alpha": "nonneg", "fgm": "flag", "di": "flag",
         "di_norm": "choice", "reduction": "choice"},
        (*_per_sample_bad("ratio"), UNKNOWN_DIVERGENCE,
         Bad("fake_x0-empty-samples", lambda kw: kw.update(
             {k: kw[k][:, :0] for k in ("x", "teacher_x0", "fake_x0")}), ValueError, "x")),
        grad_free=("ratio",),
    ),
    "fake_score_loss": Api(
        mmfast.fake_score_loss,
        lambda device, dtype: {**_samples(device, dtype, "fake_x0", "x"), "sigma": _positive(device, dtype),
                               "sigma_data": 0.5, "reduction": "none"},
        dict(fake_x0="float", x="float", sigma="float", sigma_data="positive", reduction="choice"),
        _per_sample_bad("sigma"),
        grad_free=("x", "sigma"),
    ),
    "discriminator_loss": Api(
        mmfast.discriminator_loss,
        lambda device, dtype: dict(real_logits=_randn(device, dtype, N, seed=61),
                                   fake_logits=_randn(device, dtype, N + 2, 1, seed=62)),
        dict(real_logits="float", fake_logits="float"),
        (Bad("fake_logits-empty", _set("fake_logits", torch.ones(0)), ValueError, "fake_logits"),),
        skip={"real_logits": ("rank",), "fake_logits": ("rank",)},  # any shape: a mean over all logits
    ),
    "FDistillLoss": Api(
        _fdistill_module_call,
        lambda device, dtype: {**_samples(device, dtype, "x", "teacher_x0", "fake_x0"),
                               "ratio": _positive(device, dtype), "divergence": "jeffreys", "reduction": "mean"},
        {**FDIV_SAMPLES, "ratio": "float", "divergence": "choice", "reduction": "choice", "process_group": "group"},
        FDIV_MODULE_CONFIG_BAD,
        grad_free=("teacher_x0", "fake_x0", "ratio"),
    ),
    "UniInstructLoss": Api(
        _uni_instruct_module_call,
        lambda device, dtype: {**_uni_instruct(device, dtype), "normalize": True},
        {**FDIV_SAMPLES, "ratio": "float", "divergence": "choice", "alpha": "nonneg", "fgm": "flag", "di": "flag",
         "di_norm": "choice", "reduction": "choice", "process_group": "group"},
        FDIV_MODULE_CONFIG_BAD,
        grad_free=("ratio",),
    ),
    "DensityRatioNormalizer": Api(
        _normalizer_call,
        _normalizer_kwargs,
        dict(ratio="float", t="float", eps="positive", process_group="group"),
        (
            *_per_sample_bad("ratio")[1:],
            Bad("t-length-B+1", _set("t", torch.rand(N + 1)), ValueError, "t"),
            Bad("num_bins-0", _set("num_bins", 0), ValueError, "num_bins"),
            Bad("momentum-0", _set("momentum", 0.0), ValueError, "momentum"),
            Bad("momentum-1.5", _set("momentum", 1.5), ValueError, "momentum"),
            Bad("t_max<=t_min", _set("t_max", -1.0), ValueError, "t_max"),
            Bad("t_min-nan", _set("t_min", math.nan), ValueError, "t_min"),
        ),
        grad_free=("ratio", "t"),
    ),
    "masked_reconstruction_loss-row-mask": Api(
        mmfast.masked_reconstruction_loss,
        _recon_row_mask,
        dict(pred="float", target="float", mask="mask", loss="choice", beta="positive", eps="positive",
             reduction="choice"),
        (
            Bad("mask-does-not-broadcast", _set("mask", torch.ones(N, 2, dtype=torch.bool)), ValueError, "mask"),
            Bad("mask-row-shape-without-1", _set("mask", torch.ones(N, dtype=torch.bool)), ValueError, "mask"),
            Bad("normalize_target-int", _set("normalize_target", 1), TypeError, "normalize_target"),
            Bad("channel_dim-2", _set("channel_dim", 2), ValueError, "channel_dim"),
            Bad("target-dtype", lambda kw: kw.update(target=kw["target"].double()), TypeError, "target"),
            Bad("pred-no-channels", lambda kw: kw.update(pred=torch.ones(N, 0), target=torch.ones(N, 0),
                                                         mask=None), ValueError, "pred"),
        ),
    ),
    "masked_reconstruction_loss-element-mask": Api(
        mmfast.masked_reconstruction_loss,
        _recon_element_mask,
        dict(pred="float", target="float", mask="mask", loss="choice", reduction="choice"),
        (
            Bad("mask-above-1", _recon_mask_value(1.5), ValueError, "mask", value_check=True),
            Bad("mask-negative", _recon_mask_value(-0.25), ValueError, "mask", value_check=True),
            Bad("mask-nan", _recon_mask_value(math.nan), ValueError, "mask", value_check=True, when_unchecked="nan"),
            Bad("cosine-element-mask", _set("loss", "cosine"), ValueError, "mask"),
        ),
    ),
    "expected_calibration_error": Api(
        mmfast.expected_calibration_error,
        lambda device, dtype: dict(logits=_randn(device, dtype, N, C, seed=70), labels=_labels(device), n_bins=4),
        dict(logits="float", labels="int"),
        (
            *LABEL_BAD,
            Bad("n_bins-0", _set("n_bins", 0), ValueError, "n_bins"),
            Bad("n_bins-float", _set("n_bins", 2.5), TypeError, "n_bins"),
            Bad("logits-no-rows", lambda kw: kw.update(logits=torch.ones(0, C), labels=torch.ones(0, dtype=int)),
                ValueError, "logits"),
        ),
    ),
    "CalibrationAccumulator": Api(
        _calibration_call,
        lambda device, dtype: dict(logits=_randn(device, dtype, N, C, seed=71), labels=_labels(device), n_bins=3),
        dict(logits="float", labels="int", process_group="group"),
        (*LABEL_BAD, Bad("n_bins-0", _set("n_bins", 0), ValueError, "n_bins")),
    ),
    "unimodal_ensemble": Api(
        mmfast.unimodal_ensemble,
        lambda device, dtype: dict(logits_list=[_randn(device, dtype, N, C, seed=80 + m) for m in range(3)],
                                   weights=_weights(device, dtype)[0], combine="probs"),
        dict(logits_list="float-seq", weights="float", combine="choice"),
        (
            Bad("weights-M+1", lambda kw: kw.update(weights=torch.ones(4)), ValueError, "weights"),
            Bad("weights-list-M+1", _set("weights", [1.0, 1.0]), ValueError, "weights"),
            Bad("weights-list-negative", _set("weights", [1.0, -1.0, 1.0]), ValueError, "weights"),
            Bad("weights-list-nan", _set("weights", [1.0, math.nan, 1.0]), ValueError, "weights"),
            Bad("weights-list-str", _set("weights", ["1", 1.0, 1.0]), TypeError, "weights"),
            Bad("weights-negative", _non_positive("weights", -0.5), ValueError, "weights", value_check=True),
            Bad("weights-all-zero", lambda kw: kw.update(weights=kw["weights"].detach() * 0), ValueError, "weights",
                value_check=True, when_unchecked="nan"),
            Bad("logits_list-shapes", _ragged_logits, ValueError, "logits_list"),
            Bad("logits_list-empty", _set("logits_list", []), TypeError, "logits_list"),
        ),
        # [M, N, C] -> [1, M, N, C] is one model of another shape (weights then mismatch in length);
        # a list of numbers is a valid weights argument
        skip={"logits_list": ("rank",), "weights": ("list", "rank")},
    ),
    "choose_late_fusion": Api(
        mmfast.choose_late_fusion,
        lambda device, dtype: dict(ume_score=0.8, joint_score=torch.tensor(0.75, device=device, dtype=dtype),
                                   higher_is_better=True, tolerance=0.01),
        dict(higher_is_better="flag", tolerance="nonneg"),
        (
            Bad("ume_score-nan", _set("ume_score", math.nan), ValueError, "ume_score"),
            Bad("ume_score-str", _set("ume_score", "0.8"), TypeError, "ume_score"),
            Bad("joint_score-two-elements", _set("joint_score", torch.ones(2)), ValueError, "joint_score"),
            Bad("joint_score-inf", _set("joint_score", math.inf), ValueError, "joint_score"),
        ),
    ),
    "unimodal_teacher_loss": Api(mmfast.unimodal_teacher_loss, _umt, UMT_KINDS, UMT_BAD,
                                 grad_free=("teacher_features",)),
    "UniModalTeacherLoss": Api(_umt_module_call, _umt, UMT_KINDS, UMT_BAD, grad_free=("teacher_features",)),
    "ChannelMask": Api(
        _channel_mask_call,
        lambda device, dtype: dict(feature=_randn(device, dtype, N, 6, 2, 2, seed=90), dim=6, heads=2,
                                   parameterization="factorized", spatial_reduction="learned"),
        dict(feature="float", parameterization="choice", spatial_reduction="choice"),
        (
            Bad("feature-width", lambda kw: kw.update(feature=kw["feature"][:, :5]), ValueError, "feature"),
            Bad("feature-1-d", lambda kw: kw.update(feature=torch.ones(6)), ValueError, "feature"),
            Bad("learned-needs-2-d-spatial", lambda kw: kw.update(feature=kw["feature"][..., 0]), ValueError,
                "spatial_reduction"),
            Bad("dim-0", _set("dim", 0), ValueError, "dim"),
            Bad("heads-bool", _set("heads", True), ValueError, "heads"),
            Bad("hidden-not-multiple-of-heads", _set("hidden", 3), ValueError, "hidden"),
        ),
    ),
    "reliability_diagram": Api(
        _reliability_call,
        lambda device, dtype: dict(source=_randn(device, dtype, N, C, seed=92), labels=_labels(device), n_bins=4),
        dict(labels="int"),
        (
            Bad("source-list", _set("source", [[0.5, 0.5]]), TypeError, "source"),
            Bad("labels-missing", _set("labels", None), ValueError, "labels"),
            Bad("labels-with-stats", lambda kw: kw.update(source=mmfast.calibration.CalibrationStats.from_logits(
                kw["source"], kw["labels"], 4)), ValueError, "labels"),
            Bad("path-pdf", _set("suffix", ".pdf"), ValueError, "path"),
            # (labels out of range: the ECE entries' value check; a plot is drawn on the host, never compiled)
            Bad("n_bins-0", _set("n_bins", 0), ValueError, "n_bins"),
        ),
    ),
    "attach_channel_mask": Api(
        _attach_call,
        lambda device, dtype: dict(feature=_randn(device, dtype, N, 6, seed=91)),
        dict(feature="float"),
        (
            Bad("module-not-a-module", _set("module", lambda f: f), TypeError, "module"),
            Bad("mask-not-a-ChannelMask", _set("mask", torch.nn.Identity()), TypeError, "mask"),
        ),
        skip={"feature": ("list", "dtype", "rank")},  # the Linear's own errors, not the mask's
    ),
})


# --------------------------------------------------------------------------------------------
# generic variants from the argument kinds


def _as_list(t):
    return t.tolist() if isinstance(t, torch.Tensor) else [x.tolist() for x in t]


def _map_tensors(value, fn):
    return fn(value) if isinstance(value, torch.Tensor) else [fn(t) for t in value]


def _tensor_list(value) -> list[torch.Tensor]:
    return [value] if isinstance(value, torch.Tensor) else list(value)


def _generic(api: Api, kw: dict) -> list[Bad]:
    tensors = [n for n, k in api.kinds.items() if k in TENSOR_KINDS and n in kw]
    out = []
    for name, kind in api.kinds.items():
        skip = api.skip.get(name, ())
        if kind in TENSOR_KINDS and name in kw:
            if "list" not in skip:
                out.append(Bad(f"{name}-not-a-tensor", _set(name, _as_list(kw[name])), TypeError, name))
            if "dtype" not in skip:
                wrong = {"int": torch.float32, "bool": torch.float32}.get(kind, torch.int64)
                retyped = _map_tensors(kw[name], lambda t, wrong=wrong: t.to(wrong))
                out.append(Bad(f"{name}-{str(wrong)[6:]}", _set(name, retyped), TypeError, name))
            if "rank" not in skip:
                extra_dim = _map_tensors(kw[name], lambda t: t[None])
                out.append(Bad(f"{name}-extra-dim", _set(name, extra_dim), ValueError, name))
            if len(tensors) > 1 and "device" not in skip:
                on_meta = _map_tensors(kw[name], lambda t: t.to("meta"))
                out.append(Bad(f"{name}-meta-device", _set(name, on_meta), ValueError, name))
        elif kind in ("positive", "nonneg"):
            for v in (0.0, -1.0, math.nan, math.inf) if kind == "positive" else (-1.0, -1e-12, math.nan, math.inf):
                out.append(Bad(f"{name}={v}", _set(name, v), ValueError, name))
            out.append(Bad(f"{name}-tensor", _set(name, torch.tensor(2.0)), TypeError, name))
        elif kind == "choice":
            out.append(Bad(f"{name}-unknown", _set(name, "bogus"), ValueError, name))
            out.append(Bad(f"{name}-not-str", _set(name, 1), ValueError, name))
        elif kind == "flag":
            out.append(Bad(f"{name}-int", _set(name, 1), TypeError, name))
        elif kind == "group":  # torch.distributed is not initialised in this process
            out.append(Bad(f"{name}-uninitialised", _set(name, object()), ValueError, name))
    return out


def _cases(value_check: bool):
    params = []
    for api_name, api in APIS.items():
        kw = api.kwargs("cpu", torch.float32)
        for bad in (*_generic(api, kw), *api.bad):
            if bad.value_check == value_check:
                params.append(pytest.param(api_name, bad, id=f"{api_name}:{bad.label}"))
    return params


def _bad_kwargs(api: Api, bad: Bad) -> dict:
    kw = api.kwargs("cpu", torch.float32)
    bad.change(kw)
    return kw


NOT_SWEPT = {  # public names without tensor arguments to check (configuration, results, handles)
    "BACKENDS", "BackendUnavailableError", "backend_info", "use_backend", "set_value_checks", "nn", "plot",
    "LateFusionChoice", "RouterOutput", "UMTLoss", "ChannelMaskHandle",
    "AVDigits", "AVSplit", "load_av_digits",  # the AV-Digits dataset: bad inputs in tests/test_av_digits.py
}


def test_every_public_entry_point_is_swept():
    public = {*mmfast.__all__, *mmfast.nn.__all__, "reliability_diagram"} - NOT_SWEPT
    swept = {name.split("-")[0] for name in APIS}
    assert not public - swept, f"public entry points without an Api entry: {sorted(public - swept)}"


def names_argument(message: str, name: str) -> bool:
    """``name`` occurs in ``message`` as a word of its own ("x" in "x is on meta", not in "teacher_x0")."""
    return re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", message) is not None


@pytest.mark.parametrize("api_name,bad", _cases(value_check=False))
def test_bad_input_names_the_argument(api_name, bad):
    api = APIS[api_name]
    with pytest.raises(bad.exc) as info:
        api.call(**_bad_kwargs(api, bad))
    assert names_argument(str(info.value), bad.names), f"{bad.exc.__name__} does not name {bad.names!r}: {info.value}"


def _outputs(out) -> list[torch.Tensor]:
    if isinstance(out, mmfast.LateFusionChoice):
        assert out.choice in ("ume", "umt")
        return []
    if isinstance(out, os.PathLike):  # a written file
        return []
    return list(out) if isinstance(out, tuple) else [out]


@pytest.mark.parametrize("api_name", list(APIS))
def test_valid_call_of_each_entry_runs(api_name):
    """The entries' valid calls are valid (every bad case fails for its own reason)."""
    api = APIS[api_name]
    out = api.call(**api.kwargs("cpu", torch.float32))
    assert all(torch.isfinite(t).all() for t in _outputs(out))


# --------------------------------------------------------------------------------------------
# value checks: eager only, can be turned off, skipped under compile


@pytest.fixture
def value_checks_off():
    mmfast.set_value_checks(False)
    try:
        yield
    finally:
        mmfast.set_value_checks(True)


def _unchecked_result_ok(bad: Bad, call: Callable[[], object]) -> None:
    """``call()`` with the value check not running: it returns (NaN where ``when_unchecked="nan"``), or
    raises PyTorch's own error (``"raises"``)."""
    if bad.when_unchecked == "raises":
        with pytest.raises((IndexError, RuntimeError)):
            call()
        return
    out = call()
    first = out[0] if isinstance(out, tuple) else out
    if bad.when_unchecked == "nan":
        assert first.isnan().any(), f"{bad.label}: an invalid value must give NaN, not a silent number"


@pytest.mark.parametrize("api_name,bad", _cases(value_check=True))
def test_value_check_raises_in_eager(api_name, bad):
    api = APIS[api_name]
    with pytest.raises(bad.exc) as info:
        api.call(**_bad_kwargs(api, bad))
    assert names_argument(str(info.value), bad.names), f"{bad.exc.__name__} does not name {bad.names!r}: {info.value}"


@pytest.mark.parametrize("api_name,bad", _cases(value_check=True))
def test_value_check_can_be_turned_off(api_name, bad, value_checks_off):
    api = APIS[api_name]
    _unchecked_result_ok(bad, lambda: api.call(**_bad_kwargs(api, bad)))


@pytest.mark.parametrize("api_name,bad", _cases(value_check=True))
def test_value_check_is_skipped_under_compile(api_name, bad):
    api = APIS[api_name]
    kw = _bad_kwargs(api, bad)
    tensors = {k: v for k, v in kw.items() if isinstance(v, torch.Tensor)}
    rest = {k: v for k, v in kw.items() if k not in tensors}
    torch._dynamo.reset()  # one fresh compile per case (the lambda's code object is shared by the cases)
    compiled = torch.compile(lambda **t: api.call(**t, **rest), fullgraph=True, backend="aot_eager")
    _unchecked_result_ok(bad, lambda: compiled(**tensors))


def test_value_checks_off_from_the_environment():
    """MMFAST_CHECK_VALUES=0 (read at import) turns the value checks off in a fresh process."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import test_bad_input_sweep as s\n"
        "for api_name, bad in (p.values for p in s._cases(value_check=True)):\n"
        "    api = s.APIS[api_name]; s._unchecked_result_ok(bad, lambda: api.call(**s._bad_kwargs(api, bad)))\n"
        "print('ok', len(s._cases(value_check=True)))\n"
    )
    env = {**os.environ, "MMFAST_CHECK_VALUES": "0"}
    res = subprocess.run(
        [sys.executable, "-c", code, os.path.dirname(__file__)], env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == f"ok {len(_cases(value_check=True))}"


# --------------------------------------------------------------------------------------------
# no mutation: every entry, every backend

NO_MUTATION = backend_params()


@pytest.mark.parametrize("backend,device,dtype", NO_MUTATION)
@pytest.mark.parametrize("api_name", list(APIS))
def test_no_input_is_mutated(api_name, backend, device, dtype):
    api = APIS[api_name]
    kw = api.kwargs(device, dtype)
    floating = [n for n, k in api.kinds.items() if k in TENSOR_KINDS and n in kw
                and all(t.is_floating_point() for t in _tensor_list(kw[n]))]
    for name in floating:  # every floating tensor input requires grad (a float mask too)
        kw[name] = _map_tensors(kw[name], lambda t: t.detach().clone().requires_grad_(True))
    with mmfast.use_backend(backend):
        assert_inputs_unchanged(api.call, **kw)
    for name in floating:
        for t in _tensor_list(kw[name]):
            if name in api.grad_free:
                assert t.grad is None, f"{name} is stop-gradient by contract but got a gradient"
            else:
                assert t.grad is not None, f"the backward did not reach {name}"
