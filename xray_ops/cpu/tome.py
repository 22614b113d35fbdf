"""numba kernels for ToMe token merging on the CPU: matching, merge forward and merge backward.

Parallel over the batch. Matching per row: every token normalised first, as the definition does
(scaled by a power of two that brings its largest |value| into [1, 2), then divided by its norm:
no underflow or overflow at any finite magnitude), then cosine scores as dot products of unit
rows (accumulated in the metric's dtype, float32 or float64, vectorised over the channels),
the first argmax with NaN as +inf, a stable descending argsort of the best scores, then ToMe's
output order and the CSR grouping in O(N). Merge: each output slot sums size·x over its group
in float64 (a slot of one token of size 1 is a copy); backward: each input token reads its slot.

On a CPU shared with other processes, numba's OpenMP threading layer spin-waits between parallel
regions and loses its core's time slices: on the shared 2-core development machine the ViT-B
forward (B=64, N=197, C=768, r=16) took ~33 ms by default and ~25 ms with OMP_WAIT_POLICY=PASSIVE
or NUMBA_THREADING_LAYER=workqueue set in the environment (the eager reference: ~80 ms).
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from ..reference.tome import exponent_range


@numba.njit(inline="always")
def _power_of_two_scale(amax, lo, hi):
    # 2**k bringing amax into [1, 2), k clamped to [lo, hi] (the normal exponents): see
    # xray_ops.reference.tome.power_of_two_scale. frexp: amax = mantissa·2**e, mantissa in [.5, 1)
    e = math.frexp(amax)[1] if amax > 0.0 and amax < np.inf else 0
    k = min(max(1 - e, lo), hi)
    return math.ldexp(1.0, k)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _normalize_rows(m, lo, hi, u):
    """m (N, D) -> u (N, D) in m's dtype: m·2**k / ‖m·2**k‖ per row (the definition's
    tome_normalize; the norm's sum of squares in float64)."""
    N, D = m.shape
    for t in range(N):
        amax = 0.0
        for d in range(D):
            a = abs(np.float64(m[t, d]))
            amax = a if a > amax else amax  # NaN never wins: a NaN row stays NaN below
        s = u.dtype.type(_power_of_two_scale(amax, lo, hi))
        ss = 0.0
        for d in range(D):
            v = np.float64(m[t, d] * s)  # in m's dtype, as the definition scales
            ss += v * v
        norm = u.dtype.type(np.sqrt(ss))
        for d in range(D):
            u[t, d] = (m[t, d] * s) / norm  # one division in m's dtype, as m / m.norm()


# reassoc + contract only: the dot products vectorise (a fixed association, so the same bits on
# every run); no finite-math flags, the NaN rule below still holds
@numba.njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "contract"})
def _best_matches(m, class_token, distill_token, node_max, node_idx):
    """m (N, D) one row's unit-norm metric, contiguous -> node_max (Na,) float64, node_idx (Na,)
    int64."""
    N, D = m.shape
    Na, Nb = (N + 1) // 2, N // 2
    score = np.empty(Nb, dtype=np.float64)
    for i in range(Na):
        if class_token and i == 0:  # the CLS row is all -inf: its first column
            node_max[i] = -np.inf
            node_idx[i] = 0
            continue
        for j in range(Nb):
            dot = np.float32(0)  # accumulates in the metric's dtype (float64 for float64)
            for d in range(D):
                dot += m[2 * i, d] * m[2 * j + 1, d]
            score[j] = dot
        for j in range(Nb):
            s = score[j]
            score[j] = np.inf if np.isnan(s) else s  # NaN ranks above every number
        if distill_token:
            score[0] = -np.inf
        best = score[0]
        bi = 0
        for j in range(1, Nb):
            if score[j] > best:  # strictly: the first of equal maxima wins
                best = score[j]
                bi = j
        node_max[i] = best
        node_idx[i] = bi


