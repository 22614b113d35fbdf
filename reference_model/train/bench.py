"""Training and inference throughput of a reference-model config, ops=xray against ops=torch.

    python -m reference_model.train.bench --config l16 --device cuda --budget 80   (the GPU check)
    python -m reference_model.train.bench --config tiny --device cpu --img-size 32 --batch 64
    python -m reference_model.train.bench --config tiny --device cpu --img-size 32 --quick

Training: steps of the hashtag stage model (the ViT + a linear head over ``--tags`` tags, BCE)
with Lion, bf16 autocast on the GPU, in these modes, one after another:
``xray`` (the fast ops, eager), ``torch`` (plain PyTorch, eager), ``torch_compile`` and
``xray_compile`` (torch.compile of each; the compile happens in the warm-up steps, not timed).
Inference: pooled ViT features under inference_mode: ``torch`` and ``xray`` float, ``xray_tome``
(ToMe r=``--tome-r``), ``xray_int8`` (xray_ops.quantize_) and ``xray_tome_int8``.
Each result is printed, appended to ``--csv`` at once (so a timeout keeps what finished), and
the table at the end gives samples/s and the ratio to ``torch`` eager. ``--budget`` seconds:
modes that would start after it are skipped (and said so).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import os
import statistics
import subprocess
import sys
import time

import torch

TRAIN_MODES = ("torch", "xray", "torch_compile", "xray_compile")  # torch first: the baseline
INFER_MODES = ("torch", "xray", "xray_tome", "xray_int8", "xray_tome_int8")
COLUMNS = ("time", "commit", "device", "config", "what", "mode", "batch", "img_size",
           "dtype", "steps", "round", "samples_per_s", "vs_torch", "seconds", "note")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def build_vit(config: str, ops: str, device, img_size: int, **kw):
    from reference_model import create_vit

    with torch.device(device):  # initialise on the device: an l16 on the CPU takes seconds
        return create_vit(config, ops=ops, img_size=img_size, **kw)


def train_rate(config, ops, compile_, device, batch, img_size, steps, tags, bf16) -> float:
    """Samples/s of ``steps`` timed hashtag-stage training steps (after 2 warm-up steps)."""
    from reference_model import HashtagModel
    from reference_model.train.optim import build_optimizer

    torch.manual_seed(0)
    vit = build_vit(config, ops, device, img_size)
    model = HashtagModel(vit, tags).to(device)
    opt = build_optimizer(model, "lion", 1e-5, 0.1)
    call = torch.compile(model) if compile_ else model
    x = torch.rand(batch, 3, img_size, img_size, device=device)
    y = (torch.rand(batch, tags, device=device) < 0.01).float()
    ac = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def step():
        with ac:
            loss = model.loss(call(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for _ in range(2):
        step()
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    rate = batch * steps / (time.perf_counter() - t)
    del model, vit, opt, call
    _free(device)
    return rate


def infer_rate(config, mode, device, batch, img_size, steps, bf16, tome_r) -> float:
    import xray_ops as xo

    torch.manual_seed(0)
    ops = "torch" if mode == "torch" else "xray"
    vit = build_vit(config, ops, device, img_size).eval()
    if "tome" in mode:
        vit.set_token_reduction(tome=xo.ToMeConfig(r=tome_r))
    if "int8" in mode:
        xo.quantize_(vit)
    x = torch.rand(batch, 3, img_size, img_size, device=device)
    ac = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and "int8" not in mode)

    def run():
        with torch.inference_mode(), ac:
            vit.forward_head(vit.forward_features(x), pre_logits=True)
    for _ in range(2):
        run()
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        run()
    _sync(device)
    rate = batch * steps / (time.perf_counter() - t)
    del vit
    _free(device)
    return rate


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m reference_model.train.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="l16")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch", type=int, default=None, help="default: 64 on cuda, 32 on cpu")
    p.add_argument("--infer-batch", type=int, default=None, help="default: 2 x --batch")
    p.add_argument("--img-size", type=int, default=None, help="default: the config's")
    p.add_argument("--steps", type=int, default=None, help="timed steps per mode (default 5)")
    p.add_argument("--tags", type=int, default=1000)
    p.add_argument("--tome-r", type=int, default=8)
    p.add_argument("--train-modes", default=",".join(TRAIN_MODES))
    p.add_argument("--infer-modes", default=",".join(INFER_MODES))
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--budget", type=float, default=None, help="seconds; later modes are skipped")
    p.add_argument("--csv", default=None, help="append rows here (default: none)")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat the modes in alternating rounds (each ratio against the same "
                        "round's torch row); the final table gives the medians")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 2 timed steps, batch 8 (unless --steps / --batch say)")
    a = p.parse_args(argv)
    for flag in ("steps", "batch", "infer_batch", "rounds"):
        if getattr(a, flag) is not None and getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')}: expected an int >= 1, got {getattr(a, flag)}")
    # explicit --steps / --batch win over the smoke sizes
    a.steps = a.steps or (2 if a.quick else 5)
    if a.quick:
        a.batch = a.batch or 8

    from reference_model import get_config
    from reference_model.train.dist import resolve_device
    from reference_model.train.runner import device_name

    device = resolve_device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    cuda = device.type == "cuda"
    bf16 = cuda
    batch = a.batch or (64 if cuda else 32)
    img = a.img_size or get_config(a.config).img_size
    t0 = time.perf_counter()
    dev_name = device_name(device)
    commit = _commit()
    rows = []

    def record(what, mode, rate, note="", rnd=0):
        row = {"time": datetime.datetime.now().isoformat(timespec="seconds"), "commit": commit,
               "device": dev_name, "config": a.config, "what": what, "mode": mode,
               "batch": batch if what == "train" else (a.infer_batch or 2 * batch),
               "img_size": img, "dtype": "bf16" if bf16 else "fp32", "steps": a.steps,
               "round": rnd, "samples_per_s": round(rate, 2) if rate else "", "vs_torch": "",
               "seconds": round(time.perf_counter() - t0, 1), "note": note}
        base = [r for r in rows if r["what"] == what and r["mode"] == "torch"
                and r["round"] == rnd and r["samples_per_s"]]
        if base and rate:
            row["vs_torch"] = round(rate / base[-1]["samples_per_s"], 3)
        rows.append(row)
        print(f"{what:6s} {mode:15s} {row['samples_per_s']!s:>10} samples/s "
              f"{('x' + str(row['vs_torch'])) if row['vs_torch'] else ''} {note}", flush=True)
        if a.csv:
            new = not os.path.exists(a.csv)
            with open(a.csv, "a", newline="") as f:
                w = csv.DictWriter(f, COLUMNS)
                if new:
                    w.writeheader()
                w.writerow(row)

    def over_budget():
        return a.budget is not None and time.perf_counter() - t0 > a.budget

    print(f"{a.config} on {dev_name}, batch {batch}, {img}px, "
          f"{'bf16 autocast' if bf16 else 'fp32'}, {torch.get_num_threads()} threads", flush=True)
    plan = [("train", m) for m in a.train_modes.split(",") if m and "compile" not in m]
    plan += [("infer", m) for m in a.infer_modes.split(",") if m]
    plan += [("train", m) for m in a.train_modes.split(",") if m and "compile" in m]  # last
    for rnd in range(a.rounds):  # alternating rounds: shared-machine load hits both sides
        for what, mode in plan:
            if over_budget():
                record(what, mode, None, "skipped: over --budget", rnd)
                continue
            try:
                if what == "train":
                    ops = "torch" if mode.startswith("torch") else "xray"
                    rate = train_rate(a.config, ops, "compile" in mode, device, batch, img,
                                      a.steps, a.tags, bf16)
                else:
                    rate = infer_rate(a.config, mode, device, a.infer_batch or 2 * batch, img,
                                      a.steps, bf16, a.tome_r)
                record(what, mode, rate, rnd=rnd)
            except Exception as e:  # one mode failing must not lose the others' figures
                record(what, mode, None,
                       f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}", rnd)
                _free(device)
    print(f"\n{'':6s} {'mode':15s} {'samples/s':>10} {'vs torch eager':>15}"
          + (f"   (medians of {a.rounds} rounds)" if a.rounds > 1 else ""))
    for what, mode in plan:
        mine = [r for r in rows if r["what"] == what and r["mode"] == mode]
        rates = [r["samples_per_s"] for r in mine if r["samples_per_s"]]
        ratios = [r["vs_torch"] for r in mine if r["vs_torch"] != ""]
        notes = sorted({r["note"] for r in mine if r["note"]})
        print(f"{what:6s} {mode:15s} {round(statistics.median(rates), 2) if rates else '':>10} "
              f"{round(statistics.median(ratios), 3) if ratios else '':>15} {'; '.join(notes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
