"""The GPU backends' in-place gradient scaling that skips blocks whose factors are all 1
(mmfast/triton/grad_scaling.py, csrc/cuda/grad_scaling.cu) against torch's multiplication, and the layout
they take (mmfast/ops/_grad_scaling.py).

Without a GPU the Triton kernel runs under ``TRITON_INTERPRET=1`` on CPU tensors (float32) and the CUDA one is
skipped as unavailable; on a GPU both run in float32, bfloat16 and float16, also through an op's backward.
"""

from __future__ import annotations

import pytest
import torch
from _utils import RecordingDispatchMode, backend_params

import mmfast
from mmfast.ops import _grad_scaling

GPU = torch.cuda.is_available()
LOW = (torch.float32, torch.bfloat16, torch.float16)
KERNELS = backend_params(("triton", "cuda"), dtypes={"triton": LOW if GPU else (torch.float32,), "cuda": LOW})


@pytest.mark.parametrize(
    "grad_shape,factor_shape,layout",
    [
        ((5, 300), (5, 1), (1, 5, 300, 1)),  # score ops: [B, D] by [B]
        ((3, 70, 4), (3, 1, 4), (1, 3, 70, 4)),  # [A, D, S] by [A, 1, S]
        ((2, 3, 70, 4), (1, 3, 1, 4), (2, 3, 70, 4)),  # routed dz: [E, B, C, S] by [1, B, 1, S]
        ((3, 6, 80), (1, 6, 1), (3, 6, 80, 1)),  # mutual KD: [M, N, C] by [1, N, 1]
        ((1, 300), (1, 1), (1, 1, 300, 1)),  # one factor: one long row
        ((4, 5, 6), (4, 5, 6), (1, 120, 1, 1)),  # per element
        ((4, 5, 6), (1, 5, 1), (4, 5, 6, 1)),
        ((4, 5, 6), (4, 1, 6), (1, 4, 5, 6)),
        ((4, 5, 6, 7), (4, 1, 6, 1), None),  # two broadcast runs between factor dims
        ((4, 5), (5,), None),  # ranks differ
    ],
)
def test_row_layout(grad_shape, factor_shape, layout):
    assert _grad_scaling.row_layout(grad_shape, factor_shape) == layout


def test_layouts_left_to_torch():
    grad = torch.randn(4, 100, 6)
    assert _grad_scaling.kernel_layout(grad, torch.rand(4, 1, 6)) == (1, 4, 100, 6)
    assert _grad_scaling.kernel_layout(grad, torch.rand(4, 100, 6)) is None  # per element: runs of 1
    assert _grad_scaling.kernel_layout(grad.transpose(0, 1), torch.rand(100, 1, 6)) is None  # not contiguous
    assert _grad_scaling.kernel_layout(grad.double(), torch.rand(4, 1, 6)) is None  # float64
    assert _grad_scaling.kernel_layout(torch.randn(4, 10, 6), torch.rand(4, 1, 6)) is None  # D < 64


@pytest.mark.parametrize("backend,device,dtype", KERNELS)
@pytest.mark.parametrize(
    "grad_shape,factor_shape",
    [((5, 300), (5, 1)), ((3, 70, 4), (3, 1, 4)), ((2, 3, 70, 4), (1, 3, 1, 4)), ((3, 6, 80), (1, 6, 1)),
     ((1, 4500), (1, 1)), ((2, 5000), (2, 1))],
)
@pytest.mark.parametrize("kind", ["ones", "random", "mixed", "nan"])
def test_scale_unless_one_matches_mul(backend, device, dtype, grad_shape, factor_shape, kind):
    """Same values as ``grad.mul_(factor)`` in fp32, for factors all 1, none 1, some 1 (whole rows and, with
    Q > 1, within a block), and NaN (never skipped)."""
    g = torch.Generator().manual_seed(len(grad_shape) * 31 + grad_shape[-1])
    grad = torch.randn(grad_shape, generator=g).to(device, dtype)
    factor = torch.rand(factor_shape, generator=g) + 0.5
    if kind == "ones":
        factor = torch.ones(factor_shape)
    elif kind == "mixed":
        factor.view(-1)[::2] = 1.0
    elif kind == "nan":
        factor = torch.ones(factor_shape)
        factor.view(-1)[-1] = float("nan")
    factor = factor.to(device)
    expected = (grad.float() * factor).to(dtype)
    assert _grad_scaling._scale_unless_one_(backend, grad, factor)
    torch.testing.assert_close(grad, expected, rtol=0, atol=0, equal_nan=True)
    if kind == "nan":
        assert grad.isnan().any()


