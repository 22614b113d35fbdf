"""``xray-train`` / ``python -m reference_model.train``: train the reference model.

    xray-train --config tiny --stage all --data synthetic --steps 50 --out runs/x
    xray-train --config run.yaml mae.steps=20 optimizer=adamw --out runs/y
    torchrun --nproc_per_node 8 -m reference_model.train --config l16 --stage clip ...

A bad flag, a missing data path or an unreadable config stops with one line naming it, before
any work starts.
"""

from __future__ import annotations

import argparse
import signal
import sys

from .checkpoint import CheckpointError
from .config import (MODEL_NAMES, STAGES, ConfigError, apply_overrides, load_config, set_key,
                     validate)

PROG = "xray-train"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Train the Xray-Visual reference model: MAE → hashtag → "
                "CLIP, progressive resolution, Lion, distillation, DDP / FSDP2, exact resume.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, dotted keys: mae.steps=20 clip.lr=1e-4 "
                        "clip.phases='[[0,24,4],[0.5,32,8]]' model_overrides.depth=4")
    p.add_argument("--config", default="tiny",
                   help=f"a named config ({', '.join(MODEL_NAMES)}) or a YAML file")
    p.add_argument("--stage", choices=[*STAGES, "all"], default=None,
                   help="one stage, or all: MAE → hashtag (from the MAE encoder) → CLIP (from "
                        "the hashtag encoder) [config: all]")
    p.add_argument("--data", default=None,
                   help="image data: synthetic, openclipart, fashion-mnist, folder:PATH, "
                        "webdataset:PATTERN or a path; join with + [config: synthetic]")
    p.add_argument("--video-data", default=None,
                   help="video data: synthetic, none or a path [config: synthetic]")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of every stage")
    p.add_argument("--epochs", type=float, default=None,
                   help="passes over the image data per stage (instead of --steps)")
    p.add_argument("--out", default=None, help="run folder [config: runs/train]")
    p.add_argument("--ops", choices=["xray", "torch"], default=None,
                   help="xray: the fast ops; torch: the plain-PyTorch baseline [config: xray]")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="continue exactly: from CHECKPOINT, or (no value) from the latest in --out")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N [config: auto]")
    p.add_argument("--optimizer", choices=["lion", "adamw"], default=None)
    p.add_argument("--teacher", default=None,
                   help="distil from this checkpoint (or run folder) of a larger config")
    p.add_argument("--init", default=None,
                   help="initialise the first stage's encoder from this checkpoint")
    p.add_argument("--accum", type=int, default=None, help="gradient accumulation steps")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--grad-checkpointing", action="store_true", default=None,
                   help="activation checkpointing in the ViT blocks")
    p.add_argument("--parallel", choices=["auto", "none", "ddp", "fsdp"], default=None,
                   help="under torchrun: DDP, or FSDP2 (auto: FSDP2 for l16/h14)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=None,
                   help="auto: bf16 autocast on the GPU, fp32 on the CPU")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers")
    p.add_argument("--ckpt-every", type=int, default=None,
                   help="checkpoint every N steps (always at the end and on SIGTERM/SIGINT)")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop each stage after N steps with a checkpoint (as if interrupted)")
    return p


# flag → config key (flags given on the command line win over the config file)
_FLAGS = {"stage": "stage", "data": "data", "video_data": "video_data", "out": "out",
          "ops": "ops", "resume": "resume", "seed": "seed", "device": "device",
          "optimizer": "optimizer", "teacher": "distill.teacher", "init": "init",
          "accum": "accum", "compile": "compile", "grad_checkpointing": "grad_checkpointing",
          "parallel": "parallel", "precision": "precision", "workers": "num_workers",
          "ckpt_every": "ckpt_every", "stop_after": "stop_after"}


def config_from_args(argv=None):
    """Parse and validate the command line into a TrainConfig (ConfigError on anything bad).

    Order: the config's preset (or YAML file), then the flags, then the key=value overrides,
    so ``--steps 100 clip.steps=300`` trains the CLIP stage 300 steps and the others 100."""
    from .runner import check_data

    args = build_parser().parse_args(argv)
    cfg = load_config(args.config)
    for flag, key in _FLAGS.items():
        v = getattr(args, flag)
        if v is not None:
            set_key(cfg, key, v)
    for s in STAGES:
        sc = cfg.stage_config(s)
        if args.steps is not None:
            sc.steps = args.steps
        if args.epochs is not None:
            sc.epochs = args.epochs
    apply_overrides(cfg, args.overrides)
    validate(cfg)
    check_data(cfg)
    return cfg


def main(argv=None, *, api=None) -> int:
    try:
        cfg = config_from_args(argv)
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    from .runner import train

    try:
        summary = train(cfg, api=api)
    except (ConfigError, CheckpointError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    sig = summary.get("interrupted", 0)
    if sig:
        name = signal.Signals(sig).name if sig > 0 else "stop_after"
        print(f"{PROG}: stopped by {name}; checkpoints in {cfg.out} (continue with --resume)",
              file=sys.stderr)
        return 128 + sig if sig > 0 else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
