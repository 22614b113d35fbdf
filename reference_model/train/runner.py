"""A training run: data sources, the stage chain MAE → hashtag → CLIP, resume, the run summary."""

from __future__ import annotations

import json
import os
import time

import torch

from . import checkpoint as ckpt
from . import dist as dist_mod
from .config import STAGES, ConfigError, TrainConfig, validate
from .loop import StopSignals, build_from_checkpoint, final_checkpoint, run_stage
from .metrics import MetricsLog
from .tasks import ModelAPI, stage_task

NAMED_SOURCES = ("synthetic", "openclipart", "fashion-mnist")
PREFIXES = ("folder:", "webdataset:", "video-folder:")


def _source_path(part: str) -> str | None:
    for p in PREFIXES:
        if part.startswith(p):
            return part[len(p):]
    return None if part in NAMED_SOURCES or part in ("none", "synthetic-video") else part


def check_data(cfg: TrainConfig) -> None:
    """ConfigError naming a data source that is neither a known name nor an existing path."""
    for key, value in (("data", cfg.data), ("video_data", cfg.video_data)):
        for part in value.split("+"):
            if not part:
                raise ConfigError(f"--{key.replace('_', '-')} {value!r}: empty source name")
            path = _source_path(part)
            if path is None:
                continue
            # webdataset brace patterns: check the folder
            probe = path.split("{")[0] if "{" in path else path
            if "{" in path:
                probe = os.path.dirname(probe) or "."
            if not os.path.exists(probe):
                raise ConfigError(f"--{key.replace('_', '-')}: {part!r} is neither one of "
                                  f"{list(NAMED_SOURCES)} nor an existing path")


def data_sizes(cfg: TrainConfig) -> tuple[int, int]:
    """(image size, clip length) the data renders at: the largest of the scheduled phases."""
    phases = [p for s in cfg.stages() for p in cfg.stage_config(s).phases]
    return max(p.img_size for p in phases), max(p.clip_len for p in phases)


