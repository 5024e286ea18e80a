"""Compile-only check of the Triton kernels for sm_80 and sm_90: no GPU needed.

The interpreter (TRITON_INTERPRET=1), which the CPU tests run the kernels under, executes the kernels' Python
with numpy: it does not lower them, so it cannot catch what only the compiler sees (types that do not unify
across a loop, an op with no lowering, register spills). This script drives each launcher in ``mmfast.triton``
on CPU tensors over a set of cases that reaches every kernel and every code path its launch parameters select
(each mix and divergence, rows in one block, streamed, split across programs and packed, fp32 / bf16 / fp64),
records the launches instead of running them, and compiles each distinct specialisation to a cubin with
Triton's own toolchain for each target. It prints one row per specialisation and target: registers, spill
stores and loads (ptxas -v on the PTX, as Triton's build runs it), shared memory, and the warps resident per SM
that those allow (of 64: what a memory-bound kernel has to hide its latency with).

Specialisations launched with L2 eviction hints (EVICT=evict_first) must show them in their PTX.
Exit status: 0 when everything compiles without spills, 1 on a compile error (or hints lost), 2 when a kernel
spills more than --max-spill bytes per thread (default 32: ptxas trades a few bytes of spill for one more
program per SM on its own, settling at 128 or 80 registers under a cap of 255). float64 specialisations are
only reported: they exist for verification, at a fraction of the GPU's float32 rate.
Usage: python scripts/triton_compile_check.py [--archs 80,90] [--jobs N] [--only NAME] [--max-spill B] [--list]
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be JITFunctions, not interpreted ones
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default (and 3.9's warning otherwise)

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import importlib  # noqa: E402
import inspect  # noqa: E402
import pkgutil  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction, mangle_type  # noqa: E402

import mmfast.triton  # noqa: E402

# every module of mmfast.triton: a kernel no case launches fails the check
KERNEL_MODULES = tuple(f"mmfast.triton.{m.name}" for m in pkgutil.iter_modules(mmfast.triton.__path__))
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


@dataclass(frozen=True)
class Spec:
    """One kernel specialisation: what Triton's JIT would compile for a launch."""

    module: str
    kernel: str
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, object], ...]
    options: tuple[tuple[str, int], ...]

    def label(self) -> str:
        shown = ",".join(f"{k}={_short(v)}" for k, v in self.constexprs if k.isupper())
        dtypes = sorted({t for _, t in self.signature if t.startswith("*") and t not in ("*i64", "*u1", "*u8", "*i32")})
        warps = dict(self.options).get("num_warps", 4)
        return f"{self.kernel}[{'/'.join(dtypes)} w{warps}] {shown}"


def _short(value) -> str:
    if isinstance(value, bool):
        return str(int(value))
    text = str(value)
    return text.replace("triton.language.", "").replace("fp32", "f32")


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the launch instead of running it."""

    def __init__(self, module: str, name: str, kernel: JITFunction, sink: list):
        self.module, self.name, self.kernel, self.sink = module, name, kernel, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append(_spec(self.module, self.name, self.kernel, args, kwargs))

        return launch


def _spec(module: str, name: str, kernel: JITFunction, args, kwargs) -> Spec:
    options = {k: kwargs.pop(k) for k in LAUNCH_OPTIONS if k in kwargs}
    bound = inspect.signature(kernel.fn).bind(*args, **kwargs)
    bound.apply_defaults()
    signature, constexprs = [], []
    for param, (arg_name, value) in zip(kernel.params, bound.arguments.items(), strict=True):
        kind = "constexpr" if param.is_constexpr else mangle_type(value, True)
        signature.append((arg_name, kind))
        if kind == "constexpr":  # declared constexpr, or an int equal to 1 / None, as the JIT specialises them
            constexprs.append((arg_name, value))
    return Spec(module, name, tuple(signature), tuple(constexprs), tuple(sorted(options.items())))


def _kernels(module) -> dict[str, JITFunction]:
    return {n: f for n, f in vars(module).items() if isinstance(f, JITFunction) and n.endswith("_kernel")}


def record(cases) -> list[Spec]:
    """Run every case with each module's kernels replaced by recorders; the distinct specialisations, in order."""
    sink: list[Spec] = []
    saved = []
    for mod_name in KERNEL_MODULES:
        module = importlib.import_module(mod_name)
        for name, kernel in _kernels(module).items():
            saved.append((module, name, kernel))
            setattr(module, name, _Recorder(mod_name, name, kernel, sink))
    try:
        with torch.no_grad():
            for case in cases:
                case()
    finally:
        for module, name, kernel in saved:
            setattr(module, name, kernel)
    return list(dict.fromkeys(sink))


