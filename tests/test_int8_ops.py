"""Int8 ops: every backend against the int64 / float64 definitions (xray_ops.reference.int8).

Where a backend may differ from the definition, and why:
  - quantize_per_token: the kernels divide x / scale in IEEE float32 (correctly rounded); that
    quotient can round onto an exact k + 0.5 when the exact one is a hair off it, and round half
    to even then goes the other way: 1 LSB, only where the float32 quotient is an exact tie.
  - layernorm_quant: the kernels compute the LayerNorm in float32, so a normalized value within
    float32 error of a .5 tie may round either way: 1 LSB, only within TIE_BAND of a tie.
"""

import itertools

import pytest
import torch

import xray_ops as xo
from xray_ops.reference import int8 as ref
from xray_ops.testing import assert_close_to_reference

from .matrix import device_backend_dtypes, device_backends

# a float32 layer norm is within ~1e-6 relative of the exact one: |y / scale| <= 127 moves by
# well under 1e-3, so a 1-LSB difference may only appear within this distance of a .5 tie
TIE_BAND = 1e-3
CASES = device_backend_dtypes(skip={("cpu", torch.float16)})


def _gpu_subset(device, shape, keep):
    # every new row length compiles new Triton kernels on the GPU: a few shapes there suffice
    if device == "cuda" and shape not in keep:
        pytest.skip("shape covered on the CPU; the GPU runs a subset")


def _q_ties_only(q, x, scale, name="x_q"):
    """q may differ from the definition by 1 only where float32 x / scale is an exact .5 tie."""
    rq, rs = ref.quantize_per_token(x.cpu())
    q, scale = q.cpu(), scale.cpu()
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert torch.equal(scale, rs) or torch.allclose(scale, rs, rtol=0, atol=0, equal_nan=True), \
        f"scale differs from the definition: max |diff| {(scale - rs).abs().max()}"
    diff = (q.long() - rq.long()).abs()
    assert diff.max() <= 1 if diff.numel() else True, f"{name}: off by {diff.max()} LSB"
    quot = x.cpu().float() / scale  # the IEEE float32 quotient the kernels round
    tie = (quot - quot.floor()) == 0.5
    bad = (diff == 1) & ~tie
    assert not bad.any(), f"{name}: {int(bad.sum())} elements 1 LSB off away from a .5 tie"


def _lnq_close(q, scale, x, w, b, eps):
    """layernorm_quant against the float64 definition (see the module docstring)."""
    y64 = ref.layer_norm64(x.cpu(), None if w is None else w.cpu(),
                           None if b is None else b.cpu(), eps)
    s64 = y64.abs().amax(-1, keepdim=True) / 127
    s64 = torch.where(s64 == 0, 1.0, s64)  # the definition's scale for an all-zero row
    y32 = torch.nn.functional.layer_norm(x.cpu().float(), (x.shape[-1],),
                                         None if w is None else w.cpu().float(),
                                         None if b is None else b.cpu().float(), eps)
    s32 = y32.abs().amax(-1, keepdim=True) / 127
    s32 = torch.where(s32 == 0, 1.0, s32)
    q, scale = q.cpu(), scale.cpu()
    assert scale.dtype == torch.float32 and scale.shape == (*x.shape[:-1], 1)
    assert_close_to_reference(scale, s64, s32, atol=1e-9, name="scale")
    v = y64 / scale.double()  # exact normalized values in units of the backend's scale
    rq = v.round().clamp(-127, 127)
    diff = (q.double() - rq).abs()
    assert diff.max() <= 1, f"x_q off by {diff.max()} LSB"
    near_tie = ((v - v.floor()) - 0.5).abs() <= TIE_BAND
    bad = (diff == 1) & ~near_tie
    assert not bad.any(), f"x_q: {int(bad.sum())} elements 1 LSB off away from a .5 tie"


# ----------------------------------------------------------------------------------------------
# quantize_per_token
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend,dtype", CASES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (37, 300), (2, 3, 64), (130,), (3, 20000)])
def test_quantize_matches_definition(device, backend, dtype, shape):
    _gpu_subset(device, shape, [(7, 33), (37, 300), (3, 20000)])
    x = (torch.randn(shape) * torch.rand(*shape[:-1], 1) * 10).to(device=device, dtype=dtype)
    with xo.backend(backend):
        q, s = xo.quantize_per_token(x)
    assert xo.last_backend("quantize_per_token") == backend
    assert s.shape == (*shape[:-1], 1) and s.dtype == torch.float32
    _q_ties_only(q, x, s)


