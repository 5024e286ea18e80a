"""torch.compile(fullgraph=True) of a training step that uses every public op == eager, on every backend
that runs here; value checks are skipped under compile; no op synchronises with the host outside the
eager-mode value checks (SPEC section 5).

``fullgraph=True`` turns any graph break (a ``.item()``, a data-dependent Python branch, an untraceable
call) into an error, so the compile test is also the no-graph-break test. The host-sync test runs the same
step eagerly with every host read of a tensor (``item``, ``tolist``, ``bool``, ``float``, ``int``,
``__index__``, ``numpy``) from mmfast's own code turned into an error; that also covers the ops'
implementations, which the compiler does not trace (they are opaque custom ops).
"""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch
from _utils import backend_params

import mmfast

N, C, E = 8, 6, 3
B, SAMPLE = 4, (2, 3, 3)  # the f-divergence losses' samples [B, 2, 3, 3]
# float64 where the backend has it; Triton (interpreter here) runs float32
COMPILE_BACKENDS = backend_params(dtypes={"torch": (torch.float64,), "cpu": (torch.float64,)})
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=1e-6)}


def make_step_inputs(device, dtype) -> dict:
    g = torch.Generator().manual_seed(0)

    def randn(*shape, scale=2.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device, dtype)

    mask = torch.rand(N, generator=g) < 0.7
    mask[0] = True
    return dict(
        x=randn(N, C),
        z=randn(E, N, C),
        w=(torch.rand(N, E, generator=g, dtype=torch.float64) + 0.05).to(device, dtype),
        xd=randn(2, C, 3, 2, scale=1.0),
        zd=randn(E, 2, C, 3, 2, scale=1.0),
        mask=mask.to(device),
        labels=torch.randint(0, C, (N,), generator=g).to(device),
        row_grad=randn(N, scale=1.0),
        gen_x=randn(B, *SAMPLE, scale=1.0),
        teacher_x0=randn(B, *SAMPLE, scale=1.0),
        fake_x0=randn(B, *SAMPLE, scale=1.0),
        disc_real=randn(B, 2, scale=1.0),
        disc_fake=randn(B, 2, scale=1.0),
        t=(torch.rand(B, generator=g, dtype=torch.float64)).to(device, dtype),
        sigma=(torch.rand(B, generator=g, dtype=torch.float64) * 5 + 0.01).to(device, dtype),
        feat=randn(N, 4, scale=1.0),
        feat_teacher=randn(N, 4, scale=1.0),
        recon_mask=(torch.rand(N, 1, generator=g, dtype=torch.float64)).to(device, dtype),
    )


DIFFERENTIABLE = ("x", "z", "w", "xd", "zd", "gen_x", "teacher_x0", "fake_x0", "disc_real", "disc_fake", "feat",
                  "recon_mask")


def make_modules(device, dtype):
    torch.manual_seed(0)
    soft = mmfast.nn.TeacherRouter(C, E, top_k=2, weighting="soft").to(device, dtype)
    hard = mmfast.nn.TeacherRouter(C, E, top_k=1, weighting="hard", load_balance="cv").to(device, dtype)
    seg = mmfast.nn.RoutedKDLoss(class_dim=1, mix="probs", divergence="tvd", reduction="sum")
    fdistill = mmfast.nn.FDistillLoss("js", normalize=True)
    uni_instruct = mmfast.nn.UniInstructLoss("jeffreys", alpha=0.5, fgm=True, di_norm="batch", normalize=True)
    normalizer = mmfast.nn.DensityRatioNormalizer(num_bins=3).to(device)
    umt = mmfast.nn.UniModalTeacherLoss(weight=2.0)
    channel_mask = mmfast.nn.ChannelMask(C, heads=2, hidden=4).to(device, dtype)
    return soft, hard, seg, fdistill, uni_instruct, normalizer, umt, channel_mask