# ---- the cases ------------------------------------------------------------------------------------------


def _t(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype)  # never read: only the launch parameters matter


def cases() -> list:
    """Launcher calls that together select every kernel and code path (CPU tensors; nothing is computed)."""
    from mmfast.triton import (
        fake_score,
        fdistill,
        grad_scaling,
        masked_reconstruction,
        mutual_kd,
        routed_kd,
        uni_instruct,
    )

    out = []

    def routed(B, C, S, E, K, mix, div, sparse=False, masked=False, grads=(True, True, True), dtype=torch.float32):
        def run():
            x, z, w = _t(B, C, S, dtype=dtype), _t(E, B, C, S, dtype=dtype), torch.rand(B, K).to(dtype)
            idx = torch.randint(0, E, (B, K)) if sparse else None
            mask = torch.rand(B, S) > 0.3 if masked else None
            routed_kd.routed_kd_rows(x, z, w, idx, mask, 2.0, mix, div, 0.5, 4.0, *grads)

        out.append(run)

    for mix in range(3):
        for div in range(4):
            routed(256, 8192, 1, 4, 4, mix, div)  # streamed rows, every gradient
            routed(256, 8192, 1, 4, 4, mix, div, dtype=torch.bfloat16)
            routed(4096, 32768, 1, 2, 2, mix, div)  # two teachers
            routed(256, 32768, 1, 4, 1, mix, div, sparse=True)  # top-1 routing: one slot
            routed(256, 32768, 1, 8, 8, mix, div)  # eight teachers
        routed(256, 1000, 1, 4, 2, mix, mix, sparse=True, masked=True)  # one block per row, sparse routing
        routed(64, 10, 1, 4, 4, mix, 3 - mix)  # many rows per program
        routed(4, 20, 64, 3, 3, mix, 2, masked=True)  # dense logits: pixels per program
        routed(256, 8192, 1, 4, 4, mix, 0, grads=(True, False, False), dtype=torch.bfloat16)  # the common case
        for div, grads in ((0, (True, True, True)), (1, (True, True, True)), (2, (False, False, True))):
            routed(1, 262144, 1, 2, 2, mix, (div + mix) % 4, grads=grads)  # a few long rows: split, 3 phases
    routed(3, 5000, 1, 3, 3, 2, 2, dtype=torch.float64)

    def mutual(M, N, C, grad=True, dtype=torch.float32):
        out.append(lambda: mutual_kd.mutual_kd_rows(_t(M, N, C, dtype=dtype), 2.0, 4.0, grad))

    mutual(3, 256, 1000)
    mutual(3, 256, 8192)
    mutual(3, 256, 8192, dtype=torch.bfloat16)
    mutual(3, 1, 262144)  # split
    mutual(2, 64, 10, grad=False)

    # (B, D): one block per row, streamed, split (few long rows), packed rows
    score_shapes = ((256, 12288), (32, 65536), (1, 65536), (64, 100))
    for B, D in score_shapes:
        for dtype in (torch.float32, torch.bfloat16):
            out.append(lambda B=B, D=D, dtype=dtype: fdistill.fdistill_rows(
                _t(B, D, dtype=dtype), _t(B, D, dtype=dtype), _t(B, D, dtype=dtype), torch.rand(B), 0.5, True))
            out.append(lambda B=B, D=D, dtype=dtype: fake_score.fake_score_rows(
                _t(B, D, dtype=dtype), _t(B, D, dtype=dtype), torch.rand(B), 0.5, True))
        for fgm, di, batch_norm in ((False, True, False), (True, True, False), (True, False, False),
                                    (False, True, True)):
            out.append(lambda B=B, D=D, fgm=fgm, di=di, bn=batch_norm: uni_instruct.uni_instruct_rows(
                _t(B, D), _t(B, D), _t(B, D), torch.rand(B, 3), torch.rand(B) if bn else None, 1.0, 0.5, fgm, di,
                True, True, True))
    out.append(lambda: uni_instruct.uni_instruct_rows(
        *(_t(32, 65536, dtype=torch.bfloat16) for _ in range(3)), torch.rand(32, 3), None, 0.5, 0.5, True, True,
        True, False, False))

    def recon(A, D, S, loss, mask_kind, normalize=False, per_element=False, grads=(True, True, True),
              dtype=torch.float32):
        def run():
            pred, target = _t(A, D, S, dtype=dtype), _t(A, D, S, dtype=dtype)
            rows = torch.rand(A * S) if mask_kind.startswith("rows") else None
            elem = {"elements": torch.rand(A, D, S) > 0.5, "channels": torch.rand(1, D, 1).expand(A, D, S)}
            masked_reconstruction.masked_reconstruction_rows(
                pred, target, rows, elem.get(mask_kind.removeprefix("rows+")), loss, 1.0, normalize, 1e-6,
                per_element, *grads)

        out.append(run)

    for loss in range(3):
        for mask_kind in ("none", "rows", "elements", "channels"):
            recon(8192, 1024, 1, loss, mask_kind, normalize=loss == 0)
        recon(64, 10000, 1, loss, "rows")  # streamed rows
        recon(4, 16, 49, loss, "elements")  # channel_dim=1 layout
    recon(8192, 1024, 1, 0, "elements", per_element=True, grads=(True, False, False))
    recon(8192, 1024, 1, 1, "rows+elements", grads=(True, True, False))  # a prescaled mean: row weights beside
    recon(8192, 1024, 1, 1, "rows", dtype=torch.bfloat16)

    for layout in ((1, 256, 8192, 1), (2, 8, 1024, 16)):
        repeat, rows, D, Q = layout
        out.append(lambda layout=layout, rows=rows, Q=Q: grad_scaling.scale_unless_one_(
            torch.zeros(*layout), torch.ones(rows * Q), layout))
    return out


