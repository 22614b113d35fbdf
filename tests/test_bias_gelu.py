"""bias_gelu: every backend against the float64 reference (output, grad_x, grad_bias), both
GELU formulas; the definition itself against torch's GELU."""

import pytest
import torch
import torch.nn.functional as F

import xray_ops as xo
from xray_ops.reference import bias_gelu as ref
from xray_ops.testing import assert_close_to_reference

from .matrix import device_backend_dtypes, device_backends

CPU_BACKENDS = ("torch", "cpu", "triton")
GPU_BACKENDS = ("torch", "triton", "cuda")
CASES = device_backend_dtypes(cpu=CPU_BACKENDS, gpu=GPU_BACKENDS, skip={("cpu", torch.float16)})
SHAPES = [(1, 1), (2, 3, 7), (5, 33), (3, 13, 97), (2, 8192)]


def _inputs(shape, dtype, device, has_bias=True, layout="contiguous", bias_dtype=None):
    x = (torch.randn(shape, dtype=torch.float64) * 2).to(device=device, dtype=dtype)
    b = torch.randn(shape[-1], dtype=torch.float64).to(device=device, dtype=bias_dtype or dtype) \
        if has_bias else None
    if layout == "strided":
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
        b = None if b is None else torch.stack([b, b], -1)[:, 1]
    elif layout == "expanded":
        x = x[(slice(0, 1),) * (len(shape) - 1)].expand(shape)
    return x.requires_grad_(), (None if b is None else b.requires_grad_())


def _definition(x, b, approximate, gy, oracle):
    x = (x.detach().double() if oracle else x.detach().clone()).requires_grad_()
    b = None if b is None else (b.detach().double() if oracle else b.detach().clone()) \
        .requires_grad_()
    y = ref.bias_gelu(x, b, approximate)
    leaves = [x] if b is None else [x, b]
    grads = torch.autograd.grad(y, leaves, gy.to(y.dtype))
    return y, grads


def _check(device, backend, dtype, shape, approximate, has_bias=True, layout="contiguous",
           grad_layout=None, bias_dtype=None):
    x, b = _inputs(shape, dtype, device, has_bias, layout, bias_dtype)
    gy = torch.randn(shape, dtype=torch.float64, device=device)
    if grad_layout == "expanded":
        gy = torch.ones((1,) * len(shape), dtype=torch.float64, device=device).expand(shape)
    with xo.backend(backend):
        y = xo.bias_gelu(x, b, approximate)
        leaves = [x] if b is None else [x, b]
        got = torch.autograd.grad(y, leaves, gy.to(dtype))
    assert xo.last_backend("bias_gelu") == backend
    assert xo.last_backend("bias_gelu.backward") == backend
    assert y.dtype == dtype and y.shape == x.shape
    r_y, r_g = _definition(x, b, approximate, gy, oracle=True)
    b_y, b_g = _definition(x, b, approximate, gy.to(dtype), oracle=False)
    assert_close_to_reference(y, r_y, b_y, name="y")
    assert_close_to_reference(got[0], r_g[0], b_g[0], name="grad_x")
    if b is not None:
        assert got[1].dtype == b.dtype and got[1].shape == b.shape
        rows = x.numel() // x.shape[-1]
        atol = (1e-5 if dtype == torch.float32 else 2e-3) * max(1.0, rows) ** 0.5
        assert_close_to_reference(got[1], r_g[1], b_g[1], name="grad_bias", atol=atol)


