"""Metrics on embeddings and scores, each with its chance level.

All functions take plain tensors (embeddings L2-normalised or not: cosine similarity is used
where it matters) and return Python floats in [0, 1], so they are tested on hand-made inputs
whose answer is known.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F


def _check_2d(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected a 2-D tensor (N, D), got {got}")
    return x


def _labels(labels, n: int, name: str = "labels") -> torch.Tensor:
    labels = torch.as_tensor(labels, dtype=torch.int64).flatten()
    if labels.numel() != n:
        raise ValueError(f"{name}: expected {n} labels (one per row), got {labels.numel()}")
    return labels


# ----------------------------------------------------------------------------------------------
# zero-shot classification
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def class_embeddings(encode_text: Callable[[list[str]], torch.Tensor], classes: Sequence[str],
                     prompts: Sequence[str]) -> torch.Tensor:
    """Prompt-ensemble classifier (C, D): for each class the mean of its L2-normalised prompt
    embeddings, renormalised (CLIP's ensembling).

    Equivalent::

        torch.stack([F.normalize(F.normalize(encode_text([p.format(c) for p in prompts]),
                                             dim=-1).mean(0), dim=0) for c in classes])
    """
    if not classes or not prompts:
        raise ValueError(f"classes, prompts: expected non-empty lists, got {len(classes)} "
                         f"classes and {len(prompts)} prompts")
    texts = [p.format(c) for c in classes for p in prompts]
    emb = F.normalize(encode_text(texts).float(), dim=-1)
    emb = emb.view(len(classes), len(prompts), -1).mean(1)
    return F.normalize(emb, dim=-1)


def topk_accuracy(scores: torch.Tensor, labels, k: int = 1) -> float:
    """Fraction of rows whose label is among the k highest scores (rows: samples, columns:
    classes). Labels < 0 are an error (filter unlabelled samples first)."""
    scores = _check_2d(scores, "scores")
    labels = _labels(labels, scores.shape[0])
    if scores.shape[0] == 0:
        raise ValueError("scores: expected at least one sample, got none")
    if labels.min() < 0 or labels.max() >= scores.shape[1]:
        raise ValueError(f"labels: expected class indices in [0, {scores.shape[1] - 1}], got "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    return float((top == labels[:, None]).any(1).double().mean())


def zero_shot_accuracy(image_emb: torch.Tensor, class_emb: torch.Tensor, labels,
                       k: int = 1) -> float:
    """Top-k accuracy of classifying images by the cosine similarity to class embeddings."""
    scores = F.normalize(_check_2d(image_emb, "image_emb").float(), dim=-1) @ \
        F.normalize(_check_2d(class_emb, "class_emb").float(), dim=-1).T
    return topk_accuracy(scores, labels, k)


def pair_accuracy(image_emb: torch.Tensor, true_emb: torch.Tensor,
                  false_emb: torch.Tensor) -> float:
    """Two-way forced choice: the fraction of rows whose image is more similar (cosine) to
    its true text than to its false one (chance 0.5; ties count as wrong).

    Equivalent: ``mean(cos(img[i], true[i]) > cos(img[i], false[i]))``.
    """
    img = F.normalize(_check_2d(image_emb, "image_emb").float(), dim=-1)
    t = F.normalize(_check_2d(true_emb, "true_emb").float(), dim=-1)
    f = F.normalize(_check_2d(false_emb, "false_emb").float(), dim=-1)
    if not img.shape == t.shape == f.shape:
        raise ValueError(f"true_emb, false_emb: expected the shape of image_emb "
                         f"{tuple(img.shape)}, got {tuple(t.shape)} and {tuple(f.shape)}")
    return float(((img * t).sum(1) > (img * f).sum(1)).double().mean())


def topk_chance(num_classes: int, k: int = 1) -> float:
    """Top-k accuracy of a uniform random guess among ``num_classes``."""
    return min(k, num_classes) / num_classes


# ----------------------------------------------------------------------------------------------
# retrieval
# ----------------------------------------------------------------------------------------------
def recall_at_k(ranked: torch.Tensor, positive: torch.Tensor, ks: Sequence[int]) -> dict:
    """ranked (Q, K) gallery ids best first; positive (Q, G) bool: which gallery items are
    correct for each query. R@k = fraction of queries with a correct item in the first k."""
    hits = positive.gather(1, ranked)  # (Q, K) bool
    return {k: float(hits[:, :k].any(1).double().mean()) for k in ks}


def _positive(query_groups, gallery_groups) -> torch.Tensor:
    q = torch.as_tensor(query_groups, dtype=torch.int64).flatten()
    g = torch.as_tensor(gallery_groups, dtype=torch.int64).flatten()
    pos = q[:, None] == g[None, :]
    if not pos.any(1).all():
        bad = int((~pos.any(1)).nonzero()[0])
        raise ValueError(f"groups: query {bad} (group {int(q[bad])}) has no correct item in the "
                         f"gallery")
    return pos


def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, image_groups,
                     text_groups, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Image↔text retrieval recall by cosine similarity.

    image_groups (N_img,), text_groups (N_txt,): ints; an image and a text match when their
    groups are equal (e.g. the id of the caption string: two images with the same caption are
    both correct for it). Returns {"i2t_r1": ..., "t2i_r1": ..., for each k}.

    Equivalent::

        s = F.normalize(img) @ F.normalize(txt).T
        i2t_rk = mean over images of any(groups_txt[s[i].topk(k)] == groups_img[i])
    """
    img = F.normalize(_check_2d(image_emb, "image_emb").float(), dim=-1)
    txt = F.normalize(_check_2d(text_emb, "text_emb").float(), dim=-1)
    if img.shape[1] != txt.shape[1]:
        raise ValueError(f"text_emb: expected width {img.shape[1]} like image_emb, got "
                         f"{txt.shape[1]}")
    pos = _positive(image_groups, text_groups)  # (N_img, N_txt)
    s = img @ txt.T
    kmax_t, kmax_i = min(max(ks), txt.shape[0]), min(max(ks), img.shape[0])
    i2t = recall_at_k(s.topk(kmax_t, dim=1).indices, pos, [min(k, kmax_t) for k in ks])
    t2i = recall_at_k(s.T.topk(kmax_i, dim=1).indices, _positive(text_groups, image_groups),
                      [min(k, kmax_i) for k in ks])
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = i2t[min(k, kmax_t)]
        out[f"t2i_r{k}"] = t2i[min(k, kmax_i)]
    return out


def random_recall(num_positive, gallery_size: int, k: int) -> float:
    """Expected R@k of a random ranking: mean over queries of 1 - C(G - p, k) / C(G, k), the
    chance that at least one of a query's p correct items lands in the first k of G."""
    p = torch.as_tensor(num_positive, dtype=torch.float64).flatten()
    k = min(k, gallery_size)
    miss = torch.ones_like(p)
    for j in range(k):  # C(G-p, k)/C(G, k) = prod_j (G-p-j)/(G-j)
        miss = miss * ((gallery_size - p - j) / (gallery_size - j)).clamp(min=0)
    return float((1 - miss).mean())


def retrieval_chance(image_groups, text_groups, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """{"i2t_r{k}", "t2i_r{k}"}: recall of a random ranking for the same groups."""
    pos = _positive(image_groups, text_groups)
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = random_recall(pos.sum(1), pos.shape[1], k)
        out[f"t2i_r{k}"] = random_recall(pos.sum(0), pos.shape[0], k)
    return out


def recall_from_ids(ids: torch.Tensor, query_groups, gallery_groups,
                    ks: Sequence[int] = (1, 5, 10)) -> dict:
    """R@k from a search's result ids (Q, K) (e.g. xray_ops.EmbeddingIndex.search) and the
    groups of queries and gallery items. Returns {k: recall}."""
    pos = _positive(query_groups, gallery_groups)
    kk = ids.shape[1]
    r = recall_at_k(ids.to(torch.int64), pos, [min(k, kk) for k in ks])
    return {k: r[min(k, kk)] for k in ks}


# ----------------------------------------------------------------------------------------------
# hashtags
# ----------------------------------------------------------------------------------------------
def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """AP of each column (C,) float64: rank the N rows by score (descending, ties in row
    order), AP = mean over the positives of the precision at their rank. NaN for a column
    without positives.

    Equivalent (one column): sklearn.metrics.average_precision_score(targets, scores) when
    scores have no ties.
    """
    scores, targets = _check_2d(scores, "scores"), _check_2d(targets, "targets")
    if scores.shape != targets.shape:
        raise ValueError(f"targets: expected shape {tuple(scores.shape)} like scores, got "
                         f"{tuple(targets.shape)}")
    order = torch.sort(scores.double(), dim=0, descending=True, stable=True).indices
    t = (targets > 0.5).double().gather(0, order)  # (N, C) positives in rank order
    ranks = torch.arange(1, t.shape[0] + 1, dtype=torch.float64)[:, None]
    precision = t.cumsum(0) / ranks
    npos = t.sum(0)
    ap = (precision * t).sum(0) / npos
    ap[npos == 0] = float("nan")
    return ap


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """mAP over the columns (tags) that have at least one positive."""
    ap = average_precision(scores, targets)
    valid = ~torch.isnan(ap)
    if not valid.any():
        raise ValueError("targets: no column has a positive; mAP is undefined")
    return float(ap[valid].mean())


def random_average_precision(num_positive: int, n: int) -> float:
    """Expected AP of a random ranking of n items with p positives:
    (p - 1)/(n - 1) + (n - p)/(n (n - 1)) · H_n (H_n the n-th harmonic number); 1/n·H_n for
    p = 1, ~p/n for many positives."""
    p, n = int(num_positive), int(n)
    if not 1 <= p <= n:
        raise ValueError(f"num_positive: expected 1 <= p <= n={n}, got {p}")
    if n == 1:
        return 1.0
    harmonic = sum(1.0 / k for k in range(1, n + 1))
    return (p - 1) / (n - 1) + (n - p) / (n * (n - 1)) * harmonic


def map_chance(targets: torch.Tensor) -> float:
    """Expected mAP of random scores, over the columns with at least one positive."""
    targets = _check_2d(targets, "targets")
    npos = (targets > 0.5).sum(0)
    vals = [random_average_precision(int(p), targets.shape[0]) for p in npos if p > 0]
    if not vals:
        raise ValueError("targets: no column has a positive; mAP is undefined")
    return sum(vals) / len(vals)


# ----------------------------------------------------------------------------------------------
# linear probe
# ----------------------------------------------------------------------------------------------
def linear_probe(train_x: torch.Tensor, train_y, test_x: torch.Tensor, test_y,
                 *, c: float = 1.0, max_iter: int = 100) -> float:
    """Top-1 accuracy on (test_x, test_y) of a multinomial logistic regression fitted on
    (train_x, train_y): standardised features, L2 penalty 1/c (scikit-learn's lbfgs, at most
    ``max_iter`` iterations: separable features would otherwise run to the limit for nothing)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train_x, test_x = _check_2d(train_x, "train_x"), _check_2d(test_x, "test_x")
    ytr = _labels(train_y, train_x.shape[0], "train_y").numpy()
    yte = _labels(test_y, test_x.shape[0], "test_y").numpy()
    if len(set(ytr.tolist())) < 2:
        raise ValueError("train_y: a probe needs at least two classes in the training set")
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(train_x.double().numpy(), ytr)
    return float((clf.predict(test_x.double().numpy()) == yte).mean())


def points_lost(reference: dict, other: dict, keys: Sequence[str]) -> float:
    """The largest drop, in percentage points, from ``reference`` to ``other`` over ``keys``
    present in both (0 when none dropped)."""
    drops = [100.0 * (reference[k] - other[k]) for k in keys
             if k in reference and k in other and not math.isnan(reference[k])
             and not math.isnan(other[k])]
    return max([0.0] + drops)
