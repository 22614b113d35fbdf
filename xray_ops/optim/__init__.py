"""Optimizers whose update is one fused launch per parameter group (``xray_ops.optim.Lion``)."""

from .lion import Lion

__all__ = ["Lion"]
