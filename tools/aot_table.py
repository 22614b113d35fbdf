"""What ``tools/triton_aot_check.py`` compiles: every Triton op, on representative shapes.

One :class:`Op` per launcher. ``run(**case)`` builds the launcher's inputs on the ``meta``
device (shapes, strides and storage offsets as the ops layer passes them, no memory, so
ViT-L at batch 256 costs nothing) and calls the launcher; every launch it makes is compiled
with every config it or its autotuner can pick. ``cases`` is the full table, ``quick`` the
subset ``make test`` compiles (tests/test_triton_aot.py). Adding an op is one entry in OPS.

Every case must be an input the dispatcher sends to the Triton backend; the check fails when
anything that can run spills, needs more shared memory than a block has, or exceeds a grid
limit.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Callable

import torch

FP16, BF16, FP32, FP64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
DTYPES = {"fp16": FP16, "bf16": BF16, "fp32": FP32, "fp64": FP64}


@dataclasses.dataclass(frozen=True)
class Op:
    name: str  # the op and direction, e.g. "flash_attention.forward"
    run: Callable[..., object]  # run(**case): meta inputs -> the launcher
    cases: tuple  # of dicts: the full table
    quick: tuple  # of dicts: make test's subset


def grid(**axes) -> tuple:
    """Every combination of the axes, as case dicts: grid(dtype=["fp16"], D=[64, 128])."""
    names = list(axes)
    return tuple(dict(zip(names, values)) for values in itertools.product(*axes.values()))


def meta(*shape, dtype=FP16) -> torch.Tensor:
    return torch.empty(*shape, device="meta", dtype=dtype)


# ----------------------------------------------------------------------------------------------
# flash attention (kernels/flash_attention.py, flash_attention_bwd.py)
# ----------------------------------------------------------------------------------------------
def _heads(D: int) -> int:
    return max(1, 768 // D)  # ViT-B width


def _qkv(B, N, H, D, dtype, layout):
    """q, k, v (B, H, N, D) as the ops layer passes them: "packed" are the views of timm's
    (B, N, 3, H, D) projection (flash_attention_qkvpacked), "dense" contiguous tensors."""
    if layout == "packed":
        return meta(B, N, 3, H, D, dtype=dtype).permute(2, 0, 3, 1, 4).unbind(0)
    return tuple(meta(B, H, N, D, dtype=dtype) for _ in range(3))


def _bnhd(B, H, N, D, dtype):
    # outputs and gradients of the dense op: (B, H, N, D) views of (B, N, H, D) storage
    return meta(B, N, H, D, dtype=dtype).transpose(1, 2)


def _precision(tf32: bool):
    """torch's float32 matmul precision for the call: "high" allows TF32."""
    class _Scope:
        def __enter__(self):
            self.old = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision("high" if tf32 else "highest")

        def __exit__(self, *exc):
            torch.set_float32_matmul_precision(self.old)

    return _Scope()


def flash_forward(dtype, D, N, features, layout="packed", B=32, tf32=False):
    from xray_ops.kernels import flash_attention as kf

    dt = DTYPES[dtype]
    H = _heads(D)
    q, k, v = _qkv(B, N, H, D, dt, layout)
    bias = meta(B, N, dtype=dt) if "bias" in features else None
    with _precision(tf32):
        kf.flash_attention_forward(q, k, v, bias, D ** -0.5, "causal" in features,
                                   "cls" in features)


def flash_backward(dtype, D, N, features, layout="packed", B=32, tf32=False):
    from xray_ops.kernels import flash_attention_bwd as kb

    dt = DTYPES[dtype]
    H = _heads(D)
    q, k, v = _qkv(B, N, H, D, dt, layout)
    if layout == "packed":  # one (B, N, 3, H, D) gradient, written through its views
        dq, dk, dv = meta(B, N, 3, H, D, dtype=dt).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        dq, dk, dv = (_bnhd(B, H, N, D, dt) for _ in range(3))
    out, lse = _bnhd(B, H, N, D, dt), meta(B, H, N, dtype=FP32)
    # the gradient of out.sum() is expanded (all strides 0); a ViT's is out's layout
    dout = meta(1, dtype=dt).expand(B, H, N, D) if "expanded" in features else _bnhd(B, H, N, D, dt)
    bias = meta(B, N, dtype=dt) if "bias" in features else None
    dcls = meta(B, N, dtype=dt) if "cls" in features else None
    dlse = meta(B, H, N, dtype=FP32) if "lse" in features else None
    with _precision(tf32):
        kb.flash_attention_backward(dout, dcls, dlse, q, k, v, bias, out, lse, D ** -0.5,
                                    "causal" in features, dq, dk, dv)


