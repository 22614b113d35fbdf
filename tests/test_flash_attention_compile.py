"""The Triton attention kernels compile for the GPU (sm_90, ahead of time, no GPU needed).

The interpreter runs the kernels' Python; only a real compile catches Triton type errors in
GPU code paths, ptxas failures and shared-memory overruns. The full matrix (every head dim,
dtype, tile config, sm_80 and sm_90): ``python tools/triton_aot_check.py``.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "triton_aot_check.py"),
                          "--quick", "--arch", "90", "--dtypes", "fp16"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    lines = res.stdout.strip().splitlines()
    assert res.returncode == 0, "\n".join(lines[-20:]) + res.stderr[-2000:]
    assert lines and lines[-1].endswith(" 0 failures"), lines[-5:]
    assert not any(l.startswith("SMEM") for l in lines), [l for l in lines if "SMEM" in l]
