"""ToMe token merging (Bolya et al., ICLR 2023): the definition, in plain PyTorch.

This module is the op's definition and test oracle (any float dtype, float64 included) and the
``torch`` backend. It restates ToMe's ``bipartite_soft_matching`` + ``merge_wavg`` step by step
(see :func:`tome_merge`), with two choices ToMe leaves open, made explicit so every backend
gives the same tokens in the same order:

* Ties. ToMe orders the A tokens with an unstable ``argsort``; here the order is stable:
  equal best scores keep the lower A index first. Each A token's best B token is the first
  (lowest index) among equal maxima, as ``torch.max`` returns it. On inputs without ties this
  is exactly ToMe's matching.
* NaN. A token whose metric has norm 0 (or holds a NaN) gets NaN scores; NaN counts as larger
  than every number (what ``torch.max`` and a descending ``torch.sort`` do), so such tokens are
  matched first, deterministically.

Precision of the matching: scores are computed in float32 for float16 / bfloat16 / float32
metrics and in float64 for float64 metrics (ToMe computes them in the metric's dtype, which in
half precision ties many scores). Every backend normalises first, as ToMe does, but safely
(:func:`tome_normalize`): each token is first scaled by a power of two that brings its largest
|value| into [1, 2) (exact), so the squares in its norm neither underflow nor overflow. ToMe's
own ``metric / metric.norm()`` turns a finite float32 metric of magnitude ~1e-25 into 0/0 and
one of ~1e20 into x/inf; the cosine does not depend on the scale, and here it does not either.
Backends agree exactly on exact ties (identical tokens) and whenever scores differ by more than
float32 rounding, at any finite magnitude.

The matching is also given in a form the kernels use (:func:`tome_match`): ``dest`` (the output
slot of every input token) and its CSR grouping ``slot_src`` / ``slot_start`` (the input
tokens of each output slot: the slot's own token first, then the A tokens merged into it in
ascending position order).
"""

from __future__ import annotations

import math

import torch


