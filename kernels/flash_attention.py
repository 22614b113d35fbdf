"""Triton flash attention forward (``xray_ops.flash_attention``), the CLS-attention row, and
the pieces the backward (flash_attention_bwd.py) shares.

FlashAttention-2 forward: a program owns BLOCK_M queries of one (batch, head) and streams the
keys in blocks of BLOCK_N with an online softmax in the log2 domain, so the (Nq, Nk) score
matrix never reaches HBM; it writes out and the row log-sum-exp (lse, float32). key_bias is
added to every logit of its key. The CLS row (query 0's softmax, mean over heads) is not a
second attention: with lse from the forward it is exp(scale·q₀·kᵀ + bias − lse₀), one row per
head, computed by :func:`_cls_attn_kernel` in one pass over the keys.

Head dims that are not a power of two (80 = 64 + 16, 96 = 64 + 32) are split into two
power-of-two chunks (BLOCK_D0 + BLOCK_D1) and use two dots, instead of padding to 128.
fp16/bf16 use tensor cores with fp32 accumulation; fp32 inputs use IEEE fp32 dots
(input_precision="ieee"), or TF32 tensor cores when torch's float32 matmul setting allows TF32
(torch.backends.cuda.matmul.fp32_precision = "tf32", or set_float32_matmul_precision("high")).
Each kind of dot has its own tiles (see TilePolicy). Every input may have any strides (the packed
qkv view included).

Layouts: dense q (B, H, Nq, D), k/v (B, H, Nk, D), key_bias (B, Nk), lse (B, H, Nq);
varlen (VARLEN=True) q (Tq, H, D), k/v (Tk, H, D), key_bias (Tk,), lse (H, Tq) with sample b
at rows cu_seqlens[b]:cu_seqlens[b+1] — passed to the kernels as the same four strides with a
batch stride of 0 and a per-sample start row.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------
# tile configs
# ----------------------------------------------------------------------------------------------
# Three kinds of dot need different tiles:
#   "fp16": fp16/bf16 operands on tensor cores (fp32 accumulation);
#   "tf32": fp32 operands on tensor cores as TF32, when torch's float32 matmul setting allows it;
#   "ieee": fp32 operands in IEEE fp32 (FMA, no tensor cores): each thread keeps its rows and
#           columns of both operands over the whole head dim in registers, so its tiles are
#           small and use 8 warps.
# Every tile listed compiles for sm_90 without spills up to its max_d (the AOT check,
# tools/triton_aot_check.py, compiles every tile `auto` can pick); tiles whose shared memory
# would exceed the device's are pruned before compiling. Under the interpreter one small tile.
# XRAY_OPS_AUTOTUNE=0 (read at call time) launches the heuristic tile: no tuning runs.


@dataclasses.dataclass(frozen=True)
class Tile:
    """A tile config (BLOCK_M, BLOCK_N, warps, stages) and the largest head dim it fits."""

    m: int
    n: int
    warps: int
    stages: int
    max_d: int = 256

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.m, self.n, self.warps, self.stages

    def config(self) -> triton.Config:
        return _config(self.m, self.n, self.warps, self.stages)


def _config(m: int, n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)


def config_shape(cfg: triton.Config) -> tuple[int, int, int, int]:
    return cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages


def autotune_enabled() -> bool:
    return not INTERPRETING and os.environ.get("XRAY_OPS_AUTOTUNE", "1") != "0"


def tf32_allowed() -> bool:
    """Whether torch's float32 matmul setting allows TF32 (torch.backends.cuda.matmul.
    fp32_precision == "tf32", or the legacy torch.set_float32_matmul_precision("high"))."""
    p = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    if p in ("tf32", "ieee"):
        return p == "tf32"
    try:
        return torch.get_float32_matmul_precision() != "highest"
    except RuntimeError:  # torch refuses to answer when both APIs were used: be exact
        return False


def input_precision(dtype: torch.dtype) -> str:
    """The dots' input_precision: fp32 in IEEE fp32 unless torch allows TF32 (fp16/bf16 dots
    ignore it)."""
    return "ieee" if dtype == torch.float32 and not tf32_allowed() else "tf32"


def dot_kind(dtype: torch.dtype, precision: str) -> str:
    if precision == "ieee":
        return "ieee"
    return "tf32" if dtype == torch.float32 else "fp16"


def length_bucket(n: int) -> int:
    """The autotuner's view of a sequence length: the power of two >= n (at least 16), so
    197, 199 and 256 tokens share one tuning (the kernels take the exact length as well)."""
    return triton.next_power_of_2(max(int(n), 16))


# Shared memory a block may use on sm_90 (H100 / H200), and the limit assumed for tensors not
# on a CUDA device (the AOT check, tools/triton_aot_check.py, sets it per target arch).
SM90_SMEM = 227 * 1024
DEFAULT_SMEM_LIMIT = SM90_SMEM


@functools.lru_cache(maxsize=None)
def _device_smem(index: int) -> int:
    props = triton.runtime.driver.active.utils.get_device_properties(index)
    return int(props["max_shared_mem"])


def smem_limit(device: torch.device) -> int:
    """Shared memory one block may use on ``device`` (the opt-in maximum)."""
    if device.type != "cuda":
        return DEFAULT_SMEM_LIMIT
    return _device_smem(device.index if device.index is not None else torch.cuda.current_device())


@dataclasses.dataclass(frozen=True)
class TilePolicy:
    """The tiles one kernel may run with, per dot kind, and the shared memory each needs.

    smem_elems(m, n, stages, d) -> operand elements staged in shared memory for a head dim
    padded to d; smem() turns it into bytes plus a margin: an upper bound of what Triton
    allocates (tests/test_flash_attention_tiles.py holds it to the compiled kernels' figures).
    """

    name: str
    tiles: dict  # dot kind -> tuple of Tile, in order of preference
    smem_elems: Callable[[int, int, int, int], int]
    interp: tuple  # the one (m, n, warps, stages) under the interpreter

    def configs(self) -> list[triton.Config]:
        """Every config of every kind (the autotuner's list; prune() picks per call)."""
        if INTERPRETING:
            return [_config(*self.interp)]
        tiles = [t for kind in self.tiles.values() for t in kind] + list(SMALL_TILES)
        shapes = dict.fromkeys(t.shape for t in tiles)
        return [_config(*s) for s in shapes]

    def smem(self, shape, d: int, esize: int) -> int:
        m, n, _, stages = shape
        d0, d1 = head_dim_blocks(d)
        return esize * self.smem_elems(m, n, max(stages, 1), d0 + d1) + 4096

    def admitted(self, kind: str, d: int, esize: int, limit: int, n_q: int, n_k: int) -> list:
        """Tiles `auto` may pick: fit the head dim and shared memory, and are not much longer
        than the (bucketed) sequences (a 7-token call needs no 128-row tile). Where none of
        the kind's tiles fits the shared memory (a 99 KB consumer GPU at D = 256), the small
        tiles every kind compiles without spills."""
        fit = [t for t in self.tiles[kind]
               if d <= t.max_d and self.smem(t.shape, d, esize) <= limit]
        if not fit:
            fit = [t for t in SMALL_TILES if self.smem(t.shape, d, esize) <= limit]
        short = [t for t in fit if t.m <= max(n_q, 32) and t.n <= max(n_k, 32)]
        return short or fit[:1]

    def prune(self, configs, named_args, **kwargs):
        """early_config_prune: the configs admitted for this call."""
        q = named_args["Q_ptr"]
        kind = dot_kind(q.dtype, kwargs["INPUT_PRECISION"])
        ok = {t.shape for t in self.admitted(kind, kwargs["HEAD_DIM"], q.element_size(),
                                             smem_limit(q.device), named_args["N_Q_BUCKET"],
                                             named_args["N_K_BUCKET"])}
        return [c for c in configs if config_shape(c) in ok] or configs[:1]

    def pick(self, q: torch.Tensor, precision: str, d: int, n_q: int, n_k: int,
             preferred: tuple) -> triton.Config:
        """The heuristic tile: ``preferred`` when admitted, else the first admitted."""
        if INTERPRETING:
            return _config(*self.interp)
        tiles = self.admitted(dot_kind(q.dtype, precision), d, q.element_size(),
                              smem_limit(q.device), length_bucket(n_q), length_bucket(n_k))
        shape = preferred if preferred in [t.shape for t in tiles] else tiles[0].shape
        return _config(*shape)

    def check_forced(self, cfg: triton.Config, q: torch.Tensor, d: int) -> None:
        """A forced config that cannot fit in shared memory fails here, before compiling."""
        need, limit = self.smem(config_shape(cfg), d, q.element_size()), smem_limit(q.device)
        if need > limit:
            raise ValueError(
                f"{self.name}: tile config BLOCK_M={cfg.kwargs['BLOCK_M']} "
                f"BLOCK_N={cfg.kwargs['BLOCK_N']} num_stages={cfg.num_stages} needs about "
                f"{need // 1024} KB of shared memory at head dim {d} in {q.dtype}; a block "
                f"has {limit // 1024} KB on this device")


# the IEEE tiles: 8 warps on small tiles fit every head dim of every kind, in 56 KB at D = 256
SMALL_TILES = (Tile(32, 16, 8, 2), Tile(16, 16, 8, 1))


def _fwd_smem(m, n, stages, d):
    return d * (m + stages * 2 * n)  # q, then K and V per pipeline stage


FWD = TilePolicy(
    "flash attention forward",
    {"fp16": (Tile(128, 64, 8, 3, 192), Tile(64, 64, 4, 3, 192), Tile(64, 32, 4, 3),
              Tile(128, 32, 8, 3)),
     "tf32": (Tile(64, 32, 4, 2), Tile(64, 64, 4, 2, 128), Tile(64, 64, 8, 2), Tile(32, 32, 4, 2)),
     "ieee": (Tile(32, 16, 8, 2), Tile(16, 32, 8, 2), Tile(16, 16, 8, 1))},
    _fwd_smem, (32, 64, 4, 1))
FWD_CONFIGS = FWD.configs()
CLS_CONFIGS = [triton.Config({"BLOCK_N": 32 if INTERPRETING else 64}, num_warps=4)]
# tuned per (bucketed lengths, head dim, masking, dot kind); dtypes join Triton's key
FWD_KEY = ["N_Q_BUCKET", "N_K_BUCKET", "HEAD_DIM", "CAUSAL", "HAS_BIAS", "VARLEN",
           "INPUT_PRECISION"]


def fwd_heuristic(q: torch.Tensor, n_q: int, n_k: int, d: int, precision: str) -> triton.Config:
    if length_bucket(n_k) <= 256:
        preferred = (64, 32, 4, 3)
    else:
        preferred = (64, 64, 4, 3) if d > 64 else (128, 64, 8, 3)
    return FWD.pick(q, precision, d, n_q, n_k, preferred)


def head_dim_blocks(d: int) -> tuple[int, int]:
    """(BLOCK_D0, BLOCK_D1): D as a power of two plus a second power-of-two chunk (0 if none).

    32 -> (32, 0), 80 -> (64, 16), 96 -> (64, 32), 112 -> (64, 64) masked to 48; each chunk is
    at least 16 wide (the smallest tl.dot K).
    """
    d0 = 1 << (d.bit_length() - 1)
    d0 = max(d0, 16)
    rest = d - d0
    d1 = 0 if rest <= 0 else max(16, triton.next_power_of_2(rest))
    return d0, d1


def bhnd_strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int, int]:
    """(batch, head, token, dim) strides of a dense (B, H, N, D) or varlen (T, H, D) tensor."""
    if varlen:
        return 0, t.stride(1), t.stride(0), t.stride(2)
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def bn_strides(t: torch.Tensor | None, varlen: bool) -> tuple[int, int]:
    """(batch, token) strides of a dense (B, N) or varlen (T,) per-key tensor."""
    if t is None:
        return 0, 0
    return (0, t.stride(0)) if varlen else (t.stride(0), t.stride(1))


def bhn_strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, head, token) strides of a dense (B, H, N) or varlen (H, T) row statistic."""
    if varlen:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _program_block(N, H, BLOCK: tl.constexpr):
    """One flat grid axis over (batch, head, block of N): (b, h, block index), b and h int64.

    The blocks of one (b, h) are adjacent, so they run together and share that head in L2."""
    pid = tl.program_id(0)
    num = tl.cdiv(N, BLOCK)
    bh = (pid // num).to(tl.int64)
    return bh // H, bh % H, pid % num


@triton.jit
def _seq_start_len(CU_ptr, b, N, VARLEN: tl.constexpr):
    """Start row and length of sample b: (0, N) dense, from cu_seqlens when VARLEN."""
    if VARLEN:
        first = tl.load(CU_ptr + b)
        length = tl.load(CU_ptr + b + 1) - first
        start = first.to(tl.int64)
    else:
        start = tl.zeros([], dtype=tl.int64)
        length = tl.zeros([], dtype=tl.int32) + N
    return start, length


@triton.jit
def _seq_window(CU_Q_ptr, CU_K_ptr, b, N_Q, N_K, VARLEN: tl.constexpr):
    """(q_start, len_q, k_start, len_k): where sample b's queries and keys start, and how many."""
    q_start, len_q = _seq_start_len(CU_Q_ptr, b, N_Q, VARLEN)
    k_start, len_k = _seq_start_len(CU_K_ptr, b, N_K, VARLEN)
    return q_start, len_q, k_start, len_k


