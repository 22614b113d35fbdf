"""flash_attention_varlen: a batch of different lengths against the per-sample float64
reference — out, cls_attn, lse and every gradient — plus its input checks."""

import pytest
import torch

import xray_ops as xo
from xray_ops.reference import attention as ref
from xray_ops.testing import assert_close_to_reference

from .matrix import device_backend_dtypes

CASES = device_backend_dtypes(cpu=("torch", "triton", "cpu"), gpu=("triton",),
                              gpu_dtypes=(torch.bfloat16, torch.float16))
CASES += device_backend_dtypes(cpu=("cpu",), gpu=(), cpu_dtypes=(torch.bfloat16,))


@pytest.fixture(autouse=True)
def _heuristic_tiles(monkeypatch):
    monkeypatch.setenv("XRAY_OPS_AUTOTUNE", "0")  # GPU: no autotuning per test shape


def _cu(lengths, device):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return cu.to(device)


def _run(fn, q, k, v, kb, grads):
    leaves = [t.detach().requires_grad_() for t in (q, k, v, kb)]
    out, cls, lse = fn(*leaves)
    g = torch.autograd.grad([out, cls, lse], leaves, [x.to(t.dtype) for x, t in
                                                      zip(grads, (out, cls, lse))])
    return (out, cls, lse), g


@pytest.mark.parametrize("device,backend,dtype", CASES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lens_q,lens_k,D", [([1, 7, 40], [5, 7, 33], 32),
                                             ([17, 3], [17, 3], 80)])
def test_varlen_matches_reference(device, backend, dtype, causal, lens_q, lens_k, D):
    H = 2
    Tq, Tk = sum(lens_q), sum(lens_k)
    q = torch.randn(Tq, H, D, dtype=torch.float64)
    k = torch.randn(Tk, H, D, dtype=torch.float64)
    v = torch.randn(Tk, H, D, dtype=torch.float64)
    kb = torch.randn(Tk, dtype=torch.float64)
    cu_q, cu_k = _cu(lens_q, device), _cu(lens_k, device)
    scale = D ** -0.5
    grads = (torch.randn(Tq, H, D, dtype=torch.float64), torch.randn(Tk, dtype=torch.float64),
             torch.randn(H, Tq, dtype=torch.float64))

    def fast(q, k, v, b):
        with xo.backend(backend):
            return xo.flash_attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k),
                                             causal=causal, key_bias=b, return_cls_attn=True,
                                             return_lse=True)

    def definition(q, k, v, b):
        return ref.attention_varlen(q, k, v, cu_q.cpu(), cu_k.cpu(), scale, b, causal)

    cast = [t.to(device=device, dtype=dtype) for t in (q, k, v, kb)]
    got, g_got = _run(fast, *cast, [g.to(device) for g in grads])
    assert xo.last_backend("flash_attention_varlen") == backend
    assert xo.last_backend("flash_attention_varlen.backward") == backend
    assert got[0].shape == (Tq, H, D) and got[1].shape == (Tk,) and got[2].shape == (H, Tq)
    assert got[2].dtype == torch.float32
    r64, g64 = _run(definition, q, k, v, kb, grads)
    base, gbase = _run(definition, *[t.cpu() for t in cast], grads)
    names = ("out", "cls_attn", "lse", "grad_q", "grad_k", "grad_v", "grad_key_bias")
    for name, a, r, b in zip(names, (*got, *g_got), (*r64, *g64), (*base, *gbase)):
        assert_close_to_reference(a, r, b, name=name)


def test_varlen_equals_dense_per_sample():
    # a varlen batch is each sample through the dense op
    lens = [4, 9]
    H, D = 2, 32
    q, k, v = (torch.randn(sum(lens), H, D) for _ in range(3))
    cu = _cu(lens, "cpu")
    for backend in ("triton", "cpu"):
        with xo.backend(backend):
            out = xo.flash_attention_varlen(q, k, v, cu, cu, 9, 9)
            for (a, b) in ((0, 4), (4, 13)):
                dense = xo.flash_attention(*(t[a:b].transpose(0, 1)[None] for t in (q, k, v)))
                torch.testing.assert_close(out[a:b], dense[0].transpose(0, 1))


def test_varlen_bad_inputs():
    q = torch.randn(10, 2, 32)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    fv = xo.flash_attention_varlen
    with pytest.raises(ValueError, match=r"q: expected a 3-D tensor \(total_tokens, H, D\)"):
        fv(q[None], q, q, cu, cu, 6, 6)
    with pytest.raises(ValueError, match="k: expected 2 heads"):
        fv(q, q[:, :1], q[:, :1], cu, cu, 6, 6)
    with pytest.raises(TypeError, match="cu_seqlens_q: expected dtype int32 or int64"):
        fv(q, q, q, cu.float(), cu, 6, 6)
    with pytest.raises(ValueError, match="cu_seqlens_k: expected the shape of cu_seqlens_q"):
        fv(q, q, q, cu, cu[:2], 6, 6)
    with pytest.raises(ValueError, match="cu_seqlens_q: expected to start at 0 and end at the "
                                         "token count 10"):
        fv(q, q, q, torch.tensor([0, 4, 9]), cu, 6, 6)
    with pytest.raises(ValueError, match="cu_seqlens_k: expected every sequence length >= 1"):
        fv(q, q, q, cu, torch.tensor([0, 10, 10]), 6, 10)
    with pytest.raises(ValueError, match="max_seqlen_q: expected >= the longest sequence 6"):
        fv(q, q, q, cu, cu, 5, 6)
    with pytest.raises(TypeError, match="max_seqlen_k: expected an int"):
        fv(q, q, q, cu, cu, 6, 6.0)
    with pytest.raises(ValueError, match=r"key_bias: expected shape \(10\)"):
        fv(q, q, q, cu, cu, 6, 6, key_bias=torch.randn(2, 5))


def test_varlen_opcheck():
    q, k, v = (torch.randn(9, 2, 16, requires_grad=True) for _ in range(3))
    kb = torch.randn(9, requires_grad=True)
    cu = torch.tensor([0, 3, 9], dtype=torch.int32)
    for backend in ("torch", "triton", "cpu"):
        torch.library.opcheck(torch.ops.xray_ops.flash_attention_varlen.default,
                              (q, k, v, cu, cu, 6, 6, kb, 0.25, True, True, True, backend))


def test_varlen_torch_compile_fullgraph():
    def f(q, k, v, cu, b):
        out, cls, lse = xo.flash_attention_varlen(q, k, v, cu, cu, 6, 6, key_bias=b, causal=True,
                                                  return_cls_attn=True, return_lse=True)
        return out.square().sum() + cls.sum() + lse.sum()

    q, k, v = (torch.randn(9, 2, 16, requires_grad=True) for _ in range(3))
    b = torch.randn(9, requires_grad=True)
    cu = torch.tensor([0, 3, 9], dtype=torch.int32)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k, v, cu, b), [q, k, v, b])
    want = torch.autograd.grad(f(q, k, v, cu, b), [q, k, v, b])
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w)
