"""Launch-sizing helpers shared by the training kernels' launchers."""

from __future__ import annotations

import torch

# an H200's SMs: the grid size for tensors off the GPU (the AOT check's meta tensors)
DEFAULT_SMS = 132


def sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA device (DEFAULT_SMS for any other device)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SMS
