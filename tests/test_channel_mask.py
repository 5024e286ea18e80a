"""``mmfast.nn.ChannelMask`` (MST-Distill's masking module) and ``attach_channel_mask``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmfast.nn import ChannelMask, ChannelMaskHandle, attach_channel_mask
from mmfast.nn.channel_mask import default_hidden


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_at_d596():
    D, H = 596, 3
    h = default_hidden(D, H)
    assert h == 297  # MST-Distill: D // (2H) * H
    attention = 3 * h * h + 3 * h + h * h + h  # q/k/v and output projections, as nn.MultiheadAttention(h, H)
    assert attention == _n_params(nn.MultiheadAttention(h, H))
    head = h + 1
    with torch.device("meta"):  # the reference module is 424 MB of fp32 weights
        ref = ChannelMask(D, H, parameterization="reference")
    fac = ChannelMask(D, H)
    assert _n_params(ref) == D * h * D + h * D + attention + head == 106_030_486
    assert _n_params(fac) == h + D * h + (D * h + h) + attention + head == 708_940
    assert fac.parameterization == "factorized" and ref.embed.weight.shape == (h * D, D)


def _mst_style_mask(module: ChannelMask, f: torch.Tensor) -> torch.Tensor:
    """The paper's mask network written with nn.MultiheadAttention, the reference module's weights loaded."""
    mha = nn.MultiheadAttention(module.hidden, module.heads, batch_first=True).to(f.dtype)
    with torch.no_grad():
        mha.in_proj_weight.copy_(module.qkv.weight)
        mha.in_proj_bias.copy_(module.qkv.bias)
        mha.out_proj.weight.copy_(module.out_proj.weight)
        mha.out_proj.bias.copy_(module.out_proj.bias)
    tokens = module.embed(f).reshape(f.shape[0], module.dim, module.hidden)
    attended, _ = mha(tokens, tokens, tokens)
    return torch.sigmoid(module.fc(attended).squeeze(-1))


def test_reference_parameterization_is_the_papers_network():
    torch.manual_seed(0)
    m = ChannelMask(10, heads=2, hidden=6, parameterization="reference").double()
    f = torch.randn(4, 10, dtype=torch.float64)
    torch.testing.assert_close(m.mask(f), _mst_style_mask(m, f))


@pytest.mark.parametrize("spatial_reduction", ["mean", "learned"])
def test_factorized_is_a_restricted_reference_embedding(spatial_reduction):
    torch.manual_seed(1)
    m = ChannelMask(7, heads=2, hidden=4, spatial_reduction=spatial_reduction).double().eval()
    ref = m.to_reference().eval()
    assert ref.parameterization == "reference"
    for f in (torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 7, 6, 5, dtype=torch.float64)):
        torch.testing.assert_close(m.mask(f), ref.mask(f))
    with pytest.raises(ValueError, match="factorized"):
        ref.to_reference()


@pytest.mark.parametrize("parameterization", ["factorized", "reference"])
@pytest.mark.parametrize("shape", [(5, 9), (1, 9), (3, 9, 4, 6), (2, 9, 7), (2, 9, 1, 1)])
def test_mask_range_shapes_and_broadcast(parameterization, shape):
    torch.manual_seed(2)
    m = ChannelMask(9, heads=3, parameterization=parameterization)
    f = torch.randn(shape) * 3
    masked, mask = m(f, return_mask=True)
    assert mask.shape == (shape[0], 9) and masked.shape == f.shape
    assert ((mask > 0) & (mask < 1)).all()
    expand = mask.reshape(mask.shape + (1,) * (f.dim() - 2))
    torch.testing.assert_close(masked, f * expand)
    torch.testing.assert_close(m(f), masked)
    if f.dim() > 2:  # the mask of a spatial feature is that of its spatial mean
        torch.testing.assert_close(mask, m.mask(f.mean(dim=tuple(range(2, f.dim())))))


def test_one_channel_and_low_precision():
    m = ChannelMask(1, heads=1)
    assert m.hidden == 1
    out = m(torch.randn(4, 1))
    assert out.shape == (4, 1) and torch.isfinite(out).all()
    m = ChannelMask(6, heads=2).to(torch.bfloat16)
    f = torch.randn(3, 6, 2, 2, dtype=torch.bfloat16)
    masked, mask = m(f, return_mask=True)
    assert masked.dtype == torch.bfloat16 and ((mask >= 0) & (mask <= 1)).all()


class _Teacher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.conv(x).mean(dim=(2, 3)))))


def test_gradient_reaches_only_the_mask_when_the_teacher_is_frozen():
    torch.manual_seed(3)
    teacher = _Teacher().requires_grad_(False)
    student = nn.Linear(2 * 5 * 5, 5)
    mask = ChannelMask(8, heads=2)
    x = torch.randn(4, 2, 5, 5)
    with attach_channel_mask(teacher.fc1, mask):
        teacher_logits = teacher(x)
    # MST stage 2: tau^2 KL(sg(student) || masked teacher), only the mask learns
    tau = 4.0
    s = student(x.flatten(1)).detach()
    loss = F.kl_div(F.log_softmax(teacher_logits / tau, 1), F.log_softmax(s / tau, 1), log_target=True,
                    reduction="batchmean") * tau**2
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mask.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in student.parameters())


def test_spatial_hook_on_a_conv_output():
    torch.manual_seed(4)
    teacher = _Teacher()
    mask = ChannelMask(6, heads=3, spatial_reduction="learned")
    x = torch.randn(2, 2, 5, 5)
    feats = {}
    with attach_channel_mask(teacher.conv, mask) as handle:
        # a hook registered after the mask's sees the masked output
        spy = teacher.conv.register_forward_hook(lambda mod, a, out: feats.__setitem__("out", out))
        teacher(x)
        m = handle.last_mask
        spy.remove()
    assert m.shape == (2, 6) and len(teacher.conv._forward_hooks) == 0
    raw = teacher.conv(x)
    torch.testing.assert_close(feats["out"], raw * m[:, :, None, None])


def test_hooks_are_removed_on_exit_on_exception_and_by_remove():
    torch.manual_seed(5)
    teacher = _Teacher()
    mask = ChannelMask(8, heads=2)
    x = torch.randn(3, 2, 5, 5)
    plain = teacher(x)
    with attach_channel_mask(teacher.fc1, mask) as handle:
        assert isinstance(handle, ChannelMaskHandle) and handle.attached
        assert len(teacher.fc1._forward_hooks) == 1
        masked = teacher(x)
        assert handle.last_mask is not None and handle.last_mask.shape == (3, 8)
    assert not torch.allclose(masked, plain)
    assert len(teacher.fc1._forward_hooks) == 0 and not handle.attached and handle.last_mask is None
    torch.testing.assert_close(teacher(x), plain)

    with pytest.raises(RuntimeError, match="inside"):
        with attach_channel_mask(teacher.fc1, mask):
            teacher(x)
            raise RuntimeError("failure inside the block")
    assert all(len(mod._forward_hooks) == 0 for mod in teacher.modules())

    handle = attach_channel_mask(teacher.fc1, mask)
    handle.remove()
    handle.remove()  # idempotent
    assert len(teacher.fc1._forward_hooks) == 0
    torch.testing.assert_close(teacher(x), plain)


def test_hook_on_a_module_without_a_tensor_output():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    pair = Pair()
    with attach_channel_mask(pair, ChannelMask(4, heads=2)):
        with pytest.raises(TypeError, match="output of Pair must be a tensor"):
            pair(torch.randn(2, 4))
    assert len(pair._forward_hooks) == 0


def test_channel_mask_bad_input():
    for kwargs, name in (
        ({"dim": 0}, "dim"),
        ({"dim": 8, "heads": 0}, "heads"),
        ({"dim": 8.0}, "dim"),
        ({"dim": 8, "heads": 3, "hidden": 4}, "multiple of heads"),
        ({"dim": 8, "hidden": 0}, "hidden"),
        ({"dim": 8, "parameterization": "dense"}, "parameterization"),
        ({"dim": 8, "spatial_reduction": "max"}, "spatial_reduction"),
    ):
        with pytest.raises(ValueError, match=name):
            ChannelMask(**kwargs)
    m = ChannelMask(8, heads=2)
    with pytest.raises(ValueError, match="feature"):
        m(torch.randn(3, 7))
    with pytest.raises(ValueError, match="feature"):
        m(torch.randn(8))
    with pytest.raises(TypeError, match="feature"):
        m(torch.ones(3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="learned"):
        ChannelMask(8, heads=2, spatial_reduction="learned")(torch.randn(2, 8, 5))
    with pytest.raises(TypeError, match="module"):
        attach_channel_mask("fc1", m)
    with pytest.raises(TypeError, match="mask"):
        attach_channel_mask(nn.Linear(2, 8), nn.Linear(8, 8))
