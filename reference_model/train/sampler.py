"""Deterministic, resumable, sharded batches from map-style datasets.

A source's samples form one endless stream: epoch e is ``randperm(N)`` drawn from a generator
seeded with (seed, source, e), and the *data position* p (global samples consumed so far) is
epoch p // N, offset p % N. A step's global batch is the next ``batch_size`` positions; rank r
takes its contiguous share and splits it into ``accum`` micro-batches; a DataLoader's workers
fetch whole micro-batches. Each item is loaded under its own RNG seed (from seed, source and
position), so random augmentation does not depend on the worker, the world size or a resume.
Resuming at position p gives the same batches as never having stopped.
"""

from __future__ import annotations

import hashlib
import random
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


def _mix(*parts: int) -> int:
    """A stable 63-bit seed from integers (Python's hash() of a tuple is not stable across runs)."""
    digest = hashlib.blake2b(np.asarray(parts, dtype=np.int64).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class IndexStream:
    """Sample indices at data positions [p, p + count) of an endless shuffled stream."""

    def __init__(self, n: int, seed: int, source: int = 0):
        if n < 1:
            raise ValueError(f"dataset: expected at least one sample, got {n}")
        self.n, self.seed, self.source = n, seed, source
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(_mix(self.seed, self.source, epoch))
            self._perm, self._epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm

    def take(self, position: int, count: int) -> list[tuple[int, int]]:
        """[(item seed, dataset index)] for positions position .. position + count - 1."""
        out = []
        for p in range(position, position + count):
            epoch, off = divmod(p, self.n)
            out.append((_mix(self.seed, self.source, p, 1), int(self._permutation(epoch)[off])))
        return out


class SeededItems(Dataset):
    """``ds[idx]`` fetched as ``self[(item_seed, idx)]`` with torch / numpy / random seeded by
    item_seed; the caller's RNG states are restored afterwards (so a fetch in the main process
    leaves the training RNG untouched). The DataLoader fetches a micro-batch at once through
    ``__getitems__``: the states are saved and restored once per batch, not per item."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, key):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys):
        py, npy = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            try:
                out = []
                for item_seed, idx in keys:
                    torch.default_generator.manual_seed(item_seed)  # CPU only: 100x cheaper
                    random.seed(item_seed)
                    np.random.seed(item_seed % 2**32)
                    out.append(self.ds[idx])
                return out
            finally:
                random.setstate(py)
                np.random.set_state(npy)


def default_collate(items: list[dict]) -> dict:
    """Stack tensors and numbers; keep strings and lists as lists (the data contract's collate)."""
    out = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        if isinstance(vals[0], torch.Tensor):
            out[k] = torch.stack(vals)
        elif isinstance(vals[0], (int, float)) and not isinstance(vals[0], bool):
            out[k] = torch.tensor(vals)
        else:
            out[k] = vals
    return out


class MicroBatches:
    """The batch sampler of one source: for each step in ``steps`` (those that draw from this
    source, in order) it yields this rank's ``accum`` micro-batches of keys for
    :class:`SeededItems`, starting at data position ``position``.

    ``batch_size(step)`` is the global batch of that step (a multiple of world x accum).
    """

    def __init__(self, stream: IndexStream, steps: Iterator[int], batch_size: Callable[[int], int],
                 position: int, rank: int, world: int, accum: int):
        self.stream, self.steps, self.batch_size = stream, steps, batch_size
        self.position, self.rank, self.world, self.accum = position, rank, world, accum

    def __iter__(self):
        pos = self.position
        for step in self.steps:
            b = self.batch_size(step)
            local = b // self.world
            keys = self.stream.take(pos + self.rank * local, local)
            micro = local // self.accum
            for m in range(self.accum):
                yield keys[m * micro:(m + 1) * micro]
            pos += b


def make_loader(ds, stream: IndexStream, steps, batch_size, position: int, *, rank: int,
                world: int, accum: int, num_workers: int, collate=None, seed: int = 0
                ) -> Iterator[dict]:
    """An iterator of this rank's micro-batches (dicts) for the given steps of one source.

    The DataLoader gets its own generator: creating it draws nothing from the global RNG (which
    the model's masks use), so a resumed run and a straight one see the same random numbers."""
    sampler = MicroBatches(stream, steps, batch_size, position, rank, world, accum)
    g = torch.Generator().manual_seed(_mix(seed, stream.source, position, rank))
    return iter(DataLoader(SeededItems(ds), batch_sampler=sampler, num_workers=num_workers,
                           collate_fn=collate or default_collate, generator=g,
                           persistent_workers=False, pin_memory=False))
