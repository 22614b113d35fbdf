"""evit_select: the fused kernels against the eager reference and torch.compile of it."""

import torch

import xray_ops as xo
from xray_ops.reference import evit as ref

from ..harness import Case, compiled, xray_backend_impls

# (B, N, C): DeiT-S, ViT-B and ViT-L at 224 (EViT's models), ViT-L at 336
SHAPES = [(64, 197, 768), (64, 197, 384), (128, 197, 1024), (32, 577, 1024)]
QUICK = [(64, 197, 768), (128, 197, 1024)]
KEEP_RATE = 0.7


def _eager(x, a, keep):
    return ref.evit_select(x, a, keep, True)


def cases(device: str, dtype: torch.dtype, quick: bool):
    out = []
    for B, N, C in QUICK if quick else SHAPES:
        keep = xo.evit_keep_count(N - 1, KEEP_RATE)

        def make(B=B, N=N, C=C, keep=keep):
            x = torch.randn(B, N, C, device=device, dtype=dtype, requires_grad=True)
            a = torch.randn(B, N - 1, device=device, dtype=dtype).softmax(-1).requires_grad_()
            return x, a, keep

        sample = make()
        impls = {"eager": _eager, "compile": compiled(_eager)}
        fast, skipped = xray_backend_impls(
            "evit_select", lambda x, a, k: xo.evit_select(x, a, k), (sample[0], sample[1], keep, True))
        impls.update(fast)
        e = torch.finfo(dtype).bits // 8
        n_out = 1 + keep + 1
        # minimum traffic: read x and cls_attn, write x_out (fwd); read grad_out, x, cls_attn,
        # write grad_x and grad_cls (bwd)
        fwd = (B * N * C + B * (N - 1) + B * n_out * C) * e
        bwd = (B * n_out * C + 2 * B * N * C + 2 * B * (N - 1)) * e
        out.append(Case("evit_select", f"B={B},N={N},C={C},keep={keep}", dtype, make, impls,
                        bytes={"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}, skipped=skipped))
    return out
