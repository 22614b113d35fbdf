"""The CUDA flash attention forward (csrc/flash_attn/) called directly through the extension,
against a float64 explicit softmax: out and lse, every head dim, ViT lengths, Nq != Nk, causal,
key bias, strided and misaligned inputs, fp16 and bf16, edge cases, bad inputs.

The xray_ops.flash_attention API (validation, dispatch, autograd) is tested elsewhere; this file
holds the kernel to its contract:
    out, lse = _ext.get().flash_attention_forward(q, k, v, key_bias, scale, causal)

The criterion (xray_ops.testing): error against the float64 reference <= 2 x PyTorch's own
error when it computes the same thing in the output's dtype (out: q's dtype; lse: float32)
+ a small atol.
"""

import math

import pytest
import torch

from xray_ops import _ext
from xray_ops.testing import assert_close_to_reference

gpu = pytest.mark.gpu
DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
HEAD_DIMS = [32, 64, 80, 96, 128]
LENGTHS = [1, 7, 197, 577, 1025]
# lse is float32 of order log(Nk) ~ 7: ex2/lg2.approx and the fp32 scale * log2(e) leave a few
# 1e-6; the float32 baseline may happen to be nearly exact.
LSE_ATOL = 5e-5


def _fwd(q, k, v, key_bias=None, scale=None, causal=False):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _ext.get().flash_attention_forward(q, k, v, key_bias, scale, causal)


def reference(q, k, v, key_bias=None, scale=None, causal=False):
    """Explicit softmax attention in the inputs' dtype (float64 for the definition)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if key_bias is not None:
        s = s + key_bias[:, None, None, :].to(s.dtype)
    if causal:
        n_q, n_k = q.shape[-2], k.shape[-2]
        keep = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    return s.softmax(-1) @ v, s.logsumexp(-1)


def _check(q, k, v, key_bias=None, scale=None, causal=False):
    out, lse = _fwd(q, k, v, key_bias, scale, causal)
    B, H, Nq, D = q.shape
    assert out.shape == (B, H, Nq, D) and out.dtype == q.dtype
    # (B, Nq, H, D) storage: a ViT's out.transpose(1, 2).reshape(B, N, H * D) is free
    assert out.transpose(1, 2).is_contiguous()
    assert lse.shape == (B, H, Nq) and lse.dtype == torch.float32 and lse.is_contiguous()
    assert out.device == q.device and lse.device == q.device
    kb64 = None if key_bias is None else key_bias.double()
    r_out, r_lse = reference(q.double(), k.double(), v.double(), kb64, scale, causal)
    b_out, _ = reference(q, k, v, key_bias, scale, causal)  # PyTorch in q's dtype
    _, b_lse = reference(q.float(), k.float(), v.float(), key_bias, scale, causal)  # float32
    assert_close_to_reference(out, r_out, b_out, name="out")
    assert_close_to_reference(lse, r_lse, b_lse, atol=LSE_ATOL, name="lse")
    return out, lse


def _qkv(B, H, Nq, Nk, D, dtype):
    q = torch.randn(B, H, Nq, D, device="cuda", dtype=dtype)
    k = torch.randn(B, H, Nk, D, device="cuda", dtype=dtype)
    v = torch.randn(B, H, Nk, D, device="cuda", dtype=dtype)
    return q, k, v


def _bias(B, Nk):
    """ToMe's proportional attention: log of token sizes 1..8."""
    return torch.randint(1, 9, (B, Nk), device="cuda").float().log()


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("N", LENGTHS)
def test_matches_reference(dtype, D, N):
    _check(*_qkv(2, 3, N, N, D, dtype))


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 80])
@pytest.mark.parametrize("Nq,Nk", [(1, 7), (7, 1), (197, 577), (577, 197), (65, 130),
                                   (1025, 257), (64, 64), (128, 63)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_unequal_lengths_causal_and_key_bias(dtype, D, Nq, Nk, causal, with_bias):
    q, k, v = _qkv(2, 3, Nq, Nk, D, dtype)
    _check(q, k, v, _bias(2, Nk) if with_bias else None, causal=causal)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_causal_and_bias_every_head_dim(dtype, D):
    q, k, v = _qkv(2, 2, 197, 197, D, dtype)
    _check(q, k, v, _bias(2, 197), causal=True)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 80, 128])
