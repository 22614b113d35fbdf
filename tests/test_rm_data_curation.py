"""Curation steps (each reports what it removed), balancing weights, pseudo-labels, vocabulary."""

import collections
import math

import pytest
import torch

from reference_model.data import (CaptionDataset, Curated, HashtagVocab, balance_report,
                                  balance_weights, curate, pseudo_label, remove_duplicates,
                                  remove_many_tags, remove_rare_tags)
from reference_model.data.base import make_meta


class Toy(CaptionDataset):
    """Items with given tags; pixels encode a content id (equal ids = duplicate content)."""

    def __init__(self, tags, content=None):
        self.tags = tags
        self.content = content or list(range(len(tags)))
        self.size = 4

    def __len__(self):
        return len(self.tags)

    def meta(self, i):
        return make_meta(i, f"item {i}", None, self.tags[i], -1)

    def pixels(self, i):
        return torch.full((3, 4, 4), self.content[i] / 100.0)


def test_remove_duplicates_keeps_first_and_reports():
    ds = Toy([["a"], ["b"], ["a"], ["c"], ["b"]], content=[1, 2, 1, 3, 2])
    out, rep = remove_duplicates(ds)
    assert [out.base_index(i) for i in range(len(out))] == [0, 1, 3]
    assert rep.removed_samples == 2 and "2 exact duplicates" in rep.line()
    assert [out[i]["index"] for i in range(len(out))] == [0, 1, 2]  # positions in the view
    assert out[2]["caption"] == "item 3"


def test_remove_many_tags_and_rare_tags():
    tags = [["a", "b"], ["a"], ["a", "rare"], list("abcdefg"), ["b"], [], ["b", "a"]]
    ds = Toy(tags)
    out, rep = remove_many_tags(ds, 3)
    assert len(out) == 6 and rep.removed_samples == 1
    out2, rep2 = remove_rare_tags(out, 2)
    assert rep2.removed_tags == ["rare"] and rep2.removed_tag_uses == 1
    assert rep2.removed_samples == 0
    assert out2.meta(2)["hashtags"] == ["a"]
    assert out2.hashtag_lists() == [["a", "b"], ["a"], ["a"], ["b"], [], ["b", "a"]]
    out3, rep3 = remove_rare_tags(out, 2, drop_untagged=True)
    assert len(out3) == 5 and rep3.removed_samples == 1
    with pytest.raises(ValueError, match="max_tags"):
        remove_many_tags(ds, 0)


def test_curate_pipeline_order_and_report():
    # a duplicate of a spam sample must not count twice towards tag counts
    tags = [["x", "y"], ["x"], ["x", "y"], ["z"] + [f"s{k}" for k in range(13)], ["y", "w"]]
    ds = Toy(tags, content=[0, 1, 0, 3, 4])
    out, report = curate(ds, min_tag_count=2, max_tags=12)
    assert [r.step for r in report] == ["dedup", "max_tags", "min_tag_count"]
    assert [r.removed_samples for r in report] == [1, 1, 0]
    assert report[2].removed_tags == ["w"]
    assert out.hashtag_lists() == [["x", "y"], ["x"], ["y"]]
    text = str(report)
    assert "dedup: 5 -> 4" in text and "max_tags: 4 -> 3" in text and "1 tags removed (w)" in text
    assert isinstance(report.to_dict(), list)


def test_curate_synthetic_web_data():
    from reference_model.data import build_dataset

    ds = build_dataset("synthetic", split="train", size=8, n=1500)
    out, report = curate(ds, min_tag_count=5, max_tags=12)
    assert report[0].removed_samples > 0  # duplicates
    assert report[1].removed_samples > 0  # spam
    assert report[2].removed_tags  # the noise tags' rare tail
    counts = collections.Counter(t for tags in out.hashtag_lists() for t in tags)
    assert min(counts.values()) >= 5
    assert max(len(t) for t in out.hashtag_lists()) <= 12
    hashes = [out.content_hash(i) for i in range(len(out))]
    assert len(set(hashes)) == len(hashes)


