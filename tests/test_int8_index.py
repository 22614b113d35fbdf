"""EmbeddingIndex: recall@10 against exact float32 search, memory, API and bad inputs."""

import pytest
import torch

import xray_ops as xo
from xray_ops.retrieval import exact_search, recall_at_k

from .matrix import device_backends

D = 256


def clustered(n, *, seed, rank=32, n_clusters=64, noise=0.05, space_seed=0):
    """Embeddings like a trained encoder's: 64 clusters in a rank-32 subspace of R^256, with a
    spread inside each cluster and a little isotropic noise in every dimension."""
    g = torch.Generator().manual_seed(space_seed)
    basis = torch.linalg.qr(torch.randn(D, rank, generator=g))[0]
    centers = torch.randn(n_clusters, rank, generator=g)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_clusters, (n,), generator=g)
    z = centers[labels] + 0.5 * torch.randn(n, rank, generator=g)
    return z @ basis.T + noise * torch.randn(n, D, generator=g)


@pytest.fixture(scope="module")
def data():
    gallery, queries = clustered(5000, seed=1), clustered(200, seed=2)
    _, exact = exact_search(gallery, queries, 10)
    return gallery, queries, exact


def _pca_float_recall(index, gallery, queries, exact):
    """The ceiling PCA alone allows: the same projected scores, in float32."""
    g = torch.nn.functional.normalize(gallery, dim=-1)
    q = torch.nn.functional.normalize(queries, dim=-1)
    P, mu = index.basis, index.mean
    scores = ((q - mu) @ P.T) @ ((g - mu) @ P.T).T + (g @ mu)[None]
    return recall_at_k(scores.topk(10, dim=1).indices, exact)


def test_recall_int8(data):
    gallery, queries, exact = data
    index = xo.EmbeddingIndex().add(gallery)
    scores, ids = index.search(queries, 10)
    recall = recall_at_k(ids, exact)
    ratio = index.float32_bytes() / index.memory_bytes()
    print(f"\nint8 recall@10 {recall:.4f}, memory {ratio:.2f}x less than float32")
    assert recall >= 0.98  # measured 0.9915
    assert index.memory_bytes() == 5000 * (D + 4)  # codes + a float32 scale per vector
    assert (scores[:, :-1] >= scores[:, 1:]).all(), "best first"
    # scores approximate the cosine similarity of the exact search
    exact_scores, _ = exact_search(gallery, queries, 10)
    assert (scores - exact_scores).abs().max() < 0.02