@triton.jit
def _head_ptr(ptr, b, h, start, stride_b, stride_h, stride_n):
    """Row ``start`` of head h of sample b in a (B, H, N, ·) [varlen (T, H, ·)] tensor."""
    return ptr + b * stride_b + h * stride_h + start * stride_n


@triton.jit
def _load_rows(
    base,  # row 0 of one (batch, head), shape (len, D)
    offs,  # the rows to load, shape (R,)
    mask,  # which of them exist, shape (R,)
    stride_n,
    stride_d,
    HEAD_DIM: tl.constexpr,
    BLOCK_D0: tl.constexpr,
    BLOCK_D1: tl.constexpr,
    TRANS: tl.constexpr,  # return the chunks transposed, (D0, R) and (D1, R)
):
    """(x0, x1): the rows as their two head-dim chunks, (R, D0) and (R, D1), in the tensor's
    dtype; missing rows and the padding past HEAD_DIM read as 0. Without a second chunk
    (BLOCK_D1 == 0) x1 is x0 and must not be used."""
    offs_d0 = tl.arange(0, BLOCK_D0)
    if TRANS:
        x0 = tl.load(base + offs[None, :] * stride_n + offs_d0[:, None] * stride_d,
                     mask=mask[None, :], other=0.0)
    else:
        x0 = tl.load(base + offs[:, None] * stride_n + offs_d0[None, :] * stride_d,
                     mask=mask[:, None], other=0.0)
    x1 = x0
    if BLOCK_D1 > 0:
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        d1_mask = offs_d1 < HEAD_DIM
        if TRANS:
            x1 = tl.load(base + offs[None, :] * stride_n + offs_d1[:, None] * stride_d,
                         mask=mask[None, :] & d1_mask[:, None], other=0.0)
        else:
            x1 = tl.load(base + offs[:, None] * stride_n + offs_d1[None, :] * stride_d,
                         mask=mask[:, None] & d1_mask[None, :], other=0.0)
    return x0, x1


