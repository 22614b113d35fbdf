"""NVTX ranges around every op when XRAY_OPS_NVTX=1 (for Nsight Systems), else nothing."""

from __future__ import annotations

import contextlib
import os

ENABLED = os.environ.get("XRAY_OPS_NVTX", "0") == "1"
_NULL = contextlib.nullcontext()


def _annotate(name: str):
    try:
        import nvtx  # the `nvtx` package works without a GPU (no-op when nothing listens)

        return nvtx.annotate(name, domain="xray_ops")
    except ImportError:
        import torch

        return torch.cuda.nvtx.range(name)


def range(name: str):  # noqa: A001 - mirrors nvtx/torch naming
    """Context manager: an NVTX range named ``name`` when enabled, else a no-op."""
    return _annotate(name) if ENABLED else _NULL
