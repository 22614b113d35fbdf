"""ToMe: the reference is ToMe; tome_match / tome_unmerge / source tracking / ToMeConfig /
proportional attention; opcheck, torch.compile, bad inputs and backend selection."""

import pytest
import torch

import xray_ops as xo
from xray_ops.reference import tome as ref

from .matrix import device_backends
from .tome_cases import (
    parse_r_as_published, separated_metric, tome_as_published, unmerge_as_published,
)


@pytest.mark.parametrize("N", [2, 3, 11, 50, 197])
def test_reference_is_tome_on_tie_free_inputs(N):
    # float64 Gaussian metrics have no ties: ToMe's unstable argsort gives the stable order
    for class_token in (True, False):
        for distill_token in (True, False):
            for r in (-3, 0, 1, 5, N):
                x = torch.randn(2, N, 6, dtype=torch.float64)
                metric = torch.randn(2, N, 9, dtype=torch.float64)
                size = torch.rand(2, N, 1, dtype=torch.float64) + 0.5
                for s in (None, size):
                    t_out, t_size, t_unm, t_src, t_dst = tome_as_published(
                        x, metric, r, s, class_token, distill_token)
                    out, size_out = ref.tome_merge(x, metric, r, s, class_token, distill_token)
                    assert torch.equal(out, t_out) and torch.equal(size_out, t_size)
                    api_out, api_size, match = xo.tome_merge(
                        x, metric, r, size=s, class_token=class_token,
                        distill_token=distill_token, return_match=True)
                    torch.testing.assert_close(api_out, t_out, rtol=1e-13, atol=1e-13)
                    torch.testing.assert_close(api_size, t_size, rtol=1e-13, atol=1e-13)
                    if t_unm is None:
                        assert api_out is x
                        continue
                    assert torch.equal(match.unm_idx, t_unm)
                    assert torch.equal(match.src_idx, t_src)
                    assert torch.equal(match.dst_idx, t_dst)


def test_match_fields_are_consistent():
    x = torch.randn(3, 31, 4, dtype=torch.float64)
    metric = separated_metric(3, 31, 16, True, True, torch.float64)
    out, size_out, m = xo.tome_merge(x, metric, 7, class_token=True, distill_token=True,
                                     return_match=True)
    B, N, r = 3, 31, 7
    assert m.unm_idx.shape == (B, 16 - r) and m.src_idx.shape == (B, r)
    assert m.dest.shape == (B, N) and m.slot_src.shape == (B, N)
    assert m.slot_start.shape == (B, N - r + 1)
    for b in range(B):
        # slot_src is a permutation grouped by dest; each group starts with the slot's token
        assert sorted(m.slot_src[b].tolist()) == list(range(N))
        for o in range(N - r):
            group = m.slot_src[b, m.slot_start[b, o]:m.slot_start[b, o + 1]].tolist()
            assert all(m.dest[b, p] == o for p in group)
            assert group[1:] == sorted(group[1:]) and all(p % 2 == 0 for p in group[1:])
        assert m.dest[b, 0] == 0 and m.dest[b, 1] == 1  # CLS first, distillation token second
        # merged A tokens go where their B token goes; sizes count the group
        assert torch.equal(m.dest[b, 2 * m.src_idx[b]], m.dest[b, 2 * m.dst_idx[b] + 1])
        counts = torch.bincount(m.dest[b], minlength=N - r).to(size_out.dtype)
        torch.testing.assert_close(size_out[b, :, 0], counts)


@pytest.mark.parametrize("class_token,distill_token", [(True, False), (False, False),
                                                      (True, True)])
