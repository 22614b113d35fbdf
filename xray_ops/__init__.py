"""xray-ops: fused kernels that make vision transformers fast.

``import xray_ops`` initialises no CUDA and imports neither Triton nor the compiled extension;
backends load lazily on first use. See ``python -m xray_ops info``.
"""

__version__ = "0.1.0"

from ._dispatch import BackendError, backend, last_backend, set_backend  # noqa: E402
from ._info import info  # noqa: E402
from .ops.evit import evit_keep_count, evit_select  # noqa: E402
from .ops.tome import (  # noqa: E402
    ToMeConfig, ToMeMatch, tome_key_bias, tome_match, tome_merge, tome_merge_source,
    tome_unmerge,
)
from . import nn  # noqa: E402

__all__ = [
    "__version__", "info", "set_backend", "backend", "last_backend", "BackendError",
    "evit_select", "evit_keep_count", "nn",
    "tome_merge", "tome_match", "tome_unmerge", "tome_merge_source", "tome_key_bias",
    "ToMeMatch", "ToMeConfig",
]
