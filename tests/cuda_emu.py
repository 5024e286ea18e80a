"""The CUDA kernels of csrc/cuda on the CPU: built with the host compiler over an emulation of the CUDA runtime
(csrc/cuda_emu/cuda_emu.h), so that the tests of the cuda backend run, against the reference, where there is no
GPU (a GPU runs the real kernels instead).

``build()`` translates every ``csrc/cuda/*.cu`` / ``*.cuh`` (the two constructs C++ has no spelling for: a
``kernel<<<grid, block, smem, stream>>>(args)`` launch and an ``extern __shared__`` array) and compiles them
with ``csrc/cuda/bindings.cpp`` and the emulation into the module ``_cuda_emu``, cached under
``build/cuda_emu/<hash of the sources and flags>``. ``emulate_cuda_backend(monkeypatch)`` routes ``mmfast._native``'s
"cuda" launches to it, on CPU tensors.

    python tests/cuda_emu.py        # build (or find) the module and print its path
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
CUDA_DIR = REPO / "csrc" / "cuda"
EMU_DIR = REPO / "csrc" / "cuda_emu"
INCLUDE_DIR = REPO / "csrc" / "include"

# `kernel<<<config>>>(args);` on one line (every launch in csrc/cuda is written so)
_LAUNCH = re.compile(r"^(?P<indent>\s*)(?P<kernel>\S.*?)<<<(?P<config>.+?)>>>\((?P<args>.*)\);(?P<tail>\s*(//.*)?)$")
_EXTERN_SMEM = re.compile(r"extern __shared__ __align__\(\d+\) unsigned char (\w+)\[\];")


def translate(source: str) -> str:
    """CUDA C++ -> C++ over cuda_emu.h: launches become ``mmfast_emu::Launch(config).run(kernel, args)``, the
    dynamic shared-memory array a pointer to the block's buffer. Raises on a launch it cannot rewrite."""
    out = []
    for number, line in enumerate(source.splitlines(), 1):
        if "<<<" in line and not line.lstrip().startswith("//"):
            m = _LAUNCH.match(line)
            if m is None:
                raise ValueError(f"line {number}: a kernel launch that is not `kernel<<<config>>>(args);`: {line}")
            args = m["args"].strip()
            line = (f"{m['indent']}::mmfast_emu::Launch({m['config']}).run({m['kernel']}{', ' + args if args else ''});"
                    f"{m['tail']}")
        line = _EXTERN_SMEM.sub(r"unsigned char* \1 = ::mmfast_emu::dynamic_smem();", line)
        out.append(line)
    return "\n".join(out) + "\n"


def _sources() -> list[Path]:
    return sorted([*CUDA_DIR.glob("*.cu"), *CUDA_DIR.glob("*.cuh"), CUDA_DIR / "bindings.cpp",
                   *EMU_DIR.glob("*"), *INCLUDE_DIR.rglob("*.h")])


# MMFAST_CUDA_EMU_SANITIZE=1: built with AddressSanitizer (run python with LD_PRELOAD=$(c++
# -print-file-name=libasan.so)): an access outside any tensor, by a kernel or its launcher, stops with a report
SANITIZE = os.environ.get("MMFAST_CUDA_EMU_SANITIZE", "0") == "1"


def _flags() -> list[str]:
    import pybind11

    sanitize = ["-fsanitize=address", "-fno-omit-frame-pointer", "-g1"] if SANITIZE else []
    # no contraction of a * b + c into one rounding: __fmul_rn and the kernels' explicit fmaf keep their meaning
    return ["-std=c++20", "-O1", "-fPIC", "-pthread", "-ffp-contract=off", "-Wno-unknown-pragmas", *sanitize,
            f"-I{EMU_DIR}", f"-I{INCLUDE_DIR}", f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]


