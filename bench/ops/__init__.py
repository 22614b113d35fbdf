"""One module per op; each has ``cases(device, dtype, quick) -> list[Case]``."""

import importlib

# op name -> module under bench.ops
OPS = {
    "evit_select": "evit_select",
    "int8": "int8",
    "int8_accuracy": "int8_accuracy",
    "flash_attention": "flash_attention",
}


def load(op: str):
    return importlib.import_module(f"bench.ops.{OPS[op]}")