@triton.jit
def _store_rows(base, offs, mask, stride_n, stride_d, x0, x1, HEAD_DIM: tl.constexpr,
                BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr):
    """Store the chunks (x0 (R, D0), x1 (R, D1), float32) into rows offs of a (len, D) tile:
    one cast to the tensor's dtype, nothing past HEAD_DIM."""
    offs_d0 = tl.arange(0, BLOCK_D0)
    tl.store(base + offs[:, None] * stride_n + offs_d0[None, :] * stride_d,
             x0.to(base.dtype.element_ty), mask=mask[:, None])
    if BLOCK_D1 > 0:
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        tl.store(base + offs[:, None] * stride_n + offs_d1[None, :] * stride_d,
                 x1.to(base.dtype.element_ty), mask=mask[:, None] & (offs_d1 < HEAD_DIM)[None, :])


@triton.jit
def _dot2(a0, a1, b0, b1, BLOCK_D1: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """a · b over the head dim in its chunks: a0 · b0 (+ a1 · b1), float32."""
    acc = tl.dot(a0, b0, input_precision=INPUT_PRECISION)
    if BLOCK_D1 > 0:
        acc += tl.dot(a1, b1, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _load_lse(LSE_row_ptr, offs, mask, stride):
    """lse of rows offs, with padding and fully masked rows (lse -inf) at +inf: their P is 0."""
    lse = tl.load(LSE_row_ptr + offs * stride, mask=mask, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse)


@triton.jit
def _row0_log2_probs(
    q_row_ptr,  # query 0 of one (batch, head), shape (D,)
    stride_qd,
    k_base,  # keys of that (batch, head), shape (len_k, D)
    stride_kn,
    stride_kd,
    bias_base,  # key_bias of the sample, shape (len_k,)
    stride_an,
    lse0,  # natural-log lse of query 0, scalar float32
    offs_n,  # key indices, shape (BLOCK_N,)
    len_k,
    qk_scale,  # scale * log2(e)
    HEAD_DIM: tl.constexpr,
    BLOCK_D0: tl.constexpr,
    BLOCK_D1: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """P[0, offs_n] = exp2(log2-domain logit − lse₀·log2e), 0 where masked, shape (BLOCK_N,)."""
    n_mask = offs_n < len_k
    offs_d0 = tl.arange(0, BLOCK_D0)
    q0 = tl.load(q_row_ptr + offs_d0 * stride_qd).to(tl.float32)
    k0 = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d0[None, :] * stride_kd,
                 mask=n_mask[:, None], other=0.0).to(tl.float32)
    # one row: a dot product per key, no tensor-core tile needed
    s = tl.sum(k0 * q0[None, :], 1)
    if BLOCK_D1 > 0:
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        d1_mask = offs_d1 < HEAD_DIM
        q1 = tl.load(q_row_ptr + offs_d1 * stride_qd, mask=d1_mask, other=0.0).to(tl.float32)
        k1 = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d1[None, :] * stride_kd,
                     mask=n_mask[:, None] & d1_mask[None, :], other=0.0).to(tl.float32)
        s += tl.sum(k1 * q1[None, :], 1)
    s = s * qk_scale
    if HAS_BIAS:
        bias = tl.load(bias_base + offs_n * stride_an, mask=n_mask, other=0.0).to(tl.float32)
        s += bias * 1.4426950408889634
    # a fully masked row 0 has lse -inf and P = 0: shift by +inf instead of -inf
    lse0 = tl.where(lse0 == float("-inf"), float("inf"), lse0)
    p = tl.exp2(s - lse0 * 1.4426950408889634)
    valid = n_mask
    if CAUSAL:
        valid = valid & (offs_n == 0)  # query 0 sees key 0 only
    return tl.where(valid, p, 0.0)


@triton.jit
def _attn_fwd_kernel(
    Q_ptr,  # queries, shape (B, H, Nq, D) [varlen (Tq, H, D)], any strides
    K_ptr,  # keys, shape (B, H, Nk, D) [varlen (Tk, H, D)], any strides
    V_ptr,  # values, shape like K, any strides
    BIAS_ptr,  # key_bias, shape (B, Nk) [varlen (Tk,)], any float dtype (read iff HAS_BIAS)
    OUT_ptr,  # out, shape (B, H, Nq, D) [varlen (Tq, H, D)], q's dtype
    LSE_ptr,  # log-sum-exp, shape (B, H, Nq) [varlen (H, Tq)], float32
    CU_Q_ptr,  # cumulative query lengths, shape (B + 1,) int32 (read iff VARLEN)
    CU_K_ptr,  # cumulative key lengths, shape (B + 1,) int32 (read iff VARLEN)
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ab, stride_an,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    H,
    N_Q,  # query length [varlen: max_seqlen_q]
    N_K,  # key length [varlen: max_seqlen_k]
    N_Q_BUCKET,  # length_bucket(N_Q), N_K_BUCKET: the autotuner's key, unused in the body
    N_K_BUCKET,
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr,
    BLOCK_D0: tl.constexpr,
    BLOCK_D1: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    VARLEN: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # one flat grid axis: no 65535 limit on B·H
    b, h, start_m = _program_block(N_Q, H, BLOCK_M)
    q_start, len_q, k_start, len_k = _seq_window(CU_Q_ptr, CU_K_ptr, b, N_Q, N_K, VARLEN)
    k_base = _head_ptr(K_ptr, b, h, k_start, stride_kb, stride_kh, stride_kn)
    v_base = _head_ptr(V_ptr, b, h, k_start, stride_vb, stride_vh, stride_vn)
    bias_base = BIAS_ptr + b * stride_ab + k_start * stride_an

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < len_q
    q0, q1 = _load_rows(_head_ptr(Q_ptr, b, h, q_start, stride_qb, stride_qh, stride_qm), offs_m,
                        m_mask, stride_qm, stride_qd, HEAD_DIM, BLOCK_D0, BLOCK_D1, False)
    acc0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
    if BLOCK_D1 > 0:
        acc1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    hi = len_k
    if CAUSAL:
        # query i sees keys 0..i: stop after the block holding this tile's last query
        hi = tl.minimum(hi, (start_m + 1) * BLOCK_M)
    # varlen: query blocks past this sample's end have nothing to do
    hi = tl.where(start_m * BLOCK_M < len_q, hi, 0)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < len_k
        kt0, kt1 = _load_rows(k_base, offs_n, n_mask, stride_kn, stride_kd, HEAD_DIM, BLOCK_D0,
                              BLOCK_D1, True)
        s = _dot2(q0, q1, kt0, kt1, BLOCK_D1, INPUT_PRECISION) * qk_scale
        if HAS_BIAS:
            bias = tl.load(bias_base + offs_n * stride_an, mask=n_mask, other=0.0).to(tl.float32)
            s += bias[None, :] * 1.4426950408889634
        valid = n_mask[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(valid, s, float("-inf"))
        # online softmax: rescale the running sum and output when the row max grows; a row
        # whose keys are all masked so far keeps max -inf, shift it by 0 (exp2 gives 0, not NaN)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v0, v1 = _load_rows(v_base, offs_n, n_mask, stride_vn, stride_vd, HEAD_DIM, BLOCK_D0,
                            BLOCK_D1, False)
        acc0 = acc0 * alpha[:, None] + tl.dot(p.to(v0.dtype), v0, input_precision=INPUT_PRECISION)
        if BLOCK_D1 > 0:
            acc1 = acc1 * alpha[:, None] + tl.dot(p.to(v1.dtype), v1,
                                                  input_precision=INPUT_PRECISION)
        m_i = m_new

    # fully masked rows (l = 0): out 0 and lse -inf, as torch SDPA
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    m_use = tl.where(m_i == float("-inf"), 0.0, m_i)
    lse = tl.where(l_i == 0.0, float("-inf"), (m_use + tl.log2(l_safe)) * 0.6931471805599453)
    tl.store(LSE_ptr + b * stride_lb + h * stride_lh + (q_start + offs_m) * stride_lm, lse,
             mask=m_mask)
    out0 = acc0 / l_safe[:, None]
    out1 = out0
    if BLOCK_D1 > 0:
        out1 = acc1 / l_safe[:, None]
    _store_rows(_head_ptr(OUT_ptr, b, h, q_start, stride_ob, stride_oh, stride_om), offs_m, m_mask,
                stride_om, stride_od, out0, out1, HEAD_DIM, BLOCK_D0, BLOCK_D1)


@triton.jit
def _cls_attn_kernel(
    Q_ptr,  # queries, shape (B, H, Nq, D) [varlen (Tq, H, D)], any strides
    K_ptr,  # keys, shape (B, H, Nk, D) [varlen (Tk, H, D)], any strides
    BIAS_ptr,  # key_bias, shape (B, Nk) [varlen (Tk,)] (read iff HAS_BIAS)
    LSE_ptr,  # log-sum-exp, shape (B, H, Nq) [varlen (H, Tq)], float32
    CLS_ptr,  # cls_attn out, shape (B, Nk) [varlen (Tk,)], q's dtype, contiguous
    CU_Q_ptr,  # cumulative query lengths (B + 1,) int32 (VARLEN)
    CU_K_ptr,  # cumulative key lengths (B + 1,) int32 (VARLEN)
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_ab, stride_an,
    stride_lb, stride_lh, stride_lm,
    stride_cb, stride_cn,
    H,
    N_Q,
    N_K,
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr,
    BLOCK_D0: tl.constexpr,
    BLOCK_D1: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    VARLEN: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # a program owns BLOCK_N keys of one sample and sums row 0's probabilities over the heads
    # in a fixed order (deterministic, no atomics)
    pid = tl.program_id(0)
    num_n = tl.cdiv(N_K, BLOCK_N)
    b = (pid // num_n).to(tl.int64)
    start_n = pid % num_n
    q_start, len_q, k_start, len_k = _seq_window(CU_Q_ptr, CU_K_ptr, b, N_Q, N_K, VARLEN)
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for h in range(0, H):
        lse0 = tl.load(LSE_ptr + b * stride_lb + h * stride_lh + q_start * stride_lm)
        acc += _row0_log2_probs(
            _head_ptr(Q_ptr, b, h, q_start, stride_qb, stride_qh, stride_qm), stride_qd,
            _head_ptr(K_ptr, b, h, k_start, stride_kb, stride_kh, stride_kn), stride_kn, stride_kd,
            BIAS_ptr + b * stride_ab + k_start * stride_an, stride_an,
            lse0, offs_n, len_k, qk_scale,
            HEAD_DIM, BLOCK_D0, BLOCK_D1, CAUSAL, HAS_BIAS)
    tl.store(CLS_ptr + b * stride_cb + (k_start + offs_n) * stride_cn,
             (acc / H).to(CLS_ptr.dtype.element_ty), mask=offs_n < len_k)


_attn_fwd = triton.autotune(configs=FWD_CONFIGS, key=FWD_KEY,
                            prune_configs_by={"early_config_prune": FWD.prune})(_attn_fwd_kernel)


def launch(autotuned, kernel, grid, args, kwargs, config, heuristic, policy, q):
    """Run ``autotuned`` (its configs pruned by ``policy`` per call), or ``kernel`` with
    ``config`` (forced: tests; it must fit in shared memory) or the ``heuristic`` tile
    (autotuning off, or under the interpreter)."""
    if config is not None:
        policy.check_forced(config, q, kwargs["HEAD_DIM"])
    elif autotune_enabled():
        autotuned[grid](*args, **kwargs)
        return
    cfg = config if config is not None else heuristic
    kernel[grid](*args, **kwargs, **cfg.kwargs, num_warps=cfg.num_warps,
                 num_stages=cfg.num_stages)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _varlen_args(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, k):
    """(varlen, B, N_Q, N_K, cu_q, cu_k) for the dense or the varlen layout."""
    if cu_seqlens_q is None:
        return False, q.shape[0], q.shape[2], k.shape[2], q, q  # cu pointers unused
    return (True, cu_seqlens_q.numel() - 1, max_seqlen_q, max_seqlen_k,
            cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32))


def flash_attention_forward(q, k, v, key_bias, scale: float, causal: bool, want_cls: bool, *,
                            cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                            max_seqlen_k=None, config: triton.Config | None = None):
    """(out, cls_attn or None, lse).

    Dense: q (B, H, Nq, D), k/v (B, H, Nk, D), key_bias (B, Nk) or None -> out (B, H, Nq, D)
    stored as (B, Nq, H, D) (a transposed view, as SDPA's flash backend returns: the ViT's
    following transpose(1, 2).reshape is free), cls_attn (B, Nk), lse (B, H, Nq) float32.
    Varlen (cu_seqlens given): q (Tq, H, D), k/v (Tk, H, D), key_bias (Tk,) -> out (Tq, H, D),
    cls_attn (Tk,), lse (H, Tq). ``config`` forces a tile config (tests); default: autotuned.
    """
    varlen, B, N_Q, N_K, cu_q, cu_k = _varlen_args(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                   max_seqlen_k, k)
    D = q.shape[-1]
    H = q.shape[-2] if varlen else q.shape[1]
    if varlen:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty(H, q.shape[0], device=q.device, dtype=torch.float32)
    else:
        out = torch.empty(B, N_Q, H, D, device=q.device, dtype=q.dtype).transpose(1, 2)
        lse = torch.empty(B, H, N_Q, device=q.device, dtype=torch.float32)
    cls = None
    if want_cls:
        cls = torch.empty(k.shape[0] if varlen else (B, N_K), device=q.device, dtype=q.dtype)
    if B * H == 0 or q.numel() == 0:
        if cls is not None:
            cls.zero_()
        return out, cls, lse
    d0, d1 = head_dim_blocks(D)
    has_bias = key_bias is not None
    bias = key_bias if has_bias else q
    qk_scale = scale * LOG2E

    def grid(meta):
        return (triton.cdiv(N_Q, meta["BLOCK_M"]) * B * H,)

    args = (q, k, v, bias, out, lse, cu_q, cu_k,
            *bhnd_strides(q, varlen), *bhnd_strides(k, varlen), *bhnd_strides(v, varlen),
            *bn_strides(key_bias, varlen), *bhnd_strides(out, varlen), *bhn_strides(lse, varlen),
            H, N_Q, N_K, length_bucket(N_Q), length_bucket(N_K), qk_scale)
    prec = input_precision(q.dtype)
    kwargs = dict(HEAD_DIM=D, BLOCK_D0=d0, BLOCK_D1=d1, CAUSAL=causal, HAS_BIAS=has_bias,
                  VARLEN=varlen, INPUT_PRECISION=prec)
    launch(_attn_fwd, _attn_fwd_kernel, grid, args, kwargs, config,
           fwd_heuristic(q, N_Q, N_K, D, prec), FWD, q)
    if want_cls:
        cls_attn_forward(q, k, key_bias, lse, scale, causal, out=cls, cu_seqlens_q=cu_seqlens_q,
                         cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                         max_seqlen_k=max_seqlen_k)
    return out, cls, lse


def cls_attn_forward(q, k, key_bias, lse, scale: float, causal: bool, *, out=None,
                     cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None):
    """cls_attn (B, Nk) [varlen (Tk,)] = mean over heads of exp(scale·q₀·kᵀ + bias − lse₀).

    The helper every GPU backend uses to turn its forward's lse into the CLS row.
    """
    varlen, B, N_Q, N_K, cu_q, cu_k = _varlen_args(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                   max_seqlen_k, k)
    D = q.shape[-1]
    H = q.shape[-2] if varlen else q.shape[1]
    if out is None:
        out = torch.empty(k.shape[0] if varlen else (B, N_K), device=q.device, dtype=q.dtype)
    if B == 0 or out.numel() == 0:
        return out
    d0, d1 = head_dim_blocks(D)
    has_bias = key_bias is not None
    cfg = CLS_CONFIGS[0]
    # above D = 128 half the keys per program: 64 spilled 8 B per thread at D = 192 (sm_90)
    block_n = cfg.kwargs["BLOCK_N"] if D <= 128 or INTERPRETING else 32
    _cls_attn_kernel[(triton.cdiv(N_K, block_n) * B,)](
        q, k, key_bias if has_bias else q, lse, out, cu_q, cu_k,
        *bhnd_strides(q, varlen), *bhnd_strides(k, varlen), *bn_strides(key_bias, varlen),
        *bhn_strides(lse, varlen), *bn_strides(out, varlen),
        H, N_Q, N_K, scale * LOG2E,
        HEAD_DIM=D, BLOCK_D0=d0, BLOCK_D1=d1, CAUSAL=causal, HAS_BIAS=has_bias, VARLEN=varlen,
        BLOCK_N=block_n, num_warps=cfg.num_warps,
    )
    return out
