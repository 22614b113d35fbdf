"""The numba CPU backends of layer_norm and bias_gelu leave a parameter's storage resizable.

Tensor.numpy() marks a storage non-resizable for good; FSDP2 frees each unsharded parameter
after the forward by resizing its storage to 0, so a numpy *view* of a weight passed to a
kernel made 2-process FSDP2 training on the CPU fail ("Trying to resize storage that is not
resizable", tests/test_rm_train_dist.py). Small per-channel vectors are copied instead."""

from __future__ import annotations

import pytest
import torch

import xray_ops as xo


def _resizable(p: torch.Tensor) -> bool:
    try:
        p.untyped_storage().resize_(0)
        return True
    except RuntimeError:
        return False


@pytest.mark.parametrize("op", ["layer_norm", "bias_gelu"])
def test_cpu_kernels_keep_parameters_resizable(op):
    torch.manual_seed(0)
    C = 7
    w, b, g = (torch.nn.Parameter(torch.randn(C)) for _ in range(3))
    x = torch.randn(5, C, requires_grad=True)
    r = torch.randn(5, C, requires_grad=True)
    with xo.backend("cpu"):
        if op == "layer_norm":
            y, s = xo.layer_norm(x, w, b, 1e-6, residual=r, residual_scale=g)
            (y.sum() + s.sum()).backward()
        else:
            xo.bias_gelu(x, b).sum().backward()
    assert xo.last_backend(op) == "cpu" and xo.last_backend(op + ".backward") == "cpu"
    assert b.grad is not None and torch.isfinite(b.grad).all()
    for p in ((w, b, g) if op == "layer_norm" else (b,)):
        assert _resizable(p)
