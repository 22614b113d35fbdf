"""Peak extra memory of one contrastive-loss step (forward + backward), no timings:
``python -m bench contrastive_memory``.

For each implementation (open_clip's ClipLoss, xray_ops' backends that can take the inputs) and
batch size: the memory the step needs beyond its inputs. On the GPU: torch.cuda's peak
allocation above what was allocated before the step. On the CPU: the growth of the peak
resident set (ru_maxrss) of a fresh subprocess over the step, after a warm-up at a small batch
(library loading and JIT compiles are not counted). An implementation that runs out of memory
is reported as "OOM". Appends to bench/results/contrastive_memory.csv.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import subprocess
import sys

import torch

from .. import harness

REPORT_ONLY = True
COLUMNS = ["impl", "B", "C", "dtype", "peak_mb", "device", "torch", "commit", "date"]
SHAPES = {"cpu": [(1024, 512), (4096, 512)], "cuda": [(16384, 1024), (65536, 1024)]}
QUICK = {"cpu": [(4096, 512)], "cuda": [(65536, 1024)]}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CHILD = r"""
import json, resource, sys, torch
sys.path.insert(0, {root!r})
from bench.ops.contrastive_loss import clip_loss, make_inputs
import xray_ops as xo
impl, B, C = {impl!r}, {B}, {C}
def step(img, txt, s):
    if impl == "clip_loss":
        loss = clip_loss()(img, txt, s)
    else:
        with xo.backend(impl):
            loss = xo.contrastive_loss(img, txt, s)
    loss.backward()
step(*make_inputs(64, C, "cpu", torch.float32, seed=1))  # warm-up: imports, JIT
inputs = make_inputs(B, C, "cpu", torch.float32)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
step(*inputs)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"peak_mb": (after - before) / 1024}}))
"""


def _cpu_peak(impl: str, B: int, C: int) -> str:
    code = _CHILD.format(root=ROOT, impl=impl, B=B, C=C)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=1800)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["?"])[-1]
        return "OOM" if "memory" in tail.lower() else f"error: {tail[:120]}"
    return f"{json.loads(r.stdout.strip().splitlines()[-1])['peak_mb']:.1f}"


def _cuda_peak(impl: str, B: int, C: int, dtype) -> str:
    import xray_ops as xo

    from .contrastive_loss import clip_loss, make_inputs

    torch.cuda.empty_cache()
    try:
        img, txt, s = make_inputs(B, C, "cuda", dtype)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        if impl == "clip_loss":
            loss = clip_loss()(img, txt, s)
        else:
            with xo.backend(impl):
                loss = xo.contrastive_loss(img, txt, s)
        loss.backward()
        torch.cuda.synchronize()
        return f"{(torch.cuda.max_memory_allocated() - base) / 2**20:.1f}"
    except torch.cuda.OutOfMemoryError:
        return "OOM"
    finally:
        torch.cuda.empty_cache()


def run_report(device: str, quick: bool, write_csv: bool = True) -> list[dict]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    impls = ["clip_loss"] + (["triton"] if device == "cuda" else ["cpu"])
    rows = []
    for B, C in (QUICK if quick else SHAPES)[device]:
        for impl in impls:
            peak = _cuda_peak(impl, B, C, dtype) if device == "cuda" else _cpu_peak(impl, B, C)
            rows.append({"impl": impl, "B": B, "C": C, "dtype": str(dtype).replace("torch.", ""),
                         "peak_mb": peak})
            print(f"contrastive_memory {impl:<10} B={B:<6} C={C:<5} peak extra memory: "
                  f"{peak} MB", flush=True)
    if write_csv:
        meta = {"device": harness.device_name(device), "torch": torch.__version__,
                "commit": harness.commit(),
                "date": datetime.datetime.now(datetime.timezone.utc).strftime(
                    "%Y-%m-%dT%H:%M:%SZ")}
        os.makedirs(harness.RESULTS_DIR, exist_ok=True)
        path = os.path.join(harness.RESULTS_DIR, "contrastive_memory.csv")
        new = not os.path.exists(path)
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            if new:
                w.writeheader()
            for r in rows:
                w.writerow({**r, **meta})
    return rows
