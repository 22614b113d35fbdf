"""Curation of hashtag data, as the Xray-Visual paper describes it, each step reporting what it
removed: duplicate removal by content hash, removal of samples with too many tags (spam) and of
rare tags, hashtag frequency balancing (inverse-square-root resampling), and semi-supervision
(a teacher's confident pseudo-hashtags for untagged samples).

Steps return a :class:`Curated` view of the dataset (indices into it plus replaced hashtags;
pixels are never copied) and a :class:`StepReport`.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable

import torch

from .base import CaptionDataset, UnreadableSample, check_index, parse_tags


@dataclasses.dataclass
class StepReport:
    """What one curation step did: ``removed_samples`` (count), ``removed_tags`` (distinct
    tags dropped), ``removed_tag_uses`` (tag occurrences dropped), ``added_tag_uses``,
    ``unreadable`` ([(index, reason)]) and a one-line ``detail``."""

    step: str
    samples_in: int
    samples_out: int
    removed_tags: list = dataclasses.field(default_factory=list)
    removed_tag_uses: int = 0
    added_tag_uses: int = 0
    unreadable: list = dataclasses.field(default_factory=list)
    detail: str = ""

    @property
    def removed_samples(self) -> int:
        return self.samples_in - self.samples_out

    def line(self) -> str:
        parts = [f"{self.step}: {self.samples_in} -> {self.samples_out} samples "
                 f"(-{self.removed_samples})"]
        if self.removed_tags:
            shown = ", ".join(self.removed_tags[:6]) + (", ..." if len(self.removed_tags) > 6
                                                        else "")
            parts.append(f"{len(self.removed_tags)} tags removed ({shown})")
        if self.removed_tag_uses:
            parts.append(f"{self.removed_tag_uses} tag uses removed")
        if self.added_tag_uses:
            parts.append(f"{self.added_tag_uses} tag uses added")
        if self.unreadable:
            parts.append(f"{len(self.unreadable)} unreadable skipped")
        if self.detail:
            parts.append(self.detail)
        return "; ".join(parts)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["removed_samples"] = self.removed_samples
        d["unreadable"] = [list(u) for u in self.unreadable]
        return d


class CurationReport(list):
    """The StepReports of a curation run, in order; ``str()`` is one line per step."""

    def __str__(self) -> str:
        return "\n".join(r.line() for r in self)

    def to_dict(self) -> list:
        return [r.to_dict() for r in self]


class Curated(CaptionDataset):
    """A view of ``base``: the items at ``indices`` (base positions), hashtags replaced where
    ``tags`` ({base index: tags}) says. ``index`` in its items is the position in the view."""

    def __init__(self, base: CaptionDataset, indices, tags: dict | None = None):
        self.base = base
        self.indices = [int(i) for i in indices]
        self.tags = dict(tags or {})
        for attr in ("kind", "size", "frames", "classes", "prompts"):
            setattr(self, attr, getattr(base, attr))

    def __len__(self) -> int:
        return len(self.indices)

    def base_index(self, i: int) -> int:
        return self.indices[check_index(i, len(self))]

    def meta(self, i: int) -> dict:
        i = check_index(i, len(self))
        b = self.indices[i]
        m = self.base.meta(b)
        if b in self.tags:
            m["hashtags"] = list(self.tags[b])
        m["index"] = i
        return m

    def pixels(self, i: int) -> torch.Tensor:
        return self.base.pixels(self.base_index(i))

    def __getitem__(self, i) -> dict:
        i = check_index(i, len(self))
        try:
            item = self.meta(i)
            item[self.kind] = self.pixels(i)
        except UnreadableSample as e:  # the view's position, not the base's
            raise UnreadableSample(i, e.source, e.reason) from None
        return item

    def content_hash(self, i: int) -> str:
        return self.base.content_hash(self.base_index(i))


def _view(ds: CaptionDataset) -> Curated:
    return ds if isinstance(ds, Curated) else Curated(ds, range(len(ds)))


def _derive(view: Curated, positions, tags: dict | None = None) -> Curated:
    """A new view of view.base keeping ``positions`` of ``view``, with extra tag overrides."""
    merged = dict(view.tags)
    merged.update(tags or {})
    idx = [view.indices[p] for p in positions]
    keep = set(idx)
    return Curated(view.base, idx, {b: t for b, t in merged.items() if b in keep})


def remove_duplicates(ds: CaptionDataset) -> tuple[Curated, StepReport]:
    """Keep the first item of each content hash (``ds.content_hash``); an item whose file
    cannot be read is dropped and listed in ``unreadable``."""
    view = _view(ds)
    seen: set[str] = set()
    keep, unreadable = [], []
    for p in range(len(view)):
        try:
            h = view.content_hash(p)
        except UnreadableSample as e:
            unreadable.append((p, e.reason))
            continue
        if h not in seen:
            seen.add(h)
            keep.append(p)
    out = _derive(view, keep)
    dup = len(view) - len(keep) - len(unreadable)
    return out, StepReport("dedup", len(view), len(out), unreadable=unreadable,
                           detail=f"{dup} exact duplicates")


def remove_many_tags(ds: CaptionDataset, max_tags: int) -> tuple[Curated, StepReport]:
    """Drop samples with more than ``max_tags`` hashtags (tag spam)."""
    if isinstance(max_tags, bool) or not isinstance(max_tags, int) or max_tags < 1:
        raise ValueError(f"max_tags: expected an int >= 1, got {max_tags!r}")
    view = _view(ds)
    keep = [p for p in range(len(view)) if len(view.meta(p)["hashtags"]) <= max_tags]
    out = _derive(view, keep)
    return out, StepReport("max_tags", len(view), len(out),
                           detail=f"samples with more than {max_tags} tags")


def remove_rare_tags(ds: CaptionDataset, min_count: int,
                     drop_untagged: bool = False) -> tuple[Curated, StepReport]:
    """Remove every hashtag used by fewer than ``min_count`` samples (from every sample);
    with ``drop_untagged`` also drop samples left without any tag."""
    if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
        raise ValueError(f"min_count: expected an int >= 1, got {min_count!r}")
    view = _view(ds)
    lists = [view.meta(p)["hashtags"] for p in range(len(view))]
    counts = collections.Counter(t for tags in lists for t in tags)
    rare = sorted((t for t, c in counts.items() if c < min_count), key=lambda t: (counts[t], t))
    rare_set = set(rare)
    new_tags, keep, uses = {}, [], 0
    for p, tags in enumerate(lists):
        kept = [t for t in tags if t not in rare_set]
        if len(kept) != len(tags):
            uses += len(tags) - len(kept)
            new_tags[view.indices[p]] = kept
        if kept or not drop_untagged:
            keep.append(p)
    out = _derive(view, keep, new_tags)
    return out, StepReport("min_tag_count", len(view), len(out), removed_tags=rare,
                           removed_tag_uses=uses,
                           detail=f"tags used by fewer than {min_count} samples"
                           + ("; untagged samples dropped" if drop_untagged else ""))


def curate(ds: CaptionDataset, *, min_tag_count: int = 5, max_tags: int | None = 12,
           dedup: bool = True, drop_untagged: bool = False) -> tuple[Curated, CurationReport]:
    """The curation pipeline: duplicates, then spam (too many tags), then rare tags — in that
    order so neither duplicates nor spam inflate the tag counts. Returns the curated view and
    the report of every step.

    Equivalent::

        ds, r1 = remove_duplicates(ds); ds, r2 = remove_many_tags(ds, max_tags)
        ds, r3 = remove_rare_tags(ds, min_tag_count, drop_untagged)
    """
    report = CurationReport()
    view = _view(ds)
    if dedup:
        view, r = remove_duplicates(view)
        report.append(r)
    if max_tags is not None:
        view, r = remove_many_tags(view, max_tags)
        report.append(r)
    if min_tag_count > 1 or drop_untagged:
        view, r = remove_rare_tags(view, min_tag_count, drop_untagged)
        report.append(r)
    return view, report


def tag_frequencies(ds: CaptionDataset, weights: torch.Tensor | None = None) -> dict[str, float]:
    """Expected uses of each tag per sample drawn: Σ_i w_i [t in tags_i] / Σ_i w_i."""
    lists = ds.hashtag_lists()
    w = torch.ones(len(lists), dtype=torch.float64) if weights is None else \
        weights.to(torch.float64)
    total = float(w.sum())
    freq: dict[str, float] = collections.defaultdict(float)
    for wi, tags in zip(w.tolist(), lists):
        for t in tags:
            freq[t] += wi / total
    return dict(freq)


def balance_weights(ds: CaptionDataset, power: float = 0.5) -> torch.Tensor:
    """Per-sample sampling weights (N,) float64, mean 1, for hashtag frequency balancing:
    a sample weighs the mean over its tags of count(tag)^-power (power 0.5: inverse square
    root, as in Mahajan et al. 2018 and the paper); an untagged sample weighs the mean weight.

    Equivalent::

        w_i = mean(count[t] ** -power for t in tags_i); w /= w.mean()
    """
    if not 0.0 <= float(power) <= 1.0:
        raise ValueError(f"power: expected a number in [0, 1], got {power!r}")
    lists = [parse_tags(t) for t in ds.hashtag_lists()]
    if not lists:
        raise ValueError("ds: cannot balance an empty dataset")
    counts = collections.Counter(t for tags in lists for t in tags)
    w = torch.full((len(lists),), float("nan"), dtype=torch.float64)
    for i, tags in enumerate(lists):
        if tags:
            w[i] = sum(counts[t] ** -power for t in tags) / len(tags)
    tagged = ~torch.isnan(w)
    w[~tagged] = w[tagged].mean() if tagged.any() else 1.0
    return w / w.mean()


def balance_report(ds: CaptionDataset, weights: torch.Tensor) -> StepReport:
    """How much balancing evens out the tags: the ratio of the most to the least frequent
    tag's expected frequency, before and after (resampling removes no sample)."""
    before, after = tag_frequencies(ds), tag_frequencies(ds, weights)
    if not before:
        return StepReport("balance", len(ds), len(ds), detail="no hashtags")
    ratio_b = max(before.values()) / min(before.values())
    ratio_a = max(after.values()) / min(after.values())
    return StepReport("balance", len(ds), len(ds),
                      detail=f"most/least frequent tag {ratio_b:.1f}x -> {ratio_a:.1f}x")