def test_one_value_of_an_expanded_scalar():
    """An expanded scalar (autograd's gradient of a sum or mean) is read as its one value, in place (a view);
    anything with two distinct elements is not."""
    base = torch.tensor([0.25, 4.0])
    expanded = base[1].expand(3, 1, 5)
    one = _grad_scaling._one_value(expanded)
    assert one.shape == (1,) and one.data_ptr() == base[1:].data_ptr() and one.item() == 4.0
    assert _grad_scaling._one_value(torch.ones(1, 1)) is not None  # one element, whatever its strides
    assert _grad_scaling._one_value(base.expand(3, 2)) is None  # two values
    assert _grad_scaling._one_value(torch.ones(3, 1)) is None  # three elements in memory
    assert _grad_scaling._one_value(torch.ones(0)) is None


def test_expanded_scalar_is_passed_as_one_value_over_the_flat_gradient(monkeypatch):
    """The kernel gets the one value ([1], no copy to the factor's size) and the gradient as one long row, whatever
    its row length (short rows too: C = 10 logits); past the grid's limit of blocks per row, rows of one block
    and the rest; a factor of several values keeps the factor's own layout."""
    from mmfast.triton import grad_scaling

    seen = []
    monkeypatch.setattr(grad_scaling, "scale_unless_one_",
                        lambda grad, flat, layout: seen.append((grad.data_ptr(), tuple(flat.shape), layout)) or True)
    grad = torch.zeros(2, 3, 70, 4)
    base = grad.data_ptr()
    assert _grad_scaling._scale_unless_one_("triton", grad, torch.tensor(1.0).expand(1, 3, 1, 4))
    assert _grad_scaling._scale_unless_one_("triton", grad, torch.rand(1, 3, 1, 4))
    small = torch.zeros(50, 10)
    assert _grad_scaling._scale_unless_one_("triton", small, torch.tensor(0.5).expand(50, 1))
    assert not _grad_scaling._scale_unless_one_("triton", small, torch.rand(50, 1))  # D < 64: torch multiplies
    assert seen == [
        (base, (1,), (1, 1, 1680, 1)), (base, (12,), (2, 3, 70, 4)), (small.data_ptr(), (1,), (1, 1, 500, 1)),
    ]
    seen.clear()
    monkeypatch.setattr(_grad_scaling, "_MAX_BLOCKS_PER_ROW", 2)
    long = torch.zeros(3 * 4096 + 100)
    assert _grad_scaling._scale_unless_one_("triton", long, torch.tensor(1.0).expand(1))
    assert seen == [(long.data_ptr(), (1,), (3, 1, 4096, 1)), (long[3 * 4096:].data_ptr(), (1,), (1, 1, 100, 1))]
    seen.clear()
    assert _grad_scaling._scale_unless_one_("triton", long[: 2 * 4096], torch.tensor(1.0).expand(1))
    assert seen == [(long.data_ptr(), (1,), (1, 1, 2 * 4096, 1))]  # within the limit: one launch