def test_unmerge_places_tokens_where_tome_does(class_token, distill_token):
    x = torch.randn(2, 23, 5, dtype=torch.float64)
    metric = torch.randn(2, 23, 8, dtype=torch.float64)
    out, _, match = xo.tome_merge(x, metric, 6, class_token=class_token,
                                  distill_token=distill_token, return_match=True)
    back = xo.tome_unmerge(out, match)
    assert back.shape == x.shape
    if not distill_token:  # ToMe's own unmerge knows only that order
        want = unmerge_as_published(out, match.unm_idx, match.src_idx, match.dst_idx, 23)
        assert torch.equal(back, want)
    # every token position holds the output token that absorbed it
    for b in range(2):
        for p in range(23):
            assert torch.equal(back[b, p], out[b, match.dest[b, p]])
        stay = 2 * match.unm_idx[b]
        torch.testing.assert_close(back[b, stay], x[b, stay])  # staying A tokens come back
    # differentiable, and identity when nothing merges
    y = out.detach().requires_grad_()
    xo.tome_unmerge(y, match).sum().backward()
    for b in range(2):  # d(sum)/d(slot o) = how many positions read slot o
        counts = torch.bincount(match.dest[b], minlength=out.shape[1]).double()
        assert torch.equal(y.grad[b, :, 0], counts)
    x0, _, m0 = xo.tome_merge(x, metric, 0, return_match=True)
    assert torch.equal(xo.tome_unmerge(x0, m0), x)


def test_unmerge_after_backend_merge_matches_reference():
    x = torch.randn(2, 40, 4)
    metric = separated_metric(2, 40, 16, True, False)
    for backend in ("cpu", "triton", "torch"):
        with xo.backend(backend):
            out, _, match = xo.tome_merge(x, metric, 9, return_match=True)
            back = xo.tome_unmerge(out, match)
        want = unmerge_as_published(out, match.unm_idx, match.src_idx, match.dst_idx, 40)
        assert torch.equal(back, want), backend


def test_source_tracking_across_layers():
    B, N = 2, 30
    x = torch.randn(B, N, 4, dtype=torch.float64)
    size, source = None, None
    for layer, r in enumerate((5, 4, 3)):
        metric = torch.randn(B, x.shape[1], 6, dtype=torch.float64)
        x, size, match = xo.tome_merge(x, metric, r, size=size, return_match=True)
        source = xo.tome_merge_source(match, source)
        assert source.shape == (B, x.shape[1], N) and source.dtype == torch.float32
        # each token holds exactly `size` original tokens; every original token is held once
        torch.testing.assert_close(source.sum(-1, dtype=torch.float64), size[..., 0])
        assert torch.equal(source.sum(1), torch.ones(B, N))
        if layer == 0:  # ToMe's merge_source: the one-hot rows merged with amax
            eye = torch.eye(N).expand(B, N, N)
            want = torch.zeros(B, N - r, N).scatter_reduce(
                1, match.dest[..., None].expand(B, N, N), eye, "amax", include_self=False)
            assert torch.equal(source, want)


def test_config_schedule_is_parse_r():
    for L in (2, 12, 24):
        for r in (0, 8, 13, -2, (8, 0.0), (8, -1.0), (16, 1.0), (7, 0.5), (5, -0.3),
                  [3, 2, 1], list(range(L))):
            assert xo.ToMeConfig(r=r).schedule(L) == parse_r_as_published(L, r)[:L], (L, r)
    assert xo.ToMeConfig(r=[1, 2, 3, 4]).schedule(2) == [1, 2]  # extra layers dropped
    assert xo.ToMeConfig(r=(8, -1.0)).schedule(1) == [16]  # ToMe divides by zero here
    cfg = xo.ToMeConfig(r=8)
    assert cfg.prop_attn is True and cfg.trace_source is False
    with pytest.raises(TypeError, match="r: expected an int, an"):
        xo.ToMeConfig(r=8.0)
    with pytest.raises(ValueError, match="inflection"):
        xo.ToMeConfig(r=(8, 2.0))
    with pytest.raises(TypeError, match=r"r\[1\]"):
        xo.ToMeConfig(r=[1, 2.5])
    with pytest.raises(TypeError, match="prop_attn"):
        xo.ToMeConfig(r=8, prop_attn=1)
    with pytest.raises(ValueError, match="num_layers"):
        cfg.schedule(0)