def _varlen(B, N, H, D, dt):
    T = B * N
    cu = meta(B + 1, dtype=torch.int32)
    return tuple(meta(T, H, D, dtype=dt) for _ in range(3)), cu, T


def flash_varlen_forward(dtype, D, N, features, B=16, tf32=False):
    """Samples of up to N tokens packed as (T, H, D); max_seqlen N."""
    from xray_ops.kernels import flash_attention as kf

    dt = DTYPES[dtype]
    H = _heads(D)
    (q, k, v), cu, T = _varlen(B, N, H, D, dt)
    bias = meta(T, dtype=dt) if "bias" in features else None
    with _precision(tf32):
        kf.flash_attention_forward(q, k, v, bias, D ** -0.5, "causal" in features,
                                   "cls" in features, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                   max_seqlen_q=N, max_seqlen_k=N)


def flash_varlen_backward(dtype, D, N, features, B=16, tf32=False):
    from xray_ops.kernels import flash_attention_bwd as kb

    dt = DTYPES[dtype]
    H = _heads(D)
    (q, k, v), cu, T = _varlen(B, N, H, D, dt)
    dq, dk, dv = (meta(T, H, D, dtype=dt) for _ in range(3))
    out, dout, lse = meta(T, H, D, dtype=dt), meta(T, H, D, dtype=dt), meta(H, T, dtype=FP32)
    bias = meta(T, dtype=dt) if "bias" in features else None
    dcls = meta(T, dtype=dt) if "cls" in features else None
    with _precision(tf32):
        kb.flash_attention_backward(dout, dcls, None, q, k, v, bias, out, lse, D ** -0.5,
                                    "causal" in features, dq, dk, dv, cu_seqlens_q=cu,
                                    cu_seqlens_k=cu, max_seqlen_q=N, max_seqlen_k=N)


# ----------------------------------------------------------------------------------------------
# EViT (kernels/evit_select.py)
# ----------------------------------------------------------------------------------------------
def _evit_inputs(dtype, N, C, B):
    dt = DTYPES[dtype]
    x = meta(B, N, C, dtype=dt)
    # the CLS row to the patch tokens: cls_attn[:, 1:] of flash attention's (B, N) row
    cls_attn = meta(B, N, dtype=dt)[:, 1:]
    return x, cls_attn


def evit_forward(dtype, N, C, keep_rate=0.7, B=64, fuse=True):
    from xray_ops.kernels import evit_select as k

    x, a = _evit_inputs(dtype, N, C, B)
    k.evit_select_forward(x, a, math.ceil(keep_rate * (N - 1)), fuse)


def evit_backward(dtype, N, C, keep_rate=0.7, B=64, fuse=True):
    from xray_ops.kernels import evit_select as k

    x, a = _evit_inputs(dtype, N, C, B)
    keep = math.ceil(keep_rate * (N - 1))
    grad_out = meta(B, 1 + keep + int(fuse), C, dtype=DTYPES[dtype])
    k.evit_select_backward(grad_out, x, a, keep, fuse)


# ----------------------------------------------------------------------------------------------
# ToMe (kernels/tome_match.py, tome_merge.py)
# ----------------------------------------------------------------------------------------------
def tome_match(dtype, N, D, r=8, B=64, class_token=True, distill_token=False):
    from xray_ops.kernels import tome_match as k

    # the metric is the mean of k over heads: (B, N, D) contiguous
    k.tome_match(meta(B, N, D, dtype=DTYPES[dtype]), r, class_token, distill_token)


def _merge_plan(B, N, r):
    i64 = torch.int64
    return meta(B, N, dtype=i64), meta(B, N, dtype=i64), meta(B, N - r + 1, dtype=i64)


def tome_merge_forward(dtype, N, C, r=8, B=64, size=True):
    from xray_ops.kernels import tome_merge as k

    dt = DTYPES[dtype]
    dest, slot_src, slot_start = _merge_plan(B, N, r)
    k.tome_merge_forward(meta(B, N, C, dtype=dt), meta(B, N, 1, dtype=dt) if size else None,
                         dest, slot_src, slot_start)