@pytest.mark.parametrize("N", [7, 197, 577])
def test_packed_qkv_views_and_strided_bias(dtype, D, N):
    """timm's qkv projection (B, N, 3, H, D) permuted to three (B, H, N, D) views, read in place;
    key_bias a strided column slice of a wider tensor."""
    B, H = 2, 4
    qkv = torch.randn(B, N, 3, H, D, device="cuda", dtype=dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous() and q.stride() == (N * 3 * H * D, D, 3 * H * D, 1)
    wide = torch.randn(B, 2 * N, device="cuda")
    _check(q, k, v, wide[:, ::2])
    _check(q, k, v, wide[:, ::2], causal=True)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_sdpa_layout_and_expanded_inputs(dtype):
    """(B, N, H, D) storage transposed to (B, H, N, D) (what x.view(B, N, H, D).transpose(1, 2)
    gives), and k / v / key_bias broadcast over the batch (stride 0)."""
    B, H, N, D = 3, 5, 197, 64
    q = torch.randn(B, N, H, D, device="cuda", dtype=dtype).transpose(1, 2)
    k = torch.randn(1, H, N, D, device="cuda", dtype=dtype).expand(B, H, N, D)
    v = torch.randn(1, N, H, D, device="cuda", dtype=dtype).transpose(1, 2).expand(B, H, N, D)
    kb = _bias(1, N).expand(B, N)
    _check(q, k, v, kb)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 80])
def test_rows_not_16_byte_aligned(dtype, D):
    """Odd row strides and a data pointer off by one element: the kernel's scalar-load path."""
    B, H, N = 2, 3, 150
    q = torch.randn(B, H, N, D + 1, device="cuda", dtype=dtype)[..., :D]  # stride D + 1
    k = torch.randn(B * H * N * D + 1, device="cuda", dtype=dtype)[1:].view(B, H, N, D)
    v = torch.randn(B, H, N, D, device="cuda", dtype=dtype)
    assert q.stride(2) % 8 != 0 and k.data_ptr() % 16 != 0
    _check(q, k, v, _bias(B, N), causal=True)


@gpu
@pytest.mark.parametrize("B,H,N", [(1, 1, 197), (64, 12, 197), (8, 16, 1025)])
def test_batch_and_heads_large_and_small(B, H, N):
    _check(*_qkv(B, H, N, N, 64, torch.bfloat16))


@gpu
def test_scale_and_large_logits():
    q, k, v = _qkv(2, 2, 197, 197, 64, torch.float16)
    _check(q, k, v, scale=0.0)  # uniform attention
    _check(q, k, v, scale=1.0)  # peaked rows (logits ~ +-30)
    _check(q, k, v, scale=-0.3)


