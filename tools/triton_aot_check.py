"""Compile every Triton kernel as its launcher would launch it on an H200, without a GPU.

    python tools/triton_aot_check.py [--quick] [--arch 90[,80]] [--ops flash,int8] [--jobs N]

For every op and case of tools/aot_table.py, the launcher runs on ``meta`` tensors with its
launches recorded (tools/aot_compile.py); each launch is specialised as Triton specialises it
at run time and compiled for sm_<arch> with every config the launcher or its autotuner can
pick (autotuning on and off: XRAY_OPS_AUTOTUNE=1 and 0). One line per distinct compile:
registers, spills (stack frame / ptxas spill stores, bytes per thread) and shared memory.

It fails (exit 1) when a config that can run spills, needs more shared memory than a block
may have (227 KB on sm_90), exceeds a grid limit, or does not compile; and when a sweep of
lengths in aot_table.RETUNE_SWEEPS gives the autotuner more than one key (it would re-tune
on every new length). Exit 3 (and a SKIP line) where this Triton lacks the internals the
check uses. Runs without the interpreter: TRITON_INTERPRET is cleared here. The full table
takes about an hour of CPU (--jobs N divides it); --quick about one minute.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import multiprocessing
import os
import pkgutil
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))

try:  # the capture and the binder are Triton internals (3.4 - 3.8 checked)
    import aot_compile as ac  # noqa: E402

    _MISSING = None if hasattr(ac.JITFunction, "_pack_args") else "JITFunction._pack_args"
except ImportError as e:
    ac, _MISSING = None, str(e)
import aot_table  # noqa: E402


@dataclasses.dataclass
class Row:
    """One distinct compile and the first case that asked for it."""

    op: str
    case: dict
    kernel: str
    arch: int
    config: str
    source: str  # "autotune" (a candidate of the autotuner) or "launcher" (its fixed pick)
    spec: object  # aot_compile.Specialised
    count: int = 1
    res: object = None  # aot_compile.Resources


def case_label(case: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in case.items())


def config_label(kw: dict) -> str:
    blocks = " ".join(f"{k.removeprefix('BLOCK_')}={v}" for k, v in kw.items()
                      if k.startswith(("BLOCK_", "GROUP_")) and not k.startswith("BLOCK_D"))
    return f"{blocks} w{kw.get('num_warps', 4)} s{kw.get('num_stages', 3)}"


def _assume_smem_limit(arch: int) -> None:
    """Kernel modules that prune tiles by shared memory read DEFAULT_SMEM_LIMIT for tensors
    off the GPU (the meta tensors here): make it the target's."""
    import xray_ops.kernels as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        if hasattr(mod, "DEFAULT_SMEM_LIMIT"):
            mod.DEFAULT_SMEM_LIMIT = ac.SMEM_LIMIT[arch]


def launches_of(op: aot_table.Op, case: dict, arch: int = 90):
    """Every launch the op's launcher makes for the case on sm_<arch>, autotuning on and off."""
    out = []
    for autotune in ("1", "0"):
        old = os.environ.get("XRAY_OPS_AUTOTUNE")
        os.environ["XRAY_OPS_AUTOTUNE"] = autotune
        try:
            _assume_smem_limit(arch)
            with ac.capture() as launches:
                op.run(**case)
        finally:
            if old is None:
                os.environ.pop("XRAY_OPS_AUTOTUNE", None)
            else:
                os.environ["XRAY_OPS_AUTOTUNE"] = old
        out += launches
    return out


def plan(ops, quick: bool, archs):
    """(rows keyed by compile, failures found before compiling)."""
    rows: dict[str, Row] = {}
    failures = []
    for op, arch in ((op, arch) for op in ops for arch in archs):
        for case in (op.quick if quick else op.cases):
            try:
                launches = launches_of(op, case, arch)
            except Exception as e:  # noqa: BLE001 - a launcher that fails is a finding
                failures.append(f"FAIL {op.name} sm_{arch} {case_label(case)}: the launcher "
                                f"raised {type(e).__name__}: {e}")
                continue
            for launch in launches:
                for cfg, kw in launch.variants():
                    spec = ac.specialise(launch.kernel, launch.args, kw, arch)
                    grid = ac.grid_of(launch, spec)
                    label = config_label(kw)
                    if any(g > lim for g, lim in zip(grid, ac.GRID_LIMIT)):
                        failures.append(f"FAIL {op.name} {launch.kernel.__name__} "
                                        f"{case_label(case)} {label}: grid {grid} exceeds "
                                        f"the launch limits {ac.GRID_LIMIT}")
                    row = rows.get(spec.key)
                    if row is None:
                        rows[spec.key] = Row(op.name, case, launch.kernel.__name__, arch, label,
                                             "autotune" if launch.autotuned else "launcher",
                                             spec)
                    else:
                        row.count += 1
    return rows, failures


