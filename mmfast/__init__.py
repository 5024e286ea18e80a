"""mmfast: fused kernels for multimodal and diffusion knowledge distillation.

``import mmfast`` registers the ``torch.library`` ops; it neither probes a GPU nor imports Triton.
"""

from mmfast import nn
from mmfast._backend import BACKENDS, BackendUnavailableError, backend_info, use_backend
from mmfast._checks import set_value_checks
from mmfast.functional import load_balance_loss, mutual_kd_loss, routed_kd_loss, teacher_weights

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "backend_info",
    "load_balance_loss",
    "mutual_kd_loss",
    "nn",
    "routed_kd_loss",
    "set_value_checks",
    "teacher_weights",
    "use_backend",
]
