"""Training configuration: one dataclass tree, named presets, YAML files and ``key=value`` overrides.

``load_config("tiny")`` is the preset of the named model config; ``load_config("run.yaml")`` reads
a YAML file whose keys are :class:`TrainConfig` fields (``model:`` picks the preset it starts
from); ``overrides=["mae.steps=20", "optimizer=adamw", "clip.phases=[[0, 32, 4]]"]`` sets dotted
keys, each value parsed as YAML. Every error is a :class:`ConfigError` (a ValueError) naming the key.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

STAGES = ("mae", "hashtag", "clip")
MODEL_NAMES = ("tiny", "s16", "b16", "l16", "h14")
LARGE_MODELS = ("l16", "h14")  # FSDP2 by default when distributed


class ConfigError(ValueError):
    """A bad configuration value; the message names the key, the expected and the given."""


@dataclass
class Phase:
    """One step of progressive resolution: from fraction ``at`` of the stage's steps on, images
    are ``img_size`` pixels square and video clips ``clip_len`` frames of that size."""

    at: float
    img_size: int
    clip_len: int = 4


@dataclass
class StageConfig:
    """One training stage (mae, hashtag or clip).

    batch_size: global batch of image samples in the first phase; later phases scale it by the
        token-count ratio so that batch x tokens (activation memory) stays flat.
    lr, weight_decay: None = the optimizer's default for this stage (see ``OPTIM_DEFAULTS``).
    warmup: linear warm-up, a fraction of the steps (< 1) or a number of steps (>= 1); then a
        cosine down to ``min_lr_ratio`` x lr.
    video_every: every k-th step is a video batch (0: images only).
    model: keyword arguments of the stage model (``mask_ratio``, ``num_tags``, text tower ...).
    """

    steps: int = 100
    epochs: float | None = None
    batch_size: int = 32
    lr: float | None = None
    weight_decay: float | None = None
    warmup: float = 0.05
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    video_every: int = 0
    phases: list = field(default_factory=lambda: [Phase(0.0, 32, 4)])
    model: dict = field(default_factory=dict)


@dataclass
class DistillConfig:
    """Distillation from ``teacher`` (a checkpoint of a larger config, same stage): logit KL at
    ``temperature`` for hashtags, embedding (cosine) distillation for CLIP, scaled by ``weight``."""

    teacher: str | None = None
    weight: float = 1.0
    temperature: float = 2.0


@dataclass
class TrainConfig:
    """Everything a training run needs; ``python -m reference_model.train --help`` for the CLI."""

    model: str = "tiny"
    model_overrides: dict = field(default_factory=dict)  # create_vit(**overrides)
    # token reduction while training the hashtag and CLIP stages (MAE's encoder sees only the
    # visible tokens): xray_ops.EViTConfig / ToMeConfig fields, e.g. {keep_rate: 0.7,
    # locations: [2, 4], shrink_steps: 100}; None = off
    evit: dict | None = None
    tome: dict | None = None
    stage: str = "all"
    data: str = "synthetic"  # synthetic | openclipart | fashion-mnist | a path; '+' joins sources
    video_data: str = "synthetic"  # synthetic | none | a path
    data_size: int = 2048  # samples of each synthetic source
    out: str = "runs/train"
    ops: str = "xray"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    optimizer: str = "lion"  # lion | adamw
    accum: int = 1  # gradient accumulation: micro-batches per optimizer step
    grad_checkpointing: bool = False
    compile: bool = False
    parallel: str = "auto"  # auto | none | ddp | fsdp  (auto: fsdp for l16/h14 when distributed)
    ddp_find_unused: bool = False  # DDP's find_unused_parameters (a model with unused params)
    num_workers: int = 0
    ckpt_every: int = 0  # 0: checkpoint only at the end of a stage and on SIGTERM / SIGINT
    keep_checkpoints: int = 2
    log_every: int = 10
    stop_after: int | None = None  # stop (with a checkpoint) after this many steps of a stage
    resume: str | None = None  # "auto" (latest in out) or a checkpoint path
    init: str | None = None  # a checkpoint whose encoder initialises the (first) stage
    distill: DistillConfig = field(default_factory=DistillConfig)
    mae: StageConfig = field(default_factory=StageConfig)
    hashtag: StageConfig = field(default_factory=StageConfig)
    clip: StageConfig = field(default_factory=StageConfig)

    def stages(self) -> list[str]:
        return list(STAGES) if self.stage == "all" else [self.stage]

    def stage_config(self, stage: str) -> StageConfig:
        return getattr(self, stage)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# lr / weight decay per optimizer and stage. Lion takes a 3-10x smaller lr and a 3-10x larger
# weight decay than AdamW for the same effective update (Chen et al. 2023, section 5).
OPTIM_DEFAULTS = {
    "lion": {"mae": (3e-4, 0.5), "hashtag": (3e-4, 0.5), "clip": (2e-4, 0.5)},
    "adamw": {"mae": (1.5e-3, 0.05), "hashtag": (1e-3, 0.05), "clip": (1e-3, 0.1)},
}


def _preset(model: str) -> TrainConfig:
    """Training preset of a named model config (batch sizes, resolution schedule, steps)."""
    if model == "tiny":
        # the demo's model: 24 px then 32 px images (37 then 65 tokens), 4- then 8-frame clips
        # (the eval's length), a few hundred steps per stage on 2 CPU cores
        phases = [Phase(0.0, 24, 4), Phase(0.5, 32, 8)]
        cfg = TrainConfig(model=model)
        cfg.mae = StageConfig(steps=200, batch_size=64, phases=copy.deepcopy(phases),
                              video_every=4, warmup=0.05)
        cfg.hashtag = StageConfig(steps=200, batch_size=64, phases=copy.deepcopy(phases),
                                  video_every=4)
        cfg.clip = StageConfig(steps=300, batch_size=64, phases=copy.deepcopy(phases),
                               video_every=4)
        return cfg
    # the paper's configs: 224 px in the end, a lower resolution first (FixRes / FLIP style)
    phases = [Phase(0.0, 160, 8), Phase(0.6, 192, 8), Phase(0.85, 224, 16)]
    big = {"s16": 256, "b16": 256, "l16": 128, "h14": 64}[model]
    cfg = TrainConfig(model=model)
    for s in STAGES:
        setattr(cfg, s, StageConfig(steps=10000, batch_size=big, phases=copy.deepcopy(phases),
                                    video_every=4, warmup=0.02))
    return cfg


# ----------------------------------------------------------------------------------------------
# loading and overrides
# ----------------------------------------------------------------------------------------------
def load_config(config: str, overrides: list[str] | None = None) -> TrainConfig:
    """A named model config (``tiny`` ... ``h14``) or a YAML file, then ``key=value`` overrides."""
    if config in MODEL_NAMES:
        cfg = _preset(config)
    else:
        data = _read_yaml(config)
        model = data.pop("model", "tiny")
        if model not in MODEL_NAMES:
            raise ConfigError(f"--config {config}: model: expected one of {list(MODEL_NAMES)}, "
                              f"got {model!r}")
        cfg = _preset(model)
        for key, value in _flatten(data):
            set_key(cfg, key, value)
    apply_overrides(cfg, overrides or [])
    return cfg


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """``key=value`` items (dotted keys, YAML values) applied in order."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. mae.steps=20)")
        key, raw = item.split("=", 1)
        set_key(cfg, key.strip(), _parse_value(raw, key))
    return cfg


