"""tome_merge / tome_match: every backend against the float64 reference, forward, token order and
both gradients (x and size)."""

import pytest
import torch

import xray_ops as xo
from xray_ops.reference import tome as ref
from xray_ops.testing import assert_close_to_reference

from .matrix import device_backend_dtypes, device_backends
from .tome_cases import separated_metric

CASES = device_backend_dtypes(skip={("cpu", torch.float16)})
FLAGS = [(True, False), (False, False), (True, True), (False, True)]
FLAG_IDS = ["cls", "plain", "cls+dist", "dist"]
C, CM = 6, 24  # metric width != x width


def _r_values(N, class_token, distill_token):
    # 1, about half the clamp, beyond the clamp (clamped to it); small N also the clamp itself
    clamp = ref.tome_clamp_r(N, N, class_token, distill_token)
    values = {1, max(1, clamp // 2), clamp + 5}
    if N <= 50:
        values.add(max(1, clamp))
    return sorted(values)


def _inputs(B, N, dtype, device, class_token, distill_token, with_size, layout="contiguous",
            metric_dtype=None, x_width=C):
    x = torch.randn(B, N, x_width, dtype=torch.float64).to(device=device, dtype=dtype)
    # wider metrics for many tokens: random runner-up similarities stay far below the best
    cm = CM if N < 1000 else 64
    metric = separated_metric(B, N, cm, class_token, distill_token, metric_dtype or dtype, device)
    size = None
    if with_size:  # token sizes as they grow through a ViT: positive, not integers here
        size = (0.5 + 3 * torch.rand(B, N, 1, dtype=torch.float64)).to(device=device, dtype=dtype)
    if layout == "strided":  # channels-first x, every other metric channel, a size column slice
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
        metric = torch.stack([metric, torch.zeros_like(metric)], -1)[..., 0]
        if size is not None:
            size = torch.cat([size, torch.zeros_like(size)], -1)[..., :1]
    x.requires_grad_()
    if size is not None:
        size.requires_grad_()
    return x, metric, size


def _reference(x, metric, r, size, class_token, distill_token, grad, grad_size):
    """Forward and gradients of the definition (autograd through reference.tome_merge)."""
    x = x.detach().requires_grad_()
    size = size.detach().requires_grad_() if size is not None else None
    out, size_out = ref.tome_merge(x, metric, r, size, class_token, distill_token)
    leaves = [x] + ([size] if size is not None else [])
    loss = (out * grad.to(out.dtype)).sum() + (size_out * grad_size.to(out.dtype)).sum()
    grads = torch.autograd.grad(loss, leaves)
    return out, size_out, grads[0], (grads[1] if size is not None else None)


def _check(device, backend, dtype, B, N, r, class_token, distill_token, with_size,
           layout="contiguous", grad_layout=None, metric_dtype=None, x_width=C):
    x, metric, size = _inputs(B, N, dtype, device, class_token, distill_token, with_size, layout,
                              metric_dtype, x_width)
    C = x_width
    n_out = N - ref.tome_clamp_r(N, r, class_token, distill_token)
    grad = torch.randn(B, n_out, C, dtype=torch.float64, device=device)
    grad_size = torch.randn(B, n_out, 1, dtype=torch.float64, device=device)
    if grad_layout == "expanded":  # the gradient of .sum() has stride 0
        grad = torch.randn(1, 1, C, dtype=torch.float64, device=device).expand(B, n_out, C)
    with xo.backend(backend):
        out, size_out, match = xo.tome_merge(x, metric, r, size=size, class_token=class_token,
                                             distill_token=distill_token, return_match=True)
        loss = (out * grad.to(dtype)).sum() + (size_out * grad_size.to(dtype)).sum()
        leaves = [x] + ([size] if size is not None else [])
        grads = torch.autograd.grad(loss, leaves)
    gx, gs = grads[0], (grads[1] if size is not None else None)
    if n_out < N:
        assert xo.last_backend("tome_merge") == backend
        assert xo.last_backend("tome_merge.backward") == backend
        assert xo.last_backend("tome_match") == backend
    # the matching, computed by the reference in float64 on the same metric values
    with xo.backend("torch"):
        want = xo.tome_match(metric.double(), r, class_token=class_token,
                             distill_token=distill_token)
    for name, got, exp in zip(match._fields, match, want):
        assert got.dtype == torch.int64, name
        assert torch.equal(got.cpu(), exp.cpu()), f"{name} differs from the reference"
    r_out, r_size, r_gx, r_gs = _reference(
        x.double(), metric.double(), r, size.double() if size is not None else None,
        class_token, distill_token, grad.double(), grad_size.double())
    b_out, b_size, b_gx, b_gs = _reference(x, metric, r, size, class_token, distill_token,
                                           grad, grad_size)
    assert out.dtype == dtype and out.shape == (B, n_out, C)
    assert size_out.dtype == dtype and size_out.shape == (B, n_out, 1)
    assert_close_to_reference(out, r_out, b_out, name="x_out")
    assert_close_to_reference(size_out, r_size, b_size, name="size_out")
    assert_close_to_reference(gx, r_gx, b_gx, name="grad_x")
    if size is not None:
        assert_close_to_reference(gs, r_gs, b_gs, name="grad_size")


@pytest.mark.parametrize("device,backend,dtype", CASES)
@pytest.mark.parametrize("N", [2, 11, 50, 197])
@pytest.mark.parametrize("flags", FLAGS, ids=FLAG_IDS)
def test_matches_reference(device, backend, dtype, N, flags):
    class_token, distill_token = flags
    for k, r in enumerate(_r_values(N, class_token, distill_token)):
        _check(device, backend, dtype, 2, N, r, class_token, distill_token, with_size=k % 2 == 1)


@pytest.mark.parametrize("device,backend,dtype", CASES)
@pytest.mark.parametrize("flags", [(True, False), (False, True)], ids=["cls", "dist"])
def test_matches_reference_577_tokens(device, backend, dtype, flags):
    # ViT-L/14 at 336 px: 577 tokens; r = 32 as in the benchmark, and r past the clamp
    for r, with_size in ((32, True), (1000, False)):
        _check(device, backend, dtype, 1, 577, r, *flags, with_size=with_size)


@pytest.mark.parametrize("device,backend,dtype", CASES)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_non_contiguous_inputs_and_expanded_grad(device, backend, dtype, layout):
    _check(device, backend, dtype, 3, 29, 9, True, False, with_size=True, layout=layout,
           grad_layout="expanded")


@pytest.mark.parametrize("device,backend", device_backends(gpu=("torch", "triton")))
def test_float64_plain_random_metric(device, backend):
    # float64 everywhere: Gaussian metrics without any separation, order checked exactly
    for N, flags in ((50, (True, False)), (33, (False, True))):
        x = torch.randn(2, N, 5, dtype=torch.float64, device=device)
        metric = torch.randn(2, N, 7, dtype=torch.float64, device=device)
        size = torch.rand(2, N, 1, dtype=torch.float64, device=device) + 0.5
        with xo.backend(backend):
            out, s_out, match = xo.tome_merge(x, metric, 12, size=size, class_token=flags[0],
                                              distill_token=flags[1], return_match=True)
        r_out, r_size = ref.tome_merge(x, metric, 12, size, *flags)
        want = ref.tome_match(metric, 12, *flags)
        for got, exp in zip(match, want):
            assert torch.equal(got.cpu(), exp.cpu())
        torch.testing.assert_close(out, r_out, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s_out, r_size, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device,backend", device_backends())
def test_metric_dtype_differs_from_x(device, backend):
    # autocast: the residual stream in float32, the keys (the metric) in float16
    _check(device, backend, torch.float32, 2, 40, 7, True, False, with_size=True,
           metric_dtype=torch.float16)


@pytest.mark.parametrize("device,backend", device_backends())
def test_exact_ties_break_by_lower_index(device, backend):
    # identical tokens tie exactly in every backend: prototypes 2·e_k (and 6·e_k) give cosines
    # of exactly 1 and 0 however they are computed, so the stable order alone decides
    protos = 2.0 * torch.eye(8)[:3]
    pick = torch.tensor([0, 1, 0, 2, 0, 1, 1, 2, 2, 0, 0, 1, 2, 2, 1, 0, 1])
    metric = protos[pick][None].repeat(2, 1, 1)
    metric[1] *= 3.0  # same directions, other norms: same matching
    x = torch.randn(2, len(pick), 4)
    with xo.backend("torch"):
        want = xo.tome_match(metric.double(), 5)
    with xo.backend(backend):
        out, _, match = xo.tome_merge(x.to(device), metric.to(device), 5, return_match=True)
    for name, got, exp in zip(match._fields, match, want):
        assert torch.equal(got.cpu(), exp.cpu()), name
    # every A token has a perfect match; stable order: the first five non-CLS A tokens merge,
    # each into the first B token identical to it
    assert match.src_idx[0].tolist() == [1, 2, 3, 4, 5]
    b_pick = pick[1::2].tolist()
    assert match.dst_idx[0].tolist() == [b_pick.index(int(pick[2 * i])) for i in range(1, 6)]
    assert torch.equal(match.dest[0], match.dest[1])


@pytest.mark.parametrize("device,backend", device_backends())
def test_exact_ties_across_score_tiles(device, backend):
    # 150 B tokens span several score tiles in every kernel: prototypes 0-2 repeat in later
    # tiles (the first occurrence must win), prototype 3 first appears at B index 131
    protos = 2.0 * torch.eye(6)[:4]
    b_proto = torch.tensor([j % 3 if j < 130 else j % 4 for j in range(150)])
    a_proto = torch.randint(0, 4, (151,), generator=torch.Generator().manual_seed(3))
    pick = torch.empty(301, dtype=torch.long)
    pick[0::2], pick[1::2] = a_proto, b_proto
    metric = protos[pick][None]
    with xo.backend(backend):
        match = xo.tome_match(metric.to(device), 40)
    first_b = [b_proto.tolist().index(p) for p in range(4)]
    assert first_b[3] == 131
    assert match.src_idx[0].tolist() == list(range(1, 41))  # all tie: stable order
    assert match.dst_idx[0].tolist() == [first_b[int(a_proto[i])] for i in range(1, 41)]
    want = ref.tome_match(metric.double(), 40, True, False)
    for name, got, exp in zip(match._fields, match, want):
        assert torch.equal(got.cpu(), exp), name


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # 0/0 on purpose
@pytest.mark.parametrize("device,backend", device_backends())
def test_zero_norm_and_nan_metric_tokens(device, backend):
    # a zero metric (ToMe: 0/0 = NaN scores) or a NaN in it: NaN counts as the largest score,
    # so such tokens match first and deterministically; x stays finite
    metric = torch.randn(2, 15, 6)
    metric[0, 4] = 0.0  # A token 2
    metric[0, 7] = 0.0  # B token 3: every A row's best is NaN there
    metric[1, 6, 2] = float("nan")  # A token 3
    x = torch.randn(2, 15, 5)
    with xo.backend("torch"):
        want = xo.tome_match(metric.double(), 4)
    with xo.backend(backend):
        out, size_out, match = xo.tome_merge(x.to(device), metric.to(device), 4,
                                             return_match=True)
    for name, got, exp in zip(match._fields, match, want):
        assert torch.equal(got.cpu(), exp.cpu()), name
    assert torch.isfinite(out).all()
    # sample 0: every best score is NaN (B token 3 is zero): stable order, A token 2's all-NaN
    # row picks its first column; sample 1: A token 3's all-NaN row ranks first
    assert match.src_idx[0].tolist() == [1, 2, 3, 4] and match.dst_idx[0].tolist() == [3, 0, 3, 3]
    assert match.src_idx[1, 0] == 3 and match.dst_idx[1, 0] == 0


# the torch backend is the reference: on CUDA its scatter_add uses float atomics
@pytest.mark.parametrize("device,backend", device_backends(gpu=("triton", "cuda")))
def test_deterministic_bitwise(device, backend):
    x, metric, size = _inputs(2, 197, torch.float32, device, True, False, True)
    grad = torch.randn(2, 197 - 40, C, device=device)
    runs = []
    for _ in range(2):
        with xo.backend(backend):
            out, size_out = xo.tome_merge(x, metric, 40, size=size)
            gx, gs = torch.autograd.grad((out * grad).sum() + size_out.sum(), [x, size])
        runs.append((out, size_out, gx, gs))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device,backend", device_backends())
def test_batch_one_empty_batch_and_zero_channels(device, backend):
    with xo.backend(backend):
        x = torch.randn(0, 9, 3, device=device, requires_grad=True)
        out, size_out = xo.tome_merge(x, torch.randn(0, 9, 4, device=device), 3)
        assert out.shape == (0, 6, 3) and size_out.shape == (0, 6, 1)
        out.sum().backward()
        assert x.grad.shape == x.shape
        x = torch.randn(2, 9, 0, device=device)
        metric = torch.randn(2, 9, 4, device=device)
        out, size_out = xo.tome_merge(x, metric, 3)
        _, r_size = ref.tome_merge(x, metric, 3)
        assert out.shape == (2, 6, 0)
        torch.testing.assert_close(size_out, r_size)
    _check(device, backend, torch.float32, 1, 17, 5, True, False, with_size=True)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_gradcheck_float64(backend):
    x = torch.randn(2, 13, 4, dtype=torch.float64, requires_grad=True)
    size = (torch.rand(2, 13, 1, dtype=torch.float64) + 0.5).requires_grad_()
    metric = torch.randn(2, 13, 5, dtype=torch.float64)
    with xo.backend(backend):
        # the matching does not change under gradcheck's perturbations: it reads only metric
        assert torch.autograd.gradcheck(
            lambda x, s: xo.tome_merge(x, metric, 4, size=s), (x, size), fast_mode=True)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("B,N,width,r", [(8, 197, 768, 16), (4, 577, 1024, 32),
                                         (2, 1568, 1024, 64)])
def test_vit_shapes_gpu(backend, dtype, B, N, width, r):
    # the benchmark's shapes; a float32 metric (many tokens: bfloat16 metric values would tie)
    _check("cuda", backend, dtype, B, N, r, True, False, with_size=True,
           metric_dtype=torch.float32, x_width=width)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # 0/0 on purpose
@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_inf_nan_sizes_follow_the_definition(device, backend, dtype):
    # size·x / size: a token of size 0 (or ±Inf, NaN) gives NaN, merged or alone in its slot,
    # on every backend as in the definition (the cpu merge used to copy x for a lone token)
    if backend == "cuda" and dtype == torch.float64:
        pytest.skip("the cuda merge takes 16/32-bit floats")
    B, N = 2, 13
    x = torch.randn(B, N, 4, dtype=dtype)
    metric = torch.randn(B, N, 6, dtype=dtype)
    size = 0.5 + torch.rand(B, N, 1, dtype=dtype)
    size[0, :4] = 0.0
    size[1, 5] = float("inf")
    size[1, 8] = float("-inf")
    size[1, 9] = float("nan")
    size[1, 10] = 0.0
    with xo.backend(backend):
        out, size_out = xo.tome_merge(x.to(device), metric.to(device), 3, size=size.to(device))
    r_out, r_size = ref.tome_merge(x.double(), metric, 3, size.double())
    assert torch.isnan(r_out).any()  # the case at hand
    assert_close_to_reference(out, r_out, name="x_out")
    assert_close_to_reference(size_out, r_size, name="size_out")


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matching_at_extreme_finite_magnitudes(device, backend, dtype):
    # the cosine does not depend on the scale: tiny or huge (but finite) metrics, or tokens of
    # wildly different magnitudes, match as the same metric at ordinary magnitude does. Forming
    # a·b, |a|² or ToMe's metric.norm() directly underflows (|m| ~ 1e-25 in float32: 0/0) or
    # overflows (~1e19: x/inf) and gave other matchings on some backends
    if backend == "cuda" and dtype == torch.float64:
        pytest.skip("the cuda matching takes 16/32-bit metrics")
    B, N, r = 2, 51, 10
    metric = separated_metric(B, N, CM, True, False, dtype)
    want = ref.tome_match(metric.double(), r, True, False)
    big = 30 if dtype == torch.float32 else 290
    scales = [10.0 ** -25, 10.0 ** 19, 10.0 ** 25] if dtype == torch.float32 else \
        [10.0 ** -170, 10.0 ** 170, 10.0 ** 300]
    mixed = 10 ** ((torch.rand(B, N, 1, dtype=torch.float64) * 2 - 1) * big)  # per token
    for s in scales + [mixed.to(dtype)]:
        m = (metric * s).to(device)
        assert torch.isfinite(m).all()
        with xo.backend(backend):
            got = xo.tome_match(m, r)
        for name, g, exp in zip(got._fields, got, want):
            what = s if isinstance(s, float) else "mixed"
            assert torch.equal(g.cpu(), exp), f"{name} differs at scale {what}"
