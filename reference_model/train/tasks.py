"""The three stages as tasks: build the stage model from a spec, compute the loss of a batch,
and (hashtag, clip) the distillation loss against a teacher.

A *spec* is the JSON record that rebuilds a stage model (it travels in every checkpoint):
``{"stage", "model", "overrides", "ops", "kwargs", "vocab"}``. :class:`ModelAPI` is what the
trainer uses of the model package (README "Model"); the default is ``reference_model``'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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
    from reference_model.text import create_text_tower

    def text_tower(kind, *, model, ops, **overrides):
        return create_text_tower(kind, rm.get_config(model, **overrides), ops=ops)

    return ModelAPI(create_vit=rm.create_vit, mae=rm.MAEModel, hashtag=rm.HashtagModel,
                    clip=rm.CLIPModel, text_tower=text_tower)


def token_reduction(spec: dict) -> dict:
    """create_vit's evit= / tome= from a spec's JSON settings (absent: none)."""
    import xray_ops as xo

    out = {}
    if spec.get("evit"):
        out["evit"] = xo.EViTConfig(**{k: tuple(v) if isinstance(v, list) else v
                                       for k, v in spec["evit"].items()})
    if spec.get("tome"):
        r = spec["tome"].get("r", 0)
        out["tome"] = xo.ToMeConfig(**dict(spec["tome"], r=r))
    return out


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
        reduce = self.stage != "mae"
        return {"stage": self.stage, "model": cfg.model, "overrides": dict(cfg.model_overrides),
                "ops": cfg.ops, "kwargs": dict(cfg.stage_config(self.stage).model),
                "vocab": None, "evit": cfg.evit if reduce else None,
                "tome": cfg.tome if reduce else None}

    def build(self, spec: dict, ops: str | None = None) -> nn.Module:
        vit = self.api.create_vit(spec["model"], ops=ops or spec["ops"], **token_reduction(spec),
                                  **spec["overrides"])
        return self._wrap(vit, spec, ops or spec["ops"])

    def _wrap(self, vit, spec, ops):  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, call: nn.Module, model: nn.Module, x: torch.Tensor, batch: dict, d):
        raise NotImplementedError  # pragma: no cover - abstract

    def adapt_to_teacher(self, spec: dict, teacher: nn.Module) -> dict:
        """The student's spec adjusted so its outputs compare with the teacher's."""
        return spec

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

    def adapt_to_teacher(self, spec, teacher):
        # logit distillation compares tag by tag: the student takes the teacher's vocabulary
        return dict(spec, vocab=teacher._train_spec["vocab"])

    def distill_loss(self, outputs, teacher, x, batch, dcfg):
        from reference_model.losses import logit_distillation_loss

        with torch.no_grad():
            t_logits = teacher(x).float()
        kind = "sigmoid" if getattr(teacher, "loss_kind", "softmax") == "bce" else "softmax"
        return logit_distillation_loss(outputs["logits"].float(), t_logits,
                                       temperature=dcfg.temperature, kind=kind)


class CLIPTask(Task):
    """Contrastive image-text training, plus the caption-siamese loss on the second caption
    (``siamese_weight`` of the model). Under DDP the embeddings of every rank are gathered with
    their gradients and each rank computes the loss of its own rows against all columns
    (open_clip's local_loss + gather_with_grad): the gradient of one process on the global
    batch. Distillation: 1 - cos between the student's and the teacher's image and text
    embeddings (the student is built with the teacher's embedding width)."""

    stage = "clip"

    def spec(self, cfg, datasets) -> dict:
        spec = super().spec(cfg, datasets)
        spec["kwargs"].setdefault("text", "clip")
        return spec

    def _wrap(self, vit, spec, ops):
        kw = dict(spec["kwargs"])
        text = self.api.text_tower(kw.pop("text"), model=spec["model"], ops=ops,
                                   **spec["overrides"])
        return self.api.clip(vit, text, **kw)

    def loss(self, call, model, x, batch, d):
        captions = list(batch["caption"])
        siamese = getattr(model, "siamese_weight", 0.0) > 0 and "caption2" in batch
        texts = captions + list(batch["caption2"]) if siamese else captions
        img, txt_all, scale = call(x, texts)
        txt, txt2 = (txt_all[:len(captions)], txt_all[len(captions):]) if siamese \
            else (txt_all, None)
        if d.active:
            from reference_model.losses import caption_siamese_loss

            loss = local_contrastive_loss(img, txt, scale, d)
            if siamese:
                loss = loss + model.siamese_weight * caption_siamese_loss(txt, txt2)
        else:
            loss = model.loss(img, txt, scale, txt2)
        return loss, {"image_emb": img, "text_emb": txt}

    def adapt_to_teacher(self, spec, teacher):
        # the student's projections map into the teacher's embedding width
        return dict(spec, kwargs=dict(spec["kwargs"], embed_dim=int(teacher.embed_dim)))

    def distill_loss(self, outputs, teacher, x, batch, dcfg):
        from reference_model.losses import embedding_distillation_loss

        with torch.no_grad():
            t_img, t_txt, _ = teacher(x, list(batch["caption"]))
        return (embedding_distillation_loss(outputs["image_emb"].float(), t_img.float())
                + embedding_distillation_loss(outputs["text_emb"].float(), t_txt.float())) / 2


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


def stage_task(stage: str, api: ModelAPI | None = None) -> Task:
    return TASKS[stage](api or default_api())


def vocab_tags(spec: dict) -> list[str] | None:
    return list(spec["vocab"]["tags"]) if spec.get("vocab") else None


def annotate(model: nn.Module, spec: dict) -> nn.Module:
    """Keep the spec (and the vocabulary's tags) on the model: the loss and checkpoints read it."""
    model._train_spec = spec
    model._train_vocab_tags = vocab_tags(spec)
    return model

