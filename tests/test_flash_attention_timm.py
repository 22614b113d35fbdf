"""xray_ops.nn.Attention as a drop-in for timm's Attention: same names, same outputs, same
gradients; plus key_bias, cls_attn and timm's attn_mask / is_causal."""

import copy

import pytest
import torch

import xray_ops as xo
from xray_ops.nn import Attention
from xray_ops.testing import assert_close_to_reference

timm = pytest.importorskip("timm")
from timm.layers import Attention as TimmAttention  # noqa: E402


def _vit_b_block():
    # ViT-B/16's block 0 (768 wide, 12 heads of 64), random init: nothing is downloaded
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0,
                              depth=1, img_size=64)
    return model.blocks[0].eval()


def _block_grads(block, x):
    x = x.detach().requires_grad_()
    y = block(x)
    g = torch.randn_like(y, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    names = [n for n, _ in block.named_parameters()]
    grads = torch.autograd.grad(y, [x] + [p for _, p in block.named_parameters()], g.to(y.dtype))
    return y, dict(zip(["x"] + names, grads))


@pytest.mark.parametrize("backend,N", [("torch", 197), ("triton", 17), ("cpu", 197)])
def test_vit_b_block_with_swapped_attention_matches_timm(backend, N):
    """timm's block in float64 is the reference; timm's block in float32 the error budget."""
    block = _vit_b_block()
    assert isinstance(block.attn, TimmAttention)
    x = torch.randn(2, N, 768, dtype=torch.float64)
    ref64 = copy.deepcopy(block).double()
    y64, g64 = _block_grads(ref64, x)
    y32, g32 = _block_grads(block, x.float())
    fast = copy.deepcopy(block)
    fast.attn = Attention.from_timm(fast.attn)
    assert fast.state_dict().keys() == block.state_dict().keys()
    with xo.backend(backend):
        y, g = _block_grads(fast, x.float())
    assert xo.last_backend("flash_attention") == backend
    assert_close_to_reference(y, y64, y32, name="block output")
    for name in g64:
        assert_close_to_reference(g[name], g64[name], g32[name], name=f"grad {name}")


def test_timm_weights_load_as_they_are_and_options_match():
    torch.manual_seed(0)
    kw = dict(num_heads=4, qkv_bias=True, qk_norm=True, scale_norm=True, gated=True,
              norm_layer=torch.nn.LayerNorm)
    theirs = TimmAttention(64, **kw).eval()
    ours = Attention(64, **kw).eval()
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for name, t in theirs.state_dict().items():
        assert ours.state_dict()[name].shape == t.shape, name
    # LayerNorm weights start at 1/0: make them count
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 11, 64)
    for causal in (False, True):
        torch.testing.assert_close(ours(x, is_causal=causal), theirs(x, is_causal=causal),
                                   rtol=1e-4, atol=1e-5)


def test_key_bias_and_cls_attn_from_the_module():
    torch.manual_seed(0)
    theirs = TimmAttention(32, num_heads=2, qkv_bias=True).eval()
    ours = Attention.from_timm(theirs)
    x = torch.randn(2, 9, 32)
    size = torch.rand(2, 9) + 0.5
    y, cls = ours(x, key_bias=size.log(), return_cls_attn=True)
    # the definition: logits + log(size) (ToMe's proportional attention)
    B, N, C = x.shape
    q, k, v = theirs.qkv(x).reshape(B, N, 3, 2, 16).permute(2, 0, 3, 1, 4)
    attn = (q @ k.transpose(-1, -2) * 16 ** -0.5 + size.log()[:, None, None]).softmax(-1)
    want = theirs.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cls, attn[:, :, 0].mean(1), rtol=1e-4, atol=1e-6)


def test_attn_mask_per_key_and_general():
    torch.manual_seed(0)
    theirs = TimmAttention(32, num_heads=2).eval()
    ours = Attention.from_timm(theirs)
    x = torch.randn(2, 7, 32)
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[1, 4:] = False  # padding keys of sample 1
    per_key = keep[:, None, None, :]
    torch.testing.assert_close(ours(x, attn_mask=per_key), theirs(x, attn_mask=per_key),
                               rtol=1e-4, atol=1e-5)
    additive = torch.randn(2, 1, 1, 7)
    torch.testing.assert_close(ours(x, attn_mask=additive), theirs(x, attn_mask=additive),
                               rtol=1e-4, atol=1e-5)
    general = torch.randn(2, 2, 7, 7)  # differs per head and query: the explicit path
    torch.testing.assert_close(ours(x, attn_mask=general), theirs(x, attn_mask=general),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="attn_mask: expected None when is_causal=True"):
        ours(x, attn_mask=per_key, is_causal=True)


def test_attention_dropout_in_training_matches_timm():
    torch.manual_seed(0)
    theirs = TimmAttention(32, num_heads=2, attn_drop=0.5).train()
    theirs.fused_attn = False  # timm's explicit path: the same dropout draws as ours
    ours = Attention.from_timm(theirs)
    x = torch.randn(2, 7, 32)
    torch.manual_seed(1)
    want = theirs(x)
    torch.manual_seed(1)
    y, cls = ours(x, return_cls_attn=True)
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cls.sum(-1), torch.ones(2))  # the row before dropout
    theirs.eval()
    assert not torch.allclose(ours.eval()(x), y)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)


def test_constructor_errors():
    with pytest.raises(ValueError, match="dim: expected a multiple of num_heads=5"):
        Attention(32, num_heads=5)
    with pytest.raises(ValueError, match="norm_layer"):
        Attention(32, num_heads=2, qk_norm=True)
    with pytest.raises(TypeError, match="module: expected a timm Attention"):
        Attention.from_timm(torch.nn.Linear(2, 2))


def test_module_under_torch_compile_fullgraph():
    # a block with the module on the packed path, ToMe's key_bias and EViT's cls_attn
    torch.manual_seed(0)
    attn = Attention(32, num_heads=2, qkv_bias=True)

    def block(x, size):
        y, cls = attn(x, key_bias=size.log(), return_cls_attn=True)
        return (x + y).square().mean() + (cls * torch.arange(x.shape[1])).sum()

    x = torch.randn(2, 9, 32, requires_grad=True)
    size = torch.rand(2, 9).add(0.5).requires_grad_()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, size), [x, size, attn.qkv.weight])
    want = torch.autograd.grad(block(x, size), [x, size, attn.qkv.weight])
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w)