# the Triton interpreter's numpy warns on Inf / Inf, which is the point of the Inf row
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("device,backend", device_backends())
def test_quantize_ties_zero_nan_inf_rows(device, backend):
    x = torch.tensor([
        [127.0, 0.5, 1.5, 2.5, -2.5, 3.5, -0.5, 126.5],  # scale 1: exact ties, half to even
        [0.0] * 8,                                        # all zero: scale 1, zeros
        [1.0, float("nan"), 2.0, 0, 0, 0, 0, 0],          # NaN: scale NaN, zeros
        [1.0, float("inf"), -3.0, 0, 0, 0, 0, 0],         # Inf: scale Inf, zeros
        [-1e-3, 2e-3, 0, 0, 0, 0, 0, 0],                  # a small row keeps full resolution
    ], device=device)
    with xo.backend(backend):
        q, s = xo.quantize_per_token(x)
    q, s = q.cpu(), s.cpu()
    assert q[0].tolist() == [127, 0, 2, 2, -2, 4, 0, 126]
    assert s[0].item() == 1.0 and s[1].item() == 1.0 and q[1].abs().sum() == 0
    assert torch.isnan(s[2]).all() and q[2].abs().sum() == 0
    assert s[3].item() == float("inf") and q[3].abs().sum() == 0
    assert q[4, :2].tolist() == [-64, 127]
    rq, rs = ref.quantize_per_token(x.cpu())
    assert torch.equal(q, rq) and torch.allclose(s, rs, equal_nan=True)


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("step", [0.1, 0.37, 3e-3])
def test_quantize_near_ties(device, backend, step):
    # values one float32 ulp either side of (k + 0.5)·scale: an x · (1 / scale) shortcut, or an
    # approximate division, rounds some of them the wrong way; the IEEE quotient does not
    mid = ((torch.arange(-127, 127, dtype=torch.float64) + 0.5) * step).float()
    x = torch.stack([mid, mid.nextafter(mid + 1), mid.nextafter(mid - 1)])
    x[:, 0] = 127 * step  # sets every row's scale to float32(step)
    x = x.to(device)
    with xo.backend(backend):
        q, s = xo.quantize_per_token(x)
    _q_ties_only(q, x, s)


@pytest.mark.parametrize("device,backend", device_backends())
def test_quantize_strided_expanded_and_empty(device, backend):
    base = torch.randn(40, 24, device=device)
    with xo.backend(backend):
        for x in (base.t(), base[::3, 1::2], torch.randn(1, 24, device=device).expand(5, 24)):
            q, s = xo.quantize_per_token(x)
            _q_ties_only(q, x, s)
        q, s = xo.quantize_per_token(torch.randn(0, 16, device=device))
        assert q.shape == (0, 16) and s.shape == (0, 1)


# ----------------------------------------------------------------------------------------------
# layernorm_quant
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend,dtype", CASES)
@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (33, 384), (2, 3, 100)])
@pytest.mark.parametrize("affine", [True, False])
def test_layernorm_quant_matches_definition(device, backend, dtype, shape, affine):
    _gpu_subset(device, shape, [(5, 7), (33, 384)])
    C = shape[-1]
    x = (torch.randn(shape) * 3 + 1).to(device=device, dtype=dtype)
    w = (torch.randn(C) * 0.5 + 1).to(device) if affine else None
    b = (torch.randn(C) * 0.1).to(device) if affine else None
    with xo.backend(backend):
        q, s = xo.layernorm_quant(x, w, b, 1e-6)
    assert xo.last_backend("layernorm_quant") == backend
    _lnq_close(q, s, x, w, b, 1e-6)


