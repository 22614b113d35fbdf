"""int8 inference: int8_linear against float nn.Linear and the eager int8 paths, and whole
timm ViTs float vs quantize_'d (inference only: mode "fwd").

GPU (default dtype bf16): ViT-L/224 and ViT-B/224 at batch 256 (M = 256 x 197 = 50432 tokens):
qkv, fc1, fc2 shapes. Implementations: "eager" = nn.Linear in bf16 (cuBLAS); "triton" /
"cuda" = xray_ops.int8_linear (per-token quantization + int8 GEMM with the fused epilogue);
"int_mm+quant" = torchao's eager recipe spelled out (quantize x with torch ops, torch._int_mm,
rescale + bias in another pass); "torchao" = torchao's Int8DynamicActivationInt8WeightConfig
when torchao is installed. End to end: timm ViT-B/16 and ViT-L/16 (pretrained=False), float vs
quantize_'d (head kept in float).

CPU (default fp32, 2 threads): ViT-S and ViT-B shapes at batch 8 (M = 1576), fp32 nn.Linear vs
the cpu int8 path (numba quantization + torch._int_mm + numba epilogue) and the eager int8
path; end to end quantize_'d ViT-S at batch 8.

The accuracy report (trained small ViT top-1, EmbeddingIndex recall) is ``python -m bench
int8_accuracy``.
"""

from __future__ import annotations

import copy
import importlib.util

import torch

import xray_ops as xo
from xray_ops.reference import int8 as ref

from ..harness import Case

GPU_M = 256 * 197  # batch 256 at 224 px: 196 patches + CLS
CPU_M = 8 * 197
# (model, layer, K, N)
VIT_L = [("vit_l", "qkv", 1024, 3072), ("vit_l", "fc1", 1024, 4096), ("vit_l", "fc2", 4096, 1024)]
VIT_B = [("vit_b", "qkv", 768, 2304), ("vit_b", "fc1", 768, 3072), ("vit_b", "fc2", 3072, 768)]
VIT_S = [("vit_s", "qkv", 384, 1152), ("vit_s", "fc1", 384, 1536), ("vit_s", "fc2", 1536, 384)]


def _eager_int8(x, w_q, w_s, bias):
    """torchao's eager dynamic-int8 recipe: three passes around torch._int_mm."""
    x2 = x.reshape(-1, x.shape[-1])
    s = x2.abs().amax(-1, keepdim=True).float().clamp(min=1e-12) / 127
    x_q = torch.round(x2.float() / s).clamp(-127, 127).to(torch.int8)
    acc = torch._int_mm(x_q, w_q.t())
    y = (acc.float() * s * w_s + bias.float()).to(x.dtype)
    return y.reshape(*x.shape[:-1], -1)


def _torchao_linear(lin: torch.nn.Linear):
    if importlib.util.find_spec("torchao") is None:
        return None, "torchao is not installed"
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        m = torch.nn.Sequential(copy.deepcopy(lin))
        quantize_(m, Int8DynamicActivationInt8WeightConfig())
        return m, ""
    except Exception as e:  # an API change must not stop the other rows
        return None, f"torchao failed: {type(e).__name__}: {e}"


def _linear_cases(device, dtype, quick, shapes, M):
    out = []
    for model, layer, K, N in shapes:
        def make(K=K):
            return (torch.randn(M, K, device=device, dtype=dtype),)

        lin = torch.nn.Linear(K, N, device=device, dtype=dtype).requires_grad_(False)
        w_q, w_s = ref.quantize_weight(lin.weight)
        bias = lin.bias.detach()
        impls = {"eager": torch.inference_mode()(lambda x, lin=lin: lin(x))}
        skipped = {}
        from xray_ops import _dispatch

        sample = (make()[0], w_q, w_s, bias, "none")
        for name, reasons in _dispatch.reasons_for("int8_linear", sample).items():
            if name == "torch":
                continue  # the float64 definition: not a speed contender
            if reasons:
                skipped[name] = "; ".join(reasons)
                continue

            def run(x, _name=name, w_q=w_q, w_s=w_s, bias=bias):
                with torch.inference_mode(), xo.backend(_name):
                    return xo.int8_linear(x, w_q, w_s, bias)

            impls[name] = run
        impls["int_mm+quant"] = torch.inference_mode()(
            lambda x, w_q=w_q, w_s=w_s, bias=bias: _eager_int8(x, w_q, w_s, bias))
        if device == "cuda":
            ao, why = _torchao_linear(lin)
            if ao is not None:
                impls["torchao"] = torch.inference_mode()(lambda x, ao=ao: ao(x))
            else:
                skipped["torchao"] = why
        e = torch.finfo(dtype).bits // 8
        flops = 2.0 * M * K * N
        # float layer: read x, W, write y; int8 layer: read x, W int8, write y (+ x_q twice)
        out.append(Case("int8_linear", f"{model}.{layer},M={M},K={K},N={N}", dtype, make, impls,
                        modes=("fwd",), flops={"fwd": flops},
                        bytes={"fwd": (M * K + K * N + M * N) * e}, skipped=skipped))
    return out


def _vit_cases(device, dtype, quick, names, batch):
    import timm

    out = []
    for name in names:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval().to(device=device, dtype=dtype)
        model.requires_grad_(False)
        q_model = xo.quantize_(copy.deepcopy(model), filter_fn=lambda m, n: n != "head")

        def make(batch=batch):
            return (torch.randn(batch, 3, 224, 224, device=device, dtype=dtype),)

        impls = {"eager": torch.inference_mode()(lambda x, m=model: m(x)),
                 "quantize_": torch.inference_mode()(lambda x, m=q_model: m(x))}
        backends = ("triton", "cuda") if device == "cuda" else ("cpu",)
        skipped = {}
        for b in backends:
            def run(x, _b=b, m=q_model):
                with torch.inference_mode(), xo.backend(_b):
                    return m(x)
            try:  # a backend that cannot take some layer is reported, not timed
                run(*make(batch=1))
                impls[f"quantize_[{b}]"] = run
            except xo.BackendError as e:
                skipped[f"quantize_[{b}]"] = str(e).splitlines()[0][:160]
        threads = "" if device == "cuda" else f",threads={torch.get_num_threads()}"
        out.append(Case("int8_vit", f"{name},B={batch}{threads}", dtype, make, impls,
                        modes=("fwd",), skipped=skipped))
    return out


def cases(device: str, dtype: torch.dtype, quick: bool):
    if device == "cuda":
        shapes = VIT_L if quick else VIT_L + VIT_B
        out = _linear_cases(device, dtype, quick, shapes, GPU_M)
        vits = ["vit_large_patch16_224"] if quick else ["vit_base_patch16_224",
                                                        "vit_large_patch16_224"]
        return out + _vit_cases(device, dtype, quick, vits, 64 if quick else 256)
    # the CPU goal is stated at 2 threads (the CI machine's cores)
    torch.set_num_threads(2)
    shapes = VIT_S if quick else VIT_S + VIT_B
    out = _linear_cases(device, dtype, quick, shapes, CPU_M)
    return out + _vit_cases(device, dtype, quick, ["vit_small_patch16_224"], 8)
