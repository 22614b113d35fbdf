"""Lazy loading of the compiled extension ``xray_ops._C`` (csrc/).

A missing or mismatched extension never breaks ``import xray_ops``: it only disables the
``cuda`` backend, and the reason shows in ``xray_ops.info()``.
"""

from __future__ import annotations

import importlib
import threading

_lock = threading.Lock()
_module = None
_reason: str | None = None


def load():
    """The extension module, or None (then :func:`status` says why). Imported once."""
    global _module, _reason
    with _lock:
        if _module is None and _reason is None:
            try:
                _module = importlib.import_module("xray_ops._C")
            except ModuleNotFoundError as e:
                if e.name not in ("xray_ops._C", "xray_ops"):
                    _reason = f"xray_ops._C could not import {e.name!r}: {e}"
                else:
                    _reason = ("xray_ops._C is not built (needs nvcc and a CUDA build of torch; "
                               "see XRAY_OPS_FORCE_CUDA_BUILD)")
            except (ImportError, OSError) as e:  # e.g. built against another torch
                _reason = f"xray_ops._C failed to load (built for another torch?): {e}"
    return _module


def get():
    """The extension module; RuntimeError with the reason when it is unavailable."""
    mod = load()
    if mod is None:
        raise RuntimeError(f"cuda backend unavailable: {_reason}")
    return mod


def status() -> dict:
    mod = load()
    if mod is None:
        return {"built": False, "archs": "", "reason": _reason, "path": None}
    return {"built": True, "archs": mod.cuda_archs(), "reason": "", "path": mod.__file__}
