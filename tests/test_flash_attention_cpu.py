"""The cpu backend of flash attention (xray_ops.cpu.attention, on PyTorch's CPU flash kernel):
each way a gradient reaches it (the kernel's own backward, the CLS row's rank-one correction,
the extra head-dim column for dlse and dkey_bias) against the float64 reference, masked rows,
scales, and that no (Nq, Nk) tensor is ever made. The shared matrix (shapes, dtypes, layouts,
packed, varlen, opcheck, compile) runs it too: tests/test_flash_attention*.py."""

import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import xray_ops as xo
from xray_ops.cpu import attention as cpu_attn
from xray_ops.reference import attention as ref
from xray_ops.testing import assert_close_to_reference


def _inputs(B, H, Nq, Nk, D, dtype):
    return [torch.randn(*s, dtype=torch.float64).to(dtype)
            for s in ((B, H, Nq, D), (B, H, Nk, D), (B, H, Nk, D), (B, Nk))]


def _run(fn, q, k, v, kb, bias_grad, wanted, grads):
    """Outputs of fn and the gradients of sum(grad · output) over the outputs in ``wanted``."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    b = kb.detach().requires_grad_(bias_grad)
    outs = fn(*leaves, b)
    used = [(o, g) for o, g, w in zip(outs, grads, wanted) if w]
    wrt = leaves + ([b] if bias_grad else [])
    g = torch.autograd.grad([o for o, _ in used], wrt, [x.to(o.dtype) for o, x in used])
    return outs, g


@pytest.mark.parametrize("bias_grad,use_cls,use_lse", list(itertools.product((False, True),
                                                                              repeat=3)))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_gradient_path(bias_grad, use_cls, use_lse, causal, dtype):
    """Each combination of the gradients that arrive (out always; cls_attn, lse) and of a
    key_bias that needs a gradient or not takes its own path through the backward. Nq spans
    two query slabs of the backward's own pass (the last one partial)."""
    B, H, Nq, Nk, D, scale = 2, 3, 137, 101, 40, 0.2
    assert Nq > cpu_attn._BLOCK
    q, k, v, kb = _inputs(B, H, Nq, Nk, D, dtype)
    grads = (torch.randn(B, H, Nq, D, dtype=torch.float64), torch.randn(B, Nk, dtype=torch.float64),
             torch.randn(B, H, Nq, dtype=torch.float64))
    wanted = (True, use_cls, use_lse)

    def fast(q, k, v, b):
        with xo.backend("cpu"):
            return xo.flash_attention(q, k, v, key_bias=b, causal=causal, scale=scale,
                                      return_cls_attn=True, return_lse=True)

    def definition(q, k, v, b):
        return ref.attention(q, k, v, scale, b, causal)

    got, g_got = _run(fast, q, k, v, kb, bias_grad, wanted, grads)
    assert xo.last_backend("flash_attention.backward") == "cpu"
    r64, g64 = _run(definition, *(t.double() for t in (q, k, v, kb)), bias_grad, wanted, grads)
    base, gbase = _run(definition, q, k, v, kb, bias_grad, wanted, grads)
    for name, a, r, bl in zip(("out", "cls_attn", "lse"), got, r64, base):
        assert_close_to_reference(a, r, bl, name=name)
    for name, a, r, bl in zip(("grad_q", "grad_k", "grad_v", "grad_key_bias"), g_got, g64, gbase):
        assert_close_to_reference(a, r, bl, name=name)


@pytest.mark.parametrize("scale", [0.0, -0.7, 3.0])
def test_any_scale(scale):
    # the extra-column backward pre-scales q: scale 0 (uniform attention) and negative scales
    q, k, v, kb = _inputs(2, 2, 9, 11, 16, torch.float32)
    grads = (torch.randn(2, 2, 9, 16, dtype=torch.float64), torch.randn(2, 11, dtype=torch.float64),
             torch.randn(2, 2, 9, dtype=torch.float64))

    def fast(q, k, v, b):
        with xo.backend("cpu"):
            return xo.flash_attention(q, k, v, key_bias=b, scale=scale, return_cls_attn=True,
                                      return_lse=True)

    def definition(q, k, v, b):
        return ref.attention(q, k, v, scale, b)

    got, g_got = _run(fast, q, k, v, kb, True, (True, True, True), grads)
    r64, g64 = _run(definition, *(t.double() for t in (q, k, v, kb)), True, (True,) * 3, grads)
    base, gbase = _run(definition, q, k, v, kb, True, (True,) * 3, grads)
    for name, a, r, bl in zip(("out", "cls_attn", "lse", "grad_q", "grad_k", "grad_v",
                               "grad_key_bias"), (*got, *g_got), (*r64, *g64), (*base, *gbase)):
        assert_close_to_reference(a, r, bl, name=name)


