"""Backend table of ``layer_norm``: one implementation per backend, with its limits.

Dispatched inputs, 2-D (the op bodies flatten leading dims):
  forward   x (M, C), weight | None, bias | None, eps, residual (M, C) | None,
            residual_scale | None  ->  (y, s or empty, mean (M,), rstd (M,))
  backward  grad_y (M, C), grad_s (M, C) | None, x: the LayerNorm's input (s, or x itself
            without a residual) (M, C), branch: the forward's x when residual_scale is given
            (d residual_scale needs it), else None, weight | None, bias | None,
            residual_scale | None, mean, rstd  ->  (ds, dx or empty, dw, db, dg)
"""

from __future__ import annotations

import torch

from .. import _dispatch, _ext
from .._dispatch import FLOATS, GPU_FLOATS, cuda_extension, lazy
from ..reference import layer_norm as ref

OP = "layer_norm"
# the Triton kernels hold a whole row in registers (kernels/layer_norm.py MAX_C)
TRITON_MAX_C = 8192


def _row_limit(limit: int, kernel: str):
    def check(inputs) -> list[str]:
        C = inputs.x.shape[-1]
        return [f"C={C} exceeds the {kernel} kernel's row limit {limit}"] if C > limit else []
    return check


_dispatch.declare(OP, forward=("x", "weight", "bias", "eps", "residual", "residual_scale"),
                  backward=("grad_y", "grad_s", "x", "branch", "weight", "bias",
                            "residual_scale", "mean", "rstd"),
                  key="x", priority=("cuda", "triton", "cpu", "torch"))
_dispatch.register(OP, "torch", forward=ref.layer_norm_forward, backward=ref.layer_norm_backward,
                   dtypes=FLOATS)
_KERNEL = "xray_ops.kernels.layer_norm"
_triton_limit = _row_limit(TRITON_MAX_C, "Triton")
_dispatch.register(OP, "triton", forward=lazy(_KERNEL, "layer_norm_forward"),
                   backward=lazy(_KERNEL, "layer_norm_backward"), dtypes=GPU_FLOATS,
                   forward_check=_triton_limit, backward_check=_triton_limit)
# ----------------------------------------------------------------------------------------------
# the CUDA kernels take rows with unit stride along C and float32 parameter vectors
# ----------------------------------------------------------------------------------------------
def _unit(t):
    return t if t is None or t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _f32(t):
    return None if t is None else t.to(torch.float32).contiguous()


def _packed(t) -> bool:
    """Rows the CUDA kernel reads in 16-byte packs (csrc/layer_norm row_shape): an aligned start
    and a row stride of whole packs (C itself a multiple of the pack: checked by the caller)."""
    full = 16 // t.element_size()
    return t.data_ptr() % 16 == 0 and (t.shape[0] <= 1 or t.stride(0) % full == 0)


def _cuda_rows(t, C: int):
    """Unit stride along C; rows wider than the kernel's unpacked limit also in 16-byte packs
    (a copy of a misaligned view: the unpacked kernel would spill there)."""
    t = _unit(t)
    if t is not None and C > CUDA_UNPACKED_MAX_C and not _packed(t):
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def _cuda_forward(x, weight, bias, eps, residual, residual_scale):
    C = x.shape[-1]
    return tuple(_ext.get().layer_norm_forward(_cuda_rows(x, C), _f32(weight), _f32(bias), eps,
                                               _cuda_rows(residual, C), _f32(residual_scale)))


def _cuda_backward(grad_y, grad_s, x, branch, weight, bias, residual_scale, mean, rstd):
    ds, dx, dw, db, dg = _ext.get().layer_norm_backward(
        _unit(grad_y), _unit(grad_s), _unit(x), _unit(branch), _f32(weight), bias is not None,
        _f32(residual_scale), mean.contiguous(), rstd.contiguous())
    cast = [p.dtype if p is not None else None for p in (weight, bias, residual_scale)]
    dw, db, dg = (g.to(c) if c is not None else g for g, c in zip((dw, db, dg), cast))
    return ds, dx, dw, db, dg


# csrc/layer_norm/layer_norm.cu kMaxRow, kBwdMaxRow, kUnalignedMaxRow: wider backward rows go
# to Triton's chunked kernel (the CUDA one keeps the row in registers and would spill), and so do
# forward rows wider than 4096 whose C is not a multiple of a 16-byte pack
CUDA_MAX_C, CUDA_BWD_MAX_C, CUDA_UNPACKED_MAX_C = 8192, 4096, 4096


def _cuda_forward_check(inputs) -> list[str]:
    reasons = _row_limit(CUDA_MAX_C, "CUDA")(inputs)
    C, full = inputs.x.shape[-1], 16 // inputs.x.element_size()
    if not reasons and C > CUDA_UNPACKED_MAX_C and C % full:
        reasons.append(f"C={C} is not a multiple of {full} (16-byte packs): the CUDA kernel's "
                       f"row limit is {CUDA_UNPACKED_MAX_C} then")
    return reasons


_dispatch.register(OP, "cuda", forward=_cuda_forward, backward=_cuda_backward, dtypes=GPU_FLOATS,
                   runtime=cuda_extension("layer_norm_forward"),
                   forward_check=_cuda_forward_check,
                   backward_check=_row_limit(CUDA_BWD_MAX_C, "CUDA backward"))

_CPU = "xray_ops.cpu.layer_norm"
_dispatch.register(OP, "cpu", forward=lazy(_CPU, "layer_norm_forward"),
                   backward=lazy(_CPU, "layer_norm_backward"), dtypes=(torch.float32,))
