"""Memory of the native CPU kernels (SPEC section 7): a training step allocates the gradients it returns plus
O(rows) per-row statistics, never an [E, N, C]-sized intermediate. Measured with the profiler's allocation
events (``mmfast.bench.step_peak_bytes``), which also see the intermediates of the torch reference backend
(checked here, so that a bound that holds is not a blind measurement)."""

from __future__ import annotations

import pytest
import torch

import mmfast
from mmfast import bench

pytestmark = pytest.mark.skipif(not mmfast.backend_info(torch.device("cpu"))["available"]["cpu"],
                                reason="the native CPU extension is not built")

CPU = torch.device("cpu")
N, C, E = 257, 1001, 4


def step_peak(backend: str, loss, leaves: list[torch.Tensor]) -> int:
    def body():
        with mmfast.use_backend(backend):
            return torch.autograd.grad(loss(), leaves)

    peak = bench.step_peak_bytes(body, CPU)
    assert peak is not None, "this torch's profiler does not expose its memory events"
    return peak


def grad_bytes(leaves: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in leaves)


def row_slack(rows: int, per_row: int) -> int:
    """Per-row statistics (losses, normalisers, routing weights): O(rows), far below one [rows, C] buffer."""
    return 16 * rows * per_row + 4096


@pytest.fixture(scope="module")
def routed_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, generator=g)
    z = torch.randn(E, N, C, generator=g)
    w = torch.softmax(torch.randn(N, E, generator=g), dim=1)
    return x, z, w


@pytest.mark.parametrize("mix", ["loss", "logits", "probs"])
@pytest.mark.parametrize("divergence", ["kl", "js"])
def test_routed_kd_allocates_the_gradient_and_row_statistics(routed_inputs, mix, divergence):
    x, z, w = routed_inputs
    x = x.clone().requires_grad_()

    def loss():
        return mmfast.routed_kd_loss(x, z, w, temperature=2.0, mix=mix, divergence=divergence)

    peak = step_peak("cpu", loss, [x])
    assert grad_bytes([x]) <= peak <= grad_bytes([x]) + row_slack(N, E + 1), peak
    reference = step_peak("torch", loss, [x])
    assert reference >= z.numel() * z.element_size(), reference  # the reference materialises [E, N, C]


def test_routed_kd_every_gradient_sparse_and_dense_layout(routed_inputs):
    x, z, w = routed_inputs
    leaves = [x.clone().requires_grad_(), z.clone().requires_grad_(), w.clone().requires_grad_()]
    peak = step_peak("cpu", lambda: mmfast.routed_kd_loss(*leaves), leaves)
    assert grad_bytes(leaves) <= peak <= grad_bytes(leaves) + row_slack(N, E + 1), peak

    xs = x.clone().requires_grad_()
    indices = torch.randint(0, E, (N, 2), generator=torch.Generator().manual_seed(1))
    peak = step_peak("cpu", lambda: mmfast.routed_kd_loss(xs, z, w[:, :2], indices=indices), [xs])
    assert peak <= grad_bytes([xs]) + row_slack(N, 3), peak

    xd = torch.randn(3, 67, 9, 7).requires_grad_()  # logits [B, C, H, W], routing per sample
    zd = torch.randn(E, 3, 67, 9, 7)
    peak = step_peak("cpu", lambda: mmfast.routed_kd_loss(xd, zd, w[:3], class_dim=1), [xd])
    assert peak <= grad_bytes([xd]) + row_slack(3 * 9 * 7, E + 1), peak


def test_mutual_kd():
    logits = torch.randn(3, N, C).requires_grad_()
    peak = step_peak("cpu", lambda: mmfast.mutual_kd_loss(logits, temperature=2.0), [logits])
    assert grad_bytes([logits]) <= peak <= grad_bytes([logits]) + row_slack(N, 3), peak
    assert step_peak("torch", lambda: mmfast.mutual_kd_loss(logits, temperature=2.0), [logits]) > 2 * peak


def test_score_losses():
    B, shape = 6, (6, 3, 17, 19)
    x, a, b = (torch.randn(shape) for _ in range(3))
    ratio = torch.rand(B) + 0.5
    xs = x.clone().requires_grad_()
    peak = step_peak("cpu", lambda: mmfast.fdistill_loss(xs, a, b, ratio), [xs])
    assert grad_bytes([xs]) <= peak <= grad_bytes([xs]) + row_slack(B, 4), peak

    leaves = [x.clone().requires_grad_(), a.clone().requires_grad_(), b.clone().requires_grad_()]

    def uni_instruct():
        return mmfast.uni_instruct_loss(*leaves, ratio, divergence="jeffreys", fgm=True)

    peak = step_peak("cpu", uni_instruct, leaves)
    assert grad_bytes(leaves) <= peak <= grad_bytes(leaves) + row_slack(B, 8), peak
    assert step_peak("torch", uni_instruct, leaves) > peak + grad_bytes(leaves[:1])

    fake = b.clone().requires_grad_()
    peak = step_peak("cpu", lambda: mmfast.fake_score_loss(fake, x, ratio), [fake])
    assert grad_bytes([fake]) <= peak <= grad_bytes([fake]) + row_slack(B, 4), peak


@pytest.mark.parametrize("mask", ["none", "row"])
def test_masked_reconstruction(mask):
    rows, D = 300, 129
    pred = torch.randn(rows, D).requires_grad_()
    target = torch.randn(rows, D)
    row_mask = (torch.arange(rows) % 4 == 0)[:, None] if mask == "row" else None

    def loss():
        return mmfast.masked_reconstruction_loss(pred, target, row_mask)

    peak = step_peak("cpu", loss, [pred])
    assert grad_bytes([pred]) <= peak <= grad_bytes([pred]) + row_slack(rows, 2), peak
    assert step_peak("torch", loss, [pred]) > peak + grad_bytes([pred])
