"""The direct eager path of the forward ops (mmfast/ops/_eager_path.py).

In plain eager mode the public losses run each op's implementation in a plain ``autograd.Function``
instead of through torch.library. Both paths must give bit-identical losses and gradients, and every
situation that must see the custom op (a dispatch or torch-function mode, a tensor subclass, meta
tensors, the path switched off) must get it.
"""

from __future__ import annotations

import pytest
import torch
from _utils import RecordingDispatchMode, RecordingFunctionMode, backend_params

import mmfast
from mmfast.ops import _eager_path
from mmfast.ops import fdistill as fdistill_ops


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _routed_kd():
    g = _gen(1)
    x, z = torch.randn(37, 11, generator=g), torch.randn(3, 37, 11, generator=g)
    w = torch.rand(37, 3, generator=g)
    return (lambda x, z, w: mmfast.routed_kd_loss(x, z, w, temperature=2.0, mix="probs", divergence="js"),
            [x, z, w])


def _routed_kd_sparse_masked():
    g = _gen(2)
    x, z = torch.randn(2, 5, 3, 4, generator=g), torch.randn(3, 2, 5, 3, 4, generator=g)
    idx, w = torch.tensor([[2, 0], [1, 1]]), torch.rand(2, 2, generator=g)
    mask = torch.rand(2, 3, 4, generator=g) > 0.3
    return (lambda x, z, w: mmfast.routed_kd_loss(x, z, w, indices=idx, class_dim=1, mask=mask), [x, z, w])


def _mutual_kd():
    return (lambda x: mmfast.mutual_kd_loss(x, 3.0), [torch.randn(3, 19, 7, generator=_gen(3))])


def _fdistill():
    g = _gen(4)
    x, a, b = (torch.randn(5, 2, 3, 7, generator=g) for _ in range(3))
    h = torch.rand(5, generator=g) + 0.5
    return (lambda x: mmfast.fdistill_loss(x, a, b, h), [x])


def _uni_instruct():
    g = _gen(5)
    x, a, b = (torch.randn(6, 33, generator=g) for _ in range(3))
    r = torch.rand(6, generator=g) + 0.5
    return (lambda x, a, b: mmfast.uni_instruct_loss(x, a, b, r, divergence="jeffreys", fgm=True), [x, a, b])


def _fake_score():
    g = _gen(6)
    b, x = torch.randn(4, 3, 5, generator=g), torch.randn(4, 3, 5, generator=g)
    sigma = torch.rand(4, generator=g) + 0.2
    return (lambda b: mmfast.fake_score_loss(b, x, sigma, reduction="sum"), [b])


def _masked_reconstruction():
    g = _gen(7)
    p, y = torch.randn(9, 13, generator=g), torch.randn(9, 13, generator=g)
    m = torch.rand(9, 13, generator=g)
    return (lambda p, y, m: mmfast.masked_reconstruction_loss(p, y, m, loss="smooth_l1", beta=0.5), [p, y, m])


def _masked_reconstruction_rows():
    g = _gen(8)
    p, y = torch.randn(2, 6, 5, generator=g), torch.randn(2, 6, 5, generator=g)
    rows = torch.rand(2, 1, 5, generator=g) > 0.5
    return (lambda p: mmfast.masked_reconstruction_loss(p, y, rows, channel_dim=1, normalize_target=True), [p])


CASES = {f.__name__.strip("_"): f for f in (_routed_kd, _routed_kd_sparse_masked, _mutual_kd, _fdistill,
                                             _uni_instruct, _fake_score, _masked_reconstruction,
                                             _masked_reconstruction_rows)}