def tome_clamp_r(n_tokens: int, r: int, class_token: bool, distill_token: bool) -> int:
    """r clamped as ToMe does: min(r, (N - protected) // 2), and 0 when that is <= 0."""
    protected = int(class_token) + int(distill_token)
    return max(0, min(r, (n_tokens - protected) // 2))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype the matching is computed in: float64 for float64 metrics, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def exponent_range(dtype: torch.dtype) -> tuple[int, int]:
    """Exponents k for which 2**k is a normal number of ``dtype`` (float32 or float64)."""
    return (-1022, 1023) if dtype == torch.float64 else (-126, 127)


def power_of_two_scale(m: torch.Tensor) -> torch.Tensor:
    """(..., D) float32 / float64 -> (..., 1): 2**k bringing each row's largest |value| into
    [1, 2), k clamped to the normal exponents (an exact multiplier). Rows of zeros, Inf or NaN
    get some power of two: their normalised values are 0/0, x/Inf or NaN whatever it is."""
    amax = m.abs().amax(dim=-1, keepdim=True)
    lo, hi = exponent_range(m.dtype)
    k = (1 - torch.frexp(amax).exponent).clamp(lo, hi)  # amax = mantissa·2**e, mantissa in [.5, 1)
    return torch.ldexp(torch.ones_like(amax), k)


def tome_normalize(metric: torch.Tensor) -> torch.Tensor:
    """(B, N, Cm) -> (B, N, Cm) unit rows in the compute dtype: m·2**k / ‖m·2**k‖ (ToMe's
    ``metric / metric.norm()``, without its underflow / overflow at extreme magnitudes)."""
    m = metric.to(compute_dtype(metric.dtype))
    m = m * power_of_two_scale(m)
    return m / m.norm(dim=-1, keepdim=True)


def tome_scores(metric: torch.Tensor, class_token: bool, distill_token: bool) -> torch.Tensor:
    """(B, N, Cm) -> (B, Na, Nb) cosine scores of A tokens (even positions) against B tokens
    (odd positions); row 0 is -inf with class_token, column 0 is -inf with distill_token."""
    m = tome_normalize(metric)
    scores = m[:, ::2] @ m[:, 1::2].transpose(1, 2)
    if class_token:
        scores[:, 0, :] = -math.inf
    if distill_token:
        scores[:, :, 0] = -math.inf
    return scores


def best_match(scores: torch.Tensor):
    """(B, Na, Nb) -> node_max (B, Na), node_idx (B, Na) int64: each row's maximum (NaN above
    every number) and the first column holding it."""
    node_max = scores.max(dim=-1).values
    is_max = (scores == node_max[..., None]) | (scores.isnan() & node_max.isnan()[..., None])
    cols = torch.arange(scores.shape[-1], device=scores.device)
    node_idx = torch.where(is_max, cols, scores.shape[-1]).min(dim=-1).values
    return node_max, node_idx


def _slot_maps(Na: int, Nb: int, r: int, distill_token: bool, device):
    """Output slot of the u-th staying A token and of the j-th B token (ToMe's output order)."""
    U = Na - r
    u = torch.arange(U, device=device)
    j = torch.arange(Nb, device=device)
    unm_slot = u + (u >= 1).long() if distill_token else u
    b_slot = torch.where(j == 0, 1, U + j) if distill_token else U + j
    return unm_slot, b_slot


def tome_match(metric: torch.Tensor, r: int, class_token: bool = True,
               distill_token: bool = False):
    """ToMe's bipartite soft matching; r must already be clamped (tome_clamp_r) and >= 1.

    Returns int64 tensors (unm_idx (B, Na-r), src_idx (B, r), dst_idx (B, r), dest (B, N),
    slot_src (B, N), slot_start (B, N-r+1)):
      unm_idx: A indices (position // 2) of the A tokens that stay, in output order.
      src_idx: A indices of the merged A tokens, by descending best score.
      dst_idx: B index (position // 2) of the B token each src_idx token merges into.
      dest: output slot of every input token.
      slot_src / slot_start: input positions grouped by output slot (CSR): slot o holds
        slot_src[slot_start[o]:slot_start[o+1]], its own token first, then merged A tokens by
        ascending position.
    """
    B, N, _ = metric.shape
    Na, Nb = (N + 1) // 2, N // 2
    dev = metric.device
    scores = tome_scores(metric, class_token, distill_token)
    node_max, node_idx = best_match(scores)
    order = torch.sort(node_max, dim=-1, descending=True, stable=True).indices
    src_idx = order[:, :r].clone()  # no views: the op's outputs must not alias each other
    unm_idx = order[:, r:].clone()
    if class_token:  # the CLS token (A[0], never merged) back in front: ascending positions
        unm_idx = unm_idx.sort(dim=-1).values
    dst_idx = node_idx.gather(1, src_idx)

    unm_slot, b_slot = _slot_maps(Na, Nb, r, distill_token, dev)
    dest = torch.empty(B, N, dtype=torch.int64, device=dev)
    dest[:, 1::2] = b_slot
    dest.scatter_(1, 2 * unm_idx, unm_slot.expand(B, -1).contiguous())
    dest.scatter_(1, 2 * src_idx, b_slot[dst_idx])

    # CSR of dest: sort by (slot, head first, then position)
    pos = torch.arange(N, device=dev)
    is_head = torch.ones(B, N, dtype=torch.bool, device=dev)
    is_head.scatter_(1, 2 * src_idx, False)
    key = dest * (2 * N) + torch.where(is_head, 0, 1 + pos)
    slot_src = torch.sort(key, dim=-1, stable=True).indices
    counts = torch.zeros(B, N - r, dtype=torch.int64, device=dev)
    counts.scatter_add_(1, dest, torch.ones_like(dest))
    slot_start = torch.zeros(B, N - r + 1, dtype=torch.int64, device=dev)
    slot_start[:, 1:] = counts.cumsum(-1)
    return unm_idx, src_idx, dst_idx, dest, slot_src, slot_start


def identity_match(B: int, N: int, device):
    """The matching of r = 0: nothing merges and every token keeps its position."""
    Na = (N + 1) // 2
    pos = torch.arange(N, device=device).expand(B, N).contiguous()
    empty = torch.empty(B, 0, dtype=torch.int64, device=device)
    unm = torch.arange(Na, device=device).expand(B, Na).contiguous()
    start = torch.arange(N + 1, device=device).expand(B, N + 1).contiguous()
    return unm, empty, empty.clone(), pos, pos.clone(), start


def tome_merge(x: torch.Tensor, metric: torch.Tensor, r: int, size: torch.Tensor | None = None,
               class_token: bool = True, distill_token: bool = False):
    """The definition: ToMe's matching then ToMe's size-weighted merge, in ToMe's token order.

    x (B, N, C), metric (B, N, Cm), size (B, N, 1) or None (all ones) ->
    x_out (B, N - r, C), size_out (B, N - r, 1), r clamped (r <= 0: (x, size) unchanged, size
    ones when None). Differentiable (through PyTorch autograd) in x and size.
    """
    B, N, C = x.shape
    r = tome_clamp_r(N, r, class_token, distill_token)
    if size is None:
        size = torch.ones(B, N, 1, dtype=x.dtype, device=x.device)
    if r == 0:
        return x, size
    unm_idx, src_idx, dst_idx = tome_match(metric, r, class_token, distill_token)[:3]
    U = unm_idx.shape[1]

    def merge_sum(t):
        # A = even positions, B = odd positions; the merged A tokens are added into their
        # B token; output [staying A, B] (distillation token second)
        c = t.shape[-1]
        a, b = t[:, ::2], t[:, 1::2]
        stay = a.gather(1, unm_idx[..., None].expand(B, U, c))
        moved = a.gather(1, src_idx[..., None].expand(B, r, c))
        b = b.scatter_reduce(1, dst_idx[..., None].expand(B, r, c), moved, reduce="sum")
        if distill_token:
            return torch.cat([stay[:, :1], b[:, :1], stay[:, 1:], b[:, 1:]], dim=1)
        return torch.cat([stay, b], dim=1)

    x_sum = merge_sum(x * size)
    size_out = merge_sum(size)
    return x_sum / size_out, size_out


# ----------------------------------------------------------------------------------------------
# the merge given a matching: the torch backend of the merge op, forward and closed-form backward
# ----------------------------------------------------------------------------------------------
def tome_merge_apply(x: torch.Tensor, size: torch.Tensor | None, dest: torch.Tensor, n_out: int):
    """x (B, N, C), size (B, N, 1) or None, dest (B, N) -> x_out (B, n_out, C), size_out.

    x_out[o] = sum over tokens p with dest[p] = o of size[p] * x[p], divided by size_out[o] =
    the sum of their sizes.
    """
    B, N, C = x.shape
    if size is None:
        size = torch.ones(B, N, 1, dtype=x.dtype, device=x.device)
    idx = dest[..., None]
    x_sum = x.new_zeros(B, n_out, C).scatter_add_(1, idx.expand(B, N, C), x * size)
    size_out = size.new_zeros(B, n_out, 1).scatter_add_(1, idx, size)
    return x_sum / size_out, size_out


def tome_merge_apply_backward(grad_out: torch.Tensor, grad_size_out: torch.Tensor | None,
                              x: torch.Tensor, size: torch.Tensor | None, x_out: torch.Tensor,
                              size_out: torch.Tensor, dest: torch.Tensor, size_grad: bool):
    """Gradients of :func:`tome_merge_apply` in closed form: (grad_x (B, N, C), grad_size (B, N, 1)).

    Token p in slot o = dest[p], S = size_out[o]: x_out[o] = sum(size * x) / S, so
    grad_x[p] = size[p] / S * grad_out[o] and
    grad_size[p] = <grad_out[o], x[p] - x_out[o]> / S + grad_size_out[o] (zeros unless size_grad).
    """
    B, N, C = x.shape
    idx = dest[..., None]
    g = grad_out.gather(1, idx.expand(B, N, C))
    S = size_out.gather(1, idx)
    s = size if size is not None else torch.ones(B, N, 1, dtype=x.dtype, device=x.device)
    grad_x = (s / S) * g
    if not size_grad:
        return grad_x, torch.zeros(B, N, 1, dtype=x.dtype, device=x.device)
    out_p = x_out.gather(1, idx.expand(B, N, C))
    grad_size = (g * (x - out_p)).sum(-1, keepdim=True) / S
    if grad_size_out is not None:
        grad_size = grad_size + grad_size_out.gather(1, idx)
    return grad_x, grad_size


# ----------------------------------------------------------------------------------------------
# unmerge, source tracking, proportional attention
# ----------------------------------------------------------------------------------------------
def tome_unmerge(x_merged: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
    """(B, N - r, C), dest (B, N) -> (B, N, C): every input position gets its output token
    (a merged A token gets the value of the B token it went into), as ToMe's unmerge."""
    B, N = dest.shape
    return x_merged.gather(1, dest[..., None].expand(B, N, x_merged.shape[-1]))


def tome_merge_source(dest: torch.Tensor, n_out: int, source: torch.Tensor | None = None):
    """ToMe's merge_source: source (B, N, N0) one-hot rows of which original tokens each token
    holds (None: the identity, float32) -> (B, n_out, N0), rows combined by max."""
    B, N = dest.shape
    if source is None:
        source = torch.eye(N, device=dest.device).expand(B, N, N)
    n0 = source.shape[-1]
    out = source.new_zeros(B, n_out, n0)
    return out.scatter_reduce(1, dest[..., None].expand(B, N, n0), source, reduce="amax",
                              include_self=False)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              key_bias: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """softmax(scale · q kᵀ + key_bias[:, None, None, :]) v for q (B, H, Nq, D), k, v
    (B, H, Nk, D), key_bias (B, Nk). ToMe's proportional attention is key_bias = log(size)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q @ k.transpose(-2, -1)) * scale
    if key_bias is not None:
        logits = logits + key_bias[:, None, None, :]
    return logits.softmax(dim=-1) @ v
