"""No CUDA kernel of the built extension spills registers (csrc/, every arch it was built for).

Reads the compiled binary with cuobjdump (tools/cuda_resource_check.py), so it runs on a
machine without a GPU, right after make test's build. Skipped only where there is nothing to
read: no extension built (no nvcc / XRAY_OPS_SKIP_CUDA_BUILD=1) or no cuobjdump.
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "cuda_resource_check.py")


def test_no_cuda_kernel_spills():
    res = subprocess.run([sys.executable, TOOL], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    if res.returncode == 2:
        import pytest

        pytest.skip(res.stderr.strip())
    # the tool names every kernel with a stack frame (spills) and exits 1
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
    assert " 0 with a stack frame" in res.stdout, res.stdout[-2000:]
