"""Capture the Triton launches a launcher makes and compile them for a GPU, without one.

The two halves of ``tools/triton_aot_check.py``:

- :func:`capture` runs a launcher (on ``meta`` tensors: shapes, strides and storage offsets,
  no memory) with ``JITFunction.run`` and ``Autotuner.run`` replaced by recorders. Each launch
  becomes a :class:`Launch`: the ``@triton.jit`` function, its arguments as the launcher passed
  them, the grid, and the configs that can run — the launcher's own keyword arguments for a
  plain launch, or every config the autotuner would benchmark (after its ``prune_configs_by``)
  for an autotuned one.
- :func:`compile_launch` specialises the arguments exactly as ``JITFunction.run`` does at run
  time (Triton's own binder: integers equal to 1 become constants, integers and pointers
  divisible by 16 get ``tt.divisibility``, each pointer keeps its tensor's dtype), compiles the
  result for ``cuda:<arch>`` through ptxas, and reads the resources from the cubin: registers
  and stack frame (spills) from ``cuobjdump -res-usage``, spill stores from the ptxas log,
  shared memory from Triton's metadata.

The process must not have run the Triton interpreter (TRITON_INTERPRET=1): its patched
``triton.language`` breaks GPU compiles.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import subprocess
import tempfile
import time

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise RuntimeError("tools/aot_compile.py: unset TRITON_INTERPRET: the interpreter cannot "
                       "compile for the GPU")

import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

# Shared memory one block may use (opt-in maximum): sm_90 227 KB, sm_80 163 KB, sm_86/89 99 KB.
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
# Grid limits of a CUDA launch: x up to 2**31 - 1, y and z up to 65535.
GRID_LIMIT = (2**31 - 1, 65535, 65535)


@dataclasses.dataclass
class Launch:
    """One kernel launch as the launcher made it."""

    kernel: JITFunction
    args: tuple
    kwargs: dict  # the launcher's keyword arguments (constexprs, num_warps, ...)
    grid: object  # a tuple, or a callable of the bound arguments
    configs: list  # [None] for a plain launch; else the autotuner's candidate Configs
    autotuned: bool
    tuning_key: tuple | None  # the autotuner's cache key (tuning runs once per key)

    def variants(self):
        """(config or None, keyword arguments with the config applied) for every candidate."""
        for cfg in self.configs:
            kw = dict(self.kwargs)
            if cfg is not None:
                kw.update(cfg.all_kwargs())
            yield cfg, kw


def _jit_fn(fn):
    while not isinstance(fn, JITFunction):  # Autotuner -> (Heuristics ->) JITFunction
        fn = fn.fn
    return fn


def _tuning_key(tuner: Autotuner, args, kwargs) -> tuple:
    # as Autotuner.run builds it: the key arguments, then the dtype of every tensor argument
    all_args = {**dict(zip(tuner.arg_names, args)), **kwargs}
    named = {k: v for k, v in all_args.items() if k in tuner.arg_names}
    key = [named[k] for k in tuner.keys if k in named]
    key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
    return tuple(key)


@contextlib.contextmanager
def capture():
    """Record (instead of running) every Triton launch made inside the block."""
    launches: list[Launch] = []
    jit_run, auto_run = JITFunction.run, Autotuner.run

    def record_jit(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs, grid, [None], False, None))

    def record_autotuned(self, *args, grid=None, warmup=False, **kwargs):
        if len(self.configs) == 1:  # Autotuner.run: one config, no pruning, no tuning
            configs = list(self.configs)
        else:
            self.nargs = dict(zip(self.arg_names, args))
            try:
                configs = list(self.prune_configs(kwargs))
            finally:
                self.nargs = None
        launches.append(Launch(_jit_fn(self.fn), args, kwargs, grid, configs, True,
                               _tuning_key(self, args, kwargs)))

    JITFunction.run, Autotuner.run = record_jit, record_autotuned
    try:
        yield launches
    finally:
        JITFunction.run, Autotuner.run = jit_run, auto_run


# ----------------------------------------------------------------------------------------------
# specialise and compile
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Specialised:
    kernel: JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: object  # the backend's options dataclass
    bound: dict  # argument name -> value (the grid callable reads these)
    key: str  # identifies the compile: equal keys compile to the same binary


def specialise(kernel: JITFunction, args: tuple, kwargs: dict, arch: int) -> Specialised:
    """Signature, constants, attributes and options exactly as ``JITFunction.run`` builds them
    for these arguments, for target ``cuda:<arch>``."""
    backend = make_backend(GPUTarget("cuda", arch, 32))
    kw = dict(kwargs)
    kw["debug"] = kw.get("debug", kernel.debug) or knobs.runtime.debug
    kw["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kw)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kw, bound, specialization,
                                                              options)
    key = repr((kernel.cache_key, arch, sorted(signature.items()), sorted(constexprs.items()),
                sorted((k, repr(v)) for k, v in attrs.items()), repr(options)))
    return Specialised(kernel, signature, constexprs, attrs, options, bound, key)


@dataclasses.dataclass
class Resources:
    """What one compile needs per thread and per block; error set when it did not compile."""

    regs: int = 0
    stack: int = 0  # stack frame bytes per thread (Triton allocates no local arrays: spills)
    spill_stores: int | None = None  # from the ptxas log (None on a Triton cache hit)
    smem: int = 0  # shared memory bytes per block
    seconds: float = 0.0
    error: str | None = None

    @property
    def spill(self) -> int:
        return max(self.stack, self.spill_stores or 0)


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_SPILL = re.compile(r"(\d+) bytes spill stores")


def cubin_resources(cubin: bytes) -> tuple[int, int, int]:
    """(registers, stack frame bytes, static shared bytes) of the one kernel in a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    m = _RES.search(out)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage printed no resource line:\n{out}")
    regs, stack, shared, local = map(int, m.groups())
    return regs, stack + local, shared


def compile_specialised(s: Specialised, arch: int) -> Resources:
    t0 = time.time()
    log = io.StringIO()
    dump = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(ASTSource(s.kernel, s.signature, s.constexprs, s.attrs),
                               target=GPUTarget("cuda", arch, 32), options=s.options.__dict__)
        regs, stack, static_smem = cubin_resources(k.asm["cubin"])
    except Exception as e:  # noqa: BLE001 - reported per compile, the run goes on
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        return Resources(seconds=time.time() - t0,
                         error=f"{type(e).__name__}: {lines[0][:300] if lines else ''}")
    finally:
        knobs.nvidia.dump_ptxas_log = dump
    spills = [int(x) for x in _SPILL.findall(log.getvalue())]
    return Resources(regs=regs, stack=stack, spill_stores=max(spills) if spills else None,
                     smem=k.metadata.shared + static_smem, seconds=time.time() - t0)


def grid_of(launch: Launch, s: Specialised) -> tuple[int, int, int]:
    grid = launch.grid(s.bound) if callable(launch.grid) else launch.grid
    grid = tuple(int(g) for g in grid) + (1, 1)
    return grid[:3]