def retune_failures(sweeps):
    """A sweep of lengths must map to one autotuner key per kernel (else it re-tunes)."""
    failures = []
    for op, cases in sweeps:
        keys: dict[str, set] = {}
        for case in cases:
            for launch in launches_of(op, case):
                if launch.autotuned:
                    keys.setdefault(launch.kernel.__name__, set()).add(launch.tuning_key)
        for kernel, ks in sorted(keys.items()):
            if len(ks) > 1:
                failures.append(f"FAIL {op.name} {kernel}: {len(cases)} cases "
                                f"({case_label(cases[0])} ...) give {len(ks)} autotune keys: "
                                f"it re-tunes per length ({sorted(map(str, ks))[:4]} ...)")
    return failures


_ROWS: list[Row] = []


def _compile_row(i: int):
    return ac.compile_specialised(_ROWS[i].spec, _ROWS[i].arch)


def verdict(row: Row) -> str | None:
    r = row.res
    if r.error:
        return f"does not compile: {r.error}"
    if r.spill:
        return f"spills {r.spill} B per thread"
    if r.smem > ac.SMEM_LIMIT[row.arch]:
        return f"needs {r.smem} B of shared memory (> {ac.SMEM_LIMIT[row.arch]})"
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="make test's subset of the table")
    p.add_argument("--arch", default="90", help="comma-separated compute capabilities")
    p.add_argument("--ops", default=None,
                   help="comma-separated prefixes of op names (default: every op)")
    p.add_argument("--jobs", type=int, default=1, help="parallel compiles")
    p.add_argument("--failures-only", action="store_true", help="print failing rows only")
    a = p.parse_args(argv)
    if _MISSING:
        import triton

        print(f"SKIP: this Triton ({triton.__version__}) lacks what the check uses: {_MISSING}")
        return 3
    archs = [int(x) for x in a.arch.split(",")]
    ops = [op for op in aot_table.OPS
           if a.ops is None or any(op.name.startswith(x) for x in a.ops.split(","))]
    if not ops:
        p.error(f"--ops {a.ops} matches none of {[op.name for op in aot_table.OPS]}")
    t0 = time.time()
    rows, failures = plan(ops, a.quick, archs)
    sweeps = [(op, cases) for op in ops for name, cases in aot_table.RETUNE_SWEEPS
              if name == op.name]
    failures += retune_failures(sweeps)

    _ROWS[:] = rows.values()
    if a.jobs > 1:
        with multiprocessing.get_context("fork").Pool(a.jobs) as pool:
            results = pool.map(_compile_row, range(len(_ROWS)), chunksize=1)
    else:
        results = [_compile_row(i) for i in range(len(_ROWS))]
    for row, res in zip(_ROWS, results):
        row.res = res

    print(f"{'':5}{'op':<32}{'kernel':<30}{'case':<44}{'config':<26}{'src':<9}"
          f"{'regs':>5}{'spill':>7}{'smem KB':>9}{'s':>6}")
    for row in _ROWS:
        why = verdict(row)
        if why:
            failures.append(f"FAIL {row.op} {row.kernel} sm_{row.arch} {case_label(row.case)} "
                            f"{row.config}: {why}")
        if why or not a.failures_only:
            r = row.res
            more = f" (+{row.count - 1})" if row.count > 1 else ""
            print(f"{'FAIL' if why else 'ok':<5}{row.op:<32}{row.kernel:<30}"
                  f"{(case_label(row.case) + more)[:43]:<44}{row.config[:25]:<26}"
                  f"{row.source:<9}{r.regs:>5}{r.spill:>7}{r.smem / 1024:>9.1f}"
                  f"{r.seconds:>6.1f}", flush=True)
    for f in failures:
        print(f)
    print(f"{len(_ROWS)} compiles for sm_{','.join(map(str, archs))} in "
          f"{time.time() - t0:.0f} s, {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
