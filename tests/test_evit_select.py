"""evit_select: every backend against the float64 reference, forward and both gradients."""

import math

import pytest
import torch

import xray_ops as xo
from xray_ops.reference import evit as ref
from xray_ops.testing import assert_close_to_reference

from .matrix import device_backend_dtypes, device_backends

# (B, N, C): a single patch token, odd sizes, ViT's 197 tokens, C larger than one channel block
SHAPES = [(1, 2, 3), (2, 7, 5), (3, 50, 33), (2, 197, 40), (2, 20, 300)]
CASES = device_backend_dtypes(skip={("cpu", torch.float16)})


def _inputs(B, N, C, dtype, device, layout="contiguous"):
    x = torch.randn(B, N, C, dtype=torch.float64)
    a = torch.randn(B, N - 1, dtype=torch.float64).softmax(-1)
    x, a = x.to(device=device, dtype=dtype), a.to(device=device, dtype=dtype)
    if layout == "strided":  # channels-first storage, and every other cls_attn column
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
        a = torch.stack([a, torch.zeros_like(a)], -1)[..., 0]
    elif layout == "expanded":  # one sample broadcast over the batch
        x = x[:1].expand(B, N, C)
        a = a[:1].expand(B, N - 1)
    return x.requires_grad_(), a.requires_grad_()


def _reference(x, a, keep, fuse, grad):
    """Forward and gradients of the definition (autograd through reference.evit_select)."""
    x = x.detach().requires_grad_()
    a = a.detach().requires_grad_()
    out, idx = ref.evit_select(x, a, keep, fuse)
    gx, ga = torch.autograd.grad(out, [x, a], grad.to(out.dtype), allow_unused=True)
    return out, idx, gx, (ga if ga is not None else torch.zeros_like(a))


def _check(device, backend, dtype, B, N, C, keep, fuse, layout="contiguous", grad_layout=None):
    x, a = _inputs(B, N, C, dtype, device, layout)
    n_out = 1 + keep + int(fuse and keep < N - 1)  # nothing dropped: no fused token
    grad = torch.randn(B, n_out, C, dtype=torch.float64, device=device)
    if grad_layout == "expanded":  # the gradient of .sum() has stride 0
        grad = torch.randn(1, 1, C, dtype=torch.float64, device=device).expand(B, n_out, C)
    with xo.backend(backend):
        out, idx = xo.evit_select(x, a, keep, fuse=fuse)
        gx, ga = torch.autograd.grad(out, [x, a], grad.to(dtype), allow_unused=True)
    assert xo.last_backend("evit_select") == backend
    assert xo.last_backend("evit_select.backward") == backend
    ga = ga if ga is not None else torch.zeros_like(a)
    # float64 reference on the same input values (an exact upcast: same ranking, same ties)
    r_out, r_idx, r_gx, r_ga = _reference(x.double(), a.double(), keep, fuse, grad.double())
    # PyTorch's own result in the same dtype: the error budget
    b_out, _, b_gx, b_ga = _reference(x, a, keep, fuse, grad)
    assert idx.dtype == torch.int64 and idx.shape == (B, keep)
    assert torch.equal(idx.cpu(), r_idx.cpu()), "keep_idx differs from the reference order"
    assert out.dtype == dtype and out.shape == (B, n_out, C)
    assert gx.shape == x.shape and ga.shape == a.shape
    assert_close_to_reference(out, r_out, b_out, name="x_out")
    assert_close_to_reference(gx, r_gx, b_gx, name="grad_x")
    assert_close_to_reference(ga, r_ga, b_ga, name="grad_cls_attn")


