"""The three stages as tasks: build the stage model from a spec, compute the loss of a batch,
and (hashtag, clip) the distillation loss against a teacher.

A *spec* is the JSON record that rebuilds a stage model (it travels in every checkpoint):
``{"stage", "model", "overrides", "ops", "kwargs", "vocab"}``. :class:`ModelAPI` is what the
trainer uses of the model package (README "Model"); the default is ``reference_model``'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelAPI:
    """The model package as the trainer sees it (tests pass a small stand-in)."""

    create_vit: Callable[..., nn.Module]  # create_vit(name, *, ops, **overrides)
    mae: Callable[..., nn.Module]  # MAEModel(vit, **kwargs)
    hashtag: Callable[..., nn.Module]  # HashtagModel(vit, num_tags, **kwargs)
    clip: Callable[..., nn.Module]  # CLIPModel(vit, text_tower, **kwargs)
    text_tower: Callable[..., nn.Module]  # text_tower(model_name, *, ops, **kwargs)


def default_api() -> ModelAPI:
    import reference_model as rm
    from reference_model import text

    return ModelAPI(create_vit=rm.create_vit, mae=rm.MAEModel, hashtag=rm.HashtagModel,
                    clip=rm.CLIPModel, text_tower=text.build_text_tower)


def find_encoder(model: nn.Module) -> nn.Module:
    """The ViT inside a stage model (attribute ``vit``, ``visual`` or ``encoder``)."""
    m = getattr(model, "module", model)  # DDP
    m = getattr(m, "_orig_mod", m)  # torch.compile
    for name in ("vit", "visual", "encoder"):
        enc = getattr(m, name, None)
        if isinstance(enc, nn.Module):
            return enc
    raise AttributeError(f"{type(m).__name__}: no ViT found (expected an attribute vit, visual "
                         f"or encoder)")


def encoder_prefix(model: nn.Module) -> str:
    """The state-dict prefix of the stage model's ViT, e.g. ``"vit."``."""
    enc = find_encoder(model)
    for name, m in model.named_modules():
        if m is enc:
            return name + "."
    raise AttributeError("encoder not found among the model's modules")


class Task:
    """One stage. ``loss`` returns (scalar loss, outputs for distillation)."""

    stage = ""

    def __init__(self, api: ModelAPI):
        self.api = api

    def spec(self, cfg, datasets) -> dict:
        """The spec of this stage's model for a run (may read the training data: vocabulary)."""
        return {"stage": self.stage, "model": cfg.model, "overrides": dict(cfg.model_overrides),
                "ops": cfg.ops, "kwargs": dict(cfg.stage_config(self.stage).model),
                "vocab": None}

    def build(self, spec: dict, ops: str | None = None) -> nn.Module:
        vit = self.api.create_vit(spec["model"], ops=ops or spec["ops"], **spec["overrides"])
        return self._wrap(vit, spec, ops or spec["ops"])

    def _wrap(self, vit, spec, ops):  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, call: nn.Module, model: nn.Module, x: torch.Tensor, batch: dict, d):
        raise NotImplementedError  # pragma: no cover - abstract

    def distill_loss(self, outputs: dict, teacher: nn.Module, x, batch, dcfg) -> torch.Tensor:
        raise ValueError(f"distillation: the {self.stage} stage has no distillation loss "
                         f"(only hashtag and clip)")


class MAETask(Task):
    stage = "mae"

    def _wrap(self, vit, spec, ops):
        return self.api.mae(vit, **spec["kwargs"])

    def loss(self, call, model, x, batch, d):
        loss, _pred, _mask = call(x)
        return loss, {}


class HashtagTask(Task):
    """Hashtag classification over the vocabulary of the training data; distillation: KL of the
    student's tag distribution to the teacher's at a temperature (Hinton et al.)."""

    stage = "hashtag"

    def spec(self, cfg, datasets) -> dict:
        from reference_model.data import HashtagVocab

        spec = super().spec(cfg, datasets)
        kw = dict(spec["kwargs"])
        max_tags = kw.pop("max_tags", None)
        min_count = kw.pop("min_tag_count", 1)
        spec["kwargs"] = kw
        lists = [tags for ds in datasets for tags in _hashtag_lists(ds)]
        vocab = HashtagVocab.build(lists, min_count=min_count, max_size=max_tags)
        if len(vocab) == 0:
            raise ValueError("hashtag stage: the training data has no hashtags (vocabulary empty)")
        spec["vocab"] = vocab.state_dict()
        return spec

    def _wrap(self, vit, spec, ops):
        return self.api.hashtag(vit, len(spec["vocab"]["tags"]), **spec["kwargs"])

    def _targets(self, model, batch, device):
        from reference_model.data import HashtagVocab

        vocab = getattr(self, "_vocab", None)
        if vocab is None or vocab.tags != model._train_vocab_tags:
            vocab = self._vocab = HashtagVocab(model._train_vocab_tags)
        return vocab.encode_batch(batch["hashtags"]).to(device)

    def loss(self, call, model, x, batch, d):
        logits = call(x)
        targets = self._targets(model, batch, logits.device)
        return model.loss(logits.float(), targets), {"logits": logits}

    def distill_loss(self, outputs, teacher, x, batch, dcfg):
        with torch.no_grad():
            t_logits = teacher(x).float()
        return logit_kl(outputs["logits"].float(), t_logits, dcfg.temperature)


