"""Backend registry: which implementation of an op runs for given inputs.

In the style of xformers' dispatch: every (op, backend) pair is an :class:`Impl` that declares
what it supports — devices, dtypes, the runtime it needs (a library, a built extension, a GPU
the build targeted), a minimum compute capability, whether it has a backward — plus op-specific
checks that return the reasons it cannot take particular inputs. ``auto`` walks the op's
priority list (fastest first) and takes the first implementation with no reasons; a forced
backend that has reasons raises :class:`BackendError`, which lists them and describes the
inputs (shapes, dtypes, devices, strides).

Nothing here touches CUDA at import time; device properties are read only when a CUDA tensor
is dispatched.

Registration API
----------------
An op module registers an op in three steps (``xray_ops/ops/evit.py`` is a small complete
example, ``xray_ops/ops/attention_backends.py`` a larger one):

1. :func:`declare` the op once: its dispatched inputs *by name*, in the order implementations
   receive them, for each direction; the input whose device and dtype decide; and the order in
   which ``auto`` tries the backends::

       declare("evit_select",
               forward=("x", "cls_attn", "keep", "fuse"),
               backward=("grad_out", "x", "cls_attn", "keep", "fuse"),  # None: no backward
               key="x",
               priority=("cuda", "triton", "cpu", "torch"))

2. :func:`register` one implementation per backend::

       register("evit_select", "triton",
                forward=lazy("xray_ops.kernels.evit_select", "evit_select_forward"),
                backward=lazy("xray_ops.kernels.evit_select", "evit_select_backward"),
                dtypes=GPU_FLOATS,
                forward_check=_row_limit, backward_check=_row_limit)

   ``forward`` / ``backward`` are called with the declared inputs *positionally, in the
   declared order* and return the op's outputs. ``forward_check`` / ``backward_check`` take
   the inputs as a named tuple (``inputs.x.shape[1]``) and return a list of reasons (empty:
   can take them); they run only after the generic checks passed (device, runtime, dtype,
   compute capability), so they may assume a supported device and dtype. Each backend has a
   default device set and runtime (``torch``: cpu+cuda, always there; ``triton``: cuda, and
   cpu through the interpreter; ``cuda``: the extension on a GPU it was built for; ``cpu``:
   numba); pass ``devices=`` / ``runtime=`` where an implementation needs something else (e.g.
   a cpu implementation on PyTorch's own kernels: ``runtime=TORCH``; one that needs two
   runtimes: ``runtime=requires(CUDA_EXT, TRITON)``). :func:`lazy` wraps a kernel in a module
   that must not be imported before the first call (Triton, numba, the extension).

3. In the ``torch.library`` op body, dispatch with every declared input by name::

       x_out, idx = run("evit_select", backend, x=x, cls_attn=cls_attn, keep=keep, fuse=fuse)
       grads = run_backward("evit_select", backend, grad_out=g, x=x, cls_attn=cls_attn, ...)

   ``backend`` is what the public function read from :func:`requested_backend` ("auto" or a
   name); pass it into the op as an argument so torch.compile sees it. :func:`last_backend`
   then reports what ran (``forward_reports`` / ``backward_reports`` on the Impl say so when an
   implementation runs part of its work on another backend).

Dtype sets: :data:`FLOATS`, :data:`GPU_FLOATS`, :data:`HALF_FLOATS` (from ``xray_ops._dtypes``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import os
from typing import Any, Callable, Iterator, Mapping, Sequence, Union

import torch

from . import _ext, _nvtx
from ._dtypes import FLOATS, GPU_FLOATS, HALF_FLOATS, name as dtype_name, names as dtype_names

__all__ = [
    "BACKENDS", "BackendError", "Impl", "Runtime", "TORCH", "TRITON", "CUDA_EXT", "NUMBA",
    "FLOATS", "GPU_FLOATS", "HALF_FLOATS", "declare", "register", "lazy", "requires",
    "cuda_extension", "run", "run_backward", "select", "reasons_for", "last_backend",
    "set_backend", "backend", "requested_backend", "backend_status", "ops",
]

BACKENDS: tuple[str, ...] = ("torch", "triton", "cuda", "cpu")
_CHOICES = ("auto",) + BACKENDS
DEFAULT_PRIORITY: tuple[str, ...] = ("cuda", "triton", "cpu", "torch")


# ----------------------------------------------------------------------------------------------
# runtimes: what an implementation needs beyond its inputs
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Runtime:
    """What an implementation needs at run time beyond its inputs (a library, a built
    extension, a GPU the build targeted).

    ``status() -> (available, description)`` describes the whole runtime (``xray_ops.info()``);
    ``reasons(device, auto, inputs) -> list[str]`` says why it cannot run the inputs (the op's
    named tuple, deciding tensor on ``device``) now: empty when it can. ``auto`` is True when
    ``auto`` is choosing (it may refuse what a forced backend may do, e.g. the Triton
    interpreter). A runtime's limits hold for every op alike (e.g. the interpreter's bfloat16).
    """

    name: str
    status: Callable[[], tuple[bool, str]]
    reasons: Callable[[torch.device, bool, Any], list[str]]


def requires(*runtimes: Runtime) -> Runtime:
    """A runtime that needs every one of ``runtimes`` (reasons of all of them)."""
    def status():
        parts = [r.status() for r in runtimes]
        return all(ok for ok, _ in parts), "; ".join(why for _, why in parts)

    def reasons(device, auto, inputs):
        return [why for r in runtimes for why in r.reasons(device, auto, inputs)]

    return Runtime(" + ".join(r.name for r in runtimes), status, reasons)


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _module_present(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def device_capability(device: torch.device) -> tuple[int, int]:
    """Compute capability of a CUDA device (a function, so tests can fake a GPU)."""
    return torch.cuda.get_device_capability(device)


def _torch_status():
    return True, f"PyTorch's own kernels (torch {torch.__version__})"


TORCH = Runtime("torch", _torch_status, lambda device, auto, inputs: [])


def _numba_status():
    if not _module_present("numba"):
        return False, "numba is not installed (pip install numba)"
    return True, "numba kernels on the CPU"


def _numba_reasons(device, auto, inputs):
    ok, why = _numba_status()
    return [] if ok else [why]


NUMBA = Runtime("numba", _numba_status, _numba_reasons)


def _triton_status():
    if not _module_present("triton"):
        return False, "triton is not installed"
    if triton_interpreting():
        return True, "Triton interpreter (TRITON_INTERPRET=1): CPU tensors, for tests"
    if not torch.cuda.is_available():
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run Triton on the CPU)"
    return True, "Triton on the GPU"


INTERPRETER_BF16_REASON = (
    "bfloat16 under the Triton interpreter: its bfloat16 stores truncate instead of rounding "
    "and its tl.dot on bfloat16 multiplies raw bit patterns (triton-lang/triton#11584); use "
    "float16/float32 on the CPU, bfloat16 on the GPU")


def _has_bfloat16(inputs) -> bool:
    """Any tensor input (or tensor list with a dtype, as Lion's TensorList), or a dtype input
    (an output dtype), in bfloat16."""
    # torch dtypes are singletons: `is` (a numpy dtype would not compare with ==)
    return any(a is torch.bfloat16 or getattr(a, "dtype", None) is torch.bfloat16
               for a in inputs)


def _triton_reasons(device, auto, inputs):
    if not _module_present("triton"):
        return ["triton is not installed"]
    if device.type == "cpu":
        if not triton_interpreting():
            return ["CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)"]
        reasons = []
        if auto:
            reasons.append("auto does not pick the Triton interpreter; force 'triton' to run it")
        if _has_bfloat16(inputs):
            reasons.append(INTERPRETER_BF16_REASON)
        return reasons
    return []


TRITON = Runtime("triton", _triton_status, _triton_reasons)


def cuda_extension(symbol: str | None = None) -> Runtime:
    """The extension ``xray_ops._C`` on a GPU it holds a kernel image for; with ``symbol``,
    also that entry point (an extension may be built without some csrc/ parts)."""
    def status():
        ext = _ext.status()
        if not ext["built"]:
            return False, ext["reason"]
        if symbol is not None and not hasattr(_ext.load(), symbol):
            return False, f"the built extension has no {symbol}"
        if not torch.cuda.is_available():
            return False, f"extension built ({ext['archs']}) but no CUDA device"
        return True, f"xray_ops._C built for {ext['archs']}"

    def reasons(device, auto, inputs):
        ext = _ext.status()
        if not ext["built"]:
            return [ext["reason"]]
        if symbol is not None and not hasattr(_ext.load(), symbol):
            return [f"the built extension has no {symbol} (its csrc/ part was not compiled in)"]
        if device.type == "cuda":
            why = _ext.image_reason(device_capability(device))
            if why:
                return [why]
        return []

    return Runtime("cuda" if symbol is None else f"cuda:{symbol}", status, reasons)


CUDA_EXT = cuda_extension()

# what each backend's implementations run on unless they say otherwise
_BACKEND_DEFAULTS: dict[str, tuple[frozenset, Runtime]] = {
    "torch": (frozenset({"cpu", "cuda"}), TORCH),
    "triton": (frozenset({"cpu", "cuda"}), TRITON),  # cpu: only under the interpreter
    "cuda": (frozenset({"cuda"}), CUDA_EXT),
    "cpu": (frozenset({"cpu"}), NUMBA),
}


def backend_status(name: str) -> tuple[bool, str]:
    """(available, description) of a whole backend, independent of any op or input."""
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    if name == "cpu":
        ok, why = _numba_status()
        if ok:
            return True, "numba kernels and PyTorch's own CPU kernels"
        return True, (f"PyTorch's own CPU kernels only; {why}: ops on numba kernels have no "
                      f"cpu backend")
    return _BACKEND_DEFAULTS[name][1].status()


# ----------------------------------------------------------------------------------------------
# ops and implementations
# ----------------------------------------------------------------------------------------------
Check = Callable[[Any], list]
Reports = Union[str, Callable[[Any], str], None]


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """An op's dispatched inputs by name (named-tuple classes per direction), the input whose
    device and dtype decide, and the order ``auto`` tries the backends in."""

    name: str
    forward: type
    backward: type | None
    key: str
    priority: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Impl:
    """One op in one backend (made by :func:`register`; see the module docstring)."""

    op: str
    backend: str
    forward: Callable
    backward: Callable | None
    devices: frozenset
    dtypes: frozenset
    runtime: Runtime
    min_compute_capability: tuple[int, int] | None = None
    forward_check: Check | None = None
    backward_check: Check | None = None
    # what last_backend reports when this ran (default: the backend's name); a string or
    # inputs -> str, for an implementation that runs part of its work on another backend
    forward_reports: Reports = None
    backward_reports: Reports = None

    def reports(self, inputs, *, backward: bool) -> str:
        r = self.backward_reports if backward else self.forward_reports
        if r is None:
            return self.backend
        return r if isinstance(r, str) else r(inputs)


_SPECS: dict[str, OpSpec] = {}
_IMPLS: dict[str, dict[str, Impl]] = {}
_LAST: dict[str, str] = {}


def _names(what: str, names: Sequence[str]) -> tuple[str, ...]:
    names = tuple(names)
    if not names or not all(isinstance(n, str) and n.isidentifier() for n in names):
        raise ValueError(f"{what}: expected a non-empty sequence of identifiers, got {names!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"{what}: expected distinct names, got {names!r}")
    return names


def declare(op: str, *, forward: Sequence[str], backward: Sequence[str] | None = None,
            key: str, priority: Sequence[str] = DEFAULT_PRIORITY) -> OpSpec:
    """Declare ``op``: its forward (and backward) inputs by name, the deciding input ``key``
    (a tensor in both directions) and ``auto``'s priority (fastest first). Idempotent for the
    same declaration."""
    fwd = _names(f"{op} forward", forward)
    bwd = _names(f"{op} backward", backward) if backward is not None else None
    for direction, names in (("forward", fwd), ("backward", bwd)):
        if names is not None and key not in names:
            raise ValueError(f"key: expected one of the {direction} inputs of {op} {names}, "
                             f"got {key!r}")
    priority = tuple(priority)
    for b in priority:
        if b not in BACKENDS:
            raise ValueError(f"priority: expected backends from {BACKENDS}, got {b!r}")
    old = _SPECS.get(op)
    if old is not None:
        same = (old.forward._fields == fwd and old.key == key and old.priority == priority
                and (old.backward._fields if old.backward else None) == bwd)
        if not same:
            raise ValueError(f"op {op!r} is already declared with other inputs or priority")
        return old
    spec = OpSpec(op, collections.namedtuple(f"{op}_forward_inputs", fwd),
                  collections.namedtuple(f"{op}_backward_inputs", bwd) if bwd else None,
                  key, priority)
    _SPECS[op] = spec
    _IMPLS.setdefault(op, {})
    return spec


def register(op: str, backend: str, *, forward: Callable, backward: Callable | None = None,
             dtypes: Sequence[torch.dtype], devices: Sequence[str] | None = None,
             runtime: Runtime | None = None,
             min_compute_capability: tuple[int, int] | None = None,
             forward_check: Check | None = None, backward_check: Check | None = None,
             forward_reports: Reports = None, backward_reports: Reports = None) -> Impl:
    """Register ``backend``'s implementation of the declared ``op`` (see the module docstring).

    devices / runtime default to the backend's (torch: cpu+cuda, always available; triton:
    cuda, cpu under the interpreter; cuda: the extension on a GPU it was built for; cpu: numba).
    """
    spec = _SPECS.get(op)
    if spec is None:
        raise ValueError(f"op: {op!r} is not declared (call declare() first)")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backward is not None and spec.backward is None:
        raise ValueError(f"backward: {op} declares no backward inputs")
    if backward_check is not None and backward is None:
        raise ValueError(f"backward_check: {op}/{backend} has no backward")
    default_devices, default_runtime = _BACKEND_DEFAULTS[backend]
    dtypes = frozenset(dtypes)
    if not dtypes:
        raise ValueError(f"dtypes: expected at least one dtype for {op}/{backend}")
    impl = Impl(op=op, backend=backend, forward=forward, backward=backward,
                devices=frozenset(devices) if devices is not None else default_devices,
                dtypes=dtypes, runtime=runtime or default_runtime,
                min_compute_capability=min_compute_capability, forward_check=forward_check,
                backward_check=backward_check, forward_reports=forward_reports,
                backward_reports=backward_reports)
    _IMPLS[op][backend] = impl
    return impl


def lazy(module: str, name: str) -> Callable:
    """``module.name``, imported on the first call (Triton, numba and the extension must not
    load at ``import xray_ops``). ``module="xray_ops._C"`` goes through the extension loader,
    so a missing build raises its reason. A list result (pybind's std::vector) becomes a tuple.
    """
    def call(*args, **kwargs):
        if module == "xray_ops._C":
            fn = getattr(_ext.get(), name)
        else:
            fn = getattr(importlib.import_module(module), name)
        out = fn(*args, **kwargs)
        return tuple(out) if isinstance(out, list) else out

    call.__name__ = name
    call.__qualname__ = f"lazy({module}.{name})"
    return call


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
    """What ran last for ``op`` ("<op>.backward" for its backward): a backend name, or
    "a+b" when an implementation ran part of its work on another backend (e.g. the CUDA flash
    attention forward with its CLS row in Triton: "cuda+triton")."""
    if op not in _LAST:
        known = sorted(_IMPLS)
        if op.split(".")[0] not in _IMPLS:
            raise ValueError(f"last_backend(op): unknown op {op!r}; known ops: {known}")
        raise ValueError(f"last_backend(op): {op!r} has not run yet in this process")
    return _LAST[op]


# ----------------------------------------------------------------------------------------------
# errors that describe their inputs
# ----------------------------------------------------------------------------------------------
def describe(value: Any) -> str:
    """One input for a message: tensors by shape, dtype, device (and strides unless
    contiguous), other values by repr."""
    if isinstance(value, torch.Tensor):
        s = (f"shape={tuple(value.shape)} dtype={dtype_name(value.dtype)} "
             f"device={value.device}")
        if not value.is_contiguous():
            s += f" stride={tuple(value.stride())}"
        return s
    return repr(value)


class BackendError(RuntimeError):
    """A forced backend cannot take the inputs, or no backend can. The message lists the
    reasons and describes every input; ``op``, ``backward``, ``requested``, ``reasons``
    (backend -> list of reasons) and ``inputs`` (name -> description) hold the same."""

    def __init__(self, message: str, *, op: str | None = None, backward: bool = False,
                 requested: str | None = None, reasons: Mapping[str, list] | None = None,
                 inputs: Any = None):
        self.op, self.backward, self.requested = op, backward, requested
        self.reasons = dict(reasons or {})
        self.inputs = {k: describe(v) for k, v in inputs._asdict().items()} \
            if inputs is not None else {}
        if self.inputs:
            width = max(len(k) for k in self.inputs)
            message += "\n  inputs:\n" + "\n".join(f"    {k:<{width}}  {v}"
                                                   for k, v in self.inputs.items())
        super().__init__(message)


# ----------------------------------------------------------------------------------------------
# selection
# ----------------------------------------------------------------------------------------------
def _spec(op: str) -> OpSpec:
    spec = _SPECS.get(op)
    if spec is None or not _IMPLS.get(op):
        raise ValueError(f"op: unknown op {op!r}; known ops: {sorted(_IMPLS)}")
    return spec


def _as_inputs(spec: OpSpec, inputs, backward: bool):
    """The op's named tuple for one direction, from a mapping, a sequence in declared order,
    or the named tuple itself."""
    cls = spec.backward if backward else spec.forward
    direction = "backward" if backward else "forward"
    if cls is None:
        raise ValueError(f"{spec.name} has no backward")
    if isinstance(inputs, cls):
        return inputs
    try:
        if isinstance(inputs, Mapping):
            return cls(**inputs)
        return cls(*inputs)
    except TypeError:
        given = sorted(inputs) if isinstance(inputs, Mapping) else f"{len(inputs)} values"
        raise TypeError(f"{spec.name} {direction}: expected the inputs {cls._fields}, "
                        f"got {given}") from None


def _reasons(impl: Impl, inputs, *, auto: bool, backward: bool) -> list[str]:
    """Why ``impl`` cannot take ``inputs`` (a named tuple of the direction): empty = it can."""
    if backward and impl.backward is None:
        return [f"{impl.backend} has no backward for {impl.op}"]
    key = getattr(inputs, _SPECS[impl.op].key)
    device, dtype = key.device, key.dtype
    if device.type not in impl.devices:
        return [f"device {device.type} not supported (supports {sorted(impl.devices)})"]
    reasons = list(impl.runtime.reasons(device, auto, inputs))
    if dtype not in impl.dtypes:
        reasons.append(f"dtype {dtype_name(dtype)} not supported "
                       f"(supports {dtype_names(impl.dtypes)})")
    if not reasons and impl.min_compute_capability and device.type == "cuda":
        cc = device_capability(device)
        if tuple(cc) < impl.min_compute_capability:
            need = "%d.%d" % impl.min_compute_capability
            reasons.append(f"needs compute capability >= {need}, device has {cc[0]}.{cc[1]}")
    check = impl.backward_check if backward else impl.forward_check
    if not reasons and check is not None:
        reasons += check(inputs)
    return reasons


def select(op: str, requested: str, inputs, *, backward: bool = False) -> Impl:
    """The implementation of ``op`` that runs for ``inputs`` (a mapping of the declared names,
    or a sequence in declared order) when ``requested`` ("auto" or a backend) is asked for."""
    spec = _spec(op)
    inputs = _as_inputs(spec, inputs, backward)
    impls = _IMPLS[op]
    requested = _validate_choice(requested, "backend")
    what = f"{op} backward" if backward else op
    err = dict(op=op, backward=backward, requested=requested, inputs=inputs)
    if requested != "auto":
        impl = impls.get(requested)
        if impl is None:
            raise BackendError(f"{what}: backend {requested!r} has no implementation "
                               f"(implemented: {sorted(impls)})", **err)
        reasons = _reasons(impl, inputs, auto=False, backward=backward)
        if not reasons:
            return impl
        if not (backward and impl.backward is None):
            raise BackendError(f"{what}: forced backend {requested!r} cannot take these "
                               f"inputs: " + "; ".join(reasons),
                               reasons={requested: reasons}, **err)
        # A forced backend without a backward of its own: the backward falls back to auto
        # (last_backend(op + ".backward") tells which ran).
    report = {}
    for name in spec.priority:
        impl = impls.get(name)
        if impl is None:
            continue
        reasons = _reasons(impl, inputs, auto=True, backward=backward)
        if not reasons:
            return impl
        report[name] = reasons
    raise BackendError(f"{what}: no backend can take these inputs:\n  "
                       + "\n  ".join(f"{n}: " + "; ".join(r) for n, r in report.items()),
                       reasons=report, **err)


def _run(op: str, requested: str, inputs: Mapping, backward: bool):
    spec = _spec(op)
    args = _as_inputs(spec, inputs, backward)
    impl = select(op, requested, args, backward=backward)
    key = f"{op}.backward" if backward else op
    _LAST[key] = impl.reports(args, backward=backward)
    fn = impl.backward if backward else impl.forward
    with _nvtx.range(f"xray_ops.{key}[{impl.backend}]"):
        return fn(*args)


def run(op: str, requested: str, /, **inputs):
    """Select, record and run ``op``'s forward on the declared inputs, given by name
    (inside an NVTX range when XRAY_OPS_NVTX=1)."""
    return _run(op, requested, inputs, False)


def run_backward(op: str, requested: str, /, **inputs):
    """Select, record and run ``op``'s backward on the declared backward inputs, by name."""
    return _run(op, requested, inputs, True)


def reasons_for(op: str, inputs, *, backward: bool = False,
                auto: bool = False) -> dict[str, list[str]]:
    """For each backend of ``op``: the reasons it cannot take ``inputs`` (a mapping of the
    declared names, or a sequence in declared order) when forced, or with ``auto=True`` when
    ``auto`` is choosing (empty = it can)."""
    spec = _spec(op)
    inputs = _as_inputs(spec, inputs, backward)
    return {name: _reasons(impl, inputs, auto=auto, backward=backward)
            for name, impl in sorted(_IMPLS[op].items())}
