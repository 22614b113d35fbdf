"""contrastive_loss: every backend against the float64 definition (loss and the gradients of
both embeddings and logit_scale), against open_clip's ClipLoss (full and local-loss forms), and
its argument checks."""

import pytest
import torch
import torch.nn.functional as F

import xray_ops as xo
from xray_ops.reference import contrastive as ref
from xray_ops.testing import assert_close_to_reference

from .matrix import device_backend_dtypes, device_backends

CPU_BACKENDS = ("torch", "cpu", "triton")
GPU_BACKENDS = ("torch", "triton")
CASES = device_backend_dtypes(cpu=CPU_BACKENDS, gpu=GPU_BACKENDS)
# (B, C): one pair, one channel, odd primes, B not a multiple of any tile, C = 8192
SHAPES = [(1, 1), (2, 3), (7, 1), (13, 33), (37, 64), (3, 8192)]


def _emb(B, C, dtype, device, normalize=True):
    t = torch.randn(B, C, dtype=torch.float64)
    if normalize:
        t = F.normalize(t, dim=-1)
    return t.to(device=device, dtype=dtype)


def _definition(args, labels, oracle, gl):
    """ref.contrastive_loss on copies (float64 for the oracle) -> (loss, grads of every input)."""
    copies = [None if t is None else
              (t.detach().double() if oracle else t.detach().clone()).requires_grad_()
              for t in args]
    img, txt, scale, img_all, txt_all = copies
    loss = ref.contrastive_loss(img, txt, scale, labels, img_all, txt_all)
    leaves = [t for t in copies if t is not None]
    grads = torch.autograd.grad(loss, leaves, gl.to(loss.dtype))
    return loss, grads


def _check(device, backend, dtype, B, C, labels=None, n_all=None, layout="contiguous",
           scale_shape=()):
    img, txt = _emb(B, C, dtype, device), _emb(B, C, dtype, device)
    img_all = txt_all = None
    if n_all is not None:
        img_all, txt_all = _emb(n_all, C, dtype, device), _emb(n_all, C, dtype, device)
    if layout == "strided":  # column-major storage and every other row of a taller tensor
        img = img.T.contiguous().T
        txt = torch.stack([txt, txt], 1)[:, 1]
    scale = torch.full(scale_shape, 7.5, dtype=torch.float32, device=device)
    args = [t.requires_grad_() if t is not None else None
            for t in (img, txt, scale, img_all, txt_all)]
    gl = torch.tensor(1.7, dtype=torch.float64, device=device)
    with xo.backend(backend):
        loss = xo.contrastive_loss(img, txt, scale, labels=labels, all_image_emb=img_all,
                                   all_text_emb=txt_all)
        leaves = [t for t in args if t is not None]
        got = torch.autograd.grad(loss, leaves, gl.to(loss.dtype))
    assert xo.last_backend("contrastive_loss") == backend
    assert xo.last_backend("contrastive_loss.backward") == backend
    assert loss.shape == () and loss.dtype == (torch.float64 if dtype == torch.float64
                                                 else torch.float32)
    r_loss, r_g = _definition(args, labels, True, gl)
    b_loss, b_g = _definition(args, labels, False, gl)
    assert_close_to_reference(loss, r_loss, b_loss, name="loss", atol=1e-5 * max(1, C) ** 0.5
                              if dtype == torch.float16 else None)
    names = ["image_emb", "text_emb", "logit_scale", "all_image_emb", "all_text_emb"]
    names = [n for n, t in zip(names, args) if t is not None]
    for name, a, rr, bb, leaf in zip(names, got, r_g, b_g, leaves):
        assert a.dtype == leaf.dtype and a.shape == leaf.shape, name
        atol = None
        if name == "logit_scale":  # a sum over B² terms
            atol = 1e-5 * B if dtype != torch.float16 else 1e-3 * B
        assert_close_to_reference(a, rr, bb, name=f"grad_{name}", atol=atol)


@pytest.mark.parametrize("device,backend,dtype", CASES)
@pytest.mark.parametrize("B,C", SHAPES)
def test_matches_reference(device, backend, dtype, B, C):
    _check(device, backend, dtype, B, C)


