"""flash_attention: every backend against the float64 reference — out, cls_attn, lse and the
gradients to q, k, v and key_bias — plus layouts, masking, dispatch, opcheck and compile."""

import pytest
import torch

import xray_ops as xo
from xray_ops import _dispatch, _ext
from xray_ops.ops import attention_backends as attn_backends
from xray_ops.reference import attention as ref
from xray_ops.testing import assert_close_to_reference

from .matrix import device_backend_dtypes

CPU_BACKENDS = ("torch", "triton", "cpu")
# what last_backend reports after a call with return_cls_attn=True, where it is not the backend
REPORTED_FORWARD = {"cuda": "cuda+triton"}
REPORTED_BACKWARD = {"cuda": "triton"}

# (B, H, Nq, Nk, D, causal, key_bias). Under the interpreter every program runs in Python, so
# the long sequences use B·H = 1; GPU-only cases below add bf16, big B·H and ViT shapes.
CPU_SHAPES = [
    (2, 2, 1, 1, 32, False, True),  # one token
    (1, 2, 7, 7, 64, True, True),  # shorter than a tile, causal
    (2, 1, 7, 12, 80, False, False),  # Nq != Nk, head dim 80 (64 + 16), no bias
    (1, 1, 197, 197, 64, False, True),  # ViT-B/224
    (1, 1, 197, 197, 80, True, False),  # ViT-H head dim, causal
    (1, 1, 577, 577, 32, False, True),  # ViT-L/384 length
    (1, 2, 577, 577, 128, True, True),  # ViT-L/384 length, head dim 128, causal
    (1, 2, 50, 33, 128, True, True),  # more queries than keys, causal
    (1, 1, 33, 70, 96, True, True),  # fewer queries than keys, causal, head dim 96 (64 + 32)
    (3, 4, 20, 20, 64, False, True),  # B·H = 12
]
# the CPU matrix; the GPU has its own shapes below. Layout tests also run Triton on the GPU.
# the cpu backend (PyTorch's CPU flash kernel) also runs bfloat16 (no interpreter involved)
CPU_BF16 = device_backend_dtypes(cpu=("cpu",), gpu=(), cpu_dtypes=(torch.bfloat16,))
CASES = device_backend_dtypes(cpu=CPU_BACKENDS, gpu=()) + CPU_BF16
LAYOUT_CASES = device_backend_dtypes(cpu=CPU_BACKENDS, gpu=("triton",),
                                     gpu_dtypes=(torch.bfloat16,)) + CPU_BF16


def _inputs(B, H, Nq, Nk, D, bias, dtype, device):
    q = torch.randn(B, H, Nq, D, dtype=torch.float64)
    k = torch.randn(B, H, Nk, D, dtype=torch.float64)
    v = torch.randn(B, H, Nk, D, dtype=torch.float64)
    kb = torch.randn(B, Nk, dtype=torch.float64) if bias else None
    cast = [t.to(device=device, dtype=dtype) if t is not None else None for t in (q, k, v, kb)]
    return cast


def _grads(out, cls, lse):
    """Random gradients for all three outputs (lse's too: it is differentiable)."""
    return (torch.randn_like(out, dtype=torch.float64), torch.randn_like(cls, dtype=torch.float64),
            torch.randn_like(lse, dtype=torch.float64))