def training_step(
    soft, hard, seg, fdistill, uni_instruct, normalizer, umt, channel_mask,
    x, z, w, xd, zd, mask, labels, row_grad,
    gen_x, teacher_x0, fake_x0, disc_real, disc_fake, t, sigma, feat, feat_teacher, recon_mask,
):
    """Every public function and module; returns (loss, ECE): one scalar to differentiate and a metric."""
    r = soft(x)
    h = hard(x)
    sparse = mmfast.routed_kd_loss(x, z, r.weights, indices=r.indices, temperature=4.0)
    top1 = mmfast.routed_kd_loss(x, z, h.weights, indices=h.indices, mix="logits", divergence="reverse_kl")
    dense = mmfast.routed_kd_loss(x, z, w, temperature=2.0, mix="logits", divergence="js", beta=0.3, mask=mask)
    rows = mmfast.routed_kd_loss(x, list(z), mix="probs", divergence="kl", reduction="none", t2_scale=False)
    dense_seg = seg(xd, list(zd))
    mutual = mmfast.mutual_kd_loss([x, z[0], z[2]], temperature=2.0)
    mutual_rows = mmfast.mutual_kd_loss(torch.stack([x, z[1]]), reduction="none")
    w_global = mmfast.teacher_weights(z, labels, temperature=2.0, per_sample=False)
    w_row = mmfast.teacher_weights(list(z), labels, temperature=0.5)
    weighted = mmfast.routed_kd_loss(x, z, w_global * w_row, temperature=1.5, reduction="sum")
    balance = mmfast.load_balance_loss(r.probs, "kl") + mmfast.load_balance_loss(h.probs, "cv")
    kd = (
        sparse + top1 + dense + (rows * row_grad).sum() + 0.1 * dense_seg + mutual
        + (mutual_rows * row_grad).sum() + weighted + r.load_balance_loss + h.load_balance_loss + balance
    )
    # f-divergence score distillation: ratio -> per-noise-level normalisation -> the generator losses
    ratio = mmfast.density_ratio(disc_fake, logit_clamp=5.0)
    ratio_t = normalizer(ratio, t)
    h_js = mmfast.fdiv_weight(ratio, "js")
    coefficients = sum(c.sum() for c in mmfast.fdiv_coefficients(ratio, "squared_hellinger"))
    fdiv = (
        fdistill(gen_x, teacher_x0, fake_x0, ratio_t)
        + uni_instruct(gen_x, teacher_x0, fake_x0, ratio)
        + mmfast.fdistill_loss(gen_x, teacher_x0, fake_x0, h_js, reduction="sum")
        + (mmfast.uni_instruct_loss(gen_x, teacher_x0, fake_x0, ratio_t, "kl", reduction="none") * sigma).sum()
        + mmfast.fake_score_loss(fake_x0, gen_x, sigma, sigma_data=0.5)
        + mmfast.discriminator_loss(disc_real, disc_fake)
        + 0.01 * coefficients
    )
    # reconstruction, UMT, the channel mask, the uni-modal ensemble; ECE as a metric
    masked_xd = channel_mask(xd)
    recon = (
        mmfast.masked_reconstruction_loss(x, z[0], recon_mask, loss="smooth_l1", beta=0.5)
        + mmfast.masked_reconstruction_loss(masked_xd, zd[1], loss="cosine", channel_dim=1, reduction="sum")
        + mmfast.masked_reconstruction_loss(x, z[2], mask[:, None], normalize_target=True)
        + umt(x, labels, [x + 1, feat], [z[1], feat_teacher])
        + mmfast.unimodal_teacher_loss(x, labels, [feat], [feat_teacher], weight=0.5)
    )
    ensemble = mmfast.unimodal_ensemble([x, z[0], z[2]], weights=w[0], combine="probs")
    ece = mmfast.expected_calibration_error(ensemble.detach(), labels, n_bins=5)
    return kd + fdiv + recon + 0.1 * (ensemble * row_grad[:, None]).sum(), ece


def run_step(step, modules, inputs):
    """The loss, the ECE metric, the gradients to the floating inputs and to every module parameter, and
    the modules' buffers after the step (the ratio normaliser's running means, updated by the step)."""
    leaves = {k: (v.clone().requires_grad_(True) if k in DIFFERENTIABLE else v) for k, v in inputs.items()}
    loss, ece = step(*modules, **leaves)
    params = [p for m in modules for p in m.parameters()]
    grads = torch.autograd.grad(loss, [*(leaves[k] for k in DIFFERENTIABLE), *params])
    buffers = [b.detach().clone() for m in modules for b in m.buffers()]
    return loss.detach(), ece, grads, buffers


# Inductor (the default) compiles the float64 graph, shared by the torch and cpu backends (the ops are
# opaque: the backend is chosen when they run); the float32 graph of the interpreted Triton backend goes
# through AOTAutograd only (aot_eager: the same tracing, without Inductor's C++ build of a second graph).
# Before torch 2.13, Inductor's CPU float64 backward of scaled_dot_product_attention (ChannelMask's attention)
# hands float32 buffers to the flash-attention kernel and fails (pytorch/pytorch#185539, fixed upstream), so
# there the float64 graph takes aot_eager too.
_FLOAT64_COMPILER = "inductor" if torch.__version__ >= "2.13" else "aot_eager"
compiled_training_step = {
    torch.float64: torch.compile(training_step, fullgraph=True, backend=_FLOAT64_COMPILER),
    torch.float32: torch.compile(training_step, fullgraph=True, backend="aot_eager"),
}


