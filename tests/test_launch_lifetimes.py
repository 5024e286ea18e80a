"""The native launchers (mmfast/_native.py, shared by the cpu and cuda kernels) keep every tensor whose address
they pass to a kernel alive until the launch: a parameter struct holds bare addresses, so a converted copy (a
bf16 ``h`` made float32, non-contiguous weights, a workspace) that is freed before the launch is read, or
written, after its memory went back to the allocator. (Found by the CUDA emulation under AddressSanitizer:
tests/cuda_emu.py.)"""

from __future__ import annotations

import weakref

import pytest
import torch

from mmfast import _native
from mmfast.reference.masked_reconstruction import MSE

if _native.load() is None:
    pytest.skip(f"mmfast._C is not built: {_native.load_error()}", allow_module_level=True)


@pytest.fixture
def freed(monkeypatch) -> list[tuple[int, str]]:
    return _watch_launches(monkeypatch)


def _watch_launches(monkeypatch) -> list[tuple[int, str]]:
    """Every tensor whose address a launcher takes is watched; a launch finds none of those taken for it freed,
    or fails. (launch number, tensor) of each freed one."""
    dead: list[tuple[int, str]] = []
    launch = [0]
    take_address, run = _native._ptr, _native._run

    def watched_ptr(t):
        if t is not None and t.numel() > 0:
            weakref.finalize(t, dead.append, (launch[0], f"{tuple(t.shape)} {t.dtype}"))
        return take_address(t)

    def checked_run(kernel, fn_name, params, device):
        early = [what for n, what in dead if n == launch[0]]
        assert not early, f"{fn_name}: tensors freed before the launch: {early}"
        run(kernel, fn_name, params, device)
        launch[0] += 1

    monkeypatch.setattr(_native, "_ptr", watched_ptr)
    monkeypatch.setattr(_native, "_run", checked_run)
    return dead


def test_score_launchers(freed):
    g = torch.Generator().manual_seed(0)
    x, a, b = (torch.randn(4, 50, generator=g) for _ in range(3))
    per_sample = torch.rand(4, 2, generator=g, dtype=torch.float64)[:, 0] + 0.5  # strided float64: copied
    coef = torch.randn(3, 4, generator=g, dtype=torch.float64).t()  # transposed float64: copied
    _native.fdistill_rows("cpu", x, a, b, per_sample, 0.25, True)
    _native.uni_instruct_rows("cpu", x, a, b, coef, torch.tensor([2.0], dtype=torch.float64), 0.5, 0.25, True,
                              True, True, True, True)
    _native.fake_score_rows("cpu", b, x, per_sample, 0.25, True)


def test_routed_mutual_and_reconstruction_launchers(freed):
    g = torch.Generator().manual_seed(1)
    x, z = torch.randn(5, 7, 1, generator=g), torch.randn(3, 5, 7, 1, generator=g)
    weights = torch.rand(2, 5, generator=g, dtype=torch.float64).t()  # transposed float64: copied
    indices = torch.randint(0, 3, (2, 5), generator=g, dtype=torch.int32).t()  # int32, transposed: copied
    mask = torch.tensor([1, 0, 1, 1, 0], dtype=torch.int8)[:, None]  # not bool: converted
    _native.routed_kd_rows("cpu", x, z, weights, indices, mask, 2.0, 0, 0, 0.5, 4.0, True, True, True)
    _native.mutual_kd_rows("cpu", torch.randn(3, 5, 7, generator=g).transpose(1, 2), 2.0, 4.0, True)
    pred, target = torch.randn(4, 6, 3, generator=g), torch.randn(4, 6, 3, generator=g)
    rows = torch.rand(12, 2, generator=g)[:, 0]  # strided: copied
    _native.masked_reconstruction_rows("cpu", pred, target, rows, None, MSE, 1.0, False, 1e-6, False, True, True,
                                       True)
    element = torch.rand(4, 6, 3, generator=g) > 0.5
    _native.masked_reconstruction_rows("cpu", pred, target, rows, element, MSE, 1.0, False, 1e-6, False, True,
                                       False, False)


def test_split_row_workspaces_of_the_cuda_launchers(monkeypatch):
    """The CUDA routed- and mutual-KD launchers' workspace for a few long rows split over several blocks (on a GPU,
    or on the CUDA emulation without one)."""
    if torch.cuda.is_available():
        device = "cuda"
        if not getattr(_native.load(), "with_cuda", False):
            pytest.skip("mmfast._C was built without the CUDA kernels")
    else:
        import cuda_emu

        if cuda_emu.unavailable_reason() is not None:
            pytest.skip(f"no GPU, and no CUDA emulation: {cuda_emu.unavailable_reason()}")
        cuda_emu.emulate_cuda_backend(monkeypatch)
        device = "cpu"
    freed = _watch_launches(monkeypatch)  # over the emulated launches; a launch fails on a freed tensor
    g = torch.Generator().manual_seed(2)
    C = _native.load().row_split_min_classes  # the shortest rows that split
    x, z = torch.randn(3, C, 1, generator=g).to(device), torch.randn(2, 3, C, 1, generator=g).to(device)
    weights = torch.rand(3, 2, generator=g).to(device)
    _native.routed_kd_rows("cuda", x, z, weights, None, None, 2.0, 0, 2, 0.5, 4.0, True, True, True)
    _native.mutual_kd_rows("cuda", torch.randn(2, 3, C, generator=g).to(device), 2.0, 4.0, True)
    assert freed, "the watch saw no tensor freed after its launch (the test watched nothing)"


def test_the_watch_sees_a_freed_copy(freed):
    """The check itself: a launch handed a copy that nothing holds fails."""
    x = torch.randn(2, 8)
    p = _native.fdistill_params(x, x, x, torch.ones(2, dtype=torch.float64).float(), 1.0, torch.empty(2),
                                torch.empty(2, 8), torch.empty(0))
    with pytest.raises(AssertionError, match="freed before the launch"):
        _native._run("cpu", "fdistill", p, x.device)
