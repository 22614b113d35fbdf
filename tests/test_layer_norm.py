"""layer_norm (with residual and LayerScale): every backend against the float64 reference,
the outputs y and s and the gradients of x, residual, residual_scale, weight and bias."""

import pytest
import torch

import xray_ops as xo
from xray_ops.reference import layer_norm as ref
from xray_ops.testing import assert_close_to_reference

from .matrix import device_backend_dtypes, device_backends

CPU_BACKENDS = ("torch", "cpu", "triton")
GPU_BACKENDS = ("torch", "triton", "cuda")
CASES = device_backend_dtypes(cpu=CPU_BACKENDS, gpu=GPU_BACKENDS, skip={("cpu", torch.float16)})
# leading shape + C: one channel, odd primes, a ViT row count, C not a multiple of any block,
# and a wide row (8192)
SHAPES = [(1, 1), (2, 3, 7), (3, 5, 33), (2, 13, 97), (1, 3, 8192)]
# (residual, residual_scale, weight, bias)
VARIANTS = {
    "plain": (False, False, True, True),
    "residual": (True, False, True, True),
    "layerscale": (True, True, True, True),
    "no-affine": (True, True, False, False),
    "weight-only": (False, False, True, False),
}


def _inputs(shape, dtype, device, variant, layout="contiguous", param_dtype=None):
    has_r, has_g, has_w, has_b = VARIANTS[variant]
    C = shape[-1]
    pd = param_dtype or dtype
    x = torch.randn(shape, dtype=torch.float64) * 2 + 0.5
    r = torch.randn(shape, dtype=torch.float64) if has_r else None
    g = torch.rand(C, dtype=torch.float64) + 0.5 if has_g else None
    w = torch.rand(C, dtype=torch.float64) + 0.5 if has_w else None
    b = torch.randn(C, dtype=torch.float64) if has_b else None

    def cast(t, dt):
        return None if t is None else t.to(device=device, dtype=dt)

    x, r = cast(x, dtype), cast(r, dtype)
    g, w, b = cast(g, pd), cast(w, pd), cast(b, pd)
    if layout == "strided":  # channels-major storage; residual an offset slice of a wider one
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
        if r is not None:
            wide = torch.zeros(*shape[:-1], C + 3, dtype=dtype, device=device)
            wide[..., 2:2 + C] = r
            r = wide[..., 2:2 + C]
        w = None if w is None else torch.stack([w, w], -1)[:, 0]
    elif layout == "expanded":  # one row broadcast over the leading dims
        x = x[(slice(0, 1),) * (len(shape) - 1)].expand(shape)
    leaves = [t.requires_grad_() if t is not None else None for t in (x, r, g, w, b)]
    return leaves


def _grads(y, s, leaves, gy, gs):
    outs, grads = [y], [gy]
    if gs is not None:
        outs.append(s)
        grads.append(gs)
    want = [t for t in leaves if t is not None]
    got = torch.autograd.grad(outs, want, grads, allow_unused=True)
    it = iter(got)
    return [next(it) if t is not None else None for t in leaves]


def _run_reference(leaves, eps, gy, gs, oracle):
    """The definition on copies of the inputs: in float64 (``oracle``, the reference), or in the
    inputs' own dtypes (PyTorch's own error, the budget)."""
    copies = [None if t is None else (t.detach().double() if oracle else t.detach().clone())
              .requires_grad_() for t in leaves]
    y, s = ref.layer_norm(copies[0], copies[3], copies[4], eps, copies[1], copies[2])
    return y, s, _grads(y, s, copies, gy.to(y.dtype), None if gs is None else gs.to(y.dtype))


