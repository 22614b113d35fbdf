"""Registers, spills and shared memory of every CUDA kernel in the built extension.

    python tools/cuda_resource_check.py [xray_ops/_C*.so]

Reads the binary (no recompilation): ``cuobjdump --dump-resource-usage`` lists, per arch and
kernel, registers (REG), the stack frame (STACK: spilled registers, or a local array indexed
at run time), local memory (LOCAL) and static shared memory (SHARED). Exits 1 naming every
kernel with a stack frame or local memory: each spilled value costs a round trip to L1/L2 per
use, in a kernel meant to stream at memory speed. tests/test_cuda_resources.py runs it after
make test's build.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class KernelUsage:
    arch: str
    name: str  # demangled when c++filt is available
    regs: int
    stack: int
    local: int
    shared: int

    @property
    def spills(self) -> bool:
        return self.stack > 0 or self.local > 0


def find_cuobjdump() -> str | None:
    """cuobjdump from PATH, CUDA_HOME, or the copy Triton ships."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    if os.path.exists(os.path.join(home, "bin", "cuobjdump")):
        return os.path.join(home, "bin", "cuobjdump")
    try:
        import triton.backends.nvidia as nv
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    return path if os.path.exists(path) else None


def built_extension() -> str | None:
    found = sorted(glob.glob(os.path.join(ROOT, "xray_ops", "_C*.so")))
    return found[0] if found else None


def _demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return names
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
    lines = out.stdout.splitlines()
    return lines if out.returncode == 0 and len(lines) == len(names) else names


_ARCH = re.compile(r"^arch = (\S+)")
_FUNC = re.compile(r"^\s*Function (\S+):")
_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def resource_usage(binary: str, cuobjdump: str) -> list[KernelUsage]:
    """One entry per (arch, kernel) in the binary's embedded cubins."""
    text = subprocess.run([cuobjdump, "--dump-resource-usage", binary], capture_output=True,
                          text=True, check=True).stdout
    arch, func, rows = "?", None, []
    for line in text.splitlines():
        if m := _ARCH.match(line):
            arch = m.group(1)
        elif m := _FUNC.match(line):
            func = m.group(1)
        elif func and (m := _RES.search(line)):
            regs, stack, shared, local = map(int, m.groups())
            rows.append(KernelUsage(arch, func, regs, stack, local, shared))
            func = None
    for row, name in zip(rows, _demangle([r.name for r in rows])):
        row.name = name
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("binary", nargs="?", default=None, help="default: xray_ops/_C*.so")
    p.add_argument("--all", action="store_true", help="print every kernel, not only spills")
    a = p.parse_args(argv)
    binary = a.binary or built_extension()
    if binary is None:
        print("no extension: build it first (make build)", file=sys.stderr)
        return 2
    tool = find_cuobjdump()
    if tool is None:
        print("cuobjdump not found (PATH, CUDA_HOME/bin, triton/backends/nvidia/bin)",
              file=sys.stderr)
        return 2
    rows = resource_usage(binary, tool)
    bad = [r for r in rows if r.spills]
    for r in (rows if a.all else bad):
        print(f"{'SPILL' if r.spills else 'ok':<6}{r.arch:<8}REG {r.regs:>3}  STACK {r.stack:>4}  "
              f"LOCAL {r.local:>4}  SHARED {r.shared:>6}  {r.name}")
    print(f"{len(rows)} kernels in {os.path.basename(binary)}, {len(bad)} with a stack frame "
          f"or local memory (spills)")
    return 1 if bad or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
