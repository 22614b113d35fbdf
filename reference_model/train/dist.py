"""Distributed plumbing for torchrun: process group, device, DDP / FSDP2 wrapping, collectives.

One process (no torchrun) is world size 1 and every collective is the identity. Under torchrun
(WORLD_SIZE > 1) the process group is NCCL on GPUs and gloo on the CPU.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def all_gather_with_grad(self, t: torch.Tensor) -> torch.Tensor:
        """(B, ...) on each rank → (world·B, ...) in rank order; the gradient flows back to every
        rank's slice (open_clip's gather_with_grad). Identity in one process."""
        if not self.active:
            return t
        import warnings

        from torch.distributed.nn.functional import all_gather

        with warnings.catch_warnings():  # deprecated for a private API; still the public one
            warnings.simplefilter("ignore", FutureWarning)
            return torch.cat(all_gather(t.contiguous()), 0)

    def mean(self, value: float) -> float:
        """The mean of a float over ranks."""
        if not self.active:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self._coll_device())
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on any (stop signals must agree)."""
        if not self.active:
            return bool(flag)
        t = torch.tensor([int(flag)], device=self._coll_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def gather_objects(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def _coll_device(self):
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` → cuda:<local rank> when a GPU is present, else cpu; ``cuda`` → cuda:<local rank>."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name}: no CUDA device is available here (use cpu or auto)")
    return torch.device(name)


def setup(device: str) -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1; pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=10))
    return Dist(rank, world, local, dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _shard_units(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks (children of ModuleLists named blocks / resblocks / layers):
    FSDP2's units, each gathered just before it runs."""
    units = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("blocks", "resblocks",
                                                                         "layers", "layer"):
            units.extend(m)
    return units


def wrap(model: nn.Module, mode: str, d: Dist, *, find_unused: bool) -> nn.Module:
    """``none``: the model; ``ddp``: DistributedDataParallel; ``fsdp``: FSDP2 ``fully_shard`` on
    every transformer block, then on the root (parameters become DTensors in place)."""
    if mode == "none" or not d.active:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [d.device.index] if d.device.type == "cuda" else None
        return DDP(model, device_ids=ids, find_unused_parameters=find_unused)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # FSDP2 cannot shard 0-d parameters (CLIP's logit_scale): they stay replicated and
        # their gradients are averaged by sync_replicated_grads after each backward
        scalars = {p for p in model.parameters() if p.ndim == 0}
        for unit in _shard_units(model):
            fully_shard(unit, ignored_params=scalars & set(unit.parameters()) or None)
        fully_shard(model, ignored_params=scalars or None)
        model._replicated_params = sorted(scalars, key=id)
        return model
    raise ValueError(f"parallel: expected none, ddp or fsdp, got {mode!r}")


def sync_replicated_grads(model: nn.Module, d: Dist) -> None:
    """Average the gradients of the parameters FSDP left replicated (see :func:`wrap`)."""
    params = getattr(model, "_replicated_params", ())
    if not d.active or not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.AVG if dist.get_backend() == "nccl"
                        else dist.ReduceOp.SUM)
        if dist.get_backend() != "nccl":  # gloo has no AVG
            p.grad.div_(d.world)


def full_state_dicts(wrapped: nn.Module, optimizer) -> tuple[dict, dict]:
    """(model state dict, name-keyed optimizer state dict), unsharded, on the CPU; a collective
    under FSDP (every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(wrapped, options=opts),
            get_optimizer_state_dict(wrapped, optimizer, options=opts))


def load_full_state_dicts(wrapped: nn.Module, optimizer, model_sd: dict, optim_sd: dict | None,
                          strict: bool = True) -> None:
    """Load full (unsharded) state dicts into a model wrapped any way (each rank passes them)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, strict=strict)
    set_model_state_dict(wrapped, model_sd, options=opts)
    if optim_sd is not None and optimizer is not None:
        set_optimizer_state_dict(wrapped, optimizer, optim_sd, options=opts)
