"""Test configuration.

On a machine without a CUDA device the Triton kernels run under the interpreter, which must be
switched on before Triton is first imported: that is done here, before any test module loads.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Hypothesis profiles of the fuzz tests (tests/README.md): "ci" (default; MMFAST_FUZZ_EXAMPLES cases per
# test, 25 unless set, derandomized so CI is reproducible) and "nightly" (>= 500 random cases per test).
# Select with MMFAST_FUZZ_PROFILE=nightly or pytest --hypothesis-profile=nightly.
from hypothesis import HealthCheck, settings  # noqa: E402

_fuzz = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile(
    "ci", max_examples=int(os.environ.get("MMFAST_FUZZ_EXAMPLES", "25")), derandomize=True, **_fuzz
)
settings.register_profile(
    "nightly", max_examples=max(500, int(os.environ.get("MMFAST_FUZZ_EXAMPLES", "500"))), **_fuzz
)
settings.load_profile(os.environ.get("MMFAST_FUZZ_PROFILE", "ci"))
