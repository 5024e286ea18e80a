"""scripts/build_times.py: the package build's compile times from Ninja's log (printed by .ci/run)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build_times.py"

LOG = """# ninja log v7
1\t8\t0\tCMakeFiles/cmake.verify_globs\tdeadbeef
9\t3171\t0\tCMakeFiles/_C.dir/csrc/cpu/fdistill.cpp.o\tdeadbeef
9\t90000\t0\tCMakeFiles/_C_routed_kd_dtype0.dir/csrc/cpu/routed_kd.cpp.o\tdeadbeef
90000\t91000\t0\t_C.cpython-311-x86_64-linux-gnu.so\tdeadbeef
5\t2005\t0\tCMakeFiles/_C_routed_kd_dtype0.dir/csrc/cpu/routed_kd.cpp.o\tdeadbeef
"""


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_newest_entry_of_each_object_sorted_slowest_first(tmp_path):
    (tmp_path / ".ninja_log").write_text(LOG)
    result = run(str(tmp_path), "--top", "5")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # two objects (the module and the glob check are not objects); the rebuilt one counts its newest entry, 2 s
    assert "2 objects, 5 s of compiles summed, last done at 91 s" in lines[0]
    assert lines[1].split() == ["3.2", "s", "CMakeFiles/_C.dir/csrc/cpu/fdistill.cpp.o"]
    assert lines[2].split() == ["2.0", "s", "CMakeFiles/_C_routed_kd_dtype0.dir/csrc/cpu/routed_kd.cpp.o"]
    assert len(lines) == 3


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "no ninja log"), ("not a log\n", "is not a ninja log"), ("# ninja log v7\n", "no objects")],
)
def test_bad_logs_are_named(tmp_path, content, message):
    log = tmp_path / ".ninja_log"
    if content is not None:
        log.write_text(content)
    result = run(str(log))
    assert result.returncode != 0
    assert message in result.stderr
