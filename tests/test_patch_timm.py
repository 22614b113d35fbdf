"""xray_ops.patch.timm: patched timm ViTs against unpatched ones (attention only), against a
step-by-step reference forward (ToMe, EViT, both), and against ToMe's own patch where that patch
is correct; gradients, grad checkpointing, torch.compile, int8, state_dict, print, unpatch,
and the errors. Tiny configs (depth 2-4, 48-64 px images, pretrained=False)."""

import copy
import io

import pytest
import torch

import xray_ops as xo
from xray_ops.testing import assert_close_to_reference

from . import _patch_reference as ref

timm = pytest.importorskip("timm")


def _vit(name="vit_tiny_patch16_224", **kw):
    kw.setdefault("img_size", 48)
    kw.setdefault("depth", 2)
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kw).eval()


def _images(model, B=2, size=None, dtype=torch.float32):
    s = size or model.patch_embed.img_size[0]
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, 3, s, s, generator=g, dtype=dtype)


def _grads(model, images):
    """Output and the gradients of every parameter (and the input) for a fixed random cotangent."""
    images = images.detach().requires_grad_()
    y = model(images)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(y, [images] + params, g.to(y.dtype), allow_unused=True)
    return y, dict(zip(["input"] + names, grads))


# ----------------------------------------------------------------------------------------------
# attention only: the unpatched model in float64 is the reference, in float32 the error budget
# ----------------------------------------------------------------------------------------------
ATTENTION_CASES = {
    "vit_tiny": dict(),
    "vit_small_layerscale_qknorm": dict(name="vit_small_patch16_224", init_values=1e-1,
                                        qk_norm=True),
    "registers": dict(reg_tokens=4, no_embed_class=True, init_values=1e-1),
    "no_class_token": dict(class_token=False, global_pool="avg"),
    "dynamic_img_size": dict(dynamic_img_size=True, img_size=64),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_only_matches_timm_forward_and_gradients(case):
    kw = dict(ATTENTION_CASES[case])
    model = _vit(**kw)
    # dynamic image size: a size the model was not built for (5 x 4 patches)
    images = _images(model) if case != "dynamic_img_size" else torch.randn(2, 3, 80, 64)
    y64, g64 = _grads(copy.deepcopy(model).double(), images.double())
    y32, g32 = _grads(model, images)
    patched = xo.patch.timm(copy.deepcopy(model))
    assert patched.state_dict().keys() == model.state_dict().keys()
    y, g = _grads(patched, images)
    assert_close_to_reference(y, y64, y32, name=f"{case} output")
    for name in g64:
        assert_close_to_reference(g[name], g64[name], g32[name], name=f"{case} grad {name}")


def test_attention_only_in_training_with_drop_path_equals_timm():
    """drop_path draws the same random numbers in the patched model (the blocks are timm's)."""
    model = _vit(drop_path_rate=0.5, init_values=1e-1).train()
    patched = xo.patch.timm(copy.deepcopy(model))
    images = _images(model)
    torch.manual_seed(5)
    a = model(images)
    torch.manual_seed(5)
    b = patched(images)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_attention_mask_goes_through_the_patched_attention():
    model = _vit()
    patched = xo.patch.timm(copy.deepcopy(model))
    images = _images(model)
    n = 1 + model.patch_embed.num_patches
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    torch.testing.assert_close(patched(images, attn_mask=mask), model(images, attn_mask=mask),
                               rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# token reduction: equal to the step-by-step reference (float64)
# ----------------------------------------------------------------------------------------------
REDUCE_CASES = {
    # (model kwargs, tome r, evit (keep_rate, locations, fuse) or None)
    "tome_layerscale_qknorm": (dict(init_values=1e-1, qk_norm=True, depth=3), 3, None),
    "tome_schedule": (dict(depth=3, img_size=64), (5, -1.0), None),
    "tome_registers": (dict(reg_tokens=3, depth=3, img_size=64), 4, None),
    "tome_no_class_token_avg_pool": (dict(class_token=False, global_pool="avg", depth=3), 3,
                                     None),
    "evit": (dict(depth=3, img_size=64, init_values=1e-1), 0, (0.7, (0, 2), True)),
    "evit_no_fuse_registers": (dict(depth=3, img_size=64, reg_tokens=2), 0, (0.5, (1,), False)),
    "evit_and_tome": (dict(depth=4, img_size=64), 2, (0.7, (1, 3), True)),
}


@pytest.mark.parametrize("case", list(REDUCE_CASES))
def test_token_reduction_matches_step_by_step_reference(case):
    kw, r, evit = REDUCE_CASES[case]
    model = _vit(**kw).double()
    images = _images(model, dtype=torch.float64)
    tome_cfg = xo.ToMeConfig(r=r) if r else None
    evit_cfg = xo.EViTConfig(evit[0], evit[1], evit[2]) if evit else None
    rs = tome_cfg.schedule(len(model.blocks)) if tome_cfg else [0] * len(model.blocks)
    assert any(rs) or evit
    want = ref.timm_forward(model, images, rs=rs, evit=evit)
    patched = xo.patch.timm(copy.deepcopy(model), tome=tome_cfg, evit=evit_cfg)
    got = patched(images)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    n_tokens = xo.patch.state(patched).size.shape[1] if tome_cfg else None
    if tome_cfg:  # the merges really happened
        assert n_tokens < 1 + model.patch_embed.num_patches


def test_token_reduction_with_dynamic_image_size():
    """Images of a size the model was not built for (6 x 4 patches) merge as any other."""
    model = _vit(depth=3, dynamic_img_size=True, reg_tokens=1).double()
    images = torch.randn(2, 3, 96, 64, dtype=torch.float64)
    evit = (0.7, (1,), True)
    want = ref.timm_forward(model, images, rs=[3, 3, 3], evit=evit)
    patched = xo.patch.timm(copy.deepcopy(model), tome=xo.ToMeConfig(r=3),
                            evit=xo.EViTConfig(*evit))
    torch.testing.assert_close(patched(images), want, rtol=1e-10, atol=1e-10)


def test_token_reduction_gradients_match_the_reference():
    model = _vit(depth=3, img_size=64, init_values=1e-1, qk_norm=True).double()
    images = _images(model, dtype=torch.float64)
    evit = (0.7, (1,), True)
    patched = xo.patch.timm(copy.deepcopy(model), tome=xo.ToMeConfig(r=3),
                            evit=xo.EViTConfig(*evit))
    _, g = _grads(patched, images)

    class Ref(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return ref.timm_forward(self.m, x, rs=[3, 3, 3], evit=evit)

    _, g_ref = _grads(Ref(model), images)
    for name, want in g_ref.items():
        name = name.removeprefix("m.")
        assert g[name] is not None, name
        torch.testing.assert_close(g[name], want, rtol=1e-9, atol=1e-10, msg=name)


def test_tome_with_distillation_token_keeps_cls_and_dist_first():
    model = _vit("deit_tiny_distilled_patch16_224", depth=3, img_size=64).double()
    images = _images(model, dtype=torch.float64)
    want = ref.timm_forward(model, images, rs=[4, 4, 4])
    patched = xo.patch.timm(copy.deepcopy(model), tome=xo.ToMeConfig(r=4))
    torch.testing.assert_close(patched(images), want, rtol=1e-10, atol=1e-10)


def test_trace_source_rows_cover_every_patch_once():
    model = _vit(depth=3, img_size=64, reg_tokens=2)
    patched = xo.patch.timm(model, tome=xo.ToMeConfig(r=4, trace_source=True),
                            evit=xo.EViTConfig(0.6, (1,), fuse=True))
    patched(_images(model))
    st = xo.patch.state(patched)
    n0 = 3 + model.patch_embed.num_patches
    assert st.source.shape[1:] == (st.size.shape[1], n0)
    # sources are disjoint; EViT's fused token holds the dropped ones, so every original token
    # is in exactly one row
    torch.testing.assert_close(st.source.sum(1), torch.ones(2, n0))


# ----------------------------------------------------------------------------------------------
# ToMe's own patch (facebookresearch/ToMe), where it is correct: no LayerScale, no q/k norm
# ----------------------------------------------------------------------------------------------
def _upstream_tome():
    try:
        import tome
        import tome.patch
    except ImportError:
        pytest.skip("ToMe's repository is not importable (recreate it outside the repo and "
                    "put it on PYTHONPATH, e.g. PYTHONPATH=/tmp/upstream/ToMe; the PyPI 'tome' "
                    "is an unrelated package)")
    if not hasattr(tome.patch, "timm"):
        pytest.skip(f"the importable 'tome' ({tome.__file__}) is not ToMe's repository")
    return tome


@pytest.mark.parametrize("r", [4, (6, -0.5)])
def test_tome_equals_tomes_own_patch(r):
    tome = _upstream_tome()
    model = _vit(depth=4, img_size=64).double()
    images = _images(model, dtype=torch.float64)
    theirs = copy.deepcopy(model)
    tome.patch.timm(theirs)
    theirs.r = r
    ours = xo.patch.timm(copy.deepcopy(model), tome=xo.ToMeConfig(r=r))
    torch.testing.assert_close(ours(images), theirs(images), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(xo.patch.state(ours).size, theirs._tome_info["size"])


def test_tomes_own_patch_drops_layerscale_where_ours_keeps_it():
    """The fault the patch fixes: ToMe's patch silently skips timm's ls1/ls2."""
    tome = _upstream_tome()
    model = _vit(depth=2, init_values=1e-3).double()
    images = _images(model, dtype=torch.float64)
    want = ref.timm_forward(model, images, rs=[2, 2])
    theirs = copy.deepcopy(model)
    tome.patch.timm(theirs)
    theirs.r = 2
    ours = xo.patch.timm(copy.deepcopy(model), tome=xo.ToMeConfig(r=2))
    torch.testing.assert_close(ours(images), want, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(theirs(images), want, rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------------------------
# training details, compile, int8
# ----------------------------------------------------------------------------------------------
def test_grad_checkpointing_gives_the_same_gradients():
    model = _vit(depth=3, img_size=64).double()
    images = _images(model, dtype=torch.float64)
    kw = dict(tome=xo.ToMeConfig(r=3), evit=xo.EViTConfig(0.7, (1,)))
    plain = xo.patch.timm(copy.deepcopy(model), **kw).train()
    ckpt = xo.patch.timm(copy.deepcopy(model), **kw).train()
    ckpt.set_grad_checkpointing(True)
    y0, g0 = _grads(plain, images)
    y1, g1 = _grads(ckpt, images)
    torch.testing.assert_close(y1, y0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], msg=name)


def test_training_under_bf16_autocast_runs_every_patched_piece():
    """Autocast hands the attention bf16 while the residual stream stays fp32."""
    model = _vit(depth=2, init_values=1e-1).train()
    patched = xo.patch.timm(model, tome=xo.ToMeConfig(r=2), evit=xo.EViTConfig(0.7, (1,)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = patched(_images(model)).float().logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in patched.parameters())


def test_evit_schedule_follows_set_step_in_training():
    model = _vit(depth=3, img_size=64)
    patched = xo.patch.timm(model, evit=xo.EViTConfig(0.5, (1,), warmup_steps=2,
                                                      shrink_steps=4))
    images = _images(model)
    patched.train()
    patched(images)
    n_full = patched.blocks[1].evit.current_rate()
    assert n_full == 1.0
    patched.set_step(6)
    assert patched.blocks[1].evit.current_rate() == 0.5
    patched.eval()
    assert patched.blocks[1].evit.current_rate() == 0.5


def test_torch_compile_fullgraph_forward_and_backward():
    model = _vit(depth=2, init_values=1e-1, reg_tokens=1)
    patched = xo.patch.timm(copy.deepcopy(model), tome=xo.ToMeConfig(r=2),
                            evit=xo.EViTConfig(0.7, (1,)))
    images = _images(model)
    y_eager, g_eager = _grads(patched, images)
    compiled = torch.compile(patched, fullgraph=True, backend="aot_eager")
    y, g = _grads(compiled, images)
    torch.testing.assert_close(y, y_eager)
    for name in g_eager:
        torch.testing.assert_close(g[name.removeprefix("_orig_mod.")] if name in g else
                                   g["_orig_mod." + name], g_eager[name], msg=name)


def test_int8_keeps_the_head_in_float_and_stays_close():
    model = _vit(depth=2)
    images = _images(model)
    with torch.no_grad():
        want = model(images)
        q = xo.patch.timm(copy.deepcopy(model), tome=xo.ToMeConfig(r=1), int8=True)
        got = q(images)
    assert isinstance(q.head, torch.nn.Linear) and not isinstance(q.head, xo.nn.Int8Linear)
    assert isinstance(q.blocks[0].attn.qkv, xo.nn.Int8Linear)
    assert isinstance(q.blocks[0].norm1, xo.nn.Int8LayerNorm)  # LayerNorm + quant fused
    assert torch.nn.functional.cosine_similarity(got, want).min() > 0.98
    everything = xo.patch.timm(copy.deepcopy(model), int8=True, int8_filter=lambda m, n: True)
    assert isinstance(everything.head, xo.nn.Int8Linear)


# ----------------------------------------------------------------------------------------------
# bookkeeping: state_dict, print, unpatch, patching twice, errors
# ----------------------------------------------------------------------------------------------
def test_state_dict_print_and_unpatch_restores_the_forward_bitwise():
    model = _vit(init_values=1e-1, qk_norm=True)
    images = _images(model)
    before = model(images)
    keys = list(model.state_dict())
    xo.patch.timm(model, tome=xo.ToMeConfig(r=2), evit=xo.EViTConfig(0.7, (1,)))
    assert list(model.state_dict()) == keys
    text = repr(model)
    assert "XrayVisionTransformer" in text and "XrayAttention" in text and "tome r=2" in text
    assert "EViTSelect" in text
    patched_out = model(images)
    buf = io.BytesIO()  # the patched classes are made at run time: pickling still works
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(loaded(images), patched_out)
    assert loaded.blocks[0]._xo_state is xo.patch.state(loaded)
    xo.patch.unpatch(model)
    assert type(model).__name__ == "VisionTransformer" and "Xray" not in repr(model)
    assert list(model.state_dict()) == keys
    assert torch.equal(model(images), before)


def test_patching_twice_is_an_error_and_unpatched_models_are_refused():
    model = _vit()
    xo.patch.timm(model)
    with pytest.raises(RuntimeError, match="already patched.*unpatch"):
        xo.patch.timm(model, tome=xo.ToMeConfig(r=2))
    xo.patch.unpatch(model)
    xo.patch.timm(model, tome=xo.ToMeConfig(r=2))  # after unpatch: fine
    with pytest.raises(ValueError, match="unpatched"):
        xo.patch.unpatch(_vit())


def test_unsupported_models_name_the_module():
    with pytest.raises(TypeError, match="timm VisionTransformer.*Linear"):
        xo.patch.timm(torch.nn.Linear(2, 2))
    model = _vit()
    model.blocks[1].attn = torch.nn.Identity()
    with pytest.raises(TypeError, match=r"model\.blocks\.1\.attn.*Identity"):
        xo.patch.timm(model)
    from timm.models.vision_transformer import ResPostBlock

    post = _vit(block_fn=ResPostBlock)
    with pytest.raises(TypeError, match=r"model\.blocks\.0.*ResPostBlock"):
        xo.patch.timm(post, tome=xo.ToMeConfig(r=2))
    with pytest.raises(ValueError, match="no class token"):
        xo.patch.timm(_vit(class_token=False, global_pool="avg"),
                      evit=xo.EViTConfig(0.7, (1,)))
    with pytest.raises(ValueError, match="locations"):
        xo.patch.timm(_vit(depth=2), evit=xo.EViTConfig(0.7, (3,)))
    with pytest.raises(ValueError, match="attention"):
        xo.patch.timm(_vit(), attention=False, tome=xo.ToMeConfig(r=2))
    with pytest.raises(TypeError, match="tome: expected"):
        xo.patch.timm(_vit(), tome=8)
    with pytest.raises(TypeError, match="int8: expected"):
        xo.patch.timm(_vit(), int8="yes")


def test_masks_with_token_reduction_are_refused():
    model = xo.patch.timm(_vit(), tome=xo.ToMeConfig(r=2))
    with pytest.raises(ValueError, match="attn_mask"):
        model(_images(model), attn_mask=torch.ones(10, 10, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------
# GPU (not yet run on a GPU): the same checks on the Triton / CUDA kernels
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_attention_only_matches_timm(dtype):
    model = _vit("vit_small_patch16_224", init_values=1e-1, qk_norm=True, depth=3, img_size=224)
    images = _images(model)
    y64, g64 = _grads(copy.deepcopy(model).double(), images.double())
    base = copy.deepcopy(model).cuda().to(dtype)
    y_lo, g_lo = _grads(base, images.cuda().to(dtype))
    patched = xo.patch.timm(copy.deepcopy(model).cuda().to(dtype))
    y, g = _grads(patched, images.cuda().to(dtype))
    assert xo.last_backend("flash_attention") in ("triton", "cuda")
    assert_close_to_reference(y.cpu(), y64, y_lo.cpu(), name="output")
    for name in ("input", "blocks.0.attn.qkv.weight", "blocks.2.attn.q_norm.weight"):
        assert_close_to_reference(g[name].cpu(), g64[name], g_lo[name].cpu(), name=name)


@pytest.mark.gpu
def test_gpu_token_reduction_matches_reference_and_compiles():
    model = _vit(depth=4, img_size=224, init_values=1e-1, reg_tokens=2).cuda()
    images = _images(model).cuda()
    evit = (0.7, (1, 3), True)
    patched = xo.patch.timm(copy.deepcopy(model), tome=xo.ToMeConfig(r=8),
                            evit=xo.EViTConfig(*evit))
    with torch.no_grad():
        want = ref.timm_forward(model, images, rs=[8] * 4, evit=evit)
        got = patched(images)
        compiled = torch.compile(patched, fullgraph=True)(images)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled, got, rtol=1e-4, atol=1e-4)
