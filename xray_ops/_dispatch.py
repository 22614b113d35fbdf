"""Backend registry: which implementation of an op runs for given inputs.

In the style of xformers' dispatch: every (op, backend) pair is an :class:`Impl` that declares
what it supports (devices, dtypes, minimum compute capability, whether it has a backward) plus an
op-specific ``check`` that returns the reasons it cannot take particular inputs. ``auto`` walks
the op's priority list (fastest first) and takes the first implementation with no reasons;
a forced backend that has reasons raises :class:`BackendError` listing them.

Nothing here touches CUDA at import time; device properties are read only when a CUDA tensor
is dispatched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import os
from typing import Callable, Iterator, Sequence

import torch

from . import _ext, _nvtx

BACKENDS: tuple[str, ...] = ("torch", "triton", "cuda", "cpu")
_CHOICES = ("auto",) + BACKENDS
DEFAULT_PRIORITY: tuple[str, ...] = ("cuda", "triton", "cpu", "torch")

FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


class BackendError(RuntimeError):
    """A forced backend cannot take the inputs (the message lists why), or no backend can."""


@dataclasses.dataclass(frozen=True)
class Impl:
    """One op in one backend.

    forward/backward take the op's canonical positional arguments (see the op's module).
    ``check(*args) -> list[str]`` gives op-specific reasons this implementation cannot take the
    arguments (shape limits, head dims, ...); the generic ones (device, dtype, availability,
    compute capability) are derived from the declared fields.
    """

    op: str
    backend: str
    forward: Callable
    backward: Callable | None = None
    devices: frozenset = frozenset({"cuda"})
    dtypes: frozenset = FLOAT_DTYPES
    min_compute_capability: tuple[int, int] | None = None
    check: Callable[..., list[str]] | None = None
    # index of the argument whose device/dtype decide (forward, backward)
    key_arg: tuple[int, int] = (0, 0)


_IMPLS: dict[str, dict[str, Impl]] = {}
_PRIORITY: dict[str, tuple[str, ...]] = {}
_LAST: dict[str, str] = {}


def register(impl: Impl) -> Impl:
    if impl.backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {impl.backend!r}")
    _IMPLS.setdefault(impl.op, {})[impl.backend] = impl
    return impl


def set_priority(op: str, order: Sequence[str]) -> None:
    """Order in which ``auto`` tries the backends of ``op`` (fastest first)."""
    _PRIORITY[op] = tuple(order)


def ops() -> dict[str, list[str]]:
    """Every registered op and the backends that implement it."""
    return {op: sorted(impls) for op, impls in sorted(_IMPLS.items())}


# ----------------------------------------------------------------------------------------------
# requested backend: a module global (not a ContextVar) so torch.compile reads it while tracing
# ----------------------------------------------------------------------------------------------
def _validate_choice(name: object, what: str) -> str:
    if not isinstance(name, str) or name not in _CHOICES:
        raise ValueError(f"{what}: expected one of {list(_CHOICES)}, got {name!r}")
    return name


_requested: str = os.environ.get("XRAY_OPS_BACKEND", "auto").strip() or "auto"


def requested_backend() -> str:
    """The backend the next op call will ask for ("auto" unless forced)."""
    return _validate_choice(_requested, "XRAY_OPS_BACKEND")


def set_backend(name: str) -> None:
    """Force a backend for every op ("torch", "triton", "cuda", "cpu"), or "auto"."""
    global _requested
    _requested = _validate_choice(name, "set_backend(name)")


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """``with xray_ops.backend("triton"): ...`` forces a backend inside the block.

    Backward passes run with the backend that was requested when the forward ran.
    """
    global _requested
    _validate_choice(name, "backend(name)")
    previous = _requested
    _requested = name
    try:
        yield
    finally:
        _requested = previous


def last_backend(op: str) -> str:
    """Name of the backend that ran last for ``op`` ("<op>.backward" for its backward)."""
    if op not in _LAST:
        known = sorted(_IMPLS)
        if op.split(".")[0] not in _IMPLS:
            raise ValueError(f"last_backend(op): unknown op {op!r}; known ops: {known}")
        raise ValueError(f"last_backend(op): {op!r} has not run yet in this process")
    return _LAST[op]


# ----------------------------------------------------------------------------------------------
# availability of whole backends
# ----------------------------------------------------------------------------------------------
def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _module_present(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def backend_status(name: str) -> tuple[bool, str]:
    """(available, reason) for a whole backend, independent of any op or input."""
    if name == "torch":
        return True, f"PyTorch reference implementations (torch {torch.__version__})"
    if name == "triton":
        if not _module_present("triton"):
            return False, "triton is not installed"
        if triton_interpreting():
            return True, "Triton interpreter (TRITON_INTERPRET=1): CPU tensors, for tests"
        if not torch.cuda.is_available():
            return False, "no CUDA device (set TRITON_INTERPRET=1 to run Triton on the CPU)"
        return True, "Triton on the GPU"
    if name == "cuda":
        ext = _ext.status()
        if not ext["built"]:
            return False, ext["reason"]
        if not torch.cuda.is_available():
            return False, f"extension built ({ext['archs']}) but no CUDA device"
        return True, f"xray_ops._C built for {ext['archs']}"
    if name == "cpu":
        if not _module_present("numba"):
            return False, "numba is not installed (pip install numba)"
        return True, "numba kernels on the CPU"
    raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")


# ----------------------------------------------------------------------------------------------
# selection
# ----------------------------------------------------------------------------------------------
INTERPRETER_BF16_REASON = (
    "bfloat16 under the Triton interpreter: its bfloat16 stores truncate instead of rounding "
    "and its tl.dot on bfloat16 multiplies raw bit patterns (triton-lang/triton#11584); use "
    "float16/float32 on the CPU, bfloat16 on the GPU")


def _has_bfloat16(args: Sequence) -> bool:
    """Any tensor argument, or a dtype argument (an output dtype), in bfloat16."""
    return any((isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16)
               or a is torch.bfloat16 for a in args)


def _reasons(impl: Impl, args: Sequence, *, auto: bool, backward: bool) -> list[str]:
    reasons: list[str] = []
    if backward and impl.backward is None:
        return [f"{impl.backend} has no backward for {impl.op}"]
    key = args[impl.key_arg[1] if backward else impl.key_arg[0]]
    device, dtype = key.device, key.dtype
    if impl.backend == "cuda" and device.type == "cuda":
        ok, why = backend_status("cuda")
        if not ok:
            return [why]
    elif impl.backend == "triton":
        if not _module_present("triton"):
            return ["triton is not installed"]
        if device.type == "cpu":
            if not triton_interpreting():
                reasons.append("CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)")
            elif auto:
                reasons.append("auto does not pick the Triton interpreter; force 'triton' to run it")
            if triton_interpreting() and _has_bfloat16(args):  # every op alike
                reasons.append(INTERPRETER_BF16_REASON)
    elif impl.backend == "cpu" and not _module_present("numba"):
        return ["numba is not installed (pip install numba)"]
    if not (impl.backend == "triton" and device.type == "cpu") and device.type not in impl.devices:
        reasons.append(f"device {device.type} not supported (supports {sorted(impl.devices)})")
    if dtype not in impl.dtypes:
        names = sorted(str(d).replace("torch.", "") for d in impl.dtypes)
        reasons.append(f"dtype {str(dtype).replace('torch.', '')} not supported (supports {names})")
    if impl.min_compute_capability and device.type == "cuda" and not reasons:
        cc = torch.cuda.get_device_capability(device)
        if cc < impl.min_compute_capability:
            need = "%d.%d" % impl.min_compute_capability
            reasons.append(f"needs compute capability >= {need}, device has {cc[0]}.{cc[1]}")
    if impl.check is not None and not reasons:
        reasons += impl.check(*args)
    return reasons


def select(op: str, requested: str, args: Sequence, *, backward: bool = False) -> Impl:
    """The implementation of ``op`` that runs for ``args`` (canonical positional arguments)."""
    impls = _IMPLS.get(op)
    if not impls:
        raise ValueError(f"op: unknown op {op!r}; known ops: {sorted(_IMPLS)}")
    requested = _validate_choice(requested, "backend")
    what = f"{op} backward" if backward else op
    if requested != "auto":
        impl = impls.get(requested)
        if impl is None:
            raise BackendError(f"{what}: backend {requested!r} has no implementation "
                               f"(implemented: {sorted(impls)})")
        reasons = _reasons(impl, args, auto=False, backward=backward)
        if not reasons:
            return impl
        if not (backward and impl.backward is None):
            raise BackendError(f"{what}: forced backend {requested!r} cannot take these inputs: "
                               + "; ".join(reasons))
        # A forced backend without a backward of its own: the backward falls back to auto
        # (last_backend(op + ".backward") tells which ran).
    report = []
    for name in _PRIORITY.get(op, DEFAULT_PRIORITY):
        impl = impls.get(name)
        if impl is None:
            continue
        reasons = _reasons(impl, args, auto=True, backward=backward)
        if not reasons:
            return impl
        report.append(f"{name}: " + "; ".join(reasons))
    raise BackendError(f"{what}: no backend can take these inputs:\n  " + "\n  ".join(report))


def run(op: str, requested: str, args: Sequence, *, backward: bool = False):
    """Select, record and run ``op`` (inside an NVTX range when XRAY_OPS_NVTX=1)."""
    impl = select(op, requested, args, backward=backward)
    key = f"{op}.backward" if backward else op
    _LAST[key] = impl.backend
    fn = impl.backward if backward else impl.forward
    with _nvtx.range(f"xray_ops.{key}[{impl.backend}]"):
        return fn(*args)


def reasons_for(op: str, args: Sequence, *, backward: bool = False) -> dict[str, list[str]]:
    """For each backend of ``op``: the reasons it cannot take ``args`` when forced (empty = can)."""
    return {name: _reasons(impl, args, auto=False, backward=backward)
            for name, impl in sorted(_IMPLS.get(op, {}).items())}
