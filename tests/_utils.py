"""Helpers shared by the API-level tests: backend parametrization, inputs, values and gradients."""

from __future__ import annotations

import contextlib
import zlib

import pytest
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import mmfast

MIXES = ("loss", "logits", "probs")
DIVERGENCES = ("kl", "reverse_kl", "js", "tvd")
KERNEL_BACKENDS = ("cpu", "triton", "cuda")
DIFFERENTIABLE = ("student_logits", "teacher_logits", "weights")


def seed_of(*parts) -> int:
    """A seed that depends on the test case only (``hash`` of a str varies between runs)."""
    return zlib.crc32(repr(parts).encode())


def backend_device(name: str) -> str:
    """The device a backend is tested on: GPU backends on CUDA when present (Triton otherwise runs
    under the interpreter on CPU tensors; the cuda backend is then reported unavailable)."""
    if name in ("triton", "cuda") and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def interpreted(name: str) -> bool:
    """True when ``name`` runs Triton kernels under TRITON_INTERPRET (slow: tiny shapes only)."""
    return name == "triton" and backend_device(name) == "cpu"


def cuda_emulated() -> bool:
    """True when the cuda backend's tests run its kernels on CPU tensors over the CUDA emulation
    (tests/cuda_emu.py): no GPU here, and the emulation can be built."""
    import cuda_emu

    return not torch.cuda.is_available() and cuda_emu.unavailable_reason() is None


def backend_params(names=("torch", *KERNEL_BACKENDS), dtypes=None) -> list:
    """pytest params (backend, device, dtype) for every backend in ``names`` and each of its
    ``dtypes[name]`` (default float32); an unavailable backend is skipped with backend_info's reason.
    Without a GPU the cuda backend runs on CPU tensors over the CUDA emulation (marker ``cuda_emu``, id
    ``cuda_emu-<dtype>``; conftest.py switches it on for the test) where it can be built."""
    params = []
    for name in names:
        device = backend_device(name)
        if name == "cuda" and cuda_emulated():
            for dtype in (dtypes or {}).get(name, (torch.float32,)):
                params.append(pytest.param(name, "cpu", dtype, marks=pytest.mark.cuda_emu,
                                           id=f"cuda_emu-{str(dtype)[6:]}"))
            continue
        reason = mmfast.backend_info(device)["unavailable_reasons"].get(name)
        marks = []
        if reason is not None:
            marks.append(
                pytest.mark.skip(reason=f"mmfast backend {name!r} unavailable on {device}: {reason}")
            )
        elif interpreted(name):
            marks.append(pytest.mark.interpreter)
        for dtype in (dtypes or {}).get(name, (torch.float32,)):
            params.append(pytest.param(name, device, dtype, marks=marks, id=f"{name}-{str(dtype)[6:]}"))
    return params


def make_routed(
    rows=7,
    C=5,
    E=3,
    *,
    spatial=None,
    K=None,
    weights="random",
    mask=None,
    seed=0,
    logit_scale=2.0,
    dtype=torch.float64,
    device="cpu",
) -> dict:
    """Keyword inputs of ``routed_kd_loss`` (plus ``class_dim``), drawn in float64 on the CPU from
    ``seed`` and then cast, so every dtype and device sees the same numbers.

    ``rows`` is N for [N, C] logits, or B for [B, C, *spatial] logits (``class_dim=1``). ``K``
    selects sparse routing ([rows, K] indices, duplicates possible). ``weights``: "random" (in
    [0.1, 1]), "normalized" (rows sum to 1), "zero", "onehot" or None (the default 1/E or 1/K).
    ``mask``: None, "random" (at least one row kept and, with two rows or more, one dropped),
    "none" (every row dropped) or "all".
    """
    g = torch.Generator().manual_seed(seed)
    shape = (rows, C) if spatial is None else (rows, C, *spatial)
    row_shape = (rows,) if spatial is None else (rows, *spatial)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * logit_scale
    z = torch.randn((E, *shape), generator=g, dtype=torch.float64) * logit_scale
    slots = E if K is None else K
    indices = None if K is None else torch.randint(0, E, (rows, K), generator=g)
    if weights is None:
        w = None
    elif weights == "random":
        w = torch.rand(rows, slots, generator=g, dtype=torch.float64) * 0.9 + 0.1
    elif weights == "normalized":
        w = torch.rand(rows, slots, generator=g, dtype=torch.float64) + 0.1
        w = w / w.sum(1, keepdim=True)
    elif weights == "zero":
        w = torch.zeros(rows, slots, dtype=torch.float64)
    elif weights == "onehot":
        hot = torch.randint(0, slots, (rows,), generator=g)
        w = torch.nn.functional.one_hot(hot, slots).to(torch.float64)
    else:
        raise ValueError(weights)
    if mask is None:
        m = None
    elif mask == "random":
        m = torch.rand(row_shape, generator=g) < 0.6
        flat = m.view(-1)
        flat[0] = True
        if flat.numel() > 1:
            flat[-1] = False
    elif mask == "none":
        m = torch.zeros(row_shape, dtype=torch.bool)
    elif mask == "all":
        m = torch.ones(row_shape, dtype=torch.bool)
    else:
        raise ValueError(mask)

    def put(t):
        if t is None:
            return None
        return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)

    return {
        "student_logits": put(x),
        "teacher_logits": put(z),
        "weights": put(w),
        "indices": put(indices),
        "mask": put(m),
        "class_dim": -1 if spatial is None else 1,
    }