@pytest.mark.parametrize("device,backend,dtype", CASES)
def test_labels_local_form_and_layouts(device, backend, dtype):
    # labels that repeat and skip (a scatter in the gradient), a (1,)-shaped logit_scale
    labels = torch.tensor([3, 0, 3, 5, 1, 2, 6], device=device)
    _check(device, backend, dtype, 7, 19, labels=labels, scale_shape=(1,))
    # local-loss form: 5 rows of this rank against 17 gathered columns
    _check(device, backend, dtype, 5, 19, labels=torch.arange(5, device=device) + 10, n_all=17)
    _check(device, backend, dtype, 11, 24, layout="strided")


@pytest.mark.parametrize("device,backend", device_backends(cpu=CPU_BACKENDS, gpu=GPU_BACKENDS))
def test_equals_open_clip_clip_loss(device, backend):
    open_clip = pytest.importorskip("open_clip")
    B, C = 29, 40
    img = _emb(B, C, torch.float32, device).requires_grad_()
    txt = _emb(B, C, torch.float32, device).requires_grad_()
    scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)
    want = open_clip.loss.ClipLoss()(img, txt, scale)
    w_grads = torch.autograd.grad(want, [img, txt, scale])
    with xo.backend(backend):
        got = xo.contrastive_loss(img, txt, scale)
    g_grads = torch.autograd.grad(got, [img, txt, scale])
    torch.testing.assert_close(got, want)
    for a, b in zip(g_grads, w_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device,backend", device_backends(cpu=CPU_BACKENDS, gpu=GPU_BACKENDS))
def test_local_loss_equals_open_clip_with_gathered_features(device, backend, monkeypatch):
    """Rank 1 of 3: open_clip's ClipLoss(local_loss=True) with the gathered features its
    gather_features would return, against the local-loss form on the same tensors."""
    open_clip = pytest.importorskip("open_clip")
    import open_clip.loss as ocl

    B, C, world, rank = 6, 16, 3, 1
    img = _emb(B, C, torch.float32, device).requires_grad_()
    txt = _emb(B, C, torch.float32, device).requires_grad_()
    others_i = [_emb(B, C, torch.float32, device) for _ in range(world)]
    others_t = [_emb(B, C, torch.float32, device) for _ in range(world)]

    def gathered():  # this rank's slot holds the local tensors (the gradient reaches them)
        gi, gt = list(others_i), list(others_t)
        gi[rank], gt[rank] = img, txt
        return torch.cat(gi), torch.cat(gt)

    monkeypatch.setattr(ocl, "gather_features", lambda *a, **k: gathered())
    scale = torch.tensor(10.0, device=device, requires_grad=True)
    want = ocl.ClipLoss(local_loss=True, rank=rank, world_size=world)(img, txt, scale)
    w_grads = torch.autograd.grad(want, [img, txt, scale])
    all_i, all_t = gathered()
    with xo.backend(backend):
        got = xo.contrastive_loss(img, txt, scale, labels=torch.arange(B, device=device) + rank * B,
                                  all_image_emb=all_i, all_text_emb=all_t)
    g_grads = torch.autograd.grad(got, [img, txt, scale])
    torch.testing.assert_close(got, want)
    for a, b in zip(g_grads, w_grads):
        torch.testing.assert_close(a, b)


def test_python_number_logit_scale():
    img, txt = _emb(5, 8, torch.float32, "cpu"), _emb(5, 8, torch.float32, "cpu")
    torch.testing.assert_close(xo.contrastive_loss(img, txt, 3.0),
                               ref.contrastive_loss(img, txt, 3.0))


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
def test_gradcheck_float64(backend):
    img = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    txt = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    with xo.backend(backend):
        assert torch.autograd.gradcheck(lambda i, t, s: xo.contrastive_loss(i, t, s),
                                        (img, txt, scale))
        ia = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
        ta = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
        labels = torch.tensor([4, 0, 7, 7, 2])
        assert torch.autograd.gradcheck(
            lambda i, t, s, a, b: xo.contrastive_loss(i, t, s, labels=labels, all_image_emb=a,
                                                      all_text_emb=b), (img, txt, scale, ia, ta))


def test_bad_inputs_name_the_argument():
    img, txt, s = torch.randn(4, 8), torch.randn(4, 8), torch.tensor(2.0)
    with pytest.raises(TypeError, match="image_emb: expected a torch.Tensor"):
        xo.contrastive_loss(img.tolist(), txt, s)
    with pytest.raises(ValueError, match="image_emb: expected a 2-D tensor"):
        xo.contrastive_loss(img[None], txt, s)
    with pytest.raises(TypeError, match="text_emb: expected a floating dtype"):
        xo.contrastive_loss(img, txt.long(), s)
    with pytest.raises(ValueError, match=r"text_emb: expected shape \(4, 8\)"):
        xo.contrastive_loss(img, txt[:3], s)
    with pytest.raises(TypeError, match="text_emb: expected dtype float32"):
        xo.contrastive_loss(img, txt.half(), s)
    with pytest.raises(ValueError, match="text_emb: expected a tensor on cpu"):
        xo.contrastive_loss(img, txt.to("meta"), s)
    with pytest.raises(ValueError, match=r"logit_scale: expected a scalar .* got shape \(2,\)"):
        xo.contrastive_loss(img, txt, torch.ones(2))
    with pytest.raises(TypeError, match="logit_scale: expected a scalar tensor or a number"):
        xo.contrastive_loss(img, txt, "2")
    with pytest.raises(TypeError, match="logit_scale: expected a floating dtype"):
        xo.contrastive_loss(img, txt, torch.tensor(2))
    with pytest.raises(ValueError, match="logit_scale: expected a tensor on cpu"):
        xo.contrastive_loss(img, txt, s.to("meta"))
    with pytest.raises(TypeError, match="labels: expected dtype int64"):
        xo.contrastive_loss(img, txt, s, labels=torch.arange(4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"labels: expected shape \(4\)"):
        xo.contrastive_loss(img, txt, s, labels=torch.arange(5))
    with pytest.raises(ValueError, match=r"labels: expected values in \[0, 3\], got values in"):
        xo.contrastive_loss(img, txt, s, labels=torch.tensor([0, 1, 2, 4]))
    with pytest.raises(ValueError, match="all_image_emb, all_text_emb: the local-loss form "
                                         "needs both"):
        xo.contrastive_loss(img, txt, s, all_image_emb=img)
    with pytest.raises(ValueError, match="labels: required in the local-loss form"):
        xo.contrastive_loss(img, txt, s, all_image_emb=img, all_text_emb=txt)
    with pytest.raises(ValueError, match=r"all_text_emb: expected shape \(6, 8\)"):
        xo.contrastive_loss(img, txt, s, labels=torch.arange(4), all_image_emb=torch.randn(6, 8),
                            all_text_emb=torch.randn(5, 8))
    with pytest.raises(ValueError, match=r"image_emb: expected \(B, C\) with B >= 1"):
        xo.contrastive_loss(img[:0], txt[:0], s)


def test_opcheck():
    img = torch.randn(6, 5, requires_grad=True)
    txt = torch.randn(6, 5, requires_grad=True)
    s = torch.tensor(3.0, requires_grad=True)
    labels = torch.tensor([1, 0, 2, 2, 5, 4])
    ia, ta = torch.randn(9, 5, requires_grad=True), torch.randn(9, 5, requires_grad=True)
    for backend in ("torch", "cpu"):  # the op machinery; kernels are tested above
        torch.library.opcheck(torch.ops.xray_ops.contrastive_loss.default,
                              (img, txt, None, None, s, None, backend))
        torch.library.opcheck(torch.ops.xray_ops.contrastive_loss.default,
                              (img, txt, ia, ta, s, labels, backend))
    loss, lse_i, lse_t, ds = torch.ops.xray_ops.contrastive_loss(img, txt, None, None, s, labels,
                                                                 "torch")
    torch.library.opcheck(torch.ops.xray_ops.contrastive_loss_backward.default,
                          (torch.tensor(1.0), img.detach(), txt.detach(), None, None, s.detach(),
                           labels, lse_i, lse_t, ds, "auto"))


def test_torch_compile_fullgraph():
    def clip_head(x, y, w, t):
        img = F.normalize(x @ w, dim=-1)
        txt = F.normalize(y, dim=-1)
        return xo.contrastive_loss(img, txt, t.exp())

    args = [torch.randn(9, 6, requires_grad=True), torch.randn(9, 4, requires_grad=True),
            torch.randn(6, 4, requires_grad=True), torch.tensor(2.0, requires_grad=True)]
    compiled = torch.compile(clip_head, fullgraph=True, backend="aot_eager")
    got = compiled(*args)
    g_got = torch.autograd.grad(got, args)
    want = clip_head(*args)
    g_want = torch.autograd.grad(want, args)
    torch.testing.assert_close(got, want)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_batch_of_thousands_on_gpu(dtype):
    """B = 5000 (rows split over programs: the partial log-sum-exps merge), C = 256 (the
    gradient accumulates in the float32 buffer), against the float64 definition."""
    _check("cuda", "triton", dtype, 5000, 256)