def test_balance_weights_inverse_sqrt():
    tags = [["common"]] * 16 + [["rare"]] * 4 + [["common", "rare"]] * 0 + [[]]
    ds = Toy(tags)
    w = balance_weights(ds)
    assert w.shape == (21,) and math.isclose(float(w.mean()), 1.0, rel_tol=1e-12)
    # common: 16^-0.5 = 0.25, rare: 4^-0.5 = 0.5: rare samples weigh twice as much
    assert math.isclose(float(w[16] / w[0]), 2.0, rel_tol=1e-12)
    # the untagged sample weighs the mean of the tagged ones
    tagged_mean = (16 * 0.25 + 4 * 0.5) / 20
    assert math.isclose(float(w[20] / w[0]), tagged_mean / 0.25, rel_tol=1e-12)
    rep = balance_report(ds, w)
    assert "4.0x -> 2.0x" in rep.line()  # expected tag frequencies 16:4 -> 4:2
    mixed = Toy([["a", "b"], ["a"], ["a"], ["a"]])
    wm = balance_weights(mixed)
    ref = torch.tensor([(4 ** -0.5 + 1) / 2, 0.5, 0.5, 0.5], dtype=torch.float64)
    torch.testing.assert_close(wm, ref / ref.mean())


def test_pseudo_label_untagged_only():
    ds = Toy([["a"], [], [], ["b"]], content=[10, 20, 30, 40])
    vocab = HashtagVocab(["a", "b", "c"])
    calls = []

    def teacher(x):
        calls.append(x.shape[0])
        v = x[:, 0, 0, 0]  # content id / 100
        # item 1 (0.2): confident about c; item 2 (0.3): nothing above threshold
        return torch.stack([torch.full_like(v, 0.1), torch.full_like(v, 0.2),
                            (v < 0.25).float() * 0.95], 1)

    out, rep = pseudo_label(ds, teacher, vocab, threshold=0.9)
    assert calls == [2]  # only the untagged samples went through the teacher
    assert out.hashtag_lists() == [["a"], ["c"], [], ["b"]]
    assert rep.added_tag_uses == 1 and "2 untagged, 1 pseudo-labelled" in rep.line()

    with pytest.raises(ValueError, match="probabilities"):
        pseudo_label(ds, lambda x: torch.full((x.shape[0], 3), 3.0), vocab)
    with pytest.raises(ValueError, match="teacher"):
        pseudo_label(ds, lambda x: torch.zeros(x.shape[0], 2), vocab)


def test_curated_view_of_view_keeps_overrides():
    ds = Toy([["a", "rare"], ["a"], [], ["a"]], content=[1, 2, 3, 1])
    v1, _ = remove_rare_tags(ds, 2)
    v2, _ = remove_duplicates(v1)
    assert isinstance(v2, Curated) and v2.base is ds
    assert v2.hashtag_lists() == [["a"], ["a"], []]


def test_vocab():
    v = HashtagVocab.build([["b", "a"], ["#A", "c"], ["a"], ["b"]], min_count=2)
    assert v.tags == ["a", "b"] and v.counts == {"a": 3, "b": 2}  # frequency, then name
    assert torch.equal(v.encode(["b", "zzz", "#A"]), torch.tensor([1.0, 1.0]))
    assert torch.equal(v.encode("#b"), torch.tensor([0.0, 1.0]))
    assert v.encode_batch([["a"], []]).tolist() == [[1.0, 0.0], [0.0, 0.0]]
    assert v.decode(torch.tensor([0.2, 0.9]), 0.5) == ["b"]
    assert HashtagVocab.from_state_dict(v.state_dict()).tags == v.tags
    assert "Big Cat" in HashtagVocab(["big cat"]) and HashtagVocab(["big cat"]).tags == ["big_cat"]
    assert HashtagVocab.build([["a", "b", "c"]], max_size=2).tags == ["a", "b"]
    with pytest.raises(ValueError, match="distinct"):
        HashtagVocab(["a", "#A"])
    with pytest.raises(ValueError, match="empty"):
        HashtagVocab([]).encode_batch([["a"]])