def test_proportional_attention_is_attention_over_duplicated_keys():
    # a key that stands for s merged tokens weighs like s identical keys: key_bias = log(size)
    B, H, Nq, D = 2, 3, 5, 8
    size = torch.tensor([[1.0, 3.0, 2.0, 1.0], [2.0, 1.0, 1.0, 4.0]])[..., None]
    q = torch.randn(B, H, Nq, D, dtype=torch.float64)
    k = torch.randn(B, H, 4, D, dtype=torch.float64)
    v = torch.randn(B, H, 4, D, dtype=torch.float64)
    got = ref.attention(q, k, v, key_bias=xo.tome_key_bias(size.double()))
    for b in range(B):
        reps = size[b, :, 0].long()
        kb = k[b:b + 1].repeat_interleave(reps, dim=2)
        vb = v[b:b + 1].repeat_interleave(reps, dim=2)
        torch.testing.assert_close(got[b:b + 1], ref.attention(q[b:b + 1], kb, vb))
    # ToMe's formulation: attn + size.log()[:, None, None, :, 0]
    logits = (q @ k.transpose(-2, -1)) * D**-0.5 + size.double().log()[:, None, None, :, 0]
    torch.testing.assert_close(got, logits.softmax(-1) @ v)


def test_merge_then_proportional_attention_end_to_end():
    # merged tokens + log(size) bias ~ attention over the unmerged tokens when merged tokens
    # were identical (here: B tokens that are exact copies of the A tokens merged into them)
    B, N, D = 1, 12, 4
    base = torch.randn(B, N, D, dtype=torch.float64)
    base[:, 3] = base[:, 2]  # A token 1 == B token 1
    base[:, 5] = base[:, 4]  # A token 2 == B token 2
    x_out, size_out = xo.tome_merge(base, base, 2)
    q = torch.randn(B, 1, 3, D, dtype=torch.float64)
    full = ref.attention(q, base[:, None], base[:, None])
    merged = ref.attention(q, x_out[:, None], x_out[:, None], key_bias=xo.tome_key_bias(size_out))
    torch.testing.assert_close(merged, full)


def test_pre_merge_tokens_are_kept_only_for_the_size_gradient():
    import gc
    import weakref

    metric = torch.randn(2, 15, 4)
    for backend in ("torch", "cpu"):
        for size_grad in (False, True):
            x = torch.randn(2, 15, 6, requires_grad=True)
            size = (torch.rand(2, 15, 1) + 0.5).requires_grad_(size_grad)
            y = x * 2.0  # a non-leaf nothing else keeps (mul by a number saves no tensor)
            alive = weakref.ref(y)
            with xo.backend(backend):
                out, size_out = xo.tome_merge(y, metric, 4, size=size)
            del y
            gc.collect()
            assert (alive() is not None) == size_grad, (backend, size_grad)
            (out.sum() + size_out.sum()).backward()
            assert x.grad is not None and (size.grad is not None) == size_grad


def test_r_clamp_and_no_op():
    x = torch.randn(2, 11, 4)
    metric = torch.randn(2, 11, 5)
    for r in (0, -1, -100):
        out, size_out = xo.tome_merge(x, metric, r)  # negative r: treated as 0
        assert out is x and torch.equal(size_out, torch.ones(2, 11, 1))
        size = torch.rand(2, 11, 1)
        assert xo.tome_merge(x, metric, r, size=size)[1] is size
    assert xo.tome_merge(x, metric, 100)[0].shape == (2, 6, 4)  # clamp: (11 - 1) // 2 = 5
    assert xo.tome_merge(x, metric, 100, class_token=False)[0].shape == (2, 6, 4)
    assert xo.tome_merge(x, metric, 100, distill_token=True)[0].shape == (2, 7, 4)
    out, _ = xo.tome_merge(x[:, :2], metric[:, :2], 3)  # CLS + 1 token: nothing to merge
    assert out.shape == (2, 2, 4)
    m = xo.tome_match(metric, -5)
    assert m.src_idx.shape == (2, 0) and torch.equal(m.dest, torch.arange(11).expand(2, 11))