@pytest.mark.parametrize("device,backend", device_backends())
def test_layernorm_quant_strided_nan_and_empty(device, backend):
    x = torch.randn(48, 20, device=device).t()  # (20, 48), column stride 20
    x[3, 5] = float("nan")
    w, b = torch.rand(48, device=device) + 0.5, torch.randn(48, device=device)
    with xo.backend(backend):
        q, s = xo.layernorm_quant(x, w, b, 1e-5)
        q0, s0 = xo.layernorm_quant(torch.randn(0, 48, device=device), w, b, 1e-5)
    assert torch.isnan(s[3]).all() and q[3].abs().sum() == 0
    keep = torch.arange(20) != 3
    _lnq_close(q[keep.to(device)], s[keep.to(device)], x[keep.to(device)], w, b, 1e-5)
    assert q0.shape == (0, 48) and s0.shape == (0, 1)


# ----------------------------------------------------------------------------------------------
# int8_matmul
# ----------------------------------------------------------------------------------------------
def _int8(*shape, device="cpu"):
    return torch.randint(-128, 128, shape, dtype=torch.int8, device=device)  # full range


def _exact(a_q, b_q):
    return a_q.cpu().long() @ b_q.cpu().long().T


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (3, 5, 7), (17, 33, 9), (33, 64, 48), (5, 96, 1)])
def test_matmul_exact_with_unit_scales(device, backend, M, K, N):
    if backend == "cuda" and K % 16:
        pytest.skip("the cuda GEMM takes K % 16 == 0 (other K: see test_cuda_gemm_reasons)")
    a, b = _int8(M, K, device=device), _int8(N, K, device=device)
    with xo.backend(backend):
        y = xo.int8_matmul(a, b, torch.ones(M, 1, device=device), torch.ones(N, device=device),
                           out_dtype=torch.float32)
    assert xo.last_backend("int8_matmul") == backend
    assert y.dtype == torch.float32 and y.shape == (M, N)
    assert torch.equal(y.cpu().double(), _exact(a, b).double())


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_matmul_exact_vit_shape_fast_cpu_backends(backend):
    # 197 tokens x 768 -> 3072 (ViT-B fc1): |acc| <= 768·128² < 2**24, exact in float32 too
    a, b = _int8(197, 768), _int8(3072, 768)
    with xo.backend(backend):
        y = xo.int8_matmul(a, b, torch.ones(197, 1), torch.ones(3072))
    assert torch.equal(y.double(), _exact(a, b).double())


# The layout sweep: every shape of M x N x K below in every layout, exact. torch._int_mm on the
# CPU misreads some layouts (K == 1; a (1, K) row whose strides are (1, 1)) and returned garbage
# for 32 of these cases; (1, 1, 1) alone did not show it.
SWEEP_M, SWEEP_N, SWEEP_K = (1, 2, 5, 17), (1, 2, 6, 33), (1, 2, 3, 16, 31, 64)
LAYOUTS = ("contiguous", "transposed", "strided", "unit-strides")


