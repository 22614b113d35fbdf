"""layer_norm with a residual and LayerScale: the fused kernels against eager PyTorch
(``s = residual + gamma * x`` then ``F.layer_norm``), torch.compile of it, and peers.

A ViT block's second half-step: x is the attention branch output, the residual the stream,
gamma its LayerScale; the gradient arrives in both y (to the MLP) and s (the stream).
Peers where installed: Liger's LigerLayerNorm (no residual: it runs after eager's add),
Apex's FusedLayerNorm (likewise), flash-attention's Triton ``layer_norm_fn`` (residual fused,
prenorm; no LayerScale: gamma * x runs eagerly before it).
"""

import importlib.util

import torch
import torch.nn.functional as F

import xray_ops as xo

from ..harness import Case, compiled, xray_backend_impls

# (B, N, C): DeiT-S and ViT-B at 224, ViT-L at 224 and 336
SHAPES = [(64, 197, 384), (64, 197, 768), (128, 197, 1024), (32, 577, 1024)]
# --quick: ViT-S / ViT-B on the CPU; on the GPU the goal shape (ViT-L, bench/device_check.sh)
QUICK = {"cpu": [(32, 197, 384), (16, 197, 768)], "cuda": [(128, 197, 1024)]}
CPU_SHAPES = [(32, 197, 384), (16, 197, 768), (8, 577, 1024)]
EPS = 1e-6


def _eager(x, r, g, w, b):
    s = r + g * x
    return F.layer_norm(s, (s.shape[-1],), w, b, EPS), s


def _xray(x, r, g, w, b):
    return xo.layer_norm(x, w, b, EPS, residual=r, residual_scale=g)


def _peers(device):
    impls, skipped = {}, {}
    if importlib.util.find_spec("liger_kernel") is not None and device == "cuda":
        from liger_kernel.transformers.functional import liger_layer_norm

        def liger(x, r, g, w, b):
            s = r + g * x
            return liger_layer_norm(s, w, b, EPS), s

        impls["liger"] = liger
    else:
        skipped["liger"] = "liger_kernel not installed" if device == "cuda" else "GPU only"
    if importlib.util.find_spec("apex") is not None and device == "cuda":
        from apex.normalization import fused_layer_norm_affine

        def apex(x, r, g, w, b):
            s = r + g * x
            return fused_layer_norm_affine(s, w, b, (s.shape[-1],), EPS), s

        impls["apex"] = apex
    else:
        skipped["apex"] = "apex not installed" if device == "cuda" else "GPU only"
    if importlib.util.find_spec("flash_attn") is not None and device == "cuda":
        from flash_attn.ops.triton.layer_norm import layer_norm_fn

        def flash_attn_ln(x, r, g, w, b):
            y, s = layer_norm_fn(g * x, w, b, residual=r, eps=EPS, prenorm=True)
            return y, s

        impls["flash-attn"] = flash_attn_ln
    else:
        skipped["flash-attn"] = "flash_attn not installed" if device == "cuda" else "GPU only"
    return impls, skipped


def cases(device: str, dtype: torch.dtype, quick: bool):
    out = []
    shapes = QUICK[device] if quick else (CPU_SHAPES if device == "cpu" else SHAPES)
    for B, N, C in shapes:

        def make(B=B, N=N, C=C):
            x = torch.randn(B, N, C, device=device, dtype=dtype, requires_grad=True)
            r = torch.randn(B, N, C, device=device, dtype=dtype, requires_grad=True)
            g = (torch.rand(C, device=device, dtype=dtype) * 0.1).requires_grad_()
            w = (torch.rand(C, device=device, dtype=dtype) + 0.5).requires_grad_()
            b = torch.randn(C, device=device, dtype=dtype, requires_grad=True)
            return x, r, g, w, b

        sample = make()
        impls = {"eager": _eager, "compile": compiled(_eager)}
        x, r, g, w, b = sample
        fast, skipped = xray_backend_impls(
            "layer_norm", _xray, dict(x=x.reshape(-1, C), weight=w, bias=b, eps=EPS,
                                      residual=r.reshape(-1, C), residual_scale=g))
        impls.update(fast)
        peers, peer_skips = _peers(device)
        impls.update(peers)
        skipped.update(peer_skips)
        e = torch.finfo(dtype).bits // 8
        rows = B * N * C * e
        # minimum traffic: fwd reads x, residual, writes y, s; bwd reads grad_y, grad_s, s, x
        # and writes d residual, dx (the parameter vectors are negligible)
        out.append(Case("layer_norm", f"B={B},N={N},C={C}", dtype, make, impls,
                        bytes={"fwd": 4 * rows, "bwd": 6 * rows, "fwd+bwd": 10 * rows},
                        skipped=skipped))
    return out
