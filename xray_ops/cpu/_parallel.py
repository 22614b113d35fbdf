"""Run a nogil numba kernel over contiguous chunks of rows on a small pool of Python threads.

As :mod:`xray_ops.cpu.int8` explains: not numba's ``parallel=True`` (its OpenMP layer spins beside
torch's own pool on a shared CPU, and its workqueue layer aborts when two Python threads enter
it at once); a ThreadPoolExecutor of as many threads as ``torch.get_num_threads()`` has neither
problem. The kernel is called as ``kernel(*args, lo, hi, chunk)`` for the chunk-th share
[lo, hi) of [0, n), the calling thread taking chunk 0, so a kernel that accumulates column sums
can write them to row ``chunk`` of a (chunks(n, work), C) buffer without locks.
"""

from __future__ import annotations

import concurrent.futures
import threading

import torch

# less work than this (elements) per thread runs on the calling thread alone
MIN_WORK_PER_THREAD = 1 << 15

_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_size = 0
_lock = threading.Lock()


def _executor(n: int) -> concurrent.futures.ThreadPoolExecutor:
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size < n:
            # a larger pool replaces the old one, which is not shut down: a caller on another
            # thread may still be submitting to it (its idle threads cost nothing)
            _pool = concurrent.futures.ThreadPoolExecutor(n, thread_name_prefix="xray_ops_cpu")
            _pool_size = n
        return _pool


def chunks(n: int, work_per_item: int) -> int:
    """How many chunks :func:`run` splits n items of work_per_item elements each into (>= 1)."""
    return max(1, min(torch.get_num_threads(), n, (n * work_per_item) // MIN_WORK_PER_THREAD))


def run(kernel, n: int, work_per_item: int, *args) -> int:
    """kernel(*args, lo, hi, chunk) over [0, n) in :func:`chunks` shares; returns their count."""
    k = chunks(n, work_per_item)
    if k == 1:
        kernel(*args, 0, n, 0)
        return 1
    bounds = [n * t // k for t in range(k + 1)]
    pool = _executor(k - 1)
    futures = [pool.submit(kernel, *args, bounds[t], bounds[t + 1], t) for t in range(1, k)]
    kernel(*args, bounds[0], bounds[1], 0)  # the calling thread takes the first share
    for f in futures:
        f.result()
    return k
