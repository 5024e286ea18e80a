"""Public API: backend selection, import hygiene, router and load balance, teacher weights, module
form, reductions, incoming gradients."""

from __future__ import annotations

import math
import statistics
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from _utils import DIVERGENCES, MIXES, make_routed, value_and_grads

import mmfast
from mmfast import _backend
from mmfast.ops import routed_kd as routed_kd_ops
from mmfast.reference.routed_kd import routed_kd_loss_autograd

# --------------------------------------------------------------------------------------------
# backend selection


def test_use_backend_nests_and_restores(monkeypatch):
    monkeypatch.delenv("MMFAST_BACKEND", raising=False)
    assert mmfast.backend_info()["requested"] == "auto"
    with mmfast.use_backend("torch"):
        assert mmfast.backend_info()["requested"] == "torch"
        with mmfast.use_backend("cuda"):
            assert mmfast.backend_info()["requested"] == "cuda"
            with mmfast.use_backend("auto"):
                assert mmfast.backend_info()["requested"] == "auto"
            assert mmfast.backend_info()["requested"] == "cuda"
        assert mmfast.backend_info()["requested"] == "torch"
        with pytest.raises(KeyError), mmfast.use_backend("cpu"):
            raise KeyError("restored on error too")
        assert mmfast.backend_info()["requested"] == "torch"
    assert mmfast.backend_info()["requested"] == "auto"


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("MMFAST_BACKEND", "torch")
    info = mmfast.backend_info("cpu")
    assert info["requested"] == info["chosen"] == "torch"
    assert "MMFAST_BACKEND" in info["why"]
    with mmfast.use_backend("auto"):  # the context manager wins over the environment
        assert mmfast.backend_info()["requested"] == "auto"
    monkeypatch.setenv("MMFAST_BACKEND", " CUDA ")
    assert mmfast.backend_info()["requested"] == "cuda"
    with pytest.raises(mmfast.BackendUnavailableError, match="CUDA tensors"):
        mmfast.routed_kd_loss(torch.randn(2, 3), torch.randn(1, 2, 3))
    monkeypatch.setenv("MMFAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match="MMFAST_BACKEND.*'fastest'.*auto, torch, cpu, triton, cuda"):
        mmfast.routed_kd_loss(torch.randn(2, 3), torch.randn(1, 2, 3))


@pytest.mark.parametrize("name", ["fastest", "", "numpy", "Torch2"])
def test_invalid_backend_name(name):
    with pytest.raises(ValueError, match="valid names are auto, torch, cpu, triton, cuda"):
        with mmfast.use_backend(name):
            pass


def test_forced_unavailable_backend_raises_with_reason(monkeypatch):
    x, z = torch.randn(2, 3), torch.randn(1, 2, 3)
    with (
        mmfast.use_backend("cuda"),
        pytest.raises(mmfast.BackendUnavailableError, match="'cuda'.*CUDA tensors"),
    ):
        mmfast.routed_kd_loss(x, z)
    with mmfast.use_backend("cuda"), pytest.raises(mmfast.BackendUnavailableError, match="CUDA tensors"):
        mmfast.mutual_kd_loss(torch.stack([x, x]))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET" in mmfast.backend_info("cpu")["unavailable_reasons"]["triton"]
    with (
        mmfast.use_backend("triton"),
        pytest.raises(mmfast.BackendUnavailableError, match="TRITON_INTERPRET=1"),
    ):
        mmfast.routed_kd_loss(x, z)
    info = mmfast.backend_info("cpu")
    with mmfast.use_backend("triton"):
        assert "unavailable" in mmfast.backend_info("cpu")["why"]
    if not info["available"]["cpu"]:
        with mmfast.use_backend("cpu"), pytest.raises(mmfast.BackendUnavailableError, match="not built"):
            mmfast.routed_kd_loss(x, z)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if mmfast.backend_info("cpu")["available"]["triton"]:  # float64 is not a Triton dtype
        with mmfast.use_backend("triton"), pytest.raises(mmfast.BackendUnavailableError, match="float64"):
            mmfast.routed_kd_loss(x.double(), z.double())


def test_backend_info_keys_and_choice_match_what_runs(monkeypatch):
    monkeypatch.delenv("MMFAST_BACKEND", raising=False)
    info = mmfast.backend_info("cpu")
    assert {
        "device",
        "requested",
        "chosen",
        "why",
        "available",
        "unavailable_reasons",
        "dtypes",
        "native_built",
        "native_with_cuda",
        "triton_interpreter",
        "torch",
    } <= info.keys()
    assert set(info["available"]) == set(mmfast.BACKENDS) == {"torch", "cpu", "triton", "cuda"}
    assert info["available"]["torch"] and not info["available"]["cuda"]
    assert set(info["unavailable_reasons"]) == {k for k, v in info["available"].items() if not v}
    assert info["available"]["cpu"] == info["native_built"]
    assert info["chosen"] == ("cpu" if info["native_built"] else "torch")  # auto order on a CPU: cpu, torch

    ran = []
    real_run, real_resolve = routed_kd_ops._run_backend, _backend.resolve

    def run_spy(backend, *args):
        ran.append(backend)
        return real_run(backend, *args)

    def resolve_spy(*args):
        ran.append(("resolve", real_resolve(*args)))
        return ran[-1][1]

    monkeypatch.setattr(routed_kd_ops, "_run_backend", run_spy)
    monkeypatch.setattr(_backend, "resolve", resolve_spy)
    x, z = torch.randn(3, 4), torch.randn(2, 3, 4)
    mmfast.routed_kd_loss(x, z)
    assert ran == [("resolve", info["chosen"]), info["chosen"]]
    ran.clear()
    mmfast.mutual_kd_loss(z)
    assert ran == [("resolve", info["chosen"])]
    ran.clear()
    with mmfast.use_backend("torch"):
        assert mmfast.backend_info("cpu")["chosen"] == "torch"
        assert mmfast.backend_info("cpu")["why"] == "forced by use_backend()"
        mmfast.routed_kd_loss(x, z)
    assert ran == [("resolve", "torch"), "torch"]


def test_import_does_not_import_triton_or_initialise_cuda():
    code = (
        "import sys, torch\n"
        "import mmfast\n"
        "assert 'triton' not in sys.modules, 'import mmfast imported triton'\n"
        "assert not any(m.startswith('mmfast.triton') for m in sys.modules)\n"
        "assert not torch.cuda.is_initialized(), 'import mmfast initialised CUDA'\n"
        "mmfast.backend_info()\n"
        "assert 'triton' not in sys.modules, 'backend_info imported triton'\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


# --------------------------------------------------------------------------------------------
# TeacherRouter and load balance


def _router_probs(router, x):
    """softmax(W2 (W1 x + b1) + b2), written out."""
    h = x @ router.proj.weight.t() + router.proj.bias
    return torch.softmax(h @ router.gate.weight.t() + router.gate.bias, dim=-1)


def _kl_balance(probs):
    """(1/E) KL(u || pbar) by loops."""
    N, E = len(probs), len(probs[0])
    pbar = [sum(probs[n][e] for n in range(N)) / N for e in range(E)]
    return sum((1 / E) * math.log((1 / E) / pbar[e]) for e in range(E)) / E


def _cv_balance(probs):
    col = [sum(row[e] for row in probs) for e in range(len(probs[0]))]
    return statistics.stdev(col) / statistics.mean(col)  # unbiased std


@pytest.mark.parametrize("load_balance", ["kl", "cv"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("weighting", ["hard", "soft"])
def test_teacher_router(weighting, top_k, load_balance):
    torch.manual_seed(0)
    N, C, E = 6, 5, 4
    router = mmfast.nn.TeacherRouter(
        C, E, top_k=top_k, weighting=weighting, load_balance=load_balance
    ).double()
    assert (router.proj.in_features, router.proj.out_features, router.gate.out_features) == (C, 2 * C, E)
    x = torch.randn(N, C, dtype=torch.float64, requires_grad=True)  # the student's logits
    out = router(x)
    probs = _router_probs(router, x)
    torch.testing.assert_close(out.probs, probs)
    assert out.indices.shape == out.weights.shape == (N, top_k) and out.indices.dtype == torch.int64
    assert torch.equal(out.indices, probs.topk(top_k, -1).indices)
    top = probs.gather(1, out.indices)
    if weighting == "hard":
        assert torch.equal(out.weights, torch.full((N, top_k), 1 / top_k, dtype=torch.float64))
        assert not out.weights.requires_grad
    else:
        torch.testing.assert_close(out.weights, top / top.sum(1, keepdim=True))
    hand = _kl_balance(probs.tolist()) if load_balance == "kl" else _cv_balance(probs.tolist())
    assert out.load_balance_loss.dim() == 0 and out.load_balance_loss.item() == pytest.approx(hand, rel=1e-10)

    z = torch.randn(E, N, C, dtype=torch.float64)
    kd = mmfast.routed_kd_loss(x, z, out.weights, indices=out.indices, temperature=4.0)
    router.zero_grad()
    kd.backward()
    grads = [p.grad for p in router.parameters()]
    if weighting == "hard":  # the router learns only from the load-balance loss
        assert all(g is None for g in grads) and x.grad is not None
    else:
        assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_router_uniform_probs_give_zero_balance_loss():
    for mode in ("kl", "cv"):
        router = mmfast.nn.TeacherRouter(5, 3, load_balance=mode)
        torch.nn.init.zeros_(router.gate.weight)
        torch.nn.init.zeros_(router.gate.bias)
        out = router(torch.randn(7, 5))
        torch.testing.assert_close(out.probs, torch.full((7, 3), 1 / 3))
        assert abs(out.load_balance_loss.item()) < 1e-6
        assert (
            abs(mmfast.load_balance_loss(torch.full((4, 5), 0.2, dtype=torch.float64), mode).item()) < 1e-15
        )


def test_load_balance_loss_formulas():
    torch.manual_seed(2)
    probs = torch.softmax(torch.randn(9, 4, dtype=torch.float64) * 2, -1).requires_grad_(True)
    pbar = probs.mean(0)
    kl = mmfast.load_balance_loss(probs, "kl")
    # MST-Distill: KLDivLoss(reduction="batchmean")(log pbar, u) on a 1-D input divides by E
    mst = F.kl_div(pbar.log(), torch.full((4,), 0.25, dtype=torch.float64), reduction="batchmean")
    torch.testing.assert_close(kl, mst)
    assert kl.item() == pytest.approx(_kl_balance(probs.tolist()), rel=1e-12)
    cv = mmfast.load_balance_loss(probs, "cv")
    assert cv.item() == pytest.approx(_cv_balance(probs.tolist()), rel=1e-12)
    g_kl, g_mst = torch.autograd.grad(kl, probs)[0], torch.autograd.grad(mst, probs)[0]
    torch.testing.assert_close(g_kl, g_mst)


def test_teacher_weights():
    torch.manual_seed(3)
    E, N, C, tau = 3, 5, 4, 0.7
    z = torch.randn(E, N, C, dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 1, 2])
    # l_ne = CE(z_e,n, y_n) = logsumexp(z_e,n) - z_e,n,y_n, by loops
    ce = [
        [math.log(sum(math.exp(v) for v in z[e, n].tolist())) - z[e, n, y[n]].item() for e in range(E)]
        for n in range(N)
    ]

    def softmin(ls):
        s = sum(math.exp(-v / tau) for v in ls)
        return [math.exp(-v / tau) / s for v in ls]

    w = mmfast.teacher_weights(z, y, temperature=tau)
    assert w.shape == (N, E)
    torch.testing.assert_close(w, torch.tensor([softmin(row) for row in ce], dtype=torch.float64))
    mean_ce = [sum(ce[n][e] for n in range(N)) / N for e in range(E)]
    w_global = mmfast.teacher_weights(list(z), y, temperature=tau, per_sample=False)
    torch.testing.assert_close(w_global, torch.tensor([softmin(mean_ce)] * N, dtype=torch.float64))
    torch.testing.assert_close(w.sum(1), torch.ones(N, dtype=torch.float64))


# --------------------------------------------------------------------------------------------
# module form, reductions, incoming gradients


@pytest.mark.parametrize("mix", MIXES)
def test_module_equals_functional(mix):
    inputs = make_routed(rows=2, C=4, E=3, spatial=(3,), K=2, mask="random", seed=7)
    kw = dict(
        temperature=2.5, mix=mix, divergence="js", beta=0.2, t2_scale=False, class_dim=1, reduction="none"
    )
    module = mmfast.nn.RoutedKDLoss(**kw)
    assert "mix=" in repr(module)
    args = (inputs["student_logits"], inputs["teacher_logits"], inputs["weights"])
    got = module(*args, indices=inputs["indices"], mask=inputs["mask"])
    expected = mmfast.routed_kd_loss(*args, indices=inputs["indices"], mask=inputs["mask"], **kw)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("layout", ["rows", "class_dim1"])
def test_reductions(layout):
    spatial = None if layout == "rows" else (2, 3)
    inputs = make_routed(rows=5 if spatial is None else 3, C=4, E=2, spatial=spatial, mask="random", seed=11)
    mask = inputs.pop("mask")
    row_shape = mask.shape
    rows = mmfast.routed_kd_loss(**inputs, reduction="none")
    assert rows.shape == row_shape and rows.dtype == torch.float64
    assert torch.equal(
        mmfast.routed_kd_loss(**inputs, mask=mask, reduction="none"),
        torch.where(mask, rows, torch.zeros_like(rows)),
    )
    torch.testing.assert_close(mmfast.routed_kd_loss(**inputs, reduction="sum"), rows.sum())
    torch.testing.assert_close(mmfast.routed_kd_loss(**inputs), rows.mean())  # batchmean over rows (pixels)
    torch.testing.assert_close(mmfast.routed_kd_loss(**inputs, mask=mask, reduction="sum"), rows[mask].sum())
    torch.testing.assert_close(mmfast.routed_kd_loss(**inputs, mask=mask), rows[mask].sum() / mask.sum())


def test_mutual_reductions():
    logits = torch.randn(3, 5, 4, dtype=torch.float64)
    rows = mmfast.mutual_kd_loss(logits, 2.0, reduction="none")
    assert rows.shape == (5,) and (rows > 0).all()
    torch.testing.assert_close(mmfast.mutual_kd_loss(logits, 2.0, reduction="sum"), rows.sum())
    torch.testing.assert_close(mmfast.mutual_kd_loss(logits, 2.0), rows.sum() / 5)
    torch.testing.assert_close(mmfast.mutual_kd_loss(logits, 2.0, t2_scale=False), rows.sum() / 5 / 4)
    assert mmfast.mutual_kd_loss(logits[:1]).item() == 0  # one model: no pair


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("mix", MIXES)
def test_all_rows_masked_gives_exact_zero(mix, divergence):
    inputs = make_routed(rows=4, C=3, E=2, mask="none", seed=2)
    for reduction in ("batchmean", "sum", "none"):
        loss, grads = value_and_grads(
            mmfast.routed_kd_loss, inputs, mix=mix, divergence=divergence, reduction=reduction
        )
        assert (loss == 0).all(), reduction
        for name, g in grads.items():
            assert (g == 0).all(), (reduction, name)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("mix", MIXES)
def test_incoming_gradient_not_one(mix, divergence):
    inputs = make_routed(rows=6, C=5, E=3, K=2, mask="random", seed=13)
    kw = dict(temperature=1.3, mix=mix, divergence=divergence)
    # (loss * 3.7).backward(), through the module form and the functional
    x = inputs["student_logits"].clone().requires_grad_(True)
    module = mmfast.nn.RoutedKDLoss(**kw)
    (
        module(x, inputs["teacher_logits"], inputs["weights"], indices=inputs["indices"], mask=inputs["mask"])
        * 3.7
    ).backward()
    ref = value_and_grads(routed_kd_loss_autograd, inputs, 3.7, **kw)[1]
    torch.testing.assert_close(x.grad, ref["student_logits"], rtol=1e-10, atol=1e-12)
    got = value_and_grads(mmfast.routed_kd_loss, inputs, 3.7, **kw)[1]
    for name in got:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-10, atol=1e-12)
    # reduction="none" with a random gradient per row
    g = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = value_and_grads(mmfast.routed_kd_loss, inputs, g, reduction="none", **kw)
    ref = value_and_grads(routed_kd_loss_autograd, inputs, g, reduction="none", **kw)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-10, atol=1e-12)
    for name in got[1]:
        torch.testing.assert_close(got[1][name], ref[1][name], rtol=1e-10, atol=1e-12)


def test_teacher_sequence_equals_stacked():
    inputs = make_routed(rows=4, C=5, E=3, seed=9)
    zs = [t.clone().requires_grad_(True) for t in inputs["teacher_logits"]]
    z = inputs["teacher_logits"].clone().requires_grad_(True)
    a = mmfast.routed_kd_loss(inputs["student_logits"], zs, inputs["weights"], mix="logits")
    b = mmfast.routed_kd_loss(inputs["student_logits"], z, inputs["weights"], mix="logits")
    assert torch.equal(a, b)
    (a * 2).backward()
    (b * 2).backward()
    for e in range(3):
        assert torch.equal(zs[e].grad, z.grad[e])
