"""A whole training step (every public op: routed KD sparse / dense / class_dim=1 through RoutedKDLoss,
mutual KD, the router with both load-balance modes, teacher weights; forward and backward) captured in a
CUDA graph and replayed on new data equals eager: no op synchronises with the host (value checks are skipped
during capture) and every launch is capturable. GPU only."""

import pytest
import torch

import mmfast

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _gpu_backends() -> list[str]:
    if not torch.cuda.is_available():
        return []
    info = mmfast.backend_info("cuda")
    return [b for b in ("triton", "cuda", "torch") if info["available"][b]]


@pytest.mark.parametrize("backend", _gpu_backends())
def test_training_step_in_cuda_graph(backend):
    torch.manual_seed(0)
    N, C, E = 64, 1000, 4
    dev = torch.device("cuda")
    router = mmfast.nn.TeacherRouter(C, E, top_k=2, weighting="soft").to(dev)
    x = torch.randn(N, C, device=dev, requires_grad=True)
    z = torch.randn(E, N, C, device=dev)
    mask = torch.rand(N, device=dev) > 0.2
    labels = torch.randint(0, C, (N,), device=dev)
    xd = torch.randn(4, 16, 8, 8, device=dev, requires_grad=True)  # dense logits [B, C, H, W]
    zd = torch.randn(E, 4, 16, 8, 8, device=dev)
    pixel_mask = torch.rand(4, 8, 8, device=dev) > 0.3
    seg = mmfast.nn.RoutedKDLoss(temperature=2.0, mix="logits", class_dim=1)
    params = [x, xd, *router.parameters()]

    def step():
        r = router(x)
        loss = (
            mmfast.routed_kd_loss(x, z, r.weights, indices=r.indices, temperature=4.0, mask=mask)
            + mmfast.routed_kd_loss(x, z, temperature=2.0, mix="probs", divergence="js")
            + mmfast.mutual_kd_loss(torch.stack([x, z[0]]), temperature=2.0)
            + r.load_balance_loss
            + mmfast.load_balance_loss(r.probs, "cv")
            + mmfast.routed_kd_loss(x, z, mmfast.teacher_weights(z, labels, per_sample=False), divergence="js")
            + mmfast.routed_kd_loss(x, z, mmfast.teacher_weights(z, labels, temperature=0.5), mix="logits")
            + seg(xd, zd, mask=pixel_mask)
        )
        loss.backward()
        return loss

    with mmfast.use_backend(backend):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: kernel compilation happens outside the capture
            for _ in range(3):
                for p in params:
                    p.grad = None
                step()
        torch.cuda.current_stream().wait_stream(side)
        for p in params:
            p.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_loss = step()

        with torch.no_grad():
            x.copy_(torch.randn_like(x))
            z.copy_(torch.randn_like(z))
            xd.copy_(torch.randn_like(xd))
            labels.copy_(torch.randint_like(labels, C))
        graph.replay()
        torch.cuda.synchronize()
        replayed = (static_loss.clone(), [p.grad.clone() for p in params])

        for p in params:
            p.grad = None
        eager_loss = step()
    torch.testing.assert_close(replayed[0], eager_loss, rtol=1e-5, atol=1e-6)
    for got, p in zip(replayed[1], params, strict=True):
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-6)
