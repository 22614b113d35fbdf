"""Definition of ``contrastive_loss``: CLIP's symmetric InfoNCE (pure PyTorch, float64-capable).

Full form (one process): image_emb I (B, C), text_emb T (B, C), labels l (B,) (default arange):

  loss = ( CE(scale · I Tᵀ, l) + CE(scale · T Iᵀ, l) ) / 2          (CE: mean cross-entropy)

the same as open_clip's ``ClipLoss``. Local-loss form (distributed training, open_clip's
``local_loss=True``): this rank's rows I, T (B, C) against the gathered columns I_all, T_all
(B_all, C), labels l (B,) the positions of this rank's pairs in the gathered batch:

  loss = ( CE(scale · I T_allᵀ, l) + CE(scale · T I_allᵀ, l) ) / 2

What a backend computes (the (B, B_all) logits are the only O(B²) object, and the kernels never
store them): per row r of each direction, lse = logsumexp_j(scale · D_rj) and
ed = Σ_j softmax_j(scale · D_r)_j · D_rj (D = the raw dot products), and, in the backward, the
dense part of the gradients, Σ_j coef · scale · P_rj · cols_j (and its transpose). The O(B·C)
rest (the positive logits, the label terms of the gradient, the loss and d logit_scale) is the
same code for every backend (:mod:`xray_ops.ops.contrastive`):

  d loss / d logit_scale = Σ_directions mean_r (ed_r - D_{r, l_r}) / 2
  d loss / d I_r = (scale / 2B) · (Σ_j P_rj T_j - T_{l_r}) + the text direction's column terms
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .bias_gelu import compute_dtype


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale,
                     labels: torch.Tensor | None = None, all_image_emb: torch.Tensor | None = None,
                     all_text_emb: torch.Tensor | None = None) -> torch.Tensor:
    """The definition, differentiable by autograd (the tests' oracle, in float64)."""
    img_cols = image_emb if all_image_emb is None else all_image_emb
    txt_cols = text_emb if all_text_emb is None else all_text_emb
    if labels is None:
        labels = torch.arange(image_emb.shape[0], device=image_emb.device)
    if isinstance(logit_scale, torch.Tensor):  # a 0-dim scale does not promote the logits' dtype
        logit_scale = logit_scale.reshape(())
    logits_per_image = logit_scale * image_emb @ txt_cols.T
    logits_per_text = logit_scale * text_emb @ img_cols.T
    return (F.cross_entropy(logits_per_image, labels)
            + F.cross_entropy(logits_per_text, labels)) / 2


# ----------------------------------------------------------------------------------------------
# the torch backend: dense (it builds the logits; the cpu and triton backends do not)
# ----------------------------------------------------------------------------------------------
def _row_stats(raw: torch.Tensor, scale: torch.Tensor):
    s = scale * raw
    lse = torch.logsumexp(s, 1)
    ed = (torch.exp(s - lse[:, None]) * raw).sum(1)
    return lse, ed


def contrastive_stats(img, txt, img_all, txt_all, scale):
    """(B, C) rows, (B_all, C) columns or None (full form) -> (lse_i, lse_t, ed_i, ed_t), each
    (B,) in the compute dtype: the image direction's rows I vs T_all, the text direction's T vs
    I_all."""
    ct = compute_dtype(img.dtype)
    sc = scale.to(ct).reshape(())
    i, t = img.to(ct), txt.to(ct)
    if img_all is None:
        raw = i @ t.T
        lse_i, ed_i = _row_stats(raw, sc)
        lse_t, ed_t = _row_stats(raw.T, sc)
    else:
        lse_i, ed_i = _row_stats(i @ txt_all.to(ct).T, sc)
        lse_t, ed_t = _row_stats(t @ img_all.to(ct).T, sc)
    return lse_i, lse_t, ed_i, ed_t


def contrastive_grads(coef, img, txt, img_all, txt_all, scale, lse_i, lse_t):
    """The dense part of the gradients: with P the softmax of a direction's logits rows and
    k = coef · scale (coef = d loss / (2B), a 0-dim tensor):

      full form:  dI = k (P_i + P_tᵀ) T,  dT = k (P_i + P_tᵀ)ᵀ I          (P_i, P_tᵀ: (B, B))
      local form: dI = k P_i T_all, dT_all = k P_iᵀ I, dT = k P_t I_all, dI_all = k P_tᵀ T

    Returns (dI, dT, dI_all, dT_all) in the compute dtype (empty tensors for the absent)."""
    ct = compute_dtype(img.dtype)
    k = (coef.to(ct) * scale.to(ct)).reshape(())
    sc = scale.to(ct).reshape(())
    i, t = img.to(ct), txt.to(ct)
    if img_all is None:
        s = sc * (i @ t.T)
        p = torch.exp(s - lse_i[:, None]) + torch.exp(s - lse_t[None, :])
        return k * (p @ t), k * (p.T @ i), i.new_empty(0), i.new_empty(0)
    ia, ta = img_all.to(ct), txt_all.to(ct)
    p_i = torch.exp(sc * (i @ ta.T) - lse_i[:, None])
    p_t = torch.exp(sc * (t @ ia.T) - lse_t[:, None])
    return k * (p_i @ ta), k * (p_t @ ia), k * (p_t.T @ t), k * (p_i.T @ i)
