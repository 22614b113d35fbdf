"""End to end: whole models as they are against the same models patched by xray_ops.patch.

``python -m bench e2e [--quick] [--models a,b] [--backends variant,...] [--modes infer,train]
[--rounds N]``

Models (random init, nothing downloaded): timm vit_small / vit_base / vit_large_patch16_224,
the reference model's configs (``reference_model.create_vit``; skipped with the reason while it
is not importable), and an open_clip ViT-B-32 (its image tower for inference; the whole CLIP
with open_clip's ClipLoss for training).

Rows (variants) per model, each with inference and training-step samples/s:
  eager            the model as it is
  compile          torch.compile of it (inductor)
  xray-attn        patched: flash attention only
  xray-tome8       + ToMe r=8;  xray-tome<R>: ToMe's own r for the model (R = 13 for ViT-S/B,
                   8 for ViT-L, as ToMe's off-the-shelf results use)
  xray-evit        + EViT keep 0.7 at blocks depth/4, depth/2, 3 depth/4 (3, 6, 9 for 12)
  xray-int8        + int8 (quantize_, head in float; inference only)
  xray-tome8-evit-int8   all three (inference only)
  tome-r8, tome-r<R>     ToMe's own patch (facebookresearch/ToMe) as a peer, where it applies
                   (timm models; it needs ``import tome`` to be ToMe's repository)
Beside each: output agreement (cosine of the output to the eager model's, on the same batch:
mean and min over samples) and peak memory (GPU: max_memory_allocated; CPU: parameter and buffer
bytes plus the peak of tensor allocations during one call, from the profiler's memory events).

Timing: every variant of a model is timed in turn, ``rounds`` times over (interleaved, so the
load of a shared machine hits all of them alike); the speedup is the median over rounds of each
round's ratio to eager. A training step is forward + loss + backward + SGD step (lr 0, so the
weights, shared by the variants to save memory, do not move). GPU: bf16 (inference: bf16
weights; training: fp32 weights under bf16 autocast). CPU: fp32 on torch.get_num_threads()
threads.

Rows go to bench/results/e2e_<device>.csv (its own columns); ``python -m bench e2e_report``
draws the plots and regenerates the README table from it.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import datetime
import importlib.util
import os
import statistics
import sys
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

import xray_ops as xo

from .. import harness

COLUMNS = ["model", "variant", "mode", "batch", "dtype", "ms", "samples_per_s", "speedup",
           "cosine", "cosine_min", "peak_mb", "note", "device", "torch", "commit", "date"]
MODES = ("infer", "train")
BASELINE = "eager"
INFER_ONLY = ("xray-int8", "xray-tome8-evit-int8")


def csv_path(device: str) -> str:
    return os.path.join(harness.RESULTS_DIR, f"e2e_{harness.device_name(device)}.csv")


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ModelSpec:
    """One model of the table: how to build it and feed it.

    family: "timm" | "open_clip" | "reference". tome_r: ToMe's own r for it (None: none).
    batch: samples per call {"infer": B, "train": B}. skip: why it is not measured ("" = run).
    """

    key: str
    family: str
    make: Callable[[], nn.Module]
    depth: int
    tome_r: Optional[int]
    batch: dict
    skip: str = ""
    img_size: int = 224


def _timm_spec(name: str, depth: int, tome_r: int, batch: dict) -> ModelSpec:
    def make():
        import timm

        return timm.create_model(name, pretrained=False)

    return ModelSpec(name, "timm", make, depth, tome_r, batch)


def _open_clip_spec(batch: dict) -> ModelSpec:
    if importlib.util.find_spec("open_clip") is None:
        return ModelSpec("open_clip_ViT-B-32", "open_clip", lambda: None, 12, None, batch,
                         skip="open_clip is not installed")

    def make():
        import open_clip

        return open_clip.create_model("ViT-B-32", pretrained=None)

    return ModelSpec("open_clip_ViT-B-32", "open_clip", make, 12, None, batch)


def _reference_specs(batch: dict) -> list[ModelSpec]:
    configs = (("s16", 12, 13), ("b16", 12, 13), ("l16", 24, 8))
    try:
        from reference_model import create_vit  # noqa: F401
        why = ""
    except ImportError as e:
        why = (f"reference_model is not importable ({e}); its rows run once branch "
               f"rm-reference-model is merged")
    out = []
    for cfg, depth, r in configs:
        def make(cfg=cfg):
            from reference_model import create_vit

            return create_vit(cfg, ops="torch", num_classes=1000)

        out.append(ModelSpec(f"reference_{cfg}", "reference", make, depth, r, batch, skip=why))
    return out


def model_specs(device: str, quick: bool) -> list[ModelSpec]:
    gpu = device == "cuda"
    s = {"infer": 256 if gpu else 8, "train": 128 if gpu else 8}
    b = {"infer": 256 if gpu else 4, "train": 128 if gpu else 4}
    large = {"infer": 128 if gpu else 2, "train": 64 if gpu else 2}
    specs = [_timm_spec("vit_small_patch16_224", 12, 13, s),
             _timm_spec("vit_base_patch16_224", 12, 13, b),
             _timm_spec("vit_large_patch16_224", 24, 8, large)]
    specs += _reference_specs(b)
    specs.append(_open_clip_spec({"infer": 256 if gpu else 8, "train": 128 if gpu else 8}))
    if quick:  # the models the goals are stated for
        keep = {"vit_large_patch16_224"} if gpu else {"vit_small_patch16_224"}
        specs = [m for m in specs if m.key in keep]
    return specs


# ----------------------------------------------------------------------------------------------
# variants
# ----------------------------------------------------------------------------------------------
def _evit_config(depth: int) -> xo.EViTConfig:
    return xo.EViTConfig(keep_rate=0.7,
                         locations=sorted({depth // 4, depth // 2, 3 * depth // 4}))


def _shared_copy(model: nn.Module) -> nn.Module:
    """A copy with its own modules but the same parameter and buffer tensors (so ten variants
    of ViT-L cost one set of weights)."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def _upstream_tome():
    try:
        import tome
        import tome.patch
    except ImportError:
        return None, ("ToMe's repository is not importable (put a checkout on PYTHONPATH; the "
                      "PyPI 'tome' is unrelated)")
    if not hasattr(tome.patch, "timm"):
        return None, f"the importable 'tome' ({tome.__file__}) is not ToMe's repository"
    return tome, ""