@gpu
def test_runs_on_the_current_stream():
    q, k, v = _qkv(4, 4, 577, 577, 64, torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out, lse = _fwd(q, k, v)
    torch.cuda.current_stream().wait_stream(s)
    r_out, _ = reference(q.double(), k.double(), v.double())
    b_out, _ = reference(q, k, v)
    assert_close_to_reference(out, r_out, b_out, name="out")


@gpu
def test_empty_inputs():
    # Nk == 0: out 0, lse -inf (the sum over no keys)
    q, k, v = _qkv(2, 3, 5, 0, 64, torch.float16)
    out, lse = _fwd(q, k, v, torch.zeros(2, 0, device="cuda"), causal=True)
    assert out.shape == (2, 3, 5, 64) and (out == 0).all()
    assert lse.shape == (2, 3, 5) and (lse == float("-inf")).all()
    # B == 0, H == 0, Nq == 0: empty outputs
    for shape_q, shape_kv in [((0, 3, 5, 64), (0, 3, 5, 64)), ((2, 0, 5, 64), (2, 0, 5, 64)),
                              ((2, 3, 0, 64), (2, 3, 5, 64))]:
        q = torch.randn(shape_q, device="cuda", dtype=torch.float16)
        k = torch.randn(shape_kv, device="cuda", dtype=torch.float16)
        out, lse = _fwd(q, k, k)
        assert out.shape == shape_q and lse.shape == shape_q[:3]


@gpu
def test_rows_without_a_finite_logit_and_nan():
    """key_bias = -inf everywhere for batch 0: out 0, lse -inf (documented convention);
    batch 1 unaffected. A NaN in q poisons that query's row only."""
    q, k, v = _qkv(2, 2, 100, 70, 64, torch.bfloat16)
    kb = _bias(2, 70)
    kb[0] = float("-inf")
    out, lse = _fwd(q, k, v, kb)
    assert (out[0] == 0).all() and (lse[0] == float("-inf")).all()
    r_out, r_lse = reference(q[1:].double(), k[1:].double(), v[1:].double(), kb[1:].double())
    b_out, _ = reference(q[1:], k[1:], v[1:], kb[1:])
    assert_close_to_reference(out[1:], r_out, b_out, name="out")
    q[1, 1, 3, 5] = float("nan")
    out, lse = _fwd(q, k, v, kb)
    assert out[1, 1, 3].isnan().all() and lse[1, 1, 3].isnan()
    out[1, 1, 3] = 0
    lse[1, 1, 3] = 0
    assert not out.isnan().any() and not lse.isnan().any()


@gpu
def test_deterministic():
    q, k, v = _qkv(4, 4, 577, 577, 80, torch.float16)
    kb = _bias(4, 577)
    a, la = _fwd(q, k, v, kb, causal=True)
    b, lb = _fwd(q, k, v, kb.clone(), causal=True)
    assert torch.equal(a, b) and torch.equal(la, lb)


# ---- bad input: a RuntimeError naming the argument, what was expected and what was given ----

def _ok(dtype=torch.float16, D=64, device="cuda"):
    q = torch.randn(2, 3, 10, D, device=device, dtype=dtype)
    return q, q.clone(), q.clone()


@gpu
@pytest.mark.parametrize("case,pattern", [
    ("q_float32", r"q: expected dtype float16 or bfloat16, got Float"),
    ("k_dtype", r"k: expected dtype Half \(q's dtype\), got BFloat16"),
    ("v_dtype", r"v: expected dtype Half \(q's dtype\), got BFloat16"),
    ("q_rank", r"q: expected a 4-D tensor \(B, H, N, D\), got shape \[2, 3, 10\]"),
    ("k_rank", r"k: expected a 4-D tensor"),
    ("head_dim_mismatch", r"k: expected head dim 64 \(q.size\(-1\)\), got shape \[2, 3, 10, 32\]"),
    ("v_head_dim", r"v: expected head dim 64"),
    ("head_dim_unsupported", r"q: expected head dim 32, 64, 80, 96 or 128, got 48"),
    ("batch_mismatch", r"k: expected batch and heads \(2, 3\) as in q, got shape \[1, 3, 10, 64\]"),
    ("heads_mismatch", r"v: expected batch and heads \(2, 3\) as in q, got shape \[2, 4, 10, 64\]"),
    ("kv_length", r"v: expected 10 keys \(k.size\(2\)\), got shape \[2, 3, 11, 64\]"),
    ("q_stride", r"q: expected a unit stride on the head dim \(stride\(-1\) == 1\)"),
    ("v_stride", r"v: expected a unit stride on the head dim"),
    ("bias_shape", r"key_bias: expected shape \(2, 10\) = \(B, Nk\), got \[2, 9\]"),
    ("bias_rank", r"key_bias: expected shape \(2, 10\) = \(B, Nk\), got \[2, 1, 10\]"),
    ("bias_dtype", r"key_bias: expected dtype float32, got Half"),
    ("bias_device", r"key_bias: expected a tensor on cuda:\d \(q's device\), got one on cpu"),
    ("k_device", r"k: expected a CUDA tensor, got one on cpu"),
    ("scale_nan", r"scale: expected a finite number, got nan"),
])
def test_bad_inputs(case, pattern):
    q, k, v = _ok()
    kb, scale = None, 0.125
    if case == "q_float32":
        q = q.float()
    elif case == "k_dtype":
        k = k.bfloat16()
    elif case == "v_dtype":
        v = v.bfloat16()
    elif case == "q_rank":
        q = q[:, :, :, 0]
    elif case == "k_rank":
        k = k[None]
    elif case == "head_dim_mismatch":
        k = k[..., :32]
    elif case == "v_head_dim":
        v = torch.randn(2, 3, 10, 80, device="cuda", dtype=torch.float16)
    elif case == "head_dim_unsupported":
        q, k, v = _ok(D=48)
    elif case == "batch_mismatch":
        k = k[:1]
    elif case == "heads_mismatch":
        v = torch.randn(2, 4, 10, 64, device="cuda", dtype=torch.float16)
    elif case == "kv_length":
        v = torch.randn(2, 3, 11, 64, device="cuda", dtype=torch.float16)
    elif case == "q_stride":
        q = torch.randn(2, 3, 64, 10, device="cuda", dtype=torch.float16).transpose(-1, -2)
    elif case == "v_stride":
        v = torch.randn(2, 3, 64, 10, device="cuda", dtype=torch.float16).transpose(-1, -2)
    elif case == "bias_shape":
        kb = torch.zeros(2, 9, device="cuda")
    elif case == "bias_rank":
        kb = torch.zeros(2, 1, 10, device="cuda")
    elif case == "bias_dtype":
        kb = torch.zeros(2, 10, device="cuda", dtype=torch.float16)
    elif case == "bias_device":
        kb = torch.zeros(2, 10)
    elif case == "k_device":
        k = k.cpu()
    elif case == "scale_nan":
        scale = math.nan
    with pytest.raises(RuntimeError, match=pattern):
        _ext.get().flash_attention_forward(q, k, v, kb, scale, False)


def test_cpu_tensors_are_refused_by_name():
    """Runs wherever the extension is built (CI builds it without a GPU)."""
    if _ext.load() is None:
        pytest.skip(f"extension not built: {_ext.status()['reason']}")
    q = torch.randn(1, 1, 4, 64, dtype=torch.float16)
    with pytest.raises(RuntimeError, match=r"flash_attention_forward: q: expected a CUDA tensor, "
                                           r"got one on cpu"):
        _ext.get().flash_attention_forward(q, q, q, None, 0.125, False)
