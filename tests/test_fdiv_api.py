"""The f-divergence public API: bad inputs, [B, D] views and layouts, NaN and zero-distance samples, the
modules (ratio normaliser EMA and state dict, batch-normalised h, process groups) and discriminator_loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _utils import backend_params

import mmfast
from mmfast import fdiv as fdiv_api
from mmfast.reference import fdiv as fdiv_ref

F64 = torch.float64
DIVS = tuple(fdiv_ref.DIVERGENCES)


def _xab(B=3, shape=(2, 4), seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, *shape, generator=g, dtype=F64).to(dtype) for _ in range(3)]


# ----------------------------------------------------------------------------------------------
# bad input: clear errors naming the argument


def test_bad_sample_tensors():
    x, a, b = _xab()
    r = torch.ones(3, dtype=F64)
    with pytest.raises(ValueError, match="teacher_x0 must have the shape of x"):
        mmfast.uni_instruct_loss(x, a[:, :1], b, r)
    with pytest.raises(ValueError, match="fake_x0 must have the shape of x"):
        mmfast.fdistill_loss(x, a, b[:2], r)
    with pytest.raises(ValueError, match="x must have the shape of fake_x0"):
        mmfast.fake_score_loss(b, x[:, :1], r)
    with pytest.raises(ValueError, match="teacher_x0 is on meta but x is on cpu"):
        mmfast.uni_instruct_loss(x, a.to("meta"), b, r)
    with pytest.raises(TypeError, match="fake_x0 dtype torch.float32 must match x dtype torch.float64"):
        mmfast.fdistill_loss(x, a, b.float(), r)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        mmfast.uni_instruct_loss(x.long(), a.long(), b.long(), r)
    with pytest.raises(TypeError, match="teacher_x0 must be a torch.Tensor"):
        mmfast.fdistill_loss(x, a.tolist(), b, r)
    with pytest.raises(ValueError, match="at least one sample and one element"):
        mmfast.uni_instruct_loss(x[:0], a[:0], b[:0], r[:0])
    with pytest.raises(ValueError, match="at least one sample and one element"):
        mmfast.fdistill_loss(x[:, :0], a[:, :0], b[:, :0], r)
    with pytest.raises(ValueError, match=r"x must be \[B, \.\.\.\]"):
        mmfast.fdistill_loss(x[0, 0, 0], a[0, 0, 0], b[0, 0, 0], r)


@pytest.mark.parametrize("name", ["ratio", "h", "sigma"])
def test_bad_per_sample_tensors(name):
    x, a, b = _xab()

    def call(v):
        if name == "ratio":
            return mmfast.uni_instruct_loss(x, a, b, v)
        if name == "h":
            return mmfast.fdistill_loss(x, a, b, v)
        return mmfast.fake_score_loss(b, x, v)

    with pytest.raises(ValueError, match=rf"{name} must be \[B\] = \[3\]"):
        call(torch.ones(3, 1, dtype=F64))
    with pytest.raises(ValueError, match=rf"{name} must be \[B\] = \[3\]"):
        call(torch.ones(4, dtype=F64))
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match=rf"{name} must be > 0"):
            call(torch.tensor([1.0, bad, 2.0], dtype=F64))
    with pytest.raises(TypeError, match=rf"{name} must be a floating-point tensor"):
        call(torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=rf"{name} is on meta but x is on cpu"):
        call(torch.ones(3, dtype=F64, device="meta"))
    mmfast.set_value_checks(False)  # value checks (host reads) can be turned off; shape checks stay
    try:
        call(torch.tensor([1.0, -1.0, 2.0], dtype=F64))
    finally:
        mmfast.set_value_checks(True)


def test_bad_options():
    x, a, b = _xab()
    r = torch.ones(3, dtype=F64)
    with pytest.raises(ValueError, match="'reverse_kl', 'softened_reverse_kl', 'js', 'squared_hellinger', 'kl', "
                                         "'jeffreys', 'neyman_chi2', 'pearson_chi2'; got 'forward_kl'"):
        mmfast.uni_instruct_loss(x, a, b, r, "forward_kl")
    for fn in (mmfast.fdiv_weight, mmfast.fdiv_coefficients):
        with pytest.raises(ValueError, match="divergence must be one of 'reverse_kl'"):
            fn(r, "KL")
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        mmfast.uni_instruct_loss(x, a, b, r, alpha=-0.1)
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        mmfast.uni_instruct_loss(x, a, b, r, alpha=math.inf)
    with pytest.raises(TypeError, match="alpha must be a Python number"):
        mmfast.uni_instruct_loss(x, a, b, r, alpha=torch.tensor(1.0))
    with pytest.raises(TypeError, match="fgm must be a bool"):
        mmfast.uni_instruct_loss(x, a, b, r, fgm=1)
    with pytest.raises(ValueError, match="di_norm must be one of 'sample', 'batch'"):
        mmfast.uni_instruct_loss(x, a, b, r, di_norm="global")
    for fn in (lambda red: mmfast.uni_instruct_loss(x, a, b, r, reduction=red),
               lambda red: mmfast.fdistill_loss(x, a, b, r, reduction=red),
               lambda red: mmfast.fake_score_loss(b, x, r, reduction=red)):
        with pytest.raises(ValueError, match="reduction must be one of 'mean', 'sum', 'none'"):
            fn("batchmean")
    with pytest.raises(ValueError, match="sigma_data must be a finite number > 0"):
        mmfast.fake_score_loss(b, x, r, sigma_data=0.0)
    with pytest.raises(ValueError, match="r must be > 0"):
        mmfast.fdiv_weight(torch.tensor([1.0, 0.0]), "kl")
    with pytest.raises(TypeError, match="r must be a floating-point tensor"):
        mmfast.fdiv_coefficients(torch.tensor([1, 2]), "kl")


def test_bad_logits():
    for bad in (torch.tensor(1.0), torch.zeros(2, 3, 4)):
        with pytest.raises(ValueError, match=r"logits must be \[B\] or \[B, K\]"):
            mmfast.density_ratio(bad)
    with pytest.raises(TypeError, match="logits must be a floating-point tensor"):
        mmfast.density_ratio(torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="logits must have at least one sample"):
        mmfast.density_ratio(torch.zeros(2, 0))
    with pytest.raises(ValueError, match="logit_clamp must be a finite number > 0"):
        mmfast.density_ratio(torch.zeros(2), logit_clamp=-1.0)
    with pytest.raises(ValueError, match=r"ratio_max \(0.5\) must be >= ratio_min \(1.0\)"):
        mmfast.density_ratio(torch.zeros(2), ratio_min=1.0, ratio_max=0.5)
    with pytest.raises(ValueError, match="real_logits and fake_logits must be non-empty"):
        mmfast.discriminator_loss(torch.zeros(0), torch.zeros(2))
    with pytest.raises(TypeError, match="fake_logits must be a floating-point tensor"):
        mmfast.discriminator_loss(torch.zeros(2), torch.zeros(2, dtype=torch.long))


def test_bad_module_configuration():
    with pytest.raises(ValueError, match="divergence must be one of"):
        mmfast.nn.FDistillLoss("hellinger")
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        mmfast.nn.UniInstructLoss(alpha=-1.0)
    with pytest.raises(ValueError, match="di_norm must be one of"):
        mmfast.nn.UniInstructLoss(di_norm="all")
    with pytest.raises(ValueError, match="num_bins must be an int >= 1"):
        mmfast.nn.DensityRatioNormalizer(num_bins=0)
    with pytest.raises(ValueError, match=r"momentum must be in \(0, 1\]"):
        mmfast.nn.DensityRatioNormalizer(momentum=0.0)
    with pytest.raises(ValueError, match="t_max > t_min"):
        mmfast.nn.DensityRatioNormalizer(t_min=1.0, t_max=1.0)
    for make in (lambda pg: mmfast.nn.FDistillLoss(process_group=pg),
                 lambda pg: mmfast.nn.UniInstructLoss(process_group=pg),
                 lambda pg: mmfast.nn.DensityRatioNormalizer(process_group=pg)):
        with pytest.raises(ValueError, match="torch.distributed is not initialised"):
            make(object())
    norm = mmfast.nn.DensityRatioNormalizer()
    with pytest.raises(ValueError, match=r"t must be \[B\] = \[3\] like ratio"):
        norm(torch.ones(3), torch.ones(2))
    with pytest.raises(ValueError, match=r"ratio must be \[B\]"):
        norm(torch.ones(3, 1), torch.ones(3))
    with pytest.raises(ValueError, match="ratio must be > 0"):
        norm(torch.tensor([1.0, -1.0]), torch.ones(2))


# ----------------------------------------------------------------------------------------------
# [B, D] views: no copy for dense layouts; gradients in the caller's layout


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "channels_last_3d", "permuted", "rowpad",
                                    "size1-dims", "1d"])
def test_sample_views_do_not_copy_dense_layouts(layout):
    g = torch.Generator().manual_seed(1)
    if layout == "contiguous":
        x = torch.randn(3, 4, 5, 6, generator=g)
    elif layout == "channels_last":
        x = torch.randn(3, 4, 5, 6, generator=g).to(memory_format=torch.channels_last)
    elif layout == "channels_last_3d":
        x = torch.randn(2, 3, 2, 4, 5, generator=g).to(memory_format=torch.channels_last_3d)
    elif layout == "permuted":
        x = torch.randn(3, 6, 4, 5, generator=g).permute(0, 2, 3, 1)
    elif layout == "rowpad":
        x = torch.randn(3, 50, generator=g)[:, 5:45].unflatten(1, (4, 10))
    elif layout == "size1-dims":
        x = torch.randn(3, 1, 7, 1, generator=g).to(memory_format=torch.channels_last)
    else:
        x = torch.randn(5, generator=g)[::2]
    B, D = x.shape[0], math.prod(x.shape[1:])
    (v,) = fdiv_api._sample_views((x,), B, D)
    assert v.shape == (B, D) and v.data_ptr() == x.data_ptr() and (D == 1 or v.stride(1) == 1)
    # the [B, D] view holds each sample's elements
    for i in range(B):
        assert torch.equal(v[i].sort().values, x[i].flatten().sort().values)


def test_sample_views_bring_others_to_x_layout():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 4, 5, generator=g).to(memory_format=torch.channels_last)
    a = torch.randn(2, 3, 4, 5, generator=g)
    nd = torch.randn(2, 3, 4, 10, generator=g)[..., ::2]  # not dense: copied
    vx, va, vn = fdiv_api._sample_views((x, a, nd), 2, 60)
    assert vx.data_ptr() == x.data_ptr() and vn.stride(1) == 1
    order = (0, 2, 3, 1)
    torch.testing.assert_close(va, a.permute(order).reshape(2, 60), rtol=0, atol=0)
    torch.testing.assert_close(vn, nd.permute(order).reshape(2, 60), rtol=0, atol=0)
    (vnd,) = fdiv_api._sample_views((nd,), 2, 60)  # non-dense x: one contiguous copy in its logical order
    torch.testing.assert_close(vnd, nd.reshape(2, 60), rtol=0, atol=0)


@pytest.mark.parametrize("backend,device,dtype", backend_params())
def test_channels_last_equals_contiguous(backend, device, dtype):
    x, a, b = _xab(2, (3, 2, 3), seed=3, dtype=dtype)
    x, a, b = (t.to(device) for t in (x, a, b))
    r = torch.tensor([0.5, 4.0], device=device)
    results = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        leaves = [t.to(memory_format=fmt).requires_grad_(True) for t in (x, a, b)]
        with mmfast.use_backend(backend):
            loss = (mmfast.uni_instruct_loss(*leaves, r, "js", 0.5, True, True)
                    + mmfast.fdistill_loss(*leaves, r) + mmfast.fake_score_loss(leaves[2], leaves[0], r))
            grads = torch.autograd.grad(loss, leaves)
        if fmt == torch.channels_last:
            assert all(g_.is_contiguous(memory_format=torch.channels_last) for g_ in grads)
        results.append((loss, grads))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
    for g1, g0 in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(g1, g0, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# NaN propagates per sample; |x - a| = 0 stays finite


@pytest.mark.parametrize("backend,device,dtype", backend_params())
def test_nan_stays_in_its_sample(backend, device, dtype):
    x, a, b = (t.to(device, dtype) for t in _xab(3, (5,), seed=4))
    x[1, 2] = float("nan")
    r = torch.tensor([0.5, 1.0, 2.0], device=device)
    with mmfast.use_backend(backend):
        for fn in (lambda x_: mmfast.fdistill_loss(x_, a, b, r, reduction="none"),
                   lambda x_: mmfast.uni_instruct_loss(x_, a, b, r, "jeffreys", fgm=True, reduction="none")):
            xl = x.clone().requires_grad_(True)
            loss = fn(xl)
            (gx,) = torch.autograd.grad(loss, xl, torch.ones_like(loss))
            assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
            assert torch.isnan(gx[1]).all() and torch.isfinite(gx[[0, 2]]).all()
    assert torch.isnan(mmfast.uni_instruct_loss(x, a, b, r)).item()


@pytest.mark.parametrize("backend,device,dtype", backend_params())
@pytest.mark.parametrize("div", DIVS)
def test_zero_distance_sample_is_finite(backend, device, dtype, div):
    x, a, b = (t.to(device, dtype) for t in _xab(2, (6,), seed=5))
    x[0] = a[0]  # mean |x - a| = 0 for sample 0: the 1e-6 / 1e-5 clamps keep it finite
    r = mmfast.density_ratio(torch.tensor([0.3, -2.0], device=device))
    leaves = [t.clone().requires_grad_(True) for t in (x, a, b)]
    with mmfast.use_backend(backend):
        loss = (mmfast.uni_instruct_loss(*leaves, r, div, fgm=True) + mmfast.fdistill_loss(*leaves, r)
                + mmfast.uni_instruct_loss(*leaves, r, div, di_norm="batch", alpha=0.5))
        grads = torch.autograd.grad(loss, leaves)
    assert torch.isfinite(loss) and all(torch.isfinite(g_).all() for g_ in grads)


def test_gradients_only_where_documented():
    x, a, b = _xab(2, (4,), seed=6)
    h = torch.tensor([1.0, 2.0], dtype=F64)
    leaves = [t.clone().requires_grad_(True) for t in (x, a, b)]
    with mmfast.use_backend("torch"):
        mmfast.fdistill_loss(*leaves, h).backward()
        assert leaves[0].grad is not None and leaves[1].grad is None and leaves[2].grad is None
        leaves[0].grad = None
        mmfast.fake_score_loss(leaves[2], leaves[0], h).backward()
        assert leaves[0].grad is None and leaves[2].grad is not None
        with torch.no_grad():
            out = mmfast.uni_instruct_loss(*leaves, h)
        assert not out.requires_grad


# ----------------------------------------------------------------------------------------------
# modules


def test_density_ratio_normalizer_ema_math():
    norm = mmfast.nn.DensityRatioNormalizer(num_bins=4, momentum=0.25, t_min=0.0, t_max=1.0)
    r1 = torch.tensor([1.0, 3.0, 2.0, 8.0])
    t1 = torch.tensor([0.1, 0.2, 0.6, -5.0])  # bins 0, 0, 2, and 0 (clamped)
    out1 = norm(r1, t1)
    mean0 = (1.0 + 3.0 + 8.0) / 3
    torch.testing.assert_close(norm.bin_mean, torch.tensor([mean0, 1.0, 2.0, 1.0]))
    assert norm.bin_seen.tolist() == [True, False, True, False]
    torch.testing.assert_close(out1, r1 / (torch.tensor([mean0, mean0, 2.0, mean0]) + 1e-6))
    r2 = torch.tensor([4.0, 6.0])
    t2 = torch.tensor([0.05, 0.99])  # bins 0 and 3
    out2 = norm(r2, t2)
    new0 = 0.75 * mean0 + 0.25 * 4.0
    torch.testing.assert_close(norm.bin_mean, torch.tensor([new0, 1.0, 2.0, 6.0]))
    torch.testing.assert_close(out2, r2 / (torch.tensor([new0, 6.0]) + 1e-6))
    norm.eval()  # eval: no update
    out3 = norm(torch.tensor([5.0]), torch.tensor([0.4]))
    torch.testing.assert_close(out3, torch.tensor([5.0 / (1.0 + 1e-6)]))
    torch.testing.assert_close(norm.bin_mean, torch.tensor([new0, 1.0, 2.0, 6.0]))


def test_density_ratio_normalizer_nan_t_and_state_dict():
    norm = mmfast.nn.DensityRatioNormalizer(num_bins=3, momentum=0.5, t_min=-1.0, t_max=2.0)
    out = norm(torch.tensor([2.0, 4.0, 9.0]), torch.tensor([-0.5, float("nan"), 1.5]))
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()
    torch.testing.assert_close(norm.bin_mean, torch.tensor([2.0, 1.0, 9.0]))  # the NaN-t sample is left out
    state = norm.state_dict()
    assert set(state) == {"bin_mean", "bin_seen"}
    other = mmfast.nn.DensityRatioNormalizer(num_bins=3, momentum=0.5, t_min=-1.0, t_max=2.0)
    other.load_state_dict(state)
    assert torch.equal(other.bin_mean, norm.bin_mean) and torch.equal(other.bin_seen, norm.bin_seen)
    r, t = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.9])
    torch.testing.assert_close(other(r, t), norm(r, t))  # training: same update from the same state
    torch.testing.assert_close(other.bin_mean, norm.bin_mean)


@pytest.mark.parametrize("div", ["js", "pearson_chi2"])
def test_h_normalisation(div):
    x, a, b = _xab(4, (3,), seed=7)
    r = torch.tensor([0.2, 1.0, 3.0, 15.0], dtype=F64)
    h = mmfast.fdiv_weight(r, div)
    with mmfast.use_backend("torch"):
        torch.testing.assert_close(mmfast.nn.FDistillLoss(div)(x, a, b, r), mmfast.fdistill_loss(x, a, b, h / h.mean()))
        torch.testing.assert_close(mmfast.nn.FDistillLoss(div, normalize=False)(x, a, b, r),
                                   mmfast.fdistill_loss(x, a, b, h))
        # every coefficient is divided by mean(h), and the loss is linear in the coefficients
        for kw in (dict(fgm=True), dict(di_norm="batch", alpha=0.5)):
            torch.testing.assert_close(mmfast.nn.UniInstructLoss(div, **kw)(x, a, b, r),
                                       mmfast.uni_instruct_loss(x, a, b, r, div, **kw) / h.mean())
            torch.testing.assert_close(mmfast.nn.UniInstructLoss(div, normalize=False, **kw)(x, a, b, r),
                                       mmfast.uni_instruct_loss(x, a, b, r, div, **kw))
        # a batch of one: normalised h is exactly 1
        r1 = r[3:]
        torch.testing.assert_close(mmfast.nn.FDistillLoss(div)(x[:1], a[:1], b[:1], r1),
                                   mmfast.fdistill_loss(x[:1], a[:1], b[:1], torch.ones(1, dtype=F64)))
        torch.testing.assert_close(mmfast.nn.UniInstructLoss(div)(x[:1], a[:1], b[:1], r1),
                                   mmfast.uni_instruct_loss(x[:1], a[:1], b[:1], r1, div) / h[3])


def test_process_group_paths_single_rank(tmp_path):
    """The all-reduce code paths on a one-rank gloo group give the local results."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a default process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        pg = dist.new_group([0])
        x, a, b = _xab(3, (4,), seed=8)
        r = torch.tensor([0.5, 2.0, 7.0], dtype=F64)
        t = torch.tensor([0.1, 0.5, 0.9], dtype=F64)
        with mmfast.use_backend("torch"):
            torch.testing.assert_close(mmfast.nn.FDistillLoss("kl", process_group=pg)(x, a, b, r),
                                       mmfast.nn.FDistillLoss("kl")(x, a, b, r))
            torch.testing.assert_close(mmfast.nn.UniInstructLoss("js", process_group=pg)(x, a, b, r),
                                       mmfast.nn.UniInstructLoss("js")(x, a, b, r))
        with_pg = mmfast.nn.DensityRatioNormalizer(num_bins=2, process_group=pg).double()
        local = mmfast.nn.DensityRatioNormalizer(num_bins=2).double()
        torch.testing.assert_close(with_pg(r, t), local(r, t))
        torch.testing.assert_close(with_pg.bin_mean, local.bin_mean)
        with pytest.raises(TypeError, match="process_group must be a torch.distributed.ProcessGroup"):
            mmfast.nn.FDistillLoss(process_group="world")
    finally:
        dist.destroy_process_group()


def test_discriminator_loss():
    real = torch.tensor([[0.5, -1.0], [2.0, 0.0]], requires_grad=True)
    fake = torch.tensor([0.3, -0.7, 1.2])
    loss = mmfast.discriminator_loss(real, fake)
    want = F.softplus(-real).mean() + F.softplus(fake).mean()
    torch.testing.assert_close(loss, want)
    bce = (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
           + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))
    torch.testing.assert_close(loss, bce)
    loss.backward()
    assert real.grad is not None and real.grad.shape == real.shape
