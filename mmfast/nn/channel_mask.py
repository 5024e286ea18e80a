"""``ChannelMask``: MST-Distill's learned soft channel mask, and a hook that applies it to a submodule.

MST-Distill turns a frozen teacher into a "specialized teacher" by multiplying a learned mask
m(f) in (0, 1)^D onto one of its intermediate features f (SPEC section 2). The mask network:

    tokens   t_d = E_d(f) in R^h, one token per channel d = 1..D
    attend   a = MHA(t, t, t)   (H heads of width h / H over the D channel tokens)
    mask     m_d = sigmoid(w . a_d + b)

The parameterizations differ only in the token embedding E:

* ``"reference"`` (the paper's code): t_d = W_d f + c_d with W in R^{D x h x D}, i.e. one
  Linear(D, h*D): D*D*h weights, ~105.5 M at D = 596, h = 297.
* ``"factorized"`` (default): t_d = f_d v + e_d + (U f + u): a shared value embedding v in R^h scaled by the
  channel's own value, a learned channel embedding e_d in R^h (which tells the attention which channel a
  token is), and one shared context vector U f + u (U in R^{h x D}) that lets every token see the whole
  feature. 2*D*h + 2*h weights. It is the reference embedding with W_d restricted to v onehot(d)^T + U
  and c_d = e_d + u (``to_reference()`` builds that reference module exactly), so the factorized masks
  are a subset of the reference function class; the cross-channel interactions that W_d's dense
  rows would add are what the attention over channel tokens computes.

The attention is q/k/v projections (Linear(h, 3h)) + ``scaled_dot_product_attention`` + an output
projection Linear(h, h): the parameter layout of ``nn.MultiheadAttention(h, H)``.

Features are [B, D] or [B, D, *spatial]; spatial features are reduced to [B, D] first (the spatial
mean by default, or MST's learned reduction: depthwise 3x3 stride-2 conv, 1x1 conv, BatchNorm, ReLU,
global mean) and the [B, D] mask is broadcast over the spatial positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

PARAMETERIZATIONS = ("factorized", "reference")
SPATIAL_REDUCTIONS = ("mean", "learned")


def default_hidden(dim: int, heads: int) -> int:
    """MST-Distill's token width: dim // (2 * heads) * heads (about dim / 2, a multiple of heads),
    at least ``heads``."""
    return max(dim // (2 * heads) * heads, heads)


class _SpatialReduction(nn.Module):
    """MST-Distill's learned spatial reduction [B, D, H, W] -> [B, D]: depthwise 3x3 conv (stride 2),
    1x1 conv, BatchNorm, ReLU, global average."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(dim, dim, kernel_size=3, stride=2, padding=1, groups=dim, bias=False)
        self.pointwise = nn.Conv2d(dim, dim, kernel_size=1, bias=False)
        self.norm = nn.BatchNorm2d(dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.norm(self.pointwise(self.depthwise(x)))).mean(dim=(2, 3))


