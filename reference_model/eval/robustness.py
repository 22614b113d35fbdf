"""Perturbations for the robustness metrics: Gaussian noise and blur (domain shift) and FGSM.

Inputs are images (B, 3, H, W) or clips (B, 3, T, H, W) in [0, 1]; outputs stay in [0, 1].
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def gaussian_noise(x: torch.Tensor, std: float, *, seed: int = 0) -> torch.Tensor:
    """x + N(0, std²) per pixel, clipped to [0, 1]; the noise is a function of ``seed``.

    Equivalent: ``(x + std * torch.randn_like(x)).clamp(0, 1)``.
    """
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x.shape, generator=g, dtype=torch.float32).to(x.device, x.dtype)
    return (x + std * noise).clamp(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of every frame with std ``sigma`` pixels (kernel ±3σ, reflect
    padding). Equivalent: torchvision's ``gaussian_blur(x, 2 * ceil(3 σ) + 1, σ)``."""
    if sigma <= 0:
        return x
    radius = max(1, int(-(-3 * sigma // 1)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(x.dtype)
    shape = x.shape
    y = x.reshape(-1, 1, shape[-2], shape[-1])
    pad = min(radius, shape[-1] - 1, shape[-2] - 1)
    if pad < radius:  # tiny images: reflect padding cannot exceed the side
        k = k[radius - pad:radius + pad + 1]
        k = k / k.sum()
    y = F.pad(y, (pad, pad, 0, 0), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1))
    y = F.pad(y, (0, 0, pad, pad), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, -1, 1))
    return y.reshape(shape)


def fgsm(loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
         eps: float) -> torch.Tensor:
    """Fast gradient sign method (Goodfellow et al. 2015): x + eps · sign(∇ₓ loss), clipped to
    [0, 1]. ``loss_fn(x)`` returns the scalar loss the attack increases. The model's
    parameters are left untouched (their gradients are not accumulated)."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(x)
        if loss.dim() != 0:
            raise ValueError(f"loss_fn: expected a scalar loss, got shape {tuple(loss.shape)}")
        (grad,) = torch.autograd.grad(loss, x)
    return (x.detach() + eps * grad.sign()).clamp(0, 1)
