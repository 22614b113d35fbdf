"""Triton int8 GEMM with the dequantize epilogue fused: ``int8_matmul`` (and ``int8_linear``).

C (M, N) = epilogue(A (M, K) int8 @ B (N, K)ᵀ int8), B in nn.Linear's weight layout.
tl.dot on int8 tiles accumulates exactly in int32 (wgmma / mma on the GPU; also right under
the interpreter). The epilogue runs on the int32 tile in registers: acc · a_scale[m] ·
b_scale[n] (+ bias[n]) (→ GELU, exact or tanh: kernels/gelu.py, the GELU of bias_gelu) in
float32, then one cast to the output dtype — the int32 result never goes to memory.

Grid: one program per (BLOCK_M, BLOCK_N) tile, grouped GROUP_M row-tiles at a time so the
B tiles a group needs stay in L2. Autotuned on the GPU (keyed on N, K, the power of two
above M and the epilogue; each epilogue gets only the tiles it fits without spilling) for
problems of AUTOTUNE_MIN_MACS and more; a fixed config below that and under the
interpreter (which would otherwise run every config).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .gelu import gelu as _gelu


# Problems of at least this many multiply-adds are autotuned (on the GPU); smaller ones take a
# fixed config, so small calls (and the test suite) do not pay for compiling every config.
AUTOTUNE_MIN_MACS = 1 << 30


# (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps) and the epilogues each compiles for on sm_90
# without spilling (tools/triton_aot_check.py checks every one `auto` can pick). A 128 x 256
# tile on 8 warps (or 128 x 128 on 4) holds 128 int32 accumulators per thread: enough registers
# for the plain epilogue into a 16-bit output, not for the exact GELU (erf) nor, with K tiles of
# 128, for a float32 output. Large tiles and deep pipelines for the big-M shapes (ViT at batch
# 256: M = 50432); int8 K tiles of 128 bytes; a few, because every config compiles on first use.
_PLAIN16, _PLAIN32, _GELU16, _GELU32 = "plain16", "plain32", "gelu16", "gelu32"
_ALL = frozenset({_PLAIN16, _PLAIN32, _GELU16, _GELU32})
_TILES = [
    ((128, 256, 128, 3, 8), frozenset({_PLAIN16})),
    ((256, 128, 128, 3, 8), frozenset({_PLAIN16})),
    ((128, 128, 128, 4, 4), frozenset({_PLAIN16, _PLAIN32})),
    ((128, 128, 64, 4, 4), frozenset({_PLAIN16, _PLAIN32})),
    ((64, 128, 128, 4, 4), _ALL),
    ((128, 128, 128, 4, 8), _ALL),
    ((128, 128, 64, 4, 8), _ALL),
]


def _epilogue(gelu: bool, out_dtype: torch.dtype) -> str:
    return ("gelu" if gelu else "plain") + ("32" if out_dtype == torch.float32 else "16")


def _configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                          num_warps=warps, num_stages=stages)
            for (bm, bn, bk, stages, warps), _ in _TILES]


def _prune(configs, named_args, **kwargs):
    """early_config_prune: the tiles that fit this call's epilogue."""
    epi = _epilogue(kwargs["GELU"], named_args["C_ptr"].dtype)
    fits = {shape for shape, epis in _TILES if epi in epis}
    return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"],
                                   c.num_stages, c.num_warps) in fits]


def _fixed_config(M: int, interpreting: bool) -> dict:
    if interpreting:  # one program per small tile: the interpreter runs them one by one
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
    bm = 32 if M <= 32 else 64
    return dict(BLOCK_M=bm, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=3)


@triton.jit
def _int8_matmul_kernel(
    A_ptr,  # int8 activations, shape (M, K), any strides
    B_ptr,  # int8 weights, shape (N, K) (nn.Linear layout), any strides
    AS_ptr,  # per-row scales of A, shape (M,) (stride stride_as), any float dtype
    BS_ptr,  # per-column scales, shape (N,) (stride stride_bs)
    BIAS_ptr,  # bias, shape (N,) (stride stride_bias); unused without HAS_BIAS
    C_ptr,  # output, shape (M, N), contiguous, dtype of the result
    M,
    N,
    K,
    M_BUCKET,  # power of two above M: the autotuner's key, unused in the body
    stride_am,
    stride_ak,
    stride_bn,
    stride_bk,
    stride_as,
    stride_bs,
    stride_bias,
    HAS_BIAS: tl.constexpr,
    GELU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    GELU_TANH: tl.constexpr = False,  # the tanh approximation (with GELU)
):
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    # grouped order: GROUP_M tile rows share the B tiles they sweep while those sit in L2
    width = GROUP_M * grid_n
    group = pid // width
    first_m = group * GROUP_M
    group_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_m
    pid_n = (pid % width) // group_m

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = A_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = B_ptr + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0)
        # int8 x int8 -> exact int32 (|acc| <= K·128·128 < 2**31 for K <= 131071)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    # fused epilogue in float32 (the int32 -> float32 conversion is exact below 2**24)
    a_s = tl.load(AS_ptr + offs_m * stride_as, mask=mask_m, other=0.0).to(tl.float32)
    b_s = tl.load(BS_ptr + offs_n * stride_bs, mask=mask_n, other=0.0).to(tl.float32)
    y = acc.to(tl.float32) * a_s[:, None] * b_s[None, :]
    if HAS_BIAS:
        bias = tl.load(BIAS_ptr + offs_n * stride_bias, mask=mask_n, other=0.0).to(tl.float32)
        y = y + bias[None, :]
    if GELU:  # the GELU of bias_gelu (kernels/gelu.py)
        y = _gelu(y, GELU_TANH)
    c_ptrs = C_ptr + offs_m[:, None] * N + offs_n[None, :]
    # one cast back to the output dtype
    tl.store(c_ptrs, y.to(C_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# tuned per (power of two above M, N, K, epilogue); dtypes join Triton's own key
_int8_matmul_autotuned = triton.autotune(configs=_configs(),
                                         key=["M_BUCKET", "N", "K", "HAS_BIAS", "GELU"],
                                         prune_configs_by={"early_config_prune": _prune}
                                         )(_int8_matmul_kernel)


def int8_matmul(a_q: torch.Tensor, b_q: torch.Tensor, a_scale: torch.Tensor,
                b_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
                gelu: bool, gelu_tanh: bool = False) -> torch.Tensor:
    """a_q (M, K) int8, b_q (N, K) int8, a_scale (M, 1), b_scale (N,), bias (N,) | None ->
    (M, N) out_dtype, contiguous."""
    M, K = a_q.shape
    N = b_q.shape[0]
    c = torch.empty(M, N, device=a_q.device, dtype=out_dtype)
    if M == 0 or N == 0:
        return c
    bias_t = bias if bias is not None else b_scale

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    args = (a_q, b_q, a_scale, b_scale, bias_t, c, M, N, K, triton.next_power_of_2(M),
            a_q.stride(0), a_q.stride(1), b_q.stride(0), b_q.stride(1),
            a_scale.stride(0), b_scale.stride(0), bias_t.stride(0))
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if not interpreting and M * N * K >= AUTOTUNE_MIN_MACS:
        _int8_matmul_autotuned[grid](*args, HAS_BIAS=bias is not None, GELU=gelu,
                                     GELU_TANH=gelu_tanh)
    else:
        _int8_matmul_kernel[grid](*args, HAS_BIAS=bias is not None, GELU=gelu,
                                  GELU_TANH=gelu_tanh, **_fixed_config(M, interpreting))
    return c
