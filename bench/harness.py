"""One benchmark harness for every op.

An op's bench module (bench/ops/<op>.py) returns :class:`Case` objects: a shape, a dtype, a
maker of fresh inputs, and the implementations to time side by side (PyTorch eager, the same
eager code under torch.compile, every xray_ops backend that can take the inputs, and peers).
The harness times forward, backward and forward+backward — ``triton.testing.do_bench`` medians
on the GPU, ``torch.utils.benchmark`` medians on the CPU — prints a table of ratios against
eager and appends rows to ``bench/results/<device>.csv``.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import os
import platform
import re
import subprocess
from typing import Callable, Sequence

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CSV_COLUMNS = ["op", "mode", "shape", "dtype", "backend", "ms", "gbps", "tflops", "device",
               "torch", "triton", "commit", "date"]
MODES = ("fwd", "bwd", "fwd+bwd")
BASELINE = "eager"
SDPA_PREFIX = "sdpa-"  # torch SDPA peers, one per forced backend ("sdpa-flash", ...)

# Ceilings measured on the GPU machine, for the "% of peak" columns (the goals of the
# memory-bound ops are stated in % of bandwidth): an H200 copies ~4.3 TB/s device to device and
# runs a dense bf16 matmul at ~790 TFLOP/s. Keyed by a substring of the device name; devices
# not listed get no % columns.
PEAKS = {"H200": {"gbps": 4300.0, "tflops": 790.0}}


def peaks_for(device_label: str) -> dict | None:
    """{"gbps": ..., "tflops": ...} ceilings of the device named ``device_label``, or None."""
    return next((v for k, v in PEAKS.items() if k in (device_label or "")), None)


def percent_of_peak(row: "Row") -> tuple[float | None, float | None]:
    """(% of peak bandwidth, % of peak TFLOP/s) of a row on a device with known ceilings."""
    peak = peaks_for(row.device)
    if peak is None:
        return None, None
    bw = 100 * row.gbps / peak["gbps"] if row.gbps is not None else None
    tf = 100 * row.tflops / peak["tflops"] if row.tflops is not None else None
    return bw, tf


@dataclasses.dataclass
class Case:
    """One shape of one op.

    make():    fresh inputs, a tuple (tensors that need gradients already require them).
    impls:     name -> fn(*inputs) returning a tensor or a tuple whose differentiable tensors
               are backpropagated. Names: "eager", "compile", xray_ops backends
               ("triton", "cuda", "cpu", ...), peers ("sdpa-flash", "flash-attn", ...).
    skipped:   name -> why an implementation is not timed here (absent peer, backend reasons).
    bytes/flops: per mode ("fwd", "bwd", "fwd+bwd"), for GB/s and TFLOP/s columns.
    """

    op: str
    shape: str
    dtype: torch.dtype
    make: Callable[[], tuple]
    impls: dict[str, Callable]
    modes: Sequence[str] = MODES
    bytes: dict[str, float] = dataclasses.field(default_factory=dict)
    flops: dict[str, float] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# environment description
# ----------------------------------------------------------------------------------------------
def device_name(device: str) -> str:
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(l.split(":", 1)[1] for l in f if l.startswith("model name"))
        except (OSError, StopIteration):
            pass
        name = f"cpu {name.strip()} {torch.get_num_threads()}t"
    return re.sub(r"[^A-Za-z0-9.]+", "_", name).strip("_")


def commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        # results being appended to do not make the measured code dirty
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":!bench/results"],
                               cwd=root, capture_output=True, text=True, timeout=10).stdout
        return (sha or "unknown") + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("XRAY_OPS_COMMIT", "unknown")


def _triton_version() -> str:
    try:
        import importlib.metadata

        return importlib.metadata.version("triton")
    except Exception:
        return ""


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------
def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def _grad_targets(out):
    outs = [t for t in _tensors(out) if t.requires_grad]
    return outs, [torch.randn_like(t) for t in outs]


def time_ms(fn: Callable[[], object], device: str, quick: bool, grad_to_none=None) -> float:
    """Median milliseconds of fn()."""
    if device == "cuda":
        import triton.testing

        rep = 25 if quick else 100
        return float(triton.testing.do_bench(fn, warmup=5 if quick else 25, rep=rep,
                                             grad_to_none=grad_to_none, return_mode="median"))
    import torch.utils.benchmark as tb

    if grad_to_none:  # as do_bench does on the GPU: no gradient accumulation in the timing
        inner = fn

        def fn():
            for t in grad_to_none:
                t.grad = None
            return inner()

    fn()  # warm-up (JIT compiles, caches)
    # Timer runs the statement on ONE thread unless told otherwise (whatever
    # torch.set_num_threads says), while numba kernels use their own pool on every core: give
    # both sides of a ratio the same threads.
    m = tb.Timer(stmt="fn()", globals={"fn": fn},
                 num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=0.2 if quick else 1.0)
    return m.median * 1e3


def measure(case: Case, impl: Callable, mode: str, device: str, quick: bool) -> float:
    inputs = case.make()
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if mode == "fwd":
        return time_ms(lambda: impl(*inputs), device, quick)
    if mode == "fwd+bwd":
        # the output gradients are drawn once, outside the timing: drawing them in every step
        # timed torch.randn_like too (~20 ms a step for layer_norm's two outputs on the CPU,
        # more than the op's own forward and backward, pulling every ratio towards 1)
        _, grads = _grad_targets(impl(*inputs))

        def step():
            outs = [t for t in _tensors(impl(*inputs)) if t.requires_grad]
            torch.autograd.backward(outs, grads)
        return time_ms(step, device, quick, grad_to_none=leaves)
    if mode == "bwd":
        out = impl(*inputs)
        outs, grads = _grad_targets(out)
        if not outs:
            raise RuntimeError("no differentiable output")
        return time_ms(lambda: torch.autograd.backward(outs, grads, retain_graph=True),
                       device, quick, grad_to_none=leaves)
    raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")


# ----------------------------------------------------------------------------------------------
# running and reporting
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    op: str
    mode: str
    shape: str
    dtype: str
    backend: str
    ms: float
    gbps: float | None
    tflops: float | None
    device: str = ""  # device_name() of the machine that measured it (for % of peak)


def run_cases(cases: Sequence[Case], device: str, quick: bool, modes: Sequence[str] = MODES,
              backends: Sequence[str] | None = None, progress: bool = True) -> list[Row]:
    rows: list[Row] = []
    label = device_name(device)
    work = [(c, m, name) for c in cases for m in c.modes if m in modes
            for name in c.impls if backends is None or name in backends or name == BASELINE]
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(work), desc="bench", leave=False)
        except ImportError:
            pass
    for case, mode, name in work:
        dt = str(case.dtype).replace("torch.", "")
        try:
            ms = measure(case, case.impls[name], mode, device, quick)
        except Exception as e:  # one failing implementation must not stop the others
            case.skipped[f"{name}/{mode}"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            ms = None
        if ms is not None:
            b, f = case.bytes.get(mode), case.flops.get(mode)
            rows.append(Row(case.op, mode, case.shape, dt, name, ms,
                            b / ms / 1e6 if b else None, f / ms / 1e9 if f else None, label))
        if bar:
            bar.update()
    if bar:
        bar.close()
    return rows


def append_csv(rows: Sequence[Row], device: str, path: str | None = None) -> str:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    dev = device_name(device)
    path = path or os.path.join(RESULTS_DIR, f"{dev}.csv")
    new = not os.path.exists(path)
    meta = {"device": dev, "torch": torch.__version__, "triton": _triton_version(),
            "commit": commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new:
            w.writeheader()
        for r in rows:
            d = dataclasses.asdict(r)
            d["ms"] = f"{r.ms:.5f}"
            d["gbps"] = f"{r.gbps:.1f}" if r.gbps is not None else ""
            d["tflops"] = f"{r.tflops:.2f}" if r.tflops is not None else ""
            w.writerow({**d, **meta})
    return path


def read_csv(path: str) -> list[Row]:
    """The newest row of each (op, mode, shape, dtype, backend) in a results CSV."""
    newest: dict[tuple, dict] = {}
    with open(path) as f:
        for r in csv.DictReader(f):
            key = (r["op"], r["mode"], r["shape"], r["dtype"], r["backend"])
            if key not in newest or r["date"] >= newest[key]["date"]:
                newest[key] = r
    num = lambda v: float(v) if v else None  # noqa: E731
    return [Row(r["op"], r["mode"], r["shape"], r["dtype"], r["backend"], float(r["ms"]),
                num(r["gbps"]), num(r["tflops"]), r["device"]) for r in newest.values()]


def format_compact(rows: Sequence[Row]) -> str:
    """A narrow table (for logs with little room): op, shape, mode, backend, ms, ratios."""
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((r.op, r.shape, r.dtype, r.mode), []).append(r)
    out = [f"{'op':<15} {'shape':<34} {'mode':<7} {'backend':<14} {'ms':>9} "
           f"{'xEager':>7} {'xSDPA':>6} {'%peak':>6}"]
    for (op, shape, _, mode), rs in groups.items():
        base = next((r.ms for r in rs if r.backend == BASELINE), None)
        sdpa = min((r.ms for r in rs if r.backend.startswith(SDPA_PREFIX)), default=None)
        for r in rs:
            e = f"{base / r.ms:6.2f}x" if base else "      -"
            v = f"{sdpa / r.ms:5.2f}x" if sdpa else "     -"
            bw, tf = percent_of_peak(r)  # of bandwidth where bytes are known, else of TFLOP/s
            pk = bw if bw is not None else tf
            p = f"{pk:5.1f}%" if pk is not None else "     -"
            out.append(f"{op[:15]:<15} {shape[:34]:<34} {mode:<7} {r.backend[:14]:<14} "
                       f"{r.ms:9.4f} {e} {v} {p}")
    return "\n".join(out)


def format_table(rows: Sequence[Row], cases: Sequence[Case] = ()) -> str:
    """Per (op, shape, dtype, mode): each backend's ms, GB/s or TFLOP/s (and their % of the
    device's peak where it is known, :data:`PEAKS`), and speedup vs eager."""
    out = []
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((r.op, r.shape, r.dtype, r.mode), []).append(r)
    # a second ratio, against the fastest torch SDPA backend, where SDPA peers were timed
    with_sdpa = any(r.backend.startswith(SDPA_PREFIX) for r in rows)
    with_peak = any(peaks_for(r.device) for r in rows)
    header = f"{'op':<16} {'shape':<30} {'dtype':<8} {'mode':<8} {'backend':<14} " \
             f"{'ms':>9} {'GB/s':>8} {'TFLOP/s':>8}" + \
             (f" {'%BW':>6} {'%TFLOP':>6}" if with_peak else "") + f" {'vs eager':>9}" + \
             (f" {'vs SDPA':>8}" if with_sdpa else "")
    out.append(header)
    out.append("-" * len(header))
    for (op, shape, dtype, mode), rs in groups.items():
        base = next((r.ms for r in rs if r.backend == BASELINE), None)
        sdpa = min((r.ms for r in rs if r.backend.startswith(SDPA_PREFIX)), default=None)
        for r in rs:
            ratio = f"{base / r.ms:8.2f}x" if base else "        -"
            gb = f"{r.gbps:8.1f}" if r.gbps is not None else "       -"
            tf = f"{r.tflops:8.2f}" if r.tflops is not None else "       -"
            vs = (f" {sdpa / r.ms:7.2f}x" if sdpa else "        -") if with_sdpa else ""
            pk = ""
            if with_peak:
                bw_pct, tf_pct = percent_of_peak(r)
                pk = "".join(f" {v:5.1f}%" if v is not None else "      -"
                             for v in (bw_pct, tf_pct))
            out.append(f"{op:<16} {shape:<30} {dtype:<8} {mode:<8} {r.backend:<14} "
                       f"{r.ms:9.4f} {gb} {tf}{pk} {ratio}{vs}")
    notes = [(c.op, c.shape, k, v) for c in cases for k, v in c.skipped.items()]
    if notes:
        out.append("")
        out.append("not timed:")
        seen = set()
        for op, shape, k, v in notes:
            if (op, k, v) in seen:
                continue
            seen.add((op, k, v))
            out.append(f"  {op} {k}: {v}")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# helpers for op modules
# ----------------------------------------------------------------------------------------------
def xray_backend_impls(op: str, fn: Callable, sample: tuple, *, skip=("torch",)) -> tuple[dict, dict]:
    """Implementations running ``fn`` (the public xray_ops call) under each backend that can take
    ``sample`` (canonical args of the op's dispatch), and the reasons for those that cannot."""
    import xray_ops as xo
    from xray_ops import _dispatch

    impls, skipped = {}, {}
    for name, reasons in _dispatch.reasons_for(op, sample).items():
        if name in skip:
            continue
        if reasons:
            skipped[name] = "; ".join(reasons)
            continue

        def run(*inputs, _name=name):
            with xo.backend(_name):
                return fn(*inputs)

        impls[name] = run
    return impls, skipped


def compiled(fn: Callable) -> Callable:
    """torch.compile of the eager reference (the PyTorch-compiler baseline)."""
    return torch.compile(fn, dynamic=False)