# ---- compiling ------------------------------------------------------------------------------------------


PTXAS_LINE = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads.*?Used (\d+) registers", re.S
)


def compile_spec(spec: Spec, arch: int) -> dict:
    """Compile one specialisation for sm_<arch>: registers, spills, shared memory, or the compiler's error."""
    from triton.backends.nvidia.compiler import get_ptxas

    kernel = _kernels(importlib.import_module(spec.module))[spec.kernel]
    names = [name for name, _ in spec.signature]
    constexprs = {(names.index(k),): v for k, v in spec.constexprs}
    start = time.perf_counter()
    try:
        compiled = triton.compile(
            ASTSource(kernel, dict(spec.signature), constexprs=constexprs),
            target=GPUTarget("cuda", arch, 32),
            options=dict(spec.options),
        )
    except Exception as e:  # noqa: BLE001 (reported, and the exit status says so)
        return dict(error=f"{type(e).__name__}: {e}".strip()[-2000:])
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        log = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", ptx, "-o", os.devnull],
                             capture_output=True, text=True)
    found = PTXAS_LINE.search(log.stdout + log.stderr)
    if log.returncode != 0 or found is None:
        return dict(error=f"ptxas: {(log.stdout + log.stderr).strip()[-2000:]}")
    stack, spill_st, spill_ld, regs = (int(g) for g in found.groups())
    hinted = sum("evict_first" in line for line in compiled.asm["ptx"].splitlines() if ".global" in line)
    return dict(regs=regs, spill_stores=spill_st, spill_loads=spill_ld, stack=stack,
                smem=compiled.metadata.shared, evict_first_accesses=hinted, seconds=time.perf_counter() - start)


