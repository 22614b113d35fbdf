"""Losses of the three stages and of distillation, in plain PyTorch (the definitions).

mae_loss, hashtag_loss, clip_loss, caption_siamese_loss, embedding_distillation_loss,
logit_distillation_loss. Each takes tensors and returns a scalar (mean over the batch).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _check(t, name: str, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")


def _same_shape(a, a_name: str, b, b_name: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{b_name}: expected shape {tuple(a.shape)} (like {a_name}), got "
                         f"{tuple(b.shape)}")


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *,
             norm_pix: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """MAE's reconstruction loss on the masked patches.

    pred, target (B, L, P) (target from :func:`reference_model.heads.patchify`), mask (B, L)
    1 = masked. With norm_pix each target patch is normalised by its own mean and variance.
    Equivalent PyTorch::

        t = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + eps)**.5
        ((pred - t) ** 2).mean(-1).mul(mask).sum() / mask.sum()
    """
    _check(pred, "pred", 3)
    _same_shape(pred, "pred", target, "target")
    _check(mask, "mask", 2)
    if mask.shape != pred.shape[:2]:
        raise ValueError(f"mask: expected shape {tuple(pred.shape[:2])}, got {tuple(mask.shape)}")
    target = target.to(pred.dtype)
    if norm_pix:
        mean = target.mean(-1, keepdim=True)
        var = target.var(-1, keepdim=True)
        target = (target - mean) / (var + eps) ** 0.5
    per_patch = ((pred - target) ** 2).mean(-1)
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


def hashtag_loss(logits: torch.Tensor, targets: torch.Tensor, kind: str = "bce") -> torch.Tensor:
    """Multi-label hashtag classification loss.

    logits (B, K); targets (B, K) multi-hot (bool or float in [0, 1]).
    kind="bce": binary cross-entropy per tag, mean over B and K.
    kind="softmax": cross-entropy of softmax(logits) against the sample's tags as a uniform
    distribution (Mahajan et al.'s hashtag pretraining); samples without a tag are skipped.
    """
    _check(logits, "logits", 2)
    _check(targets, "targets", 2)
    _same_shape(logits, "logits", targets, "targets")
    t = targets.to(logits.dtype)
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, t)
    if kind == "softmax":
        n = t.sum(-1)
        has = n > 0
        if not bool(has.any()):
            return logits.sum() * 0.0
        dist = t[has] / n[has, None]
        return -(dist * logits[has].log_softmax(-1)).sum(-1).mean()
    raise ValueError(f"kind: expected 'bce' or 'softmax', got {kind!r}")


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor,
              logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE on L2-normalised embeddings (B, E), pairs on the diagonal.

    Equivalent PyTorch (open_clip's ClipLoss)::

        logits = logit_scale * image_emb @ text_emb.T
        (F.cross_entropy(logits, arange(B)) + F.cross_entropy(logits.T, arange(B))) / 2
    """
    _check(image_emb, "image_emb", 2)
    _check(text_emb, "text_emb", 2)
    _same_shape(image_emb, "image_emb", text_emb, "text_emb")
    logits = logit_scale * image_emb @ text_emb.t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def caption_siamese_loss(text_emb: torch.Tensor, text_emb2: torch.Tensor, *,
                         kind: str = "cosine",
                         logit_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Two captions of the same image pulled together in the text-embedding space.

    text_emb, text_emb2 (B, E), L2-normalised, row i of each describing image i.
    kind="cosine": mean of 1 - cos(t1_i, t2_i) (the contrastive image loss keeps the space
    from collapsing); kind="infonce": the symmetric InfoNCE between the two caption sets
    (other samples' captions as negatives) at ``logit_scale`` (required).
    """
    _check(text_emb, "text_emb", 2)
    _same_shape(text_emb, "text_emb", text_emb2, "text_emb2")
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(text_emb, text_emb2, dim=-1)).mean()
    if kind == "infonce":
        if logit_scale is None:
            raise ValueError("logit_scale: expected a tensor for kind='infonce', got None")
        return clip_loss(text_emb, text_emb2, logit_scale)
    raise ValueError(f"kind: expected 'cosine' or 'infonce', got {kind!r}")


def embedding_distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """CLIP embedding distillation: mean of 1 - cos(student_i, teacher_i); teacher detached.

    student, teacher (B, E) (the student's projection maps into the teacher's width).
    """
    _check(student, "student", 2)
    _same_shape(student, "student", teacher, "teacher")
    return (1.0 - F.cosine_similarity(student, teacher.detach(), dim=-1)).mean()


def logit_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                            temperature: float = 1.0, kind: str = "softmax") -> torch.Tensor:
    """Logit distillation (Hinton et al.): KL(teacher || student) at a temperature, x T².

    logits (B, K); teacher detached. kind="softmax": KL of the softmax distributions over the
    K tags (mean over B); kind="sigmoid": the per-tag Bernoulli KL of sigmoid(logits / T)
    (matches a BCE-trained multi-label head), mean over B and K.
    """
    _check(student_logits, "student_logits", 2)
    _same_shape(student_logits, "student_logits", teacher_logits, "teacher_logits")
    if not isinstance(temperature, (int, float)) or temperature <= 0:
        raise ValueError(f"temperature: expected a number > 0, got {temperature!r}")
    T = float(temperature)
    s = student_logits / T
    t = teacher_logits.detach().to(s.dtype) / T
    if kind == "softmax":
        kl = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True,
                      reduction="batchmean")
    elif kind == "sigmoid":
        p = t.sigmoid()
        # KL(Bern(p) || Bern(q)) with log q = logsigmoid(s), log(1-q) = logsigmoid(-s)
        kl = (p * (F.logsigmoid(t) - F.logsigmoid(s))
              + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-s))).mean()
    else:
        raise ValueError(f"kind: expected 'softmax' or 'sigmoid', got {kind!r}")
    return kl * T * T