@pytest.mark.parametrize("backend,device,dtype", KERNELS)
@pytest.mark.parametrize("value", [1.0, 0.5, float("nan")])
def test_scale_by_one_value_in_pieces(backend, device, dtype, value, monkeypatch):
    """Past the grid's limit of blocks per row (lowered here), the flat gradient is scaled in rows of one block
    and a shorter rest, every element once; rows shorter than 64 elements take the kernel too."""
    monkeypatch.setattr(_grad_scaling, "_MAX_BLOCKS_PER_ROW", 2)
    g = torch.Generator().manual_seed(5)
    for grad_shape, factor_shape in (((3, 4096 + 37), (3, 1)), ((2049, 6), (2049, 1))):
        grad = torch.randn(grad_shape, generator=g).to(device, dtype)
        factor = torch.tensor(value, device=device).expand(factor_shape)
        expected = (grad.float() * factor).to(dtype)
        assert _grad_scaling._scale_unless_one_(backend, grad, factor)
        torch.testing.assert_close(grad, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend,device,dtype", KERNELS)
@pytest.mark.parametrize("grad_shape,factor_shape", [((5, 300), (5, 1)), ((2, 3, 70, 4), (1, 3, 1, 4))])
@pytest.mark.parametrize("value", [1.0, 0.5, float("nan")])
def test_scale_by_an_expanded_scalar(backend, device, dtype, grad_shape, factor_shape, value):
    """A factor that is one value expanded (strides 0) scales like ``grad.mul_(factor)``; 1 leaves it as it is."""
    g = torch.Generator().manual_seed(grad_shape[-1])
    grad = torch.randn(grad_shape, generator=g).to(device, dtype)
    factor = torch.tensor(value, device=device).expand(factor_shape)
    expected = (grad.float() * factor).to(dtype)
    assert _grad_scaling._scale_unless_one_(backend, grad, factor)
    torch.testing.assert_close(grad, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend,device,dtype", KERNELS)
def test_ops_in_place_backward(backend, device, dtype):
    """An op's eager in-place backward gives the gradients of a retained graph (through the kernel on a GPU;
    CPU tensors take the host's all-ones check)."""
    g = torch.Generator().manual_seed(0)
    x, a, b = (torch.randn(6, 300, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    h = torch.rand(6, generator=g).to(device)
    with mmfast.use_backend(backend):
        for factor in (1.0, 3.0):
            loss = mmfast.fdistill_loss(x, a.detach(), b.detach(), h)
            (loss * factor).backward(retain_graph=True)
            kept, x.grad = x.grad.clone(), None
            (loss * factor).backward()
            torch.testing.assert_close(x.grad, kept, rtol=0, atol=0)
            x.grad = None


def test_cpu_all_ones():
    """The CPU check reads an expanded scalar's one value, else compares every element; other devices: False."""
    assert _grad_scaling.cpu_all_ones(torch.tensor(1.0).expand(7, 1))
    assert not _grad_scaling.cpu_all_ones(torch.tensor(0.5).expand(7, 1))
    assert not _grad_scaling.cpu_all_ones(torch.tensor(float("nan")).expand(3))
    assert _grad_scaling.cpu_all_ones(torch.ones(4, 1))
    assert not _grad_scaling.cpu_all_ones(torch.tensor([1.0, 1.0, 2.0]))
    assert not _grad_scaling.cpu_all_ones(torch.ones(3, device="meta"))


@pytest.mark.parametrize("value", [1.0, 0.5, float("nan")])
@pytest.mark.parametrize("all_ones", [None, "known"])
def test_cpu_scale_rows(value, all_ones):
    """On a CPU a large gradient scaled by all ones is returned as it is (the same buffer, no pass); any other factor,
    and a small gradient, are multiplied in place; ``all_ones`` found by the caller gives the same."""
    g = torch.Generator().manual_seed(3)
    for rows, cols in ((5, 4096), (5, 30)):  # above and below the size where the check pays
        grad = torch.randn(rows, cols, generator=g)
        factor = torch.tensor(value).expand(rows)
        expected = grad * factor[:, None]
        known = _grad_scaling.cpu_all_ones(factor) if all_ones == "known" else None
        out = _grad_scaling.scale_rows_(grad, factor, known)
        assert out.data_ptr() == grad.data_ptr()
        torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)


def test_cpu_ones_make_no_pass():
    """A large CPU gradient scaled by an expanded 1 (``loss.backward()`` on a sum) meets no multiplication, and its
    check reads one value (no compare over the factor); a small one is multiplied."""
    for cols, multiplied in ((4096, False), (30, True)):
        grad, factor = torch.randn(5, cols), torch.tensor(1.0).expand(5)
        with RecordingDispatchMode() as mode:
            _grad_scaling.scale_rows_(grad, factor)
        names = [f.overloadpacket.__name__ for f in mode.calls]
        assert ("mul_" in names) == multiplied, names
        assert "eq" not in names, names
