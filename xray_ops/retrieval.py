"""Int8 embeddings for retrieval: :class:`EmbeddingIndex`, plus exact float32 search and recall.

An index stores each gallery vector as ``dim`` int8 codes + a float32 scale (+ a float32 bias
term with PCA): 4·D / (dim + 8) times less memory than float32 (e.g. 512-wide embeddings at
PCA 128: 15x). Search quantizes the queries the same way and scores every gallery vector with
one ``int8_matmul`` (exact int32 dot products, the scales and the bias term fused into the
epilogue), then takes the top k.

With PCA (mean μ, orthonormal basis P (dim, D), fitted on the gallery) the score of query q and
gallery vector g is ⟨P(q - μ), P(g - μ)⟩ + ⟨μ, g⟩ + ⟨q, μ⟩ - ⟨μ, μ⟩, which equals ⟨q, g⟩ up to
the components outside the kept subspace: ⟨μ, g⟩ is int8_matmul's per-column bias, so the
ranking does not lose the part of ⟨q, g⟩ that lies along the mean.

With PCA, before quantizing, the coordinates go through a fixed random orthogonal rotation R
(seeded, folded into the basis): inner products are unchanged, but the energy that PCA piles
into the first few coordinates is spread evenly, so a per-vector int8 scale (set by the largest
coordinate) wastes fewer levels. Measured on the clustered data of tests/test_int8_index.py:
recall@10 at PCA to a quarter of the width 0.968 -> 0.976 (PCA alone, in float: 0.9815).

That is about where anything held in the index's 72 bytes per vector stops (a float query
against the int8 codes: 0.978): PCA itself drops the part of ⟨q, g⟩ outside the kept subspace.
Re-ranking does not: ``search(queries, k, rerank=originals)`` takes the int8 search's best
``candidates`` (default 4k) and orders them by the exact float32 score against the original
vectors, which stay wherever the caller keeps them (a tensor, or a numpy memmap on disk: only
the m · candidates rows asked for are read). The index itself still holds 72 bytes per vector
(:meth:`EmbeddingIndex.bytes_per_vector`); recall@10 on the same data: 1.000 with 20
candidates.
"""

from __future__ import annotations

import torch

import numpy as np

from . import _validate
from .ops.int8 import int8_matmul, quantize_per_token

# scores computed per chunk of queries: at most this many (query, gallery) pairs at once
_CHUNK_PAIRS = 1 << 25