@pytest.mark.parametrize("backend,device,dtype", COMPILE_BACKENDS)
def test_compiled_training_step_matches_eager(backend, device, dtype):
    inputs = make_step_inputs(device, dtype)
    modules = make_modules(device, dtype)  # fresh, identical modules per run: the step updates buffers
    with mmfast.use_backend(backend):
        loss_eager, ece_eager, grads_eager, buffers_eager = run_step(training_step, modules, inputs)
        modules = make_modules(device, dtype)
        loss_compiled, ece_compiled, grads_compiled, buffers_compiled = run_step(
            compiled_training_step[dtype], modules, inputs
        )
    torch.testing.assert_close(loss_compiled, loss_eager, **TOL[dtype])
    torch.testing.assert_close(ece_compiled, ece_eager, **TOL[dtype])
    assert 0 < float(ece_eager) < 1
    n_params = sum(1 for m in modules for _ in m.parameters())
    assert len(grads_eager) == len(DIFFERENTIABLE) + n_params
    for i, (ge, gc) in enumerate(zip(grads_eager, grads_compiled, strict=True)):
        torch.testing.assert_close(gc, ge, **TOL[dtype], msg=lambda m, i=i: f"gradient {i}: {m}")
        assert ge.abs().sum() > 0, f"gradient {i} is zero: an op lost its gradient"
    assert len(buffers_eager) == 2  # DensityRatioNormalizer: bin_mean, bin_seen
    for be, bc in zip(buffers_eager, buffers_compiled, strict=True):
        torch.testing.assert_close(bc, be, **TOL[dtype])
    assert buffers_eager[1].any(), "the normaliser's running means were not updated"


def _scheduled(x, z, labels, tau):
    w = mmfast.teacher_weights(z, labels, temperature=tau)
    module = mmfast.nn.RoutedKDLoss(temperature=tau, mix="probs")
    return (
        mmfast.routed_kd_loss(x, z, w, temperature=tau) + module(x, z)
        + mmfast.mutual_kd_loss(torch.stack([x, z[0]]), temperature=tau)
    )


def test_temperature_schedule_under_compile():
    """A temperature that changes between calls becomes a symbolic float after the first recompile:
    the argument checks must still trace in one graph (math.isfinite on it would break the graph)."""
    inputs = make_step_inputs("cpu", torch.float64)
    x, z, labels = inputs["x"], inputs["z"], inputs["labels"]
    compiled = torch.compile(_scheduled, fullgraph=True, backend="aot_eager")
    for tau in (1.0, 2.0, 3.5):
        xc, xe = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        loss_c, loss_e = compiled(xc, z, labels, tau), _scheduled(xe, z, labels, tau)
        loss_c.backward()
        loss_e.backward()
        torch.testing.assert_close(loss_c, loss_e, **TOL[torch.float64])
        torch.testing.assert_close(xc.grad, xe.grad, **TOL[torch.float64])


def _float_schedules(x, z, labels, gen_x, teacher_x0, fake_x0, disc_fake, sigma, feat, feat_teacher, alpha, value):
    """Every float hyper-parameter of the newer ops, driven by a schedule (``alpha`` >= 0, ``value`` > 0)."""
    ratio = mmfast.density_ratio(disc_fake, logit_clamp=value, ratio_max=4.0 * value)
    return (
        mmfast.uni_instruct_loss(gen_x, teacher_x0, fake_x0, ratio, "js", alpha=alpha, fgm=True)
        + mmfast.fake_score_loss(fake_x0, gen_x, sigma, sigma_data=value)
        + mmfast.masked_reconstruction_loss(x, z[0], loss="smooth_l1", beta=value, normalize_target=True,
                                            eps=1e-3 * value)
        + mmfast.unimodal_teacher_loss(x, labels, [feat], [feat_teacher], weight=alpha)
        + mmfast.unimodal_ensemble([x, z[1]], weights=[alpha, value]).sum()
    )