def _check(device, backend, dtype, shape, variant, layout="contiguous", grad_layout=None,
           param_dtype=None, eps=1e-5):
    leaves = _inputs(shape, dtype, device, variant, layout, param_dtype)
    x, r, g, w, b = leaves
    gy = torch.randn(shape, dtype=torch.float64, device=device)
    gs = torch.randn(shape, dtype=torch.float64, device=device) if r is not None else None
    if grad_layout == "expanded":  # the gradient of .sum(): stride 0
        gy = torch.ones((1,) * len(shape), dtype=torch.float64, device=device).expand(shape)
        gs = None if gs is None else torch.full((1,) * len(shape), 0.5, dtype=torch.float64,
                                                device=device).expand(shape)
    with xo.backend(backend):
        y, s = xo.layer_norm(x, w, b, eps, residual=r, residual_scale=g)
        got = _grads(y, s, leaves, gy.to(dtype), None if gs is None else gs.to(dtype))
    assert xo.last_backend("layer_norm") == backend
    assert xo.last_backend("layer_norm.backward") == backend
    assert y.dtype == dtype and y.shape == x.shape and s.shape == x.shape
    if r is None:
        assert s is x
    r_y, r_s, r_g = _run_reference(leaves, eps, gy, gs, oracle=True)
    b_y, b_s, b_g = _run_reference(leaves, eps, gy.to(dtype), None if gs is None else gs.to(dtype),
                                   oracle=False)
    assert_close_to_reference(y, r_y, b_y, name="y")
    assert_close_to_reference(s, r_s, b_s, name="s")
    for name, a, rr, bb, leaf in zip(("x", "residual", "residual_scale", "weight", "bias"),
                                     got, r_g, b_g, leaves):
        if leaf is None:
            continue
        assert a.dtype == leaf.dtype and a.shape == leaf.shape, name
        # parameter gradients sum over every row: allow for the sum's length
        atol = None if a.dim() > 1 or dtype == torch.float64 else \
            (1e-5 if dtype == torch.float32 else 2e-3) * max(1.0, x.numel() / x.shape[-1]) ** 0.5
        assert_close_to_reference(a, rr, bb, name=f"grad_{name}", atol=atol)


# every variant on two shapes; the edge shapes (one channel, a wide row) with the main ones
SHAPE_VARIANTS = ([(s, v) for s in SHAPES[1:4:2] for v in VARIANTS]
                  + [(s, v) for s in (SHAPES[0], SHAPES[2], SHAPES[4])
                     for v in ("plain", "layerscale")])


@pytest.mark.parametrize("device,backend,dtype", CASES)
@pytest.mark.parametrize("shape,variant", SHAPE_VARIANTS,
                         ids=[f"{'x'.join(map(str, s))}-{v}" for s, v in SHAPE_VARIANTS])
def test_matches_reference(device, backend, dtype, shape, variant):
    _check(device, backend, dtype, shape, variant)


@pytest.mark.parametrize("device,backend,dtype", CASES)
@pytest.mark.parametrize("layout", ["strided", "expanded"])
def test_non_contiguous_inputs_and_expanded_grads(device, backend, dtype, layout):
    _check(device, backend, dtype, (3, 4, 37), "layerscale", layout=layout,
           grad_layout="expanded")
    _check(device, backend, dtype, (5, 19), "plain", layout=layout, grad_layout="expanded")


@pytest.mark.parametrize("device,backend", device_backends(cpu=("torch", "triton"),
                                                           gpu=GPU_BACKENDS))
def test_fp32_parameters_with_half_activations(device, backend):
    _check(device, backend, torch.float16, (3, 7, 40), "layerscale", param_dtype=torch.float32)


@pytest.mark.parametrize("device,backend", device_backends(cpu=CPU_BACKENDS, gpu=GPU_BACKENDS))
def test_only_y_or_only_s_used(device, backend):
    x, r = torch.randn(4, 9, device=device, requires_grad=True), torch.randn(4, 9, device=device)
    w = torch.rand(9, device=device, requires_grad=True)
    with xo.backend(backend):
        y, s = xo.layer_norm(x, w, None, residual=r)
        gx_y, = torch.autograd.grad(y.square().sum(), [x], retain_graph=True)
        gx_s, = torch.autograd.grad(s.sum(), [x])
    y_ref, s_ref = ref.layer_norm(x, w, None, 1e-6, r)
    torch.testing.assert_close(gx_y, torch.autograd.grad(y_ref.square().sum(), [x])[0])
    torch.testing.assert_close(gx_s, torch.ones_like(x))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_float64(backend):
    if backend != "torch":
        pytest.skip("the Triton kernels take float16 / bfloat16 / float32, the numba ones "
                    "float32: gradcheck needs float64")
    leaves = _inputs((3, 6), torch.float64, "cpu", "layerscale")

    def f(x, r, g, w, b):
        y, s = xo.layer_norm(x, w, b, 1e-5, residual=r, residual_scale=g)
        return y, s

    with xo.backend(backend):
        assert torch.autograd.gradcheck(f, leaves)


def test_matches_timm_block_pieces():
    """s, y equal timm's ``x + ls1(branch)`` then ``norm2`` (LayerScale, LayerNorm eps 1e-6)."""
    timm = pytest.importorskip("timm")
    C = 24
    ls = timm.layers.LayerScale(C, init_values=0.1)
    norm = torch.nn.LayerNorm(C, eps=1e-6)
    with torch.no_grad():
        ls.gamma.uniform_(0.05, 0.2)
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    x, branch = torch.randn(2, 7, C), torch.randn(2, 7, C)
    want_s = x + ls(branch)
    want_y = norm(want_s)
    y, s = xo.layer_norm(branch, norm.weight, norm.bias, norm.eps, residual=x,
                         residual_scale=ls.gamma)
    torch.testing.assert_close(s, want_s)
    torch.testing.assert_close(y, want_y)


