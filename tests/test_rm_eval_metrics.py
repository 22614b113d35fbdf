"""Evaluation metrics on hand-made embeddings whose answers are known, and their chance levels."""

import math

import pytest
import torch
import torch.nn.functional as F

from reference_model.eval import metrics as M
from reference_model.eval import robustness as R


def _onehot(idx, d=8):
    return F.one_hot(torch.as_tensor(idx), d).float()


def test_zero_shot_and_topk():
    classes = torch.eye(4, 6)  # 4 class embeddings
    # images: 0 → class 0; 1 → between classes 1 and 2, nearer 2; 2 → class 3; 3 → class 0
    images = torch.tensor([[1.0, 0, 0, 0, 0, 0], [0, 0.4, 0.6, 0, 0, 0],
                           [0, 0, 0, 2.0, 0, 0], [3.0, 0.1, 0, 0, 0, 0]])
    labels = torch.tensor([0, 1, 3, 2])
    assert M.zero_shot_accuracy(images, classes, labels) == 0.5
    assert M.zero_shot_accuracy(images, classes, labels, k=2) == 0.75
    assert M.topk_chance(36) == pytest.approx(1 / 36) and M.topk_chance(36, 5) == 5 / 36
    assert M.topk_chance(3, 5) == 1.0
    with pytest.raises(ValueError, match="labels"):
        M.topk_accuracy(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="2 labels"):
        M.topk_accuracy(torch.zeros(2, 3), torch.tensor([0]))


def test_pair_accuracy():
    img = torch.eye(3, 4)
    true = torch.tensor([[1.0, 0.2, 0, 0], [0, 0.1, 1.0, 0], [0, 0, 1.0, 0]])
    false = torch.tensor([[0.2, 1.0, 0, 0], [0, 1.0, 0.1, 0], [0, 0, 1.0, 0]])
    # row 0: true wins; row 1: false is nearer; row 2: a tie counts as wrong
    assert M.pair_accuracy(img, true, false) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="shape"):
        M.pair_accuracy(img, true[:2], false)


def test_class_embeddings_prompt_ensemble():
    table = {"a cat.": [1.0, 0, 0], "a photo of a cat.": [1.0, 1.0, 0],
             "a dog.": [0, 0, 2.0], "a photo of a dog.": [0, 0, 1.0]}

    def encode(texts):
        return torch.tensor([table[t] for t in texts])

    emb = M.class_embeddings(encode, ["cat", "dog"], ["a {}.", "a photo of a {}."])
    s = 1 / math.sqrt(2)
    cat = F.normalize(torch.tensor([1.0 + s, s, 0]), dim=0)
    torch.testing.assert_close(emb, torch.stack([cat, torch.tensor([0, 0, 1.0])]))


def test_retrieval_recall_known_ranks():
    # text j sits at image j's direction, except image 2 whose nearest texts are 0 then 1 then 2
    txt = _onehot([0, 1, 2, 3])
    img = torch.stack([_onehot(0), _onehot(1), F.normalize(torch.tensor(
        [1.0, 0.8, 0.5, 0, 0, 0, 0, 0]), dim=0), _onehot(3)])
    groups = torch.arange(4)
    r = M.retrieval_recall(img, txt, groups, groups, ks=(1, 2, 3))
    assert r["i2t_r1"] == 0.75 and r["i2t_r2"] == 0.75 and r["i2t_r3"] == 1.0
    # text 2 → images: image 2 is its only match and the best one (0.5/‖·‖ vs 0)
    assert r["t2i_r1"] == 1.0
    # groups: images 0 and 2 share caption 0 → image 2's top-1 (text 0) is correct
    r2 = M.retrieval_recall(img, txt[[0, 1, 3]], torch.tensor([0, 1, 0, 3]),
                            torch.tensor([0, 1, 3]), ks=(1,))
    assert r2["i2t_r1"] == 1.0
    with pytest.raises(ValueError, match="no correct item"):
        M.retrieval_recall(img, txt, torch.tensor([0, 1, 2, 9]), groups)


def test_random_recall_matches_simulation():
    g = torch.Generator().manual_seed(0)
    G, ps, k = 20, torch.tensor([1, 3, 5]), 4
    hits = torch.zeros(3)
    trials = 4000
    for _ in range(trials):
        ranked = torch.randperm(G, generator=g)[:k]
        hits += torch.stack([(ranked < p).any() for p in ps]).float()
    sim = hits / trials
    exact = torch.tensor([M.random_recall([int(p)], G, k) for p in ps])
    torch.testing.assert_close(sim, exact.float(), atol=0.025, rtol=0)
    assert M.random_recall([1], 50, 1) == pytest.approx(1 / 50)
    assert M.random_recall([3], 10, 10) == 1.0
    ch = M.retrieval_chance(torch.tensor([0, 0, 1]), torch.tensor([0, 1]), ks=(1,))
    assert ch["i2t_r1"] == pytest.approx(0.5)
    assert ch["t2i_r1"] == pytest.approx((2 / 3 + 1 / 3) / 2)


