"""``make demo``: the reference model's main job, end to end, on this machine.

1. data: the Debian packages openclipart-svg and dataset-fashion-mnist (installed with apt-get
   when missing and possible, else synthetic data only, with a note);
2. trains the tiny config MAE → hashtag → CLIP with ``--ops xray`` on openclipart + synthetic
   images and synthetic video (reference_model.train);
3. evaluates it (zero-shot, retrieval, video, hashtags, robustness), then again int8-quantized,
   with ToMe and with EViT at inference, and through int8 / PCA-reduced retrieval embeddings
   (reference_model.eval.evaluate);
4. measures training and inference samples/s with ``--ops xray`` against ``--ops torch``,
   side by side in this process;
5. prints one table and writes OUT/summary.json, with the training / speed plots beside it.

    python -m reference_model.demo [--out runs/demo] [--device auto] [--quick]

``--quick`` is a smoke run (a few steps, small images, small eval sets) with the same outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import torch

PACKAGES = {"openclipart-svg": "openclipart", "dataset-fashion-mnist": "fashion-mnist"}
EVAL_KEYS = ("zero_shot_top1", "zero_shot_chance", "i2t_r1", "t2i_r1", "retrieval_chance_r1",
             "video_top1", "video_chance", "hashtag_map")
EXTRA_EVAL_KEYS = ("hashtag_map_chance", "i2t_r5", "t2i_r5", "video_probe_top1",
                   "fmnist_top1", "fmnist_chance")


def log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# 1. data packages
# ----------------------------------------------------------------------------------------------
def _installed(dataset: str) -> bool:
    from reference_model.data import packages

    try:
        (packages.openclipart_dir if dataset == "openclipart" else packages.fashion_mnist_dir)()
        return True
    except packages.MissingPackage:
        return False


def ensure_data_packages(timeout: int = 120) -> tuple[dict, list[str]]:
    """{dataset: available} after trying ``apt-get install`` (as root, non-interactive, with a
    timeout) for the missing ones; plus notes saying what happened."""
    notes = []
    missing = [pkg for pkg, ds in PACKAGES.items() if not _installed(ds)]
    if missing:
        apt = shutil.which("apt-get")
        if apt and hasattr(os, "geteuid") and os.geteuid() == 0:
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            cmd = [apt, "install", "-y", "-q", "--no-install-recommends", *missing]
            for attempt in ("install", "update + install"):
                try:
                    if attempt != "install":
                        subprocess.run([apt, "update", "-q"], env=env, timeout=timeout,
                                       capture_output=True)
                    r = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True,
                                       text=True)
                    if r.returncode == 0:
                        notes.append(f"installed {' '.join(missing)} with apt-get")
                        break
                except (subprocess.TimeoutExpired, OSError) as e:
                    notes.append(f"apt-get {attempt} failed: {type(e).__name__}")
            else:
                notes.append(f"could not install {' '.join(missing)} with apt-get")
        else:
            notes.append(f"{' '.join(missing)} not installed and apt-get not usable here "
                         f"(needs root): `sudo apt-get install {' '.join(missing)}`")
    have = {ds: _installed(ds) for ds in PACKAGES.values()}
    for pkg, ds in PACKAGES.items():
        if not have[ds]:
            notes.append(f"{ds}: package {pkg} missing; using synthetic data instead")
    return have, notes


# ----------------------------------------------------------------------------------------------
# 2. training
# ----------------------------------------------------------------------------------------------
def demo_config(out: str, device: str, quick: bool, have: dict):
    """The tiny config's preset, sized for ~10 minutes of training on 2 CPU cores."""
    from reference_model.train import load_config
    from reference_model.train.config import Phase

    cfg = load_config("tiny")
    cfg.out, cfg.device, cfg.ops, cfg.stage = out, device, "xray", "all"
    cfg.data = "openclipart+synthetic" if have.get("openclipart") else "synthetic"
    cfg.video_data = "synthetic"
    cfg.log_every = 10
    if quick:
        cfg.data = "synthetic"
        cfg.data_size, cfg.log_every = 32, 1
        for s in ("mae", "hashtag", "clip"):
            sc = cfg.stage_config(s)
            sc.steps, sc.batch_size, sc.video_every = 2, 4, 2
            sc.phases = [Phase(0.0, 16, 2)]
    return cfg


