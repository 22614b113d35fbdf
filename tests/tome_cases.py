"""Inputs and oracles shared by the ToMe tests.

* :func:`separated_metric`: fresh random metrics whose best scores are far apart (> 1e-5) and
  whose best B token beats the runner-up by as much, checked in float64 on the values actually
  passed (after rounding to the metric's dtype). Float32 kernels and the float64 reference then
  must agree on the token order exactly; without that margin they may legitimately differ on
  near-ties closer than float32 rounding.
* :func:`tome_as_published`: ToMe's bipartite_soft_matching + merge_wavg restated the way the
  paper's code computes them (unstable argsort, scatter_reduce into the B tokens), for checking
  that the reference is ToMe on tie-free inputs.
"""

from __future__ import annotations

import math

import torch

from xray_ops.reference import tome as ref

MARGIN = 1e-5


def _margins(metric: torch.Tensor, class_token: bool, distill_token: bool) -> float:
    """Smallest gap, in float64, between a best score and its runner-up in the same row, and
    between two A tokens' best scores (the quantities the matching orders by)."""
    scores = ref.tome_scores(metric.double(), class_token, distill_token)
    worst = math.inf
    if scores.shape[-1] > 1:
        top2 = scores.topk(2, dim=-1).values
        gap = top2[..., 0] - top2[..., 1]
        if class_token:
            gap = gap[:, 1:]
        if gap.numel():
            worst = min(worst, float(gap.min()))
    best = scores.max(-1).values
    if class_token:
        best = best[:, 1:]
    if best.shape[1] > 1:
        srt = best.sort(-1).values
        worst = min(worst, float((srt[:, 1:] - srt[:, :-1]).min()))
    return worst


def separated_metric(B: int, N: int, Cm: int, class_token: bool, distill_token: bool,
                     dtype=torch.float32, device="cpu", groups: int = 3) -> torch.Tensor:
    """(B, N, Cm) metric: each A token is a noisy copy of one of a few B tokens (so several A
    tokens merge into the same B token) with its own similarity in [0.8, 0.995]; token norms
    vary in [0.5, 2]."""
    Na, Nb = (N + 1) // 2, N // 2
    for _ in range(20):
        b = torch.nn.functional.normalize(torch.randn(B, Nb, Cm, dtype=torch.float64), dim=-1)
        metric = torch.empty(B, N, Cm, dtype=torch.float64)
        metric[:, 1::2] = b
        if Nb:
            lo = 1 if distill_token and Nb > 1 else 0
            hi = max(lo + 1, min(Nb, lo + max(1, Nb // groups)))
            tgt = torch.randint(lo, hi, (B, Na))
            bt = b.gather(1, tgt[..., None].expand(B, Na, Cm))
            noise = torch.randn(B, Na, Cm, dtype=torch.float64)
            noise = noise - (noise * bt).sum(-1, keepdim=True) * bt
            noise = torch.nn.functional.normalize(noise, dim=-1)
            cos = torch.linspace(0.8, 0.995, Na, dtype=torch.float64)
            cos = torch.stack([cos[torch.randperm(Na)] for _ in range(B)])[..., None]
            metric[:, ::2] = cos * bt + (1 - cos**2).sqrt() * noise
        else:
            metric[:, ::2] = torch.randn(B, Na, Cm, dtype=torch.float64)
        metric = metric * (0.5 + 1.5 * torch.rand(B, N, 1, dtype=torch.float64))
        metric = metric.to(dtype)
        if _margins(metric, class_token, distill_token) > MARGIN:
            return metric.to(device)
    raise AssertionError("could not draw a metric with separated scores")


def tome_as_published(x, metric, r, size=None, class_token=False, distill_token=False):
    """ToMe's matching and size-weighted merge computed the way its paper's code does: scores
    in the metric's dtype, an unstable descending argsort, scatter_reduce into the B tokens.

    Returns (x_out, size_out, unm_idx, src_idx, dst_idx); the indices are None when r <= 0.
    """
    n_protected = int(class_token) + int(distill_token)
    r = min(r, (metric.shape[1] - n_protected) // 2)
    if size is None:
        size = torch.ones_like(x[..., :1])
    if r <= 0:
        return x, size, None, None, None
    with torch.no_grad():
        unit = metric / metric.norm(dim=-1, keepdim=True)
        sim = torch.matmul(unit[:, 0::2], unit[:, 1::2].transpose(1, 2))
        if class_token:
            sim[:, 0] = -math.inf
        if distill_token:
            sim[:, :, 0] = -math.inf
        best, best_b = sim.max(dim=2)
        ranked = torch.argsort(best, dim=1, descending=True)  # not stable: ties unspecified
        src_a = ranked[:, :r]
        stay_a = ranked[:, r:]
        if class_token:
            stay_a = torch.sort(stay_a, dim=1).values
        into_b = torch.gather(best_b, 1, src_a)

    def merge(v):
        n, _, c = v.shape
        evens, odds = v[:, 0::2], v[:, 1::2]
        kept = torch.gather(evens, 1, stay_a[..., None].expand(n, stay_a.shape[1], c))
        moving = torch.gather(evens, 1, src_a[..., None].expand(n, r, c))
        odds = odds.scatter_reduce(1, into_b[..., None].expand(n, r, c), moving, reduce="sum")
        if distill_token:
            return torch.cat([kept[:, :1], odds[:, :1], kept[:, 1:], odds[:, 1:]], dim=1)
        return torch.cat([kept, odds], dim=1)

    weighted = merge(x * size)
    size_out = merge(size)
    return weighted / size_out, size_out, stay_a, src_a, into_b


def unmerge_as_published(x, unm_idx, src_idx, dst_idx, n_tokens):
    """ToMe's unmerge (its token order without a distillation token): B tokens back to the odd
    positions, staying A tokens to theirs, merged A tokens get their B token's value."""
    n, _, c = x.shape
    n_stay = unm_idx.shape[1]
    stay, odds = x[:, :n_stay], x[:, n_stay:]
    out = x.new_zeros(n, n_tokens, c)
    out[:, 1::2] = odds
    out.scatter_(1, (2 * unm_idx)[..., None].expand(-1, -1, c), stay)
    moved = torch.gather(odds, 1, dst_idx[..., None].expand(-1, -1, c))
    out.scatter_(1, (2 * src_idx)[..., None].expand(-1, -1, c), moved)
    return out


def parse_r_as_published(num_layers, r):
    """ToMe's parse_r: a list padded with zeros (kept whole when longer), else a linear ramp
    from int(r (1 - inflection)) to 2 r minus that, truncated with int()."""
    if isinstance(r, list):
        return r + [0] * max(0, num_layers - len(r))
    base, inflection = r if isinstance(r, tuple) else (r, 0)
    first = int(base * (1.0 - inflection))
    last = 2 * base - first
    return [int(first + (last - first) / (num_layers - 1) * k) for k in range(num_layers)]