def tome_merge_backward(dtype, N, C, r=8, B=64, size=True):
    from xray_ops.kernels import tome_merge as k

    dt = DTYPES[dtype]
    dest, _, _ = _merge_plan(B, N, r)
    n_out = N - r
    k.tome_merge_backward(meta(B, n_out, C, dtype=dt), meta(B, n_out, 1, dtype=dt),
                          meta(B, N, C, dtype=dt), meta(B, N, 1, dtype=dt) if size else None,
                          meta(B, n_out, C, dtype=dt), meta(B, n_out, 1, dtype=dt), dest, size)


# ----------------------------------------------------------------------------------------------
# int8 (kernels/int8_quant.py, int8_gemm.py)
# ----------------------------------------------------------------------------------------------
def quantize_per_token(dtype, M, K):
    from xray_ops.kernels import int8_quant as k

    k.quantize_per_token(meta(M, K, dtype=DTYPES[dtype]))


def layernorm_quant(dtype, M, C, affine=True):
    from xray_ops.kernels import int8_quant as k

    dt = DTYPES[dtype]
    w = meta(C, dtype=dt) if affine else None
    k.layernorm_quant(meta(M, C, dtype=dt), w, w, 1e-6)


def int8_matmul(out, M, N, K, bias=True, gelu=False):
    from xray_ops.kernels import int8_gemm as k

    dt = DTYPES[out]
    a_q, b_q = meta(M, K, dtype=torch.int8), meta(N, K, dtype=torch.int8)
    # scales as int8_linear passes them: quantize_per_token's (M, 1) and the weight's (N,)
    k.int8_matmul(a_q, b_q, meta(M, 1, dtype=FP32), meta(N, dtype=FP32),
                  meta(N, dtype=dt) if bias else None, dt, gelu)


# ----------------------------------------------------------------------------------------------
# training kernels (kernels/layer_norm.py, bias_gelu.py, lion.py, contrastive_loss.py)
# ----------------------------------------------------------------------------------------------
def _ln_inputs(dtype, M, C, params):
    dt = DTYPES[dtype]
    p = meta(C, dtype=FP32 if params == "fp32" else dt)  # fp32 master weights beside bf16 rows
    return dt, p


def layer_norm_forward(dtype, M, C, residual=True, params="same"):
    from xray_ops.kernels import layer_norm as k

    dt, p = _ln_inputs(dtype, M, C, params)
    k.layer_norm_forward(meta(M, C, dtype=dt), p, p, 1e-6,
                         meta(M, C, dtype=dt) if residual else None, p if residual else None)


def layer_norm_backward(dtype, M, C, residual=True, params="same"):
    from xray_ops.kernels import layer_norm as k

    dt, p = _ln_inputs(dtype, M, C, params)
    rows = [meta(M, C, dtype=dt) for _ in range(4)]
    k.layer_norm_backward(rows[0], rows[1] if residual else None, rows[2],
                          rows[3] if residual else None, p, p, p if residual else None,
                          meta(M, dtype=FP32), meta(M, dtype=FP32))


def bias_gelu_forward(dtype, M, C, approximate="none"):
    from xray_ops.kernels import bias_gelu as k

    dt = DTYPES[dtype]
    k.bias_gelu_forward(meta(M, C, dtype=dt), meta(C, dtype=dt), approximate)


def bias_gelu_backward(dtype, M, C, approximate="none"):
    from xray_ops.kernels import bias_gelu as k

    dt = DTYPES[dtype]
    k.bias_gelu_backward(meta(M, C, dtype=dt), meta(M, C, dtype=dt), meta(C, dtype=dt),
                         approximate)


# a ViT-L/16's parameter shapes, in kind (a block's, then the embeddings and head)
_VIT_L_SHAPES = [(1024,), (3072, 1024), (3072,), (1024, 1024), (4096, 1024), (4096,),
                 (1024, 4096), (1, 197, 1024), (1024, 3, 16, 16), (1000, 1024)]


def lion(dtype, state):
    from xray_ops.kernels import lion as k

    dt, st = DTYPES[dtype], DTYPES[state]
    k.lion_step([meta(*s, dtype=dt) for s in _VIT_L_SHAPES],
                [meta(*s, dtype=dt) for s in _VIT_L_SHAPES],
                [meta(*s, dtype=st) for s in _VIT_L_SHAPES], 1e-4, 0.9, 0.99, 0.1)


def _scale():
    return torch.empty((), device="meta", dtype=FP32)  # the logit scale, 0-dim


