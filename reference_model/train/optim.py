"""The optimizer: Lion (default, as the paper) or AdamW, with weight decay on matrices only."""

from __future__ import annotations

import torch
from torch import nn


def lion_class(sharded: bool = False):
    """The Lion implementation: ``xray_ops.optim.Lion`` (one fused update per parameter group:
    CUDA / Triton on the GPU, numba on the CPU). FSDP2's sharded (DTensor) parameters take
    lion-pytorch's, the same update in plain tensor ops, until xray_ops registers a DTensor
    sharding strategy for its ``lion_`` op (it has none: "does not have a sharding strategy")."""
    if sharded:
        from lion_pytorch import Lion
    else:
        from xray_ops.optim import Lion
    return Lion


def _no_decay(name: str, p: nn.Parameter) -> bool:
    # biases, norms, scalars (logit_scale) and the learned tokens / position embeddings
    return p.ndim < 2 or any(k in name for k in ("pos_embed", "cls_token", "mask_token",
                                                 "reg_token", "logit_scale", "temporal_embed"))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups of the trainable parameters: with ``weight_decay`` (matrices) and without."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if _no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float
                    ) -> torch.optim.Optimizer:
    """``lion`` (betas 0.9, 0.99) or ``adamw`` (betas 0.9, 0.95) over :func:`param_groups`."""
    groups = param_groups(model, weight_decay)
    if name == "lion":
        from torch.distributed.tensor import DTensor

        sharded = any(isinstance(p, DTensor) for p in model.parameters())
        return lion_class(sharded)(groups, lr=lr, betas=(0.9, 0.99), weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    raise ValueError(f"optimizer: expected 'lion' or 'adamw', got {name!r}")
