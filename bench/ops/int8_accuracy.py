"""Accuracy of int8 inference (no timings): ``python -m bench int8_accuracy``.

1. A small ViT trained here on the CPU (bench/int8_task.py: Fashion-MNIST from Debian's
   dataset-fashion-mnist when installed, else scikit-learn's digits), float vs quantize_'d:
   top-1 and the exact number of points lost (on the GPU too, when there is one).
2. EmbeddingIndex recall@10 against exact float32 search, at int8, int8 + PCA to a quarter
   of the width, and the latter re-ranked against the originals, with the bytes per vector the
   index holds, on clustered synthetic embeddings (tests/test_int8_index.py's generator) and
   on the trained ViT's own embeddings (gallery: train set, queries: test set).

Prints the report and appends it to bench/results/int8_accuracy.csv (its own columns: these
are not timings, so they stay out of the harness CSV). Returns no timing cases.
"""

from __future__ import annotations

import csv
import datetime
import os

import torch

import xray_ops as xo
from xray_ops.retrieval import exact_search, recall_at_k

from .. import harness, int8_task

COLUMNS = ["metric", "value", "detail", "device", "torch", "commit", "date"]


def _clustered(n, seed, D=256, rank=32, n_clusters=64, noise=0.05):
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(D, rank, generator=g))[0]
    centers = torch.randn(n_clusters, rank, generator=g)
    g = torch.Generator().manual_seed(seed)
    z = centers[torch.randint(0, n_clusters, (n,), generator=g)] + 0.5 * torch.randn(
        n, rank, generator=g)
    return z @ basis.T + noise * torch.randn(n, D, generator=g)


def _recalls(gallery, queries, device):
    """[(label, recall@10, bytes per vector held by the index, x less memory than float32)]:
    int8, int8 + PCA to a quarter width, and the latter re-ranking 40 candidates exactly
    against the originals (which the index does not hold)."""
    gallery, queries = gallery.to(device), queries.to(device)
    _, exact = exact_search(gallery, queries, 10)
    D = gallery.shape[1]
    out = []
    for dim, rerank in ((None, False), (D // 4, False), (D // 4, True)):
        index = xo.EmbeddingIndex(dim=dim).add(gallery)
        _, ids = index.search(queries, 10, rerank=gallery if rerank else None)
        out.append((f"dim{dim or D}" + ("_rerank40" if rerank else ""),
                    recall_at_k(ids.cpu(), exact.cpu()), index.bytes_per_vector(),
                    index.float32_bytes() / index.memory_bytes()))
    return out


def report(device: str, quick: bool = False) -> list[tuple[str, float, str]]:
    threads = torch.get_num_threads()
    try:
        rep, model, q_model, data = int8_task.run(seed=0, threads=1, quick=quick)
    finally:
        torch.set_num_threads(threads)
    rows = [("float_top1", rep.float_top1, rep.data),
            ("int8_top1", rep.int8_top1, "quantize_, head in float, cpu"),
            ("top1_points_lost", rep.lost_points, f"{rep.n_test} test images"),
            ("int8_all_top1", rep.int8_all_top1, "quantize_, head int8 too, cpu")]
    if device == "cuda":
        q_gpu = q_model.to("cuda")
        acc = int8_task.top1(q_gpu, data.x_test.cuda(), data.y_test.cuda())
        rows.append(("int8_top1_gpu", acc, "the same quantized model on the GPU (float32)"))
    for what, gallery, queries in (
            ("clustered", _clustered(5000, 1), _clustered(200, 2)),
            ("small_vit_embeddings", int8_task.features(model, data.x_train),
             int8_task.features(model, data.x_test))):
        for label, recall, bpv, ratio in _recalls(gallery, queries, device):
            rows.append((f"recall@10_{what}_{label}", recall,
                         f"{gallery.shape[0]} x {gallery.shape[1]} gallery, "
                         f"{queries.shape[0]} queries, {bpv:.1f} bytes per vector in the index "
                         f"({ratio:.1f}x less memory than float32)"))
    return rows


# Not a timing benchmark: `python -m bench int8_accuracy` calls run_report instead of cases().
REPORT_ONLY = True


def run_report(device: str, quick: bool = False, write_csv: bool = True,
               csv_path: str | None = None) -> str:
    """Measure, print, and append to bench/results/int8_accuracy.csv; returns the text."""
    rows = report(device, quick)
    lines = ["int8 accuracy"] + [f"  {metric:<36} {value:10.4f}   {detail}"
                                 for metric, value, detail in rows]
    if write_csv:
        path = csv_path or os.path.join(harness.RESULTS_DIR, "int8_accuracy.csv")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        new = not os.path.exists(path)
        meta = {"device": harness.device_name(device), "torch": torch.__version__,
                "commit": harness.commit(),
                "date": datetime.datetime.now(datetime.timezone.utc).strftime(
                    "%Y-%m-%dT%H:%M:%SZ")}
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            if new:
                w.writeheader()
            for metric, value, detail in rows:
                w.writerow({"metric": metric, "value": f"{value:.6f}", "detail": detail, **meta})
        lines.append(f"  appended to {path}")
    text = "\n".join(lines)
    print(text)
    return text
