"""flash_attention: the Triton (and CUDA) kernels against eager softmax attention, torch.compile
of it, torch SDPA with each backend forced, FlexAttention, flash-attn and xformers.

Every shape runs four ways: plain attention, with key_bias (ToMe's proportional attention:
peers get it as an additive (B, 1, 1, N) float mask or a score_mod), with cls_attn (EViT:
peers that cannot return the CLS row compute it as one extra softmax row), and with both
(ToMe and EViT in one model). Peers that cannot take a variant, or are not installed, are
listed under "not timed" with the reason. TFLOP/s count 4·B·H·N²·D for the forward (two
matmuls) and 2.5× that for the backward.

On the CPU the rows are: eager (explicit softmax attention, as timm's non-fused path), its
torch.compile, xray_ops' cpu backend (PyTorch's CPU flash kernel plus the CLS row and the
key_bias gradient) and torch backend (the float64-capable reference: what ``auto`` ran on CPU
tensors before the cpu backend), and SDPA (its CPU flash kernel, and math).
"""

from __future__ import annotations

import functools
import importlib.util

import torch

import xray_ops as xo

from ..harness import Case, compiled, xray_backend_impls

# (B, H, N, D): ViT-B/224, ViT-L/224, ViT-L/384, ViT-H/14, 1025 tokens, video
GPU_SHAPES = [(256, 12, 197, 64), (128, 16, 197, 64), (64, 16, 577, 64), (32, 16, 257, 80),
              (16, 16, 1025, 64), (4, 16, 4097, 64)]
CPU_SHAPES = [(8, 6, 197, 64), (4, 4, 197, 64), (2, 4, 577, 32)]
VARIANTS = ("plain", "bias", "cls", "bias+cls")
# --quick: ViT-B/224 every way, and one long sequence plain (the two speed goals)
GPU_QUICK = [((256, 12, 197, 64), VARIANTS), ((16, 16, 1025, 64), ("plain",))]
# ViT-S/224 at batch 8 (B8 H6 N197 D64): the CPU goals (cpu backend vs eager, torch and SDPA)
CPU_QUICK = [((8, 6, 197, 64), VARIANTS)]
SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION",
                 "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-math": "MATH"}


def _cls_row(q, k, kb, scale):
    """Query 0's softmax row averaged over heads: what a peer without cls_attn computes."""
    s = (q[:, :, :1] @ k.transpose(-1, -2)) * scale
    if kb is not None:
        s = s + kb[:, None, None, :]
    return s.float().softmax(-1)[:, :, 0].mean(1).to(q.dtype)


def eager(q, k, v, kb=None, *, cls=False):
    """Explicit softmax attention, as timm's non-fused path (and ToMe/EViT today)."""
    scale = q.shape[-1] ** -0.5
    s = (q @ k.transpose(-1, -2)) * scale
    if kb is not None:
        s = s + kb[:, None, None, :]
    p = s.softmax(-1)
    out = p @ v
    return (out, p[:, :, 0].mean(1)) if cls else out


def _sdpa(backend_name: str, q, k, v, kb=None, *, cls=False):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    mask = kb[:, None, None, :] if kb is not None else None
    with sdpa_kernel(getattr(SDPBackend, backend_name)):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return (out, _cls_row(q, k, kb, q.shape[-1] ** -0.5)) if cls else out


@functools.lru_cache(maxsize=None)
def _flex_compiled():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(q, k, v, kb=None, *, cls=False):
    flex = _flex_compiled()
    if kb is None:
        out = flex(q, k, v)
    else:
        def key_bias_mod(score, b, h, q_idx, kv_idx):
            return score + kb[b, kv_idx]

        out = flex(q, k, v, score_mod=key_bias_mod)
    return (out, _cls_row(q, k, kb, q.shape[-1] ** -0.5)) if cls else out


def _flash_attn(q, k, v, kb=None, *, cls=False):
    from flash_attn import flash_attn_func

    # flash-attn's layout is (B, N, H, D)
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return (out, _cls_row(q, k, None, q.shape[-1] ** -0.5)) if cls else out


