"""``xray_ops.info()`` and ``python -m xray_ops info``: versions, device, backends, extension."""

from __future__ import annotations

import importlib.metadata
import platform

import torch

from . import _dispatch, _ext


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def info() -> dict:
    """Everything needed to tell what will run here.

    Returns a dict with "versions", "device", "backends" (name -> {"available": bool,
    "reason": str}), "extension" ({"built", "archs", "reason", "path"}) and "ops"
    (op -> the backends implementing it). Initialises CUDA only to name the device.
    """
    from . import __version__

    versions = {"xray_ops": __version__, "python": platform.python_version(),
                "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    for dist in ("triton", "numba", "numpy", "nvtx", "timm"):
        versions[dist] = _version(dist)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device = {"type": "cuda", "name": props.name,
                  "compute_capability": f"{props.major}.{props.minor}",
                  "memory_gb": round(props.total_memory / 2**30, 1),
                  "count": torch.cuda.device_count()}
    else:
        device = {"type": "cpu", "name": platform.processor() or platform.machine(),
                  "threads": torch.get_num_threads()}
    backends = {}
    for name in _dispatch.BACKENDS:
        ok, reason = _dispatch.backend_status(name)
        backends[name] = {"available": ok, "reason": reason}
    return {"versions": versions, "device": device, "backends": backends,
            "extension": _ext.status(), "requested_backend": _dispatch.requested_backend(),
            "ops": _dispatch.ops()}


def format_info(d: dict) -> str:
    lines = ["xray_ops " + d["versions"]["xray_ops"], "", "versions:"]
    lines += [f"  {k:<10} {v if v is not None else '-'}" for k, v in d["versions"].items()
              if k != "xray_ops"]
    dev = d["device"]
    lines += ["", "device: " + ", ".join(f"{k}={v}" for k, v in dev.items()), "", "backends:"]
    for name, b in d["backends"].items():
        mark = "available  " if b["available"] else "unavailable"
        lines.append(f"  {name:<7} {mark}  {b['reason']}")
    ext = d["extension"]
    lines += ["", "extension xray_ops._C: "
              + (f"built for {ext['archs']} ({ext['path']})" if ext["built"] else ext["reason"])]
    lines += ["", f"requested backend: {d['requested_backend']}", "", "ops:"]
    lines += [f"  {op:<28} {', '.join(b)}" for op, b in d["ops"].items()]
    return "\n".join(lines)