def test_bad_inputs_name_the_argument():
    x, w = torch.randn(2, 5, 8), torch.rand(8)
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        xo.layer_norm(x.numpy(), w, None)
    with pytest.raises(TypeError, match="x: expected a floating dtype"):
        xo.layer_norm(x.long(), w, None)
    with pytest.raises(ValueError, match=r"weight: expected shape \(8\)"):
        xo.layer_norm(x, torch.rand(7), None)
    with pytest.raises(ValueError, match=r"bias: expected a 1-D tensor"):
        xo.layer_norm(x, w, torch.rand(1, 8))
    with pytest.raises(TypeError, match=r"weight: expected dtype float32 \(like x\), got float64"):
        xo.layer_norm(x, w.double(), None)
    with pytest.raises(TypeError, match=r"weight: expected dtype float16 \(like x\) or float32"):
        xo.layer_norm(x.half(), w.double(), None)
    with pytest.raises(ValueError, match="eps: expected a number in"):
        xo.layer_norm(x, w, None, -1e-6)
    with pytest.raises(TypeError, match="eps: expected a number"):
        xo.layer_norm(x, w, None, "1e-6")
    with pytest.raises(ValueError, match=r"residual: expected shape \(2, 5, 8\)"):
        xo.layer_norm(x, w, None, residual=torch.randn(2, 4, 8))
    with pytest.raises(TypeError, match="residual: expected dtype float32"):
        xo.layer_norm(x, w, None, residual=x.half())
    with pytest.raises(ValueError, match="residual: expected a tensor on cpu"):
        xo.layer_norm(x, w, None, residual=x.to("meta"))
    with pytest.raises(ValueError, match="weight: expected a tensor on cpu"):
        xo.layer_norm(x, w.to("meta"), None)
    with pytest.raises(ValueError, match="residual_scale: given without a residual"):
        xo.layer_norm(x, w, None, residual_scale=w)
    with pytest.raises(ValueError, match=r"residual_scale: expected shape \(8\)"):
        xo.layer_norm(x, w, None, residual=x, residual_scale=torch.rand(3))
    with pytest.raises(ValueError, match=r"x: expected a tensor \(\.\.\., C\) with C >= 1"):
        xo.layer_norm(torch.randn(3, 0), None, None)


def test_opcheck():
    x = torch.randn(2, 3, 8, requires_grad=True)
    r = torch.randn(2, 3, 8, requires_grad=True)
    g, w, b = (torch.rand(8, requires_grad=True) for _ in range(3))
    for backend in ("torch", "cpu"):  # the op machinery; kernels are tested above
        torch.library.opcheck(torch.ops.xray_ops.layer_norm.default,
                              (x, w, b, 1e-6, r, g, backend))
        torch.library.opcheck(torch.ops.xray_ops.layer_norm.default,
                              (x, None, None, 1e-6, None, None, backend))
    y, s, mean, rstd = torch.ops.xray_ops.layer_norm(x, w, b, 1e-6, r, g, "torch")
    torch.library.opcheck(torch.ops.xray_ops.layer_norm_backward.default,
                          (torch.randn_like(y), torch.randn_like(s), s.detach(), x.detach(),
                           w.detach(), b.detach(), g.detach(), mean, rstd, "auto"))


def test_torch_compile_fullgraph():
    def block(x, branch, w, b, g):
        y, s = xo.layer_norm(branch * 2, w, b, residual=x, residual_scale=g)
        return (y.square() + s).sum()

    args = [torch.randn(2, 5, 16, requires_grad=True), torch.randn(2, 5, 16, requires_grad=True),
            torch.rand(16, requires_grad=True), torch.randn(16, requires_grad=True),
            torch.rand(16, requires_grad=True)]
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    got = compiled(*args)
    g_got = torch.autograd.grad(got, args)
    want = block(*args)
    g_want = torch.autograd.grad(want, args)
    torch.testing.assert_close(got, want)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


def test_auto_picks_numba_for_float32_then_torch():
    x, w = torch.randn(3, 8, requires_grad=True), torch.rand(8)
    y, _ = xo.layer_norm(x, w, None)
    y.sum().backward()
    assert xo.last_backend("layer_norm") == "cpu"
    assert xo.last_backend("layer_norm.backward") == "cpu"
    xo.layer_norm(x.detach().half(), w, None)
    assert xo.last_backend("layer_norm") == "torch"
    with pytest.raises(xo.BackendError, match="forced backend 'triton'.*C=9000 exceeds the "
                                              "Triton kernel's row limit 8192"):
        with xo.backend("triton"):
            xo.layer_norm(torch.randn(2, 9000), None, None)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("C", [768, 6144])