def _laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of the 2-D ``t`` in another memory layout."""
    R, K = t.shape
    if layout == "contiguous":
        return t.contiguous()
    if layout == "transposed":  # column-major storage: strides (1, R)
        return t.t().contiguous().t()
    if layout == "strided":  # every other column of a wider buffer, one element in
        buf = torch.zeros(R, 2 * K + 1, dtype=t.dtype, device=t.device)
        buf[:, 1::2] = t
        return buf[:, 1::2]
    if layout == "unit-strides":  # size-1 dims get stride 1: (1, K) rows read as (1, 1)
        flat = t.contiguous().view(-1) if R == 1 or K == 1 else None
        if flat is None:
            return t.t().contiguous().t()
        return flat.as_strided((R, K), (1, 1))
    raise ValueError(layout)


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matmul_and_linear_exact_over_shapes_and_layouts(device, backend, layout):
    bad = []
    for M, N, K in itertools.product(SWEEP_M, SWEEP_N, SWEEP_K):
        if backend == "cuda" and K % 16:
            continue  # the cuda GEMM takes K % 16 == 0 (other K: see test_cuda_gemm_reasons)
        a, b = _int8(M, K, device=device), _int8(N, K, device=device)
        a_l, b_l = _laid_out(a, layout), _laid_out(b, layout)
        if backend == "cuda" and layout != "contiguous":
            a_l, b_l = a_l.contiguous(), b_l.contiguous()  # it declines other K strides
        with xo.backend(backend):
            y = xo.int8_matmul(a_l, b_l, torch.ones(M, 1, device=device),
                               torch.ones(N, device=device), out_dtype=torch.float32)
        if not torch.equal(y.cpu().double(), _exact(a, b).double()):
            bad.append(("int8_matmul", M, N, K))
        # int8_linear: x holds integers in [-127, 127] with a 127 in every row, so its per-token
        # scale is 1 and the quantized x is x itself: the result is the exact product again
        x = a.clamp(-127, 127).float()
        x[:, 0] = 127
        wq = b.clamp(-127, 127)
        x_l, w_l = _laid_out(x, layout), _laid_out(wq, layout)
        if backend == "cuda" and layout != "contiguous":
            w_l = w_l.contiguous()
        with xo.backend(backend):
            y = xo.int8_linear(x_l, w_l, torch.ones(N, device=device))
        if not torch.equal(y.cpu().double(), _exact(x.to(torch.int8), wq).double()):
            bad.append(("int8_linear", M, N, K))
    assert not bad, f"{len(bad)} wrong results ({layout}): {bad[:10]}"


def _matmul_reference(a, b, a_s, b_s, bias, out_dtype, act):
    r64 = ref.int8_matmul(a.cpu(), b.cpu(), a_s.cpu(), b_s.cpu(),
                          None if bias is None else bias.cpu(), torch.float64, act)
    # PyTorch's own result in the output dtype: the exact accumulator, a float32 epilogue
    acc = _exact(a, b).float()
    base = acc * a_s.cpu().float() * b_s.cpu().float()
    if bias is not None:
        base = base + bias.cpu().float()
    if act == "gelu":
        base = torch.nn.functional.gelu(base)
    return r64, base.to(out_dtype)


@pytest.mark.parametrize("device,backend,dtype", device_backend_dtypes())
@pytest.mark.parametrize("M,K,N", [(1, 16, 3), (19, 48, 37), (70, 160, 66)])
@pytest.mark.parametrize("bias,act", [(False, None), (True, None), (True, "gelu")])
def test_matmul_scaled_bias_gelu_against_float64(device, backend, dtype, M, K, N, bias, act):
    a, b = _int8(M, K, device=device), _int8(N, K, device=device)
    a_s = (torch.rand(M, 1, device=device) + 0.1) * 1e-3
    b_s = (torch.rand(N, device=device) + 0.1) * 1e-2
    bias_t = torch.randn(N, device=device) if bias else None
    with xo.backend(backend):
        y = xo.int8_matmul(a, b, a_s, b_s, bias_t, out_dtype=dtype, activation=act)
    assert y.dtype == dtype and y.shape == (M, N)
    r64, base = _matmul_reference(a, b, a_s, b_s, bias_t, dtype, act)
    assert_close_to_reference(y, r64, base)


@pytest.mark.parametrize("device,backend", device_backends())
def test_matmul_strided_expanded_and_empty(device, backend):
    a = _int8(64, 40, device=device).t()[:, :32]  # (40, 32) with column stride 40
    b = _int8(16, 64, device=device)[:, ::2]       # (16, 32) with column stride 2
    a_s = torch.rand(1, 1, device=device).expand(40, 1)  # stride 0
    b_s = torch.rand(16, device=device)
    if backend == "cuda":  # non-unit K strides: the cuda GEMM declines, auto takes another
        with pytest.raises(xo.BackendError, match="rows are not contiguous"):
            with xo.backend("cuda"):
                xo.int8_matmul(a, b, a_s, b_s)
        a, b = a.contiguous(), b.contiguous()
    with xo.backend(backend):
        y = xo.int8_matmul(a, b, a_s, b_s, out_dtype=torch.float32)
        e1 = xo.int8_matmul(_int8(0, 32, device=device), b, a_s[:0], b_s)
        e2 = xo.int8_matmul(a, _int8(0, 32, device=device), a_s, b_s[:0])
    r64, base = _matmul_reference(a, b, a_s, b_s, None, torch.float32, None)
    assert_close_to_reference(y, r64, base)
    assert e1.shape == (0, 16) and e2.shape == (40, 0)


def test_matmul_default_out_dtype_on_cpu():
    a, b = _int8(3, 8), _int8(4, 8)
    assert xo.int8_matmul(a, b, torch.ones(3, 1), torch.ones(4)).dtype == torch.float32
    y = xo.int8_matmul(a, b, torch.ones(3, 1, dtype=torch.float16), torch.ones(4).half())
    assert y.dtype == torch.float16


# ----------------------------------------------------------------------------------------------
# int8_linear
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend,dtype", CASES)
@pytest.mark.parametrize("lead,K,N", [((), 32, 5), ((9,), 48, 40), ((2, 7), 64, 33), ((0,), 16, 8)])
@pytest.mark.parametrize("bias,act", [(True, None), (False, "gelu")])
def test_linear_is_quantize_then_matmul(device, backend, dtype, lead, K, N, bias, act):
    x = (torch.randn(*lead, K) * 2).to(device=device, dtype=dtype)
    w = torch.randn(N, K) * 0.05
    w_q, w_s = ref.quantize_weight(w)
    w_q, w_s = w_q.to(device), w_s.to(device)
    bias_t = torch.randn(N, device=device, dtype=dtype) if bias else None
    with xo.backend(backend):
        y = xo.int8_linear(x, w_q, w_s, bias_t, act)
        x_q, x_s = xo.quantize_per_token(x.reshape(-1, K))
    assert xo.last_backend("int8_linear") == backend
    assert y.shape == (*lead, N) and y.dtype == dtype
    _q_ties_only(x_q, x.reshape(-1, K), x_s)
    r64, base = _matmul_reference(x_q, w_q, x_s, w_s, bias_t, dtype, act)
    assert_close_to_reference(y.reshape(-1, N), r64, base)


def test_linear_close_to_float_linear():
    # the point of it all: int8 per-token x per-channel is ~1% off the float layer
    x, w, b = torch.randn(64, 256), torch.randn(128, 256) * 0.05, torch.randn(128)
    w_q, w_s = ref.quantize_weight(w)
    y = xo.int8_linear(x, w_q, w_s, b)
    f = torch.nn.functional.linear(x, w, b)
    assert (y - f).norm() / f.norm() < 0.015


# ----------------------------------------------------------------------------------------------
# dispatch, bad inputs, torch.library
# ----------------------------------------------------------------------------------------------
def test_auto_picks_cpu_for_float32_and_torch_for_half():
    x = torch.randn(4, 32)
    xo.quantize_per_token(x)
    assert xo.last_backend("quantize_per_token") == "cpu"
    xo.quantize_per_token(x.half())
    assert xo.last_backend("quantize_per_token") == "torch"
    w_q, w_s = ref.quantize_weight(torch.randn(8, 32))
    xo.int8_linear(x, w_q, w_s)
    assert xo.last_backend("int8_linear") == "cpu"


def test_cuda_gemm_reasons():
    from xray_ops import _dispatch

    a, b = _int8(4, 24), _int8(8, 24)
    args = (a, b, torch.ones(4, 1), torch.ones(8), None, torch.float32, "none")
    reasons = _dispatch.reasons_for("int8_matmul", args)["cuda"]
    assert any("device cpu not supported" in r for r in reasons)


def test_bad_inputs_name_the_argument():
    a, b = _int8(4, 16), _int8(8, 16)
    a_s, b_s = torch.ones(4, 1), torch.ones(8)
    with pytest.raises(TypeError, match="a_q: expected dtype int8, got float32"):
        xo.int8_matmul(a.float(), b, a_s, b_s)
    with pytest.raises(TypeError, match="b_q: expected dtype int8, got float16"):
        xo.int8_matmul(a, b.half(), a_s, b_s)
    with pytest.raises(ValueError, match=r"b_q: expected shape \(8, 16\)"):
        xo.int8_matmul(a, _int8(8, 15), a_s, b_s)
    with pytest.raises(ValueError, match=r"a_q: expected a 2-D tensor"):
        xo.int8_matmul(a[None], b, a_s, b_s)
    with pytest.raises(ValueError, match=r"b_q: expected a 2-D tensor"):
        xo.int8_matmul(a, b[0], a_s, b_s)
    with pytest.raises(ValueError, match=r"a_scale: expected shape \(4, 1\)"):
        xo.int8_matmul(a, b, a_s[:, 0], b_s)
    with pytest.raises(ValueError, match=r"b_scale: expected shape \(8\)"):
        xo.int8_matmul(a, b, a_s, b_s[:, None])
    with pytest.raises(ValueError, match=r"bias: expected shape \(8\)"):
        xo.int8_matmul(a, b, a_s, b_s, torch.zeros(7))
    with pytest.raises(TypeError, match="a_scale: expected dtype"):
        xo.int8_matmul(a, b, a_s.long(), b_s)
    with pytest.raises(TypeError, match="out_dtype: expected"):
        xo.int8_matmul(a, b, a_s, b_s, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="activation: expected None, 'gelu' or 'gelu_tanh'"):
        xo.int8_matmul(a, b, a_s, b_s, activation="relu")
    with pytest.raises(RuntimeError, match="b_scale: int8_matmul is an inference op"):
        xo.int8_matmul(a, b, a_s, b_s.requires_grad_())
    x = torch.randn(3, 16)
    with pytest.raises(TypeError, match="x: expected a floating dtype"):
        xo.int8_linear(x.long(), b, b_s)
    with pytest.raises(ValueError, match="x: expected 16 features"):
        xo.int8_linear(torch.randn(3, 12), b, b_s)
    with pytest.raises(TypeError, match="w_q: expected dtype int8"):
        xo.int8_linear(x, b.float(), b_s)
    with pytest.raises(ValueError, match=r"w_scale: expected shape \(8\)"):
        xo.int8_linear(x, b, torch.ones(8, 1))
    with pytest.raises(RuntimeError, match="x: int8_linear is an inference op without autograd"):
        xo.int8_linear(x.requires_grad_(), b, torch.ones(8))
    with torch.no_grad():  # fine without grad mode
        xo.int8_linear(x, b, torch.ones(8))
    with pytest.raises(TypeError, match="x: expected a floating dtype"):
        xo.quantize_per_token(a)
    with pytest.raises(ValueError, match="x: expected at least a 1-D tensor"):
        xo.quantize_per_token(torch.tensor(1.0))
    with pytest.raises(ValueError, match="x: expected at least 1 feature"):
        xo.quantize_per_token(torch.randn(3, 0))
    with pytest.raises(ValueError, match=r"weight: expected shape \(16\)"):
        xo.layernorm_quant(torch.randn(3, 16), torch.ones(15), None)
    with pytest.raises(ValueError, match="eps: expected a number in"):
        xo.layernorm_quant(torch.randn(3, 16), None, None, 0.0)


def test_forced_backend_that_cannot_take_inputs_lists_reasons():
    with pytest.raises(xo.BackendError, match="forced backend 'cuda'.*device cpu not supported"):
        with xo.backend("cuda"):
            xo.quantize_per_token(torch.randn(2, 8))
    with pytest.raises(xo.BackendError, match="forced backend 'cpu'.*dtype float16"):
        with xo.backend("cpu"):
            xo.layernorm_quant(torch.randn(2, 8).half(), None, None)


def test_opcheck():
    x = torch.randn(6, 32)
    w_q, w_s = ref.quantize_weight(torch.randn(12, 32))
    a_q, a_s = ref.quantize_per_token(x)
    bias = torch.randn(12)
    for backend in ("torch", "cpu", "triton"):
        ops = torch.ops.xray_ops
        torch.library.opcheck(ops.quantize_per_token.default, (x.reshape(2, 3, 32), backend))
        torch.library.opcheck(ops.layernorm_quant.default,
                              (x, torch.rand(32), torch.randn(32), 1e-5, backend))
        torch.library.opcheck(ops.int8_matmul.default,
                              (a_q, w_q, a_s, w_s, bias, torch.float32, "gelu", backend))
        torch.library.opcheck(ops.int8_linear.default,
                              (x.reshape(3, 2, 32), w_q, w_s, None, "none", backend))


@torch.no_grad()
def test_torch_compile_fullgraph():
    w_q, w_s = ref.quantize_weight(torch.randn(24, 16))
    w2_q, w2_s = ref.quantize_weight(torch.randn(16, 24))
    ln_w, ln_b, bias = torch.rand(16) + 0.5, torch.randn(16), torch.randn(24)

    def block(x):
        q, s = xo.layernorm_quant(x, ln_w, ln_b, 1e-6)
        h = xo.int8_matmul(q.reshape(-1, 16), w_q, s.reshape(-1, 1), w_s, bias,
                           out_dtype=torch.float32, activation="gelu")
        return x + xo.int8_linear(h.reshape(*x.shape[:-1], 24), w2_q, w2_s)

    x = torch.randn(2, 5, 16)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), block(x))


# ----------------------------------------------------------------------------------------------
# GPU: ViT shapes, bfloat16 (skipped without a CUDA device)
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("M,K,N", [(197, 768, 3072), (1576, 384, 1152), (4099, 1024, 4096)])
def test_gpu_vit_shapes(backend, M, K, N):
    a, b = _int8(M, K, device="cuda"), _int8(N, K, device="cuda")
    with xo.backend(backend):
        y = xo.int8_matmul(a, b, torch.ones(M, 1, device="cuda"), torch.ones(N, device="cuda"),
                           out_dtype=torch.float32)
    if K * 128 * 128 < 2**24:  # the float32 output holds every accumulator exactly
        assert torch.equal(y.double().cpu(), _exact(a, b).double())
    acc = (a.double() @ b.double().T)  # exact on the GPU too (float64 sums of integers)
    a_s = torch.rand(M, 1, device="cuda") * 1e-2
    b_s = torch.rand(N, device="cuda") * 1e-2
    bias = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    with xo.backend(backend):
        y = xo.int8_matmul(a, b, a_s, b_s, bias, activation="gelu")
    assert y.dtype == torch.bfloat16
    r64 = ref.int8_epilogue(acc, a_s, b_s, bias, "gelu")
    base = torch.nn.functional.gelu(acc.float() * a_s * b_s + bias.float()).bfloat16()
    assert_close_to_reference(y, r64, base)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    with xo.backend(backend):
        q, s = xo.quantize_per_token(x)
        lq, ls = xo.layernorm_quant(x, None, None, 1e-6)
    _q_ties_only(q, x, s)
    _lnq_close(lq, ls, x, None, None, 1e-6)


# ----------------------------------------------------------------------------------------------
# edges found by an independent check
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("act", [None, "gelu"])
def test_matmul_float64_output_is_the_float64_epilogue(backend, act):
    # "rounded once to out_dtype": a float32 epilogue is ~1e-7 relative off the exact one
    M, K, N = 7, 64, 5
    a, b = _int8(M, K), _int8(N, K)
    a_s = torch.rand(M, 1) / 3 + 0.01
    b_s = torch.rand(N) / 7 + 0.01
    bias = torch.randn(N)
    with xo.backend(backend):
        y = xo.int8_matmul(a, b, a_s, b_s, bias, out_dtype=torch.float64, activation=act)
    want = ref.int8_matmul(a, b, a_s, b_s, bias, torch.float64, act)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, want, rtol=1e-15, atol=1e-15)


def test_triton_refuses_float64_output_with_the_reason():
    a, b = _int8(3, 16), _int8(4, 16)
    with pytest.raises(xo.BackendError, match="Triton epilogue computes in float32"):
        with xo.backend("triton"):
            xo.int8_matmul(a, b, torch.ones(3, 1), torch.ones(4), out_dtype=torch.float64)


def test_quantize_float64_row_beyond_a_float32_scale_is_refused():
    x = torch.tensor([[1e300, -2.0, 3.0], [1.0, 2.0, 3.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"x: expected finite rows with max \|value\| <= 127"):
        xo.quantize_per_token(x)
    with pytest.raises(ValueError, match="weight: expected finite rows"):
        ref.quantize_weight(x)
    # the largest row that fits still dequantizes to finite values; Inf rows keep their rule
    ok = torch.tensor([[127 * 3.4e38, 1.0], [float("inf"), 1.0]], dtype=torch.float64)
    q, s = xo.quantize_per_token(ok)
    assert torch.isfinite(s[0]).all() and q[0, 0] == 127 and s[1].item() == float("inf")
