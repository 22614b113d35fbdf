"""The hashtag vocabulary: tags ↔ indices, and tag lists → multi-hot targets."""

from __future__ import annotations

import collections
import json
from typing import Iterable

import torch

from .base import normalize_tag, parse_tags


class HashtagVocab:
    """An ordered set of hashtags (most frequent first when built from data).

    ``encode(tags) -> (V,)`` float32 multi-hot (unknown tags ignored);
    ``encode_batch(list of tag lists) -> (B, V)``; ``decode(row, threshold)`` back to tags.
    ``state_dict()`` / ``from_state_dict`` save it beside a checkpoint.

    Equivalent PyTorch::

        target = torch.zeros(len(vocab)); target[[vocab.index[t] for t in tags if t in vocab]] = 1
    """

    def __init__(self, tags: Iterable[str], counts: dict[str, int] | None = None):
        self.tags: list[str] = []
        self.index: dict[str, int] = {}
        for t in tags:
            t = normalize_tag(t)
            if not t:
                raise ValueError("tags: expected non-empty hashtags, got an empty one")
            if t in self.index:
                raise ValueError(f"tags: expected distinct hashtags, got {t!r} twice")
            self.index[t] = len(self.tags)
            self.tags.append(t)
        self.counts = dict(counts or {})

    @classmethod
    def build(cls, source, *, min_count: int = 1, max_size: int | None = None) -> "HashtagVocab":
        """From a dataset (its ``meta`` hashtags) or an iterable of tag lists: tags seen at least
        ``min_count`` times, most frequent first (ties alphabetical), at most ``max_size``."""
        if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
            raise ValueError(f"min_count: expected an int >= 1, got {min_count!r}")
        if max_size is not None and (not isinstance(max_size, int) or max_size < 1):
            raise ValueError(f"max_size: expected None or an int >= 1, got {max_size!r}")
        lists = source.hashtag_lists() if hasattr(source, "hashtag_lists") else source
        counts = collections.Counter(t for tags in lists for t in parse_tags(tags))
        kept = sorted((t for t, c in counts.items() if c >= min_count),
                      key=lambda t: (-counts[t], t))
        if max_size is not None:
            kept = kept[:max_size]
        return cls(kept, {t: counts[t] for t in kept})

    def __len__(self) -> int:
        return len(self.tags)

    def __contains__(self, tag: str) -> bool:
        return normalize_tag(tag) in self.index

    def __repr__(self) -> str:
        head = ", ".join(self.tags[:8]) + (", ..." if len(self.tags) > 8 else "")
        return f"HashtagVocab({len(self)} tags: {head})"

    def encode(self, tags) -> torch.Tensor:
        """Tags (a list, or a '#a #b' string) -> (V,) float32 multi-hot."""
        out = torch.zeros(len(self), dtype=torch.float32)
        idx = [self.index[t] for t in parse_tags(tags) if t in self.index]
        if idx:
            out[idx] = 1.0
        return out

    def encode_batch(self, batch_tags) -> torch.Tensor:
        """A list of B tag lists -> (B, V) float32 multi-hot."""
        if len(self) == 0:
            raise ValueError("vocab: the vocabulary is empty (no hashtags were kept)")
        return torch.stack([self.encode(t) for t in batch_tags]) if len(batch_tags) else \
            torch.zeros(0, len(self))

    def decode(self, row: torch.Tensor, threshold: float = 0.5) -> list[str]:
        """(V,) scores -> the tags whose score is >= threshold, highest first."""
        if row.shape != (len(self),):
            raise ValueError(f"row: expected shape ({len(self)},), got {tuple(row.shape)}")
        order = torch.argsort(row, descending=True).tolist()
        return [self.tags[i] for i in order if float(row[i]) >= threshold]

    def state_dict(self) -> dict:
        return {"tags": list(self.tags), "counts": dict(self.counts)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "HashtagVocab":
        return cls(state["tags"], state.get("counts"))

    def save(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.state_dict(), f, indent=1)

    @classmethod
    def load(cls, path) -> "HashtagVocab":
        with open(path) as f:
            return cls.from_state_dict(json.load(f))
