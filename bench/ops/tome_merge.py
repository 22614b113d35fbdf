"""tome_merge: matching + size-weighted merge against ToMe's PyTorch code (the reference, eager
and under torch.compile).

A ToMe step as a ViT runs it: the metric is the keys averaged over heads (width 64), the token
sizes come from earlier merges (no gradient), x needs a gradient.
"""

import torch

import xray_ops as xo
from xray_ops.reference import tome as ref

from ..harness import Case, compiled, xray_backend_impls

# (B, N, C, r): ViT-B/16 at 224, ViT-L/14 at 336, video ViT-L with 1568 tubelet tokens
SHAPES = [(64, 197, 768, 16), (32, 577, 1024, 32), (8, 1568, 1024, 64)]
QUICK = [(64, 197, 768, 16), (8, 1568, 1024, 64)]
METRIC_WIDTH = 64


def _eager(x, metric, size, r):
    return ref.tome_merge(x, metric, r, size, True, False)


def _xray(x, metric, size, r):
    return xo.tome_merge(x, metric, r, size=size)


def cases(device: str, dtype: torch.dtype, quick: bool):
    out = []
    for B, N, C, r in QUICK if quick else SHAPES:

        def make(B=B, N=N, C=C, r=r):
            x = torch.randn(B, N, C, device=device, dtype=dtype, requires_grad=True)
            metric = torch.randn(B, N, METRIC_WIDTH, device=device, dtype=dtype)
            size = torch.randint(1, 4, (B, N, 1), device=device).to(dtype)
            return x, metric, size, r

        sample = make()
        m = ref.tome_match(sample[1], r, True, False)
        impls = {"eager": _eager, "compile": compiled(_eager)}
        fast, skipped = xray_backend_impls("tome_merge", _xray,
                                           (sample[0], sample[2], m[3], m[4], m[5]))
        impls.update(fast)
        e = torch.finfo(dtype).bits // 8
        n_out = N - r
        # minimum traffic. fwd: read x, metric and size, write x_out and size_out.
        # bwd (size needs no gradient): read grad_out, write grad_x.
        fwd = (B * N * C + B * N * METRIC_WIDTH + B * N + B * n_out * C + B * n_out) * e
        bwd = (B * n_out * C + B * N * C) * e
        out.append(Case("tome_merge", f"B={B},N={N},C={C},r={r}", dtype, make, impls,
                        bytes={"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd},
                        skipped=skipped))
    return out