def test_vit_scale_rows_on_gpu(backend, C):
    """ViT-B at batch 64 (many rows per program; the column sums over 12608 rows), and a wide
    row (Triton's chunked backward; the CUDA forward with auto's backward)."""
    M = 64 * 197 if C == 768 else 512
    leaves = _inputs((M, C), torch.bfloat16, "cuda", "layerscale", param_dtype=torch.float32)
    x, r, g, w, b = leaves
    gy, gs = torch.randn(M, C, device="cuda"), torch.randn(M, C, device="cuda")
    with xo.backend(backend):
        y, s = xo.layer_norm(x, w, b, 1e-6, residual=r, residual_scale=g)
    got = _grads(y, s, leaves, gy.bfloat16(), gs.bfloat16())
    r_y, r_s, r_g = _run_reference(leaves, 1e-6, gy, gs, oracle=True)
    b_y, b_s, b_g = _run_reference(leaves, 1e-6, gy.bfloat16(), gs.bfloat16(), oracle=False)
    assert_close_to_reference(y, r_y, b_y, name="y")
    assert_close_to_reference(s, r_s, b_s, name="s")
    for name, a, rr, bb in zip(("x", "residual", "gamma", "weight", "bias"), got, r_g, b_g):
        assert_close_to_reference(a, rr, bb, name=f"grad_{name}", atol=1e-2 * M ** 0.5)


def test_cuda_routing_of_wide_rows_not_in_packs():
    """The CUDA forward keeps rows not in 16-byte packs to 4096 elements (wider ones spilled):
    a wider C that is not a multiple of the pack goes elsewhere with the reason; a misaligned
    view of a packable width is copied into packs first (shapes and pointers only: no GPU)."""
    from xray_ops.ops import layer_norm_backends as lb

    def inputs(x, residual=None):
        return lb._dispatch._spec(lb.OP).forward(x, None, None, 1e-6, residual, None)

    assert lb._cuda_forward_check(inputs(torch.empty(2, 4096 + 7))) == [
        "C=4103 is not a multiple of 4 (16-byte packs): the CUDA kernel's row limit is 4096 then"]
    assert lb._cuda_forward_check(inputs(torch.empty(2, 4103, dtype=torch.half)))[0].startswith(
        "C=4103 is not a multiple of 8")
    assert lb._cuda_forward_check(inputs(torch.empty(2, 4095))) == []  # within the limit
    assert lb._cuda_forward_check(inputs(torch.empty(2, 6144))) == []  # in packs
    assert lb._cuda_forward_check(inputs(torch.empty(2, 9000)))[0].endswith("row limit 8192")
    base = torch.randn(3 * 6144 + 1)
    view = base[1:].view(3, 6144)  # 4 bytes off 16: not in packs
    rows = lb._cuda_rows(view, 6144)
    assert rows.data_ptr() % 16 == 0 and torch.equal(rows, view)
    packed = torch.randn(3, 6144)
    assert lb._cuda_rows(packed, 6144) is packed
    narrow = base[1:4097].view(1, 4096)  # within the unpacked limit: read as it is
    assert lb._cuda_rows(narrow, 4096) is narrow


@pytest.mark.gpu
def test_cuda_wide_rows_not_in_packs_on_gpu():
    """C = 6151 (not a multiple of the pack) goes to Triton under auto and is refused when CUDA
    is forced; a misaligned (M, 6144) view runs on CUDA (copied into packs) and agrees."""
    x = torch.randn(3, 6151, device="cuda")
    with pytest.raises(xo.BackendError, match="C=6151 is not a multiple of 4"):
        with xo.backend("cuda"):
            xo.layer_norm(x, None, None, residual=x)
    xo.layer_norm(x, None, None, residual=x)
    assert xo.last_backend("layer_norm") != "cuda"
    base = torch.randn(3 * 6144 + 1, device="cuda")
    view, r = base[1:].view(3, 6144), torch.randn(3, 6144, device="cuda")
    g, w = torch.rand(6144, device="cuda"), torch.rand(6144, device="cuda")
    with xo.backend("cuda"):
        y, s = xo.layer_norm(view, w, None, residual=r, residual_scale=g)
    y_ref, s_ref = ref.layer_norm(view.double(), w.double(), None, 1e-6, r.double(), g.double())
    torch.testing.assert_close(s.double(), s_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