class CLIPTask(Task):
    """Contrastive image-text training. Under DDP the embeddings of every rank are gathered with
    their gradients and each rank computes the loss of its own rows against all columns
    (open_clip's local_loss + gather_with_grad): the same gradient as one process on the global
    batch. Distillation: the student's image↔text similarity distributions match the teacher's
    (affinity mimicking, as TinyCLIP), which works across embedding widths."""

    stage = "clip"

    def spec(self, cfg, datasets) -> dict:
        spec = super().spec(cfg, datasets)
        spec["kwargs"].setdefault("text", "transformer")
        return spec

    def _wrap(self, vit, spec, ops):
        kw = dict(spec["kwargs"])
        text = self.api.text_tower(kw.pop("text"), model=spec["model"], ops=ops,
                                   **spec["overrides"])
        return self.api.clip(vit, text, **kw)

    def loss(self, call, model, x, batch, d):
        img, txt, scale = call(x, list(batch["caption"]))
        if d.active:
            loss = local_contrastive_loss(img, txt, scale, d)
        else:
            loss = model.loss(img, txt, scale)
        return loss, {"image_emb": img, "text_emb": txt}

    def distill_loss(self, outputs, teacher, x, batch, dcfg):
        with torch.no_grad():
            t_img, t_txt, _ = teacher(x, list(batch["caption"]))
        return affinity_kl(outputs["image_emb"].float(), outputs["text_emb"].float(),
                           t_img.float(), t_txt.float(), dcfg.temperature)


TASKS: dict[str, type[Task]] = {"mae": MAETask, "hashtag": HashtagTask, "clip": CLIPTask}


def _hashtag_lists(ds) -> list[list[str]]:
    if hasattr(ds, "hashtag_lists"):
        return ds.hashtag_lists()
    if hasattr(ds, "datasets"):  # ConcatDataset
        return [t for sub in ds.datasets for t in _hashtag_lists(sub)]
    return [ds[i]["hashtags"] for i in range(len(ds))]


# ----------------------------------------------------------------------------------------------
# losses the trainer adds to the model's own
# ----------------------------------------------------------------------------------------------
def local_contrastive_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, d
                           ) -> torch.Tensor:
    """CLIP loss of this rank's rows against the gathered global batch (open_clip local_loss).

    img, txt: (b, E) normalised embeddings of this rank; scale: the (exp'd) logit scale.
    Equivalent in one process (world 1): ``(CE(s·I·Tᵀ, arange) + CE(s·T·Iᵀ, arange)) / 2``.
    """
    all_img, all_txt = d.all_gather_with_grad(img), d.all_gather_with_grad(txt)
    labels = torch.arange(img.shape[0], device=img.device) + d.rank * img.shape[0]
    li = scale * img @ all_txt.T
    lt = scale * txt @ all_img.T
    return (F.cross_entropy(li.float(), labels) + F.cross_entropy(lt.float(), labels)) / 2


def logit_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher/T) ‖ softmax(student/T)) · T², mean over the batch (Hinton et al.).

    student, teacher: (B, V) logits over the same vocabulary.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"distillation: the teacher's logits {tuple(teacher.shape)} do not match "
                         f"the student's {tuple(student.shape)} (same vocabulary needed)")
    t = temperature
    return F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1),
                    log_target=True, reduction="batchmean") * t * t


def affinity_kl(s_img, s_txt, t_img, t_txt, temperature: float) -> torch.Tensor:
    """Affinity mimicking: the KL of the student's image→text and text→image similarity
    distributions to the teacher's, over the batch (embeddings L2-normalised; widths may differ).

    Equivalent: ``(logit_kl(Si·Stᵀ/τ, Ti·Ttᵀ/τ, 1) + logit_kl(St·Siᵀ/τ, Tt·Tiᵀ/τ, 1)) / 2`` with
    τ = 1 / (10 · temperature) (cosine similarities scaled like a CLIP logit scale of 10/T).
    """
    tau = 1.0 / (10.0 * temperature)
    s_img, s_txt = F.normalize(s_img, dim=-1), F.normalize(s_txt, dim=-1)
    t_img, t_txt = F.normalize(t_img, dim=-1), F.normalize(t_txt, dim=-1)
    s = s_img @ s_txt.T / tau
    t = t_img @ t_txt.T / tau
    return (logit_kl(s, t, 1.0) + logit_kl(s.T, t.T, 1.0)) / 2


def stage_task(stage: str, api: ModelAPI | None = None) -> Task:
    return TASKS[stage](api or default_api())


def vocab_tags(spec: dict) -> list[str] | None:
    return list(spec["vocab"]["tags"]) if spec.get("vocab") else None


def annotate(model: nn.Module, spec: dict) -> nn.Module:
    """Keep the spec (and the vocabulary's tags) on the model: the loss and checkpoints read it."""
    model._train_spec = spec
    model._train_vocab_tags = vocab_tags(spec)
    return model


_ = (math, Any)
