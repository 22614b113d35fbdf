"""Triton multi-tensor Lion: one launch updates every tensor of a bucket (one dtype combination).

The launcher builds a table of the tensors' addresses and sizes (int64, one host-to-device copy,
reused while the addresses do not change): for tensor t, P[t], G[t], M[t] (addresses), NUMEL[t], and
START[t] = the first chunk of t in the launch (START[T] = the total). Program i owns chunk i:
it finds its tensor by a binary search over START (log2 T scalar loads, in cache), turns the
addresses into typed pointers and updates CHUNK elements, reading p, g, m once and writing p, m
once, in float32:

  p ← p · (1 − lr·wd) − lr · sign(β1·m + (1 − β1)·g);   m ← β2·m + (1 − β2)·g
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
CHUNK = 256 if INTERPRETING else 4096
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _lion_kernel(
    TABLE_ptr,  # int64, shape (5 * T + 1,): P, G, M addresses (T each), START (T + 1), NUMEL (T)
    T,  # number of tensors
    decay,  # 1 - lr * weight_decay
    lr,
    beta1,
    beta2,
    P_DTYPE: tl.constexpr,  # element types behind the addresses
    G_DTYPE: tl.constexpr,
    M_DTYPE: tl.constexpr,
    LOG2_T: tl.constexpr,  # binary-search steps, >= ceil(log2(T))
    CHUNK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    start_ptr = TABLE_ptr + 3 * T
    # binary search: the tensor t with START[t] <= pid < START[t + 1]
    lo = tl.zeros([], dtype=tl.int64)
    hi = tl.zeros([], dtype=tl.int64) + T
    for _ in tl.static_range(LOG2_T):
        mid = (lo + hi) // 2
        right = tl.load(start_ptr + mid) <= pid
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    t = lo
    first = tl.load(start_ptr + t)
    p_ptr = tl.load(TABLE_ptr + t).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(TABLE_ptr + T + t).to(tl.pointer_type(G_DTYPE))
    m_ptr = tl.load(TABLE_ptr + 2 * T + t).to(tl.pointer_type(M_DTYPE))
    numel = tl.load(TABLE_ptr + 4 * T + 1 + t)
    offs = (pid - first) * CHUNK + tl.arange(0, CHUNK)
    mask = offs < numel
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    c = m * beta1 + g * (1.0 - beta1)
    u = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0))  # sign, sign(0) = 0 (NaN -> 0)
    u = tl.where(c != c, c, u)  # a NaN gradient or momentum propagates, as torch.sign does
    p = p * decay - lr * u
    m = m * beta2 + g * (1.0 - beta2)
    # one cast back to each storage dtype
    tl.store(p_ptr + offs, p.to(P_DTYPE), mask=mask)
    tl.store(m_ptr + offs, m.to(M_DTYPE), mask=mask)


_table_cache: dict[tuple, torch.Tensor] = {}


def _table(params, grads, exp_avgs) -> tuple[torch.Tensor, int]:
    """int64 table [P (T), G (T), M (T), START (T + 1), NUMEL (T)] on the device; cached while
    the addresses and sizes are unchanged (grads are often new tensors each step)."""
    ptrs = [t.data_ptr() for t in params] + [t.data_ptr() for t in grads] + \
        [t.data_ptr() for t in exp_avgs]
    numels = [p.numel() for p in params]
    key = (params[0].device, tuple(ptrs), tuple(numels))
    tab = _table_cache.get(key)
    chunks = [triton.cdiv(n, CHUNK) for n in numels]
    starts = [0]
    for c in chunks:
        starts.append(starts[-1] + c)
    if tab is None:
        host = torch.tensor(ptrs + starts + numels, dtype=torch.int64)
        tab = host.to(params[0].device, non_blocking=True)
        if len(_table_cache) > 64:  # a few optimizers' worth
            _table_cache.clear()
        _table_cache[key] = tab
    return tab, starts[-1]


def lion_step(params, grads, exp_avgs, lr: float, beta1: float, beta2: float,
              weight_decay: float) -> None:
    """One Lion step of a bucket (contiguous tensors, one device, one dtype combination)."""
    if not params:
        return
    tab, n_chunks = _table(params, grads, exp_avgs)
    T = len(params)
    _lion_kernel[(n_chunks,)](
        tab, T, 1.0 - lr * weight_decay, lr, beta1, beta2,
        P_DTYPE=_TL_DTYPES[params[0].dtype], G_DTYPE=_TL_DTYPES[grads[0].dtype],
        M_DTYPE=_TL_DTYPES[exp_avgs[0].dtype], LOG2_T=max(1, (T - 1).bit_length()),
        CHUNK=CHUNK, num_warps=8 if CHUNK >= 4096 else 4)