@torch.no_grad()
def pseudo_label(ds: CaptionDataset, teacher: Callable[[torch.Tensor], torch.Tensor], vocab,
                 *, threshold: float = 0.9, max_tags: int = 8, batch_size: int = 64,
                 device: str | torch.device = "cpu") -> tuple[Curated, StepReport]:
    """Semi-supervision: untagged samples get the tags the teacher is confident about.

    teacher: (B, 3, H, W) or (B, 3, T, H, W) in [0, 1] -> (B, len(vocab)) probabilities,
        e.g. ``lambda x: hashtag_model(x).sigmoid()``.
    A sample gets the (at most ``max_tags``) tags with probability >= ``threshold``; samples
    the teacher is not confident about stay untagged; unreadable ones are listed and kept.
    """
    if not 0.0 < float(threshold) <= 1.0:
        raise ValueError(f"threshold: expected a probability in (0, 1], got {threshold!r}")
    view = _view(ds)
    todo = [p for p in range(len(view)) if not view.meta(p)["hashtags"]]
    new_tags, added, labelled, unreadable = {}, 0, 0, []
    for s in range(0, len(todo), batch_size):
        chunk, pix = [], []
        for p in todo[s:s + batch_size]:
            try:
                pix.append(view.pixels(p))
                chunk.append(p)
            except UnreadableSample as e:
                unreadable.append((p, e.reason))
        if not chunk:
            continue
        probs = teacher(torch.stack(pix).to(device))
        if not isinstance(probs, torch.Tensor) or probs.shape != (len(chunk), len(vocab)):
            raise ValueError(f"teacher: expected a ({len(chunk)}, {len(vocab)}) tensor of "
                             f"probabilities, got {getattr(probs, 'shape', type(probs))}")
        probs = probs.detach().float().cpu()
        if probs.min() < 0 or probs.max() > 1:
            raise ValueError("teacher: expected probabilities in [0, 1] (apply sigmoid to "
                             f"logits), got values in [{float(probs.min()):.3g}, "
                             f"{float(probs.max()):.3g}]")
        for p, row in zip(chunk, probs):
            tags = vocab.decode(row, threshold)[:max_tags]
            if tags:
                new_tags[view.indices[p]] = tags
                added += len(tags)
                labelled += 1
    out = _derive(view, range(len(view)), new_tags)
    return out, StepReport("pseudo_label", len(view), len(out), added_tag_uses=added,
                           unreadable=unreadable,
                           detail=f"{len(todo)} untagged, {labelled} pseudo-labelled at "
                           f"p >= {threshold}, {len(todo) - labelled} left untagged")
