"""Modules built on the xray_ops functional ops."""

from .evit import EViTSelect

__all__ = ["EViTSelect"]