@numba.njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def _match(metric, lo, hi, r, class_token, distill_token, unm, src, dst, dest, slot_src,
           slot_start):
    B, N, D = metric.shape
    Na, Nb = (N + 1) // 2, N // 2
    U = Na - r
    n_out = N - r
    for b in numba.prange(B):
        node_max = np.empty(Na, dtype=np.float64)
        node_idx = np.empty(Na, dtype=np.int64)
        unit = np.empty((N, D), dtype=metric.dtype)
        _normalize_rows(metric[b], lo, hi, unit)
        _best_matches(unit, class_token, distill_token, node_max, node_idx)
        # stable descending order of the best scores (no NaN left: they became +inf)
        order = np.argsort(-node_max, kind="mergesort")
        merged = np.zeros(Na, dtype=np.bool_)
        for t in range(r):
            i = order[t]
            merged[i] = True
            src[b, t] = i
            dst[b, t] = node_idx[i]
        if class_token:  # staying A tokens by ascending index (CLS first)
            u = 0
            for i in range(Na):
                if not merged[i]:
                    unm[b, u] = i
                    u += 1
        else:
            for u in range(U):
                unm[b, u] = order[r + u]
        # output slots in ToMe's order
        b_slot = np.empty(Nb, dtype=np.int64)
        for j in range(Nb):
            b_slot[j] = 1 if (distill_token and j == 0) else U + j
            dest[b, 2 * j + 1] = b_slot[j]
        for u in range(U):
            dest[b, 2 * unm[b, u]] = u + 1 if (distill_token and u >= 1) else u
        for t in range(r):
            dest[b, 2 * src[b, t]] = b_slot[dst[b, t]]
        # CSR: group sizes, starts, then the slot's own token and its merged A tokens in order
        count = np.ones(n_out, dtype=np.int64)
        for t in range(r):
            count[b_slot[dst[b, t]]] += 1
        slot_start[b, 0] = 0
        for o in range(n_out):
            slot_start[b, o + 1] = slot_start[b, o] + count[o]
        fill = np.empty(n_out, dtype=np.int64)
        for o in range(n_out):
            fill[o] = slot_start[b, o] + 1
        for u in range(U):
            slot_src[b, slot_start[b, dest[b, 2 * unm[b, u]]]] = 2 * unm[b, u]
        for j in range(Nb):
            slot_src[b, slot_start[b, b_slot[j]]] = 2 * j + 1
        for i in range(Na):
            if merged[i]:
                o = b_slot[node_idx[i]]
                slot_src[b, fill[o]] = 2 * i
                fill[o] += 1


@numba.njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def _merge_forward(x, size, has_size, exact_products, slot_src, slot_start, out, size_out):
    B, N, C = x.shape
    n_out = out.shape[1]
    for b in numba.prange(B):
        acc = np.empty(C, dtype=np.float64)
        for o in range(n_out):
            st = slot_start[b, o]
            en = slot_start[b, o + 1]
            if en - st == 1:
                p = slot_src[b, st]
                s = np.float64(size[b, p, 0]) if has_size else 1.0
                # one token: (size·x) / size is x itself when size is 1, or when it is finite
                # and non-zero and size·x is exact in float64 (float32 x and size); otherwise
                # (size 0, ±Inf, NaN) compute it as the definition does: 0·x / 0 is NaN
                if s == 1.0 or (exact_products and s != 0.0 and abs(s) < np.inf):
                    for c in range(C):
                        out[b, o, c] = x[b, p, c]
                    size_out[b, o, 0] = s
                    continue
            acc[:] = 0.0
            total = 0.0
            for t in range(st, en):
                p = slot_src[b, t]
                s = np.float64(size[b, p, 0]) if has_size else 1.0
                total += s
                for c in range(C):
                    acc[c] += s * np.float64(x[b, p, c])
            for c in range(C):
                out[b, o, c] = acc[c] / total
            size_out[b, o, 0] = total


