"""One module per op; each has ``cases(device, dtype, quick) -> list[Case]``."""

import importlib

# op name -> module under bench.ops
OPS = {
    "evit_select": "evit_select",
    "int8": "int8",
    "int8_accuracy": "int8_accuracy",
    "flash_attention": "flash_attention",
    "tome_merge": "tome_merge",
    "layer_norm": "layer_norm",
    "bias_gelu": "bias_gelu",
    "lion": "lion",
    "contrastive_loss": "contrastive_loss",
    "contrastive_memory": "contrastive_memory",
}


def load(op: str):
    return importlib.import_module(f"bench.ops.{OPS[op]}")
