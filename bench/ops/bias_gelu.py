"""bias_gelu: the fused kernels against eager ``F.gelu(x + bias)`` and torch.compile of it, at
a ViT MLP's fc1 output (hidden width 4C), exact GELU (timm's) and the tanh form."""

import torch
import torch.nn.functional as F

import xray_ops as xo

from ..harness import Case, compiled, xray_backend_impls

# (B, N, hidden): ViT-S, ViT-B and ViT-L MLPs at 224
SHAPES = [(64, 197, 1536), (64, 197, 3072), (128, 197, 4096)]
# --quick: ViT-S on the CPU; on the GPU the goal shape (ViT-L, bench/device_check.sh)
QUICK = {"cpu": [(32, 197, 1536)], "cuda": [(128, 197, 4096)]}
CPU_SHAPES = [(32, 197, 1536), (16, 197, 3072)]


def cases(device: str, dtype: torch.dtype, quick: bool):
    out = []
    shapes = QUICK[device] if quick else (CPU_SHAPES if device == "cpu" else SHAPES)
    for approximate in ("none", "tanh"):
        def eager(x, b, approximate=approximate):
            return F.gelu(x + b, approximate=approximate)

        def xray(x, b, approximate=approximate):
            return xo.bias_gelu(x, b, approximate)

        for B, N, H in shapes:
            def make(B=B, N=N, H=H):
                x = torch.randn(B, N, H, device=device, dtype=dtype, requires_grad=True)
                b = torch.randn(H, device=device, dtype=dtype, requires_grad=True)
                return x, b

            x, b = make()
            impls = {"eager": eager, "compile": compiled(eager)}
            fast, skipped = xray_backend_impls(
                "bias_gelu", xray, dict(x=x.reshape(-1, H), bias=b, approximate=approximate))
            impls.update(fast)
            rows = B * N * H * (torch.finfo(dtype).bits // 8)
            # fwd reads x, writes y; bwd reads grad_y and x, writes grad_x
            out.append(Case("bias_gelu", f"B={B},N={N},H={H},{approximate}", dtype, make, impls,
                            bytes={"fwd": 2 * rows, "bwd": 3 * rows, "fwd+bwd": 5 * rows},
                            skipped=skipped))
    return out
