"""Imported only by tests/test_dispatch.py through xray_ops._dispatch.lazy (import on first call)."""


def pair(n):
    return [n, n + 1]
