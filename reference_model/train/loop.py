"""One training stage: the step loop with progressive resolution, accumulation, autocast,
distillation, logging, checkpoints and stop signals."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from . import dist as dist_mod
from .config import LARGE_MODELS, TrainConfig, stage_optim
from .metrics import MetricsLog, Progress, plot_stage
from .optim import build_optimizer
from .sampler import IndexStream, make_loader
from .schedule import ResolutionSchedule, lr_scheduler, steps_for_epochs
from .tasks import Task, annotate, encoder_prefix, find_encoder

SOURCE_IDS = {"image": 0, "video": 1}
STAGE_SEEDS = {"mae": 1, "hashtag": 2, "clip": 3}


@dataclass
class StageResult:
    stage: str
    steps: int  # optimizer steps done
    total_steps: int
    final_loss: float
    seconds: float  # training time of the stage (all resumed parts together)
    cpu_seconds: float  # this process's CPU time in this part of the stage (shared machines)
    checkpoint: str
    interrupted: bool
    samples: int


class StopSignals:
    """SIGTERM / SIGINT set a flag the loop polls after each step (then it checkpoints and
    stops); a second SIGINT interrupts at once. Handlers are restored on exit."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


def cpu_time() -> float:
    """User + system CPU seconds of this process (all its threads)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _resize(batch: dict, kind: str, img_size: int, clip_len: int, device) -> torch.Tensor:
    """The batch's pixels at the step's resolution: images resized (bilinear, antialiased);
    clips subsampled to clip_len evenly spaced frames, then resized."""
    x = batch[kind].to(device, non_blocking=True)
    if kind == "video":
        T = x.shape[2]
        if T != clip_len:
            idx = torch.linspace(0, T - 1, clip_len).round().long().to(device)
            x = x.index_select(2, idx)
        if x.shape[-1] != img_size or x.shape[-2] != img_size:
            B, C, T, H, W = x.shape
            x = x.permute(0, 2, 1, 3, 4).reshape(B * T, C, H, W)
            x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", antialias=True,
                              align_corners=False)
            x = x.reshape(B, T, C, img_size, img_size).permute(0, 2, 1, 3, 4).contiguous()
        return x
    if x.shape[-1] != img_size or x.shape[-2] != img_size:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", antialias=True,
                          align_corners=False)
    return x


def _steps_of(schedule, start: int, total: int, *, video: bool):
    """The steps in [start, total) that draw a video (or an image) batch."""
    return (s for s in range(start, total) if schedule.is_video(s) == video)


def _enable_grad_checkpointing(encoder) -> None:
    if hasattr(encoder, "set_grad_checkpointing"):
        encoder.set_grad_checkpointing(True)
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing)

    blocks = set(getattr(encoder, "blocks", []))
    apply_activation_checkpointing(encoder, check_fn=lambda m: m in blocks)


def parallel_mode(cfg: TrainConfig, d) -> str:
    if not d.active:
        return "none"
    if cfg.parallel == "auto":
        return "fsdp" if cfg.model in LARGE_MODELS else "ddp"
    return cfg.parallel


def load_encoder_from(model, path: str) -> tuple[list[str], list[str]]:
    """Initialise the stage model's ViT from the ViT of another stage's checkpoint.

    Returns (missing, unexpected) keys; RuntimeError when nothing of the encoder matched."""
    tensors, meta = ckpt.load_checkpoint(path)
    src_prefix = "model." + meta["encoder_prefix"]
    enc_sd = {k[len(src_prefix):]: v for k, v in tensors.items() if k.startswith(src_prefix)}
    encoder = find_encoder(model)
    res = encoder.load_state_dict(enc_sd, strict=False)
    own = set(encoder.state_dict())
    if not own & set(enc_sd):
        raise RuntimeError(f"init {path}: no encoder weights matched (its stage: "
                           f"{meta.get('stage')}, prefix {meta['encoder_prefix']!r})")
    return list(res.missing_keys), list(res.unexpected_keys)


@dataclass
class _Run:
    """What one stage trains with, set up by :func:`_setup`."""

    model: torch.nn.Module  # the stage model (FSDP shards it in place)
    wrapped: torch.nn.Module  # DDP / FSDP view of it (forward + state dicts)
    call: torch.nn.Module  # what the loss calls: wrapped, or torch.compile(wrapped)
    encoder: torch.nn.Module
    spec: dict
    teacher: torch.nn.Module | None
    opt: torch.optim.Optimizer
    lr_sched: torch.optim.lr_scheduler.LRScheduler
    schedule: ResolutionSchedule
    total: int
    mode: str
    start: int = 0
    positions: dict | None = None
    elapsed: float = 0.0
    rng: dict | None = None  # the rank's RNG state to restore (resume)


def _setup(cfg, task, d, sources, resume_path, init_path, teacher_path) -> _Run:
    """Build (or restore) the model, optimizer, schedules and teacher of a stage."""
    stage, sc, device = task.stage, cfg.stage_config(task.stage), d.device
    teacher = (load_teacher(teacher_path, task, device, ops=cfg.ops)
               if teacher_path and cfg.distill.weight > 0 else None)
    resumed = None
    if resume_path:
        resumed = ckpt.load_checkpoint(resume_path)
        if resumed[1]["stage"] != stage:
            raise ValueError(f"resume {resume_path}: a {resumed[1]['stage']} checkpoint, "
                             f"expected {stage}")
        spec = resumed[1]["spec"]
    else:
        spec = task.spec(cfg, [ds for ds in sources.values() if ds is not None])
        if teacher is not None:
            spec = task.adapt_to_teacher(spec, teacher)

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = annotate(task.build(spec), spec).to(device)
    enc = find_encoder(model)
    if init_path and not resumed:
        missing, unexpected = load_encoder_from(model, init_path)
        if d.is_main:
            print(f"[{stage}] encoder initialised from {init_path} "
                  f"({len(missing)} missing, {len(unexpected)} unused keys)", flush=True)
    if cfg.grad_checkpointing:
        _enable_grad_checkpointing(enc)

    patch = enc.patch_embed.patch_size
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    video_every = sc.video_every if sources.get("video") is not None else 0

    def schedule_for(steps):
        return ResolutionSchedule(sc.phases, steps, sc.batch_size, patch_size=patch,
                                  tubelet=getattr(enc.patch_embed, "tubelet_size", 1),
                                  divisor=d.world * cfg.accum, video_every=video_every)

    total = sc.steps
    if sc.epochs is not None:
        total = (resumed[1]["total_steps"] if resumed else
                 steps_for_epochs(sc.epochs, len(sources["image"]), schedule_for))
    mode = parallel_mode(cfg, d)
    wrapped = dist_mod.wrap(model, mode, d, find_unused=cfg.ddp_find_unused)
    lr, wd = stage_optim(cfg, stage)
    opt = build_optimizer(model, cfg.optimizer, lr, wd)
    run = _Run(model, wrapped, torch.compile(wrapped) if cfg.compile else wrapped, enc, spec,
               teacher, opt, lr_scheduler(opt, total, sc.warmup, sc.min_lr_ratio),
               schedule_for(total), total, mode, positions={"image": 0, "video": 0})
    if resumed:
        tensors, meta = resumed
        model_sd = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        dist_mod.load_full_state_dicts(wrapped, opt, model_sd,
                                       ckpt.unpack_optimizer(tensors, meta["optimizer"]))
        run.lr_sched.load_state_dict(meta["scheduler"])
        run.start, run.positions, run.elapsed = meta["step"], dict(meta["positions"]), \
            meta["elapsed"]
        # this rank's RNG; a run on more ranks than wrote the checkpoint reuses rank 0's
        r = d.rank if f"rng.{d.rank}.torch" in tensors else 0
        run.rng = dict(meta["rng"][r], tensors={k.split(".")[-1]: v for k, v in tensors.items()
                                                if k.startswith(f"rng.{r}.")})
    return run


def _train_step(cfg, task, run: _Run, d, loaders, plan, autocast) -> tuple[float, float]:
    """One optimizer step over ``cfg.accum`` micro-batches; (task loss, distillation loss)."""
    kind = "video" if plan.video else "image"
    if hasattr(run.encoder, "set_step"):
        run.encoder.set_step(plan.step)  # EViT's keep-rate schedule
    run.wrapped.train()
    run.opt.zero_grad(set_to_none=True)
    loss_sum = dl_sum = 0.0
    for micro in range(cfg.accum):
        batch = next(loaders[kind])
        x = _resize(batch, kind, plan.img_size, plan.clip_len, d.device)
        # DDP: all-reduce the gradients on the last micro-batch only
        defer = run.mode == "ddp" and micro < cfg.accum - 1
        with run.wrapped.no_sync() if defer else contextlib.nullcontext():
            with autocast:
                loss, outputs = task.loss(run.call, run.model, x, batch, d)
                total = loss
                if run.teacher is not None:
                    dl = task.distill_loss(outputs, run.teacher, x, batch, cfg.distill)
                    total = loss + cfg.distill.weight * dl
                    dl_sum += float(dl.detach())
            (total / cfg.accum).backward()
        loss_sum += float(loss.detach())
    dist_mod.sync_replicated_grads(run.model, d)
    sc = cfg.stage_config(task.stage)
    if sc.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), sc.grad_clip)
    run.opt.step()
    run.lr_sched.step()
    return loss_sum / cfg.accum, dl_sum / cfg.accum


def run_stage(cfg: TrainConfig, task: Task, d, sources: dict, *, log: MetricsLog,
              stop: StopSignals, resume_path: str | None = None, init_path: str | None = None,
              teacher_path: str | None = None, collate=None) -> StageResult:
    """Train one stage; returns its :class:`StageResult` (``interrupted`` when a signal or
    ``stop_after`` ended it early; a checkpoint is written either way)."""
    stage = task.stage
    stage_dir = os.path.join(cfg.out, stage)
    run = _setup(cfg, task, d, sources, resume_path, init_path, teacher_path)
    start, total, positions = run.start, run.total, run.positions
    if resume_path:
        log.truncate(stage, start)
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and d.device.type == "cuda")
    autocast = (torch.autocast(d.device.type, dtype=torch.bfloat16) if use_bf16
                else contextlib.nullcontext())
    loaders = {}
    for kind, ds in sources.items():
        if ds is not None:
            loaders[kind] = make_loader(
                ds, IndexStream(len(ds), cfg.seed, SOURCE_IDS[kind]),
                _steps_of(run.schedule, start, total, video=kind == "video"),
                lambda s: run.schedule.plan(s).batch_size, positions[kind], rank=d.rank,
                world=d.world, accum=cfg.accum, num_workers=cfg.num_workers, collate=collate,
                seed=cfg.seed)

    # Nothing above may depend on the global RNG after this point differs between a straight
    # run and a resumed one: from here on it drives the masks and drop path of each rank.
    if run.rng is not None:
        ckpt.set_rng_state(run.rng)
        if d.is_main:
            print(f"[{stage}] resumed from {resume_path} at step {start}/{total}", flush=True)
    else:
        torch.manual_seed(cfg.seed * 1009 + 7919 * d.rank + 31 * STAGE_SEEDS[stage])

    progress = Progress(stage, total, start, d.is_main, cfg.log_every)
    recent = collections.deque(maxlen=10)  # final_loss: the mean of the last 10 steps
    window_t, window_samples = time.perf_counter(), 0
    t_stage, cpu_stage = time.perf_counter(), cpu_time()
    interrupted, done, last_path, samples_done = False, start, None, 0
    with_teacher = run.teacher is not None
    try:
        for step in range(start, total):
            plan = run.schedule.plan(step)
            kind = "video" if plan.video else "image"
            loss_v, dl_v = _train_step(cfg, task, run, d, loaders, plan, autocast)
            positions[kind] += plan.batch_size
            samples_done += plan.batch_size
            window_samples += plan.batch_size
            recent.append(loss_v + cfg.distill.weight * dl_v)
            done = step + 1
            last = done == total
            shape = f"| {plan.img_size}px b{plan.batch_size}"
            if done % cfg.log_every == 0 or last or done == start + 1:
                if d.device.type == "cuda":
                    torch.cuda.synchronize(d.device)
                now = time.perf_counter()
                sps = window_samples / max(1e-9, now - window_t)
                window_t, window_samples = now, 0
                loss_m, dl_m = d.mean(loss_v), d.mean(dl_v)
                log.log({"stage": stage, "step": done,
                         "loss": loss_m + cfg.distill.weight * dl_m, "loss_task": loss_m,
                         "loss_distill": dl_m if with_teacher else "",
                         "lr": run.opt.param_groups[0]["lr"], "samples_per_s": sps,
                         "source": kind, "img_size": plan.img_size,
                         "clip_len": plan.clip_len if plan.video else "",
                         "batch_size": plan.batch_size, "tokens": plan.tokens,
                         "elapsed_s": run.elapsed + now - t_stage})
                progress.update(done, loss_m, sps, shape)
            else:
                progress.update(done, loss_v, None, shape)
            want_stop = d.any(bool(stop.signum) or (cfg.stop_after is not None
                                                    and done >= cfg.stop_after and not last))
            if last or want_stop or (cfg.ckpt_every and done % cfg.ckpt_every == 0):
                last_path = save_stage_checkpoint(
                    cfg, d, stage, stage_dir, run.wrapped, run.opt, run.lr_sched, run.spec,
                    run.model, step=done, total=total, positions=positions,
                    elapsed=run.elapsed + time.perf_counter() - t_stage)
            if want_stop and not last:
                interrupted = True
                break
    finally:
        progress.close()
    seconds = run.elapsed + time.perf_counter() - t_stage
    final_loss = d.mean(sum(recent) / max(1, len(recent)))
    result = StageResult(stage, done, total, final_loss, seconds, cpu_time() - cpu_stage,
                         last_path, interrupted, samples_done)
    if not interrupted and d.is_main:
        with open(os.path.join(stage_dir, "done.json"), "w") as f:
            json.dump({"steps": total, "final_loss": final_loss, "seconds": seconds,
                       "checkpoint": os.path.relpath(last_path, cfg.out)}, f, indent=1)
        plot_stage(log.path, stage, cfg.out)
    d.barrier()
    return result


def save_stage_checkpoint(cfg, d, stage, stage_dir, wrapped, opt, lr_sched, spec, model, *,
                          step, total, positions, elapsed) -> str:
    """Gather the full state (a collective under FSDP) and write it from rank 0."""
    model_sd, optim_sd = dist_mod.full_state_dicts(wrapped, opt)
    rng_all = d.gather_objects(ckpt.rng_state())
    path = ckpt.checkpoint_path(stage_dir, step)
    if d.is_main:
        tensors = {f"model.{k}": v for k, v in model_sd.items()}
        opt_tensors, opt_meta = ckpt.pack_optimizer(optim_sd)
        tensors.update(opt_tensors)
        rng_meta = []
        for r, st in enumerate(rng_all):
            for k, v in st["tensors"].items():
                tensors[f"rng.{r}.{k}"] = v
            rng_meta.append({"numpy": st["numpy"], "python": st["python"]})
        meta = {"stage": stage, "step": step, "total_steps": total, "positions": positions,
                "elapsed": elapsed, "world": d.world, "scheduler": lr_sched.state_dict(),
                "optimizer": opt_meta, "rng": rng_meta, "spec": spec,
                "encoder_prefix": encoder_prefix(model),
                "optimizer_class": f"{type(opt).__module__}.{type(opt).__name__}",
                "config": cfg.to_dict(), "torch": torch.__version__}
        ckpt.save_checkpoint(path, tensors, meta)
        ckpt.prune(stage_dir, cfg.keep_checkpoints)
    d.barrier()
    return path


def build_from_checkpoint(path: str, task: Task | None = None, *, device="cpu",
                          ops: str | None = None):
    """(stage model with the checkpoint's weights, in eval mode, spec) — one process, whatever
    world size or sharding wrote it."""
    from .tasks import stage_task

    tensors, meta = ckpt.load_checkpoint(path)
    spec = meta["spec"]
    task = task or stage_task(spec["stage"])
    model = annotate(task.build(spec, ops=ops), spec)
    sd = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(sd, strict=True)
    return model.to(device).eval(), spec


def load_teacher(path: str, task: Task, device, ops: str):
    """A frozen teacher for distillation from a checkpoint file or a run folder."""
    if os.path.isdir(path):
        path = final_checkpoint(os.path.join(path, task.stage))
    model, spec = build_from_checkpoint(path, task, device=device, ops=ops)
    if spec["stage"] != task.stage:
        raise ValueError(f"distill.teacher {path}: a {spec['stage']} checkpoint, expected a "
                         f"{task.stage} one")
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def final_checkpoint(stage_dir: str) -> str:
    """The checkpoint a finished stage ended with (done.json), else its latest one."""
    done = os.path.join(stage_dir, "done.json")
    if os.path.exists(done):
        with open(done) as f:
            rel = json.load(f)["checkpoint"]
        return os.path.join(os.path.dirname(stage_dir), rel)
    found = ckpt.list_checkpoints(stage_dir)
    if not found:
        raise FileNotFoundError(f"{stage_dir}: no checkpoints")
    return found[-1]