def build_sources(cfg, quick: bool, have: dict) -> tuple[dict, str]:
    """The training datasets and a one-line description of them."""
    from torch.utils.data import ConcatDataset

    from reference_model.data import build_dataset
    from reference_model.train.runner import data_sizes

    size, frames = data_sizes(cfg)
    parts, desc = [], []
    if "openclipart" in cfg.data:
        oc = build_dataset("openclipart", split="train", size=size,
                           n=OPENCLIPART_LIMIT, max_bytes=OPENCLIPART_MAX_BYTES)
        parts.append(oc)
        desc.append(f"openclipart ({len(oc)} images)")
    syn = build_dataset("synthetic", split="train", size=size, n=cfg.data_size, seed=cfg.seed)
    parts.append(syn)
    desc.append(f"synthetic ({len(syn)} images)")
    video = build_dataset("synthetic-video", split="train", size=size, frames=frames,
                          n=max(8, cfg.data_size // 4), seed=cfg.seed)
    desc.append(f"synthetic-video ({len(video)} clips of {frames} frames)")
    image = parts[0] if len(parts) == 1 else ConcatDataset(parts)
    return {"image": image, "video": video}, " + ".join(desc) + f", {size}px"


# the smoke run: small eval sets, no robustness blocks, one timing round
QUICK_EVAL = dict(n_images=36, n_clips=14, n_fmnist=20, robustness=False)
QUICK_SPEED = dict(batch=4, size=16, rounds=1, repeats=1)
SPEED = dict(batch=64, size=32, rounds=3, repeats=3)
OPENCLIPART_LIMIT = 2000  # SVGs rendered (once, cached): the real-data share of the mix
OPENCLIPART_MAX_BYTES = 200_000  # the largest SVGs take seconds each to render


# ----------------------------------------------------------------------------------------------
# 4. speed, side by side
# ----------------------------------------------------------------------------------------------
def _median_time(fn, repeats: int, sync) -> float:
    ts = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def measure_speed(run_dir: str, device, *, batch: int, size: int, rounds: int,
                  repeats: int) -> dict:
    """Training and inference samples/s of the trained models built with ops="xray" and with
    ops="torch" (the same weights), measured in alternating rounds in this process; the
    median of each side."""
    from reference_model.eval import default_evit, default_tome, quantized_copy
    from reference_model.train.dist import Dist
    from reference_model.train.loop import build_from_checkpoint, final_checkpoint
    from reference_model.train.optim import build_optimizer
    from reference_model.train.tasks import stage_task

    device = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    d = Dist(0, 1, 0, device)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, size, size, generator=g).to(device)
    captions = [f"a red circle number {i}" for i in range(batch)]
    batch_dict = {"image": images, "caption": captions, "caption2": captions,
                  "hashtags": [["red", "circle"]] * batch}

    # training: one step of each stage model per timed call (MAE, hashtag, CLIP)
    train = {}
    for ops in ("xray", "torch"):
        steps = []
        for stage in ("mae", "hashtag", "clip"):
            task = stage_task(stage)
            model, _ = build_from_checkpoint(final_checkpoint(os.path.join(run_dir, stage)),
                                             task, device=device, ops=ops)
            model.train()
            opt = build_optimizer(model, "lion", 1e-5, 0.0)

            def step(task=task, model=model, opt=opt):
                loss, _ = task.loss(model, model, images, batch_dict, d)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            steps.append((stage, step))
        train[ops] = steps
    by_stage = {ops: {s: [] for s, _ in train[ops]} for ops in train}
    for _ in range(rounds):
        for ops in ("xray", "torch"):
            for stage, step in train[ops]:
                step()  # warm-up (first call: kernel caches, allocations)
                by_stage[ops][stage].append(_median_time(step, repeats, sync))
    train_sps, train_stage_sps = {}, {}
    for ops in by_stage:
        med = {s: statistics.median(v) for s, v in by_stage[ops].items()}
        train_stage_sps[ops] = {s: batch / t for s, t in med.items()}
        train_sps[ops] = 3 * batch / sum(med.values())
    del train

    # inference: CLIP image embeddings
    clip_path = final_checkpoint(os.path.join(run_dir, "clip"))
    xray, _ = build_from_checkpoint(clip_path, device=device, ops="xray")
    torch_m, _ = build_from_checkpoint(clip_path, device=device, ops="torch")
    int8 = quantized_copy(xray, [xray.text_tower])
    tome, evit = default_tome(xray.vit, size), default_evit(xray.vit)

    def enc(model, **red):
        def f():
            with torch.inference_mode():
                if red:
                    with model.vit.token_reduction(**red):
                        model.encode_image(images)
                else:
                    model.encode_image(images)
        return f
    variants = {"xray": enc(xray), "torch": enc(torch_m), "xray_tome": enc(xray, tome=tome),
                "xray_evit": enc(xray, evit=evit), "xray_int8": enc(int8),
                "torch_tome": enc(torch_m, tome=tome), "torch_evit": enc(torch_m, evit=evit)}
    times = {k: [] for k in variants}
    for _ in range(rounds):
        for k, f in variants.items():
            f()
            times[k].append(_median_time(f, repeats, sync))
    infer_sps = {k: batch / statistics.median(v) for k, v in times.items()}
    return {"train_samples_per_s": train_sps, "infer_samples_per_s": infer_sps,
            "train_samples_per_s_by_stage": train_stage_sps,
            "train_speedup": train_sps["xray"] / train_sps["torch"],
            "infer_speedup": {k: v / infer_sps["torch"] for k, v in infer_sps.items()},
            "setup": {"batch": batch, "img_size": size, "rounds": rounds, "repeats": repeats,
                      "threads": torch.get_num_threads(), "device": str(device),
                      "tome": repr(tome), "evit": repr(evit),
                      "train": "one Lion step of each stage model (MAE, hashtag, CLIP) per "
                               "round; samples/s = 3 x batch / the sum of the three medians"}}


def plot_speed(speed: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    tr = speed["train_samples_per_s"]
    axes[0].bar(list(tr), list(tr.values()), color=["tab:blue", "tab:gray"])
    axes[0].set_title("training (MAE + hashtag + CLIP step)")
    inf = speed["infer_samples_per_s"]
    axes[1].bar(list(inf), list(inf.values()),
                color=["tab:blue" if k.startswith("xray") else "tab:gray" for k in inf])
    axes[1].set_title("inference (CLIP image embeddings)")
    axes[1].tick_params(axis="x", rotation=30)
    for ax in axes:
        ax.set_ylabel("samples / s")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# 5. summary and table
# ----------------------------------------------------------------------------------------------
def eval_block(block: dict) -> dict:
    out = {k: block.get(k, float("nan")) for k in EVAL_KEYS}
    out.update({k: block[k] for k in EXTRA_EVAL_KEYS if k in block})
    return out


def format_summary(s: dict) -> str:
    lines = [f"xray-ops demo: {s['config']} on {s['device']}; data: {s['data']}", ""]
    lines.append(f"{'stage':<10}{'steps':>8}{'final loss':>12}{'seconds':>10}")
    for st, v in s["stages"].items():
        lines.append(f"{st:<10}{v['steps']:>8}{v['final_loss']:>12.4f}{v['seconds']:>10.1f}")
    cols = [("float", "eval"), ("int8", "eval_int8"), ("ToMe", "eval_tome"),
            ("EViT", "eval_evit")]
    lines += ["", f"{'metric':<22}{'chance':>9}" + "".join(f"{c:>9}" for c, _ in cols)]
    chance = {"zero_shot_top1": "zero_shot_chance", "i2t_r1": "retrieval_chance_r1",
              "t2i_r1": "retrieval_chance_r1", "video_top1": "video_chance",
              "hashtag_map": "hashtag_map_chance", "fmnist_top1": "fmnist_chance",
              "video_probe_top1": "video_chance"}
    for m in ("zero_shot_top1", "i2t_r1", "t2i_r1", "video_top1", "video_probe_top1",
              "hashtag_map", "fmnist_top1"):
        if m not in s["eval"]:
            continue
        c = s["eval"].get(chance[m], float("nan"))
        lines.append(f"{m:<22}{c:>9.3f}" + "".join(
            f"{s[b].get(m, float('nan')):>9.3f}" for _, b in cols))
    idx = s.get("eval_index", {})
    for name, blk in idx.items():
        lines.append(f"{'retrieval ' + name:<22}{'':>9}  i2t_r1 {blk.get('i2t_r1', 0):.3f}  "
                     f"t2i_r1 {blk.get('t2i_r1', 0):.3f}")
    sp = s["speed"]
    tr, inf = sp["train_samples_per_s"], sp["infer_samples_per_s"]
    lines += ["", f"speed ({sp['setup']['threads']} threads, batch {sp['setup']['batch']}, "
                  f"{sp['setup']['img_size']}px), samples/s:",
              f"  train   xray {tr['xray']:8.1f}   torch {tr['torch']:8.1f}   "
              f"xray/torch {tr['xray'] / tr['torch']:.2f}x"]
    for k in ("xray", "xray_tome", "xray_evit", "xray_int8", "torch", "torch_tome",
              "torch_evit"):
        if k in inf:
            lines.append(f"  infer   {k:<11}{inf[k]:8.1f}   vs torch {inf[k] / inf['torch']:.2f}x")
    lines += ["", f"total {s['seconds']['total']:.0f} s (train {s['seconds']['train']:.0f}, "
                  f"eval {s['seconds']['eval']:.0f}, speed {s['seconds']['speed']:.0f})"]
    for n in s.get("notes", []):
        lines.append(f"note: {n}")
    return "\n".join(lines)


def run(out: str = "runs/demo", device: str = "auto", quick: bool = False) -> dict:
    """The whole demo; returns the summary (also written to OUT/summary.json)."""
    from reference_model.eval import evaluate
    from reference_model.train import load_models, train
    from reference_model.train.dist import resolve_device
    from reference_model.train.runner import device_name

    from reference_model.train.loop import cpu_time

    t0, c0 = time.perf_counter(), cpu_time()
    cpu = {}
    dev = resolve_device(device)
    have, notes = ensure_data_packages()
    for n in notes:
        log(n)
    # a fresh run each time (the run folder holds only what this demo writes)
    for sub in ("mae", "hashtag", "clip", "metrics.csv", "tb"):
        p = os.path.join(out, sub)
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.remove(p)
    os.makedirs(out, exist_ok=True)
    cfg = demo_config(out, str(dev), quick, have)
    sources, data_desc = build_sources(cfg, quick, have)
    log(f"training tiny (MAE -> hashtag -> CLIP, ops=xray) on {data_desc}, {device_name(dev)}")
    t = time.perf_counter()
    tr = train(cfg, sources=sources)
    t_train = time.perf_counter() - t
    sig = tr.get("interrupted", 0)
    if sig:  # SIGTERM / SIGINT: train() left a checkpoint; evaluating a half-trained model is not
        # what was asked for. Exit as the train CLI does (128 + signal).
        log(f"interrupted by signal {sig} during training (checkpoints in {out}); stopping")
        raise SystemExit(128 + sig if sig > 0 else 1)
    cpu["setup+train"] = cpu_time() - c0

    log("evaluating (float, int8, ToMe, EViT, int8 / PCA retrieval, robustness)")
    t = time.perf_counter()
    models = load_models(out, device=dev)
    ev = evaluate(models["clip"], hashtag_model=models["hashtag"], vocab=models["vocab"],
                  size=32, frames=8, device=dev, out=os.path.join(out, "eval.json"),
                  show=False, fashion_mnist=have.get("fashion-mnist", False),
                  **(QUICK_EVAL if quick else {}))
    t_eval = time.perf_counter() - t
    cpu["eval"] = cpu_time() - c0 - sum(cpu.values())

    log("measuring speed: ops=xray vs ops=torch, side by side")
    t = time.perf_counter()
    speed = measure_speed(out, dev, **(QUICK_SPEED if quick else SPEED))
    t_speed = time.perf_counter() - t
    cpu["speed"] = cpu_time() - c0 - sum(cpu.values())
    cpu["total"] = cpu_time() - c0
    plot_speed(speed, os.path.join(out, "speed.png"))

    from .train.bench import _commit  # the code that made these figures

    summary = {
        "config": cfg.model, "device": device_name(dev), "data": data_desc,
        "commit": _commit(), "torch": torch.__version__,
        "stages": {s: {"steps": v["steps"], "final_loss": v["final_loss"],
                       "seconds": v["seconds"], "cpu_seconds": v.get("cpu_seconds"),
                       "samples": v.get("samples")} for s, v in tr["stages"].items()},
        "eval": eval_block(ev["float"]), "eval_int8": eval_block(ev["int8"]),
        "eval_tome": eval_block(ev["tome"]), "eval_evit": eval_block(ev["evit"]),
        "eval_index": {k: eval_block(ev[k]) for k in ("index_int8", "index_pca_int8")
                       if k in ev},
        "robustness": {k: eval_block(ev[k]) for k in ("noise", "blur", "fgsm") if k in ev},
        "speed": speed,
        "seconds": {"train": t_train, "eval": t_eval, "speed": t_speed,
                    "total": time.perf_counter() - t0},
        # CPU time of this process per phase: on a shared machine, wall time overstates what
        # the demo costs; CPU seconds / threads estimates the wall time on an idle machine
        "cpu_seconds": cpu,
        "quick": quick, "notes": notes,
        "eval_meta": {k: ev["meta"][k] for k in ("n_images", "n_clips", "n_fmnist", "tome",
                                                 "evit", "points_lost_vs_float")
                      if k in ev["meta"]},
        "plots": sorted(f for f in os.listdir(out) if f.endswith(".png")),
    }
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(format_summary(summary), flush=True)
    log(f"wrote {os.path.join(out, 'summary.json')} and {len(summary['plots'])} plots beside it")
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m reference_model.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--device", default="auto", help="auto (the GPU when present), cpu, cuda")
    p.add_argument("--quick", action="store_true", help="a smoke run: a few steps, small sets")
    args = p.parse_args(argv)
    run(args.out, args.device, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