def cast(inputs: dict, dtype=None, device=None) -> dict:
    """The inputs with floating tensors cast to ``dtype`` and every tensor moved to ``device``."""
    out = {}
    for k, t in inputs.items():
        if isinstance(t, Tensor):
            t = t.to(
                device=device or t.device,
                dtype=dtype if (dtype is not None and t.is_floating_point()) else t.dtype,
            )
        out[k] = t
    return out


def value_and_grads(
    loss_fn, inputs: dict, grad_out=None, wrt=DIFFERENTIABLE, **kwargs
) -> tuple[Tensor, dict]:
    """``loss_fn(**inputs, **kwargs)`` and its gradients to the floating inputs named in ``wrt``,
    taken with ``grad_out`` (a tensor or number; default ones) as the incoming gradient."""
    args = dict(inputs)
    leaves = {}
    for name in wrt:
        t = args.get(name)
        if t is not None and t.is_floating_point():
            args[name] = leaves[name] = t.detach().clone().requires_grad_(True)
    out = loss_fn(**args, **kwargs)
    if grad_out is None:
        go = torch.ones_like(out)
    elif isinstance(grad_out, Tensor):
        go = grad_out.to(device=out.device, dtype=out.dtype).reshape(out.shape)
    else:
        go = torch.full_like(out, grad_out)
    grads = torch.autograd.grad(out, list(leaves.values()), go)
    return out.detach(), dict(zip(leaves, grads, strict=True))


def assert_scaled_close(actual: Tensor, expected: Tensor, rtol: float, atol: float, what: str = "") -> None:
    """|actual - expected| <= atol * max(1, max|expected|) + rtol * |expected|, elementwise, in float64;
    NaNs must match."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    finite = e[torch.isfinite(e)]
    scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    torch.testing.assert_close(
        a, e, rtol=rtol, atol=atol * scale, equal_nan=True, msg=lambda m: f"{what}: {m}"
    )


def _tensors_in(obj) -> list[Tensor]:
    """Every tensor in ``obj``, searching lists, tuples (named ones too) and dict values."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors_in(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _tensors_in(item)]
    return []


def assert_inputs_unchanged(fn, *args, backward: bool = True, **kwargs):
    """Run ``fn(*args, **kwargs)`` and, when ``backward``, back-propagate through every output that
    requires grad; assert that no tensor given to it (nested in lists, tuples and dicts too) was written:
    its version counter and its data are unchanged after the forward and after the backward.
    Returns ``fn``'s output."""
    watched = [(t, t._version, t.detach().clone()) for t in _tensors_in((args, kwargs))]

    def check(when):
        for i, (t, version, copy) in enumerate(watched):
            assert t._version == version, f"{when}: input tensor {i} was written (version counter changed)"
            torch.testing.assert_close(
                t.detach(), copy, rtol=0, atol=0, equal_nan=True, msg=lambda m, i=i: f"{when}: input {i}: {m}"
            )

    out = fn(*args, **kwargs)
    check("forward")
    outputs = [o for o in _tensors_in(out) if o.requires_grad]
    if backward and outputs:
        torch.autograd.backward([o.float().sum() * 1.5 for o in outputs])
        check("backward")
    return out


def av_digits_slice(data, n_train: int = 300, n_test: int = 120):
    """The first rows of each split of an AV-Digits dataset (the shipped splits are shuffled, so every class is
    there): small enough for second-long recipe runs."""
    from mmfast.datasets import AVDigits, AVSplit

    def take(split: AVSplit, n: int) -> AVSplit:
        return AVSplit(image=split.image[:n], audio=split.audio[:n], label=split.label[:n])

    return AVDigits(train=take(data.train, n_train), test=take(data.test, n_test), classes=data.classes)


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to ``n`` inside the block (tiny networks run fastest on one thread, and a
    busy machine slows oversubscribed threads many times)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def check_in_place_backward(loss_fn, leaves, factor: float, module, attr: str, monkeypatch) -> None:
    """The eager backward that scales the forward's saved gradients in place (mmfast/ops/_grad_scaling.py),
    counted through ``module.attr`` (the in-place function the op's backward calls): ``loss_fn() * factor``
    backward with the graph kept (out of place: no call), then freeing that graph (in place: the saved
    gradients were still unscaled), then on a fresh graph (in place) all give the same gradients, bit for bit.
    The all-ones check runs at any size (by default only large gradients skip the multiplication)."""
    from mmfast.ops import _grad_scaling

    monkeypatch.setattr(_grad_scaling, "_ONES_CHECK_MIN_NUMEL", 0)
    calls = []
    original = getattr(module, attr)
    monkeypatch.setattr(module, attr, lambda *args: calls.append(1) or original(*args))

    def grads():
        out = [None if t.grad is None else t.grad.clone() for t in leaves]
        for t in leaves:
            t.grad = None
        return out

    loss = loss_fn()
    (loss * factor).backward(retain_graph=True)
    first = grads()
    assert not calls
    (loss * factor).backward()
    second = grads()
    assert calls
    (loss_fn() * factor).backward()
    third = grads()
    assert any(t is not None for t in first)
    for f, s, t in zip(first, second, third, strict=True):
        assert (f is None) == (s is None) == (t is None)
        if f is not None:
            torch.testing.assert_close(s, f, rtol=0, atol=0)
            torch.testing.assert_close(t, f, rtol=0, atol=0)


class RecordingDispatchMode(TorchDispatchMode):
    """A dispatch mode that records every op it sees (``calls``: the ``OpOverload`` objects) and runs it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(func)
        return func(*args, **(kwargs or {}))


class RecordingFunctionMode(TorchFunctionMode):
    """A torch-function mode that records every function it sees (``calls``) and runs it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(func)
        return func(*args, **(kwargs or {}))