@numba.njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def _merge_backward(go, gso, has_gso, x, size, has_size, x_out, size_out, dest, size_grad,
                    gx, gs):
    B, N, C = x.shape
    for b in numba.prange(B):
        for p in range(N):
            o = dest[b, p]
            S = np.float64(size_out[b, o, 0])
            s = np.float64(size[b, p, 0]) if has_size else 1.0
            w = s / S
            dot = 0.0
            for c in range(C):
                g = np.float64(go[b, o, c])
                gx[b, p, c] = w * g
                if size_grad:
                    dot += g * (np.float64(x[b, p, c]) - np.float64(x_out[b, o, c]))
            if size_grad:
                v = dot / S
                if has_gso:
                    v += np.float64(gso[b, o, 0])
                gs[b, p, 0] = v
            else:
                gs[b, p, 0] = 0.0


def _np(t: torch.Tensor) -> np.ndarray:
    # a strided (even stride-0) numpy view of the same memory: no copy
    return t.detach().numpy()


def _chunks():
    # rows handed out a few at a time rather than split evenly up front: a thread slowed by
    # another process on its core then takes fewer rows
    return numba.parallel_chunksize(2)


def _npc(t: torch.Tensor) -> np.ndarray:
    # small tensors (sizes, indices, the metric) and gradients go in contiguous: every call then
    # uses one of few compiled signatures (numba compiles one per array layout)
    return t.detach().contiguous().numpy()


def tome_match(metric: torch.Tensor, r: int, class_token: bool, distill_token: bool):
    """metric (B, N, D), clamped r >= 1 -> (unm_idx, src_idx, dst_idx, dest, slot_src,
    slot_start), int64 (see xray_ops.ToMeMatch)."""
    B, N, D = metric.shape
    Na = (N + 1) // 2
    if metric.dtype not in (torch.float32, torch.float64):
        metric = metric.float()  # exact; the matching is computed in float32 for 16-bit metrics
    out = (torch.empty(B, Na - r, dtype=torch.int64), torch.empty(B, r, dtype=torch.int64),
           torch.empty(B, r, dtype=torch.int64), torch.empty(B, N, dtype=torch.int64),
           torch.empty(B, N, dtype=torch.int64), torch.empty(B, N - r + 1, dtype=torch.int64))
    if B:
        with _chunks():
            lo, hi = exponent_range(metric.dtype)
            _match(_npc(metric), lo, hi, r, class_token, distill_token,
                   *(t.numpy() for t in out))
    return out


def tome_merge_forward(x: torch.Tensor, size, dest, slot_src, slot_start):
    """x (B, N, C), size (B, N, 1) or None, matching CSR -> (x_out, size_out)."""
    B, N, C = x.shape
    n_out = slot_start.shape[1] - 1
    out = torch.empty(B, n_out, C, dtype=x.dtype)
    size_out = torch.empty(B, n_out, 1, dtype=x.dtype)
    if B and n_out:
        s = _npc(size) if size is not None else np.ones((1, 1, 1), dtype=out.numpy().dtype)
        with _chunks():
            _merge_forward(_np(x), s, size is not None, x.dtype == torch.float32,
                           _npc(slot_src), _npc(slot_start), out.numpy(), size_out.numpy())
    return out, size_out


def tome_merge_backward(grad_out, grad_size_out, x, size, x_out, size_out, dest, size_grad):
    """-> (grad_x (B, N, C), grad_size (B, N, 1)); grad_size is zeros unless size_grad."""
    B, N, C = x.shape
    gx = torch.empty(B, N, C, dtype=x.dtype)
    gs = torch.empty(B, N, 1, dtype=x.dtype)
    if B and N:
        dummy = np.ones((1, 1, 1), dtype=gx.numpy().dtype)
        s = _npc(size) if size is not None else dummy
        gso = _npc(grad_size_out) if grad_size_out is not None else dummy
        with _chunks():
            _merge_backward(_npc(grad_out), gso, grad_size_out is not None, _np(x), s,
                            size is not None, _npc(x_out), _npc(size_out), _npc(dest),
                            bool(size_grad) and size is not None, gx.numpy(), gs.numpy())
    return gx, gs
