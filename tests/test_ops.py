"""The ``torch.library`` ops: opcheck per backend, gradient dtypes and shapes (torch.compile of a training
step: tests/test_compile.py; no mutation of inputs: tests/test_bad_input_sweep.py)."""

from __future__ import annotations

import pytest
import torch
from _utils import backend_params, check_in_place_backward, interpreted, make_routed

import mmfast
from mmfast.ops import mutual_kd as mutual_kd_ops
from mmfast.ops import routed_kd as routed_kd_ops
from mmfast.reference.routed_kd import DIVERGENCES, MIXES, compute_dtype

# opcheck: float64 for torch and cpu, float32 for the kernels (cpu, triton, cuda)
OPCHECK = backend_params(dtypes={"torch": (torch.float64,), "cpu": (torch.float32, torch.float64)})


def _routed_args(
    dtype,
    device,
    *,
    B=2,
    C=5,
    S=1,
    E=3,
    K=None,
    masked=False,
    need=(True, True, True),
    mix="loss",
    divergence="kl",
    strided=False,
    seed=0,
):
    """Arguments of ``mmfast::routed_kd_fwd`` in the canonical layout x [B, C, S], z [E, B, C, S]."""
    g = torch.Generator().manual_seed(seed)
    cdt = compute_dtype(dtype)
    if strided:  # x as a [B, S, C] tensor seen as [B, C, S]: class stride 1, row stride C
        x = torch.randn(B, S, C, generator=g, dtype=torch.float64).permute(0, 2, 1)
    else:
        x = torch.randn(B, C, S, generator=g, dtype=torch.float64)
    z = torch.randn(E, B, C, S, generator=g, dtype=torch.float64)
    w = torch.rand(B, K or E, generator=g, dtype=torch.float64) + 0.1
    idx = None if K is None else torch.randint(0, E, (B, K), generator=g).to(device)
    mask = None
    if masked:
        mask = torch.rand(B, S, generator=g) < 0.5
        mask.view(-1)[0] = True
        mask = mask.to(device)
    need_dx, need_dw, need_dz = need
    x = x.to(device, dtype).requires_grad_(need_dx)
    z = z.to(device, dtype).requires_grad_(need_dz)
    w = w.to(device, cdt).requires_grad_(need_dw)
    return (
        x,
        z,
        w,
        idx,
        mask,
        1.5,
        MIXES[mix],
        DIVERGENCES[divergence],
        0.3,
        2.25,
        routed_kd_ops.grad_mask(need_dx, need_dw, need_dz),
    )


ROUTED_COMBOS = {
    "dense": dict(),
    "sparse-mask-spatial": dict(K=2, masked=True, S=3, mix="logits", divergence="js"),
    "mask-no-grads": dict(masked=True, S=2, mix="probs", divergence="tvd", need=(False, False, False)),
    "sparse-dx-only": dict(K=1, divergence="reverse_kl", need=(True, False, False)),
    "strided-dz-dw": dict(S=3, strided=True, mix="probs", divergence="kl", need=(False, True, True)),
}


@pytest.mark.parametrize("combo", list(ROUTED_COMBOS))
@pytest.mark.parametrize("backend,device,dtype", OPCHECK)
def test_opcheck_routed_kd_fwd(backend, device, dtype, combo):
    args = _routed_args(dtype, device, **ROUTED_COMBOS[combo])
    with mmfast.use_backend(backend):
        torch.library.opcheck(routed_kd_ops.routed_kd_fwd, args)


