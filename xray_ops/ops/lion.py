"""The Lion update over many tensors at once: torch.library op and backend table.

:class:`xray_ops.optim.Lion` calls :func:`lion_step` once per parameter group. The op groups the
tensors into buckets of one device and one (param, grad, state) dtype combination (one kernel
launch each: the multi-tensor kernels take a table of pointers and sizes) and dispatches each
bucket; parameters that are not contiguous take the reference update (the kernels walk flat
memory).

Dispatched inputs of ``lion`` (no backward): params, grads, exp_avgs, lr, beta1, beta2,
weight_decay; the lists are :class:`TensorList` (whose ``device`` / ``dtype`` are those of the
params: the dispatcher's key). The definition: :mod:`xray_ops.reference.lion`.
"""

from __future__ import annotations

import torch

from .. import _dispatch
from .._dispatch import FLOATS, GPU_FLOATS, cuda_extension, lazy
from .._dtypes import name as dtype_name
from ..reference import lion as ref

OP = "lion"


class TensorList(list):
    """Tensors on one device in one dtype: ``device`` and ``dtype`` are the first one's."""

    @property
    def device(self) -> torch.device:
        return self[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self[0].dtype

    def __repr__(self) -> str:  # for BackendError's description of the inputs
        return f"TensorList({len(self)} tensors, {dtype_name(self.dtype)}, {self.device})"


def _buckets(params, grads, exp_avgs):
    out: dict[tuple, tuple[TensorList, TensorList, TensorList]] = {}
    for p, g, m in zip(params, grads, exp_avgs):
        key = (p.device, p.dtype, g.dtype, m.dtype)
        b = out.setdefault(key, (TensorList(), TensorList(), TensorList()))
        b[0].append(p)
        b[1].append(g)
        b[2].append(m)
    return list(out.values())


@torch.library.custom_op("xray_ops::lion_", mutates_args=("params", "exp_avgs"))
def _lion_op(params: list[torch.Tensor], grads: list[torch.Tensor],
             exp_avgs: list[torch.Tensor], lr: float, beta1: float, beta2: float,
             weight_decay: float, backend: str) -> None:
    flat_p, flat_g, flat_m = [], [], []
    for p, g, m in zip(params, grads, exp_avgs):
        if p.numel() == 0:
            continue
        if not (p.is_contiguous() and m.is_contiguous()):
            ref.lion_update_(p, g, m, lr, beta1, beta2, weight_decay)
            continue
        flat_p.append(p)
        flat_g.append(g.contiguous())  # a gradient is almost always contiguous already
        flat_m.append(m)
    for ps, gs, ms in _buckets(flat_p, flat_g, flat_m):
        _dispatch.run(OP, backend, params=ps, grads=gs, exp_avgs=ms, lr=lr, beta1=beta1,
                      beta2=beta2, weight_decay=weight_decay)


@_lion_op.register_fake
def _(params, grads, exp_avgs, lr, beta1, beta2, weight_decay, backend):
    return None


def lion_step(params, grads, exp_avgs, lr: float, beta1: float, beta2: float,
              weight_decay: float) -> None:
    """One Lion step of every (param, grad, exp_avg) triple, in place (see the module doc).

    params, grads, exp_avgs: equal-length lists of tensors, each triple of one shape and device;
    params float16 / bfloat16 / float32 / float64, grads in any float dtype, exp_avgs in the
    param's dtype, float32 or bfloat16. Validation is the caller's (:class:`xray_ops.optim.Lion`).
    """
    torch.ops.xray_ops.lion_(list(params), list(grads), list(exp_avgs), float(lr), float(beta1),
                             float(beta2), float(weight_decay), _dispatch.requested_backend())


# ----------------------------------------------------------------------------------------------
# backends
# ----------------------------------------------------------------------------------------------
def _state_dtypes(allowed, same_as_params=False):
    def check(inputs) -> list[str]:
        reasons = []
        for name in ("grads", "exp_avgs"):
            dt = getattr(inputs, name).dtype
            if same_as_params and dt != inputs.params.dtype:
                reasons.append(f"{name} dtype {dtype_name(dt)} differs from the params' "
                               f"{dtype_name(inputs.params.dtype)}")
            elif dt not in allowed:
                reasons.append(f"{name} dtype {dtype_name(dt)} not supported "
                               f"({', '.join(map(dtype_name, allowed))})")
        return reasons
    return check


_dispatch.declare(OP, forward=("params", "grads", "exp_avgs", "lr", "beta1", "beta2",
                               "weight_decay"),
                  key="params", priority=("cuda", "triton", "cpu", "torch"))
_dispatch.register(OP, "torch", forward=ref.lion_step, dtypes=FLOATS)
_dispatch.register(OP, "triton", forward=lazy("xray_ops.kernels.lion", "lion_step"),
                   dtypes=GPU_FLOATS, forward_check=_state_dtypes(GPU_FLOATS))
# CUDA: float32 / bfloat16 parameters with float32 or bfloat16 state (csrc/lion/lion.cu)
_FP32_BF16 = (torch.float32, torch.bfloat16)


def _cuda_check(inputs) -> list[str]:
    reasons = _state_dtypes(_FP32_BF16)(inputs)
    if inputs.grads.dtype != inputs.params.dtype:
        reasons.append(f"grads dtype {dtype_name(inputs.grads.dtype)} differs from the params' "
                       f"{dtype_name(inputs.params.dtype)}")
    return reasons


_dispatch.register(OP, "cuda", forward=lazy("xray_ops._C", "lion_step"), dtypes=_FP32_BF16,
                   runtime=cuda_extension("lion_step"), forward_check=_cuda_check)
_CPU_FLOATS = (torch.float32, torch.float64)
_dispatch.register(OP, "cpu", forward=lazy("xray_ops.cpu.lion", "lion_step"), dtypes=_CPU_FLOATS,
                   forward_check=_state_dtypes(_CPU_FLOATS, same_as_params=True))
