"""Modules built on the xray_ops functional ops."""

from .evit import EViTSelect
from .attention import Attention
from .int8 import Int8LayerNorm, Int8Linear, QuantizedActivation

__all__ = ["EViTSelect", "Attention", "Int8Linear", "Int8LayerNorm", "QuantizedActivation"]
