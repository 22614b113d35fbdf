"""Training of the reference model: ``python -m reference_model.train`` / ``xray-train``.

    from reference_model.train import load_config, train, load_models
    cfg = load_config("tiny", ["mae.steps=20"]); cfg.out = "runs/x"
    summary = train(cfg)                       # stages MAE → hashtag → CLIP
    models = load_models("runs/x")             # {"clip", "hashtag", "vocab", "mae"}

Layout: config (settings, presets, YAML, overrides), schedule (lr, progressive resolution),
sampler (sharded resumable batches), optim (Lion / AdamW), checkpoint (atomic safetensors),
dist (torchrun, DDP / FSDP2), tasks (the three stages, distillation losses), loop (one stage),
runner (the chain, resume, summary), metrics (CSV, TensorBoard, progress, plots).
"""

from .checkpoint import CheckpointError, load_checkpoint
from .config import ConfigError, TrainConfig, load_config, validate
from .loop import build_from_checkpoint
from .runner import load_models, train

__all__ = ["train", "load_config", "validate", "TrainConfig", "ConfigError", "CheckpointError",
           "load_checkpoint", "load_models", "build_from_checkpoint"]