def test_opcheck():
    x = torch.randn(2, 11, 4, requires_grad=True)
    size = (torch.rand(2, 11, 1) + 0.5).requires_grad_()
    metric = torch.randn(2, 11, 6)
    for backend in ("torch", "cpu"):
        torch.library.opcheck(torch.ops.xray_ops.tome_match.default,
                              (metric, 3, True, False, backend))
        torch.library.opcheck(torch.ops.xray_ops.tome_match.default,
                              (metric, 4, False, True, backend))
        m = ref.tome_match(metric, 3, True, False)
        for s in (size, None):
            torch.library.opcheck(torch.ops.xray_ops.tome_merge.default,
                                  (x, s, m[3], m[4], m[5], backend))
    g = torch.randn(2, 8, 4)
    out, size_out = ref.tome_merge_apply(x.detach(), size.detach(), m[3], 8)
    torch.library.opcheck(torch.ops.xray_ops.tome_merge_backward.default,
                          (g, torch.randn(2, 8, 1), x.detach(), size.detach(), out, size_out,
                           m[3], True, "auto"))


def test_torch_compile_fullgraph():
    def block(x, metric, size):
        x = x * 2
        x, size, match = xo.tome_merge(x, metric, 3, size=size, return_match=True)
        x = x + xo.tome_key_bias(size)[..., None]
        x, size = xo.tome_merge(x, x, 2, size=size)
        back = xo.tome_unmerge(x, xo.tome_match(x.detach(), 0))
        return x.square().sum() + size.sum() + back.sum() + match.dest.sum()

    x = torch.randn(2, 13, 4, requires_grad=True)
    metric = torch.randn(2, 13, 6)
    size = (torch.rand(2, 13, 1) + 0.5).requires_grad_()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    got = compiled(x, metric, size)
    gx, gs = torch.autograd.grad(got, [x, size])
    want = block(x, metric, size)
    wx, ws = torch.autograd.grad(want, [x, size])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gx, wx)
    torch.testing.assert_close(gs, ws)


def test_bad_inputs_name_the_argument():
    x = torch.randn(2, 9, 4)
    metric = torch.randn(2, 9, 3)
    size = torch.ones(2, 9, 1)
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        xo.tome_merge(x.numpy(), metric, 2)
    with pytest.raises(TypeError, match="x: expected a floating dtype"):
        xo.tome_merge(x.long(), metric, 2)
    with pytest.raises(TypeError, match="metric: expected a floating dtype"):
        xo.tome_merge(x, metric.int(), 2)
    with pytest.raises(ValueError, match="x: expected a 3-D tensor"):
        xo.tome_merge(x[0], metric, 2)
    with pytest.raises(ValueError, match=r"metric: expected shape \(2, 9, \*\)"):
        xo.tome_merge(x, metric[:, :8], 2)
    with pytest.raises(ValueError, match=r"metric: expected shape \(2, 9, \*\)"):
        xo.tome_merge(x, metric[:1], 2)
    with pytest.raises(ValueError, match="metric: expected at least 1 channel"):
        xo.tome_merge(x, metric[..., :0], 2)
    with pytest.raises(ValueError, match=r"size: expected shape \(2, 9, 1\)"):
        xo.tome_merge(x, metric, 2, size=size[:, :8])
    with pytest.raises(ValueError, match=r"size: expected shape \(2, 9, 1\)"):
        xo.tome_merge(x, metric, 2, size=torch.ones(2, 9, 2))
    with pytest.raises(TypeError, match="size: expected dtype float32"):
        xo.tome_merge(x, metric, 2, size=size.double())
    with pytest.raises(ValueError, match="metric: expected a tensor on cpu"):
        xo.tome_merge(x, metric.to("meta"), 2)
    with pytest.raises(ValueError, match="size: expected a tensor on cpu"):
        xo.tome_merge(x, metric, 2, size=size.to("meta"))
    with pytest.raises(TypeError, match="r: expected an int"):
        xo.tome_merge(x, metric, 2.0)
    with pytest.raises(TypeError, match="r: expected an int"):
        xo.tome_merge(x, metric, True)
    with pytest.raises(TypeError, match="class_token: expected a bool"):
        xo.tome_merge(x, metric, 2, class_token=1)
    with pytest.raises(TypeError, match="distill_token: expected a bool"):
        xo.tome_match(metric, 2, distill_token=None)
    out, _, match = xo.tome_merge(x, metric, 2, return_match=True)
    with pytest.raises(ValueError, match=r"x_merged: expected shape \(2, 7, \*\)"):
        xo.tome_unmerge(x, match)
    with pytest.raises(TypeError, match="match: expected a ToMeMatch"):
        xo.tome_unmerge(out, match.dest)
    with pytest.raises(ValueError, match=r"source: expected shape \(2, 9, \*\)"):
        xo.tome_merge_source(match, torch.ones(2, 8, 9))
    with pytest.raises(ValueError, match="size: expected a 3-D tensor"):
        xo.tome_key_bias(torch.ones(2, 9))
    with pytest.raises(ValueError, match=r"size: expected shape \(B, N, 1\)"):
        xo.tome_key_bias(torch.ones(2, 9, 2))


