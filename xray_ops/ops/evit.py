"""EViT token reorganization: validation, torch.library registration, autograd, backends.

Public: :func:`evit_select`, :func:`evit_keep_count`. The definition lives in
:mod:`xray_ops.reference.evit`; the kernels in ``xray_ops.kernels.evit_select`` (Triton),
``csrc/evit/`` (CUDA) and :mod:`xray_ops.cpu.evit_select` (numba).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .. import _dispatch, _validate
from .._dispatch import FLOATS, GPU_FLOATS, lazy
from ..reference import evit as ref

OP = "evit_select"
# A whole row of cls_attn is ranked in registers / shared memory.
MAX_PATCH_TOKENS = 8192


def evit_keep_count(n_patch_tokens: int, keep_rate: float) -> int:
    """Number of patch tokens EViT keeps: ``math.ceil(keep_rate * n_patch_tokens)``.

    n_patch_tokens >= 1, 0 < keep_rate <= 1 (the same formula as EViT's reference code).
    """
    n_patch_tokens = _validate.integer(n_patch_tokens, "n_patch_tokens", lo=1)
    keep_rate = _validate.number(keep_rate, "keep_rate", lo=0.0, hi=1.0, lo_open=True)
    return math.ceil(keep_rate * n_patch_tokens)


def evit_select(x: torch.Tensor, cls_attn: torch.Tensor, keep: int, *, fuse: bool = True):
    """Keep the ``keep`` patch tokens with the largest CLS attention; fuse the rest.

    Args:
        x: (B, N, C) float; token 0 is CLS, tokens 1..N-1 are patch tokens. Any strides.
        cls_attn: (B, N-1), same dtype and device as x: CLS attention to each patch token
            (mean over heads).
        keep: 1 <= keep <= N-1.
        fuse: append the fused token (EViT's "inattentive token fusion").

    Returns:
        x_out: (B, 1 + keep + fused, C) = [CLS, kept tokens in keep_idx order, fused token];
            fused = sum over dropped j of cls_attn[:, j] * x[:, 1 + j] (not renormalised),
            appended only when fuse and keep < N-1: with keep == N-1 nothing is dropped and
            x_out is (B, N, C), the tokens in keep_idx order (EViT itself then leaves x as is;
            :class:`xray_ops.nn.EViTSelect` does too).
        keep_idx: (B, keep) int64 indices into x[:, 1:], by descending cls_attn (ties: lower
            index first; NaN ranks first).

    Differentiable in x and cls_attn. Equivalent PyTorch::

        keep_idx = cls_attn.sort(1, descending=True, stable=True).indices[:, :keep]
        kept = x[:, 1:].gather(1, keep_idx[..., None].expand(-1, -1, C))
        drop = cls_attn.sort(1, descending=True, stable=True).indices[:, keep:]
        fused = (cls_attn.gather(1, drop)[..., None]
                 * x[:, 1:].gather(1, drop[..., None].expand(-1, -1, C))).sum(1, keepdim=True)
        x_out = torch.cat([x[:, :1], kept, fused], 1)   # [x[:, :1], kept] if keep == N-1
    """
    _validate.tensor(x, "x", ndim=3, floating=True)
    _validate.tensor(cls_attn, "cls_attn", ndim=2, floating=True)
    _validate.same_device("x", x, cls_attn=cls_attn)
    _validate.same_dtype("x", x, cls_attn=cls_attn)
    B, N, C = x.shape
    if N < 2:
        raise ValueError(f"x: expected at least 2 tokens (CLS + 1 patch token) in dim 1, "
                         f"got shape {tuple(x.shape)}")
    _validate.shape(cls_attn, "cls_attn", (B, N - 1), "(B, N-1) for x of shape (B, N, C)")
    keep = _validate.integer(keep, "keep", lo=1, hi=N - 1)
    _validate.boolean(fuse, "fuse")
    fuse = ref.appends_fused_token(N, keep, fuse)
    return torch.ops.xray_ops.evit_select(x, cls_attn, keep, fuse, _dispatch.requested_backend())


@dataclasses.dataclass(frozen=True)
class EViTConfig:
    """EViT settings for a model: ``EViTConfig(keep_rate=0.7, locations=(3, 6, 9), fuse=True)``.

    keep_rate: fraction of the patch tokens kept at each location, in (0, 1]
        (``evit_keep_count(N - 1, keep_rate)`` tokens).
    locations: indices of the blocks after whose attention tokens are reorganized
        (EViT's ViT-S/B default: 3, 6, 9); any iterable of distinct ints >= 0, kept sorted.
    fuse: append the fused token of the dropped ones (EViT's "inattentive token fusion").
    warmup_steps, shrink_steps: EViT's keep-rate schedule in training (1.0 for warmup_steps
        optimizer steps, then a cosine down to keep_rate over shrink_steps); evaluation always
        uses keep_rate. See :class:`xray_ops.nn.EViTSelect`.
    """

    keep_rate: float = 0.7
    locations: tuple = (3, 6, 9)
    fuse: bool = True
    warmup_steps: int = 0
    shrink_steps: int = 0

    def __post_init__(self):
        _validate.number(self.keep_rate, "keep_rate", lo=0.0, hi=1.0, lo_open=True)
        try:
            locs = tuple(self.locations)
        except TypeError:
            raise TypeError(f"locations: expected an iterable of ints, got "
                            f"{type(self.locations).__name__} ({self.locations!r})") from None
        locs = tuple(_validate.integer(v, f"locations[{i}]", lo=0) for i, v in enumerate(locs))
        if len(set(locs)) != len(locs):
            raise ValueError(f"locations: expected distinct block indices, got {locs}")
        object.__setattr__(self, "locations", tuple(sorted(locs)))
        _validate.boolean(self.fuse, "fuse")
        object.__setattr__(self, "warmup_steps",
                           _validate.integer(self.warmup_steps, "warmup_steps", lo=0))
        object.__setattr__(self, "shrink_steps",
                           _validate.integer(self.shrink_steps, "shrink_steps", lo=0))

    def check_depth(self, depth: int) -> None:
        """ValueError unless every location is a block index of a model with ``depth`` blocks."""
        depth = _validate.integer(depth, "depth", lo=1)
        bad = [i for i in self.locations if i >= depth]
        if bad:
            raise ValueError(f"locations: expected block indices in [0, {depth - 1}] for a model "
                             f"of depth {depth}, got {bad}")

    def make_select(self):
        """A fresh :class:`xray_ops.nn.EViTSelect` with these settings (one per location)."""
        from ..nn.evit import EViTSelect

        return EViTSelect(self.keep_rate, fuse=self.fuse, warmup_steps=self.warmup_steps,
                          shrink_steps=self.shrink_steps)


# ----------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("xray_ops::evit_select", mutates_args=())
def _evit_select_op(x: torch.Tensor, cls_attn: torch.Tensor, keep: int, fuse: bool,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    fuse = ref.appends_fused_token(x.shape[1], keep, fuse)
    return _dispatch.run(OP, backend, x=x, cls_attn=cls_attn, keep=keep, fuse=fuse)


@_evit_select_op.register_fake
def _(x, cls_attn, keep, fuse, backend):
    B, N, C = x.shape
    fused = ref.appends_fused_token(N, keep, fuse)
    return x.new_empty(B, 1 + keep + int(fused), C), x.new_empty(B, keep, dtype=torch.int64)


@torch.library.custom_op("xray_ops::evit_select_backward", mutates_args=())
def _evit_select_backward_op(grad_out: torch.Tensor, x: torch.Tensor, cls_attn: torch.Tensor,
                             keep: int, fuse: bool,
                             backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    fuse = ref.appends_fused_token(x.shape[1], keep, fuse)
    return _dispatch.run_backward(OP, backend, grad_out=grad_out, x=x, cls_attn=cls_attn,
                                  keep=keep, fuse=fuse)


@_evit_select_backward_op.register_fake
def _(grad_out, x, cls_attn, keep, fuse, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format), \
        torch.empty_like(cls_attn, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, cls_attn, keep, fuse, backend = inputs
    ctx.save_for_backward(x, cls_attn)
    ctx.keep, ctx.fuse, ctx.backend = keep, fuse, backend
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_out, _grad_idx):
    x, cls_attn = ctx.saved_tensors
    grad_x, grad_cls = _evit_select_backward_op(grad_out, x, cls_attn, ctx.keep, ctx.fuse,
                                                ctx.backend)
    return grad_x, grad_cls, None, None, None


_evit_select_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# backends
# ----------------------------------------------------------------------------------------------
def _row_limit(inputs) -> list[str]:
    # the kernels rank a whole row of cls_attn in registers / shared memory
    n = inputs.x.shape[1] - 1
    return [f"N-1={n} patch tokens exceeds the kernel's limit {MAX_PATCH_TOKENS}"] \
        if n > MAX_PATCH_TOKENS else []


_dispatch.declare(OP, forward=("x", "cls_attn", "keep", "fuse"),
                  backward=("grad_out", "x", "cls_attn", "keep", "fuse"), key="x",
                  priority=("cuda", "triton", "cpu", "torch"))
_dispatch.register(OP, "torch", forward=ref.evit_select, backward=ref.evit_select_backward,
                   dtypes=FLOATS)
_KERNEL = "xray_ops.kernels.evit_select"
_dispatch.register(OP, "triton", forward=lazy(_KERNEL, "evit_select_forward"),
                   backward=lazy(_KERNEL, "evit_select_backward"),
                   dtypes=FLOATS, forward_check=_row_limit, backward_check=_row_limit)
# plain CUDA (warp shuffles, 16-byte vector loads, 16-bit floats through float): Volta on
_dispatch.register(OP, "cuda", forward=lazy("xray_ops._C", "evit_select_forward"),
                   backward=lazy("xray_ops._C", "evit_select_backward"), dtypes=GPU_FLOATS,
                   min_compute_capability=(7, 0), forward_check=_row_limit,
                   backward_check=_row_limit)
_dispatch.register(OP, "cpu", forward=lazy("xray_ops.cpu.evit_select", "evit_select_forward"),
                   backward=lazy("xray_ops.cpu.evit_select", "evit_select_backward"),
                   dtypes=(torch.float32, torch.float64))
