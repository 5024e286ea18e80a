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
import time
import traceback
import warnings
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
    split: the per-rank batch sizes (losses whose reduction is a local mean need equal ones).
    global_value: each rank's loss is the global one; False: it is a local mean (its statistics, e.g. the
    normalisation of h, are global), and the mean of the ranks' losses is the global loss (equal split).
    equal: False for a control case whose gradients must differ (shows the comparison can fail).
    Every parameter that requires grad must get one; the model's buffers (e.g. running statistics) must
    end equal to the single-process ones.
    """

    build: Callable[[object], nn.Module]
    data: Callable[[], dict[str, Tensor]]
    step: Callable[[nn.Module, dict[str, Tensor], object], Tensor]
    batch_dims: dict[str, int] = field(default_factory=dict)
    equal: bool = True
    split: tuple[int, ...] = SPLIT
    global_value: bool = True


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


# f-divergence score distillation: h = fdiv_weight(ratio) normalised by its batch mean over all ranks, and
# the per-noise-level ratio normaliser's bins. The losses' "mean" is local (each rank's mean over its own
# samples): with equal per-rank batches, DDP's average of the rank means is the global mean.
EQUAL = (N // 2, N // 2)
SAMPLE = (2, 3)


class Generator(nn.Module):
    """features -> one-step generator sample x; x0-predictions of a frozen teacher and of a fake-score
    network, both depending on x (their gradients flow back into the generator); a density-ratio normaliser."""

    def __init__(self, process_group) -> None:
        super().__init__()
        self.gen = nn.Linear(D, 6)
        self.teacher = nn.Linear(6, 6).requires_grad_(False)
        self.fake = nn.Linear(6, 6)
        self.normalizer = mmfast.nn.DensityRatioNormalizer(num_bins=3, momentum=0.3, process_group=process_group)

    def forward(self, feat: Tensor, ratio: Tensor, t: Tensor, ratio_prev: Tensor, t_prev: Tensor):
        x = self.gen(feat)
        a, b = self.teacher(torch.tanh(x)), self.fake(torch.sin(x))
        self.normalizer(ratio_prev, t_prev)  # a previous step: the EMA below blends two global batches
        shape = (-1, *SAMPLE)
        return x.reshape(shape), a.reshape(shape), b.reshape(shape), self.normalizer(ratio, t)


def _fdiv_data() -> dict[str, Tensor]:
    g = _gen(13)
    return {
        "feat": torch.randn(N, D, generator=g, dtype=torch.float64),
        "ratio": torch.rand(N, generator=g, dtype=torch.float64) * 5 + 0.1,
        "t": torch.rand(N, generator=g, dtype=torch.float64),
        "ratio_prev": torch.rand(N, generator=g, dtype=torch.float64) * 5 + 0.1,
        "t_prev": torch.rand(N, generator=g, dtype=torch.float64),
        "sigma": torch.rand(N, generator=g, dtype=torch.float64) * 3 + 0.05,
    }


def _fake_score(x, f, b):
    """The fake-score network's loss on the generator's samples (a local mean over the batch)."""
    return mmfast.fake_score_loss(f, x.detach(), b["sigma"], sigma_data=0.5)


def _fdistill_step(model, b, pg):
    x, a, f, _ = model(b["feat"], b["ratio"], b["t"], b["ratio_prev"], b["t_prev"])
    loss = copy.deepcopy(mmfast.nn.FDistillLoss("js", normalize=True, process_group=pg))  # shares the group
    return loss(x, a.detach(), f.detach(), b["ratio"]) + _fake_score(x, f, b)


def _fdistill_local_step(model, b, pg):
    x, a, f, _ = model(b["feat"], b["ratio"], b["t"], b["ratio_prev"], b["t_prev"])
    h_local = mmfast.nn.FDistillLoss("js", normalize=True)  # h normalised by each rank's own mean
    return h_local(x, a.detach(), f.detach(), b["ratio"]) + _fake_score(x, f, b)


def _uni_instruct_step(model, b, pg):
    x, a, f, _ = model(b["feat"], b["ratio"], b["t"], b["ratio_prev"], b["t_prev"])
    loss = mmfast.nn.UniInstructLoss("jeffreys", alpha=0.7, fgm=True, normalize=True, process_group=pg)
    return loss(x, a, f, b["ratio"])


def _normalizer_step(model, b, pg):
    """The normalised ratio (global bins, two EMA steps) weights both losses (no h normalisation)."""
    x, a, f, r = model(b["feat"], b["ratio"], b["t"], b["ratio_prev"], b["t_prev"])
    fdistill = mmfast.nn.FDistillLoss("kl", normalize=False)(x, a.detach(), f.detach(), r)
    return fdistill + mmfast.nn.UniInstructLoss("js", normalize=False)(x, a, f, r) + _fake_score(x, f, b)


def _compiled_fdiv_step(model, b, pg):
    """The f-divergence modules with a group inside torch.compile(fullgraph=True) (aot_eager)."""
    x, a, f, r = model(b["feat"], b["ratio"], b["t"], b["ratio_prev"], b["t_prev"])
    fdistill = mmfast.nn.FDistillLoss("reverse_kl", normalize=True, process_group=pg)
    uni_instruct = mmfast.nn.UniInstructLoss("kl", normalize=True, process_group=pg)

    def losses(x, a, f, ratio, r):
        return fdistill(x, a.detach(), f.detach(), ratio) + uni_instruct(x, a, f, r)

    return torch.compile(losses, fullgraph=True, backend="aot_eager")(x, a, f, b["ratio"], r)


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
    **{
        name: DistCase(Generator, _fdiv_data, step, split=EQUAL, global_value=False)
        for name, step in (
            ("FDistillLoss-normalize-global-mean-of-h", _fdistill_step),
            ("UniInstructLoss-normalize-global-mean-of-h", _uni_instruct_step),
            ("DensityRatioNormalizer-global-bins", _normalizer_step),
            ("compiled-fullgraph-fdiv-modules", _compiled_fdiv_step),
        )
    },
    # control: h normalised by each rank's own mean is not the global normalisation
    "control-FDistillLoss-local-normalisation-differs": DistCase(
        lambda pg: Generator(None), _fdiv_data, _fdistill_local_step, split=EQUAL, global_value=False, equal=False
    ),
    "control-DensityRatioNormalizer-local-bins-differ": DistCase(
        lambda pg: Generator(None), _fdiv_data, _normalizer_step, split=EQUAL, global_value=False, equal=False
    ),
}


# --------------------------------------------------------------------------------------------
# harness


def _shard(case: DistCase, batch: dict[str, Tensor], rank: int) -> dict[str, Tensor]:
    return {k: v.split(case.split, dim=case.batch_dims.get(k, 0))[rank] for k, v in batch.items()}


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
        if q.requires_grad
    }
    trained = [q for q in ref_model.parameters() if q.requires_grad]
    assert trained and all(q.grad is not None and q.grad.abs().sum() > 0 for q in trained), (
        "a parameter gets no gradient"
    )
    buffer_err = {
        name: float((b.double() - q.double()).abs().max())
        for (name, b), q in zip(model.named_buffers(), ref_model.buffers(), strict=True)
    }
    return {"loss": float(loss.detach()), "ref_loss": float(ref_loss.detach()), "grad_err": grad_err,
            "buffer_err": buffer_err}


def calibration_over_ranks(rank: int, pg) -> dict:
    """CalibrationAccumulator.compute / stats with the group: every rank gets the ECE of all ranks'
    samples (unequal per-rank counts), its local ECE stays local, and computing twice does not double count."""
    g = _gen(100 + rank)
    acc = mmfast.CalibrationAccumulator(n_bins=5)
    for n in (9 + rank, 4):
        acc.update(torch.randn(n, 4, generator=g) * 2, torch.randint(0, 4, (n,), generator=g))
    return {
        "local": float(acc.compute()),
        "global": float(acc.compute(pg)),
        "global-again": float(acc.compute(pg)),
        "counts": acc.stats(pg).counts.tolist(),
    }


def calibration_single_process() -> tuple[float, float, list[float]]:
    """The ECE of both ranks' samples (one process), rank 0's local ECE and the bin counts."""
    logits, labels = [], []
    for rank in range(WORLD):
        g = _gen(100 + rank)
        for n in (9 + rank, 4):
            logits.append(torch.randn(n, 4, generator=g) * 2)
            labels.append(torch.randint(0, 4, (n,), generator=g))
    ece = mmfast.expected_calibration_error
    stats = mmfast.calibration.CalibrationStats.from_logits(torch.cat(logits), torch.cat(labels), 5)
    return (float(ece(torch.cat(logits), torch.cat(labels), 5)), float(ece(torch.cat(logits[:2]),
            torch.cat(labels[:2]), 5)), stats.counts.tolist())


def deepcopy_checks(pg) -> dict:
    """copy.deepcopy of every module that holds a group (alone and inside a model, e.g. into an EMA copy)
    shares the group and copies everything else (parameters, buffers)."""
    modules = {
        "RoutedKDLoss": mmfast.nn.RoutedKDLoss(process_group=pg),
        "TeacherRouter": mmfast.nn.TeacherRouter(C, E, process_group=pg),
        "FDistillLoss": mmfast.nn.FDistillLoss(process_group=pg),
        "UniInstructLoss": mmfast.nn.UniInstructLoss(process_group=pg),
        "DensityRatioNormalizer": mmfast.nn.DensityRatioNormalizer(process_group=pg),
        "model-with-normalizer": Generator(pg),
    }
    out = {}
    for label, module in modules.items():
        try:
            copied = copy.deepcopy(module)
            holders = [m for m in copied.modules() if hasattr(m, "process_group")]
            states = zip(module.state_dict().values(), copied.state_dict().values(), strict=True)
            if not holders or any(m.process_group is not pg for m in holders):
                out[label] = "the copy does not share the group"
            elif any(a.data_ptr() == b.data_ptr() or not torch.equal(a, b) for a, b in states):
                out[label] = "parameters or buffers are shared with, or differ from, the original"
            else:
                out[label] = "ok"
        except Exception as e:
            out[label] = f"{type(e).__name__}: {e}"
    return out


def _accumulator_with_samples() -> mmfast.CalibrationAccumulator:
    acc = mmfast.CalibrationAccumulator()
    acc.update(torch.randn(3, C), torch.tensor([0, 1, 2]))
    return acc


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
        "FDistillLoss-int": (lambda: mmfast.nn.FDistillLoss(process_group=0), TypeError),
        "UniInstructLoss-str": (lambda: mmfast.nn.UniInstructLoss(process_group="world"), TypeError),
        "DensityRatioNormalizer-list": (lambda: mmfast.nn.DensityRatioNormalizer(process_group=[0, 1]), TypeError),
        "CalibrationAccumulator-str": (lambda: _accumulator_with_samples().compute(process_group="world"), TypeError),
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


def _worker(rank: int, world: int, store: str, names: list[str], out_dir: str) -> None:
    torch.set_num_threads(1)
    # gloo's pairs on the loopback interface: both ranks are local, and gloo then needs no lookup of the host's
    # name (whose failure kills a rank from a gloo thread: `terminate called without an active exception`)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # rendezvous through a file (no TCP port to pick and lose to another process between picking and binding)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    results = {}
    try:
        for name in names:
            try:
                results[name] = ddp_vs_single_process(CASES[name], rank, dist.group.WORLD)
            except Exception:  # reported per case by the test; the other rank may then time out
                results[name] = {"error": traceback.format_exc()}
        results["argument-checks"] = process_group_argument_checks(dist.group.WORLD)
        results["deepcopy"] = deepcopy_checks(dist.group.WORLD)
        try:
            results["calibration"] = calibration_over_ranks(rank, dist.group.WORLD)
        except Exception:
            results["calibration"] = {"error": traceback.format_exc()}
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
        dist.destroy_process_group()


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
    """Every rank's results. A worker killed by a signal (a crash of gloo's machinery, seen in CI as
    `terminate called without an active exception`) is not a result: when every rank had written its results
    the crash was in the teardown and they stand; when none had, one more try with fresh processes; otherwise,
    or on a second crash, the test fails."""
    for attempt in range(2):
        out = tmp_path_factory.mktemp("dist")
        try:
            run_spawned(_worker, WORLD, TIMEOUT_S, str(out / "store"), list(CASES), str(out))
            break
        except mp.ProcessExitedException as e:
            written = len(list(out.glob("rank*.json")))
            if e.signal_name is None or (written < WORLD and (attempt == 1 or written > 0)):
                raise
            warnings.warn(f"distributed workers crashed ({e}) with {written} of {WORLD} results written", stacklevel=1)
            if written == WORLD:
                break
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("name", list(CASES))
def test_ddp_step_equals_single_process(results, name):
    per_rank = [r[name] for r in results]
    for rank, res in enumerate(per_rank):
        assert "error" not in res, f"rank {rank}:\n{res.get('error')}"
    case = CASES[name]
    worst = max(max(res["grad_err"].values()) for res in per_rank)
    if case.equal:
        if not case.global_value:  # local means: their mean over the (equal) ranks is the global loss
            mean_loss = sum(res["loss"] for res in per_rank) / len(per_rank)
            assert mean_loss == pytest.approx(per_rank[0]["ref_loss"], rel=1e-12, abs=1e-12), "mean of rank losses"
        for rank, res in enumerate(per_rank):
            if case.global_value:
                assert res["loss"] == pytest.approx(res["ref_loss"], rel=1e-12, abs=1e-12), f"rank {rank} loss"
            bad = {k: v for k, v in res["grad_err"].items() if v > 1e-10}
            assert not bad, f"rank {rank}: DDP gradients differ from the single-process ones: {bad}"
            bad = {k: v for k, v in res["buffer_err"].items() if v > 1e-12}
            assert not bad, f"rank {rank}: buffers differ from the single-process ones: {bad}"
    else:
        loss = per_rank[0]["loss"] if case.global_value else sum(r["loss"] for r in per_rank) / len(per_rank)
        assert loss != pytest.approx(per_rank[0]["ref_loss"], rel=1e-6)
        assert worst > 1e-3, "the control case should give different gradients under DDP"


def test_process_group_argument_checks(results):
    for rank, res in enumerate(results):
        assert res["argument-checks"] == {k: "ok" for k in res["argument-checks"]}, f"rank {rank}"
        assert len(res["argument-checks"]) == 9


def test_calibration_accumulator_over_ranks(results):
    want, want_local0, want_counts = calibration_single_process()
    for rank, res in enumerate(results):
        res = res["calibration"]
        assert "error" not in res, f"rank {rank}:\n{res.get('error')}"
        assert res["global"] == pytest.approx(want, rel=1e-6, abs=1e-7), f"rank {rank}"
        assert res["global-again"] == res["global"], f"rank {rank}: compute(group) changed the local sums"
        assert res["counts"] == want_counts and sum(want_counts) == 9 + 4 + 10 + 4
    assert results[0]["calibration"]["local"] == pytest.approx(want_local0, rel=1e-6, abs=1e-7)
    assert want_local0 != pytest.approx(want, rel=1e-3), "the test needs the local and global ECE to differ"


def test_deepcopy_of_modules_holding_a_group(results):
    for rank, res in enumerate(results):
        assert res["deepcopy"] == {k: "ok" for k in res["deepcopy"]}, f"rank {rank}"
        assert len(res["deepcopy"]) == 6
