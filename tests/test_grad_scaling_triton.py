"""The Triton in-place gradient scaling that skips blocks whose factors are all 1
(mmfast/triton/grad_scaling.py), against torch's multiplication, and its layout parser.

Without a GPU the kernel runs under ``TRITON_INTERPRET=1`` on CPU tensors (float32); on a GPU in float32,
bfloat16 and float16, and through the ops' eager in-place backward.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

import mmfast  # noqa: E402
import mmfast.triton.grad_scaling as tgs  # noqa: E402

if not HAS_CUDA and type(tgs._scale_unless_one_kernel).__name__ != "InterpretedFunction":
    pytest.skip(
        "no GPU, and mmfast.triton was imported before TRITON_INTERPRET=1 was set "
        "(set it in tests/conftest.py on CPU-only machines)",
        allow_module_level=True,
    )

pytestmark = pytest.mark.interpreter if not HAS_CUDA else pytest.mark.gpu
DEV = torch.device("cuda" if HAS_CUDA else "cpu")
DTYPES = (torch.float32, torch.bfloat16, torch.float16) if HAS_CUDA else (torch.float32,)


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
    assert tgs.row_layout(grad_shape, factor_shape) == layout


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "grad_shape,factor_shape",
    [((5, 300), (5, 1)), ((3, 70, 4), (3, 1, 4)), ((2, 3, 70, 4), (1, 3, 1, 4)), ((3, 6, 80), (1, 6, 1)),
     ((1, 4500), (1, 1)), ((2, 5000), (2, 1))],
)
@pytest.mark.parametrize("kind", ["ones", "random", "mixed", "nan"])
def test_scale_unless_one_matches_mul(dtype, grad_shape, factor_shape, kind):
    """Same values as ``grad.mul_(factor)`` in fp32, for factors all 1, none 1, some 1 (whole rows and, with
    Q > 1, within a block), and NaN (never skipped)."""
    g = torch.Generator().manual_seed(len(grad_shape) * 31 + grad_shape[-1])
    grad = torch.randn(grad_shape, generator=g).to(DEV, dtype)
    factor = torch.rand(factor_shape, generator=g) + 0.5
    if kind == "ones":
        factor = torch.ones(factor_shape)
    elif kind == "mixed":
        factor.view(-1)[::2] = 1.0
    elif kind == "nan":
        factor = torch.ones(factor_shape)
        factor.view(-1)[-1] = float("nan")
    factor = factor.to(DEV)
    expected = (grad.float() * factor).to(dtype)
    out = tgs.scale_unless_one_(grad, factor)
    assert out is grad
    torch.testing.assert_close(grad, expected, rtol=0, atol=0, equal_nan=True)
    if kind == "nan":
        assert grad.isnan().any()


def test_unsupported_layouts_are_left_to_torch():
    grad = torch.randn(4, 5, 6, device=DEV)
    assert tgs.scale_unless_one_(grad, torch.rand(4, 5, 6, device=DEV)) is None  # per element: D = 1
    assert tgs.scale_unless_one_(grad.transpose(0, 1), torch.rand(5, 1, 6, device=DEV)) is None  # not contiguous
    assert tgs.scale_unless_one_(grad.double(), torch.rand(4, 1, 1, device=DEV)) is None  # float64


@pytest.mark.skipif(not HAS_CUDA, reason="the ops use this kernel on CUDA tensors only (CPU: the host check)")
def test_ops_in_place_backward_on_gpu():
    """fdistill's eager in-place backward with the triton backend: gradients as with retain_graph."""
    g = torch.Generator().manual_seed(0)
    x, a, b = (torch.randn(6, 3000, generator=g).to(DEV).requires_grad_() for _ in range(3))
    h = torch.rand(6, generator=g).to(DEV)
    with mmfast.use_backend("triton"):
        for factor in (1.0, 3.0):
            loss = mmfast.fdistill_loss(x, a.detach(), b.detach(), h)
            (loss * factor).backward(retain_graph=True)
            kept, x.grad = x.grad.clone(), None
            (loss * factor).backward()
            torch.testing.assert_close(x.grad, kept, rtol=0, atol=0)
            x.grad = None
