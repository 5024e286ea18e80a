"""Test configuration.

On a machine without a CUDA device the Triton kernels run under the interpreter, which must be
switched on before Triton is first imported: that is done here, before any test module loads.
"""

import os

# OpenMP threads that finish their share sleep rather than spin (libgomp spins for milliseconds by default). The
# tests run in one process per core (pytest-xdist), each with torch's threads: a worker's spinning threads took
# the cores its neighbour needed, and the emulated CUDA kernel tests ran 7x slower on 2 cores. Read once, when
# OpenMP loads with torch: hence before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

# MMFAST_TEST_NATIVE=<path of a _C module>: the tests run on that build of mmfast._C instead of the installed one
# (scripts/cpu_asan.sh: the CPU kernels built under AddressSanitizer)
if os.environ.get("MMFAST_TEST_NATIVE"):
    import importlib.util
    import sys

    _spec = importlib.util.spec_from_file_location("mmfast._C", os.environ["MMFAST_TEST_NATIVE"])
    sys.modules["mmfast._C"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["mmfast._C"])

import pytest  # noqa: E402
import torch  # noqa: E402

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


@pytest.fixture(autouse=True)
def _cuda_emulation(request, monkeypatch):
    """Tests marked ``cuda_emu`` (the cuda backend's params without a GPU: _utils.backend_params) run the CUDA
    kernels on CPU tensors over the emulation (tests/cuda_emu.py)."""
    if request.node.get_closest_marker("cuda_emu") is not None:
        import cuda_emu

        cuda_emu.emulate_cuda_backend(monkeypatch)