def variant_names(spec: ModelSpec) -> list[str]:
    names = ["eager", "compile", "xray-attn", "xray-tome8"]
    if spec.tome_r and spec.tome_r != 8:
        names.append(f"xray-tome{spec.tome_r}")
    names += ["xray-evit", "xray-int8", "xray-tome8-evit-int8", "tome-r8"]
    if spec.tome_r and spec.tome_r != 8:
        names.append(f"tome-r{spec.tome_r}")
    return names


def build_variant(spec: ModelSpec, name: str, base: nn.Module, device: str):
    """(model or None, why not). ``base`` is the eager model (never modified)."""
    if name == "eager":
        return base, ""
    if name == "compile":
        return torch.compile(_shared_copy(base)), ""
    if name.startswith("tome-r"):
        if spec.family != "timm":
            return None, ("ToMe's own patch covers timm models (its clip patch targets OpenAI's "
                          "clip package)")
        tome, why = _upstream_tome()
        if tome is None:
            return None, why
        m = _shared_copy(base)
        tome.patch.timm(m)
        m.r = int(name.removeprefix("tome-r"))
        return m, ""
    tome_r = None
    if name.startswith("xray-tome"):
        tome_r = int(name.removeprefix("xray-tome").split("-")[0])
    kw = {"tome": xo.ToMeConfig(r=tome_r) if tome_r else None,
          "evit": _evit_config(spec.depth) if "evit" in name else None,
          "int8": "int8" in name}
    if spec.family == "reference":
        return _reference_variant(spec, base, **kw), ""
    # int8 replaces layers and freezes the float parameters: give it its own weights
    m = copy.deepcopy(base) if kw["int8"] else _shared_copy(base)
    patch = xo.patch.timm if spec.family == "timm" else xo.patch.open_clip
    return patch(m, **kw), ""