def _read_yaml(path: str) -> dict:
    import yaml

    if not os.path.exists(path):
        raise ConfigError(f"--config {path}: no such file, and not a named config "
                          f"(expected one of {list(MODEL_NAMES)} or a YAML file)")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--config {path}: cannot read it: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of keys to values, got "
                          f"{type(data).__name__}")
    return data


def _flatten(data: dict, prefix: str = ""):
    """(dotted key, value) pairs; nested mappings of dataclass fields are descended into, but a
    dict-valued field (model_overrides, a stage's model) is set whole."""
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in _DICT_FIELDS and not key.endswith(".model"):
            yield from _flatten(v, key + ".")
        else:
            yield key, v


_DICT_FIELDS = {"model_overrides", "evit", "tome"}


def _parse_value(raw: str, key: str):
    import yaml

    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ConfigError(f"override {key}: cannot parse the value {raw!r}") from None


def set_key(cfg: TrainConfig, key: str, value: Any) -> None:
    """Set a dotted key (``mae.steps``, ``distill.weight``, ``model_overrides.depth``) with a
    type check against the field's default."""
    parts = key.split(".")
    obj: Any = cfg
    for i, p in enumerate(parts[:-1]):
        if isinstance(obj, dict):
            obj = obj.setdefault(p, {})
        elif dataclasses.is_dataclass(obj) and p in {f.name for f in dataclasses.fields(obj)}:
            obj = getattr(obj, p)
        else:
            raise ConfigError(f"unknown key {key!r} ({'.'.join(parts[:i + 1])!r} is not a "
                              f"setting; see --help)")
    last = parts[-1]
    if isinstance(obj, dict):
        obj[last] = value
        return
    names = {f.name: f for f in dataclasses.fields(obj)}
    if last not in names:
        raise ConfigError(f"unknown key {key!r} (expected one of {sorted(names)})")
    setattr(obj, last, _coerce(key, getattr(obj, last), value))