def test_fully_masked_rows_under_causal():
    """Sample 0 masks keys 0..3: with causal, queries 0..3 see nothing (lse -inf, out 0, no
    gradient), the others see keys 4..i; sample 1 masks every key."""
    B, H, N, D = 2, 2, 9, 16
    q, k, v, kb = _inputs(B, H, N, N, D, torch.float32)
    kb[0, :4] = float("-inf")
    kb[1, :] = float("-inf")
    leaves = [t.detach().requires_grad_() for t in (q, k, v, kb)]
    g_out, g_cls, g_lse = (torch.randn(B, H, N, D), torch.randn(B, N), torch.randn(B, H, N))
    with xo.backend("cpu"):
        out, cls, lse = xo.flash_attention(*leaves[:3], key_bias=leaves[3], causal=True,
                                           return_cls_attn=True, return_lse=True)
        got = torch.autograd.grad([out, cls, lse], leaves, [g_out, g_cls, g_lse])
    r_out, r_cls, r_lse = ref.attention(q.double(), k.double(), v.double(), D ** -0.5,
                                        kb.double(), True)
    assert torch.all(lse[0, :, :4] == float("-inf")) and torch.all(lse[1] == float("-inf"))
    assert torch.all(out[0, :, :4] == 0) and torch.all(out[1] == 0)
    assert torch.all(cls == 0)  # row 0 sees key 0 only, which is masked in both samples
    base = ref.attention(q, k, v, D ** -0.5, kb, True)
    for name, a, r, bl in zip(("out", "cls_attn", "lse"), (out, cls, lse), (r_out, r_cls, r_lse),
                              base):
        assert_close_to_reference(a, r, bl, name=name)
    # the closed-form reference gradients (autograd through log(0) would give NaN)
    want = ref.attention_backward(g_out.double(), g_cls.double(), g_lse.double(),
                                  *(t.double() for t in (q, k, v)), D ** -0.5, kb.double(), True)
    want_base = ref.attention_backward(g_out, g_cls, g_lse, q, k, v, D ** -0.5, kb, True)
    for name, a, r, bl in zip(("grad_q", "grad_k", "grad_v", "grad_key_bias"), got, want,
                              want_base):
        assert torch.isfinite(a).all(), name
        assert_close_to_reference(a, r, bl, name=name)


class _Shapes(TorchDispatchMode):
    """Records the size of every tensor the code under it makes."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_makes_the_score_matrix():
    """Forward (with the CLS row) and every backward path make tensors of O(B·H·N·D) at most:
    nothing of the size of the (Nq, Nk) scores of one head, let alone all heads."""
    B, H, D = 1, 2, 8
    Nq = 4 * cpu_attn._BLOCK + 5
    Nk = Nq + 10
    q, k, v, kb = _inputs(B, H, Nq, Nk, D, torch.float32)
    limit = Nq * Nk  # one head's scores
    assert B * H * max(Nq, Nk) * D < limit / 4 and B * H * cpu_attn._BLOCK * Nk < limit
    with _Shapes() as rec:
        out, cls, lse = cpu_attn.flash_attention_forward(q, k, v, kb, 0.3, True, True)
        dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
        cpu_attn.flash_attention_backward(torch.randn_like(out), torch.randn_like(cls),
                                          torch.randn_like(lse), q, k, v, kb, True, out, lse, 0.3,
                                          True, dq, dk, dv)
        cpu_attn.flash_attention_backward(torch.randn_like(out), torch.randn_like(cls), None, q, k,
                                          v, kb, False, out, lse, 0.3, True, dq, dk, dv)
    assert 0 < rec.largest < limit


def test_one_backward_pass_the_slab_pass_only_when_needed(monkeypatch):
    """The backward's own pass over P runs only for a key_bias gradient or a gradient through
    lse, and then instead of the kernel's backward (never both: each recomputes P); returned
    but unused outputs (lse here) bring no gradient, hence no work."""
    calls = []
    slab, kernel = cpu_attn._slab_backward, cpu_attn._BWD
    monkeypatch.setattr(cpu_attn, "_slab_backward",
                        lambda *a, **k: calls.append(("slab", a[5] is not None)) or slab(*a, **k))
    monkeypatch.setattr(cpu_attn, "_BWD",
                        lambda *a, **k: calls.append(("kernel", None)) or kernel(*a, **k))
    q, k, v, kb = _inputs(1, 2, 7, 7, 16, torch.float32)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    with xo.backend("cpu"):
        out, cls, lse = xo.flash_attention(*leaves, key_bias=kb, return_cls_attn=True,
                                           return_lse=True)
        (out.sum() + cls.sum()).backward()
        # key_bias needs no gradient, lse unused: the kernel's backward only
        assert calls == [("kernel", None)]
        out, lse = xo.flash_attention(*leaves, key_bias=kb.requires_grad_(), return_lse=True)
        out.sum().backward()
        # dkey_bias, no lse gradient: the slab pass alone
        assert calls[1:] == [("slab", False)] and kb.grad is not None
        out, lse = xo.flash_attention(*leaves, return_lse=True)
        (out.sum() + lse.sum()).backward()
        assert calls[2:] == [("slab", True)]


def test_float64_is_left_to_the_reference():
    q = torch.randn(1, 2, 5, 16, dtype=torch.float64)
    with pytest.raises(xo.BackendError, match="forced backend 'cpu'.*dtype float64 not supported"):
        with xo.backend("cpu"):
            xo.flash_attention(q, q, q)