@pytest.mark.parametrize("device,backend,dtype", CASES)
@pytest.mark.parametrize("B,N,C", SHAPES)
@pytest.mark.parametrize("fuse", [True, False])
def test_matches_reference(device, backend, dtype, B, N, C, fuse):
    P = N - 1
    for keep in sorted({1, max(1, P // 3), P}):
        _check(device, backend, dtype, B, N, C, keep, fuse)


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("N", [2, 3, 12])
def test_keep_all_appends_no_fused_token(device, backend, N):
    # keep == N-1 drops nothing: EViT appends no (all-zero) fused token, so a keep-rate
    # schedule just under 1 must not grow the token count 197 -> 198 -> 199
    B, C = 2, 5
    x, a = _inputs(B, N, C, torch.float32, device)
    with xo.backend(backend):
        out, idx = xo.evit_select(x, a, N - 1, fuse=True)
        out.backward(torch.ones_like(out))
    assert out.shape == (B, N, C)
    order = torch.cat([torch.zeros(B, 1, dtype=torch.int64, device=device), 1 + idx], 1)
    assert torch.equal(out.detach(), x.detach().gather(1, order[..., None].expand(B, N, C)))
    assert torch.equal(x.grad, torch.ones_like(x)) and torch.equal(a.grad, torch.zeros_like(a))
    _check(device, backend, torch.float32, B, N, C, N - 1, True)


def test_keep_all_fake_and_direct_op_agree():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, a = torch.randn(2, 9, 4), torch.rand(2, 8)
    out, _ = torch.ops.xray_ops.evit_select(x, a, 8, True, "auto")
    assert out.shape == (2, 9, 4)
    with FakeTensorMode() as mode:
        fo, fi = torch.ops.xray_ops.evit_select(mode.from_tensor(x), mode.from_tensor(a), 8, True,
                                                "auto")
    assert fo.shape == (2, 9, 4) and fi.shape == (2, 8)
    torch.library.opcheck(torch.ops.xray_ops.evit_select.default,
                          (x.requires_grad_(), a.requires_grad_(), 8, True, "auto"))


def test_module_leaves_x_as_is_when_it_would_keep_every_token():
    m = xo.nn.EViTSelect(0.7, warmup_steps=0, shrink_steps=1000)
    m.set_step(1)  # rate just under 1: ceil(rate * 196) == 196
    assert m.current_rate() < 1.0
    x, a = torch.randn(2, 197, 8), torch.rand(2, 196)
    for _ in range(3):  # three EViT locations in a row
        out, idx = m(x, a[:, : x.shape[1] - 1])
        assert out is x and idx is None
    m.set_step(600)
    out, idx = m(x, a)
    assert out.shape[1] < 197


@pytest.mark.parametrize("device,backend,dtype", CASES)
@pytest.mark.parametrize("layout", ["strided", "expanded"])
def test_non_contiguous_inputs_and_expanded_grad(device, backend, dtype, layout):
    _check(device, backend, dtype, 3, 29, 24, 11, True, layout=layout, grad_layout="expanded")


@pytest.mark.parametrize("device,backend", device_backends())
def test_ties_keep_lower_index_first(device, backend):
    # float16 cls_attn has many exact ties; the order must be the stable one, in every backend
    a = torch.tensor([[0.5, 0.25, 0.5, 0.25, 0.5, 0.125, 0.25]], device=device)
    x = torch.arange(8 * 4, dtype=torch.float32, device=device).reshape(1, 8, 4)
    with xo.backend(backend):
        out, idx = xo.evit_select(x, a, 5)
    assert idx.tolist() == [[0, 2, 4, 1, 3]]
    torch.testing.assert_close(out[0, 1:6], x[0, 1 + idx[0]])
    fused = 0.125 * x[0, 6] + 0.25 * x[0, 7]
    torch.testing.assert_close(out[0, 6], fused)


@pytest.mark.parametrize("device,backend", device_backends())
def test_nan_propagates_and_ranks_first(device, backend):
    x = torch.randn(2, 9, 6, device=device)
    a = torch.rand(2, 8, device=device)
    a[0, 5] = float("nan")
    x[1, 3, 2] = float("nan")  # patch token 2 of sample 1
    with xo.backend(backend):
        out, idx = xo.evit_select(x, a, 3)
    r_out, r_idx = ref.evit_select(x, a, 3)
    assert idx[0, 0] == 5, "NaN attention ranks first, as in a descending torch.sort"
    assert torch.equal(idx.cpu(), r_idx.cpu())
    torch.testing.assert_close(out, r_out, equal_nan=True)


@pytest.mark.parametrize("device,backend", device_backends())
def test_empty_batch_and_zero_channels(device, backend):
    with xo.backend(backend):
        x = torch.randn(0, 5, 3, device=device, requires_grad=True)
        out, idx = xo.evit_select(x, torch.rand(0, 4, device=device), 2)
        assert out.shape == (0, 4, 3) and idx.shape == (0, 2)
        out.sum().backward()
        assert x.grad.shape == x.shape
        x = torch.randn(2, 5, 0, device=device)
        a = torch.rand(2, 4, device=device)
        out, idx = xo.evit_select(x, a, 2)
        assert out.shape == (2, 4, 0) and torch.equal(idx.cpu(), ref.evit_select(x, a, 2)[1])


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_gradcheck_float64(backend):
    x = torch.randn(2, 9, 4, dtype=torch.float64, requires_grad=True)
    a = torch.rand(2, 8, dtype=torch.float64, requires_grad=True)
    with xo.backend(backend):
        # ranks do not change under gradcheck's small perturbations: the values are far apart
        assert torch.autograd.gradcheck(lambda x, a: xo.evit_select(x, a, 3)[0], (x, a))


def test_keep_count_matches_evit_formula():
    for n in (1, 7, 196, 576):
        for rate in (0.1, 0.5, 0.7, 0.9, 1.0):
            assert xo.evit_keep_count(n, rate) == math.ceil(rate * n)
    with pytest.raises(ValueError, match="keep_rate"):
        xo.evit_keep_count(196, 0.0)
    with pytest.raises(ValueError, match="keep_rate"):
        xo.evit_keep_count(196, 1.5)
    with pytest.raises(TypeError, match="n_patch_tokens"):
        xo.evit_keep_count(196.0, 0.5)


def test_bad_inputs_name_the_argument():
    x = torch.randn(2, 9, 4)
    a = torch.rand(2, 8)
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        xo.evit_select(x.numpy(), a, 3)
    with pytest.raises(TypeError, match="x: expected a floating dtype"):
        xo.evit_select(x.long(), a, 3)
    with pytest.raises(ValueError, match="x: expected a 3-D tensor"):
        xo.evit_select(x[0], a, 3)
    with pytest.raises(ValueError, match=r"cls_attn: expected shape \(2, 8\)"):
        xo.evit_select(x, a[:, :7], 3)
    with pytest.raises(ValueError, match=r"cls_attn: expected a 2-D tensor"):
        xo.evit_select(x, a[..., None], 3)
    with pytest.raises(TypeError, match="cls_attn: expected dtype float32"):
        xo.evit_select(x, a.double(), 3)
    with pytest.raises(ValueError, match=r"keep: expected an int in \[1, 8\], got 9"):
        xo.evit_select(x, a, 9)
    with pytest.raises(ValueError, match=r"keep: expected an int in \[1, 8\], got 0"):
        xo.evit_select(x, a, 0)
    with pytest.raises(TypeError, match="keep: expected an int"):
        xo.evit_select(x, a, 3.0)
    with pytest.raises(TypeError, match="fuse: expected a bool"):
        xo.evit_select(x, a, 3, fuse=1)
    with pytest.raises(ValueError, match="cls_attn: expected a tensor on cpu"):
        xo.evit_select(x, a.to("meta"), 3)
    with pytest.raises(ValueError, match="x: expected at least 2 tokens"):
        xo.evit_select(torch.randn(2, 1, 4), torch.rand(2, 0), 1)


def test_forced_backend_that_cannot_take_inputs_lists_reasons():
    x, a = torch.randn(2, 9, 4), torch.rand(2, 8)
    with pytest.raises(xo.BackendError, match="forced backend 'cuda'.*device cpu not supported"):
        with xo.backend("cuda"):
            xo.evit_select(x, a, 3)
    with pytest.raises(xo.BackendError, match="forced backend 'cpu'.*dtype float16"):
        with xo.backend("cpu"):
            xo.evit_select(x.half(), a.half(), 3)
    with pytest.raises(ValueError, match="set_backend"):
        xo.set_backend("tpu")


def test_auto_picks_numba_on_cpu_then_torch_for_half():
    x, a = torch.randn(2, 9, 4), torch.rand(2, 8)
    xo.evit_select(x, a, 3)
    assert xo.last_backend("evit_select") == "cpu"
    xo.evit_select(x.half(), a.half(), 3)
    assert xo.last_backend("evit_select") == "torch"


def test_opcheck():
    x = torch.randn(2, 9, 4, requires_grad=True)
    a = torch.rand(2, 8, requires_grad=True)
    for backend in ("torch", "cpu"):
        torch.library.opcheck(torch.ops.xray_ops.evit_select.default, (x, a, 3, True, backend))
        torch.library.opcheck(torch.ops.xray_ops.evit_select.default, (x, a, 8, False, backend))
    g = torch.randn(2, 5, 4)
    torch.library.opcheck(torch.ops.xray_ops.evit_select_backward.default,
                          (g, x.detach(), a.detach(), 3, True, "auto"))


def test_torch_compile_fullgraph():
    def block(x, a):
        out, idx = xo.evit_select(x * 2, a.softmax(-1), 4)
        return out.square().sum() + idx.sum()

    x = torch.randn(2, 9, 4, requires_grad=True)
    a = torch.randn(2, 8, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    got = compiled(x, a)
    gx, ga = torch.autograd.grad(got, [x, a])
    want = block(x, a)
    wx, wa = torch.autograd.grad(want, [x, a])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gx, wx)
    torch.testing.assert_close(ga, wa)


def test_module_schedule():
    m = xo.nn.EViTSelect(0.5, warmup_steps=10, shrink_steps=100)
    assert m.rate_at(0) == 1.0 and m.rate_at(9) == 1.0
    assert m.rate_at(10) == pytest.approx(1.0)
    assert m.rate_at(60) == pytest.approx(0.75)
    assert m.rate_at(110) == 0.5 and m.rate_at(10_000) == 0.5
    x, a = torch.randn(2, 11, 4), torch.rand(2, 10)
    out, idx = m(x, a)
    assert out is x and idx is None  # warm-up: EViT leaves the tokens alone
    m.set_step(60)
    out, idx = m(x, a)
    assert out.shape == (2, 1 + math.ceil(0.75 * 10) + 1, 4)
    m.eval()
    out, idx = m(x, a)
    assert idx.shape == (2, 5)


# ----------------------------------------------------------------------------------------------
# EViTConfig
# ----------------------------------------------------------------------------------------------
def test_evit_config_validates_and_makes_modules():
    cfg = xo.EViTConfig(keep_rate=0.5, locations=[6, 3], warmup_steps=2, shrink_steps=4)
    assert cfg.locations == (3, 6)
    cfg.check_depth(7)
    with pytest.raises(ValueError, match="locations"):
        cfg.check_depth(6)
    sel = cfg.make_select()
    assert isinstance(sel, xo.nn.EViTSelect)
    assert (sel.keep_rate, sel.fuse, sel.warmup_steps, sel.shrink_steps) == (0.5, True, 2, 4)
    assert sel.rate_at(0) == 1.0 and sel.rate_at(6) == 0.5
    for bad, exc in [(dict(keep_rate=0.0), ValueError), (dict(keep_rate=1.5), ValueError),
                     (dict(locations=(3, 3)), ValueError), (dict(locations=(-1,)), ValueError),
                     (dict(locations=3), TypeError), (dict(fuse=1), TypeError),
                     (dict(warmup_steps=-1), ValueError)]:
        with pytest.raises(exc):
            xo.EViTConfig(**bad)
