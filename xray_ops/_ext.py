"""Lazy loading of the compiled extension ``xray_ops._C`` (csrc/), and which GPUs it can run on.

A missing or mismatched extension never breaks ``import xray_ops``: it only disables the
``cuda`` backend, and the reason shows in ``xray_ops.info()``.

The extension records the targets it was compiled for (``_C.cuda_archs()``, from setup.py's
XRAY_OPS_CUDA_ARCHS), e.g. ``"sm_80;sm_90a;compute_90"``. :func:`image_reason` compares a
device's compute capability with them, by CUDA's compatibility rules, so that ``auto`` passes
over the ``cuda`` backend on a GPU the build holds no kernel image for (instead of failing with
"no kernel image is available for execution on the device").
"""

from __future__ import annotations

import importlib
import re
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
    """{"built": bool, "archs": "sm_80;sm_90a;compute_90" or "", "reason": str, "path"}."""
    mod = load()
    if mod is None:
        return {"built": False, "archs": "", "reason": _reason, "path": None}
    return {"built": True, "archs": mod.cuda_archs(), "reason": "", "path": mod.__file__}


# ----------------------------------------------------------------------------------------------
# which devices the build holds a kernel image for
# ----------------------------------------------------------------------------------------------
_TARGET = re.compile(r"^(sm|compute)_(\d+)(a?)$")


def _parse(target: str) -> tuple[str, tuple[int, int], bool] | None:
    """"sm_90a" -> ("sm", (9, 0), True); "compute_120" -> ("compute", (12, 0), False)."""
    m = _TARGET.match(target.strip())
    if m is None:
        return None
    digits = m.group(2)
    return m.group(1), (int(digits[:-1] or 0), int(digits[-1])), bool(m.group(3))


def runs_on(capability: tuple[int, int], archs: str) -> bool | None:
    """Whether a build for ``archs`` ("sm_80;sm_90a;compute_90") runs on ``capability``.

    CUDA's rules: a cubin for sm_XY runs on X.Z with Z >= Y (same major); an arch-specific
    sm_XYa cubin only on X.Y; PTX for compute_XY is JIT-compiled on any capability >= X.Y
    (compute_XYa only on X.Y). None when ``archs`` names nothing this parser knows (an old
    build reporting "unknown"): the caller cannot tell, and should not refuse.
    """
    targets = [t for t in (_parse(a) for a in archs.split(";")) if t is not None]
    if not targets:
        return None
    for kind, (major, minor), specific in targets:
        if specific:
            ok = capability == (major, minor)
        elif kind == "sm":
            ok = capability[0] == major and capability[1] >= minor
        else:
            ok = capability >= (major, minor)
        if ok:
            return True
    return False


def image_reason(capability: tuple[int, int]) -> str | None:
    """Why the built extension cannot run on a device of ``capability``, or None if it can."""
    st = status()
    if not st["built"]:
        return st["reason"]
    if runs_on(capability, st["archs"]) is False:
        cc = "%d.%d" % capability
        return (f"xray_ops._C was built for {st['archs']}: no kernel image for compute "
                f"capability {cc} (rebuild with XRAY_OPS_CUDA_ARCHS including "
                f"{capability[0]}{capability[1]})")
    return None