class ChannelMask(nn.Module):
    """Learned soft channel mask m(f) in (0, 1)^D (MST-Distill's masking module; see the module docstring).

    ``forward(f)`` returns the masked feature m(f) * f (the mask broadcast over spatial dims);
    ``forward(f, return_mask=True)`` returns (masked, mask) and ``mask(f)`` the mask [B, D] alone.

    Args:
        dim: D, the number of channels (the feature's dim 1).
        heads: attention heads H; ``hidden`` must be a multiple of it.
        hidden: token width h; default ``dim // (2 * heads) * heads`` as in MST-Distill.
        parameterization: ``"factorized"`` (O(D*h) weights, default) or ``"reference"`` (D*D*h weights).
        spatial_reduction: for [B, D, *spatial] features, ``"mean"`` (spatial mean) or ``"learned"``
            (MST's conv reduction; 2-d spatial features only).
    """

    def __init__(
        self,
        dim: int,
        heads: int = 3,
        hidden: int | None = None,
        parameterization: str = "factorized",
        spatial_reduction: str = "mean",
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("heads", heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if hidden is None:
            hidden = default_hidden(dim, heads)
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden must be an int >= 1, got {hidden!r}")
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")
        if spatial_reduction not in SPATIAL_REDUCTIONS:
            raise ValueError(f"spatial_reduction must be one of {SPATIAL_REDUCTIONS}, got {spatial_reduction!r}")
        self.dim, self.heads, self.hidden = dim, heads, hidden
        self.parameterization = parameterization
        self.spatial_reduction = spatial_reduction
        if parameterization == "reference":
            self.embed = nn.Linear(dim, hidden * dim)
        else:
            self.value_embed = nn.Parameter(torch.empty(hidden))
            self.channel_embed = nn.Parameter(torch.empty(dim, hidden))
            self.context = nn.Linear(dim, hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out_proj = nn.Linear(hidden, hidden)
        self.fc = nn.Linear(hidden, 1)
        self.reduce = _SpatialReduction(dim) if spatial_reduction == "learned" else None
        self._reset_factorized()

    def _reset_factorized(self) -> None:
        if self.parameterization == "factorized":
            # unit-variance token parts, like a Linear's output on unit-variance inputs
            nn.init.normal_(self.value_embed)
            nn.init.normal_(self.channel_embed)

    def _pooled(self, feature: Tensor) -> Tensor:
        if not isinstance(feature, Tensor) or not feature.is_floating_point():
            raise TypeError(f"feature must be a floating-point tensor, got {getattr(feature, 'dtype', type(feature))}")
        if feature.dim() < 2 or feature.shape[1] != self.dim:
            raise ValueError(
                f"feature must be [B, {self.dim}] or [B, {self.dim}, *spatial], got {tuple(feature.shape)}"
            )
        if feature.dim() == 2:
            return feature
        if self.reduce is not None:
            if feature.dim() != 4:
                raise ValueError(f"spatial_reduction='learned' needs [B, D, H, W] features, got {tuple(feature.shape)}")
            return self.reduce(feature)
        return feature.mean(dim=tuple(range(2, feature.dim())))

    def _tokens(self, f: Tensor) -> Tensor:
        """Channel tokens [B, D, h] of pooled features f [B, D]."""
        B = f.shape[0]
        if self.parameterization == "reference":
            return self.embed(f).reshape(B, self.dim, self.hidden)
        return f.unsqueeze(-1) * self.value_embed + self.channel_embed + self.context(f).unsqueeze(1)

    def mask(self, feature: Tensor) -> Tensor:
        """The soft mask m(f) [B, D], each entry in (0, 1)."""
        f = self._pooled(feature)
        t = self._tokens(f)
        B, D, h = t.shape
        q, k, v = self.qkv(t).reshape(B, D, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)  # [B, H, D, h/H]
        a = self.out_proj(a.transpose(1, 2).reshape(B, D, h))
        return torch.sigmoid(self.fc(a).squeeze(-1))

    def forward(self, feature: Tensor, return_mask: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        m = self.mask(feature)
        masked = feature * m.reshape(m.shape + (1,) * (feature.dim() - 2)).to(feature.dtype)
        return (masked, m) if return_mask else masked

    @torch.no_grad()
    def to_reference(self) -> ChannelMask:
        """A ``"reference"`` ChannelMask computing the same mask (its embedding W_d = v onehot(d)^T + U,
        c_d = e_d + u; shared attention, fc and spatial reduction weights copied)."""
        if self.parameterization == "reference":
            raise ValueError("to_reference() needs a factorized ChannelMask")
        ref = ChannelMask(self.dim, self.heads, self.hidden, "reference", self.spatial_reduction)
        ref = ref.to(device=self.fc.weight.device, dtype=self.fc.weight.dtype)
        W = self.context.weight.unsqueeze(0).repeat(self.dim, 1, 1)  # [D, h, D]: W_d = U
        idx = torch.arange(self.dim, device=W.device)
        W[idx, :, idx] += self.value_embed  # + v onehot(d)^T
        ref.embed.weight.copy_(W.reshape(self.dim * self.hidden, self.dim))
        ref.embed.bias.copy_((self.channel_embed + self.context.bias).reshape(-1))
        for name in ("qkv", "out_proj", "fc") + (("reduce",) if self.reduce is not None else ()):
            getattr(ref, name).load_state_dict(getattr(self, name).state_dict())
        return ref

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.heads}, hidden={self.hidden}, "
            f"parameterization={self.parameterization!r}, spatial_reduction={self.spatial_reduction!r}"
        )


class ChannelMaskHandle:
    """A mask attached to a module's output by a forward hook. ``remove()`` detaches it (idempotent);
    as a context manager it is removed on exit, also when the block raises. ``last_mask`` holds the
    mask [B, D] of the latest forward while attached (``None`` after ``remove()``)."""

    def __init__(self, module: nn.Module, mask: ChannelMask) -> None:
        self.module = module
        self.mask = mask
        self.last_mask: Tensor | None = None
        self._handle: RemovableHandle | None = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args, output):
        if not isinstance(output, Tensor):
            raise TypeError(
                f"attach_channel_mask: the output of {type(module).__name__} must be a tensor, "
                f"got {type(output).__name__}"
            )
        masked, self.last_mask = self.mask(output, return_mask=True)
        return masked

    @property
    def attached(self) -> bool:
        return self._handle is not None

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.last_mask = None

    def __enter__(self) -> ChannelMaskHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def attach_channel_mask(module: nn.Module, mask: ChannelMask) -> ChannelMaskHandle:
    """Multiply ``mask``'s soft mask onto every output of ``module`` (e.g. ``teacher.get_submodule("fc1")``)
    until the returned handle is removed: ``with attach_channel_mask(layer, mask): logits = teacher(x)``.
    The module's output must be a tensor [B, D] or [B, D, *spatial]."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if not isinstance(mask, ChannelMask):
        raise TypeError(f"mask must be a ChannelMask, got {type(mask).__name__}")
    return ChannelMaskHandle(module, mask)