def test_recall_int8_pca_quarter_width(data):
    gallery, queries, exact = data
    index = xo.EmbeddingIndex(dim=D // 4).add(gallery)
    _, ids = index.search(queries, 10)
    recall = recall_at_k(ids, exact)
    ceiling = _pca_float_recall(index, gallery, queries, exact)
    ratio = index.float32_bytes() / index.memory_bytes()
    print(f"\nint8 + PCA {D}->{D // 4} recall@10 {recall:.4f} (PCA alone in float32: "
          f"{ceiling:.4f}), memory {ratio:.1f}x less than float32")
    assert recall >= 0.96  # measured 0.9765
    assert recall >= ceiling - 0.01, "int8 costs more than 1 point on top of PCA"
    assert ratio > 11.5  # 4·256 / (64 + 8) = 14.2, less the basis and mean (0.26 MB)


def test_recall_int8_pca_quarter_width_reranked_keeps_the_memory(data, tmp_path):
    # PCA caps what the 72-byte codes can rank (0.9815 in float); re-ranking the int8 search's
    # candidates against the originals (kept outside the index) does not cost index memory
    np = pytest.importorskip("numpy")
    gallery, queries, exact = data
    index = xo.EmbeddingIndex(dim=D // 4).add(gallery)
    before = index.memory_bytes()
    scores, ids = index.search(queries, 10, rerank=gallery)
    recall = recall_at_k(ids, exact)
    bpv = index.bytes_per_vector()
    print(f"\nint8 + PCA {D}->{D // 4} + re-rank of 40 candidates: recall@10 {recall:.4f}, "
          f"{bpv:.1f} bytes per vector in the index (float32: {4 * D})")
    assert recall >= 0.98  # measured 1.000
    assert index.memory_bytes() == before and bpv < 4 * D / 11.5
    exact_scores, _ = exact_search(gallery, queries, 10)
    torch.testing.assert_close(scores, exact_scores, rtol=0, atol=1e-5)  # the exact scores
    # originals on disk: a numpy memmap gives the same answer
    path = str(tmp_path / "gallery.npy")
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=tuple(gallery.shape))
    mm[:] = gallery.numpy()
    mm.flush()
    _, ids_mm = index.search(queries, 10, rerank=np.load(path, mmap_mode="r"), candidates=20)
    assert recall_at_k(ids_mm, exact) >= 0.98


def test_rerank_bad_inputs():
    g = torch.randn(30, 16)
    index = xo.EmbeddingIndex(dim=8).add(g)
    q = torch.randn(2, 16)
    with pytest.raises(ValueError, match=r"rerank: expected shape \(30, 16\)"):
        index.search(q, 3, rerank=g[:29])
    with pytest.raises(TypeError, match="rerank: expected a floating dtype"):
        index.search(q, 3, rerank=g.long())
    with pytest.raises(TypeError, match="rerank: expected the original vectors"):
        index.search(q, 3, rerank=g.tolist())
    with pytest.raises(ValueError, match=r"candidates: expected an int in \[3, 30\]"):
        index.search(q, 3, rerank=g, candidates=2)
    with pytest.raises(ValueError, match="candidates: only used with rerank"):
        index.search(q, 3, candidates=10)


def test_add_in_batches_equals_one_batch(data):
    gallery, queries, _ = data
    one = xo.EmbeddingIndex(dim=64).add(gallery)
    two = xo.EmbeddingIndex(dim=64).fit(gallery)
    two.add(gallery[:1234]).add(gallery[1234:])
    assert len(two) == len(one) == 5000
    assert torch.equal(one.codes, two.codes) and torch.equal(one.scales, two.scales)
    s1, i1 = one.search(queries, 5)
    s2, i2 = two.search(queries, 5)
    assert torch.equal(i1, i2) and torch.equal(s1, s2)


@pytest.mark.parametrize("device,backend", device_backends(cpu=("torch", "cpu", "triton")))
def test_search_backends_agree(device, backend):
    gallery = clustered(300, seed=3).to(device)
    queries = clustered(20, seed=4).to(device)
    with xo.backend("torch"):
        s_ref, i_ref = xo.EmbeddingIndex(dim=32).add(gallery).search(queries, 10)
    with xo.backend(backend):
        s, i = xo.EmbeddingIndex(dim=32).add(gallery).search(queries, 10)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)
    assert recall_at_k(i.cpu(), i_ref.cpu()) > 0.99  # ties may swap


def test_inner_product_metric_and_query_chunks(monkeypatch):
    from xray_ops import retrieval

    gallery, queries = clustered(400, seed=5) * 3, clustered(50, seed=6)
    monkeypatch.setattr(retrieval, "_CHUNK_PAIRS", 400 * 7)  # 7 queries per chunk
    index = xo.EmbeddingIndex(normalize=False).add(gallery)
    scores, ids = index.search(queries, 10)
    exact_scores, exact = exact_search(gallery, queries, 10, normalize=False)
    assert recall_at_k(ids, exact) > 0.97
    torch.testing.assert_close(scores, exact_scores, rtol=0.02, atol=0.05)


def test_bad_inputs():
    with pytest.raises(ValueError, match="bits: only 8-bit codes"):
        xo.EmbeddingIndex(bits=4)
    with pytest.raises(ValueError, match=r"dim: expected an int in \[1, inf\]"):
        xo.EmbeddingIndex(dim=0)
    index = xo.EmbeddingIndex(dim=8)
    with pytest.raises(RuntimeError, match="the index is empty"):
        index.search(torch.randn(2, 16))
    with pytest.raises(ValueError, match="PCA to dim=8 needs at least 8 features"):
        index.add(torch.randn(10, 4))
    with pytest.raises(ValueError, match="fitting PCA needs at least 2 vectors"):
        index.add(torch.randn(1, 16))
    index.add(torch.randn(20, 16))
    with pytest.raises(ValueError, match=r"queries: expected shape \(\*, 16\)"):
        index.search(torch.randn(2, 12))
    with pytest.raises(ValueError, match=r"k: expected an int in \[1, 20\]"):
        index.search(torch.randn(2, 16), k=21)
    with pytest.raises(TypeError, match="x: expected a floating dtype"):
        index.add(torch.ones(2, 16, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="already holds vectors"):
        index.fit(torch.randn(5, 16))
