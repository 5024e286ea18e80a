"""DDP over 2 CPU processes (gloo) == one process over the concatenated batch (docs/distributed.md).

Convention under test: a loss given a ``process_group`` returns the *global* value on every rank (its
sums and counts are all-reduced, the all-reduce is differentiable and its backward sums the incoming
gradients over the ranks), and DDP averages the parameter gradients over the ranks; together the
averaged gradient is exactly the single-process gradient, also for unequal per-rank batches and masks.

The harness is reusable: a case is a :class:`DistCase` (a model builder, the full batch and a per-rank
step function returning the loss); a new op adds one entry to ``CASES``. All cases run in one pair of
spawned processes (startup dominates), each rank compares its DDP step with a single-process step it
computes itself, and a hang fails after ``TIMEOUT_S`` instead of blocking CI.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import mmfast

WORLD = 2
TIMEOUT_S = 120  # the whole spawn: startup (~5-10 s here) plus every case
COLLECTIVE_TIMEOUT_S = 30  # a desynchronised collective raises instead of waiting forever
N, D, C, E = 8, 6, 5, 3
SPLIT = (3, 5)  # unequal per-rank batches: a per-rank mean would weight the ranks' rows differently


@dataclass(frozen=True)
class DistCase:
    """One training step to compare.

    build(process_group) -> model (the harness seeds it identically on every rank and for the reference);
    data() -> the full batch, the same on every rank (seeded);
    step(model, batch, process_group) -> loss; ``model`` is the DDP-wrapped model with this rank's
    shard and the group, or the plain model with the whole batch and ``None``.
    batch_dims: the batch dimension of each tensor of ``data`` (default 0).
    equal: False for a control case whose gradients must differ (shows the comparison can fail).
    """

    build: Callable[[object], nn.Module]
    data: Callable[[], dict[str, Tensor]]
    step: Callable[[nn.Module, dict[str, Tensor], object], Tensor]
    batch_dims: dict[str, int] = field(default_factory=dict)
    equal: bool = True


class Student(nn.Module):
    """Features -> student logits, plus optional extra heads (mutual KD) and teacher heads."""

    def __init__(self, heads: int = 1, teachers: int = 0) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(D, C) for _ in range(heads))
        self.teachers = nn.ModuleList(nn.Linear(D, C) for _ in range(teachers))

    def forward(self, feat: Tensor):
        logits = [h(feat) for h in self.heads]
        return logits, [t(feat) for t in self.teachers]


class RoutedStudent(nn.Module):
    def __init__(self, process_group) -> None:
        super().__init__()
        self.head = nn.Linear(D, C)
        self.router = mmfast.nn.TeacherRouter(C, E, top_k=2, weighting="soft", process_group=process_group)

    def forward(self, feat: Tensor):
        x = self.head(feat)
        return x, self.router(x)


class DenseStudent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(D, C, kernel_size=1)

    def forward(self, feat: Tensor) -> Tensor:
        return self.conv(feat)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _flat_data() -> dict[str, Tensor]:
    g = _gen(11)
    mask = torch.tensor([True, True, True, False, True, False, False, True])  # 3 valid on rank 0, 2 on rank 1
    return {
        "feat": torch.randn(N, D, generator=g, dtype=torch.float64),
        "z": torch.randn(E, N, C, generator=g, dtype=torch.float64) * 2,
        "w": torch.rand(N, E, generator=g, dtype=torch.float64) + 0.1,
        "mask": mask,
        "labels": torch.randint(0, C, (N,), generator=g),
    }


def _dense_data() -> dict[str, Tensor]:
    g = _gen(12)
    return {
        "feat": torch.randn(N, D, 2, 3, generator=g, dtype=torch.float64),
        "z": torch.randn(E, N, C, 2, 3, generator=g, dtype=torch.float64),
        "mask": torch.rand(N, 2, 3, generator=g) < 0.6,
    }


def _routed_step(model, b, pg):
    (x,), _ = model(b["feat"])
    return mmfast.routed_kd_loss(x, b["z"], b["w"], mask=b["mask"], temperature=2.0, process_group=pg)


def _routed_local_step(model, b, pg):
    (x,), _ = model(b["feat"])
    return mmfast.routed_kd_loss(x, b["z"], b["w"], mask=b["mask"], temperature=2.0)  # per-rank batchmean


def _module_dense_step(model, b, pg):
    loss = mmfast.nn.RoutedKDLoss(
        temperature=1.5, mix="probs", divergence="js", class_dim=1, reduction="batchmean", process_group=pg
    )
    loss_sum = mmfast.nn.RoutedKDLoss(mix="logits", class_dim=1, reduction="sum", process_group=pg)
    loss = copy.deepcopy(loss)  # a module holding a group deep-copies (e.g. into an EMA model), sharing the group
    assert loss.process_group is pg
    x = model(b["feat"])
    return loss(x, b["z"], mask=b["mask"]) + 0.01 * loss_sum(x, b["z"])


def _router_step(model, b, pg):
    x, r = model(b["feat"])
    kd = mmfast.routed_kd_loss(x, b["z"], r.weights, indices=r.indices, temperature=4.0, process_group=pg)
    return kd + r.load_balance_loss + mmfast.load_balance_loss(r.probs, "cv", process_group=pg)


def _mutual_step(model, b, pg):
    logits, _ = model(b["feat"])
    return mmfast.mutual_kd_loss(logits, temperature=2.0, process_group=pg)


def _teacher_weights_step(model, b, pg):
    (x,), zs = model(b["feat"])
    z = torch.stack(zs)
    w = mmfast.teacher_weights(z, b["labels"], temperature=0.5, per_sample=False, process_group=pg)
    w_row = mmfast.teacher_weights(z, b["labels"], per_sample=True, process_group=pg)
    return mmfast.routed_kd_loss(x, z, w, process_group=pg) + mmfast.routed_kd_loss(
        x, z.detach(), w_row, mix="logits", process_group=pg
    )


def _compiled_step(model, b, pg):
    """The losses with a process group inside torch.compile(fullgraph=True): the all-reduce is a
    functional collective, traced without a graph break (aot_eager: tracing and AOTAutograd, no C++ build)."""
    (x,), _ = model(b["feat"])

    def losses(x, z, w, mask):
        kd = mmfast.routed_kd_loss(x, z, w, mask=mask, temperature=2.0, process_group=pg)
        return kd + mmfast.load_balance_loss(torch.softmax(x[:, :E], -1), process_group=pg)

    return torch.compile(losses, fullgraph=True, backend="aot_eager")(x, b["z"], b["w"], b["mask"])


CASES: dict[str, DistCase] = {
    "routed_kd-global-batchmean": DistCase(lambda pg: Student(), _flat_data, _routed_step, {"z": 1}),
    "RoutedKDLoss-class_dim1-batchmean-and-sum": DistCase(
        lambda pg: DenseStudent(), _dense_data, _module_dense_step, {"z": 1}
    ),
    "router-load_balance-kl-cv": DistCase(RoutedStudent, _flat_data, _router_step, {"z": 1}),
    "mutual_kd": DistCase(lambda pg: Student(heads=3), _flat_data, _mutual_step, {"z": 1}),
    "teacher_weights-global-mean": DistCase(
        lambda pg: Student(teachers=E), _flat_data, _teacher_weights_step, {"z": 1}
    ),
    "compiled-fullgraph-routed_kd-load_balance": DistCase(lambda pg: Student(), _flat_data, _compiled_step, {"z": 1}),
    # control: without the process group the per-rank batchmean under DDP is NOT the global one
    "control-local-batchmean-differs": DistCase(
        lambda pg: Student(), _flat_data, _routed_local_step, {"z": 1}, equal=False
    ),
}


# --------------------------------------------------------------------------------------------
# harness


def _shard(case: DistCase, batch: dict[str, Tensor], rank: int) -> dict[str, Tensor]:
    return {k: v.split(SPLIT, dim=case.batch_dims.get(k, 0))[rank] for k, v in batch.items()}


def _max_rel_err(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def ddp_vs_single_process(case: DistCase, rank: int, pg) -> dict:
    """This rank's DDP step on its shard vs one process over the whole batch: losses and the
    DDP-averaged parameter gradients (the largest relative error over the parameters)."""
    batch = case.data()
    torch.manual_seed(1)
    ref_model = case.build(None).double()
    ref_loss = case.step(ref_model, batch, None)
    ref_loss.backward()

    torch.manual_seed(1)
    model = case.build(pg).double()
    ddp = DistributedDataParallel(model, process_group=pg)
    loss = case.step(ddp, _shard(case, batch, rank), pg)
    loss.backward()

    grad_err = {
        name: _max_rel_err(p.grad, q.grad)
        for (name, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True)
    }
    assert all(q.grad.abs().sum() > 0 for q in ref_model.parameters()), "a parameter gets no gradient"
    return {"loss": float(loss.detach()), "ref_loss": float(ref_loss.detach()), "grad_err": grad_err}


def process_group_argument_checks(pg) -> dict:
    """With torch.distributed initialised: a group with a per-row reduction, or something that is not a
    group, is refused with an error naming the argument."""
    x, z = torch.randn(2, C), torch.randn(E, 2, C)
    bad = {
        "routed-none": (lambda: mmfast.routed_kd_loss(x, z, reduction="none", process_group=pg), ValueError),
        "mutual-none": (lambda: mmfast.mutual_kd_loss(z, reduction="none", process_group=pg), ValueError),
        "module-none": (lambda: mmfast.nn.RoutedKDLoss(reduction="none", process_group=pg), ValueError),
        "not-a-group": (lambda: mmfast.load_balance_loss(x.softmax(-1), process_group=0), TypeError),
        "ranks-list": (lambda: mmfast.teacher_weights(z, torch.zeros(2, dtype=torch.long), process_group=[0, 1]),
                       TypeError),
    }
    out = {}
    for label, (fn, exc) in bad.items():
        try:
            fn()
            out[label] = "no error"
        except exc as e:
            out[label] = "ok" if "process_group" in str(e) or "reduction" in str(e) else f"unclear message: {e}"
        except Exception as e:  # the wrong exception type
            out[label] = f"{type(e).__name__}: {e}"
    return out


def _worker(rank: int, world: int, port: int, names: list[str], out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    results = {}
    try:
        for name in names:
            try:
                results[name] = ddp_vs_single_process(CASES[name], rank, dist.group.WORLD)
            except Exception:  # reported per case by the test; the other rank may then time out
                results[name] = {"error": traceback.format_exc()}
        results["argument-checks"] = process_group_argument_checks(dist.group.WORLD)
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_spawned(worker: Callable, world: int, timeout_s: float, *args) -> None:
    """``worker(rank, world, *args)`` in ``world`` spawned processes; raises if one fails and kills
    them all (then fails) when they do not finish within ``timeout_s``."""
    ctx = mp.start_processes(worker, args=(world, *args), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"distributed workers did not finish within {timeout_s} s (hang?)")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dist")
    run_spawned(_worker, WORLD, TIMEOUT_S, _free_port(), list(CASES), str(out))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("name", list(CASES))
def test_ddp_step_equals_single_process(results, name):
    per_rank = [r[name] for r in results]
    for rank, res in enumerate(per_rank):
        assert "error" not in res, f"rank {rank}:\n{res.get('error')}"
    case = CASES[name]
    worst = max(max(res["grad_err"].values()) for res in per_rank)
    if case.equal:
        for rank, res in enumerate(per_rank):
            assert res["loss"] == pytest.approx(res["ref_loss"], rel=1e-12, abs=1e-12), f"rank {rank} loss"
            bad = {k: v for k, v in res["grad_err"].items() if v > 1e-10}
            assert not bad, f"rank {rank}: DDP gradients differ from the single-process ones: {bad}"
    else:
        assert per_rank[0]["loss"] != pytest.approx(per_rank[0]["ref_loss"], rel=1e-6)
        assert worst > 1e-3, "the control case should give different gradients under DDP"


def test_process_group_argument_checks(results):
    for rank, res in enumerate(results):
        assert res["argument-checks"] == {k: "ok" for k in res["argument-checks"]}, f"rank {rank}"
        assert len(res["argument-checks"]) == 5