def _prep(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    x = x.detach().to(torch.float32)
    return torch.nn.functional.normalize(x, dim=-1) if normalize else x


class EmbeddingIndex:
    """Int8 (optionally PCA-reduced) embedding index searched with ``int8_matmul``.

    Args:
        dim: None (keep the width D) or the PCA width, 1 <= dim <= D, fitted on the gallery
            (by :meth:`fit`, or on the first batch given to :meth:`add`).
        bits: 8 (the only width implemented).
        normalize: L2-normalize gallery and queries first (cosine similarity); False scores by
            inner product.

    ``add(x (n, D))`` appends vectors (ids continue from len(index)); ``search(q (m, D), k)``
    returns (scores (m, k) float32, ids (m, k) int64), best first;
    ``search(q, k, rerank=originals)`` re-ranks the int8 search's best candidates exactly
    against the original vectors (kept outside the index). Inference only.

    Equivalent PyTorch (exact float32 search, what recall is measured against)::

        g, q = F.normalize(gallery, dim=-1), F.normalize(queries, dim=-1)
        scores, ids = (q @ g.T).topk(k, dim=1)
    """

    def __init__(self, dim: int | None = None, bits: int = 8, normalize: bool = True):
        if dim is not None:
            dim = _validate.integer(dim, "dim", lo=1)
        bits = _validate.integer(bits, "bits")
        if bits != 8:
            raise ValueError(f"bits: only 8-bit codes are implemented, got {bits}")
        self.dim = dim
        self.bits = bits
        self.normalize = _validate.boolean(normalize, "normalize")
        self.width: int | None = None  # D, the input width
        self.mean: torch.Tensor | None = None  # (D,) float32, with PCA
        # (dim, D) float32, orthonormal rows: R · (PCA basis), with PCA
        self.basis: torch.Tensor | None = None
        self._mean_sq = 0.0
        self.codes: torch.Tensor | None = None  # (n, dim or D) int8
        self.scales: torch.Tensor | None = None  # (n,) float32
        self.bias: torch.Tensor | None = None  # (n,) float32 = ⟨μ, g⟩, with PCA

    # ------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return 0 if self.codes is None else self.codes.shape[0]

    def _check(self, x: torch.Tensor, name: str) -> torch.Tensor:
        _validate.tensor(x, name, ndim=2, floating=True)
        if x.shape[1] < 1:
            raise ValueError(f"{name}: expected at least 1 feature, got shape {tuple(x.shape)}")
        if self.width is not None and x.shape[1] != self.width:
            raise ValueError(f"{name}: expected shape (*, {self.width}) like the gallery, "
                             f"got {tuple(x.shape)}")
        if self.dim is not None and x.shape[1] < self.dim:
            raise ValueError(f"{name}: PCA to dim={self.dim} needs at least {self.dim} features, "
                             f"got shape {tuple(x.shape)}")
        if self.codes is not None and x.device != self.codes.device:
            raise ValueError(f"{name}: expected a tensor on {self.codes.device} (the index's "
                             f"device), got one on {x.device}")
        return x

    @torch.no_grad()
    def fit(self, gallery: torch.Tensor) -> "EmbeddingIndex":
        """Fit the PCA (mean and top-``dim`` principal directions) on ``gallery`` (n, D), and the
        rotation. Called by the first :meth:`add` when not called before."""
        self._check(gallery, "gallery")
        if self.codes is not None:
            raise RuntimeError("fit: the index already holds vectors encoded with the current "
                               "basis; make a new EmbeddingIndex to refit")
        self.width = gallery.shape[1]
        if self.dim is None:
            return self
        if gallery.shape[0] < 2:
            raise ValueError(f"gallery: fitting PCA needs at least 2 vectors, "
                             f"got shape {tuple(gallery.shape)}")
        x = _prep(gallery, self.normalize).to(torch.float64)
        mean = x.mean(0)
        xc = x - mean
        cov = xc.T @ xc / (x.shape[0] - 1)
        _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
        pca = vecs[:, -self.dim:].flip(1).T  # (dim, D), largest variance first
        gen = torch.Generator().manual_seed(0)
        rot = torch.linalg.qr(torch.randn(self.dim, self.dim, generator=gen,
                                          dtype=torch.float64))[0]
        self.basis = (rot.to(pca.device) @ pca).contiguous().to(torch.float32)
        self.mean = mean.to(torch.float32)
        self._mean_sq = float(mean @ mean)
        return self

    def _encode(self, x: torch.Tensor):
        """(n, D) float -> (codes (n, dim) int8, scales (n, 1) float32, ⟨μ, x⟩ (n,) | None)."""
        x = _prep(x, self.normalize)
        bias = None
        if self.basis is not None:
            bias = x @ self.mean
            x = (x - self.mean) @ self.basis.T
        q, s = quantize_per_token(x)
        return q, s, bias

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> "EmbeddingIndex":
        """Append gallery vectors x (n, D); the first call fits the PCA if :meth:`fit` was not."""
        self._check(x, "x")
        if self.width is None:
            self.fit(x)
        q, s, bias = self._encode(x)
        s = s.reshape(-1)
        if self.codes is None:
            self.codes, self.scales, self.bias = q, s, bias
        else:
            self.codes = torch.cat([self.codes, q])
            self.scales = torch.cat([self.scales, s])
            if bias is not None:
                self.bias = torch.cat([self.bias, bias])
        return self

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int = 10, *, rerank=None,
               candidates: int | None = None):
        """queries (m, D) -> (scores (m, k) float32, ids (m, k) int64), highest score first.

        rerank: None, or the original gallery vectors (n, D) in the order they were added: a
            float torch.Tensor or numpy array (a np.memmap reads only the rows asked for). The
            int8 search then keeps its best ``candidates`` per query (default 4·k, at most n)
            and returns those ranked by the exact float32 score (cosine when normalize, else
            inner product) against the originals; the scores returned are those exact ones.

        Equivalent PyTorch of the re-rank::

            cand = int8_search(queries, candidates).ids                    # (m, C)
            exact = (F.normalize(originals[cand], dim=-1)
                     * F.normalize(queries, dim=-1)[:, None]).sum(-1)      # (m, C)
            scores, j = exact.topk(k, dim=1);  ids = cand.gather(1, j)
        """
        if self.codes is None:
            raise RuntimeError("search: the index is empty; add() gallery vectors first")
        self._check(queries, "queries")
        k = _validate.integer(k, "k", lo=1, hi=len(self))
        if rerank is None:
            if candidates is not None:
                raise ValueError("candidates: only used with rerank (the original vectors), "
                                 "got rerank=None")
            return self._search_int8(queries, k)
        self._check_originals(rerank)
        c = min(4 * k, len(self)) if candidates is None else \
            _validate.integer(candidates, "candidates", lo=k, hi=len(self))
        _, cand = self._search_int8(queries, c)
        return self._rerank(queries, cand, rerank, k)

    def _check_originals(self, originals) -> None:
        if not isinstance(originals, (torch.Tensor, np.ndarray)):
            raise TypeError(f"rerank: expected the original vectors as a torch.Tensor or numpy "
                            f"array, got {type(originals).__name__}")
        shape = tuple(originals.shape)
        if len(shape) != 2 or shape != (len(self), self.width):
            raise ValueError(f"rerank: expected shape ({len(self)}, {self.width}) (every vector "
                             f"added, in order), got {shape}")
        dtype = originals.dtype
        is_float = dtype.is_floating_point if isinstance(originals, torch.Tensor) \
            else np.issubdtype(dtype, np.floating)
        if not is_float:
            raise TypeError(f"rerank: expected a floating dtype, got {dtype}")

    def _rerank(self, queries, cand, originals, k):
        m, c = cand.shape
        if isinstance(originals, torch.Tensor):
            rows = originals.detach()[cand.reshape(-1).to(originals.device)]
        else:  # numpy / memmap: read just these rows
            rows = torch.from_numpy(np.ascontiguousarray(originals[cand.reshape(-1).cpu().numpy()]))
        rows = _prep(rows.to(queries.device), self.normalize).reshape(m, c, -1)
        exact = (rows * _prep(queries, self.normalize)[:, None, :]).sum(-1)  # (m, c) float32
        top = exact.topk(k, dim=1)
        return top.values, cand.gather(1, top.indices)

    def _search_int8(self, queries: torch.Tensor, k: int):
        m = queries.shape[0]
        n = len(self)
        scores = torch.empty(m, k, dtype=torch.float32, device=queries.device)
        ids = torch.empty(m, k, dtype=torch.int64, device=queries.device)
        chunk = max(1, _CHUNK_PAIRS // n)
        for i in range(0, m, chunk):
            q = queries[i:i + chunk]
            qq, qs, qbias = self._encode(q)
            s = int8_matmul(qq, self.codes, qs, self.scales, self.bias, out_dtype=torch.float32)
            if qbias is not None:  # constant per query: keeps scores ≈ ⟨q, g⟩, ranks unchanged
                s += (qbias - self._mean_sq)[:, None]
            top = s.topk(k, dim=1)
            scores[i:i + chunk], ids[i:i + chunk] = top.values, top.indices
        return scores, ids

    def memory_bytes(self) -> int:
        """Bytes held for the gallery: codes + scales (+ bias terms) + the mean and basis."""
        total = 0
        for t in (self.codes, self.scales, self.bias, self.mean, self.basis):
            if t is not None:
                total += t.numel() * t.element_size()
        return total

    def bytes_per_vector(self) -> float:
        """memory_bytes() per gallery vector (codes, scale, bias term; the shared mean and basis
        spread over the gallery). Re-ranking originals are not held: they do not count."""
        return self.memory_bytes() / max(1, len(self))

    def float32_bytes(self) -> int:
        """What the same gallery takes as float32 vectors (n · D · 4)."""
        return len(self) * (self.width or 0) * 4

    def __repr__(self) -> str:
        return (f"EmbeddingIndex(n={len(self)}, width={self.width}, dim={self.dim}, "
                f"bits={self.bits}, normalize={self.normalize})")


@torch.no_grad()
def exact_search(gallery: torch.Tensor, queries: torch.Tensor, k: int = 10,
                 normalize: bool = True):
    """Exact float32 search: (scores (m, k), ids (m, k)) of the top-k inner products."""
    g, q = _prep(gallery, normalize), _prep(queries, normalize)
    top = (q @ g.T).topk(k, dim=1)
    return top.values, top.indices


def recall_at_k(ids: torch.Tensor, exact_ids: torch.Tensor) -> float:
    """Mean over queries of |ids ∩ exact_ids| / k (both (m, k))."""
    if ids.shape != exact_ids.shape:
        raise ValueError(f"ids: expected shape {tuple(exact_ids.shape)} like exact_ids, "
                         f"got {tuple(ids.shape)}")
    k = ids.shape[1]
    hits = (ids[:, :, None] == exact_ids[:, None, :]).any(-1).sum(1)
    return float(hits.float().mean() / k)
