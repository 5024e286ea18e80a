"""The CPU emulation of the CUDA runtime that the cuda backend's tests run on without a GPU (tests/cuda_emu.py,
csrc/cuda_emu): the source translation, and the device semantics it promises, on its self-test kernels
(csrc/cuda_emu/selftest.cu)."""

from __future__ import annotations

import math

import cuda_emu
import pytest
import torch

# cudaError codes of cuda_emu.h
SUCCESS, INVALID_CONFIGURATION, LAUNCH_FAILURE = 0, 9, 719


def test_translate_rewrites_launches_and_dynamic_shared_memory():
    source = "\n".join([
        "  kernel<T, VEC><<<grid_rows(p.B), nt, 0, stream>>>(p, plan.chunk);  // note",
        "  k<<<1, 32>>>();",
        "  extern __shared__ __align__(16) unsigned char smem[];",
        "  // a comment about a<<<b>>>(c) launch",
    ])
    assert cuda_emu.translate(source).splitlines() == [
        "  ::mmfast_emu::Launch(grid_rows(p.B), nt, 0, stream).run(kernel<T, VEC>, p, plan.chunk);  // note",
        "  ::mmfast_emu::Launch(1, 32).run(k);",
        "  unsigned char* smem = ::mmfast_emu::dynamic_smem();",
        "  // a comment about a<<<b>>>(c) launch",
    ]
    with pytest.raises(ValueError, match="line 1"):
        cuda_emu.translate("  kernel<<<grid, block>>>(a,\n    b);")


def test_every_launch_in_csrc_cuda_is_translated():
    for path in cuda_emu.CUDA_DIR.glob("*.cu*"):
        out = cuda_emu.translate(path.read_text())
        assert "<<<" not in "\n".join(line for line in out.splitlines() if not line.lstrip().startswith("//"))
        assert "extern __shared__" not in out, path.name


@pytest.fixture(scope="module")
def emu():
    if torch.cuda.is_available():  # the kernels run on the device there; no lease time for building this
        pytest.skip("a GPU is present: the CUDA tests run on it, not on the emulation")
    reason = cuda_emu.unavailable_reason()
    if reason is not None:
        pytest.skip(f"no CUDA emulation: {reason}")
    return cuda_emu.load()


def test_barrier_and_shared_memory_across_blocks(emu):
    code, out = emu.run_selftest("block_sum", 96)
    assert code == SUCCESS and out[: 2 * 96] == [96 * 97 / 2] * (2 * 96)


def test_warp_shuffles(emu):
    code, out = emu.run_selftest("warp_sum", 64)
    assert code == SUCCESS and out[:64] == [32 * 33 / 2] * 64


@pytest.mark.parametrize("live", [64, 40, 4])
def test_exited_threads_do_not_hold_a_barrier(emu, live):
    """Threads that returned no longer count at a barrier (as on the device); __syncthreads_or ORs the rest."""
    code, out = emu.run_selftest("exited_threads", 64, live)
    assert code == SUCCESS
    assert out[:live] == [1.0] * live and out[live:64] == [-1.0] * (64 - live)


def test_a_barrier_that_cannot_complete_fails_the_launch(emu):
    code, _ = emu.run_selftest("stuck", 32)
    assert code == LAUNCH_FAILURE
    assert emu.run_selftest("block_sum", 32)[0] == SUCCESS  # the next launch runs normally


def test_dynamic_shared_memory_starts_as_nan(emu):
    code, out = emu.run_selftest("unwritten_smem", 8)
    assert code == SUCCESS and all(math.isnan(v) for v in out[:8])


def test_alternating_thread_order_exposes_a_race(emu):
    """Without a barrier, a thread's read of its lower neighbour's slot sees the neighbour's write when the
    threads run in ascending order, and the unwritten (NaN) slot in descending order: the two blocks start in
    opposite orders, so the race shows in one of them whatever its direction."""
    code, out = emu.run_selftest("racy", 32)
    assert code == SUCCESS
    nan_reads = []
    for block in range(2):
        racy, synced = out[64 * block: 64 * block + 32], out[64 * block + 32: 64 * block + 64]
        assert synced == [float((t - 1) % 32) for t in range(32)]
        nan_reads.append(sum(math.isnan(v) for v in racy))
    assert sorted(nan_reads) == [1, 31]  # ascending: only thread 0 (reading 31) misses; descending: all but 0


@pytest.mark.parametrize("blocks, threads", [(2, 32), (4, 64), (8, 40)])
def test_cluster_barrier_spans_the_blocks_of_a_cluster(emu, blocks, threads):
    """Each block writes its slot before the cluster barrier and every thread sums all slots after it: without the
    barrier, the blocks the scheduler runs first would read the others' unwritten (-1) slots."""
    code, out = emu.run_selftest("cluster_sum", threads, blocks)
    assert code == SUCCESS
    assert out[: blocks * threads] == [blocks * (blocks + 1) / 2] * (blocks * threads)


def test_cluster_launch_limits(emu):
    assert emu.run_selftest("cluster_not_dividing", 32, 4)[0] == INVALID_CONFIGURATION  # grid not a multiple
    assert emu.run_selftest("cluster_sum", 32, 9)[0] == INVALID_CONFIGURATION  # more than 8 blocks
    emu.set_compute_capability_major(8)
    try:
        assert emu.run_selftest("cluster_sum", 32, 2)[0] == INVALID_CONFIGURATION  # no clusters before sm_90
    finally:
        emu.set_compute_capability_major(9)
    assert emu.run_selftest("cluster_sum", 32, 2)[0] == SUCCESS


def test_launch_limits(emu):
    assert emu.run_selftest("block_sum", 1025)[0] == INVALID_CONFIGURATION  # more than 1024 threads
    assert emu.run_selftest("too_much_smem", 32)[0] == INVALID_CONFIGURATION  # 64 KiB without the opt-in
