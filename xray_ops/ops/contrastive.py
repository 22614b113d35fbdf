"""CLIP's contrastive loss without the batch × batch logits: validation, op, autograd, backends.

Public: :func:`contrastive_loss`. The definition: :mod:`xray_ops.reference.contrastive`.

A backend implements only the O(B²·C) part (the dispatched inputs; the kernels never store the
(B, B_all) logits):
  forward   image_emb (B, C), text_emb (B, C), all_image_emb (B_all, C) | None,
            all_text_emb | None, logit_scale (one element)
            -> (lse_i, lse_t, ed_i, ed_t), each (B,) in the compute dtype
  backward  coef (0-dim: d loss / 2B), image_emb, text_emb, all_image_emb | None,
            all_text_emb | None, logit_scale, lse_image, lse_text
            -> (dI, dT, dI_all or empty, dT_all or empty), the dense gradient terms, compute dtype
The O(B·C) rest — positive logits, loss, label terms of the gradients, d logit_scale — is the
code below, the same for every backend.
"""

from __future__ import annotations

import numbers

import torch

from .. import _dispatch, _validate
from .._dispatch import FLOATS, GPU_FLOATS, TORCH, lazy
from ..reference import contrastive as ref
from ..reference.bias_gelu import compute_dtype

OP = "contrastive_loss"


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale, *,
                     labels: torch.Tensor | None = None,
                     all_image_emb: torch.Tensor | None = None,
                     all_text_emb: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP's symmetric InfoNCE loss, tile by tile: the (B, B) logits are never stored.

    Args:
        image_emb, text_emb: (B, C) float16 / bfloat16 / float32 / float64, same dtype and
            device, any strides (usually L2-normalized; not required).
        logit_scale: the multiplier of the logits (open_clip passes ``logit_scale.exp()``): a
            0-dim or one-element tensor (any float dtype, same device) or a Python number.
        labels: (B,) int64, the positive column of each row (default ``arange(B)``), values in
            [0, B) (or [0, B_all) in the local form).
        all_image_emb, all_text_emb: the local-loss form of distributed training — the gathered
            (B_all, C) embeddings of every rank (this rank's rows included, as open_clip's
            ``gather_features`` builds them); then ``labels`` is required (this rank's pairs'
            positions in the gathered batch, ``arange(B) + rank * B``). Both or neither.

    Returns:
        0-dim loss, float32 (float64 for float64 inputs):
        ``(CE(s · I T_allᵀ, labels) + CE(s · T I_allᵀ, labels)) / 2`` with I_all = I, T_all = T
        in the full form. Differentiable in every embedding and logit_scale. Extra memory
        O(B) (the kernels) plus the O(B · C) gradients.

    Equivalent PyTorch (open_clip's ``ClipLoss``)::

        logits_per_image = logit_scale * image_emb @ text_emb.T
        logits_per_text = logit_scale * text_emb @ image_emb.T
        loss = (F.cross_entropy(logits_per_image, labels)
                + F.cross_entropy(logits_per_text, labels)) / 2
    """
    _validate.tensor(image_emb, "image_emb", ndim=2, floating=True)
    B, C = image_emb.shape
    if B < 1 or C < 1:
        raise ValueError(f"image_emb: expected (B, C) with B >= 1 and C >= 1, "
                         f"got shape {tuple(image_emb.shape)}")
    _validate.tensor(text_emb, "text_emb", ndim=2, floating=True)
    _validate.same_device("image_emb", image_emb, text_emb=text_emb)
    _validate.same_dtype("image_emb", image_emb, text_emb=text_emb)
    _validate.shape(text_emb, "text_emb", (B, C), "(like image_emb)")
    if (all_image_emb is None) != (all_text_emb is None):
        raise ValueError("all_image_emb, all_text_emb: the local-loss form needs both gathered "
                         f"batches, got all_image_emb={_kind(all_image_emb)}, "
                         f"all_text_emb={_kind(all_text_emb)}")
    n_cols = B
    if all_image_emb is not None:
        for name, t in (("all_image_emb", all_image_emb), ("all_text_emb", all_text_emb)):
            _validate.tensor(t, name, ndim=2, floating=True)
            _validate.same_device("image_emb", image_emb, **{name: t})
            _validate.same_dtype("image_emb", image_emb, **{name: t})
        n_cols = all_image_emb.shape[0]
        _validate.shape(all_image_emb, "all_image_emb", (None, C), f"(B_all, {C}) like image_emb")
        _validate.shape(all_text_emb, "all_text_emb", (n_cols, C),
                        "(like all_image_emb)")
        if labels is None:
            raise ValueError("labels: required in the local-loss form (the positions of this "
                             "rank's pairs in the gathered batch, arange(B) + rank * B)")
    scale = _logit_scale(logit_scale, image_emb)
    if labels is not None:
        _labels(labels, B, n_cols, image_emb)
    loss, _, _, _ = torch.ops.xray_ops.contrastive_loss(
        image_emb, text_emb, all_image_emb, all_text_emb, scale, labels,
        _dispatch.requested_backend())
    return loss


def _kind(t) -> str:
    return "None" if t is None else f"a tensor of shape {tuple(t.shape)}"


def _logit_scale(v, like: torch.Tensor) -> torch.Tensor:
    if isinstance(v, numbers.Real) and not isinstance(v, bool):
        return torch.tensor(float(v), dtype=compute_dtype(like.dtype), device=like.device)
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"logit_scale: expected a scalar tensor or a number, got "
                        f"{type(v).__name__}")
    if v.numel() != 1 or v.dim() > 1:
        raise ValueError(f"logit_scale: expected a scalar (a 0-dim or one-element tensor), got "
                         f"shape {tuple(v.shape)}")
    _validate.tensor(v, "logit_scale", floating=True)
    _validate.same_device("image_emb", like, logit_scale=v)
    return v


def _labels(labels, B: int, n_cols: int, like: torch.Tensor) -> None:
    _validate.tensor(labels, "labels", ndim=1, dtypes=(torch.int64,))
    _validate.shape(labels, "labels", (B,), "(B,) like the rows of image_emb")
    _validate.same_device("image_emb", like, labels=labels)
    if B and not torch.compiler.is_compiling():  # a data check: eager only
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= n_cols:
            raise ValueError(f"labels: expected values in [0, {n_cols - 1}], got values in "
                             f"[{lo}, {hi}]")


# ----------------------------------------------------------------------------------------------
# the O(B·C) part shared by every backend
# ----------------------------------------------------------------------------------------------
def _columns(img, txt, img_all, txt_all):
    """(columns of the image direction, columns of the text direction)."""
    return (txt, img) if img_all is None else (txt_all, img_all)


def _positive_dots(img, txt, img_all, txt_all, labels, ct):
    """Raw dot products of each row with its positive column, both directions, (B,) each."""
    cols_t, cols_i = _columns(img, txt, img_all, txt_all)
    i, t = img.to(ct), txt.to(ct)
    if labels is None:  # full form, the diagonal
        d = (i * t).sum(-1)
        return d, d
    return (i * cols_t[labels].to(ct)).sum(-1), (t * cols_i[labels].to(ct)).sum(-1)


@torch.library.custom_op("xray_ops::contrastive_loss", mutates_args=())
def _contrastive_op(img: torch.Tensor, txt: torch.Tensor, img_all: torch.Tensor | None,
                    txt_all: torch.Tensor | None, logit_scale: torch.Tensor,
                    labels: torch.Tensor | None,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                           torch.Tensor]:
    ct = compute_dtype(img.dtype)
    lse_i, lse_t, ed_i, ed_t = _dispatch.run(
        OP, backend, image_emb=img, text_emb=txt, all_image_emb=img_all, all_text_emb=txt_all,
        logit_scale=logit_scale)
    pos_i, pos_t = _positive_dots(img, txt, img_all, txt_all, labels, ct)
    sc = logit_scale.to(ct).reshape(())
    loss = ((lse_i - sc * pos_i).mean() + (lse_t - sc * pos_t).mean()) / 2
    # d loss / d logit_scale per unit of upstream gradient (the forward has everything it needs)
    dscale = ((ed_i - pos_i).mean() + (ed_t - pos_t).mean()) / 2
    return loss, lse_i.contiguous(), lse_t.contiguous(), dscale


@_contrastive_op.register_fake
def _(img, txt, img_all, txt_all, logit_scale, labels, backend):
    ct = compute_dtype(img.dtype)
    B = img.shape[0]
    return (img.new_empty((), dtype=ct), img.new_empty(B, dtype=ct), img.new_empty(B, dtype=ct),
            img.new_empty((), dtype=ct))


@torch.library.custom_op("xray_ops::contrastive_loss_backward", mutates_args=())
def _contrastive_backward_op(
        grad_loss: torch.Tensor, img: torch.Tensor, txt: torch.Tensor,
        img_all: torch.Tensor | None, txt_all: torch.Tensor | None, logit_scale: torch.Tensor,
        labels: torch.Tensor | None, lse_i: torch.Tensor, lse_t: torch.Tensor,
        dscale: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                    torch.Tensor, torch.Tensor]:
    ct = compute_dtype(img.dtype)
    B = img.shape[0]
    g = grad_loss.to(ct).reshape(())
    coef = g / (2 * B)
    d_i, d_t, d_ia, d_ta = _dispatch.run_backward(
        OP, backend, coef=coef, image_emb=img, text_emb=txt, all_image_emb=img_all,
        all_text_emb=txt_all, logit_scale=logit_scale, lse_image=lse_i, lse_text=lse_t)
    # the label terms: - coef · scale · (positive column) for each row, and the same into each
    # positive column (a scatter: labels may repeat)
    k = coef * logit_scale.to(ct).reshape(())
    full = img_all is None
    cols_t, cols_i = _columns(img, txt, img_all, txt_all)
    d_cols_t, d_cols_i = (d_t, d_i) if full else (d_ta, d_ia)
    if labels is None:
        d_i.sub_(k * cols_t.to(ct))
        d_t.sub_(k * cols_i.to(ct))
        d_cols_t.sub_(k * img.to(ct))
        d_cols_i.sub_(k * txt.to(ct))
    else:
        d_i.sub_(k * cols_t[labels].to(ct))
        d_t.sub_(k * cols_i[labels].to(ct))
        d_cols_t.index_add_(0, labels, img.to(ct) * -k)
        d_cols_i.index_add_(0, labels, txt.to(ct) * -k)
    d_scale = (g * dscale).to(logit_scale.dtype).reshape(logit_scale.shape)
    # (outputs of a custom op may not alias each other: a fresh empty tensor for each absent one)
    return (d_i.to(img.dtype), d_t.to(img.dtype), img.new_empty(0) if full else d_ia.to(img.dtype),
            img.new_empty(0) if full else d_ta.to(img.dtype), d_scale)


@_contrastive_backward_op.register_fake
def _(grad_loss, img, txt, img_all, txt_all, logit_scale, labels, lse_i, lse_t, dscale,
      backend):
    return (torch.empty_like(img, memory_format=torch.contiguous_format),
            torch.empty_like(txt, memory_format=torch.contiguous_format),
            img.new_empty(0) if img_all is None else torch.empty_like(img_all,
                                                       memory_format=torch.contiguous_format),
            img.new_empty(0) if txt_all is None else torch.empty_like(txt_all,
                                                       memory_format=torch.contiguous_format),
            torch.empty_like(logit_scale))


def _setup_context(ctx, inputs, output):
    img, txt, img_all, txt_all, logit_scale, labels, backend = inputs
    _, lse_i, lse_t, dscale = output
    ctx.backend = backend
    ctx.save_for_backward(img, txt, img_all, txt_all, logit_scale, labels, lse_i, lse_t, dscale)
    ctx.mark_non_differentiable(lse_i, lse_t, dscale)


def _backward(ctx, grad_loss, _g1, _g2, _g3):
    img, txt, img_all, txt_all, logit_scale, labels, lse_i, lse_t, dscale = ctx.saved_tensors
    d_i, d_t, d_ia, d_ta, d_s = _contrastive_backward_op(
        grad_loss, img, txt, img_all, txt_all, logit_scale, labels, lse_i, lse_t, dscale,
        ctx.backend)
    full = img_all is None
    return (d_i, d_t, None if full else d_ia, None if full else d_ta, d_s, None, None)


_contrastive_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# backends
# ----------------------------------------------------------------------------------------------
_dispatch.declare(OP, forward=("image_emb", "text_emb", "all_image_emb", "all_text_emb",
                               "logit_scale"),
                  backward=("coef", "image_emb", "text_emb", "all_image_emb", "all_text_emb",
                            "logit_scale", "lse_image", "lse_text"),
                  key="image_emb", priority=("triton", "cpu", "torch"))
_dispatch.register(OP, "torch", forward=ref.contrastive_stats, backward=ref.contrastive_grads,
                   dtypes=FLOATS)
# The GPU kernel is Triton (tl.dot lowers to wgmma / mma on sm_90 / sm_80); there is no CUDA C++
# one: see the README.
_TRITON = "xray_ops.kernels.contrastive_loss"
_dispatch.register(OP, "triton", forward=lazy(_TRITON, "contrastive_stats"),
                   backward=lazy(_TRITON, "contrastive_grads"), dtypes=GPU_FLOATS)
# PyTorch's own GEMMs on tiles of the logits (an online log-sum-exp): O(tile · B) memory
_CPU = "xray_ops.cpu.contrastive"
_dispatch.register(OP, "cpu", forward=lazy(_CPU, "contrastive_stats"),
                   backward=lazy(_CPU, "contrastive_grads"), dtypes=FLOATS, runtime=TORCH)