def build(verbose: bool = False) -> Path:
    """The path of the ``_cuda_emu`` module built from the current sources (built when not cached)."""
    digest = hashlib.sha256("\0".join(_flags()).encode())  # the flags say whether it is sanitized
    for path in _sources():
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    out_dir = REPO / "build" / "cuda_emu" / digest.hexdigest()[:16]
    module = out_dir / f"_cuda_emu{suffix}"
    if module.exists():
        return module
    out_dir.mkdir(parents=True, exist_ok=True)
    # one build at a time: the other pytest-xdist workers wait for it rather than compile the same units
    with open(out_dir / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not module.exists():
            _build_into(module, verbose)
    return module


def _dtype_shards(source: str) -> list[int | None]:
    """The MMFAST_DTYPE_SHARD values a source is built with: -1 (its dispatch) and the DType code of each
    MMFAST_BUILDS_DTYPE(code) guard it has, or [None] (one object, no shards) when it has none."""
    codes = sorted({int(code) for code in re.findall(r"MMFAST_BUILDS_DTYPE\((\d+)\)", source)})
    return [-1, *codes] if codes else [None]


def _build_into(module: Path, verbose: bool) -> None:
    """Translates csrc/cuda, compiles it with the emulation (a unit per core at a time) and links ``module``."""
    out_dir = module.parent
    work = out_dir / f"work-{os.getpid()}"
    src = work / "src"
    src.mkdir(parents=True, exist_ok=True)
    units = []
    for path in [*CUDA_DIR.glob("*.cu*"), EMU_DIR / "selftest.cu"]:
        target = src / (path.stem + ".cpp" if path.suffix == ".cu" else path.name)
        target.write_text(translate(path.read_text()))
        if path.suffix == ".cu":
            units.append(target)
    units += [CUDA_DIR / "bindings.cpp", EMU_DIR / "runtime.cpp", EMU_DIR / "module.cpp"]
    # (unit, its dtype shard or None): a file built as dtype shards (csrc/include/mmfast/dtype_shards.h) compiles
    # as one object per shard, as CMakeLists.txt builds it: the dispatch (-1) and each MMFAST_BUILDS_DTYPE(code)
    jobs = [(unit, shard) for unit in units for shard in _dtype_shards(unit.read_text())]
    jobs.sort(key=lambda job: -job[0].stat().st_size)  # the longest compiles first: they bound the build
    cxx = os.environ.get("CXX", "c++")
    flags = [f"-I{src}", *_flags()]

    def compile_unit(job: tuple[Path, int | None]) -> Path:
        unit, shard = job
        stem = unit.stem + ("_emu" if unit.parent != src else "") + (f"_shard{shard}" if shard is not None else "")
        obj = work / (stem + ".o")
        shard_flag = [f"-DMMFAST_DTYPE_SHARD={shard}"] if shard is not None else []
        cmd = [cxx, *flags, *shard_flag, "-c", str(unit), "-o", str(obj)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"cuda_emu: compiling {unit.name} failed:\n{' '.join(cmd)}\n{proc.stderr[-6000:]}")
        if verbose:
            print(f"compiled {obj.stem}", file=sys.stderr)
        return obj

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        objects = list(pool.map(compile_unit, jobs))
    tmp = work / module.name
    link_flags = ["-fsanitize=address"] if SANITIZE else []
    proc = subprocess.run([cxx, "-shared", "-pthread", *link_flags, *map(str, objects), "-o", str(tmp)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"cuda_emu: linking failed:\n{proc.stderr[-6000:]}")
    tmp.replace(module)  # atomic: a process that does not take the lock finds a whole module or none
    shutil.rmtree(work)


def unavailable_reason() -> str | None:
    """Why the emulation cannot be built here (None when it can)."""
    from mmfast import _native

    if _native.load() is None:
        return f"mmfast._C is not built: {_native.load_error()}"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no host C++ compiler (c++ or $CXX)"
    try:
        import pybind11  # noqa: F401
    except ImportError:
        return "pybind11 is not installed"
    return None


_loaded: ModuleType | None = None


def load() -> ModuleType:
    """The ``_cuda_emu`` module (built on first use; ``mmfast._C`` imported first: it binds the parameter
    structs the emulated functions take)."""
    global _loaded
    if _loaded is None:
        import mmfast._C  # noqa: F401

        path = build()
        spec = importlib.util.spec_from_file_location("_cuda_emu", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _loaded = module
    return _loaded


class _NativeWithEmulatedCuda:
    """``mmfast._C`` plus the emulated ``*_cuda`` functions, as ``mmfast._native.load()`` returns it."""

    def __init__(self, native: ModuleType, emu: ModuleType):
        self._native, self._emu = native, emu

    def __getattr__(self, name: str):
        if name == "with_cuda":
            return True
        return getattr(self._emu if hasattr(self._emu, name) else self._native, name)


def emulate_cuda_backend(monkeypatch) -> ModuleType:
    """For the test: ``mmfast._native``'s "cuda" launches run on the emulation (CPU tensors, stream 0), and the
    ``cuda`` backend is available on CPU tensors, so that the public API dispatches to it there; returns the
    emulation module (``set_sm_count``)."""
    from mmfast import _backend, _native

    emu = load()
    availability = _backend._availability
    monkeypatch.setattr(_backend, "_availability",
                        lambda name, device_type: None if (name, device_type) == ("cuda", "cpu")
                        else availability(name, device_type))
    native = _native.load()
    cpu_run = _native._run

    def run(kernel: str, fn_name: str, params, device) -> None:
        if kernel != "cuda":
            cpu_run(kernel, fn_name, params, device)
            return
        assert device.type == "cpu", "the CUDA emulation runs on CPU tensors"
        getattr(emu, f"{fn_name}_cuda")(params, 0)

    monkeypatch.setattr(_native, "load", lambda: _NativeWithEmulatedCuda(native, emu))
    monkeypatch.setattr(_native, "_run", run)
    return emu


if __name__ == "__main__":
    print(build(verbose=True))