def test_alpha_weight_and_other_float_schedules_under_compile():
    """alpha (uni_instruct_loss), weight (unimodal_teacher_loss), ensemble weights given as numbers,
    logit_clamp / ratio_max, sigma_data, beta and eps changing between calls trace in one graph each time
    (their checks are comparisons, not math.isfinite, which a symbolic float breaks) and match eager."""
    inputs = make_step_inputs("cpu", torch.float64)
    names = ("x", "z", "labels", "gen_x", "teacher_x0", "fake_x0", "disc_fake", "sigma", "feat", "feat_teacher")
    args = [inputs[n] for n in names]
    compiled = torch.compile(_float_schedules, fullgraph=True, backend="aot_eager")
    for alpha, value in ((1.0, 2.0), (0.0, 0.5), (2.5, 3.0), (0.3, 1.25)):
        xc, xe = args[0].clone().requires_grad_(True), args[0].clone().requires_grad_(True)
        loss_c = compiled(xc, *args[1:], alpha, value)
        loss_e = _float_schedules(xe, *args[1:], alpha, value)
        loss_c.backward()
        loss_e.backward()
        torch.testing.assert_close(loss_c, loss_e, **TOL[torch.float64])
        torch.testing.assert_close(xc.grad, xe.grad, **TOL[torch.float64])


# --------------------------------------------------------------------------------------------
# value checks: skipped under compile


def _unchecked_inputs():
    """Inputs that only the value checks reject: a negative weight, an index out of range."""
    inputs = make_step_inputs("cpu", torch.float64)
    w = inputs["w"].clone()
    w[1, 0] = -0.5
    idx = torch.tensor([[0, 2]] * N)
    idx[3, 1] = E  # out of range
    return inputs["x"], inputs["z"], w, idx


def _value_checked(x, z, w, idx):
    return (
        mmfast.routed_kd_loss(x, z, w, reduction="none"),
        mmfast.routed_kd_loss(x, z, w[:, :2].abs(), indices=idx, reduction="none"),
    )


def test_value_checks_run_in_eager_and_are_skipped_under_compile():
    x, z, w, idx = _unchecked_inputs()
    with pytest.raises(ValueError, match="weights must be >= 0"):
        _value_checked(x, z, w, idx)
    compiled = torch.compile(_value_checked, fullgraph=True, backend="aot_eager")
    negative, out_of_range = compiled(x, z, w, idx)  # no exception: the checks read data, compile skips them
    mmfast.set_value_checks(False)
    try:
        want_negative, want_out_of_range = _value_checked(x, z, w, idx)
    finally:
        mmfast.set_value_checks(True)
    torch.testing.assert_close(negative, want_negative, **TOL[torch.float64])
    torch.testing.assert_close(out_of_range, want_out_of_range, equal_nan=True, **TOL[torch.float64])
    assert out_of_range[3].isnan() and torch.isfinite(out_of_range[[0, 1, 2, 4, 5, 6, 7]]).all()


# --------------------------------------------------------------------------------------------
# no host synchronisation outside the value checks

HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")
# The one reader let through, for CPU tensors only: the eager backward's check for an incoming gradient
# of all ones (mmfast/ops/_grad_scaling.py; never under compile, and a CPU read synchronises nothing).
CPU_EAGER_READER = "mmfast.ops._grad_scaling"


class HostSyncError(AssertionError):
    pass


@contextlib.contextmanager
def no_host_reads_from_mmfast():
    """Within the block, reading a tensor's data on the host from a module of the ``mmfast`` package
    raises :class:`HostSyncError` (other callers, e.g. the Triton interpreter, are let through)."""
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def guard(name, original):
        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller == CPU_EAGER_READER and self.device.type == "cpu":
                return original(self, *args, **kwargs)
            if caller == "mmfast" or caller.startswith("mmfast."):
                raise HostSyncError(f"Tensor.{name} called from {caller}: a host synchronisation")
            return original(self, *args, **kwargs)

        return wrapper

    for name, original in originals.items():
        setattr(torch.Tensor, name, guard(name, original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@pytest.mark.parametrize("backend,device,dtype", COMPILE_BACKENDS)
def test_no_host_sync_outside_value_checks(backend, device, dtype):
    modules = make_modules(device, dtype)
    inputs = make_step_inputs(device, dtype)
    mmfast.set_value_checks(False)
    try:
        with mmfast.use_backend(backend), no_host_reads_from_mmfast():
            loss, ece, grads, _ = run_step(training_step, modules, inputs)
    finally:
        mmfast.set_value_checks(True)
    assert torch.isfinite(loss) and torch.isfinite(ece) and all(torch.isfinite(g).all() for g in grads)
    # the detector works: with value checks on, their host reads are caught
    with mmfast.use_backend(backend), no_host_reads_from_mmfast(), pytest.raises(HostSyncError, match="bool"):
        run_step(training_step, modules, inputs)