def test_recall_from_ids():
    ids = torch.tensor([[2, 0], [1, 2], [0, 1]])
    r = M.recall_from_ids(ids, torch.tensor([0, 1, 5]), torch.tensor([0, 1, 5]), ks=(1, 2, 10))
    # query 0 (group 0): gallery 2 (group 5) then gallery 0 → hit at 2; query 1: hit at 1;
    # query 2 (group 5): gallery 0 then 1 → miss
    assert r == pytest.approx({1: 1 / 3, 2: 2 / 3, 10: 2 / 3})


def test_average_precision_against_hand_and_sklearn():
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.3, 0.8], [0.1, 0.2]])
    targets = torch.tensor([[1, 0], [0, 1], [1, 0], [0, 0]])
    ap = M.average_precision(scores, targets)
    # column 0: positives at ranks 1 and 3 → (1/1 + 2/3) / 2; column 1: rank 2 → 1/2
    torch.testing.assert_close(ap, torch.tensor([(1 + 2 / 3) / 2, 0.5], dtype=torch.float64))
    assert M.mean_average_precision(scores, targets) == pytest.approx(((1 + 2 / 3) / 2 + .5) / 2)
    with_empty = torch.cat([targets, torch.zeros(4, 1)], 1)
    assert math.isnan(float(M.average_precision(torch.rand(4, 3), with_empty)[2]))
    from sklearn.metrics import average_precision_score

    g = torch.Generator().manual_seed(1)
    s = torch.rand(50, 6, generator=g)
    t = (torch.rand(50, 6, generator=g) < 0.3).float()
    ours = M.average_precision(s, t)
    for c in range(6):
        assert float(ours[c]) == pytest.approx(average_precision_score(t[:, c], s[:, c]))
    with pytest.raises(ValueError, match="no column"):
        M.mean_average_precision(s, torch.zeros(50, 6))


def test_random_average_precision_matches_simulation():
    g = torch.Generator().manual_seed(2)
    n, trials = 12, 3000
    for p in (1, 3, 7, 12):
        t = torch.zeros(n, trials)
        t[:p] = 1
        s = torch.rand(n, trials, generator=g)
        sim = float(M.average_precision(s, t).mean())
        assert sim == pytest.approx(M.random_average_precision(p, n), abs=0.012), p
    targets = torch.tensor([[1, 0], [0, 0], [1, 1], [0, 0]])
    assert M.map_chance(targets) == pytest.approx(
        (M.random_average_precision(2, 4) + M.random_average_precision(1, 4)) / 2)


def test_linear_probe_separable_and_random():
    g = torch.Generator().manual_seed(3)
    centers = torch.randn(3, 5, generator=g) * 4
    ytr, yte = torch.arange(60) % 3, torch.arange(30) % 3
    xtr = centers[ytr] + torch.randn(60, 5, generator=g) * 0.3
    xte = centers[yte] + torch.randn(30, 5, generator=g) * 0.3
    assert M.linear_probe(xtr, ytr, xte, yte) == 1.0
    noise_acc = M.linear_probe(torch.randn(60, 5, generator=g), ytr,
                               torch.randn(300, 5, generator=g), torch.arange(300) % 3)
    assert noise_acc < 0.5
    with pytest.raises(ValueError, match="two classes"):
        M.linear_probe(xtr, torch.zeros(60), xte, yte)


def test_points_lost():
    ref = {"a": 0.50, "b": 0.80, "c": float("nan")}
    assert M.points_lost(ref, {"a": 0.49, "b": 0.75, "c": 0.1}, ["a", "b", "c"]) == \
        pytest.approx(5.0)
    assert M.points_lost(ref, {"a": 0.6}, ["a", "b"]) == 0.0


def test_noise_blur_fgsm():
    x = torch.full((2, 3, 9, 9), 0.5)
    n = R.gaussian_noise(x, 0.1, seed=0)
    assert torch.equal(n, R.gaussian_noise(x, 0.1, seed=0))
    assert float((n - x).std()) == pytest.approx(0.1, rel=0.15)
    assert torch.allclose(R.gaussian_blur(x, 1.5), x)  # a constant image stays constant
    img = torch.zeros(1, 3, 4, 9, 9)  # a clip: every frame blurred the same way
    img[..., 4, 4] = 1.0
    b = R.gaussian_blur(img, 1.0)
    assert b.shape == img.shape
    assert torch.allclose(b.sum((-1, -2)), torch.ones(1, 3, 4), atol=1e-5)  # mass kept
    assert float(b[..., 4, 4].max()) < 0.2 and torch.allclose(b[..., 4, 3], b[..., 3, 4])
    from torchvision.transforms.v2.functional import gaussian_blur as tv_blur

    z = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(R.gaussian_blur(z, 1.0), tv_blur(z, [7, 7], [1.0, 1.0]))
    # FGSM on a linear score w·x: the step is eps·sign(w), clipped to [0, 1]
    w = torch.tensor([1.0, -2.0, 0.5, -0.1])
    xa = torch.tensor([[0.5, 0.5, 0.999, 0.0]])
    adv = R.fgsm(lambda z: (z * w).sum(), xa, 0.01)
    torch.testing.assert_close(adv, torch.tensor([[0.51, 0.49, 1.0, 0.0]]))
    with pytest.raises(ValueError, match="scalar"):
        R.fgsm(lambda z: z * 2, xa, 0.1)
