"""ToMe token merging: validation, torch.library registration, autograd, backends.

Public: :func:`tome_merge`, :func:`tome_match`, :func:`tome_unmerge`, :func:`tome_merge_source`,
:func:`tome_key_bias`, :class:`ToMeMatch`, :class:`ToMeConfig`. The definition lives in
:mod:`xray_ops.reference.tome`; the kernels in ``xray_ops.kernels.tome_match`` /
``xray_ops.kernels.tome_merge`` (Triton), ``csrc/tome/`` (CUDA) and :mod:`xray_ops.cpu.tome`
(numba).

Two ops, each dispatched on its own (``last_backend("tome_match")``,
``last_backend("tome_merge")``):
  xray_ops::tome_match  metric -> the matching as int64 tensors (no gradient);
  xray_ops::tome_merge  (x, size, matching) -> (x_out, size_out), differentiable in x and size;
                        its backward is a gather (each input token reads its output slot), so
                        no backend needs atomics.
The triton, cuda and cpu merges are gathers in a fixed order: two runs are bitwise equal. The
torch backend (the reference) uses scatter_add, which on CUDA accumulates with float atomics.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from .. import _dispatch, _validate
from .._dispatch import FLOATS, GPU_FLOATS, lazy
from ..reference import tome as ref

MATCH_OP = "tome_match"
MERGE_OP = "tome_merge"


class ToMeMatch(NamedTuple):
    """A ToMe matching of N tokens into N - r, as int64 tensors (B = batch).

    unm_idx:    (B, Na - r) A indices (token position // 2) of the A tokens that stay, in output
                order (ascending with class_token, by descending score without). Na = ceil(N/2).
    src_idx:    (B, r) A indices of the merged A tokens, by descending best score (ToMe's order).
    dst_idx:    (B, r) B index ((position - 1) // 2) of the B token each src_idx token joins.
    dest:       (B, N) output slot of every input token (what tome_unmerge gathers by).
    slot_src:   (B, N) input positions grouped by output slot: slot o holds
                slot_src[slot_start[o]:slot_start[o+1]], its own token first, then the A tokens
                merged into it by ascending position.
    slot_start: (B, N - r + 1) where each slot's group starts in slot_src.

    With r == 0 (nothing to merge) it is the identity: dest = arange(N), src_idx / dst_idx empty.
    """

    unm_idx: torch.Tensor
    src_idx: torch.Tensor
    dst_idx: torch.Tensor
    dest: torch.Tensor
    slot_src: torch.Tensor
    slot_start: torch.Tensor


# ----------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------
def _check_r(r) -> int:
    return _validate.integer(r, "r")  # anything operator.index takes (numpy ints too)


def _check_metric(metric, name="metric") -> None:
    _validate.tensor(metric, name, ndim=3, floating=True)
    if metric.shape[2] == 0:
        raise ValueError(f"{name}: expected at least 1 channel in dim 2, got shape "
                         f"{tuple(metric.shape)}")


def tome_match(metric: torch.Tensor, r: int, *, class_token: bool = True,
               distill_token: bool = False) -> ToMeMatch:
    """ToMe's bipartite soft matching of the tokens described by ``metric``.

    Args:
        metric: (B, N, Cm) float, any strides (ToMe uses the keys averaged over heads).
        r: tokens to remove; clamped to (N - protected) // 2, protected = class_token +
            distill_token; r <= 0 (negative too) gives the identity matching.
        class_token: token 0 is a CLS token: never merged, stays first.
        distill_token: token 1 is a distillation token, second in the output. Nothing merges
            into it, except where it is the only B token (N == 3 without class_token: every
            score is then -inf, and ToMe merges into it too).

    Returns:
        :class:`ToMeMatch` (int64 tensors on metric's device). No gradient.

    Equivalent PyTorch (ToMe's bipartite_soft_matching, stable order)::

        m = metric / metric.norm(dim=-1, keepdim=True)
        scores = m[:, ::2] @ m[:, 1::2].transpose(1, 2)     # (B, Na, Nb)
        scores[:, 0, :] = -inf  # class_token;   scores[:, :, 0] = -inf  # distill_token
        node_max, node_idx = scores.max(-1)
        order = node_max.sort(-1, descending=True, stable=True).indices
        src_idx, unm_idx = order[:, :r], order[:, r:]
        unm_idx = unm_idx.sort(-1).values                   # class_token
        dst_idx = node_idx.gather(1, src_idx)
    """
    _check_metric(metric)
    r = _check_r(r)
    _validate.boolean(class_token, "class_token")
    _validate.boolean(distill_token, "distill_token")
    B, N, _ = metric.shape
    r = ref.tome_clamp_r(N, r, class_token, distill_token)
    if r == 0:
        return ToMeMatch(*ref.identity_match(B, N, metric.device))
    out = torch.ops.xray_ops.tome_match(metric.detach(), r, class_token, distill_token,
                                        _dispatch.requested_backend())
    return ToMeMatch(*out)


def tome_merge(x: torch.Tensor, metric: torch.Tensor, r: int, *,
               size: torch.Tensor | None = None, class_token: bool = True,
               distill_token: bool = False, return_match: bool = False):
    """ToMe: merge the r most similar A tokens into their best B tokens (size-weighted mean).

    Args:
        x: (B, N, C) float tokens, any strides.
        metric: (B, N, Cm) float (any float dtype; Cm may differ from C), same device: what the
            tokens are matched by (ToMe: the attention keys averaged over heads).
        r: tokens to remove; clamped to (N - protected) // 2 (protected = class_token +
            distill_token). r <= 0, negative included, returns x unchanged.
        size: (B, N, 1), x's dtype, how many original tokens each token stands for; None = ones.
        class_token: token 0 is CLS: never merged, first in the output.
        distill_token: token 1 is a distillation token, second in the output. Nothing merges
            into it, except where it is the only B token (N == 3 without class_token), as
            in ToMe.
        return_match: also return the :class:`ToMeMatch` (for tome_unmerge / source tracking).

    Returns:
        x_out (B, N - r, C) and size_out (B, N - r, 1) in x's dtype, in ToMe's order:
        [staying A tokens, then every B token] ([A0, B0, A-stay[1:], B[1:]] with
        distill_token); (x_out, size_out, match) with return_match. With r == 0 after clamping:
        (x, size) itself (size: ones when None).

    Differentiable in x and size; the matching carries no gradient (as in ToMe). Proportional
    attention: the next attention adds key_bias = log(size_out) (:func:`tome_key_bias`) to its
    logits, e.g. ``xray_ops.flash_attention(q, k, v, key_bias=tome_key_bias(size_out))``.

    Equivalent PyTorch (ToMe's merge_wavg; ``merge`` gathers the staying A tokens, adds the
    merged ones into their B token with scatter_reduce "sum", and concatenates in that order)::

        x_out = merge(x * size) / merge(size);  size_out = merge(size)
    """
    _validate.tensor(x, "x", ndim=3, floating=True)
    _check_metric(metric)
    r = _check_r(r)
    _validate.boolean(class_token, "class_token")
    _validate.boolean(distill_token, "distill_token")
    _validate.boolean(return_match, "return_match")
    _validate.same_device("x", x, metric=metric, size=size)
    B, N, C = x.shape
    _validate.shape(metric, "metric", (B, N, None), "(B, N, Cm) for x of shape (B, N, C)")
    if size is not None:
        _validate.tensor(size, "size", ndim=3, floating=True)
        _validate.same_dtype("x", x, size=size)
        _validate.shape(size, "size", (B, N, 1), "(B, N, 1) for x of shape (B, N, C)")
    r = ref.tome_clamp_r(N, r, class_token, distill_token)
    if r == 0:
        size_out = size if size is not None else torch.ones(B, N, 1, dtype=x.dtype,
                                                            device=x.device)
        if return_match:
            return x, size_out, ToMeMatch(*ref.identity_match(B, N, x.device))
        return x, size_out
    backend = _dispatch.requested_backend()
    match = ToMeMatch(*torch.ops.xray_ops.tome_match(metric.detach(), r, class_token,
                                                     distill_token, backend))
    x_out, size_out = torch.ops.xray_ops.tome_merge(x, size, match.dest, match.slot_src,
                                                    match.slot_start, backend)
    if return_match:
        return x_out, size_out, match
    return x_out, size_out


def _check_match(match, name="match") -> ToMeMatch:
    if not (isinstance(match, tuple) and len(match) == 6
            and all(isinstance(t, torch.Tensor) for t in match)):
        raise TypeError(f"{name}: expected a ToMeMatch (from tome_match or tome_merge(..., "
                        f"return_match=True)), got {type(match).__name__}")
    match = ToMeMatch(*match)
    for field in ("dest", "slot_start"):
        t = getattr(match, field)
        if t.dim() != 2 or t.dtype != torch.int64:
            raise ValueError(f"{name}.{field}: expected a 2-D int64 tensor, got shape "
                             f"{tuple(t.shape)} dtype {t.dtype}")
    return match


def tome_unmerge(x_merged: torch.Tensor, match: ToMeMatch) -> torch.Tensor:
    """Scatter merged tokens back to the N original positions (MAE decoders, dense heads).

    x_merged: (B, N - r, C), any dtype; match: the :class:`ToMeMatch` of that merge.
    Returns (B, N, C): position p gets x_merged[dest[p]], so a merged A token gets the value of
    the B token it joined, as ToMe's unmerge does (ToMe's own unmerge assumes the order without
    a distillation token; this one follows the order tome_merge really produced).
    Differentiable in x_merged (a gather; its backward is a scatter_add, which on CUDA uses
    float atomics unless torch.use_deterministic_algorithms is on).

    Equivalent PyTorch::

        x_merged.gather(1, match.dest[..., None].expand(-1, -1, C))
    """
    match = _check_match(match)
    _validate.tensor(x_merged, "x_merged", ndim=3)
    _validate.same_device("x_merged", x_merged, **{"match.dest": match.dest})
    B, N = match.dest.shape
    n_out = match.slot_start.shape[1] - 1
    _validate.shape(x_merged, "x_merged", (B, n_out, None),
                    f"(B, N - r, C) for a match of {N} tokens into {n_out}")
    return ref.tome_unmerge(x_merged, match.dest)


def tome_merge_source(match: ToMeMatch, source: torch.Tensor | None = None) -> torch.Tensor:
    """Source tracking (ToMe's merge_source), for visualising which patches merged.

    source: (B, N, N0), row t marks (1) the original tokens token t holds; None = identity
    (float32, N0 = N, the first merge). Returns (B, N - r, N0), rows of a slot combined by max.
    No gradient. Compact alternative: keep the (B, N0) map of each original token's current
    slot and update it with ``match.dest.gather(1, slot_map)`` after every merge.

    Equivalent PyTorch::

        zeros(B, N - r, N0).scatter_reduce(1, dest[..., None].expand(-1, -1, N0), source,
                                           "amax", include_self=False)
    """
    match = _check_match(match)
    B, N = match.dest.shape
    if source is not None:
        _validate.tensor(source, "source", ndim=3)
        _validate.same_device("match.dest", match.dest, source=source)
        _validate.shape(source, "source", (B, N, None), f"(B, N, N0) for a match of {N} tokens")
    with torch.no_grad():
        return ref.tome_merge_source(match.dest, match.slot_start.shape[1] - 1, source)


def tome_key_bias(size: torch.Tensor) -> torch.Tensor:
    """Proportional attention's key bias: (B, N, 1) sizes -> (B, N) = log(size).

    Pass it as ``key_bias`` to ``xray_ops.flash_attention`` (or
    ``xray_ops.reference.tome.attention``): a token that stands for s merged tokens then gets
    the attention weight of s identical keys, as in ToMe's ``attn + size.log()[:, None, None,
    :, 0]``.

    Equivalent PyTorch::

        size[..., 0].log()
    """
    _validate.tensor(size, "size", ndim=3, floating=True)
    if size.shape[2] != 1:
        raise ValueError(f"size: expected shape (B, N, 1), got {tuple(size.shape)}")
    return size[..., 0].log()


# ----------------------------------------------------------------------------------------------
# per-layer schedule
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ToMeConfig:
    """ToMe settings for a model: ``ToMeConfig(r=8, prop_attn=True, trace_source=False)``.

    r: an int (the same r in every layer), an (r, inflection) pair with inflection in [-1, 1]
       (+1 merges more in later layers, -1 in earlier ones: ToMe's "decreasing schedule"), or a
       per-layer list of ints (padded with zeros for the remaining layers).
    prop_attn: proportional attention (key_bias = log(size)) in the attention layers.
    trace_source: track which original tokens each token holds (tome_merge_source).
    """

    r: int | tuple | list = 0
    prop_attn: bool = True
    trace_source: bool = False

    def __post_init__(self):
        r = self.r
        # ints: anything operator.index takes (numpy integers too), stored as Python ints
        if isinstance(r, list):
            object.__setattr__(self, "r", [_validate.integer(v, f"r[{i}]")
                                           for i, v in enumerate(r)])
        elif isinstance(r, tuple):
            if len(r) != 2:
                raise ValueError(f"r: expected an (r, inflection) pair, got {r!r}")
            object.__setattr__(self, "r", (_validate.integer(r[0], "r[0]"),
                                           _validate.number(r[1], "r[1] (inflection)",
                                                            lo=-1.0, hi=1.0)))
        else:
            try:
                object.__setattr__(self, "r", _validate.integer(r, "r"))
            except TypeError:
                raise TypeError(f"r: expected an int, an (r, inflection) tuple or a list of "
                                f"ints, got {type(r).__name__} ({r!r})") from None
        _validate.boolean(self.prop_attn, "prop_attn")
        _validate.boolean(self.trace_source, "trace_source")

    def schedule(self, num_layers: int) -> list[int]:
        """r of each of ``num_layers`` layers, as ToMe's ``parse_r`` computes it.

        int r: [r] * num_layers. (r, inflection): int(min + step * i) with
        min = int(r * (1 - inflection)), max = 2 r - min, step = (max - min) / (num_layers - 1)
        (a single layer gets min, where ToMe divides by zero). list: padded with zeros to
        num_layers; entries past num_layers are dropped (ToMe keeps them; no layer reads them).
        Values <= 0 mean no merge in that layer.
        """
        num_layers = _validate.integer(num_layers, "num_layers", lo=1)
        r, inflect = self.r, 0.0
        if isinstance(r, list):
            return (list(r) + [0] * num_layers)[:num_layers]
        if isinstance(r, tuple):
            r, inflect = r
        lo = int(r * (1.0 - inflect))
        hi = 2 * r - lo
        step = (hi - lo) / (num_layers - 1) if num_layers > 1 else 0.0
        return [int(lo + step * i) for i in range(num_layers)]


# ----------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("xray_ops::tome_match", mutates_args=())
def _tome_match_op(metric: torch.Tensor, r: int, class_token: bool, distill_token: bool,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                          torch.Tensor, torch.Tensor]:
    return tuple(_dispatch.run(MATCH_OP, backend, metric=metric, r=r, class_token=class_token,
                               distill_token=distill_token))


@_tome_match_op.register_fake
def _(metric, r, class_token, distill_token, backend):
    B, N, _ = metric.shape
    Na = (N + 1) // 2

    def i64(*shape):
        return metric.new_empty(*shape, dtype=torch.int64)

    return i64(B, Na - r), i64(B, r), i64(B, r), i64(B, N), i64(B, N), i64(B, N - r + 1)


@torch.library.custom_op("xray_ops::tome_merge", mutates_args=())
def _tome_merge_op(x: torch.Tensor, size: torch.Tensor | None, dest: torch.Tensor,
                   slot_src: torch.Tensor, slot_start: torch.Tensor,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(_dispatch.run(MERGE_OP, backend, x=x, size=size, dest=dest,
                               slot_src=slot_src, slot_start=slot_start))


@_tome_merge_op.register_fake
def _(x, size, dest, slot_src, slot_start, backend):
    B, _, C = x.shape
    n_out = slot_start.shape[1] - 1
    return x.new_empty(B, n_out, C), x.new_empty(B, n_out, 1)


@torch.library.custom_op("xray_ops::tome_merge_backward", mutates_args=())
def _tome_merge_backward_op(grad_out: torch.Tensor, grad_size_out: torch.Tensor | None,
                            x: torch.Tensor, size: torch.Tensor | None, x_out: torch.Tensor,
                            size_out: torch.Tensor, dest: torch.Tensor, size_grad: bool,
                            backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(_dispatch.run_backward(MERGE_OP, backend, grad_out=grad_out,
                                        grad_size_out=grad_size_out, x=x, size=size,
                                        x_out=x_out, size_out=size_out, dest=dest,
                                        size_grad=size_grad))


@_tome_merge_backward_op.register_fake
def _(grad_out, grad_size_out, x, size, x_out, size_out, dest, size_grad, backend):
    B, N, C = x.shape
    return x.new_empty(B, N, C), x.new_empty(B, N, 1)


def _setup_context(ctx, inputs, output):
    x, size, dest, slot_src, slot_start, backend = inputs
    x_out, size_out = output
    ctx.has_size = size is not None
    # x and x_out are read only for the gradient of size: keep them alive only then (in a ViT
    # nothing else holds the pre-merge tokens, so saving x would cost a whole activation)
    ctx.size_grad = size is not None and ctx.needs_input_grad[1]
    ctx.x_shape = x.shape
    ctx.save_for_backward(x if ctx.size_grad else None, size, x_out if ctx.size_grad else None,
                          size_out, dest)
    ctx.backend = backend


def _backward(ctx, grad_out, grad_size_out):
    x, size, x_out, size_out, dest = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(size_out).expand(*size_out.shape[:2], ctx.x_shape[2])
    if not ctx.size_grad:  # placeholders of the right shape and dtype, never read
        x = grad_out.new_empty(()).expand(ctx.x_shape)
        x_out = grad_out
    grad_x, grad_size = _tome_merge_backward_op(grad_out, grad_size_out, x, size, x_out, size_out,
                                                dest, ctx.size_grad, ctx.backend)
    return grad_x, (grad_size if ctx.size_grad else None), None, None, None, None


_tome_merge_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# backends
# ----------------------------------------------------------------------------------------------
def _ref_match(metric, r, class_token, distill_token):
    return ref.tome_match(metric, r, class_token, distill_token)


def _ref_merge(x, size, dest, slot_src, slot_start):
    return ref.tome_merge_apply(x, size, dest, slot_start.shape[1] - 1)


def _ref_merge_backward(grad_out, grad_size_out, x, size, x_out, size_out, dest, size_grad):
    return ref.tome_merge_apply_backward(grad_out, grad_size_out, x, size, x_out, size_out,
                                         dest, size_grad)


def _same_dtype(inputs) -> list[str]:
    # every float tensor must share x's dtype for the compiled kernels (the public API
    # guarantees it; this guards direct op calls)
    tensors = [t for t in inputs if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if len({t.dtype for t in tensors}) > 1:
        return ["float tensors of mixed dtypes " + str(sorted({str(t.dtype) for t in tensors}))]
    return []


_ORDER = ("cuda", "triton", "cpu", "torch")
_MATCH, _MERGE, _CPU = "xray_ops.kernels.tome_match", "xray_ops.kernels.tome_merge", \
    "xray_ops.cpu.tome"
# plain CUDA (warp shuffles, vector loads, 16-bit floats through float): Volta on
_CUDA_CC = (7, 0)

# the matching: metric in any float dtype (the cpu backend upcasts 16-bit metrics to float32,
# which is exact: the matching is computed in float32 there anyway)
_dispatch.declare(MATCH_OP, forward=("metric", "r", "class_token", "distill_token"),
                  key="metric", priority=_ORDER)
_dispatch.register(MATCH_OP, "torch", forward=_ref_match, dtypes=FLOATS)
_dispatch.register(MATCH_OP, "triton", forward=lazy(_MATCH, "tome_match"), dtypes=FLOATS)
_dispatch.register(MATCH_OP, "cuda", forward=lazy("xray_ops._C", "tome_match"),
                   dtypes=GPU_FLOATS, min_compute_capability=_CUDA_CC)
_dispatch.register(MATCH_OP, "cpu", forward=lazy(_CPU, "tome_match"), dtypes=FLOATS)

_dispatch.declare(MERGE_OP, forward=("x", "size", "dest", "slot_src", "slot_start"),
                  backward=("grad_out", "grad_size_out", "x", "size", "x_out", "size_out",
                            "dest", "size_grad"), key="x", priority=_ORDER)
_dispatch.register(MERGE_OP, "torch", forward=_ref_merge, backward=_ref_merge_backward,
                   dtypes=FLOATS)
_dispatch.register(MERGE_OP, "triton", forward=lazy(_MERGE, "tome_merge_forward"),
                   backward=lazy(_MERGE, "tome_merge_backward"), dtypes=FLOATS,
                   forward_check=_same_dtype, backward_check=_same_dtype)
_dispatch.register(MERGE_OP, "cuda", forward=lazy("xray_ops._C", "tome_merge_forward"),
                   backward=lazy("xray_ops._C", "tome_merge_backward"), dtypes=GPU_FLOATS,
                   min_compute_capability=_CUDA_CC, forward_check=_same_dtype,
                   backward_check=_same_dtype)
_dispatch.register(MERGE_OP, "cpu", forward=lazy(_CPU, "tome_merge_forward"),
                   backward=lazy(_CPU, "tome_merge_backward"),
                   dtypes=(torch.float32, torch.float64), forward_check=_same_dtype,
                   backward_check=_same_dtype)
