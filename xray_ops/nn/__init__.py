"""Modules built on the xray_ops functional ops."""

from .evit import EViTSelect
from .attention import Attention

__all__ = ["EViTSelect", "Attention"]
