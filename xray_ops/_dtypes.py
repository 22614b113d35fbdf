"""The float dtype sets, defined once (validation, backend tables and messages share them)."""

from __future__ import annotations

import torch

# every float dtype an op accepts (float64: the reference / torch backend, and tests)
FLOATS: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# what the GPU kernels compute in (no float64)
GPU_FLOATS: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)
# 16-bit floats (tensor-core inputs)
HALF_FLOATS: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)


def name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (for messages)."""
    return str(dtype).replace("torch.", "")


def names(dtypes) -> list[str]:
    """Sorted names of a collection of dtypes (for messages)."""
    return sorted(name(d) for d in dtypes)