def test_forced_backend_that_cannot_take_inputs_lists_reasons():
    x, metric = torch.randn(2, 9, 4), torch.randn(2, 9, 3)
    with pytest.raises(xo.BackendError, match="forced backend 'cuda'.*device cpu not supported"):
        with xo.backend("cuda"):
            xo.tome_merge(x, metric, 3)
    with pytest.raises(xo.BackendError, match="tome_merge: forced backend 'cpu'.*dtype float16"):
        with xo.backend("cpu"):
            xo.tome_merge(x.half(), metric.half(), 3)


def test_auto_picks_numba_on_cpu_then_torch_for_half():
    x, metric = torch.randn(2, 9, 4), torch.randn(2, 9, 3)
    xo.tome_merge(x, metric, 3)
    assert xo.last_backend("tome_match") == "cpu" and xo.last_backend("tome_merge") == "cpu"
    xo.tome_merge(x.half(), metric.half(), 3)
    assert xo.last_backend("tome_match") == "cpu"  # a float16 metric is upcast, exactly
    assert xo.last_backend("tome_merge") == "torch"


@pytest.mark.parametrize("device,backend", device_backends())
def test_bfloat16_metric_matches_reference(device, backend):
    # every backend upcasts the metric to float32 before any product (no bfloat16 tl.dot)
    metric = separated_metric(2, 30, 16, True, False, torch.bfloat16, device)
    if (device, backend) == ("cpu", "triton"):  # bfloat16 is refused under the interpreter
        with pytest.raises(xo.BackendError, match="bfloat16 under the Triton interpreter"):
            with xo.backend(backend):
                xo.tome_match(metric, 8)
        return
    with xo.backend(backend):
        got = xo.tome_match(metric, 8)
    want = ref.tome_match(metric.double(), 8, True, False)
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w.cpu())


@pytest.mark.parametrize("device,backend", device_backends())
def test_distillation_token_takes_a_merge_only_as_the_only_b_token(device, backend):
    # as documented (and as ToMe does): without class_token and N == 3, B[0] (the distillation
    # token) is the only B token and every score is -inf, so A token 0 merges into it
    metric = torch.randn(2, 3, 4, device=device)
    with xo.backend(backend):
        m3 = xo.tome_match(metric, 1, class_token=False, distill_token=True)
        m5 = xo.tome_match(torch.randn(2, 5, 4, device=device), 2, class_token=False,
                           distill_token=True)
    assert m3.dst_idx.tolist() == [[0], [0]] and m3.src_idx.tolist() == [[0], [0]]
    assert (m5.dst_idx != 0).all()  # with another B token, nothing merges into it