@pytest.mark.parametrize("need_grad", [True, False])
@pytest.mark.parametrize("backend,device,dtype", OPCHECK)
def test_opcheck_mutual_kd_fwd(backend, device, dtype, need_grad):
    logits = torch.randn(3, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    logits = logits.to(device, dtype).requires_grad_(need_grad)
    with mmfast.use_backend(backend):
        torch.library.opcheck(mutual_kd_ops.mutual_kd_fwd, (logits, 2.0, 4.0, need_grad))
        torch.library.opcheck(mutual_kd_ops.mutual_kd_fwd, (logits[:1], 1.0, 1.0, need_grad))  # M = 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("present", ["all", "dx", "dw-dz", "none"])
def test_opcheck_backward_ops(present, dtype):
    """The backward ops are pure PyTorch (no backend dispatch): one check per gradient set."""
    B, C, S, E, K = 2, 5, 3, 3, 2
    cdt = compute_dtype(dtype)
    empty = torch.empty(0, dtype=dtype)
    dx = torch.randn(B, C, S).to(dtype) if present in ("all", "dx") else empty
    dw = torch.randn(B, S, K, dtype=cdt) if present in ("all", "dw-dz") else empty
    dz = torch.randn(E, B, C, S).to(dtype) if present in ("all", "dw-dz") else empty
    torch.library.opcheck(routed_kd_ops.routed_kd_bwd, (torch.randn(B, S, dtype=cdt), dx, dw, dz))
    torch.library.opcheck(
        mutual_kd_ops.mutual_kd_bwd, (torch.randn(4, dtype=cdt), torch.randn(3, 4, 6).to(dtype))
    )


def test_routed_bwd_scales_row_gradients():
    B, C, S, E, K = 2, 4, 3, 3, 2
    g, dx, dw, dz = torch.randn(B, S), torch.randn(B, C, S), torch.randn(B, S, K), torch.randn(E, B, C, S)
    gx, gw, gz = routed_kd_ops.routed_kd_bwd(g, dx, dw, dz)
    torch.testing.assert_close(gx, dx * g[:, None, :])
    torch.testing.assert_close(gw, torch.einsum("bs,bsk->bk", g, dw))
    torch.testing.assert_close(gz, dz * g[None, :, None, :])


# --------------------------------------------------------------------------------------------
# gradients have their input's dtype, shape and device


def _calls(device, dtype):
    """(name, function of the inputs, inputs) for every public entry point, and the integer and
    bool tensors (indices, mask) those functions close over."""
    g = torch.Generator().manual_seed(5)

    def t(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * 2).to(device, dtype)

    idx = torch.tensor([[0, 2], [1, 1], [2, 0], [0, 1]], device=device)
    mask = torch.tensor([True, False, True, True], device=device)
    w = (torch.rand(4, 3, generator=g, dtype=torch.float64) + 0.1).to(device, dtype)
    calls = [
        (
            "routed-dense",
            lambda x, z, w: mmfast.routed_kd_loss(x, z, w, temperature=2.0),
            (t(4, 5), t(3, 4, 5), w),
        ),
        (
            "routed-sparse-mask",
            lambda x, z, w: mmfast.routed_kd_loss(
                x, z, w, indices=idx, mask=mask, mix="logits", divergence="js", reduction="sum"
            ),
            (t(4, 5), t(3, 4, 5), w[:, :2].contiguous()),
        ),
        (
            "routed-class-dim-1",
            lambda x, z0, z1, w: mmfast.routed_kd_loss(
                x, [z0, z1], w, class_dim=1, mix="probs", divergence="tvd", mask=mask[:2, None].expand(2, 3)
            ),
            (t(2, 5, 3), t(2, 5, 3), t(2, 5, 3), w[:2, :2].contiguous()),
        ),
        (
            "routed-reverse-kl-none",
            lambda x, z: mmfast.routed_kd_loss(x, z, divergence="reverse_kl", reduction="none"),
            (t(4, 5), t(2, 4, 5)),
        ),
        (
            "mutual",
            lambda a, b, c: mmfast.mutual_kd_loss([a, b, c], temperature=3.0),
            (t(4, 5), t(4, 5), t(4, 5)),
        ),
        ("mutual-stacked", lambda m: mmfast.mutual_kd_loss(m, reduction="none"), (t(2, 4, 5),)),
    ]
    return calls, [idx, mask]


GRAD_DTYPES = backend_params(
    dtypes={
        "torch": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
        "cpu": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
        "triton": (torch.float32,)
        if interpreted("triton")
        else (torch.float32, torch.bfloat16, torch.float16),
        "cuda": (torch.float32, torch.bfloat16, torch.float16),
    }
)


@pytest.mark.parametrize("backend,device,dtype", GRAD_DTYPES)
def test_gradient_dtype_and_shape(backend, device, dtype):
    calls, _ = _calls(device, dtype)
    with mmfast.use_backend(backend):
        for name, fn, inputs in calls:
            leaves = [x.clone().requires_grad_(True) for x in inputs]
            loss = fn(*leaves)
            assert loss.dtype == dtype and loss.device.type == device, name
            loss.sum().backward()
            for i, x in enumerate(leaves):
                assert x.grad.dtype == x.dtype and x.grad.shape == x.shape and x.grad.device == x.device, (
                    name,
                    i,
                )
                assert torch.isfinite(x.grad).all(), (name, i)
    # weights in float32 with low-precision logits: the weights' gradient stays float32
    inputs = make_routed(rows=4, C=5, E=2, dtype=torch.float32, device=device)
    x = inputs["student_logits"].to(dtype).requires_grad_(True)
    z = inputs["teacher_logits"].to(dtype).requires_grad_(True)
    w = inputs["weights"].requires_grad_(True)
    with mmfast.use_backend(backend):
        mmfast.routed_kd_loss(x, z, w).backward()
    assert (x.grad.dtype, z.grad.dtype, w.grad.dtype) == (dtype, dtype, torch.float32)


def test_forward_ops_grads_bit_mask():
    """The ``grads`` argument packs the gradient requests (and consume_grads) into bits; others are refused."""
    from mmfast.ops import masked_reconstruction as recon_ops
    from mmfast.ops import uni_instruct as uni_ops

    assert routed_kd_ops.grad_mask(True, False, True) == routed_kd_ops.GRAD_DX | routed_kd_ops.GRAD_DZ == 5
    assert routed_kd_ops.grad_mask(False, True, False, consume_grads=True) == 2 | 8
    assert recon_ops.grad_mask(False, True, False, consume_grads=True) == 2 | 8
    assert uni_ops.grad_mask(True, True, True) == 7
    x, z, w, idx, mask, *rest = _routed_args(torch.float64, "cpu", need=(False, False, False))
    for bad in (-1, 16):
        with pytest.raises(ValueError, match="grads must be a bit mask"):
            routed_kd_ops.routed_kd_fwd(x, z, w, idx, mask, *rest[:-1], bad)
    p = torch.randn(2, 3, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="grads must be a bit mask"):
        recon_ops.masked_reconstruction_fwd(p, p, None, None, 0, 1.0, False, 1e-6, False, 16)
    xs, coef = torch.randn(2, 3, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="grads must be a bit mask"):
        uni_ops.uni_instruct_fwd(xs, xs, xs, coef, None, 1.0, 1.0, False, False, 16)
    # the requested gradients (and only they) come back
    loss, dx, dw, dz = routed_kd_ops.routed_kd_fwd(x, z, w, idx, mask, *rest[:-1], routed_kd_ops.grad_mask(1, 0, 1))
    assert dx.shape == x.shape and dw.numel() == 0 and dz.shape == z.shape


def _in_place_losses(inputs, mask):
    x, z, w = inputs["student_logits"], inputs["teacher_logits"], inputs["weights"]
    return {
        "routed_kd": lambda: mmfast.routed_kd_loss(x, z, w, temperature=2.0, mask=mask),
        "mutual_kd": lambda: mmfast.mutual_kd_loss(torch.stack([x, z[0]]), temperature=2.0),
    }


@pytest.mark.parametrize("factor", [1.0, 3.0])  # 1: the CPU path that returns the saved buffer as is
# masked=False: batchmean's 1/N rides in the forward's scale (the backward gets all ones)
@pytest.mark.parametrize("name,masked", [("routed_kd", False), ("routed_kd", True), ("mutual_kd", False)])
@pytest.mark.parametrize("backend,device,dtype", backend_params(("torch", "cpu")))
def test_in_place_backward_scaling_equals_out_of_place(backend, device, dtype, name, masked, factor, monkeypatch):
    """A graph-freeing eager backward scales the saved gradients in place; with retain_graph the
    out-of-place backward runs and leaves them untouched: all give the same gradients."""
    inputs = make_routed(rows=6, C=37, E=2, dtype=dtype, device=device)
    leaves = [inputs["student_logits"], inputs["teacher_logits"], inputs["weights"]]
    for t in leaves:
        t.requires_grad_(True)
    mask = torch.tensor([True, False, True, True, False, True], device=device) if masked else None
    module, attr = (routed_kd_ops, "_routed_kd_bwd_in_place") if name == "routed_kd" else (mutual_kd_ops, "scale_")
    with mmfast.use_backend(backend):
        check_in_place_backward(_in_place_losses(inputs, mask)[name], leaves, factor, module, attr, monkeypatch)
