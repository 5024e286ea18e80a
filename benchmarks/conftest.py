"""pytest-benchmark suites of the KD losses: device, parametrisation and machine info.

Cases and providers come from :mod:`mmfast.bench` (the same ones ``python -m mmfast bench`` times).
Device: ``$MMFAST_BENCH_DEVICE`` (cpu or cuda), else CUDA when present, else CPU. Run with
``python -m pytest benchmarks --benchmark-only --benchmark-json=out.json``, then
``python benchmarks/report.py out.json``.
"""

from __future__ import annotations

import os
import statistics

import pytest
import torch

from mmfast import bench


def bench_device() -> torch.device:
    name = os.environ.get("MMFAST_BENCH_DEVICE")
    return torch.device(name) if name else bench.default_device()


def _params(cases):
    """(case name, dtype name, provider) as plain strings, so that the JSON's ``params`` stay readable."""
    return [
        pytest.param(case.name, bench.DTYPE_NAMES[dtype], provider,
                     id=f"{case.label(dtype)} {provider}".replace(" ", "-"),
                     marks=[pytest.mark.skip(reason=reason)] if reason else [])
        for case, dtype, provider, reason in bench.matrix(cases, bench_device())
    ]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    for suite, cases in bench.SUITES.items():
        fixture = f"{suite}_case"
        if fixture in metafunc.fixturenames:
            metafunc.parametrize((fixture, "dtype", "provider"), _params(cases))


@pytest.fixture(scope="session")
def device() -> torch.device:
    return bench_device()


@pytest.fixture
def run_benchmark(benchmark, request, device):
    """Time ``provider`` on ``case``: warm up, then ``benchmark.pedantic`` with an untimed per-round setup.

    The round count follows ``--benchmark-max-time`` / ``--benchmark-min-rounds``; each round is one
    forward + backward (ending with a device sync on a GPU).
    """

    def run(case_name: str, dtype_name: str, provider: str) -> None:
        case, dtype = bench.CASES[case_name], bench.DTYPES[dtype_name]
        step = bench.make_step(case, provider, device, dtype)
        estimate = bench.warm_up(step)
        benchmark.group = case.label(dtype)
        benchmark.extra_info.update(
            provider=provider, case=case.name, dtype=dtype_name, device=str(device),
            bytes=bench.provider_bytes(case, provider, dtype),
        )
        rounds = bench.plan_rounds(
            estimate, float(request.config.getoption("benchmark_max_time")),
            min_rounds=int(request.config.getoption("benchmark_min_rounds")),
        )
        device_times: list[float] = []

        def timed() -> None:
            measured = step.run()  # the device time of a CUDA-graph replay; None: pytest-benchmark's wall clock
            if measured is not None:
                device_times.append(measured)

        benchmark.pedantic(timed, setup=step.setup, rounds=rounds, iterations=1)
        benchmark.extra_info["timing"] = step.timing
        benchmark.extra_info["peak_bytes"] = step.peak_bytes
        if device_times:  # what benchmarks/report.py shows instead of the host's wall clock
            q1, median, q3 = statistics.quantiles(device_times, n=4) if len(device_times) > 1 else device_times * 3
            benchmark.extra_info.update(device_median=median, device_iqr=q3 - q1, device_rounds=len(device_times))

    return run


def pytest_benchmark_update_machine_info(config, machine_info: dict) -> None:
    machine_info.update(bench.machine_info(bench_device()))
