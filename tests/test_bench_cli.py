"""The benchmark command line and the report script (fast; the timings themselves are not checked)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import mmfast

REPO = Path(__file__).resolve().parents[1]


def _row(table: str, provider: str) -> list[str]:
    """The cells of ``provider``'s row in a markdown table."""
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == provider:
            return cells
    raise AssertionError(f"no row for {provider!r} in:\n{table}")


def _run_cli(*args: str, timeout: float) -> subprocess.CompletedProcess:
    """``python -m mmfast ARGS`` from an empty folder (the working directory comes first on the module path: a
    stray ``*.py`` there, or the repository's ./mmfast, would shadow what is imported), with this interpreter
    and the mmfast these tests import."""
    path = [str(Path(mmfast.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, path)))
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run([sys.executable, "-m", "mmfast", *args], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=timeout)


def test_bench_quick_prints_comparison_table(tmp_path):
    out_json = tmp_path / "quick.json"
    proc = _run_cli("bench", "--quick", "--device", "cpu", "--json", str(out_json), timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout
    header = _row(table, "provider")
    assert "vs eager" in header and "vs compile" in header
    for provider in ("eager", "compile", "mmfast-torch"):
        cells = _row(table, provider)
        assert re.fullmatch(r"\d+\.\d\dx", cells[header.index("vs eager")]), cells
    assert _row(table, "eager")[header.index("vs eager")] == "1.00x"
    assert _row(table, "compile")[header.index("vs compile")] == "1.00x"
    assert "torch" in table and "available" in table  # the backend_info summary
    doc = json.loads(out_json.read_text())
    assert {b["extra_info"]["provider"] for b in doc["benchmarks"]} >= {"eager", "compile", "mmfast-torch"}
    assert _row(_load_report().render(doc), "compile")[header.index("vs compile")] == "1.00x"


def test_no_or_unknown_subcommand_prints_usage():
    for argv in ([], ["no-such-command"]):
        proc = _run_cli(*argv, timeout=60)
        assert proc.returncode == 2
        assert "usage:" in proc.stderr and "bench" in proc.stderr


def _load_script(name: str):
    """A module of benchmarks/ (not a package) loaded from its file."""
    spec = importlib.util.spec_from_file_location(f"mmfast_bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _load_report():
    return _load_script("report")


def _record(group: str, provider: str, median: float, iqr: float, nbytes: int | None) -> dict:
    return {
        "group": group, "name": f"test_routed_kd[{provider}]", "params": {"provider": provider},
        "stats": {"median": median, "iqr": iqr, "stddev": iqr, "rounds": 10},
        "extra_info": {"provider": provider, "bytes": nbytes},
    }


def test_report_ratios_from_pytest_benchmark_json(tmp_path, capsys):
    group = "routed-kd N=256 C=1000 E=4 dense bf16"
    doc = {
        "machine_info": {"device_name": "Test GPU", "torch": "2.11.0", "triton": "3.6.0", "device": "cuda"},
        "datetime": "2026-01-01T00:00:00",
        "benchmarks": [
            _record(group, "eager", 8e-3, 1e-4, 3_000_000),
            _record(group, "compile", 3e-3, 1e-4, 3_000_000),
            _record(group, "mmfast-triton", 1.5e-3, 2e-5, 3_000_000),
            _record(group, "exp-floor", 1e-3, 1e-5, 2_000_000),
            _record(group, "copy", 2e-3, 1e-5, 12_000_000),  # 6 GB/s
        ],
    }
    path = tmp_path / "out.json"
    path.write_text(json.dumps(doc))
    assert _load_report().main([str(path)]) == 0
    table = capsys.readouterr().out
    assert "Test GPU" in table and "2.11.0" in table and "3.6.0" in table
    header = _row(table, "provider")
    triton = _row(table, "mmfast-triton")
    col = {name: triton[header.index(name)] for name in header}
    assert col["median"] == "1.500 ms"
    assert col["vs eager"] == "5.33x"  # 8 / 1.5
    assert col["vs compile"] == "2.00x"  # 3 / 1.5
    assert col["/ exp-floor"] == "1.50x"  # 1.5 / 1
    assert col["GB/s"] == "2.0"  # 3 MB / 1.5 ms
    assert col["% copy"] == "33%"  # 2 GB/s of 6 GB/s
    assert _row(table, "compile")[header.index("vs eager")] == "2.67x"
    assert _row(table, "copy")[header.index("vs eager")] == ""  # no speedups for the reference rows


def test_gpu_timing_is_reported_and_survives_json():
    """A GPU group says how it was timed (CUDA-graph device time, or the wall clock with the capture failure);
    the JSON round trip keeps it, and a pytest-benchmark record's device time replaces its host wall clock."""
    from mmfast import bench

    rows = [bench.Result("g fp32", "eager", 2e-3, 1e-4, 5, 4000, timing="cuda-graph"),
            bench.Result("g fp32", "mmfast-cuda", 1e-3, 1e-4, 5, 4000, timing="cuda-graph")]
    table = bench.render_tables(rows)
    assert "timing: device time of one CUDA-graph replay" in table and _row(table, "mmfast-cuda")[3] == "2.00x"
    mixed = bench.render_tables([rows[0], bench.Result("g fp32", "compile", 1e-3, 0, 5, 4000, timing="wall (x)")])
    assert "compile: wall (x)" in mixed
    assert "timing:" not in bench.render_tables([bench.Result("g fp32", "eager", 1e-3, 0, 5, 4000)])
    doc = {"benchmarks": [r.to_json() for r in rows]}
    assert bench.load_results(doc) == rows
    record = rows[0].to_json()
    record["stats"]["median"] = 9.0  # the host's wall clock, which a CUDA-graph step does not report
    record["extra_info"].update(device_median=2e-3, device_iqr=1e-4, device_rounds=5)
    assert bench.load_results({"benchmarks": [record]}) == rows[:1]


def test_gpu_peak_memory_column_and_json():
    """Loss rows carry their step's peak memory: a ``peak MiB`` column (empty for rows without it), kept
    through JSON; groups without any peak have no such column."""
    from mmfast import bench

    rows = [bench.Result("g bf16", "eager", 2e-3, 1e-4, 5, 4000, timing="cuda-graph", peak_bytes=48 * 2**20),
            bench.Result("g bf16", "mmfast-triton", 1e-3, 1e-4, 5, 4000, timing="cuda-graph", peak_bytes=2**19),
            bench.Result("g bf16", "copy", 1e-3, 1e-4, 5, 4000, timing="cuda-graph")]
    table = bench.render_tables(rows)
    header = _row(table, "provider")
    col = header.index("peak MiB")
    assert _row(table, "eager")[col] == "48.0" and _row(table, "mmfast-triton")[col] == "0.5"
    assert _row(table, "copy")[col] == ""
    assert bench.load_results({"benchmarks": [r.to_json() for r in rows]}) == rows
    assert "peak MiB" not in bench.render_tables([bench.Result("g fp32", "eager", 1e-3, 0, 5, 4000)])


def test_forward_backward_columns_and_json():
    """measure_group(forward=True) times each loss provider's forward and backward apart: ``fwd`` and ``bwd``
    columns, empty for reference kernels, kept through JSON. On the wall clock they are the two parts of each
    step round; where only the forward was timed alone (CUDA graphs), bwd is the median less fwd. A CPU step
    reports its peak memory too."""
    from mmfast import bench

    case = bench.RoutedCase(N=16, C=7, E=2)
    names = ["eager", "mmfast-cpu", "exp-floor"]
    results = bench.measure_group(case, torch.float32, names, torch.device("cpu"), budget_s=0.01, forward=True)
    by_name = {r.provider: r for r in results}
    assert all(r.error is None for r in results), results
    for name in ("eager", "mmfast-cpu"):
        r = by_name[name]
        assert 0 < r.forward_s < r.median_s and 0 < r.backward_s < r.median_s
        assert r.forward_s + r.backward_s == pytest.approx(r.median_s, rel=0.5)  # medians of the parts and sums
        # student gradient [16, 7] fp32 plus per-row statistics; eager also keeps its [E, N, C] intermediates
        assert r.peak_bytes >= 16 * 7 * 4
    assert by_name["mmfast-cpu"].peak_bytes < by_name["eager"].peak_bytes
    assert by_name["exp-floor"].forward_s is None and by_name["exp-floor"].peak_bytes is None
    plain = bench.measure_group(case, torch.float32, names[:1], torch.device("cpu"), budget_s=0.01)
    assert plain[0].forward_s is None and plain[0].backward_s is None

    rows = [bench.Result("g fp32", "compile", 3e-3, 1e-4, 5, 4000, forward_s=2e-3, backward_s=1.1e-3),
            bench.Result("g fp32", "mmfast-cuda", 1e-3, 1e-4, 5, 4000, timing="cuda-graph", forward_s=9e-4),
            bench.Result("g fp32", "exp-floor", 5e-4, 1e-5, 5, 4000)]
    table = bench.render_tables(rows)
    header = _row(table, "provider")
    fwd, bwd = header.index("fwd"), header.index("bwd")
    assert header.index("IQR") < fwd < bwd < header.index("vs eager")
    assert _row(table, "compile")[fwd] == "2.000 ms" and _row(table, "compile")[bwd] == "1.100 ms"
    assert _row(table, "mmfast-cuda")[fwd] == "900.0 us" and _row(table, "mmfast-cuda")[bwd] == "100.0 us"
    assert _row(table, "exp-floor")[fwd] == "" and _row(table, "exp-floor")[bwd] == ""
    assert _row(table, "mmfast-cuda")[header.index("vs compile")] == "3.00x"
    assert bench.load_results({"benchmarks": [r.to_json() for r in rows]}) == rows
    assert "fwd" not in bench.render_tables([bench.Result("g fp32", "eager", 1e-3, 0, 5, 4000)])


def test_report_plot(tmp_path):
    """benchmarks/report.py --plot draws each group's loss providers (forward and backward parts, peak memory);
    the reference kernels and failed rows are left out, and a file with no loss results is an error."""
    from mmfast import bench

    report = _load_report()
    rows = [bench.Result("a fp32", "eager", 3e-3, 1e-4, 5, 4000, forward_s=2e-3, backward_s=1e-3, peak_bytes=2**21),
            bench.Result("a fp32", "mmfast-cpu", 1e-3, 1e-4, 5, 4000, forward_s=9e-4, backward_s=1e-4),
            bench.Result("a fp32", "exp-floor", 5e-4, 1e-5, 5, 4000),
            bench.Result("b fp32", "compile", 2e-3, 1e-4, 5, 4000),
            bench.Result("b fp32", "mmfast-cpu", math.nan, math.nan, 0, error="boom")]
    doc = {"machine_info": {"device_name": "Test CPU", "torch": "2.13"}, "datetime": "today",
           "benchmarks": [r.to_json() for r in rows]}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(doc))
    png, md = tmp_path / "bench.png", tmp_path / "bench.md"
    assert report.main([str(path), "-o", str(md), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "| fwd | bwd |" in md.read_text()
    with pytest.raises(ValueError, match="no loss provider results"):
        report.plot(rows[2:3], str(tmp_path / "none.png"))


@pytest.mark.skipif(not mmfast.backend_info(torch.device("cpu"))["available"]["cpu"],
                    reason="the native CPU extension is not built")
def test_row_mask_patterns_script(monkeypatch, capsys):
    """benchmarks/row_mask_patterns.py times the bare kernel under periodic and random row masks."""
    script = _load_script("row_mask_patterns")
    monkeypatch.setattr(sys, "argv", ["row_mask_patterns.py", "--N", "64", "--D", "32", "--rounds", "2"])
    script.main()
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| mask")]
    assert len(rows) == 11 and rows[0].startswith("| none | 100% |")
    assert "| keep 3, skip 1 | 75% |" in out and "| random 25% | 25% |" in out
    assert rows[0].split("|")[4].strip() == "1.00" and rows[-1].split("|")[5].strip() == "0.50"


def test_row_teams_script(monkeypatch):
    """benchmarks/row_teams.py (a GPU lease's comparison of the CUDA kernels' row teams, split and cluster mode and
    sweep orders) runs each problem under both choices; without a GPU, on the CUDA emulation at tiny shapes, and the
    forced team and sweep order are restored afterwards."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU, gpu_check.sh runs the script at its real shapes")
    import cuda_emu

    if cuda_emu.unavailable_reason() is not None:
        pytest.skip(f"no CUDA emulation: {cuda_emu.unavailable_reason()}")
    emu = cuda_emu.emulate_cuda_backend(monkeypatch)
    script = _load_script("row_teams")
    table = script.main(["--device", "cpu", "--dtypes", "float32", "--reps", "1"])
    rows = table.splitlines()[2:]
    assert len(rows) == 8, table
    assert [r.split("|")[3].strip() for r in rows] == ["block", "block", "whole rows", "block", "block", "block",
                                                      "block forward", "block back"]
    assert [r.split("|")[6].strip() for r in rows] == ["thread", "thread", "split", "cluster", "thread", "thread",
                                                      "block back+hints", "block back+hints"]
    assert [r.split("|")[-2].strip() for r in rows] == ["thread", "thread", "split", "cluster", "thread", "thread",
                                                       "block forward", "block forward"]
    assert emu.cuda_row_team() == 0 and emu.cuda_sweep_order() == 0


def test_triton_tiles_script(tmp_path, capsys):
    """benchmarks/triton_tiles.py (a GPU lease's tuning sweep) runs every candidate launch tuple of the routed-
    and mutual-KD Triton kernels, the default also without L2 hints and swept forward; on a CPU in the
    interpreter, at tiny shapes and two rows streamed at the default tiles. Each candidate's outputs match the
    default's (a failed comparison would be a row with its error), and the table marks the default and the best
    of each shape; the module settings are restored."""
    pytest.importorskip("triton")
    from mmfast.triton import mutual_kd, routed_kd

    script = _load_script("triton_tiles")
    settings = lambda: [[getattr(m, name) for name in script.SETTINGS] for m in (routed_kd, mutual_kd)]  # noqa: E731
    defaults = settings()
    path = tmp_path / "tiles.json"
    assert script.main(["--json", str(path)]) == 0
    assert settings() == defaults
    rows = json.loads(path.read_text())["rows"]
    shapes = {r["shape"] for r in rows}
    assert len(shapes) == 3 and all(r["error"] is None for r in rows), [r["error"] for r in rows if r["error"]]
    for shape in shapes:
        mine = [r for r in rows if r["shape"] == shape]
        default = next(r for r in mine if r["default"])
        assert len(mine) == len(script.candidates(tuple(default["tiles"]))) and sum(r["default"] for r in mine) == 1
        sweeps = {(r["zigzag"], r["hints"]) for r in mine if r["tiles"] == default["tiles"]}
        assert sweeps == {(True, True), (True, False), (False, False)}
    table = capsys.readouterr().out
    assert table.count("| default") + table.count(", best") + table.count("| best") >= 2 * len(shapes) - 1
    capsys.readouterr()
    assert script.main(["--sweeps", "--json", str(path)]) == 0  # the gpu_check step "l2": streamed rows only
    rows = json.loads(path.read_text())["rows"]
    assert {r["shape"] for r in rows} == {"routed N=2 C=5000 E=2"} and len(rows) == 3
    assert {(r["zigzag"], r["hints"]) for r in rows} == {(True, True), (True, False), (False, False)}
    assert settings() == defaults


def test_profiler_log_lines_are_dropped_and_the_rest_kept(capfd):
    """The CPU peak measurement runs the profiler, whose C++ side prints start/stop lines to stderr: they are
    dropped, anything else written to stderr meanwhile is passed on."""
    from mmfast import bench

    with bench._without_profiler_log():
        os.write(2, b"USDT:2026-11-27 14:58:56 3537:3537 SyncActivityProfilerHandler.cpp:52] profiler_start\n")
        os.write(2, b"a real message\n")
        print("a Python warning", file=sys.stderr)
    err = capfd.readouterr().err
    assert "profiler_start" not in err and "a real message" in err and "a Python warning" in err


def test_cpu_allocator_is_described(monkeypatch):
    """The CPU header says how host memory is allocated (page faults of fresh buffers weigh on the ratios)."""
    from mmfast import bench

    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert bench.cpu_allocator().startswith("glibc defaults")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "2147483648")
    assert "MALLOC_MMAP_THRESHOLD_=2147483648" in bench.cpu_allocator()
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert bench.cpu_allocator() == "jemalloc (LD_PRELOAD)"
    info = bench.machine_info(torch.device("cpu"))
    assert "host allocator: jemalloc (LD_PRELOAD)" in bench.describe_machine(info, "today")


def test_bench_leaves_value_checks_as_they_were():
    """The mmfast providers time their steps without the value checks, but only within each step."""
    from mmfast import _checks, bench

    assert _checks.value_checks_enabled()
    case = bench.RoutedCase(N=8, C=5, E=2)
    results = bench.measure_group(case, torch.float32, ["mmfast-cpu", "mmfast-torch"], torch.device("cpu"),
                                  budget_s=0.01)
    assert all(r.error is None for r in results), results
    assert _checks.value_checks_enabled()
    with pytest.raises(ValueError, match="weights must be >= 0"):
        mmfast.routed_kd_loss(torch.randn(3, 4), torch.randn(2, 3, 4), -torch.ones(3, 2))


def test_class_sweep_rows_for_routed_and_mutual_kd():
    """benchmarks/class_sweep.py: one row per C and provider, with the minimal-byte bandwidth."""
    sweep = _load_script("class_sweep")
    for loss in ("routed", "mutual"):
        rows = sweep.sweep(torch.device("cpu"), torch.float32, 2048, 2, [3, 40], 0.01, False, loss)
        assert {(r["C"], r["provider"]) for r in rows} >= {(3, "mmfast-cpu"), (40, "mmfast-cpu")}, rows
        for r in rows:
            assert r["error"] is None and r["median_s"] > 0 and r["gb_s"] > 0, r
            assert r["N"] == 2048 // r["C"]
        table = sweep.render(rows)
        assert table.count("\n") == len(rows) + 1


def test_case_and_provider_filters_and_append(tmp_path):
    """--case and --provider pick the benchmarks; --append adds a second run's results to the same JSON (one
    process per suite on a GPU); filters that match nothing are an error, not an empty run."""
    out_json = tmp_path / "runs.json"
    first = _run_cli("bench", "--device", "cpu", "--suite", "routed_kd", "--case", "N=256 C=1000",
                     "--provider", "eager", "--no-forward", "--json", str(out_json), timeout=180)
    assert first.returncode == 0, first.stderr[-3000:]
    assert _row(first.stdout, "eager") and "| compile |" not in first.stdout
    second = _run_cli("bench", "--device", "cpu", "--suite", "routed_kd", "--case", "N=256 C=1000",
                      "--provider", "mmfast-torch", "--no-forward", "--json", str(out_json), "--append", timeout=180)
    assert second.returncode == 0, second.stderr[-3000:]
    doc = json.loads(out_json.read_text())
    assert [b["extra_info"]["provider"] for b in doc["benchmarks"]] == ["eager", "mmfast-torch"]
    assert all("C=1000" in b["name"] for b in doc["benchmarks"])
    none = _run_cli("bench", "--device", "cpu", "--case", "no such case", timeout=120)
    assert none.returncode == 2 and "no benchmark matches" in none.stderr


def test_provider_errors_are_rows_with_tracebacks_and_device_faults_stop(monkeypatch, capsys):
    """A provider's ordinary error becomes its table row (traceback on stderr); a sticky device error (the CUDA
    context is lost) raises DeviceLost naming the group and provider, and the CLI stops there with status 1."""
    from mmfast import bench

    case, names = bench.ROUTED_CASES[0], ["eager", "mmfast-torch"]
    real_make_step = bench.make_step

    def failing(kind):
        def make_step(case, provider, *args, **kwargs):
            if provider == "mmfast-torch":
                raise kind("CUDA error: an illegal memory access was encountered" if kind is not ValueError
                           else "bad shape")
            return real_make_step(case, provider, *args, **kwargs)
        return make_step

    monkeypatch.setattr(bench, "make_step", failing(ValueError))
    rows = bench.measure_group(case, torch.float32, names, torch.device("cpu"), budget_s=0.01, warmup_rounds=1,
                               min_rounds=1)
    assert math.isfinite(rows[0].median_s) and rows[1].error == "ValueError: bad shape"
    err = capsys.readouterr().err
    assert "mmfast-torch failed" in err and "Traceback" in err and "bad shape" in err

    monkeypatch.setattr(bench, "make_step", failing(torch.AcceleratorError))
    with pytest.raises(bench.DeviceLost, match="C=1000 E=4 dense fp32 / mmfast-torch: AcceleratorError"):
        bench.measure_group(case, torch.float32, names, torch.device("cpu"), budget_s=0.01, warmup_rounds=1,
                            min_rounds=1)

    def lost(*args, **kwargs):
        raise bench.DeviceLost("g fp32 / mmfast-triton", torch.AcceleratorError("CUDA error: illegal address"))

    monkeypatch.setattr(bench, "measure_group", lost)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.run(parser.parse_args(["--device", "cpu", "--suite", "routed_kd", "--case", "C=1000"])) == 1
    assert "the device failed in g fp32 / mmfast-triton" in capsys.readouterr().err


def test_graph_step_keeps_its_inputs_alive(monkeypatch):
    """A captured CUDA graph replays raw addresses, so its step must keep the body (whose closure holds the
    inputs) alive: once freed, their memory is reused and a replay reads garbage or faults (the H200 run of
    2026-11-27 lost its CUDA context so). The CUDA calls are stand-ins here; what is checked is the lifetime."""
    import gc
    import weakref

    from mmfast import bench

    class Recorder:
        def __init__(self, *args, **kwargs):
            pass

        def __getattr__(self, name):
            return lambda *args, **kwargs: None

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def elapsed_time(self, other):
            return 1.0

    for name in ("Stream", "CUDAGraph", "Event", "graph", "stream", "current_stream"):
        monkeypatch.setattr(torch.cuda, name, Recorder)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)

    def make():
        inputs = torch.ones(3)

        def body():
            return inputs * 2

        return bench._graph_step(body, torch.zeros(1)), weakref.ref(inputs)

    step, inputs_ref = make()
    gc.collect()
    assert inputs_ref() is not None, "the graph step dropped the inputs its graph reads"
    assert step.timing == "cuda-graph" and step.run() == 1e-3
    del step
    gc.collect()
    assert inputs_ref() is None


def test_gpu_check_script_runs_its_steps_in_order_and_keeps_going(tmp_path):
    """benchmarks/gpu_check.sh, as far as a CPU machine can run it: the bench step runs one process per suite
    with the providers asked for, a suite that fails (here: no --quick case) does not cost the others' results,
    the tables are drawn from what was measured, the CUDA bench is skipped without a build, the summary names
    every step, and only the files it documents come back under $OUT."""
    out = tmp_path / "out"
    env = dict(
        os.environ, OUT=str(out), PYTHON=sys.executable, GPU_CHECK_STEPS="env,cli,climd",
        GPU_CHECK_CLI_SUITES="mutual_kd routed_kd", GPU_CHECK_CLI_ARGS="--quick --device cpu --no-forward",
        GPU_CHECK_CLI_PROVIDERS="eager mmfast-torch", GPU_CHECK_BUDGET_S="240",
    )
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = proc.stdout[proc.stdout.index("=== summary"):]
    steps = [line.split()[0] for line in summary.splitlines()[1:] if line and not line.startswith("tests:")]
    assert steps == ["env", "build", "cli", "ptxas", "tests", "clicuda", "climd", "teams", "l2", "overhead", "sweep",
                     "tiles", "bench"], summary
    assert re.search(r"^cli +FAILED rc=1", summary, re.M), summary  # mutual_kd has no --quick case
    assert re.search(r"^climd +ok", summary, re.M) and re.search(r"^clicuda +SKIPPED \(no build\)", summary, re.M)
    assert re.search(r"^teams +SKIPPED \(no build\)", summary, re.M), summary
    assert sorted(p.name for p in out.iterdir()) == ["cli.json", "cli.md", "cli.png", "env.txt", "gpu_check.log"]
    doc = json.loads((out / "cli.json").read_text())
    assert sorted(b["extra_info"]["provider"] for b in doc["benchmarks"]) == ["eager", "mmfast-torch"]
    assert "routed" in (out / "cli.md").read_text()
    log = (out / "gpu_check.log").read_text()
    assert "--provider eager --provider mmfast-torch" in log and "no benchmark matches" in log


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_measure_group_times_providers_in_blocks(monkeypatch, device):
    """Providers alternate in blocks: on a CPU BLOCK_WARMUP_ROUNDS untimed rounds, then up to BLOCK_ROUNDS timed
    ones, so every timed round follows a round of the same provider; elsewhere (a GPU round starts from a flushed
    L2; "meta" stands in for it here) no untimed rounds. Each provider gets exactly its planned rounds."""
    from mmfast import bench

    log = []

    def make_step(case, provider, device, dtype, **kwargs):
        counter = iter(range(10**6))
        return bench.Step(setup=lambda: None, run=lambda: log.append(provider) or 1e-3 * (1 + next(counter) % 3))

    monkeypatch.setattr(bench, "make_step", make_step)
    case = bench.SUITES["routed_kd"][0]
    rows = bench.measure_group(case, torch.float32, ["eager", "mmfast-cpu"], torch.device(device), budget_s=0.0,
                               warmup_rounds=1, min_rounds=5, block_rounds=3)
    assert [r.rounds for r in rows] == [5, 5]
    warm, a, b = (bench.BLOCK_WARMUP_ROUNDS if device == "cpu" else 0), ["eager"], ["mmfast-cpu"]
    assert log == a + b + (a * (warm + 3) + b * (warm + 3) + a * (warm + 2) + b * (warm + 2))


def test_overhead_script(capsys):
    """benchmarks/overhead.py times each loss against its eager reference and, in the same run, through the
    torch.library path (the direct eager path switched off, and back on afterwards)."""
    from mmfast.ops import _eager_path

    script = _load_script("overhead")
    threads = torch.get_num_threads()  # main sets 1 thread
    try:
        script.main(["--ops", "fdistill,masked_reconstruction_rowmask", "--backend", "torch", "--calls", "2",
                     "--repeats", "1"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert ("| op (torch) | shape | fwd us | eager fwd us | fwd ratio | fwd+bwd us | eager fwd+bwd us "
            "| fwd+bwd ratio | op path fwd+bwd us |") in out
    rows = [line for line in out.splitlines() if line.startswith(("| fdistill ", "| masked_reconstruction_rowmask "))]
    assert len(rows) == 2 and all(float(cell) > 0 for row in rows for cell in row.strip("|").split("|")[2:])
    assert _eager_path.set_enabled(True) is True