def _reference_variant(spec, base, tome, evit, int8):
    from reference_model import create_vit

    cfg = spec.key.removeprefix("reference_")
    m = create_vit(cfg, ops="xray", num_classes=1000, tome=tome, evit=evit)
    m.load_state_dict(base.state_dict())
    m.to(device=next(base.parameters()).device, dtype=next(base.parameters()).dtype)
    if int8:
        xo.quantize_(m, filter_fn=lambda mod, n: n != "head")
    return m.train(base.training)


# ----------------------------------------------------------------------------------------------
# inputs, calls, agreement, memory
# ----------------------------------------------------------------------------------------------
def make_inputs(spec: ModelSpec, B: int, device: str, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, spec.img_size, spec.img_size, generator=g).to(device=device,
                                                                           dtype=dtype)
    if spec.family == "open_clip":
        import open_clip

        words = ["a photo of a dog", "a diagram of a cell", "two cats", "a red car"]
        text = open_clip.get_tokenizer("ViT-B-32")([words[i % 4] for i in range(B)])
        return images, text.to(device)
    return images, torch.randint(0, 1000, (B,), generator=g).to(device)


def infer_fn(spec: ModelSpec, model: nn.Module) -> Callable:
    if spec.family == "open_clip":
        return lambda images, _: model.encode_image(images)
    return lambda images, _: model(images)


def _loss(spec, model, images, other):
    if spec.family == "open_clip":
        from open_clip.loss import ClipLoss

        img, txt, scale = model(images, other)[:3]
        return ClipLoss()(img.float(), txt.float(), scale.float())
    return F.cross_entropy(model(images).float(), other)


