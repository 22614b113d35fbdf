"""Parametrization helpers: which (device, backend) pairs and dtypes each test runs on.

On a CPU-only machine: torch, cpu (numba) and triton (under TRITON_INTERPRET=1) on CPU tensors,
in float32 and float16 (the interpreter's bfloat16 dot is broken). With a GPU: torch, triton and
cuda on CUDA tensors, bfloat16 included; those params carry the `gpu` marker.
"""

import pytest
import torch

CPU_BACKENDS = ("torch", "cpu", "triton")
GPU_BACKENDS = ("torch", "triton", "cuda")
CPU_DTYPES = (torch.float32, torch.float16)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def device_backends(cpu=CPU_BACKENDS, gpu=GPU_BACKENDS):
    """pytest params of (device, backend)."""
    params = [pytest.param("cpu", b, id=f"cpu-{b}") for b in cpu]
    params += [pytest.param("cuda", b, id=f"cuda-{b}", marks=pytest.mark.gpu) for b in gpu]
    return params


def device_backend_dtypes(cpu=CPU_BACKENDS, gpu=GPU_BACKENDS, cpu_dtypes=CPU_DTYPES,
                          gpu_dtypes=GPU_DTYPES, skip=()):
    """pytest params of (device, backend, dtype); `skip` holds (backend, dtype) pairs a backend
    does not implement (the dispatcher's own reasons are tested separately)."""
    params = []
    for dev, backends, dtypes in (("cpu", cpu, cpu_dtypes), ("cuda", gpu, gpu_dtypes)):
        for b in backends:
            for d in dtypes:
                if (b, d) in skip:
                    continue
                name = f"{dev}-{b}-{str(d).replace('torch.', '')}"
                marks = [pytest.mark.gpu] if dev == "cuda" else []
                params.append(pytest.param(dev, b, d, id=name, marks=marks))
    return params
