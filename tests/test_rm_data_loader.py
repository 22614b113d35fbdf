"""The loader: sharding by rank and worker, exact resume, weighted draws, unreadable items."""

import collections

import pytest
import torch

from reference_model.data import (CaptionDataset, ResumableLoader, SyntheticImages,
                                  UnreadableSample, collate, make_loader)
from reference_model.data.base import make_meta


class Numbers(CaptionDataset):
    """Item i: a (3, 2, 2) image filled with i; ``bad`` indices are unreadable."""

    def __init__(self, n, bad=()):
        self.n, self.bad, self.size = n, set(bad), 2

    def __len__(self):
        return self.n

    def meta(self, i):
        return make_meta(i, f"n{i}", None, [f"t{i % 3}"], i % 5)

    def pixels(self, i):
        if i in self.bad:
            raise UnreadableSample(i, f"file{i}.png", OSError("truncated file"))
        return torch.full((3, 2, 2), float(i))


def _ids(batches):
    return [b["index"].tolist() for b in batches]


def test_epoch_is_a_permutation_and_ranks_are_disjoint():
    ds = Numbers(50)
    seen = []
    for rank in range(3):
        ld = ResumableLoader(ds, 4, seed=1, rank=rank, world_size=3)
        assert len(ld) == 4  # 50 // 3 = 16 per rank, 4 batches of 4
        seen.append([i for b in _ids(list(ld)) for i in b])
    flat = [i for s in seen for i in s]
    assert len(flat) == len(set(flat)) == 48
    # a new epoch is another permutation
    ld = ResumableLoader(ds, 10, seed=1)
    e0, e1 = _ids(list(ld)), _ids(list(ld))
    assert sorted(sum(e0, [])) == list(range(50)) and e0 != e1
    assert ld.state_dict()["epoch"] == 2


def test_workers_give_the_same_batches():
    ds = SyntheticImages(40, 8, seed=0)
    a = list(ResumableLoader(ds, 8, seed=5))
    b = list(ResumableLoader(ds, 8, seed=5, num_workers=2))
    assert _ids(a) == _ids(b)
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"]) and x["caption"] == y["caption"]
    assert a[0]["image"].shape == (8, 3, 8, 8) and len(a[0]["hashtags"]) == 8


# (stop, workers): mid-epoch, at an epoch's end, across one; worker processes cost ~1 s each
@pytest.mark.parametrize("stops,workers", [((1, 4, 6, 9), 0), ((6,), 2)])
def test_resume_is_exact(stops, workers):
    ds = Numbers(23)
    ref = ResumableLoader(ds, 5, seed=9)
    stream = ref.endless()
    full = [next(stream)["index"].tolist() for _ in range(11)]  # crosses two epoch ends
    for stop in stops:
        ld = ResumableLoader(ds, 5, seed=9, num_workers=workers)
        it = ld.endless()
        got = [next(it)["index"].tolist() for _ in range(stop)]
        state = ld.state_dict()
        fresh = ResumableLoader(ds, 5, seed=9, num_workers=workers)
        fresh.load_state_dict(state)
        it2 = fresh.endless()
        got += [next(it2)["index"].tolist() for _ in range(11 - stop)]
        assert got == full, stop
        ld.close()
        fresh.close()


def test_resume_checks_the_setup():
    ld = ResumableLoader(Numbers(20), 4, seed=0)
    state = ld.state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        ResumableLoader(Numbers(20), 5, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="num_items"):
        ResumableLoader(Numbers(21), 4, seed=0).load_state_dict(state)


def test_weighted_draws_follow_the_weights():
    ds = Numbers(4)
    w = torch.tensor([1.0, 1.0, 2.0, 4.0])
    ld = ResumableLoader(ds, 8, seed=0, weights=w, epoch_size=4000)
    counts = collections.Counter(i for b in ld for i in b["index"].tolist())
    total = sum(counts.values())
    for i, p in enumerate((w / w.sum()).tolist()):
        assert abs(counts[i] / total - p) < 0.03
    with pytest.raises(ValueError, match="weights"):
        ResumableLoader(ds, 2, weights=torch.tensor([1.0, -1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="4 weights"):
        ResumableLoader(ds, 2, weights=torch.ones(3))


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_items_are_skipped_and_counted(workers):
    ds = Numbers(12, bad={3, 7})
    ld = make_loader(ds, 4, seed=0, shuffle=False, num_workers=workers)
    with pytest.warns(UserWarning, match="skipped unreadable item"):
        batches = list(ld)
    got = sorted(i for b in batches for i in b["index"].tolist())
    assert got == [0, 1, 2, 4, 5, 6, 8, 9, 10, 11]
    assert sorted(i for i, _ in ld.skipped) == [3, 7]
    assert "truncated file" in ld.skipped[0][1]
    assert "2 unreadable items skipped" in ld.report()
    assert [len(b["index"]) for b in batches] == [3, 3, 4]  # short batches, never an error


def test_all_unreadable_is_an_error():
    ld = ResumableLoader(Numbers(4, bad={0, 1, 2, 3}), 2, shuffle=False)
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="every item"):
        list(ld)


def test_collate_and_arguments():
    b = collate([{"image": torch.zeros(3, 2, 2), "label": 1, "caption": "a", "hashtags": []},
                 {"image": torch.ones(3, 2, 2), "label": -1, "caption": "b", "hashtags": ["x"]}])
    assert b["image"].shape == (2, 3, 2, 2) and b["label"].dtype == torch.int64
    assert b["caption"] == ["a", "b"] and b["hashtags"] == [[], ["x"]]
    with pytest.raises(ValueError, match="same keys"):
        collate([{"image": torch.zeros(1)}, {"video": torch.zeros(1)}])
    with pytest.raises(ValueError, match="one shape"):
        collate([{"image": torch.zeros(1)}, {"image": torch.zeros(2)}])
    with pytest.raises(ValueError, match="rank"):
        ResumableLoader(Numbers(8), 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        ResumableLoader(Numbers(8), 0)
    with pytest.raises(ValueError, match="more than"):
        ResumableLoader(Numbers(8), 5, world_size=2)
