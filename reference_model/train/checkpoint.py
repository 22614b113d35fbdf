"""Checkpoints: one safetensors file per checkpoint, written atomically, verified on load.

``DIR/<stage>/checkpoint-<step>.safetensors`` holds the tensors

    model.<name>         the stage model's full (unsharded) state dict
    optim.<name>.<key>   optimizer state per parameter (by parameter name, so it loads into a
                         model sharded differently, or not at all)
    rng.<rank>.torch     each rank's CPU generator state (and rng.<rank>.cuda on the GPU)

and, in the header's metadata under "xray_train", a JSON record: stage, step, data positions,
scheduler state, optimizer param groups, numpy / python RNG states, the training config, the
model spec (what rebuilds the model: config name, overrides, stage kwargs, vocabulary) and a
SHA-256 over every tensor's bytes. A file is written to a temporary name in the same folder,
fsynced and renamed, so a crash leaves either the old set of checkpoints or the new one; a
truncated or corrupted file is refused (:class:`CheckpointError`) and never replaces another.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np
import torch

FORMAT = "xray-train/1"
_NAME = re.compile(r"^checkpoint-(\d+)\.safetensors$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, truncated, corrupt, or of another format."""


def checkpoint_path(stage_dir: str, step: int) -> str:
    return os.path.join(stage_dir, f"checkpoint-{step:06d}.safetensors")


def list_checkpoints(stage_dir: str) -> list[str]:
    """The stage folder's checkpoints, oldest (lowest step) first."""
    if not os.path.isdir(stage_dir):
        return []
    found = [(int(m.group(1)), f) for f in os.listdir(stage_dir) if (m := _NAME.match(f))]
    return [os.path.join(stage_dir, f) for _, f in sorted(found)]


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous().cpu().reshape(-1)
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(path: str, tensors: dict[str, torch.Tensor], meta: dict) -> str:
    """Write ``tensors`` and the JSON-able ``meta`` to ``path`` atomically; returns ``path``."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    record = dict(meta, format=FORMAT, sha256=_digest(tensors))
    blob = save(tensors, metadata={"xray_train": json.dumps(record)})
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    try:  # make the rename itself durable
        fd = os.open(folder, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass
    return path


def load_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of a checkpoint; CheckpointError naming the file when it is missing,
    truncated, corrupt or not a training checkpoint."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path}: no such file")
    with open(path, "rb") as f:
        blob = f.read()
    try:
        header_len = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8:8 + header_len])
        record = json.loads(header["__metadata__"]["xray_train"])
        tensors = load(blob)
    except (SafetensorError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({len(blob)} bytes; "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"use an earlier checkpoint in {os.path.dirname(path) or '.'}") from None
    if record.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: format {record.get('format')!r}, expected "
                              f"{FORMAT!r}")
    if _digest(tensors) != record.get("sha256"):
        raise CheckpointError(f"checkpoint {path} is corrupt: its tensors do not match the "
                              f"SHA-256 written with them; use an earlier checkpoint in "
                              f"{os.path.dirname(path) or '.'}")
    return tensors, record


def prune(stage_dir: str, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints of a stage folder."""
    for p in list_checkpoints(stage_dir)[:-keep]:
        os.remove(p)


# ----------------------------------------------------------------------------------------------
# packing training state
# ----------------------------------------------------------------------------------------------
def rng_state() -> dict:
    """This process's RNG states: tensors (torch, cuda) and JSON-able (numpy, python)."""
    import random

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py = random.getstate()
    return {"tensors": tensors,
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
            "python": [py[0], list(py[1]), py[2]]}


def set_rng_state(state: dict) -> None:
    import random

    torch.set_rng_state(state["tensors"]["torch"])
    if "cuda" in state["tensors"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["tensors"]["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    v, internal, g = state["python"]
    random.setstate((v, tuple(internal), g))


def pack_optimizer(osd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """A name-keyed optimizer state dict (torch.distributed.checkpoint.state_dict's
    get_optimizer_state_dict) → (tensors "optim.<param>.<key>", JSON-able param groups + scalars)."""
    tensors, scalars = {}, {}
    for name, st in osd["state"].items():
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{name}.{key}"] = v
            else:
                scalars[f"{name}.{key}"] = v
    groups = [{k: (f"torch.{v}".replace("torch.torch.", "torch.") if isinstance(v, torch.dtype)
                   else v) for k, v in g.items()} for g in osd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def unpack_optimizer(tensors: dict[str, torch.Tensor], packed: dict) -> dict:
    """Inverse of :func:`pack_optimizer`."""
    state: dict[str, dict] = {}
    names = {p for g in packed["param_groups"] for p in g["params"]}
    for k, v in tensors.items():
        if not k.startswith("optim."):
            continue
        rest = k[len("optim."):]
        # parameter names contain dots: the state key is the last component
        name, key = rest.rsplit(".", 1)
        if name not in names:
            raise CheckpointError(f"optimizer state for unknown parameter {name!r}")
        state.setdefault(name, {})[key] = v
    for k, v in packed["scalars"].items():
        name, key = k.rsplit(".", 1)
        state.setdefault(name, {})[key] = v
    groups = []
    for g in packed["param_groups"]:
        g = dict(g)
        for k, v in g.items():
            if k != "params" and isinstance(v, list):
                g[k] = tuple(v)  # JSON turned betas into a list
            elif isinstance(v, str) and v.startswith("torch."):
                g[k] = getattr(torch, v[len("torch."):])  # a dtype (Lion's state_dtype)
        groups.append(g)
    return {"state": state, "param_groups": groups}
