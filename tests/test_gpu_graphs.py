"""A whole training step (every public op: routed KD sparse / dense / class_dim=1 through RoutedKDLoss / a few
long rows, mutual KD, the router with both load-balance modes, teacher weights; the f-divergence losses and modules
with the density ratio and its per-noise-level normaliser; masked reconstruction, UMT, the channel mask, the
uni-modal ensemble and ECE; forward and backward) captured in a CUDA graph and replayed on new data equals
eager: no op synchronises with the host (value checks are skipped during capture) and every launch is
capturable. GPU only."""

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
    xl = torch.randn(2, 40000, device=dev, requires_grad=True)  # a few long rows: Triton splits them (3 launches)
    zl = torch.randn(2, 2, 40000, device=dev, requires_grad=True)
    # f-divergence score distillation: generator samples [B, 3, 16, 16], discriminator logits, noise levels
    B = 8
    gen_x = torch.randn(B, 3, 16, 16, device=dev, requires_grad=True)
    teacher_x0 = torch.randn(B, 3, 16, 16, device=dev, requires_grad=True)
    fake_x0 = torch.randn(B, 3, 16, 16, device=dev, requires_grad=True)
    disc_real = torch.randn(B, 4, device=dev, requires_grad=True)
    disc_fake = torch.randn(B, 4, device=dev, requires_grad=True)
    t = torch.rand(B, device=dev)
    sigma = torch.rand(B, device=dev) * 10 + 0.01
    normalizer = mmfast.nn.DensityRatioNormalizer(num_bins=4).to(dev)
    fdistill = mmfast.nn.FDistillLoss("js")
    uni_instruct = mmfast.nn.UniInstructLoss("jeffreys", alpha=0.5, fgm=True, di_norm="batch")
    # reconstruction, UMT, channel mask
    feat = torch.randn(N, 96, device=dev, requires_grad=True)
    feat_teacher = torch.randn(N, 96, device=dev)
    row_mask = (torch.rand(N, 1, device=dev) > 0.25).float()
    umt = mmfast.nn.UniModalTeacherLoss(weight=5.0)
    channel_mask = mmfast.nn.ChannelMask(16, heads=2).to(dev)
    params = [x, xd, xl, zl, *router.parameters(), gen_x, teacher_x0, fake_x0, disc_real, disc_fake, feat,
              *channel_mask.parameters()]
    metrics = {}

    def step():
        ratio = mmfast.density_ratio(disc_fake)
        ratio_t = normalizer(ratio, t)
        fdiv = (
            fdistill(gen_x, teacher_x0, fake_x0, ratio_t)
            + uni_instruct(gen_x, teacher_x0, fake_x0, ratio)
            + mmfast.uni_instruct_loss(gen_x, teacher_x0, fake_x0, ratio_t, "kl", di_norm="sample")
            + mmfast.fdistill_loss(gen_x, teacher_x0, fake_x0, mmfast.fdiv_weight(ratio, "squared_hellinger"))
            + mmfast.fake_score_loss(fake_x0, gen_x, sigma)
            + mmfast.discriminator_loss(disc_real, disc_fake)
            + 0.01 * sum(c.mean() for c in mmfast.fdiv_coefficients(ratio, "js"))
        )
        recon = (
            mmfast.masked_reconstruction_loss(feat, feat_teacher, row_mask, loss="smooth_l1")
            + mmfast.masked_reconstruction_loss(feat, feat_teacher, feat_teacher > 0)  # element mask: prescaled mean
            + mmfast.masked_reconstruction_loss(channel_mask(xd), zd[0], loss="cosine", channel_dim=1,
                                                mask=pixel_mask[:, None].float())
            + umt(x, labels, [feat, x], [feat_teacher, z[1]])
            + mmfast.unimodal_teacher_loss(x, labels, [feat], [feat_teacher], weight=2.0)
        )
        ensemble = mmfast.unimodal_ensemble([x, z[0], z[1]], combine="probs")
        metrics["ece"] = mmfast.expected_calibration_error(ensemble.detach(), labels)
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
            + mmfast.routed_kd_loss(xl, zl, temperature=2.0, divergence="reverse_kl", mix="probs")
            + mmfast.mutual_kd_loss(torch.stack([xl, zl[0]]), temperature=2.0)
            + fdiv
            + recon
            + 0.1 * torch.nn.functional.nll_loss(ensemble, labels)  # UME's cross-entropy (log-probabilities)
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
        static_ece = metrics["ece"]

        with torch.no_grad():
            for inp in (x, z, xd, xl, zl, gen_x, teacher_x0, fake_x0, disc_fake, feat, feat_teacher):
                inp.copy_(torch.randn_like(inp))
            labels.copy_(torch.randint_like(labels, C))
            t.copy_(torch.rand_like(t))
        # the step updates the normaliser's running means: replay and eager start from the same state
        state = {k: v.clone() for k, v in normalizer.state_dict().items()}
        graph.replay()
        torch.cuda.synchronize()
        replayed = (static_loss.clone(), static_ece.clone(), [p.grad.clone() for p in params],
                    normalizer.bin_mean.clone())

        normalizer.load_state_dict(state)
        for p in params:
            p.grad = None
        eager_loss = step()
    torch.testing.assert_close(replayed[0], eager_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(replayed[1], metrics["ece"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(replayed[3], normalizer.bin_mean, rtol=1e-6, atol=1e-7)
    for got, p in zip(replayed[2], params, strict=True):
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-6)


_BENCH_PROVIDERS = ["eager", "compile", "copy", "exp-floor"] + [f"mmfast-{b}" for b in _gpu_backends()]


@pytest.mark.parametrize("provider", _BENCH_PROVIDERS)
def test_benchmark_step_is_a_timed_graph_replay(provider):
    """``python -m mmfast bench`` on a GPU times each provider as one CUDA-graph replay between CUDA events
    (``Step.timing == "cuda-graph"``): capture must succeed for every provider, give a finite positive device time,
    and (for the losses) replay the same gradients as an eager run, also after new allocations of the inputs'
    sizes filled with NaN (a step that let its inputs go would now replay on those: the 2026-11-27 H200 run)."""
    from mmfast import bench

    case, dev = bench.ROUTED_CASES[0], torch.device("cuda")
    step = bench.make_step(case, provider, dev, torch.float32, graph=True)
    assert step.timing == "cuda-graph"
    junk = [torch.full_like(t, float("nan")) for t in case.inputs(dev, torch.float32, 1).values()
            if isinstance(t, torch.Tensor) and t.is_floating_point()]
    times = [bench._time_round(step) for _ in range(3)]
    assert all(0 < t < 1.0 for t in times), times
    if provider.startswith("mmfast-") or provider in ("eager", "compile"):
        assert step.peak_bytes is not None and step.peak_bytes > 0  # at least the gradients it returns
        graph, outputs, _ = step.keep_alive
        fn, context = bench._loss_fn(case, provider)
        kwargs = case.inputs(dev, torch.float32, 0)
        leaves = [t for t in kwargs.values() if isinstance(t, torch.Tensor) and t.requires_grad]
        with context():
            expected = torch.autograd.grad(fn(**kwargs), leaves)
        for got, want in zip(outputs, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert all(bool(t.isnan().all()) for t in junk)  # nor did the replays write there


@pytest.mark.parametrize("provider", [p for p in _BENCH_PROVIDERS if p not in ("copy", "exp-floor")])
def test_benchmark_forward_alone_is_a_timed_graph_replay(provider):
    """The bench's ``fwd`` column on a GPU: the loss's forward captured alone replays with a positive device time,
    and the loss value equals an eager forward; measure_group(forward=True) reports it with bwd = step - fwd."""
    from mmfast import bench

    case, dev = bench.ROUTED_CASES[0], torch.device("cuda")
    step = bench.make_step(case, provider, dev, torch.float32, graph=True, forward_only=True)
    assert step.timing == "cuda-graph" and step.split is None and step.peak_bytes is None
    times = [bench._time_round(step) for _ in range(3)]
    assert all(0 < t < 1.0 for t in times), times
    _, loss, _ = step.keep_alive
    fn, context = bench._loss_fn(case, provider)
    with context():
        expected = fn(**case.inputs(dev, torch.float32, 0))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    (result,) = bench.measure_group(case, torch.float32, [provider], dev, budget_s=0.01, forward=True)
    assert result.error is None and result.timing == "cuda-graph"
    assert 0 < result.forward_s and result.backward_s is None