def contrastive_forward(dtype, B, C):
    from xray_ops.kernels import contrastive_loss as k

    dt = DTYPES[dtype]
    k.row_stats(meta(B, C, dtype=dt), meta(B, C, dtype=dt), _scale())


def contrastive_backward(dtype, B, C, form="full"):
    from xray_ops.kernels import contrastive_loss as k

    dt = DTYPES[dtype]
    lse = meta(B, dtype=FP32)
    # the full form's pass has both softmax terms, the local form's one or the other
    k.row_grads(meta(B, C, dtype=dt), meta(B, C, dtype=dt), _scale(), lse,
                lse if form == "full" else None)
    if form == "local":
        k.row_grads(meta(B, C, dtype=dt), meta(B, C, dtype=dt), _scale(), None, lse)


# ----------------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------------
_FLASH_D = [32, 64, 80, 96, 128, 192, 256]
_FEATURES = ["bias+cls", "causal"]  # every extra on (with the ViT's layout), and causal alone

# ViT shapes: 197 tokens (224 px, /16), 1025 (512 px), and a short 50-token sequence.
_FLASH_CASES = (grid(dtype=["fp16", "bf16", "fp32"], D=_FLASH_D, N=[197, 1025],
                     features=_FEATURES)
                + grid(dtype=["fp32"], D=[64, 128, 256], N=[197, 1025], features=["bias+cls"],
                       tf32=[True])
                + grid(dtype=["fp16"], D=[64], N=[50], features=["bias+cls"])
                + grid(dtype=["fp16", "fp32"], D=[64], N=[197], features=["bias+cls"],
                       layout=["dense"]))
_FLASH_BWD_CASES = (_FLASH_CASES
                    + grid(dtype=["fp16"], D=[64], N=[197], features=["bias+cls+lse+expanded"]))
_VARLEN_CASES = grid(dtype=["fp16", "bf16", "fp32"], D=[64, 128], N=[197, 1025],
                     features=["bias+cls"])

