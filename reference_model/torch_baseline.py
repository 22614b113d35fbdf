"""ops="torch": attention, EViT and ToMe in plain PyTorch, as their anchors write them.

The speed baseline of the reference model. Nothing here calls xray_ops:
- attention: timm's Attention (its SDPA path) where nothing extra is needed; an eager
  softmax attention where EViT needs the CLS row or ToMe adds the size bias (as EViT's and
  ToMe's own attention do); ToMe's metric is the keys averaged over heads;
- EViT (youweiliang/evit): top-k of the CLS attention, gather of the kept tokens, the
  complement's attention-weighted sum as the fused token;
- ToMe (facebookresearch/ToMe): bipartite soft matching under no_grad, then the size-weighted
  merge with gather / scatter_reduce.
Written from the papers' and repositories' descriptions, not copied.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention


class TorchAttention(TimmAttention):
    """timm's Attention plus :meth:`attend` (key bias, CLS row, ToMe metric) in plain PyTorch.

    The parameters and names are timm's, so its state_dict is the xray model's.
    """

    def attend(self, x: torch.Tensor, *, key_bias: Optional[torch.Tensor] = None,
               want_cls: bool = False, want_metric: bool = False, is_causal: bool = False):
        """x (B, N, C) -> (y (B, N, C), cls_attn (B, N) or None, metric (B, N, D) or None).

        cls_attn: the head mean of the softmax row of query 0; metric: the keys averaged over
        heads (ToMe's). key_bias (B, N) is added to every logit of key j (ToMe: log(size)).
        """
        if key_bias is None and not want_cls and not want_metric:
            return self.forward(x, is_causal=is_causal), None, None
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        metric = k.mean(1) if want_metric else None
        cls_attn = None
        if key_bias is None and not want_cls:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal,
                                               dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            # eager, as EViT's and ToMe's attention: the probabilities are needed
            attn = (q @ k.transpose(-2, -1)) * self.scale
            if key_bias is not None:
                attn = attn + key_bias[:, None, None, :].to(attn.dtype)
            if is_causal:
                keep = torch.ones(N, N, dtype=torch.bool, device=x.device).tril()
                attn = attn.masked_fill(~keep, float("-inf"))
            attn = attn.softmax(dim=-1)
            if want_cls:
                cls_attn = attn[:, :, 0].mean(1)
            o = self.attn_drop(attn) @ v
        y = o.transpose(1, 2).reshape(B, N, self.attn_dim)
        y = self.proj_drop(self.proj(self.norm(y)))
        return y, cls_attn, metric


def complement_idx(idx: torch.Tensor, n: int) -> torch.Tensor:
    """(B, k) distinct indices in [0, n) -> (B, n - k) the others, ascending (EViT's helper)."""
    B, k = idx.shape
    dropped = torch.ones(B, n, dtype=torch.bool, device=idx.device).scatter(1, idx, False)
    return torch.arange(n, device=idx.device).expand(B, n)[dropped].view(B, n - k)


def evit_torch(x: torch.Tensor, cls_attn: torch.Tensor, keep: int, fuse: bool,
               size: Optional[torch.Tensor] = None):
    """EViT's token reorganization: (B, N, C), cls_attn (B, N-1) -> x (B, 1+keep+fuse, C).

    The kept tokens by descending CLS attention (torch.topk, sorted), then the fused token
    Σ_dropped cls_attn_j · x_j. size (B, N, 1) (ToMe's, when both run) follows the tokens; the
    fused token counts as one token. Returns (x, size, keep_idx); keep == N - 1 returns x as is.
    """
    B, N, C = x.shape
    if keep >= N - 1:
        return x, size, None
    _, idx = torch.topk(cls_attn, keep, dim=1, largest=True, sorted=True)
    patches = x[:, 1:]
    kept = torch.gather(patches, 1, idx[..., None].expand(-1, -1, C))
    parts = [x[:, :1], kept]
    if fuse:
        compl = complement_idx(idx, N - 1)
        dropped = torch.gather(patches, 1, compl[..., None].expand(-1, -1, C))
        weight = torch.gather(cls_attn, 1, compl)
        parts.append((dropped * weight[..., None]).sum(1, keepdim=True))
    x = torch.cat(parts, 1)
    if size is not None:
        s = [size[:, :1], torch.gather(size[:, 1:], 1, idx[..., None])]
        if fuse:
            s.append(torch.ones_like(size[:, :1]))
        size = torch.cat(s, 1)
    return x, size, idx


def tome_torch(x: torch.Tensor, metric: torch.Tensor, r: int,
               size: Optional[torch.Tensor] = None, class_token: bool = True,
               return_dest: bool = False):
    """ToMe: bipartite soft matching of ``metric``, then the size-weighted merge of x.

    x (B, N, C), metric (B, N, Cm), size (B, N, 1) or None -> (x (B, N-r, C), size (B, N-r, 1)).
    r is clamped to (N - class_token) // 2; r <= 0 returns (x, size) unchanged. With
    return_dest, also dest (B, N): the output slot of every input token (ToMe's unmerge map).
    """
    B, N, C = x.shape
    r = min(r, (N - int(class_token)) // 2)
    if r <= 0:
        dest = torch.arange(N, device=x.device).expand(B, N)
        return (x, size, dest) if return_dest else (x, size)
    with torch.no_grad():
        m = metric / metric.norm(dim=-1, keepdim=True)
        scores = m[:, ::2] @ m[:, 1::2].transpose(-1, -2)
        if class_token:
            scores[:, 0, :] = -math.inf
        best, best_b = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)[..., None]
        stay, merged = order[:, r:], order[:, :r]
        into = best_b[..., None].gather(1, merged)
        if class_token:
            stay = stay.sort(dim=1).values

    def merge_sum(t: torch.Tensor) -> torch.Tensor:
        a, b = t[:, ::2], t[:, 1::2]
        c = t.shape[-1]
        a_stay = a.gather(1, stay.expand(-1, -1, c))
        a_merged = a.gather(1, merged.expand(-1, -1, c))
        b = b.scatter_reduce(1, into.expand(-1, -1, c), a_merged, reduce="sum")
        return torch.cat([a_stay, b], dim=1)

    if size is None:
        size = torch.ones_like(x[..., :1])
    x = merge_sum(x * size)
    size = merge_sum(size)
    if not return_dest:
        return x / size, size
    # staying A tokens keep their rank, merged ones go to their B token, B tokens follow
    n_stay = stay.shape[1]
    a_dest = torch.empty(B, (N + 1) // 2, dtype=torch.long, device=x.device)
    a_dest.scatter_(1, stay[..., 0], torch.arange(n_stay, device=x.device).expand(B, n_stay))
    a_dest.scatter_(1, merged[..., 0], n_stay + into[..., 0])
    b_dest = n_stay + torch.arange(N // 2, device=x.device).expand(B, N // 2)
    dest = torch.empty(B, N, dtype=torch.long, device=x.device)
    dest[:, ::2], dest[:, 1::2] = a_dest, b_dest
    return x / size, size, dest
