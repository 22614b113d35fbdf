"""Batches for training and evaluation: ``collate`` and a resumable, sharded loader.

:class:`ResumableLoader` walks a map-style dataset in epochs. Each epoch is a seeded
permutation (or, with sampling ``weights``, a seeded draw with replacement: hashtag
balancing); rank r of world_size takes every world_size-th index of it, cut into batches; the
batches are spread over the DataLoader's worker processes (so ranks and workers never read the
same item). Its position (epoch, batches yielded) is a ``state_dict`` a checkpoint keeps:
after ``load_state_dict`` the next batch is the one that followed the checkpoint, exactly.

An item that raises :class:`UnreadableSample` (a corrupt or unreadable file) is dropped from
its batch, counted and listed in ``loader.skipped``; it is never fatal.
"""

from __future__ import annotations

import hashlib
import warnings
import weakref
from typing import Callable

import torch

from .base import UnreadableSample


_WARN_FIRST = 5  # unreadable items warned about one by one; the rest are counted


class _Skip:
    """Stands in a batch for an item that could not be read (picklable, tiny)."""

    __slots__ = ("index", "reason")

    def __init__(self, index: int, reason: str):
        self.index, self.reason = index, reason


class _Guarded(torch.utils.data.Dataset):
    """dataset[i], with an UnreadableSample turned into a _Skip marker (runs in the workers)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        try:
            return self.dataset[i]
        except UnreadableSample as e:
            return _Skip(i, e.reason)


def collate(items: list[dict]) -> dict:
    """Stack a list of items into a batch: tensors stacked, ints → int64 tensor, the rest
    (captions, hashtag lists) kept as lists.

    Equivalent: ``{k: torch.stack([it[k] for it in items]) if tensor else [it[k] ...]}``.
    """
    if not items:
        raise ValueError("items: expected at least one item to collate, got none")
    keys = list(items[0])
    for it in items[1:]:
        if list(it) != keys:
            raise ValueError(f"items: expected the same keys in every item, got {keys} and "
                             f"{list(it)} (mixed image and video datasets need separate "
                             f"loaders)")
    out = {}
    for k in keys:
        vals = [it[k] for it in items]
        if isinstance(vals[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in vals}
            if len(shapes) > 1:
                raise ValueError(f"items[*][{k!r}]: expected one shape to stack, got {shapes} "
                                 f"(render the dataset at one size)")
            out[k] = torch.stack(vals)
        elif isinstance(vals[0], int) and not isinstance(vals[0], bool):
            out[k] = torch.tensor(vals, dtype=torch.int64)
        else:
            out[k] = vals
    return out


class _GuardedCollate:
    """collate_fn(items) -> (batch or None, [(index, reason)] of the skipped items)."""

    def __init__(self, collate_fn: Callable):
        self.collate_fn = collate_fn

    def __call__(self, items):
        good = [it for it in items if not isinstance(it, _Skip)]
        skipped = [(it.index, it.reason) for it in items if isinstance(it, _Skip)]
        return (self.collate_fn(good) if good else None), skipped


def _worker_init(_):
    # the DataLoader's workers each get one thread: they render/decode items, the main
    # process keeps the cores for the model
    torch.set_num_threads(1)


class _PositionSampler(torch.utils.data.Sampler):
    """Yields the loader's remaining batches of its current epoch (read at iter time).

    Holds the loader weakly: no reference cycle, so a dropped loader shuts its worker
    processes down at once instead of whenever the garbage collector runs."""

    def __init__(self, loader: "ResumableLoader"):
        self._loader = weakref.ref(loader)

    def __iter__(self):
        ld = self._loader()
        return iter(ld.epoch_batches(ld.epoch)[ld.batch:])

    def __len__(self):
        ld = self._loader()
        return max(0, len(ld) - ld.batch)


def _seed_of(*parts) -> int:
    key = ":".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


class ResumableLoader:
    """Batches of a map-style dataset, sharded by rank and worker, with a resumable position.

    Args:
        dataset: a map-style dataset of item dicts.
        batch_size: items per batch (a batch is shorter by the unreadable items it dropped).
        seed: the epochs' order is a function of (seed, epoch) only.
        shuffle: a fresh permutation each epoch (False: in order).
        weights: optional (N,) sampling weights: each epoch draws ``epoch_size`` indices with
            replacement in proportion to them (hashtag balancing).
        epoch_size: indices per epoch over all ranks (default: len(dataset)).
        rank, world_size: this process's shard.
        num_workers: DataLoader worker processes (0: load in this process).
        device: where the batches go; "cuda" turns on pinned memory. The loader does not
            move batches: ``batch[k].to(device, non_blocking=True)`` then overlaps the copy.
        drop_last: drop each epoch's last incomplete batch (keeps shapes constant).

    Iterating yields one epoch's batches from the current position; :meth:`endless` runs
    epoch after epoch. ``state_dict()`` / ``load_state_dict()`` save and restore the position.
    """

    def __init__(self, dataset, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 weights: torch.Tensor | None = None, epoch_size: int | None = None,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 device: str | torch.device = "cpu", drop_last: bool = True,
                 collate_fn: Callable = collate, prefetch_factor: int = 2):
        n = len(dataset)
        if n < 1:
            raise ValueError("dataset: expected at least one item, got an empty dataset")
        for name, v, lo in (("batch_size", batch_size, 1), ("world_size", world_size, 1),
                            ("rank", rank, 0), ("num_workers", num_workers, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
        if rank >= world_size:
            raise ValueError(f"rank: expected an int in [0, {world_size - 1}] for world_size "
                             f"{world_size}, got {rank}")
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=torch.float64).flatten()
            if weights.numel() != n:
                raise ValueError(f"weights: expected {n} weights (one per item), got "
                                 f"{weights.numel()}")
            if not torch.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
                raise ValueError("weights: expected finite non-negative weights with a "
                                 "positive sum")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, int(seed)
        self.shuffle, self.weights, self.drop_last = bool(shuffle), weights, bool(drop_last)
        self.epoch_size = n if epoch_size is None else int(epoch_size)
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.device = torch.device(device)
        self._user_collate = collate_fn
        self.prefetch_factor = prefetch_factor
        self.epoch, self.batch = 0, 0
        self.skipped: list[tuple[int, str]] = []
        self._dl = None
        self._cache: tuple[int, list] | None = None
        if len(self) == 0:
            raise ValueError(f"batch_size: {batch_size} x world_size {world_size} is more than "
                             f"an epoch's {self.epoch_size} items with drop_last")

    # ------------------------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> torch.Tensor:
        """All ranks' indices of ``epoch``, (epoch_size,) int64."""
        g = torch.Generator().manual_seed(_seed_of(self.seed, epoch))
        n = len(self.dataset)
        if self.weights is not None:
            return torch.multinomial(self.weights, self.epoch_size, replacement=True,
                                     generator=g)
        if self.shuffle:
            perm = torch.cat([torch.randperm(n, generator=g)
                              for _ in range(-(-self.epoch_size // n))])
            return perm[:self.epoch_size]
        return torch.arange(self.epoch_size) % n

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch`` (lists of dataset indices)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        order = self.epoch_order(epoch)
        per_rank = len(order) // self.world_size  # every rank gets as many items
        mine = order[self.rank::self.world_size][:per_rank].tolist()
        bs = self.batch_size
        batches = [mine[i:i + bs] for i in range(0, len(mine), bs)]
        if self.drop_last and batches and len(batches[-1]) < bs:
            batches.pop()
        self._cache = (epoch, batches)
        return batches

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        per_rank = self.epoch_size // self.world_size
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    # ------------------------------------------------------------------------------------------
    def _loader(self):
        if self._dl is None:
            kw = {}
            if self.num_workers > 0:
                kw = {"persistent_workers": True, "prefetch_factor": self.prefetch_factor,
                      "worker_init_fn": _worker_init}
            self._dl = torch.utils.data.DataLoader(
                _Guarded(self.dataset), batch_sampler=_PositionSampler(self),
                num_workers=self.num_workers, collate_fn=_GuardedCollate(self._user_collate),
                pin_memory=self.device.type == "cuda", **kw)
        return self._dl

    def __iter__(self):
        if self.batch >= len(self):
            self.epoch, self.batch = self.epoch + 1, 0
        whole_epoch, yielded = self.batch == 0, 0
        for batch, skipped in self._loader():
            self.batch += 1
            for index, reason in skipped:
                self.skipped.append((index, reason))
                if len(self.skipped) <= _WARN_FIRST:
                    more = "; further ones are only counted (loader.report())" \
                        if len(self.skipped) == _WARN_FIRST else ""
                    warnings.warn(f"data: skipped unreadable item {index}: {reason}{more}",
                                  stacklevel=2)
            if batch is None:
                continue
            yielded += 1
            yield batch
        if whole_epoch and yielded == 0:
            raise RuntimeError(f"dataset: every item of epoch {self.epoch} was unreadable "
                               f"({len(self.skipped)} skipped so far; first: "
                               f"{self.skipped[0][1] if self.skipped else '?'})")
        self.epoch, self.batch = self.epoch + 1, 0

    def endless(self):
        """Batches forever, epoch after epoch, from the current position."""
        while True:
            yield from self

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The position: batches yielded so far in ``epoch``, and what it depends on."""
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed,
                "batch_size": self.batch_size, "world_size": self.world_size,
                "rank": self.rank, "num_items": len(self.dataset),
                "epoch_size": self.epoch_size, "skipped": len(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state``'s position. The dataset, batch size, seed and world size must be
        those of the checkpoint (else the order differs and resuming is not exact)."""
        for key, mine in (("num_items", len(self.dataset)), ("batch_size", self.batch_size),
                          ("seed", self.seed), ("world_size", self.world_size),
                          ("epoch_size", self.epoch_size)):
            if key in state and state[key] != mine:
                raise ValueError(f"state[{key!r}]: the checkpoint's {key} is {state[key]}, "
                                 f"this loader's is {mine}: resuming would not be exact")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self._dl = None  # drop prefetched batches of the old position

    def close(self) -> None:
        """Stop the worker processes now (they also stop when the loader is dropped)."""
        self._dl = None

    def report(self) -> str:
        """One line: how many items were skipped as unreadable, and the first reasons."""
        if not self.skipped:
            return "data: no unreadable items"
        first = "; ".join(f"{i}: {r}" for i, r in self.skipped[:3])
        return f"data: {len(self.skipped)} unreadable items skipped ({first})"


def make_loader(dataset, batch_size: int, **kwargs) -> ResumableLoader:
    """``ResumableLoader(dataset, batch_size, **kwargs)``: see its docstring."""
    return ResumableLoader(dataset, batch_size, **kwargs)