def build_sources(cfg: TrainConfig) -> dict:
    """{"image": dataset, "video": dataset | None} from cfg.data / cfg.video_data (README "Data")."""
    from torch.utils.data import ConcatDataset

    from reference_model.data import build_dataset

    size, frames = data_sizes(cfg)
    parts = []
    for part in cfg.data.split("+"):
        if part == "synthetic":
            parts.append(build_dataset("synthetic", split="train", size=size, n=cfg.data_size,
                                       seed=cfg.seed))
        elif part in ("openclipart", "fashion-mnist"):
            parts.append(build_dataset(part, split="train", size=size))
        elif os.path.exists(part):
            parts.append(build_dataset(f"folder:{part}", size=size))
        else:
            parts.append(build_dataset(part, size=size))
    image = parts[0] if len(parts) == 1 else ConcatDataset(parts)
    video = None
    if cfg.video_data != "none":
        if cfg.video_data == "synthetic":
            video = build_dataset("synthetic-video", split="train", size=size, frames=frames,
                                  n=max(1, cfg.data_size // 4), seed=cfg.seed)
        else:
            src = cfg.video_data if ":" in cfg.video_data else f"video-folder:{cfg.video_data}"
            video = build_dataset(src, size=size, frames=frames)
    return {"image": image, "video": video}


def _resume_plan(cfg: TrainConfig, stages: list[str]) -> tuple[set, dict]:
    """(stages already done, {stage: checkpoint to resume}) for --resume."""
    done, resume = set(), {}
    if cfg.resume is None:
        return done, resume
    if cfg.resume == "auto":
        for s in stages:
            stage_dir = os.path.join(cfg.out, s)
            if os.path.exists(os.path.join(stage_dir, "done.json")):
                done.add(s)
                continue
            found = ckpt.list_checkpoints(stage_dir)
            if found:
                resume[s] = found[-1]
            break
        return done, resume
    meta = ckpt.load_checkpoint(cfg.resume)[1]
    stage = meta["stage"]
    if stage not in stages:
        raise ConfigError(f"resume {cfg.resume}: a {stage} checkpoint, but --stage {cfg.stage} "
                          f"runs {stages}")
    done.update(stages[:stages.index(stage)])
    resume[stage] = cfg.resume
    return done, resume


def _teacher_for(cfg: TrainConfig, stage: str) -> str | None:
    t = cfg.distill.teacher
    if t is None or stage == "mae":
        return None
    if os.path.isdir(t):
        return t if os.path.isdir(os.path.join(t, stage)) else None
    meta = ckpt.load_checkpoint(t)[1]
    return t if meta["stage"] == stage else None


def train(cfg: TrainConfig, *, api: ModelAPI | None = None, sources: dict | None = None,
          collate=None) -> dict:
    """Run the configured stages; returns the run summary (also DIR/train_summary.json):
    ``{"config", "device", "data", "world", "stages": {stage: {"steps", "final_loss",
    "seconds", "checkpoint", "samples"}}, "interrupted": signal number or 0}``."""
    validate(cfg)
    check_data(cfg)
    d = dist_mod.setup(cfg.device)
    t0 = time.perf_counter()
    try:
        stages = cfg.stages()
        done, resume = _resume_plan(cfg, stages)
        if sources is None:
            sources = build_sources(cfg)
        log = MetricsLog(cfg.out, enabled=d.is_main)
        if d.is_main:
            os.makedirs(cfg.out, exist_ok=True)
            with open(os.path.join(cfg.out, "config.json"), "w") as f:
                json.dump(cfg.to_dict(), f, indent=1, default=str)
        summary = {"config": cfg.model, "device": device_name(d.device), "data": cfg.data,
                   "video_data": cfg.video_data, "ops": cfg.ops, "world": d.world,
                   "stages": {}, "interrupted": 0}
        init = cfg.init
        with StopSignals() as stop:
            for s in stages:
                stage_dir = os.path.join(cfg.out, s)
                if s in done:
                    with open(os.path.join(stage_dir, "done.json")) as f:
                        info = json.load(f)
                    summary["stages"][s] = {k: info[k] for k in ("steps", "final_loss",
                                                                 "seconds")}
                    init = final_checkpoint(stage_dir)
                    continue
                task = stage_task(s, api)
                r = run_stage(cfg, task, d, sources, log=log, stop=stop,
                              resume_path=resume.get(s), init_path=init,
                              teacher_path=_teacher_for(cfg, s), collate=collate)
                summary["stages"][s] = {"steps": r.steps, "final_loss": r.final_loss,
                                        "seconds": r.seconds, "cpu_seconds": r.cpu_seconds,
                                        "samples": r.samples, "checkpoint": r.checkpoint}
                if r.interrupted:
                    summary["interrupted"] = stop.signum or -1
                    break
                init = r.checkpoint
        log.close()
        summary["seconds"] = time.perf_counter() - t0
        if d.is_main:
            with open(os.path.join(cfg.out, "train_summary.json"), "w") as f:
                json.dump(summary, f, indent=1)
        return summary
    finally:
        dist_mod.teardown()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    name = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu ({name}, {torch.get_num_threads()} threads)"


def load_models(run_dir: str, device="cpu", ops: str | None = None) -> dict:
    """The trained models of a run folder for evaluation:
    ``{"clip": CLIPModel | None, "hashtag": HashtagModel | None, "vocab": HashtagVocab | None,
    "mae": MAEModel | None}``, each from its stage's final checkpoint, in eval mode."""
    from reference_model.data import HashtagVocab

    out = {"clip": None, "hashtag": None, "vocab": None, "mae": None}
    for s in STAGES:
        stage_dir = os.path.join(run_dir, s)
        if not ckpt.list_checkpoints(stage_dir):
            continue
        model, spec = build_from_checkpoint(final_checkpoint(stage_dir), device=device, ops=ops)
        out[s] = model
        if s == "hashtag":
            out["vocab"] = HashtagVocab.from_state_dict(spec["vocab"])
    if out["clip"] is None and out["hashtag"] is None and out["mae"] is None:
        raise FileNotFoundError(f"{run_dir}: no stage checkpoints (expected "
                                f"{run_dir}/<mae|hashtag|clip>/checkpoint-*.safetensors)")
    return out
