"""xray-ops: fused kernels that make vision transformers fast.

``import xray_ops`` initialises no CUDA and imports neither Triton nor the compiled extension;
backends load lazily on first use. See ``python -m xray_ops info``.
"""

__version__ = "0.1.0"

from ._dispatch import BackendError, backend, last_backend, set_backend  # noqa: E402
from ._info import info  # noqa: E402
from .ops.evit import EViTConfig, evit_keep_count, evit_select  # noqa: E402
from .ops.int8 import int8_linear, int8_matmul, layernorm_quant, quantize_per_token  # noqa: E402
from .ops.attention import (flash_attention, flash_attention_qkvpacked,  # noqa: E402
                            flash_attention_varlen)
from .ops.tome import (  # noqa: E402
    ToMeConfig, ToMeMatch, tome_key_bias, tome_match, tome_merge, tome_merge_source,
    tome_unmerge,
)
from .ops.layer_norm import layer_norm  # noqa: E402
from .ops.bias_gelu import bias_gelu  # noqa: E402
from .ops.contrastive import contrastive_loss  # noqa: E402
from . import nn, optim  # noqa: E402
from .quantize import Int8Config, quantize_  # noqa: E402
from .retrieval import EmbeddingIndex  # noqa: E402
from . import patch  # noqa: E402

__all__ = [
    "__version__", "info", "set_backend", "backend", "last_backend", "BackendError",
    "evit_select", "evit_keep_count", "EViTConfig", "nn",
    "quantize_per_token", "layernorm_quant", "int8_matmul", "int8_linear", "Int8Config",
    "quantize_", "EmbeddingIndex",
    "flash_attention", "flash_attention_qkvpacked", "flash_attention_varlen",
    "tome_merge", "tome_match", "tome_unmerge", "tome_merge_source", "tome_key_bias",
    "ToMeMatch", "ToMeConfig", "patch",
    "layer_norm", "bias_gelu", "contrastive_loss", "optim",
]