def train_fn(spec: ModelSpec, model: nn.Module, device: str) -> Callable:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)  # a real step that leaves the shared weights as is
    autocast = device == "cuda"

    def step(images, other):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss = _loss(spec, model, images, other)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def agreement(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    cos = F.cosine_similarity(out.detach().float().flatten(1), ref.detach().float().flatten(1))
    return float(cos.mean()), float(cos.min())


def _weights_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def peak_memory_mb(fn: Callable, model: nn.Module, device: str) -> float:
    """Peak memory of one call of fn() in MiB (see the module doc for what each device counts)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return (_weights_bytes(model) + peak) / 2**20


# ----------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    model: str
    variant: str
    mode: str
    batch: int
    dtype: str
    ms: Optional[float] = None
    samples_per_s: Optional[float] = None
    speedup: Optional[float] = None
    cosine: Optional[float] = None
    cosine_min: Optional[float] = None
    peak_mb: Optional[float] = None
    note: str = ""


def _short(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160]}" if str(e) else type(e).__name__


def _prepare(spec, name, base, device, mode):
    """The model of one variant in one mode, or the reason it does not run."""
    if mode == "train" and name in INFER_ONLY:
        return None, "int8 is inference only"
    try:
        m, why = build_variant(spec, name, base, device)
    except Exception as e:  # a variant that cannot be built is reported, not fatal
        return None, _short(e)
    return m, why


def run_model(spec: ModelSpec, device: str, dtype: torch.dtype, quick: bool, rounds: int,
              only: Optional[list[str]] = None, progress=print,
              sink: Optional[Callable[[list[Row]], None]] = None,
              modes: tuple = MODES) -> list[Row]:
    """Every variant of one model, inference then training (or the ``modes`` given); ``sink``
    gets each mode's rows as soon as they are measured (so a run cut short keeps them)."""
    dt = str(dtype).replace("torch.", "")
    names = [n for n in variant_names(spec) if only is None or n in only or n == BASELINE]
    if quick and device == "cuda":  # the GPU goals' rows (compiling ViT-L takes minutes)
        names = [n for n in names if n in ("eager", "xray-attn", "xray-tome8-evit-int8",
                                           "xray-tome8", "xray-evit", "xray-int8")]
    rows: list[Row] = []
    for mode in [m for m in MODES if m in modes]:
        if spec.skip:
            mode_rows = [Row(spec.key, n, mode, spec.batch[mode], dt, note=spec.skip)
                         for n in names]
        else:
            torch.manual_seed(0)
            mode_rows = _measure_mode(spec, names, mode, device, dtype, quick, rounds, progress)
        # the forward is the same in both modes: training rows show the inference agreement
        infer = {r.variant: r for r in rows if r.mode == "infer"}
        for r in mode_rows:
            if r.mode == "train" and r.variant in infer:
                r.cosine, r.cosine_min = infer[r.variant].cosine, infer[r.variant].cosine_min
        rows += mode_rows
        if sink is not None:
            sink(mode_rows)
    return rows


def _callable(spec, m, mode, device, images, other):
    if mode == "infer":
        call = infer_fn(spec, m)

        def fn():
            with torch.inference_mode():
                return call(images, other)

        return fn
    step = train_fn(spec, m, device)
    return lambda: step(images, other)


def _measure_mode(spec, names, mode, device, dtype, quick, rounds, progress) -> list[Row]:
    dt = str(dtype).replace("torch.", "")
    B = spec.batch[mode]
    base = spec.make().to(device)
    base = base.to(dtype).eval().requires_grad_(False) if mode == "infer" else base.train()
    images, other = make_inputs(spec, B, device, dtype if mode == "infer" else torch.float32)
    # agreement on a separate batch, measured in inference
    ref_images, ref_other = make_inputs(spec, min(B, 8), device, dtype, seed=1)
    ref_out = None
    if mode == "infer":
        with torch.no_grad():
            ref_out = infer_fn(spec, base)(ref_images, ref_other).float()
    fns, rows = {}, {}
    for name in names:
        row = rows[name] = Row(spec.key, name, mode, B, dt)
        m, why = _prepare(spec, name, base, device, mode)
        if m is None:
            row.note = why
            continue
        try:
            if ref_out is not None:
                with torch.no_grad():
                    out = infer_fn(spec, m)(ref_images, ref_other)
                row.cosine, row.cosine_min = agreement(out, ref_out)
            fn = _callable(spec, m, mode, device, images, other)
            fn()  # warm up (compiles, autotunes, JITs)
            fns[name] = (m, fn)
        except Exception as e:  # one failing variant must not stop the others
            row.note = _short(e)
    times: dict[str, list[float]] = {n: [] for n in fns}
    for rnd in range(rounds):  # interleaved: a load spike hits every variant of the round
        for name, (_, fn) in fns.items():
            try:
                times[name].append(harness.time_ms(fn, device, quick))
            except Exception as e:
                rows[name].note = _short(e)
        progress(f"  {spec.key} {mode} round {rnd + 1}/{rounds}: " + ", ".join(
            f"{n} {v[-1]:.1f} ms" for n, v in times.items() if v))
    base_ms = times.get(BASELINE, [])
    for name, ts in times.items():
        row = rows[name]
        if not ts:
            continue
        row.ms = statistics.median(ts)
        row.samples_per_s = B / row.ms * 1e3
        if len(base_ms) == len(ts):
            row.speedup = statistics.median(b / t for b, t in zip(base_ms, ts))
        try:
            row.peak_mb = peak_memory_mb(fns[name][1], fns[name][0], device)
        except Exception as e:
            row.note = (row.note + "; " if row.note else "") + f"memory: {_short(e)}"
    return list(rows.values())


def append_csv(rows: list[Row], device: str, path: Optional[str] = None) -> str:
    path = path or csv_path(device)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    new = not os.path.exists(path)
    meta = {"device": harness.device_name(device), "torch": torch.__version__,
            "commit": harness.commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    fmt = {"ms": "{:.3f}", "samples_per_s": "{:.3f}", "speedup": "{:.3f}", "cosine": "{:.5f}",
           "cosine_min": "{:.5f}", "peak_mb": "{:.0f}"}
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        for r in rows:
            d = dataclasses.asdict(r)
            for k, spec in fmt.items():
                d[k] = spec.format(d[k]) if d[k] is not None else ""
            w.writerow({**d, **meta})
    return path


def format_rows(rows: list[Row]) -> str:
    head = (f"{'model':<24} {'variant':<22} {'mode':<5} {'B':>4} {'ms':>10} {'samples/s':>10} "
            f"{'x eager':>8} {'cosine':>8} {'min':>8} {'peak MB':>8}  note")
    out = [head, "-" * len(head)]

    def f(v, spec):
        return spec.format(v) if v is not None else "-"

    for r in rows:
        out.append(f"{r.model[:24]:<24} {r.variant:<22} {r.mode:<5} {r.batch:>4} "
                   f"{f(r.ms, '{:10.1f}'):>10} {f(r.samples_per_s, '{:10.2f}'):>10} "
                   f"{f(r.speedup, '{:7.2f}x'):>8} {f(r.cosine, '{:8.4f}'):>8} "
                   f"{f(r.cosine_min, '{:8.4f}'):>8} {f(r.peak_mb, '{:8.0f}'):>8}  {r.note}")
    return "\n".join(out)


def goal_lines(rows: list[Row], device: str) -> list[str]:
    """The issue's goals, checked on these rows (measured, not asserted)."""
    by = {(r.model, r.variant, r.mode): r for r in rows}

    def speed(model, variant, mode="infer"):
        r = by.get((model, variant, mode))
        return r.speedup if r is not None else None

    def line(what, value, target, ok):
        if value is None:
            return f"  {what}: not measured"
        return f"  {what}: {value:.2f}x (goal {target}) {'MET' if ok(value) else 'NOT MET'}"

    out = []
    if device == "cpu":
        s = "vit_small_patch16_224"
        out.append(line("ViT-S ToMe r=13 inference vs eager", speed(s, "xray-tome13"), ">= 1.5x",
                        lambda v: v >= 1.5))
        ours, theirs = speed(s, "xray-tome13"), speed(s, "tome-r13")
        if ours is not None and theirs is not None:
            out.append(f"  ViT-S ToMe r=13, ours vs ToMe's own patch: {ours:.2f}x vs "
                       f"{theirs:.2f}x {'MET' if ours > theirs else 'NOT MET'}")
        out.append(line("ViT-S attention-only inference vs eager", speed(s, "xray-attn"),
                        ">= 1.0x", lambda v: v >= 1.0))
    else:
        L = "vit_large_patch16_224"
        out.append(line("ViT-L attention-only training step vs eager",
                        speed(L, "xray-attn", "train"), ">= 1.15x", lambda v: v >= 1.15))
        for m in sorted({r.model for r in rows}):
            v = speed(m, "xray-tome8-evit-int8")
            if v is not None:
                out.append(line(f"{m} ToMe r=8 + EViT + int8 inference vs eager bf16", v,
                                ">= 2.5x", lambda v: v >= 2.5))
    return out


def run(device: str, dtype: torch.dtype, quick: bool, *, models: Optional[list[str]] = None,
        only: Optional[list[str]] = None, rounds: Optional[int] = None,
        modes: Optional[list[str]] = None, write_csv: bool = True,
        csv_file: Optional[str] = None) -> list[Row]:
    """Measure every model spec (or those named), print the table and the goals, append CSV."""
    if device == "cpu":
        torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    rounds = rounds or (1 if device == "cuda" else (2 if quick else 3))
    specs = model_specs(device, quick and not models)
    if models:
        unknown = set(models) - {s.key for s in specs}
        if unknown:
            raise ValueError(f"--models: expected some of {[s.key for s in specs]}, got "
                             f"{sorted(unknown)}")
        specs = [s for s in specs if s.key in models]
    rows: list[Row] = []
    for spec in specs:
        print(f"{spec.key}: {'skipped: ' + spec.skip if spec.skip else 'measuring'}",
              file=sys.stderr)
        sink = (lambda mode_rows: append_csv(mode_rows, device, csv_file)) if write_csv else None
        rows += run_model(spec, device, dtype, quick, rounds, only,
                          progress=lambda s: print(s, file=sys.stderr), sink=sink,
                          modes=tuple(modes or MODES))
    threads = "" if device == "cuda" else f", {torch.get_num_threads()} threads"
    print(f"device: {harness.device_name(device)}{threads}  torch {torch.__version__}  "
          f"commit {harness.commit()}  rounds {rounds}")
    print(format_rows(rows))
    print("goals:")
    print("\n".join(goal_lines(rows, device)))
    if write_csv:
        print(f"appended to {csv_file or csv_path(device)}", file=sys.stderr)
    return rows

