"""Test configuration.

On a machine without a CUDA device the Triton kernels run under the interpreter, which must be
switched on before Triton is first imported: that is done here, before any test module loads.
"""

import os

import pytest
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


@pytest.fixture(autouse=True)
def _cuda_emulation(request, monkeypatch):
    """Tests marked ``cuda_emu`` (the cuda backend's params without a GPU: _utils.backend_params) run the CUDA
    kernels on CPU tensors over the emulation (tests/cuda_emu.py)."""
    if request.node.get_closest_marker("cuda_emu") is not None:
        import cuda_emu

        cuda_emu.emulate_cuda_backend(monkeypatch)


def pytest_collection_modifyitems(config, items):
    """On the CUDA emulation (no GPU), test_kernels_cuda.py's cases of the cluster row team run at float32 only:
    cluster mode differs from the block team in how a row's pieces meet (workspace slots, cluster barriers), which
    is the same at every dtype, while its fibers make it the slowest team to emulate; a GPU runs every dtype."""
    if torch.cuda.is_available():
        return
    kept, dropped = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("row_team") == "cluster_rows" and params.get("dtype", torch.float32) != torch.float32:
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