OPS = [
    Op("flash_attention.forward", flash_forward, _FLASH_CASES,
       grid(dtype=["fp16"], D=[64], N=[197], features=["bias+cls"])
       + grid(dtype=["fp32"], D=[128], N=[1025], features=["bias+cls"])
       + grid(dtype=["bf16"], D=[256], N=[1025], features=["causal"])),
    Op("flash_attention.backward", flash_backward, _FLASH_BWD_CASES,
       grid(dtype=["fp16"], D=[128], N=[1025], features=["bias+cls"])
       + grid(dtype=["fp32"], D=[64], N=[197], features=["bias+cls"])),
    Op("flash_attention_varlen.forward", flash_varlen_forward, _VARLEN_CASES,
       grid(dtype=["fp16"], D=[64], N=[197], features=["bias+cls"])),
    Op("flash_attention_varlen.backward", flash_varlen_backward, _VARLEN_CASES,
       grid(dtype=["bf16"], D=[64], N=[197], features=["bias+cls"])),
    Op("evit_select.forward", evit_forward,
       grid(dtype=["fp16", "bf16", "fp32", "fp64"], N=[197, 577, 8193], C=[384, 768, 1024]),
       grid(dtype=["bf16"], N=[197], C=[768])),
    Op("evit_select.backward", evit_backward,
       grid(dtype=["fp16", "bf16", "fp32", "fp64"], N=[197, 577, 8193], C=[384, 768, 1024]),
       grid(dtype=["bf16"], N=[197], C=[768])),
    Op("tome_match", tome_match,
       grid(dtype=["fp16", "bf16", "fp32", "fp64"], N=[197, 577], D=[64, 768, 1024]),
       grid(dtype=["fp16"], N=[197], D=[64])),
    # N = 2**20: past the 65535-block grid y limit a 2-D grid had
    Op("tome_merge.forward", tome_merge_forward,
       grid(dtype=["fp16", "bf16", "fp32", "fp64"], N=[197, 577, 2**20], C=[384, 768, 1024]),
       grid(dtype=["bf16"], N=[197, 2**20], C=[768])),
    Op("tome_merge.backward", tome_merge_backward,
       grid(dtype=["fp16", "bf16", "fp32", "fp64"], N=[197, 577, 2**20], C=[384, 768, 1024]),
       grid(dtype=["bf16"], N=[197, 2**20], C=[768])),
    Op("int8.quantize_per_token", quantize_per_token,
       grid(dtype=["fp16", "bf16", "fp32"], M=[50432], K=[768, 1024, 3072, 4096, 16384, 20000]),
       grid(dtype=["bf16"], M=[50432], K=[768, 20000])),
    Op("int8.layernorm_quant", layernorm_quant,
       grid(dtype=["fp16", "bf16", "fp32"], M=[50432], C=[768, 1024, 4096, 16384]),
       grid(dtype=["bf16"], M=[50432], C=[768])),
    # M = 197 tokens x batch 1 (fixed config) and x batch 256 (autotuned: M·N·K >= 2**30);
    # N, K of a ViT-L fc1 / fc2 and qkv
    Op("int8.matmul", int8_matmul,
       grid(out=["fp16", "bf16", "fp32"], M=[197, 50432], N=[4096], K=[1024],
            bias=[True], gelu=[True, False])
       + grid(out=["bf16"], M=[50432], N=[1024], K=[4096], bias=[True, False], gelu=[False])
       + grid(out=["bf16"], M=[50432], N=[3072], K=[1024], bias=[True], gelu=[False]),
       grid(out=["bf16"], M=[50432], N=[4096], K=[1024], bias=[True], gelu=[True])),
    # training kernels: rows of a ViT at batch 256 (M = 50432 tokens) and a wide 8192 row
    Op("layer_norm.forward", layer_norm_forward,
       grid(dtype=["fp16", "bf16", "fp32"], M=[50432], C=[384, 768, 1024, 4096, 8192],
            residual=[True, False])
       + grid(dtype=["bf16"], M=[50432], C=[1024], params=["fp32"]),
       grid(dtype=["bf16"], M=[50432], C=[1024], params=["fp32"])),
    Op("layer_norm.backward", layer_norm_backward,
       grid(dtype=["fp16", "bf16", "fp32"], M=[50432], C=[384, 768, 1024, 4096, 6144, 8192],
            residual=[True, False])
       + grid(dtype=["bf16"], M=[50432], C=[1024], params=["fp32"]),
       grid(dtype=["bf16"], M=[50432], C=[1024, 8192])),
    Op("bias_gelu.forward", bias_gelu_forward,
       grid(dtype=["fp16", "bf16", "fp32"], M=[50432], C=[1536, 3072, 4096, 5000],
            approximate=["none", "tanh"]),
       grid(dtype=["bf16"], M=[50432], C=[4096], approximate=["none"])),
    Op("bias_gelu.backward", bias_gelu_backward,
       grid(dtype=["fp16", "bf16", "fp32"], M=[50432], C=[1536, 3072, 4096, 5000],
            approximate=["none", "tanh"]),
       grid(dtype=["bf16"], M=[50432], C=[4096], approximate=["tanh"])),
    Op("lion", lion,
       grid(dtype=["fp16", "bf16", "fp32"], state=["fp32", "bf16"]),
       grid(dtype=["fp32"], state=["bf16"])),
    # CLIP batches: C = 64 (one K block: the accumulator in registers), 512, 1024
    Op("contrastive_loss.forward", contrastive_forward,
       grid(dtype=["fp16", "bf16", "fp32"], B=[4096, 65536], C=[64, 512, 1024]),
       grid(dtype=["bf16"], B=[16384], C=[1024])),
    Op("contrastive_loss.backward", contrastive_backward,
       grid(dtype=["fp16", "bf16", "fp32"], B=[4096, 65536], C=[64, 512, 1024],
            form=["full", "local"]),
       grid(dtype=["bf16"], B=[16384], C=[1024])),
]

# Lengths that must share one autotuner key per kernel: a model whose token count changes
# (progressive resolution, varlen batches, EViT's keep-rate schedule) must not re-tune on
# every new length.
_BY_NAME = {op.name: op for op in OPS}
RETUNE_SWEEPS = [
    ("flash_attention.forward",
     grid(dtype=["fp16"], D=[64], N=[197, 198, 199, 230, 256], features=["bias+cls"])),
    ("flash_attention.backward",
     grid(dtype=["fp16"], D=[64], N=[197, 198, 199, 230, 256], features=["bias+cls"])),
    ("flash_attention_varlen.forward",
     grid(dtype=["fp16"], D=[64], N=[140, 197, 256], features=["bias+cls"])),
    ("evit_select.forward",
     grid(dtype=["bf16"], N=[197, 199, 256], C=[768], keep_rate=[0.5, 0.7, 0.9])),
    ("evit_select.backward",
     grid(dtype=["bf16"], N=[197, 199, 256], C=[768], keep_rate=[0.5, 0.7, 0.9])),
]