def _graph_node_names(t: torch.Tensor) -> set[str]:
    names, stack, seen = set(), [t.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return names


def _run(case, device, dtype, direct: bool, grad_out: float, retain: bool = False):
    fn, inputs = CASES[case]()
    leaves = [t.to(device, dtype).requires_grad_() for t in inputs]
    with _eager_path.direct_path(direct):
        loss = fn(*leaves)
        loss.backward(torch.full_like(loss, grad_out), retain_graph=retain)
        if retain:  # a second backward over the kept graph: the saved gradients were not scaled in place
            loss.backward(torch.full_like(loss, grad_out))
    return loss, [t.grad for t in leaves], _graph_node_names(loss)


@pytest.mark.parametrize("grad_out,retain", [(1.0, False), (0.75, True)],
                         ids=["ones-free-graph", "scaled-retain-graph"])
@pytest.mark.parametrize("backend,device,dtype", backend_params())
@pytest.mark.parametrize("case", list(CASES))
def test_direct_path_matches_the_op(case, backend, device, dtype, grad_out, retain):
    """Same loss and gradients, bit for bit, with the direct path and through torch.library, on every backend
    (an incoming gradient of ones with the graph freed: the saved gradients are returned or scaled in place;
    another one with the graph kept, twice); the graph shows which path ran."""
    with mmfast.use_backend(backend):
        loss_d, grads_d, nodes_d = _run(case, device, dtype, True, grad_out, retain)
        loss_o, grads_o, nodes_o = _run(case, device, dtype, False, grad_out, retain)
    assert torch.equal(loss_d, loss_o)
    for gd, go in zip(grads_d, grads_o, strict=True):
        assert gd is not None and torch.equal(gd, go)
    assert any(n.endswith("_eagerBackward") for n in nodes_d), nodes_d
    assert not any(n.startswith("GeneratedBackwardFor_mmfast") for n in nodes_d), nodes_d
    assert any(n.startswith("GeneratedBackwardFor_mmfast") for n in nodes_o), nodes_o
    assert not any(n.endswith("_eagerBackward") for n in nodes_o), nodes_o


def _fdistill_args(requires_grad: bool):
    g = _gen(9)
    x, a, b = (torch.randn(3, 8, generator=g) for _ in range(3))
    return (x.requires_grad_(requires_grad), a, b, torch.rand(3, generator=g) + 0.5, 0.5, True)


@pytest.mark.parametrize("mode_cls", [RecordingDispatchMode, RecordingFunctionMode])
def test_modes_see_the_custom_op(mode_cls):
    """Under a dispatch or torch-function mode the call goes through torch.library: the mode sees the op."""
    args = _fdistill_args(True)
    want = fdistill_ops.run_fdistill_fwd(*args)
    with mode_cls() as mode:
        got = fdistill_ops.run_fdistill_fwd(*args)
    seen = [str(f) for f in mode.calls]
    assert any("mmfast.fdistill_fwd" in s or "mmfast::fdistill_fwd" in s for s in seen), seen
    for w, o in zip(want, got, strict=True):
        assert torch.equal(w, o)


class _Subclass(torch.Tensor):
    pass


def test_tensor_subclass_and_meta_take_the_op(monkeypatch):
    calls = []
    op = fdistill_ops.run_fdistill_fwd.op
    monkeypatch.setattr(fdistill_ops.run_fdistill_fwd, "op", lambda *a: calls.append(a) or op(*a))
    args = _fdistill_args(False)
    fdistill_ops.run_fdistill_fwd(*args)
    assert calls == []  # plain tensors: the direct path
    fdistill_ops.run_fdistill_fwd(args[0].as_subclass(_Subclass), *args[1:])
    assert len(calls) == 1
    meta = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)
    loss, dx = fdistill_ops.run_fdistill_fwd(*meta)  # the op's fake kernel
    assert len(calls) == 2 and loss.is_meta and dx.shape == (3, 8)


def test_no_grad_and_defaults():
    """Without a gradient to record the implementation runs as is; left-out trailing arguments take the op's
    defaults on both paths; a wrong argument count reaches torch.library's error."""
    args = _fdistill_args(True)
    with torch.no_grad():
        loss, dx = fdistill_ops.run_fdistill_fwd(*args)
    assert loss.grad_fn is None and dx.grad_fn is None
    for direct in (True, False):
        with _eager_path.direct_path(direct):
            short = fdistill_ops.run_fdistill_fwd(*args)
            full = fdistill_ops.run_fdistill_fwd(*args, False)
        assert all(torch.equal(s, f) for s, f in zip(short, full, strict=True))
    with pytest.raises(RuntimeError, match="missing value for argument 'scale'"):
        fdistill_ops.run_fdistill_fwd(*args[:4])


def test_set_enabled_returns_the_previous_setting():
    assert _eager_path.set_enabled(False) is True
    try:
        assert _eager_path.set_enabled(False) is False
    finally:
        _eager_path.set_enabled(True)


@pytest.mark.parametrize("case", ["routed_kd", "uni_instruct", "masked_reconstruction"])
def test_create_graph_matches_the_op(case):
    """``create_graph=True`` (the backward runs with grad mode on, so it takes the backward ops): the same
    first-order gradients on both paths, and the same answer to whether they are differentiable."""
    results = []
    for direct in (True, False):
        fn, inputs = CASES[case]()
        leaves = [t.clone().requires_grad_() for t in inputs]
        with _eager_path.direct_path(direct):
            grads = torch.autograd.grad(fn(*leaves), leaves, create_graph=True)
        results.append(grads)
    for gd, go in zip(*results, strict=True):
        assert torch.equal(gd, go) and gd.requires_grad == go.requires_grad
