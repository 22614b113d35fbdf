"""``evaluate``: every metric of a CLIP (+ hashtag) model, its variants and its robustness.

Variants of the model (same weights): ``float``; ``int8`` (xray_ops.quantize_ on the image
side: the ViT and the visual projection, and the whole hashtag model); ``tome`` / ``evit``
(switched on at inference only, ``vit.token_reduction``). Variants of the retrieval:
``index_int8`` and ``index_pca_int8`` (the float embeddings through xray_ops.EmbeddingIndex,
int8 codes at full width and at PCA width / 4). Robustness of the float model: ``noise``,
``blur`` (domain shift) and ``fgsm`` (an adversarial step against each task's own loss).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from . import metrics as M
from . import robustness as R
from .data import EvalData, build_eval_data
from .report import format_table

VARIANTS = ("float", "int8", "tome", "evit", "index")
KS = (1, 5, 10)
# the metrics a whole-model variant is compared on (points lost vs float)
COMPARED = ("zero_shot_top1", "i2t_r1", "t2i_r1", "relation_top1", "video_top1",
            "video_probe_top1", "hashtag_map", "fmnist_top1")


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------
def _batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int,
             device) -> torch.Tensor:
    outs = [fn(x[i:i + batch_size].to(device)).float().cpu()
            for i in range(0, x.shape[0], batch_size)]
    return torch.cat(outs)


def _encode_texts(model, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.encode_text(texts[i:i + batch_size]).float().cpu()
                          for i in range(0, len(texts), batch_size)])


def _vits(*models) -> list:
    """The distinct ViTs of the given stage models."""
    out = []
    for m in models:
        v = getattr(m, "vit", None) if m is not None else None
        if v is not None and all(v is not o for o in out):
            out.append(v)
    return out


@contextlib.contextmanager
def _reduction(models, evit=None, tome=None):
    """EViT / ToMe on every ViT of ``models`` for the duration (inference only)."""
    with contextlib.ExitStack() as stack:
        for vit in _vits(*models):
            stack.enter_context(vit.token_reduction(evit=evit, tome=tome))
        yield


def default_tome(vit, size: int):
    """ToMe's r for the eval: about half of the image tokens merged over the depth."""
    import xray_ops as xo

    n = (size // vit.cfg.patch_size) ** 2
    return xo.ToMeConfig(r=max(1, n // (2 * len(vit.blocks))))


def default_evit(vit):
    """EViT at a quarter, half and three quarters of the depth (ViT-S/B's 3, 6, 9; tiny's 2,
    3, 4), keep rate 0.7; never at the last block (nothing after it would see the change)."""
    import xray_ops as xo

    d = len(vit.blocks)
    locs = sorted({round(d * f) for f in (0.25, 0.5, 0.75)} & set(range(max(1, d - 1))))
    return xo.EViTConfig(keep_rate=0.7, locations=tuple(locs))


TEXT_SIDE = ("text_tower", "text_proj")  # CLIPModel's text modules: they stay float


def quantized_copy(model, keep_shared=()):
    """A deep copy of ``model`` with xray_ops.quantize_ applied to its image side: every
    nn.Linear except those of the text side (TEXT_SIDE). ``keep_shared`` modules (the text
    tower) are shared with the original instead of copied.

    Equivalent: ``xo.quantize_(copy.deepcopy(model), filter_fn=lambda m, name: not
    name.startswith(TEXT_SIDE))``.
    """
    import xray_ops as xo

    memo = {id(m): m for m in keep_shared if m is not None}
    q = copy.deepcopy(model, memo)
    return xo.quantize_(q, filter_fn=lambda m, name: not name.split(".")[0] in TEXT_SIDE)


# ----------------------------------------------------------------------------------------------
# the text side: computed once, shared by every variant
# ----------------------------------------------------------------------------------------------
class _TextSide:
    def __init__(self, model, data: EvalData, hashtag_model, vocab):
        self.scale = float(model.scale().detach()) if hasattr(model, "scale") else 100.0
        enc = model.encode_text
        self.classes = M.class_embeddings(enc, data.classes, data.prompts)
        # shape (colour) classifiers: the colour-shape classes averaged over the colours
        # (shapes): the prompt ensemble runs over the attribute not asked about, in the words
        # the captions use ("a small red star"), not a bare "a star." no caption ever had
        grid = self.classes.view(len(data.colour_classes), len(data.shape_classes), -1)
        self.shapes = F.normalize(grid.mean(0), dim=-1)
        self.colours = F.normalize(grid.mean(1), dim=-1)
        self.motions = M.class_embeddings(enc, data.motion_classes, data.motion_prompts)
        # retrieval: the distinct captions are the text gallery; an image's group is its
        # caption's position there (several single-object images share a caption)
        self.texts = list(dict.fromkeys(data.captions))
        pos = {t: i for i, t in enumerate(self.texts)}
        self.image_groups = torch.tensor([pos[c] for c in data.captions])
        self.text_groups = torch.arange(len(self.texts))
        self.text_emb = _encode_texts(model, self.texts)
        # the relation test: each two-object image's caption and its relation-inverted twin
        self.two = torch.tensor([w is not None for w in data.swapped], dtype=torch.bool)
        if data.swapped and self.two.any():
            self.swapped_emb = _encode_texts(model, [w for w in data.swapped if w is not None])
            self.true_emb = self.text_emb[self.image_groups[self.two]]
        else:
            self.two = torch.zeros(len(data.captions), dtype=torch.bool)
            self.swapped_emb = self.true_emb = None
        # hashtags: the hashtag model's vocabulary, or zero-shot prompts for the eval's tags
        if hashtag_model is not None:
            if vocab is None:
                raise ValueError("vocab: a hashtag_model needs its HashtagVocab to score tags")
            if len(vocab) != getattr(hashtag_model, "num_tags", len(vocab)):
                raise ValueError(f"vocab: expected {hashtag_model.num_tags} tags like the "
                                 f"hashtag model, got {len(vocab)}")
            self.tags = list(vocab.tags)
            self.tag_emb = None
            self.hashtag_source = "hashtag_model"
        else:
            self.tags = sorted({t for tags in data.hashtags for t in tags})
            self.tag_emb = M.class_embeddings(enc, [t.replace("_", " ") for t in self.tags],
                                              ["a photo of {}.", "{}.", "something {}."])
            self.hashtag_source = "zero-shot text prompts"
        index = {t: i for i, t in enumerate(self.tags)}
        self.tag_targets = torch.zeros(len(data.hashtags), len(self.tags))
        for r, tags in enumerate(data.hashtags):
            for t in tags:
                if t in index:
                    self.tag_targets[r, index[t]] = 1.0
        self.fmnist = None
        if data.fmnist_images is not None:
            self.fmnist = M.class_embeddings(enc, data.fmnist_classes, data.fmnist_prompts)


def _chance_block(data: EvalData, text: _TextSide) -> dict:
    ch = M.retrieval_chance(text.image_groups, text.text_groups, KS)
    out = {"zero_shot_chance": M.topk_chance(len(data.classes)),
           "zero_shot_top5_chance": M.topk_chance(len(data.classes), 5),
           "zero_shot_shape_chance": M.topk_chance(len(data.shape_classes)),
           "zero_shot_colour_chance": M.topk_chance(len(data.colour_classes)),
           "video_chance": M.topk_chance(len(data.motion_classes)),
           "relation_chance": 0.5,
           "video_probe_chance": M.topk_chance(len(data.motion_classes))}
    for k in KS:
        out[f"i2t_chance_r{k}"] = ch[f"i2t_r{k}"]
        out[f"t2i_chance_r{k}"] = ch[f"t2i_r{k}"]
        out[f"retrieval_chance_r{k}"] = 0.5 * (ch[f"i2t_r{k}"] + ch[f"t2i_r{k}"])
    if text.tag_targets.sum() > 0:
        out["hashtag_map_chance"] = M.map_chance(text.tag_targets)
    if text.fmnist is not None:
        out["fmnist_chance"] = M.topk_chance(len(data.fmnist_classes))
    return out


# ----------------------------------------------------------------------------------------------
# one variant: image-side encoders -> metrics
# ----------------------------------------------------------------------------------------------
class _Encoders:
    """The image side of one variant: embeddings and hashtag scores of inputs in [0, 1]."""

    def __init__(self, model, hashtag_model, text: _TextSide, batch_size: int, device):
        self.model, self.hashtag_model, self.text = model, hashtag_model, text
        self.bs, self.device = batch_size, device

    @torch.no_grad()
    def embed(self, x: torch.Tensor, batch_size: Optional[int] = None) -> torch.Tensor:
        return _batched(self.model.encode_image, x, batch_size or self.bs, self.device)

    @torch.no_grad()
    def tag_scores(self, x: torch.Tensor, emb: Optional[torch.Tensor]) -> torch.Tensor:
        if self.hashtag_model is not None:
            return _batched(self.hashtag_model, x, self.bs, self.device)
        return F.normalize(emb, dim=-1) @ self.text.tag_emb.T


def _image_metrics(enc: _Encoders, data: EvalData, images: torch.Tensor,
                   zs_images: Optional[torch.Tensor] = None,
                   tag_images: Optional[torch.Tensor] = None) -> dict:
    """Zero-shot (on the single-object images, or ``zs_images``: the same images perturbed
    for this task), retrieval and hashtag mAP (on ``tag_images`` when given)."""
    text = enc.text
    emb = enc.embed(images)
    single = data.single
    zs_emb = emb[single] if zs_images is None else enc.embed(zs_images)
    labels = data.labels[single]
    colour, shape = labels // len(data.shape_classes), labels % len(data.shape_classes)
    out = {"zero_shot_top1": M.zero_shot_accuracy(zs_emb, text.classes, labels),
           "zero_shot_top5": M.zero_shot_accuracy(zs_emb, text.classes, labels, k=5),
           "zero_shot_shape_top1": M.zero_shot_accuracy(zs_emb, text.shapes, shape),
           "zero_shot_colour_top1": M.zero_shot_accuracy(zs_emb, text.colours, colour)}
    out.update(M.retrieval_recall(emb, text.text_emb, text.image_groups, text.text_groups, KS))
    if text.swapped_emb is not None:
        out["relation_top1"] = M.pair_accuracy(emb[text.two], text.true_emb, text.swapped_emb)
    if text.tag_targets.sum() > 0:
        if tag_images is None:
            scores = enc.tag_scores(images, emb)
        else:
            scores = enc.tag_scores(tag_images, enc.embed(tag_images)
                                    if enc.hashtag_model is None else None)
        out["hashtag_map"] = M.mean_average_precision(scores, text.tag_targets)
    return out


def _video_metrics(enc: _Encoders, data: EvalData, clips: torch.Tensor,
                   probe_train: Optional[torch.Tensor]) -> tuple[dict, torch.Tensor]:
    """Zero-shot motion classification and the linear probe (fitted on ``probe_train``
    embeddings, the probe-train clips embedded by this variant)."""
    bs = max(1, enc.bs // 4)
    emb = enc.embed(clips, bs)
    if probe_train is None:
        probe_train = enc.embed(data.probe_clips, bs)
    out = {"video_top1": M.zero_shot_accuracy(emb, enc.text.motions, data.clip_labels),
           "video_probe_top1": M.linear_probe(probe_train, data.probe_labels, emb,
                                              data.clip_labels)}
    return out, probe_train


def _fmnist_metrics(enc: _Encoders, data: EvalData, images=None) -> dict:
    if enc.text.fmnist is None:
        return {}
    images = data.fmnist_images if images is None else images
    emb = enc.embed(images)
    return {"fmnist_top1": M.zero_shot_accuracy(emb, enc.text.fmnist, data.fmnist_labels)}


def _whole(enc: _Encoders, data: EvalData, chance: dict) -> tuple[dict, torch.Tensor]:
    out = _image_metrics(enc, data, data.images)
    video, probe_train = _video_metrics(enc, data, data.clips, None)
    out.update(video)
    out.update(_fmnist_metrics(enc, data))
    out.update(chance)
    return out, probe_train


# ----------------------------------------------------------------------------------------------
# retrieval through xray_ops.EmbeddingIndex
# ----------------------------------------------------------------------------------------------
def _index_block(image_emb: torch.Tensor, text: _TextSide, dim: Optional[int],
                 chance: dict) -> dict:
    import xray_ops as xo

    k = max(KS)
    out = {"dim": dim or image_emb.shape[1]}
    for name, gallery, queries, qg, gg in (
            ("i2t", text.text_emb, image_emb, text.image_groups, text.text_groups),
            ("t2i", image_emb, text.text_emb, text.text_groups, text.image_groups)):
        index = xo.EmbeddingIndex(dim=dim if dim is None else min(dim, gallery.shape[0] - 1))
        index.add(gallery.float())
        _, ids = index.search(queries.float(), k=min(k, len(index)))
        rec = M.recall_from_ids(ids.cpu(), qg, gg, KS)
        for kk in KS:
            out[f"{name}_r{kk}"] = rec[kk]
        out[f"{name}_bytes_ratio"] = index.memory_bytes() / index.float32_bytes()
    for kk in KS:
        for key in (f"i2t_chance_r{kk}", f"t2i_chance_r{kk}", f"retrieval_chance_r{kk}"):
            out[key] = chance[key]
    return out


# ----------------------------------------------------------------------------------------------
# robustness of the float model
# ----------------------------------------------------------------------------------------------
def _fgsm_block(enc: _Encoders, data: EvalData, eps: float, probe_train: torch.Tensor,
                chance: dict) -> dict:
    """FGSM against each task's own loss: the class CE for zero-shot (images) and motions
    (clips), the image→text InfoNCE over the caption gallery for retrieval and hashtags."""
    model, text, scale = enc.model, enc.text, enc.text.scale
    single = data.single
    labels = data.labels[single]
    bs = enc.bs

    def attack(x, targets, class_emb, batch):
        out = []
        for i in range(0, x.shape[0], batch):
            xb = x[i:i + batch].to(enc.device)
            tb = targets[i:i + batch].to(enc.device)
            ce = class_emb.to(enc.device)

            def loss(z, tb=tb, ce=ce):
                return F.cross_entropy(scale * model.encode_image(z) @ ce.T, tb)

            out.append(R.fgsm(loss, xb, eps).cpu())
        return torch.cat(out)

    zs_adv = attack(data.images[single], labels, text.classes, bs)
    ret_adv = attack(data.images, text.image_groups, text.text_emb, bs)
    clips_adv = attack(data.clips, data.clip_labels, text.motions, max(1, bs // 4))
    out = _image_metrics(enc, data, ret_adv, zs_images=zs_adv, tag_images=ret_adv)
    video, _ = _video_metrics(enc, data, clips_adv, probe_train)
    out.update(video)
    out.update(chance)
    out["eps"] = eps
    return out


def _perturbed_block(enc: _Encoders, data: EvalData, fn, probe_train, chance: dict) -> dict:
    out = _image_metrics(enc, data, fn(data.images))
    video, _ = _video_metrics(enc, data, fn(data.clips), probe_train)
    out.update(video)
    out.update(_fmnist_metrics(enc, data, None if data.fmnist_images is None
                               else fn(data.fmnist_images)))
    out.update(chance)
    return out


# ----------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------
def evaluate(clip_model, *, hashtag_model=None, vocab=None, size: int = 32, frames: int = 8,
             variants: Sequence[str] = VARIANTS, robustness: bool = True, tome=None,
             evit=None, n_images: int = 400, n_clips: int = 140, n_fmnist: int = 300,
             fashion_mnist: bool = True, seed: int = 1234, batch_size: int = 128,
             device="cpu", noise_std: float = 0.1, blur_sigma: float = 1.0,
             fgsm_eps: float = 2 / 255, index_dim: Optional[int] = None, out=None,
             show: bool = True, data: Optional[EvalData] = None) -> dict:
    """Evaluate a CLIP model (and optionally its hashtag model) on held-out data.

    Args:
        clip_model: a CLIPModel (``encode_image`` on images and clips, ``encode_text``).
        hashtag_model, vocab: a HashtagModel and its HashtagVocab for hashtag mAP; without
            them, mAP is zero-shot through the text tower.
        size, frames: the resolution and clip length the data is rendered at.
        variants: any of "float", "int8", "tome", "evit", "index" ("float" always runs).
        robustness: also "noise" (std ``noise_std``), "blur" (σ ``blur_sigma`` px), "fgsm"
            (``fgsm_eps``) blocks for the float model.
        tome, evit: the xray_ops configs for those variants (defaults: :func:`default_tome`,
            :func:`default_evit`). index_dim: the PCA width of "index_pca_int8" (default
            the embedding width / 4).
        n_images, n_clips, n_fmnist, seed, fashion_mnist: the eval sets (data/… held-out).
        out: also write the result as JSON there. show: print the table.

    Returns {block: {metric: value}}: blocks float, int8, tome, evit, index_int8,
    index_pca_int8, noise, blur, fgsm (those asked for), each with the chance levels, and
    "meta" (sizes, configs, seconds per block, points lost vs float). Values are fractions.
    """
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"variants: expected a subset of {VARIANTS}, got unknown {unknown}")
    for name, m in (("clip_model", clip_model),):
        if not (hasattr(m, "encode_image") and hasattr(m, "encode_text")):
            raise TypeError(f"{name}: expected a CLIPModel (encode_image, encode_text), got "
                            f"{type(m).__name__}")
    device = torch.device(device)
    t_all = time.perf_counter()
    models = [m for m in (clip_model, hashtag_model) if m is not None]
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        if data is None:
            data = build_eval_data(size, frames, n_images=n_images, n_clips=n_clips,
                                   n_fmnist=n_fmnist, seed=seed, fashion_mnist=fashion_mnist)
        text = _TextSide(clip_model, data, hashtag_model, vocab)
        chance = _chance_block(data, text)
        seconds: dict[str, float] = {}
        result: dict = {}

        def run(name, fn):
            t0 = time.perf_counter()
            result[name] = fn()
            seconds[name] = round(time.perf_counter() - t0, 2)

        enc = _Encoders(clip_model, hashtag_model, text, batch_size, device)
        probe_train = {}

        def float_block():
            block, probe_train["float"] = _whole(enc, data, chance)
            return block

        run("float", float_block)
        vit = clip_model.vit
        tome_cfg = tome if tome is not None else default_tome(vit, size)
        evit_cfg = evit if evit is not None else default_evit(vit)
        if "int8" in variants:
            def int8_block():
                q = quantized_copy(clip_model, [getattr(clip_model, "text_tower", None)])
                qh = quantized_copy(hashtag_model) if hashtag_model is not None else None
                return _whole(_Encoders(q, qh, text, batch_size, device), data, chance)[0]
            run("int8", int8_block)
        if "tome" in variants:
            def tome_block():
                with _reduction(models, tome=tome_cfg):
                    return _whole(enc, data, chance)[0]
            run("tome", tome_block)
        if "evit" in variants:
            def evit_block():
                with _reduction(models, evit=evit_cfg):
                    return _whole(enc, data, chance)[0]
            run("evit", evit_block)
        if "index" in variants:
            img_emb = enc.embed(data.images)
            width = img_emb.shape[1]
            pca = index_dim or max(1, width // 4)
            run("index_int8", lambda: _index_block(img_emb, text, None, chance))
            run("index_pca_int8", lambda: _index_block(img_emb, text, pca, chance))
        if robustness:
            run("noise", lambda: _perturbed_block(
                enc, data, lambda x: R.gaussian_noise(x, noise_std, seed=seed),
                probe_train["float"], chance))
            run("blur", lambda: _perturbed_block(
                enc, data, lambda x: R.gaussian_blur(x, blur_sigma), probe_train["float"],
                chance))
            run("fgsm", lambda: _fgsm_block(enc, data, fgsm_eps, probe_train["float"], chance))
        ref = result["float"]
        lost = {name: M.points_lost(ref, blk, COMPARED if not name.startswith("index") else
                                    ("i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5"))
                for name, blk in result.items() if name != "float"}
        result["meta"] = {
            "size": size, "frames": frames, "n_images": int(data.images.shape[0]),
            "n_single_object": int(data.single.sum()), "n_texts": len(text.texts),
            "n_clips": int(data.clips.shape[0]), "n_probe_train": int(data.probe_clips.shape[0]),
            "n_fmnist": 0 if data.fmnist_images is None else int(data.fmnist_images.shape[0]),
            "fmnist_skipped": data.fmnist_reason, "seed": seed,
            "hashtag_source": text.hashtag_source, "n_tags_scored":
                int((text.tag_targets.sum(0) > 0).sum()),
            "tome": repr(tome_cfg), "evit": repr(evit_cfg), "noise_std": noise_std,
            "blur_sigma": blur_sigma, "fgsm_eps": fgsm_eps,
            "points_lost_vs_float": lost, "seconds": seconds,
            "seconds_total": round(time.perf_counter() - t_all, 2),
        }
    finally:
        for m, t in zip(models, was_training):
            m.train(t)
    for name, blk in result.items():
        for k, v in blk.items():
            if isinstance(v, float) and math.isnan(v):
                warnings.warn(f"evaluate: {name}.{k} is NaN", stacklevel=2)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    if show:
        print(format_table(result))
    return result