def _reference(q, k, v, kb, scale, causal, grads):
    """Outputs and gradients of the definition through autograd, in q's dtype."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    b = kb.detach().requires_grad_() if kb is not None else None
    out, cls, lse = ref.attention(*leaves, scale, b, causal)
    wrt = leaves + ([b] if b is not None else [])
    g = torch.autograd.grad([out, cls, lse], wrt, [x.to(q.dtype) for x in grads])
    return (out, cls, lse), g


def check_against_reference(backend, q, k, v, kb, causal, *, scale=None, grads=None,
                            grad_fn=None):
    """Run xo.flash_attention under ``backend`` and hold everything to the float64 reference
    with the same-dtype PyTorch error as the budget."""
    D = q.shape[-1]
    s = scale if scale is not None else D ** -0.5
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    b = kb.detach().requires_grad_() if kb is not None else None
    with xo.backend(backend):
        out, cls, lse = xo.flash_attention(*leaves, causal=causal, scale=scale, key_bias=b,
                                           return_cls_attn=True, return_lse=True)
        if grads is None:
            grads = _grads(out, cls, lse)
        if grad_fn is not None:
            grads = grad_fn(grads)
        wrt = leaves + ([b] if b is not None else [])
        got = torch.autograd.grad([out, cls, lse], wrt,
                                  [g.to(device=out.device, dtype=t.dtype)
                                   for g, t in zip(grads, (out, cls, lse))])
    # the cuda backend's CLS row and backward are the Triton kernels: last_backend says so
    assert xo.last_backend("flash_attention") == REPORTED_FORWARD.get(backend, backend)
    assert xo.last_backend("flash_attention.backward") == REPORTED_BACKWARD.get(backend, backend)
    B, H, Nq, _ = q.shape
    assert out.shape == (B, H, Nq, D) and out.dtype == q.dtype
    assert cls.shape == (B, k.shape[2]) and cls.dtype == q.dtype
    assert lse.shape == (B, H, Nq) and lse.dtype == torch.float32
    r64, g64 = _reference(q.double(), k.double(), v.double(),
                          kb.double() if kb is not None else None, s, causal,
                          [g.double() for g in grads])
    base, gbase = _reference(q, k, v, kb, s, causal, grads)
    for name, a, r, bl in zip(("out", "cls_attn", "lse"), (out, cls, lse), r64, base):
        assert_close_to_reference(a, r, bl, name=name)
    for name, a, r, bl in zip(("grad_q", "grad_k", "grad_v", "grad_key_bias"), got, g64, gbase):
        assert a.shape == r.shape
        assert_close_to_reference(a, r, bl, name=name)
    return out, cls, lse, got


@pytest.mark.parametrize("device,backend,dtype", CASES)
@pytest.mark.parametrize("B,H,Nq,Nk,D,causal,bias", CPU_SHAPES,
                         ids=[f"B{c[0]}H{c[1]}q{c[2]}k{c[3]}D{c[4]}{'c' if c[5] else ''}"
                              f"{'b' if c[6] else ''}" for c in CPU_SHAPES])
def test_matches_reference(device, backend, dtype, B, H, Nq, Nk, D, causal, bias):
    q, k, v, kb = _inputs(B, H, Nq, Nk, D, bias, dtype, device)
    check_against_reference(backend, q, k, v, kb, causal)


@pytest.fixture(autouse=True)
def _heuristic_tiles(monkeypatch):
    """On the GPU, one heuristic tile config per call instead of autotuning every test's
    shape (compile time); test_every_tile_config_gpu and test_autotuned_path_gpu cover the
    tuned configs."""
    monkeypatch.setenv("XRAY_OPS_AUTOTUNE", "0")


GPU_SHAPES = [
    (8, 12, 197, 197, 64, False, True),  # ViT-B/224, B·H large
    (4, 16, 577, 577, 64, False, True),  # ViT-L/384
    (4, 16, 257, 257, 80, True, True),  # ViT-H/14 head dim, causal
    (2, 16, 1025, 1025, 128, False, False),
    (1, 8, 4097, 4097, 96, False, True),  # video length, head dim 96
    (32, 8, 1, 1, 32, False, True),
    (16, 8, 7, 300, 80, True, True),  # Nq < Nk
]
GPU_BACKEND_DTYPES = [("triton", torch.bfloat16), ("triton", torch.float16),
                      ("cuda", torch.bfloat16), ("cuda", torch.float16)]
# fp32's IEEE (FMA) kernels take ~10 s each to compile: two shapes cover them
GPU_FP32_SHAPES = [GPU_SHAPES[0], GPU_SHAPES[2]]


def _skip_unless_cuda_backend_takes(D, dtype, causal, bias):
    q = torch.empty(1, 1, 2, D, device="cuda", dtype=dtype)
    kb = torch.empty(1, 2, device="cuda", dtype=dtype) if bias else None
    reasons = _dispatch.reasons_for("flash_attention", (q, q, q, kb, 1.0, causal, True))["cuda"]
    if reasons:
        pytest.skip("cuda backend: " + "; ".join(reasons))


@pytest.mark.gpu
@pytest.mark.parametrize("backend,dtype", GPU_BACKEND_DTYPES,
                         ids=[f"{b}-{str(d)[6:]}" for b, d in GPU_BACKEND_DTYPES])
@pytest.mark.parametrize("B,H,Nq,Nk,D,causal,bias", GPU_SHAPES)
def test_matches_reference_gpu(backend, dtype, B, H, Nq, Nk, D, causal, bias):
    if backend == "cuda":
        _skip_unless_cuda_backend_takes(D, dtype, causal, bias)
    q, k, v, kb = _inputs(B, H, Nq, Nk, D, bias, dtype, "cuda")
    check_against_reference(backend, q, k, v, kb, causal)


@pytest.mark.gpu
@pytest.mark.parametrize("B,H,Nq,Nk,D,causal,bias", GPU_FP32_SHAPES)
def test_matches_reference_gpu_fp32(B, H, Nq, Nk, D, causal, bias):
    q, k, v, kb = _inputs(B, H, Nq, Nk, D, bias, torch.float32, "cuda")
    check_against_reference("triton", q, k, v, kb, causal)


@pytest.mark.gpu
def test_autotuned_path_gpu(monkeypatch):
    monkeypatch.setenv("XRAY_OPS_AUTOTUNE", "1")
    q, k, v, kb = _inputs(8, 12, 197, 197, 64, True, torch.bfloat16, "cuda")
    check_against_reference("triton", q, k, v, kb, False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_every_tile_config_gpu(dtype):
    """Each autotune candidate is correct on its own (the tuner may pick any of them)."""
    from xray_ops.kernels import flash_attention as kf
    from xray_ops.kernels import flash_attention_bwd as kb_

    B, H, Nq, Nk, D = 2, 3, 150, 197, 80
    q, k, v, kb = _inputs(B, H, Nq, Nk, D, True, dtype, "cuda")
    scale = D ** -0.5
    grads = [torch.randn(B, H, Nq, D, device="cuda", dtype=torch.float64),
             torch.randn(B, Nk, device="cuda", dtype=torch.float64),
             torch.randn(B, H, Nq, device="cuda", dtype=torch.float64)]
    for causal in (False, True):
        r64, g64 = _reference(q.double(), k.double(), v.double(), kb.double(), scale, causal,
                              grads)
        base, gbase = _reference(q, k, v, kb, scale, causal, grads)
        for cfg in kf.FWD_CONFIGS:
            out, cls, lse = kf.flash_attention_forward(q, k, v, kb, scale, causal, True,
                                                       config=cfg)
            for name, a, r, bl in zip(("out", "cls_attn", "lse"), (out, cls, lse), r64, base):
                assert_close_to_reference(a, r, bl, name=f"{name} {cfg}")
        out, cls, lse = kf.flash_attention_forward(q, k, v, kb, scale, causal, True)
        g_out, g_cls, g_lse = (g.to(t.dtype) for g, t in zip(grads, (out, cls, lse)))
        for i in range(max(len(kb_.DKDV_CONFIGS), len(kb_.DQ_CONFIGS))):
            c1 = kb_.DKDV_CONFIGS[i % len(kb_.DKDV_CONFIGS)]
            c2 = kb_.DQ_CONFIGS[i % len(kb_.DQ_CONFIGS)]
            dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
            db = kb_.flash_attention_backward(g_out, g_cls, g_lse, q, k, v, kb, out, lse, scale,
                                              causal, dq, dk, dv, dkdv_config=c1, dq_config=c2)
            for name, a, r, bl in zip(("grad_q", "grad_k", "grad_v", "grad_key_bias"),
                                      (dq, dk, dv, db), g64, gbase):
                assert_close_to_reference(a, r, bl, name=f"{name} {c1} {c2}")


@pytest.mark.parametrize("device,backend,dtype", LAYOUT_CASES)
def test_strided_inputs_and_expanded_grads(device, backend, dtype):
    B, H, Nq, Nk, D = 2, 3, 19, 37, 64
    q, k, v, kb = _inputs(B, H, Nq, Nk, D, True, dtype, device)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, N, H, D) storage, as timm's
    k = k.transpose(-1, -2).contiguous().transpose(-1, -2)  # head dim not contiguous
    v = v[:1].expand(B, H, Nk, D)  # one sample broadcast over the batch (stride 0)
    kb = torch.stack([kb, torch.zeros_like(kb)], -1)[..., 0]  # every other element
    assert k.stride(-1) != 1 and v.stride(0) == 0 and kb.stride(1) == 2

    def expanded(grads):  # the gradient of .sum() has stride 0
        go, gc, gl = grads
        return (go[:1, :1, :1].expand_as(go), gc[:1].expand_as(gc), gl[:1, :1].expand_as(gl))

    check_against_reference(backend, q, k, v, kb, False, grad_fn=expanded, scale=0.3)


@pytest.mark.parametrize("device,backend,dtype", LAYOUT_CASES)
def test_qkvpacked_matches_unpacked(device, backend, dtype):
    B, N, H, D = 2, 23, 3, 32
    qkv = torch.randn(B, N, 3, H, D, dtype=torch.float64)
    kb = torch.randn(B, N, dtype=torch.float64)
    x = qkv.to(device=device, dtype=dtype).requires_grad_()
    b = kb.to(device=device, dtype=dtype).requires_grad_()
    with xo.backend(backend):
        out, cls, lse = xo.flash_attention_qkvpacked(x, key_bias=b, causal=True,
                                                     return_cls_attn=True, return_lse=True)
        grads = _grads(out, cls, lse)
        gx, gb = torch.autograd.grad([out, cls, lse], [x, b],
                                     [g.to(t.dtype) for g, t in zip(grads, (out, cls, lse))])
    assert xo.last_backend("flash_attention") == backend
    assert gx.shape == (B, N, 3, H, D) and gx.is_contiguous()
    assert out.shape == (B, H, N, D)

    def run(qkv, kb, grads):
        x = qkv.detach().requires_grad_()
        b = kb.detach().requires_grad_()
        q, k, v = x.permute(2, 0, 3, 1, 4).unbind(0)
        res = ref.attention(q, k, v, D ** -0.5, b, True)
        return res, torch.autograd.grad(res, [x, b], [g.to(qkv.dtype) for g in grads])

    r64, g64 = run(qkv, kb, [g.double() for g in grads])
    base, gbase = run(x.detach(), b.detach(), grads)
    for name, a, r, bl in zip(("out", "cls_attn", "lse", "grad_qkv", "grad_key_bias"),
                              (out, cls, lse, gx, gb), (*r64, *g64), (*base, *gbase)):
        assert_close_to_reference(a, r, bl, name=name)


def test_qkvpacked_reads_the_packed_tensor_in_place():
    # the forward and backward read q, k and v through strides: no permute copy
    qkv = torch.randn(1, 5, 3, 2, 16, requires_grad=True)
    seen = []

    def spy(q, k, v, *rest):
        seen.append((q.data_ptr(), k.data_ptr(), v.data_ptr(), q.is_contiguous()))
        return attn_backends._torch_forward(q, k, v, *rest)

    impl = _dispatch._IMPLS["flash_attention"]["torch"]
    _dispatch._IMPLS["flash_attention"]["torch"] = _dispatch.Impl(
        **{**impl.__dict__, "forward": spy})
    try:
        with xo.backend("torch"):
            xo.flash_attention_qkvpacked(qkv)
    finally:
        _dispatch._IMPLS["flash_attention"]["torch"] = impl
    esize = qkv.element_size()
    base = qkv.data_ptr()
    assert seen == [(base, base + 2 * 16 * esize, base + 2 * 2 * 16 * esize, False)]


@pytest.mark.parametrize("device,backend,dtype", LAYOUT_CASES)
def test_fully_and_partly_masked_keys(device, backend, dtype):
    B, H, N, D = 2, 2, 9, 32
    q, k, v, _ = _inputs(B, H, N, N, D, False, dtype, device)
    kb = torch.zeros(B, N, device=device, dtype=dtype)
    kb[0, 3:] = float("-inf")  # sample 0 sees keys 0..2 only
    kb[1, :] = float("-inf")  # sample 1 sees nothing: out 0, lse -inf, gradients 0
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    with xo.backend(backend):
        out, cls, lse = xo.flash_attention(*leaves, key_bias=kb, return_cls_attn=True,
                                           return_lse=True)
        (out.float().sum() + cls.float().sum()).backward()
    assert torch.all(out[1] == 0) and torch.all(cls[1] == 0)
    assert torch.all(lse[1] == float("-inf"))
    for t in leaves:
        assert torch.isfinite(t.grad).all()
        assert torch.all(t.grad[1] == 0)
    # sample 0 equals attention over its three visible keys
    r_out, r_cls, r_lse = ref.attention(q[:1].double(), k[:1, :, :3].double(),
                                        v[:1, :, :3].double(), D ** -0.5)
    _, b_cls, _ = ref.attention(q[:1], k[:1, :, :3], v[:1, :, :3], D ** -0.5)
    assert_close_to_reference(out[:1], r_out, ref.attention(q[:1], k[:1, :, :3], v[:1, :, :3],
                                                            D ** -0.5)[0], name="out")
    assert_close_to_reference(cls[0, :3], r_cls[0], b_cls[0], name="cls_attn")
    assert torch.all(cls[0, 3:] == 0)
    assert torch.all(leaves[1].grad[0, :, 3:] == 0) and torch.all(leaves[2].grad[0, :, 3:] == 0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_propagates(backend):
    q, k, v, _ = _inputs(1, 2, 8, 8, 32, False, torch.float32, "cpu")
    v[0, 0, 5, 3] = float("nan")  # every query of head 0 attends to key 5
    q[0, 1, 2, 0] = float("nan")  # query 2 of head 1
    with xo.backend(backend):
        out = xo.flash_attention(q, k, v)
    assert torch.isnan(out[0, 0, :, 3]).all() and not torch.isnan(out[0, 0, :, :3]).any()
    assert torch.isnan(out[0, 1, 2]).all()
    assert not torch.isnan(out[0, 1, :2]).any() and not torch.isnan(out[0, 1, 3:]).any()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_returns_only_the_extras_asked_for(backend):
    q, k, v, kb = _inputs(2, 2, 5, 6, 32, True, torch.float32, "cpu")
    with xo.backend(backend):
        out = xo.flash_attention(q, k, v, key_bias=kb)
        assert isinstance(out, torch.Tensor) and out.shape == (2, 2, 5, 32)
        o2, cls = xo.flash_attention(q, k, v, key_bias=kb, return_cls_attn=True)
        o3, lse = xo.flash_attention(q, k, v, key_bias=kb, return_lse=True)
    assert cls.shape == (2, 6) and lse.shape == (2, 2, 5)
    torch.testing.assert_close(out, o2, rtol=0, atol=0)
    torch.testing.assert_close(out, o3, rtol=0, atol=0)
    # the (B, Nq, H, D) storage makes the ViT's reshape a view
    assert out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(cls.sum(-1), torch.ones(2))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_only_cls_attn_used_gives_its_gradient(backend):
    # out unused: its gradient arrives as zeros/None; cls_attn alone drives the backward
    q, k, v, kb = _inputs(1, 3, 6, 10, 32, True, torch.float32, "cpu")
    leaves = [t.requires_grad_() for t in (q, k, v, kb)]
    w = torch.randn(10)
    with xo.backend(backend):
        _, cls = xo.flash_attention(q, k, v, key_bias=kb, return_cls_attn=True)
        got = torch.autograd.grad((cls * w).sum(), leaves)
    r = [t.detach().double().requires_grad_() for t in leaves]
    _, r_cls, _ = ref.attention(r[0], r[1], r[2], 32 ** -0.5, r[3])
    want = torch.autograd.grad((r_cls * w.double()).sum(), r, allow_unused=True)
    want = [g if g is not None else torch.zeros_like(t) for g, t in zip(want, r)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)
    assert torch.all(got[2] == 0)  # cls_attn does not depend on v


def test_cls_attn_from_lse_is_the_softmax_row():
    q, k, v, kb = _inputs(2, 3, 5, 11, 16, True, torch.float64, "cpu")
    for causal in (False, True):
        _, cls, lse = ref.attention(q, k, v, 0.7, kb, causal)
        torch.testing.assert_close(ref.cls_attn_from_lse(q, k, lse, 0.7, kb, causal), cls)


def test_triton_is_deterministic():
    q, k, v, kb = _inputs(2, 2, 40, 40, 32, True, torch.float32, "cpu")
    runs = []
    for _ in range(2):
        leaves = [t.detach().requires_grad_() for t in (q, k, v, kb)]
        with xo.backend("triton"):
            out, cls = xo.flash_attention(*leaves[:3], key_bias=leaves[3], return_cls_attn=True)
            (out.square().sum() + cls.sum()).backward()
        runs.append([out, cls] + [t.grad for t in leaves])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_gradcheck_float64():
    q, k, v, kb = [t.requires_grad_() for t in _inputs(1, 2, 4, 5, 8, True, torch.float64,
                                                         "cpu")]
    with xo.backend("torch"):
        for causal in (False, True):
            # lse is float32 by contract, too coarse for finite differences: its gradient is
            # checked against the reference's in test_matches_reference
            assert torch.autograd.gradcheck(
                lambda q, k, v, b: xo.flash_attention(q, k, v, key_bias=b, causal=causal,
                                                      return_cls_attn=True),
                (q, k, v, kb), fast_mode=True)


def test_bad_inputs_name_the_argument():
    q, k, v, kb = _inputs(2, 3, 5, 6, 32, True, torch.float32, "cpu")
    fa = xo.flash_attention
    with pytest.raises(TypeError, match="q: expected a torch.Tensor"):
        fa(q.numpy(), k, v)
    with pytest.raises(TypeError, match="k: expected a floating dtype"):
        fa(q, k.long(), v)
    with pytest.raises(ValueError, match=r"q: expected a 4-D tensor \(B, H, N, D\)"):
        fa(q[0], k, v)
    with pytest.raises(ValueError, match="v: expected a 4-D tensor"):
        fa(q, k, v[..., None])
    with pytest.raises(TypeError, match="k: expected dtype float32 \\(like q\\), got float16"):
        fa(q, k.half(), v)
    with pytest.raises(ValueError, match=r"k: expected head dim 32 \(like q\)"):
        fa(q, k[..., :16], v[..., :16])
    with pytest.raises(ValueError, match=r"v: expected the shape of k"):
        fa(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match=r"k: expected batch and heads \(2, 3\)"):
        fa(q, k[:1], v[:1])
    with pytest.raises(ValueError, match=r"k: expected batch and heads \(2, 3\)"):
        fa(q, k[:, :2], v[:, :2])
    with pytest.raises(ValueError, match=r"key_bias: expected shape \(2, 6\) \(B, Nk\)"):
        fa(q, k, v, key_bias=kb[:, :5])
    with pytest.raises(ValueError, match=r"key_bias: expected shape \(2, 6\)"):
        fa(q, k, v, key_bias=kb[:, None])
    with pytest.raises(TypeError, match="key_bias: expected a floating dtype"):
        fa(q, k, v, key_bias=kb.long())
    with pytest.raises(ValueError, match="at least 1 head, 1 query and 1 key"):
        fa(q[:, :, :0], k, v)
    with pytest.raises(TypeError, match="causal: expected a bool"):
        fa(q, k, v, causal=1)
    with pytest.raises(TypeError, match="return_cls_attn: expected a bool"):
        fa(q, k, v, return_cls_attn="yes")
    with pytest.raises(ValueError, match="scale: expected a finite number"):
        fa(q, k, v, scale=float("inf"))
    with pytest.raises(TypeError, match="scale: expected a number"):
        fa(q, k, v, scale="0.1")
    with pytest.raises(ValueError, match=r"qkv: expected shape \(B, N, 3, H, D\)"):
        xo.flash_attention_qkvpacked(torch.randn(2, 5, 2, 3, 8))
    with pytest.raises(ValueError, match=r"key_bias: expected shape \(2, 5\)"):
        xo.flash_attention_qkvpacked(torch.randn(2, 5, 3, 3, 8), key_bias=torch.randn(2, 4))


def test_empty_batch():
    q, k, v, kb = _inputs(0, 2, 5, 6, 32, True, torch.float32, "cpu")
    for backend in CPU_BACKENDS:
        leaves = [t.requires_grad_() for t in (q, k, v, kb)]
        with xo.backend(backend):
            out, cls, lse = xo.flash_attention(*leaves[:3], key_bias=leaves[3],
                                               return_cls_attn=True, return_lse=True)
            assert out.shape == (0, 2, 5, 32) and cls.shape == (0, 6) and lse.shape == (0, 2, 5)
            out.sum().backward()
        assert all(t.grad.shape == t.shape for t in leaves)


def test_forced_backend_that_cannot_take_inputs_lists_reasons():
    q, k, v, _ = _inputs(1, 2, 5, 5, 32, False, torch.float32, "cpu")
    with pytest.raises(xo.BackendError, match="forced backend 'cuda'.*device cpu not supported"):
        with xo.backend("cuda"):
            xo.flash_attention(q, k, v)
    with pytest.raises(xo.BackendError, match="forced backend 'triton'.*head dim 8 not supported"):
        with xo.backend("triton"):
            xo.flash_attention(q[..., :8], k[..., :8], v[..., :8])
    with pytest.raises(xo.BackendError, match="forced backend 'triton'.*bfloat16 under the "
                                              "Triton interpreter"):
        with xo.backend("triton"):
            xo.flash_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    with pytest.raises(xo.BackendError, match="forced backend 'triton'.*dtype float64"):
        with xo.backend("triton"):
            xo.flash_attention(q.double(), k.double(), v.double())


def test_cuda_reasons_without_crashing(monkeypatch):
    """The cuda Impl's runtime (an extension built without csrc/flash_attn) and its own
    check (head dims, last-dim strides); its dtype and device limits are declared fields."""
    class NoAttention:  # an extension built without csrc/flash_attn
        __file__ = "_C.so"

        @staticmethod
        def cuda_archs():
            return "sm_80;sm_90a;compute_90"

    monkeypatch.setattr(_ext, "load", lambda: NoAttention())
    impl = _dispatch._IMPLS["flash_attention"]["cuda"]
    assert any("no flash_attention_forward" in r
               for r in impl.runtime.reasons(torch.device("cuda", 0), False, None))
    q = torch.randn(1, 2, 5, 48)
    inputs = dict(q=q, k=q, v=q.transpose(-1, -2).contiguous().transpose(-1, -2), key_bias=None,
                  scale=1.0, causal=False, want_cls=True)
    reasons = " ".join(attn_backends.cuda_forward_check(
        _dispatch._as_inputs(_dispatch._SPECS["flash_attention"], inputs, False)))
    assert "head dim 48 not supported" in reasons
    assert "v needs stride(-1) == 1" in reasons
    assert torch.float32 not in impl.dtypes and torch.bfloat16 in impl.dtypes
    assert impl.backward is not None and impl.reports(None, backward=True) == "triton"


def test_auto_picks_cpu_on_cpu():
    for dtype, picked in ((torch.float32, "cpu"), (torch.float16, "cpu"),
                          (torch.bfloat16, "cpu"), (torch.float64, "torch")):
        q, k, v, _ = _inputs(1, 2, 5, 5, 32, False, dtype, "cpu")
        xo.flash_attention(q, k, v)
        assert xo.last_backend("flash_attention") == picked


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    q, k, v, kb = [t.requires_grad_() for t in _inputs(1, 2, 5, 7, 16, True, torch.float32,
                                                         "cpu")]
    op = torch.ops.xray_ops.flash_attention.default
    torch.library.opcheck(op, (q, k, v, kb, 0.25, False, True, True, backend))
    torch.library.opcheck(op, (q, k, v, None, 0.25, True, False, False, backend))
    qkv = torch.randn(1, 5, 3, 2, 16, requires_grad=True)
    torch.library.opcheck(torch.ops.xray_ops.flash_attention_qkvpacked.default,
                          (qkv, kb[:, :5], 0.25, False, True, True, backend))
    out, _, lse = op(q, k, v, kb, 0.25, False, True, True, backend)
    torch.library.opcheck(torch.ops.xray_ops.flash_attention_backward.default,
                          (torch.randn_like(out), torch.randn(1, 7), torch.randn_like(lse),
                           q.detach(), k.detach(), v.detach(), kb.detach(), True,
                           out.detach(), lse.detach(), 0.25, False, backend))


def test_torch_compile_fullgraph_block_with_key_bias_and_cls_attn():
    def block(x, w_qkv, size):
        B, N, C = x.shape
        qkv = (x @ w_qkv).reshape(B, N, 3, 2, C // 2)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out, cls = xo.flash_attention(q, k, v, key_bias=size.log(), return_cls_attn=True)
        y = out.transpose(1, 2).reshape(B, N, C)
        return y.square().mean() + (cls * torch.arange(N)).sum()

    x = torch.randn(2, 9, 32, requires_grad=True)
    w = torch.randn(32, 96, requires_grad=True) / 6
    size = torch.rand(2, 9).add(0.5).requires_grad_()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    got = compiled(x, w, size)
    g_got = torch.autograd.grad(got, [x, w, size])
    want = block(x, w, size)
    g_want = torch.autograd.grad(want, [x, w, size])
    torch.testing.assert_close(got, want)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)
