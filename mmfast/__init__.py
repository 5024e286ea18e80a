"""mmfast: fused kernels for multimodal and diffusion knowledge distillation.

``import mmfast`` registers the ``torch.library`` ops; it neither probes a GPU nor imports Triton.
"""

from mmfast import nn, plot
from mmfast._backend import BACKENDS, BackendUnavailableError, backend_info, use_backend
from mmfast._checks import set_value_checks
from mmfast.calibration import CalibrationAccumulator, expected_calibration_error
from mmfast.datasets import AVDigits, AVSplit, load_av_digits
from mmfast.ensemble import LateFusionChoice, choose_late_fusion, unimodal_ensemble
from mmfast.fdiv import (
    density_ratio,
    discriminator_loss,
    fake_score_loss,
    fdistill_loss,
    fdiv_coefficients,
    fdiv_weight,
    uni_instruct_loss,
)
from mmfast.functional import load_balance_loss, mutual_kd_loss, routed_kd_loss, teacher_weights
from mmfast.nn.unimodal_teacher import unimodal_teacher_loss
from mmfast.reconstruction import masked_reconstruction_loss

__version__ = "0.1.0"

__all__ = [
    "AVDigits",
    "AVSplit",
    "BACKENDS",
    "BackendUnavailableError",
    "CalibrationAccumulator",
    "LateFusionChoice",
    "backend_info",
    "choose_late_fusion",
    "density_ratio",
    "discriminator_loss",
    "expected_calibration_error",
    "fake_score_loss",
    "fdistill_loss",
    "fdiv_coefficients",
    "fdiv_weight",
    "load_av_digits",
    "load_balance_loss",
    "masked_reconstruction_loss",
    "mutual_kd_loss",
    "nn",
    "plot",
    "routed_kd_loss",
    "set_value_checks",
    "teacher_weights",
    "uni_instruct_loss",
    "unimodal_ensemble",
    "unimodal_teacher_loss",
    "use_backend",
]
