"""Lion optimizer step on a whole ViT's parameters: xray_ops.optim.Lion (one multi-tensor launch
per group on the GPU, numba on the CPU) against lion-pytorch's per-parameter loop ("eager"),
its foreach version ("foreach": torch._foreach_* ops) and, on the GPU, its Triton kernel
("lion-pytorch-triton", one launch per parameter).

Parameter sets: timm's ViT-S/16 (22 M parameters, 152 tensors) and, on the GPU, ViT-L/16
(304 M, 296 tensors), in the bench dtype, momentum in the same dtype. Only the "fwd" mode (one
optimizer step) is timed.
"""

import importlib.util

import torch

import xray_ops as xo
from xray_ops.ops.lion import TensorList

from ..harness import Case, xray_backend_impls

HP = dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1)
MODELS = {"cpu": ["vit_small_patch16_224"],
          "cuda": ["vit_small_patch16_224", "vit_large_patch16_224"]}
# --quick: on the GPU the goal set (ViT-L, bench/device_check.sh)
QUICK = {"cpu": ["vit_small_patch16_224"], "cuda": ["vit_large_patch16_224"]}


def _shapes(model: str) -> list[tuple]:
    import timm

    with torch.device("meta"):
        m = timm.create_model(model, pretrained=False)
    return [tuple(p.shape) for p in m.parameters()]


class _Stepper:
    """opt.step() for a parameter list, creating the optimizer on the first call with a new
    list (the harness makes fresh inputs for every implementation and mode)."""

    def __init__(self, factory):
        self.factory = factory
        self.params = None
        self.opt = None

    def __call__(self, params):
        if params is not self.params:
            self.params, self.opt = params, self.factory(params)
        self.opt.step()


def _peers(device):
    impls, skipped = {}, {}
    if importlib.util.find_spec("lion_pytorch") is None:
        skipped["eager"] = skipped["foreach"] = "lion-pytorch not installed"
        return impls, skipped
    import lion_pytorch
    import lion_pytorch.foreach

    impls["eager"] = _Stepper(lambda ps: lion_pytorch.Lion(ps, **HP))
    impls["foreach"] = _Stepper(lambda ps: lion_pytorch.foreach.Lion(ps, **HP))
    if device == "cuda" and importlib.util.find_spec("triton") is not None:
        impls["lion-pytorch-triton"] = _Stepper(
            lambda ps: lion_pytorch.Lion(ps, **HP, use_triton=True))
    return impls, skipped


def cases(device: str, dtype: torch.dtype, quick: bool):
    out = []
    models = QUICK[device] if quick else MODELS[device]
    for model in models:
        shapes = _shapes(model)

        def make(shapes=shapes):
            g = torch.Generator(device=device).manual_seed(0)
            params = []
            for s in shapes:
                p = torch.nn.Parameter(torch.randn(s, device=device, dtype=dtype, generator=g))
                p.grad = torch.randn(s, device=device, dtype=dtype, generator=g)
                params.append(p)
            return (params,)

        params = make()[0]
        impls, skipped = _peers(device)
        sample = dict(params=TensorList(params), grads=TensorList(p.grad for p in params),
                      exp_avgs=TensorList(torch.zeros_like(p) for p in params), lr=HP["lr"],
                      beta1=HP["betas"][0], beta2=HP["betas"][1],
                      weight_decay=HP["weight_decay"])
        fast, reasons = xray_backend_impls("lion", _Stepper(lambda ps: xo.optim.Lion(ps, **HP)),
                                           sample)
        impls.update(fast)
        skipped.update(reasons)
        numel = sum(p.numel() for p in params)
        del params, sample
        e = torch.finfo(dtype).bits // 8
        # read p, g, m; write p, m
        out.append(Case("lion", f"{model},{numel / 1e6:.1f}M,{len(shapes)}t", dtype, make, impls,
                        modes=("fwd",), bytes={"fwd": 5 * numel * e}, skipped=skipped))
    return out
