"""contrastive_loss: the tiled kernels against open_clip's ClipLoss ("eager": it builds both
(B, B) logit matrices) and torch.compile of it, forward, backward and both, on L2-normalized
embeddings with a learnable logit scale. Peak memory: ``python -m bench contrastive_memory``.
"""

import importlib.util

import torch
import torch.nn.functional as F

import xray_ops as xo

from ..harness import Case, compiled, xray_backend_impls

# (B, C): the CPU goal's shape, then CLIP batch sizes on the GPU
CPU_SHAPES = [(1024, 512), (4096, 512)]
GPU_SHAPES = [(4096, 512), (16384, 1024), (65536, 1024)]
QUICK = {"cpu": [(1024, 512)], "cuda": [(16384, 1024)]}
SCALE = 1 / 0.07


def clip_loss():
    """open_clip's ClipLoss when installed, else the same formula (the definition)."""
    if importlib.util.find_spec("open_clip") is not None:
        from open_clip.loss import ClipLoss

        return ClipLoss()
    from xray_ops.reference.contrastive import contrastive_loss

    return contrastive_loss


def make_inputs(B, C, device, dtype, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    img = F.normalize(torch.randn(B, C, device=device, generator=g), dim=-1).to(dtype)
    txt = F.normalize(torch.randn(B, C, device=device, generator=g), dim=-1).to(dtype)
    scale = torch.tensor(SCALE, device=device)
    return img.requires_grad_(), txt.requires_grad_(), scale.requires_grad_()


def _xray(img, txt, scale):
    return xo.contrastive_loss(img, txt, scale)


def cases(device: str, dtype: torch.dtype, quick: bool):
    out = []
    loss = clip_loss()

    def eager(img, txt, scale):
        return loss(img, txt, scale)

    shapes = QUICK[device] if quick else (CPU_SHAPES if device == "cpu" else GPU_SHAPES)
    for B, C in shapes:
        def make(B=B, C=C):
            return make_inputs(B, C, device, dtype)

        img, txt, scale = make()
        impls = {"eager": eager, "compile": compiled(eager)}
        fast, skipped = xray_backend_impls(
            "contrastive_loss", _xray, dict(image_emb=img, text_emb=txt, all_image_emb=None,
                                            all_text_emb=None, logit_scale=scale))
        impls.update(fast)
        if importlib.util.find_spec("open_clip") is None:
            skipped["eager"] = "open_clip not installed: eager is the definition's formula"
        # ClipLoss's work: two (B, B, C) GEMMs forward, four backward
        mm = 2.0 * B * B * C
        out.append(Case("contrastive_loss", f"B={B},C={C}", dtype, make, impls,
                        flops={"fwd": 2 * mm, "bwd": 4 * mm, "fwd+bwd": 6 * mm},
                        skipped=skipped))
    return out