def _coerce(key: str, current: Any, value: Any) -> Any:
    if key.endswith("phases"):
        return _phases(key, value)
    if current is None or value is None:
        return value
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if isinstance(current, int) and not isinstance(current, bool):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if isinstance(current, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if isinstance(current, str) and not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if isinstance(current, dict) and not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    return value


def _phases(key: str, value: Any) -> list[Phase]:
    """Phases from [[at, img_size, clip_len], ...] or [{at:, img_size:, clip_len:}, ...]."""
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key}: expected a non-empty list of [at, img_size, clip_len], "
                          f"got {value!r}")
    out = []
    for i, p in enumerate(value):
        if isinstance(p, Phase):
            out.append(p)
        elif isinstance(p, dict):
            try:
                out.append(Phase(**p))
            except TypeError as e:
                raise ConfigError(f"{key}[{i}]: {e}") from None
        elif isinstance(p, (list, tuple)) and len(p) in (2, 3):
            out.append(Phase(*p))
        else:
            raise ConfigError(f"{key}[{i}]: expected [at, img_size, clip_len], got {p!r}")
    return out


# ----------------------------------------------------------------------------------------------
# validation (before any work starts)
# ----------------------------------------------------------------------------------------------
def _choice(key, value, choices):
    if value not in choices:
        raise ConfigError(f"{key}: expected one of {list(choices)}, got {value!r}")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every setting; raises ConfigError naming the first bad one."""
    _choice("model", cfg.model, MODEL_NAMES)
    _choice("stage", cfg.stage, (*STAGES, "all"))
    _choice("ops", cfg.ops, ("xray", "torch"))
    _choice("optimizer", cfg.optimizer, tuple(OPTIM_DEFAULTS))
    _choice("precision", cfg.precision, ("auto", "fp32", "bf16"))
    _choice("parallel", cfg.parallel, ("auto", "none", "ddp", "fsdp"))
    dev = cfg.device
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ConfigError(f"device: expected auto, cpu, cuda or cuda:N, got {dev!r}")
    for key in ("accum", "keep_checkpoints", "log_every"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key}: expected an integer >= 1, got {getattr(cfg, key)}")
    for key in ("ckpt_every", "num_workers", "seed"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key}: expected an integer >= 0, got {getattr(cfg, key)}")
    if cfg.stop_after is not None and cfg.stop_after < 1:
        raise ConfigError(f"stop_after: expected an integer >= 1, got {cfg.stop_after}")
    if cfg.data_size < 1:
        raise ConfigError(f"data_size: expected an integer >= 1, got {cfg.data_size}")
    d = cfg.distill
    if d.teacher is not None:
        if not os.path.exists(d.teacher):
            raise ConfigError(f"distill.teacher: no such checkpoint {d.teacher!r}")
        if d.weight < 0 or d.temperature <= 0:
            raise ConfigError(f"distill: expected weight >= 0 and temperature > 0, got "
                              f"weight={d.weight}, temperature={d.temperature}")
    for path_key in ("init",):
        p = getattr(cfg, path_key)
        if p is not None and not os.path.exists(p):
            raise ConfigError(f"{path_key}: no such checkpoint {p!r}")
    if cfg.resume not in (None, "auto") and not os.path.exists(cfg.resume):
        raise ConfigError(f"resume: no such checkpoint {cfg.resume!r}")
    for s in STAGES:
        _validate_stage(s, cfg.stage_config(s))
    return cfg


def _validate_stage(name: str, sc: StageConfig) -> None:
    if sc.steps < 1:
        raise ConfigError(f"{name}.steps: expected an integer >= 1, got {sc.steps}")
    if sc.epochs is not None and not sc.epochs > 0:
        raise ConfigError(f"{name}.epochs: expected a number > 0, got {sc.epochs}")
    if sc.batch_size < 1:
        raise ConfigError(f"{name}.batch_size: expected an integer >= 1, got {sc.batch_size}")
    for key in ("lr", "weight_decay"):
        v = getattr(sc, key)
        if v is not None and not v >= 0:
            raise ConfigError(f"{name}.{key}: expected a number >= 0, got {v}")
    if sc.warmup < 0 or not 0 <= sc.min_lr_ratio <= 1 or sc.grad_clip < 0:
        raise ConfigError(f"{name}: expected warmup >= 0, 0 <= min_lr_ratio <= 1, grad_clip >= 0; "
                          f"got {sc.warmup}, {sc.min_lr_ratio}, {sc.grad_clip}")
    if sc.video_every < 0:
        raise ConfigError(f"{name}.video_every: expected an integer >= 0, got {sc.video_every}")
    ats = [p.at for p in sc.phases]
    if ats[0] != 0 or any(b <= a for a, b in zip(ats, ats[1:])) or ats[-1] >= 1:
        raise ConfigError(f"{name}.phases: expected starts 0 = at_0 < at_1 < ... < 1, got {ats}")
    for p in sc.phases:
        if p.img_size < 1 or p.clip_len < 1:
            raise ConfigError(f"{name}.phases: expected img_size >= 1 and clip_len >= 1, got {p}")


def stage_optim(cfg: TrainConfig, stage: str) -> tuple[float, float]:
    """(lr, weight_decay) of a stage: its own values, else the optimizer's defaults."""
    sc = cfg.stage_config(stage)
    lr, wd = OPTIM_DEFAULTS[cfg.optimizer][stage]
    return (sc.lr if sc.lr is not None else lr,
            sc.weight_decay if sc.weight_decay is not None else wd)
