"""xray_ops.patch.open_clip: a ViT-B-32-shaped open_clip CLIP (ViT-B-32's widths, heads and
patch size; 2 layers per tower to stay fast; random init, nothing downloaded) patched vs
unpatched, token reduction vs a step-by-step reference, int8 on both towers, unpatch, compile."""

import copy

import pytest
import torch

import xray_ops as xo
from xray_ops.testing import assert_close_to_reference

from . import _patch_reference as ref

open_clip = pytest.importorskip("open_clip")


def _clip(layers=2, **vision):
    cfg = open_clip.get_model_config("ViT-B-32")
    cfg["vision_cfg"] = {**cfg["vision_cfg"], "layers": layers, **vision}
    cfg["text_cfg"] = {**cfg["text_cfg"], "layers": layers}
    torch.manual_seed(0)
    return open_clip.CLIP(**cfg).eval()


def _images(dtype=torch.float32, size=224):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=dtype)


def _text():
    return open_clip.get_tokenizer("ViT-B-32")(["a photo of a dog", "a diagram"])


def _image_grads(model, images):
    images = images.detach().requires_grad_()
    y = model.encode_image(images)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    named = [(n, p) for n, p in model.visual.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(y, [images] + [p for _, p in named], g.to(y.dtype))
    return y, dict(zip(["input"] + [n for n, _ in named], grads))


def test_attention_only_matches_open_clip_forward_and_gradients():
    model = _clip()
    images = _images()
    y64, g64 = _image_grads(copy.deepcopy(model).double(), images.double())
    y32, g32 = _image_grads(model, images)
    patched = xo.patch.open_clip(copy.deepcopy(model))
    assert patched.state_dict().keys() == model.state_dict().keys()
    y, g = _image_grads(patched, images)
    assert_close_to_reference(y, y64, y32, name="image embedding")
    for name in g64:
        assert_close_to_reference(g[name], g64[name], g32[name], name=f"grad {name}")
    with torch.no_grad():  # the text tower is not touched
        assert torch.equal(patched.encode_text(_text()), model.encode_text(_text()))


@pytest.mark.parametrize("pool_type", ["tok", "avg"])
def test_token_reduction_matches_step_by_step_reference(pool_type):
    model = _clip(layers=3, pool_type=pool_type).double()
    images = _images(torch.float64)
    evit = (0.7, (1,), True)
    patched = xo.patch.open_clip(copy.deepcopy(model), tome=xo.ToMeConfig(r=6),
                                 evit=xo.EViTConfig(*evit))
    v = model.visual
    x = v._embeds(images)
    x, size = ref.blocks_forward(v.transformer.resblocks, x, rs=[6, 6, 6], prefix=1, evit=evit,
                                 open_clip=True)
    x = v.ln_post(x)
    pooled = x[:, 0] if pool_type == "tok" else (x[:, 1:] * size[:, 1:]).sum(1) / size[:, 1:].sum(1)
    want = pooled @ v.proj
    got = patched.encode_image(images)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert xo.patch.state(patched).size.shape[1] < 50


def test_unpatch_restores_the_forward_bitwise_and_print_shows_the_patch():
    model = _clip()
    images = _images()
    with torch.no_grad():
        before = model.encode_image(images)
        xo.patch.open_clip(model, tome=xo.ToMeConfig(r=4), evit=xo.EViTConfig(0.7, (1,)))
        text = repr(model)
        assert "XrayMultiheadAttention" in text and "XrayResidualAttentionBlock" in text
        assert "xray_ops.patch.open_clip(" in text
        assert not torch.equal(model.encode_image(images), before)
        xo.patch.unpatch(model)
        assert "Xray" not in repr(model)
        assert torch.equal(model.encode_image(images), before)
    with pytest.raises(ValueError, match="unpatched"):
        xo.patch.unpatch(model)


def test_torch_compile_fullgraph_image_tower():
    model = xo.patch.open_clip(_clip(), tome=xo.ToMeConfig(r=4), evit=xo.EViTConfig(0.7, (1,)))
    images = _images()
    with torch.no_grad():
        want = model.visual(images)
        got = torch.compile(model.visual, fullgraph=True, backend="aot_eager")(images)
    torch.testing.assert_close(got, want)


def test_int8_on_both_towers():
    model = _clip()
    images, text = _images(), _text()
    with torch.no_grad():
        img0, txt0 = model.encode_image(images), model.encode_text(text)
        q = xo.patch.open_clip(copy.deepcopy(model), tome=xo.ToMeConfig(r=2), int8=True)
        img, txt = q.encode_image(images), q.encode_text(text)
    blk = q.visual.transformer.resblocks[0]
    assert blk.attn.in_proj_weight.dtype == torch.int8
    assert isinstance(blk.attn.out_proj, xo.nn.Int8Linear)
    assert isinstance(q.transformer.resblocks[0].mlp.c_fc, xo.nn.Int8Linear)  # text tower
    cos = torch.nn.functional.cosine_similarity
    assert cos(txt, txt0).min() > 0.99
    # ToMe changes the image embedding a little on its own: compare with float + ToMe
    with torch.no_grad():
        f = xo.patch.open_clip(copy.deepcopy(model), tome=xo.ToMeConfig(r=2))
        assert cos(img, f.encode_image(images)).min() > 0.99
        assert cos(img, img0).min() > 0.9


def test_unsupported_towers_and_twice_are_errors():
    with pytest.raises(TypeError, match="open_clip VisionTransformer"):
        xo.patch.open_clip(torch.nn.Linear(2, 2))
    custom = _clip(qk_norm=True)  # CustomResidualAttentionBlock: not supported
    with pytest.raises(TypeError, match=r"visual\.transformer"):
        xo.patch.open_clip(custom)
    model = xo.patch.open_clip(_clip())
    with pytest.raises(RuntimeError, match="already patched"):
        xo.patch.open_clip(model)
    with pytest.raises(ValueError, match="locations"):
        xo.patch.open_clip(_clip(), evit=xo.EViTConfig(0.7, (5,)))