def _xformers(q, k, v, kb=None, *, cls=False):
    import xformers.ops as xops

    bias = None
    if kb is not None:
        B, H, N, _ = q.shape
        bias = kb[:, None, None, :].expand(B, H, N, k.shape[2])
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2),
                                          v.transpose(1, 2), attn_bias=bias).transpose(1, 2)
    return (out, _cls_row(q, k, kb, q.shape[-1] ** -0.5)) if cls else out


def _xray(q, k, v, kb=None, *, cls=False):
    return xo.flash_attention(q, k, v, key_bias=kb, return_cls_attn=cls)


def _peers(device: str, variant: str) -> tuple[dict, dict]:
    """Peer implementations for this device and variant, and why the others are not timed."""
    impls, skipped = {}, {}
    cls = "cls" in variant
    for name, enum in SDPA_BACKENDS.items():
        if device == "cpu" and name not in ("sdpa-math", "sdpa-flash"):
            skipped[name] = "a GPU backend of SDPA (the CPU run times sdpa-flash and sdpa-math)"
        elif "bias" in variant and name == "sdpa-flash" and device == "cuda":
            skipped[name] = "SDPA's flash backend takes no attn_mask (the key_bias) on the GPU"
        else:
            impls[name] = functools.partial(_sdpa, enum, cls=cls)
    if device == "cpu":
        skipped["flex"] = "FlexAttention is timed on the GPU only"
    else:
        impls["flex"] = functools.partial(_flex, cls=cls)
    for name, module, fn in (("flash-attn", "flash_attn", _flash_attn),
                             ("xformers", "xformers", _xformers)):
        if device == "cpu":
            skipped[name] = "GPU-only peer"
        elif importlib.util.find_spec(module) is None:
            skipped[name] = f"{module} is not installed (optional peer)"
        elif name == "flash-attn" and "bias" in variant:
            skipped[name] = "flash-attn takes no per-key bias"
        else:
            impls[name] = functools.partial(fn, cls=cls)
    return impls, skipped


def cases(device: str, dtype: torch.dtype, quick: bool):
    if device == "cuda":
        plan = GPU_QUICK if quick else [(s, VARIANTS) for s in GPU_SHAPES]
    else:
        plan = CPU_QUICK if quick else [(s, VARIANTS) for s in CPU_SHAPES]
    out = []
    for (B, H, N, D), variants in plan:
        for variant in variants:
            with_bias, cls = "bias" in variant, "cls" in variant

            def make(B=B, H=H, N=N, D=D, with_bias=with_bias):
                q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype,
                                       requires_grad=True) for _ in range(3))
                if not with_bias:
                    return q, k, v
                kb = torch.rand(B, N, device=device, dtype=torch.float32).add(0.5).log()
                return q, k, v, kb.to(dtype).requires_grad_()

            eager_v = functools.partial(eager, cls=cls)
            impls = {"eager": eager_v, "compile": compiled(eager_v)}
            skipped = {}
            sample = make()
            kb = sample[3] if with_bias else None
            # on the CPU the torch backend is timed too: it is what auto ran there before
            fast, skipped = xray_backend_impls(
                "flash_attention", functools.partial(_xray, cls=cls),
                (sample[0], sample[1], sample[2], kb, D ** -0.5, False, cls),
                skip=("torch",) if device == "cuda" else ("triton",))
            impls.update(fast)
            if device == "cpu":
                skipped["triton"] = "not timed on the CPU (the interpreter is for tests)"
            peers, peer_skips = _peers(device, variant)
            impls.update(peers)
            skipped.update(peer_skips)
            fwd = 4.0 * B * H * N * N * D
            shape = f"B={B},H={H},N={N},D={D}" + ("" if variant == "plain" else f" +{variant}")
            out.append(Case("flash_attention", shape, dtype, make, impls,
                            flops={"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd},
                            skipped=skipped))
    return out