@pytest.mark.parametrize("device,backend,dtype", CASES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_matches_reference(device, backend, dtype, shape, approximate):
    _check(device, backend, dtype, shape, approximate)


@pytest.mark.parametrize("device,backend,dtype", CASES)
@pytest.mark.parametrize("layout", ["strided", "expanded"])
def test_non_contiguous_inputs_and_expanded_grad(device, backend, dtype, layout):
    _check(device, backend, dtype, (3, 5, 37), "none", layout=layout, grad_layout="expanded")
    _check(device, backend, dtype, (7, 19), "tanh", layout=layout, grad_layout="expanded")


@pytest.mark.parametrize("device,backend", device_backends(cpu=CPU_BACKENDS, gpu=GPU_BACKENDS))
def test_without_bias_and_fp32_bias(device, backend):
    _check(device, backend, torch.float32, (4, 21), "none", has_bias=False)
    if backend != "cpu":  # the numba kernels take float32
        _check(device, backend, torch.float16, (4, 21), "tanh", bias_dtype=torch.float32)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_definition_is_torch_gelu(approximate):
    z = torch.linspace(-12, 12, 2001, dtype=torch.float64, requires_grad=True)
    ours = ref.gelu(z, approximate)
    theirs = F.gelu(z, approximate=approximate)
    torch.testing.assert_close(ours, theirs, rtol=1e-14, atol=1e-14)
    g_ours, = torch.autograd.grad(ours.sum(), z)
    torch.testing.assert_close(ref.gelu_grad(z.detach(), approximate), g_ours, rtol=1e-13,
                               atol=1e-13)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_float64(backend):
    if backend != "torch":
        pytest.skip("the Triton kernels take float16 / bfloat16 / float32, the numba ones "
                    "float32: gradcheck needs float64")
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    with xo.backend(backend):
        for approximate in ("none", "tanh"):
            assert torch.autograd.gradcheck(lambda x, b: xo.bias_gelu(x, b, approximate), (x, b))


def test_bad_inputs_name_the_argument():
    x, b = torch.randn(2, 5, 8), torch.randn(8)
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        xo.bias_gelu([1.0], b)
    with pytest.raises(TypeError, match="x: expected a floating dtype"):
        xo.bias_gelu(x.int(), b)
    with pytest.raises(ValueError, match=r"bias: expected shape \(8\)"):
        xo.bias_gelu(x, torch.randn(5))
    with pytest.raises(TypeError, match=r"bias: expected dtype bfloat16 \(like x\) or float32"):
        xo.bias_gelu(x.bfloat16(), b.half())
    with pytest.raises(ValueError, match="bias: expected a tensor on cpu"):
        xo.bias_gelu(x, b.to("meta"))
    with pytest.raises(ValueError, match="approximate: expected 'none' or 'tanh', got 'erf'"):
        xo.bias_gelu(x, b, "erf")


def test_opcheck():
    x = torch.randn(2, 3, 8, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    for backend in ("torch", "cpu"):  # the op machinery; kernels are tested above
        for approximate in ("none", "tanh"):
            torch.library.opcheck(torch.ops.xray_ops.bias_gelu.default,
                                  (x, b, approximate, backend))
        torch.library.opcheck(torch.ops.xray_ops.bias_gelu.default, (x, None, "none", backend))
    torch.library.opcheck(torch.ops.xray_ops.bias_gelu_backward.default,
                          (torch.randn(2, 3, 8), x.detach(), b.detach(), "tanh", "auto"))


def test_torch_compile_fullgraph():
    def mlp(x, w1, b1, w2):
        return (xo.bias_gelu(x @ w1.T, b1, "tanh") @ w2.T).square().sum()

    args = [torch.randn(2, 5, 8, requires_grad=True), torch.randn(16, 8, requires_grad=True),
            torch.randn(16, requires_grad=True), torch.randn(8, 16, requires_grad=True)]
    compiled = torch.compile(mlp, fullgraph=True, backend="aot_eager")
    got = compiled(*args)
    g_got = torch.autograd.grad(got, args)
    want = mlp(*args)
    g_want = torch.autograd.grad(want, args)
    torch.testing.assert_close(got, want)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


def test_auto_picks_numba_for_float32_then_torch():
    x, b = torch.randn(3, 8, requires_grad=True), torch.randn(8)
    xo.bias_gelu(x, b).sum().backward()
    assert xo.last_backend("bias_gelu") == "cpu" and xo.last_backend("bias_gelu.backward") == "cpu"
    xo.bias_gelu(x.detach().double(), b.double())
    assert xo.last_backend("bias_gelu") == "torch"


# ----------------------------------------------------------------------------------------------
# the int8 GEMM epilogue computes the same GELU (both forms)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", device_backends(cpu=CPU_BACKENDS, gpu=GPU_BACKENDS))
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_int8_epilogue_shares_the_gelu(device, backend, activation):
    """int8_matmul(..., activation) == bias_gelu of the same dequantized GEMM + bias."""
    M, N, K = 7, 24, 32
    a_q = torch.randint(-127, 128, (M, K), dtype=torch.int8, device=device)
    b_q = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=device)
    a_s = torch.rand(M, 1, device=device) * 0.01
    b_s = torch.rand(N, device=device) * 0.01
    bias = torch.randn(N, device=device)
    with torch.no_grad(), xo.backend(backend):
        got = xo.int8_matmul(a_q, b_q, a_s, b_s, bias, torch.float32, activation)
    pre = (a_q.double() @ b_q.double().T) * a_s.double() * b_s.double()
    want = ref.bias_gelu(pre, bias.double(), "tanh" if activation == "gelu_tanh" else "none")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="activation: expected None, 'gelu' or 'gelu_tanh'"):
        xo.int8_matmul(a_q, b_q, a_s, b_s, bias, torch.float32, "tanh")
