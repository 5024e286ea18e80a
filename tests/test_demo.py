"""``python -m mmfast demo``: outputs of a quick run, recipe selection, tables, a missing matplotlib, bad data files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _utils import av_digits_slice

from mmfast import demo
from mmfast.__main__ import main
from mmfast.datasets import AVDigits, load_av_digits
from mmfast.recipes._common import MethodResult, RecipeResult

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_data() -> AVDigits:
    """A slice of the real data (the shipped splits are shuffled, so every class is there): seconds per recipe."""
    full = load_av_digits()
    return av_digits_slice(full, 300, 120)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, small_data):
    """``python -m mmfast demo --quick`` (every recipe) in-process, on the data slice."""
    out = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(demo, "load_data", lambda path=None: small_data)
        threads = torch.get_num_threads()
        code = main(["demo", "--quick", "--out", str(out), "--no-progress", "--seed", "3"])
        assert torch.get_num_threads() == threads  # the demo's --threads setting is restored
    return code, out


def test_quick_demo_writes_every_output(quick_run, capsys):
    code, out = quick_run
    assert code == 0
    for name in ("results.md", "results.json", "curves.png", "reliability.png", "ring_reverse_kl.png"):
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, name
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text()
    assert "torch " + torch.__version__ in md
    assert "Command: `python -m mmfast demo --quick --out " in md and "--seed 3" in md
    for recipe in demo.RECIPES:
        assert f"## {recipe}: " in md
    assert md.count("| method | role | modality | test acc (%) | ECE (%) |") == 3
    assert "| CE-only student | baseline | audio |" in md and "[chosen]" in md


def test_quick_demo_json(quick_run):
    _, out = quick_run
    data = json.loads((out / "results.json").read_text())
    assert data["mode"] == "quick" and data["seed"] == 3
    assert data["machine"]["torch"] == torch.__version__ and data["machine"]["torch_threads"] == 1
    assert list(data["recipes"]) == list(demo.RECIPES)
    for name in ("mst_distill", "ensemble_kd", "ume_umt"):
        recipe = data["recipes"][name]
        assert recipe["time_s"] > 0 and recipe["rows"] and recipe["curves"]
        roles = {row["role"] for row in recipe["rows"]}
        assert {"teacher", "baseline", "student"} <= roles
        for row in recipe["rows"]:
            assert row["recipe"] == name and 0 <= row["accuracy"] <= 1 and 0 <= row["ece"] <= 1
    ring = data["recipes"]["one_step_ring"]
    assert ring["runs"][0]["run"] == "fdistill/reverse_kl" and ring["runs"][0]["steps"] == 150


def _result() -> RecipeResult:
    rows = [
        MethodResult("r", "teacher A", "image", 0.95, 0.02, 0.1, "teacher"),
        MethodResult("r", "teacher B", "audio", 0.90, 0.03, None, "teacher"),
        MethodResult("r", "CE-only", "audio", 0.80, 0.04, 0.2, "baseline"),
        MethodResult("r", "KD", "audio", 0.85, 0.05, 1.5, "student"),
    ]
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.5]])
    labels = torch.tensor([0, 0, 1])
    return RecipeResult("r", rows, {"KD": [0.5, 0.85], "CE-only": [0.4, 0.8]}, {"KD": (logits, labels)}, ["a note"])


def test_recipe_table_compares_with_baseline_and_best_teacher():
    table = demo.recipe_table(_result()).splitlines()
    assert table[0].startswith("| method | role | modality | test acc (%) | ECE (%) | vs baseline (pts) |")
    assert table[2] == "| teacher A | teacher | image | 95.0 | 2.0 | +15.0 | - | 0.10 |"
    assert table[3] == "| teacher B | teacher | audio | 90.0 | 3.0 | +10.0 | - | - |"
    assert table[4] == "| CE-only | baseline | audio | 80.0 | 4.0 | - | -15.0 | 0.20 |"
    assert table[5] == "| KD | student | audio | 85.0 | 5.0 | +5.0 | -10.0 | 1.50 |"


def _demo_results() -> demo.DemoResults:
    from mmfast.recipes.one_step_ring import machine_info

    res = demo.DemoResults(mode="quick", seed=0, command="python -m mmfast demo", machine=machine_info())
    res.results["ensemble_kd"] = _result()
    res.times["ensemble_kd"] = 1.0
    return res


def test_without_matplotlib_the_tables_are_still_written(tmp_path, monkeypatch, capsys):
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg", "matplotlib.ticker"):
        monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    files = demo.write_outputs(_demo_results(), tmp_path)
    assert sorted(p.name for p in files) == ["results.json", "results.md"]
    assert not list(tmp_path.glob("*.png"))
    md = (tmp_path / "results.md").read_text()
    assert "Figures skipped" in md and "matplotlib" in md and "| KD | student | audio |" in md
    assert "pip install" in capsys.readouterr().err
    assert json.loads((tmp_path / "results.json").read_text())["messages"]


def test_with_matplotlib_the_figures_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    files = demo.write_outputs(_demo_results(), tmp_path)
    assert {p.name for p in files} == {"results.md", "results.json", "curves.png", "reliability.png"}


def test_unknown_recipe_lists_the_valid_ones(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--recipes", "ensemble_kd", "nope"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "nope" in err and all(name in err for name in demo.RECIPES)
    with pytest.raises(ValueError, match="valid recipes are mst_distill, ensemble_kd, ume_umt, one_step_ring"):
        demo.select_recipes(["nope"], "default")


def test_select_recipes():
    assert demo.select_recipes(None, "default") == demo.RECIPES
    assert demo.select_recipes(["ume_umt", "ensemble_kd"], "quick") == ("ensemble_kd", "ume_umt")
    with pytest.raises(ValueError, match="mode"):
        demo.select_recipes(None, "fast")


def test_bad_thread_count(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--threads", "-1"])
    assert exc.value.code == 2 and "--threads" in capsys.readouterr().err


def test_corrupt_data_file_exits_2_with_the_hint(tmp_path, capsys):
    bad = tmp_path / "av_digits.npz"
    bad.write_bytes(b"not a zip archive at all")
    out = tmp_path / "out"
    code = main(["demo", "--quick", "--no-progress", "--data", str(bad), "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid AV-Digits file") and str(bad) in err
    assert "regenerate it with: python scripts/make_av_digits.py" in err
    assert not out.exists()  # nothing ran


def test_missing_data_file_from_env_exits_2(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "nowhere.npz"
    monkeypatch.setenv(demo.DATA_ENV, str(missing))
    assert main(["demo", "--quick", "--no-progress", "--recipes", "ume_umt", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "AV-Digits file not found" in err and str(missing) in err and "regenerate" in err


def test_corrupt_data_file_command_line_has_no_traceback(tmp_path):
    """The real command: exit code 2, the loader's message, no traceback."""
    bad = tmp_path / "av_digits.npz"
    bad.write_bytes(b"PK\x03\x04 truncated")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "mmfast", "demo", "--quick", "--data", str(bad), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "invalid AV-Digits file" in proc.stderr and "regenerate it with" in proc.stderr


def test_ring_only_needs_no_data(tmp_path, monkeypatch):
    """The ring alone never reads the data file (a missing one is no error)."""
    from mmfast.recipes import one_step_ring as ring

    monkeypatch.setenv(demo.DATA_ENV, str(tmp_path / "nowhere.npz"))
    calls = []

    def fake_ring(*args, **kwargs):
        calls.append(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(ring, "run_one_step_ring", fake_ring)
    with pytest.raises(RuntimeError, match="stop here"):
        main(["demo", "--recipes", "one_step_ring", "--no-progress", "--out", str(tmp_path / "o")])
    assert calls and calls[0]["divergences"] == ("reverse_kl",) and calls[0]["forms"] == ("fdistill", "uni_instruct")