# per-SM limits of sm_80 and sm_90 (A100, H100/H200): registers, resident warps, resident blocks, shared memory
SM_LIMITS = {80: (65536, 64, 32, 164 * 1024), 90: (65536, 64, 32, 228 * 1024)}


def resident_warps(arch: int, regs: int, warps: int, smem: int) -> int:
    """Warps of this kernel resident on one SM (the occupancy its registers, warps and shared memory allow;
    registers are allocated per warp in units of 256)."""
    reg_file, max_warps, max_blocks, max_smem = SM_LIMITS.get(arch, SM_LIMITS[90])
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    blocks = min(reg_file // (per_warp * warps), max_warps // warps, max_blocks)
    if smem:
        blocks = min(blocks, max_smem // smem)
    return blocks * warps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="80,90", help="comma-separated compute capabilities (default 80,90)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: all cores)")
    ap.add_argument("--only", default="", help="only the kernels whose name contains this text")
    ap.add_argument("--max-spill", type=int, default=32, help="spill bytes per thread tolerated (default 32)")
    ap.add_argument("--list", action="store_true", help="list the specialisations, compile nothing")
    args = ap.parse_args()
    archs = [int(a) for a in args.archs.split(",") if a.strip()]

    start = time.perf_counter()
    specs = [s for s in record(cases()) if args.only in s.kernel]
    kernels = sorted({(s.module, s.kernel) for s in specs})
    missing = sorted({(m, n) for m in KERNEL_MODULES for n in _kernels(importlib.import_module(m))} - set(kernels))
    print(f"triton {triton.__version__}: {len(specs)} specialisations of {len(kernels)} kernels, "
          f"targets {', '.join(f'sm_{a}' for a in archs)}")
    if missing and not args.only:
        print("no case launches: " + ", ".join(f"{m}.{n}" for m, n in missing), file=sys.stderr)
        return 1
    if args.list:
        for s in specs:
            print(s.label())
        return 0

    jobs = [(s, a) for s in specs for a in archs]
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        results = list(pool.map(compile_spec, *zip(*jobs, strict=True)))

    errors = spills = 0
    print("| kernel specialisation | arch | regs | spill st/ld B | stack B | smem B | warps/SM |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (spec, arch), res in zip(jobs, results, strict=True):
        if "error" in res:
            errors += 1
            print(f"| {spec.label()} | sm_{arch} | compile error | | | | |")
            print(f"compile error in {spec.module}.{spec.kernel} (sm_{arch}):\n{res['error']}", file=sys.stderr)
            continue
        if dict(spec.constexprs).get("EVICT") == "evict_first" and res["evict_first_accesses"] == 0:
            # the launcher asked for L2 evict-first hints (mmfast.triton.routed_kd.STREAM_L2_HINTS): a lowering
            # that drops them must not pass unnoticed
            errors += 1
            print(f"{spec.module}.{spec.kernel} (sm_{arch}): EVICT=evict_first, but no global load or store in "
                  "the PTX carries the hint", file=sys.stderr)
        spilled = res["spill_stores"] > 0 or res["spill_loads"] > 0
        allowed = res["spill_stores"] <= args.max_spill or any(kind == "*fp64" for _, kind in spec.signature)
        spills += spilled and not allowed
        note = (" (tolerated)" if allowed else " SPILLS") if spilled else ""
        warps = resident_warps(arch, res["regs"], dict(spec.options).get("num_warps", 4), res["smem"])
        print(f"| {spec.label()} | sm_{arch} | {res['regs']} | {res['spill_stores']}/{res['spill_loads']}{note}"
              f" | {res['stack']} | {res['smem']} | {warps} |")
    took = time.perf_counter() - start
    print(f"{len(jobs)} compiles in {took:.0f} s: {errors} errors, {spills} spilling more than tolerated")
    return 1 if errors else (2 if spills else 0)


if __name__ == "__main__":
    sys.exit(main())
